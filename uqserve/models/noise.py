"""Counter-based noise: a deterministic function of explicit integer keys.

Every random quantity of an exported member graph (SSN's factor and diagonal
noise, the Probabilistic UNet's latent, diffusion's starting noise, frozen
MC-dropout masks) is a hash of integer keys such as
``(seed, member, sample, stream, channel, z, y, x)`` followed by Box-Muller.
The hash uses exact int64 arithmetic with two nonlinear rounds per key
``h = (h * h + c) mod (2**31 - 1)`` (``h < 2**31``, so ``h * h`` never
overflows int64); a purely linear hash correlates neighbouring pixels
(see docs/concepts/noise.md).

Because the keys are explicit, the noise does not depend on how a volume is
cut into batches, slabs or tiles, it is the same in PyTorch, in onnxruntime
and in the numpy twin below (up to the float rounding of ``log``/``cos``),
and ``--seed`` works at predict time.

Global noise (one value per sample, e.g. SSN's rank-r factor noise) hashes
keys without position, so sample ``s`` is one coherent segmentation of the
whole volume; per-pixel noise adds the global voxel position.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from uqserve.errors import UsageError

if TYPE_CHECKING:
    import torch

PRIME = 2**31 - 1
# Offsets of the nonlinear rounds (arbitrary odd constants below PRIME).
_SALT = 0x2545F491
_ROUNDS = (0x1B873593, 0x3C6EF372)
_U1 = 0x5BE0CD19
_U2 = 0x1F83D9AB

# Streams keep different uses of the noise independent.
STREAM_SSN_FACTOR = 1
STREAM_SSN_DIAG = 2
STREAM_PUNET_LATENT = 3
STREAM_DIFFUSION = 4  # + step index
STREAM_DROPOUT = 64


def hash_keys_np(keys: Sequence[npt.ArrayLike]) -> npt.NDArray[np.int64]:
    """Fold integer keys (broadcastable arrays) into one hash in ``[0, 2**31 - 1)``.

    The first key (the seed) may be any int64; later keys must lie in
    ``[0, 2**31)`` (indices and pixel positions), so ``(h + k)**2`` fits in int64.
    """
    h: npt.NDArray[np.int64] | None = None
    for i, k in enumerate(keys):
        kk = np.asarray(k, dtype=np.int64)
        if h is None:
            h = (kk % PRIME + _SALT) % PRIME if i == 0 else kk
        else:
            h = h + kk
        h = (h * h + _ROUNDS[0]) % PRIME
        h = (h * h + _ROUNDS[1]) % PRIME
    if h is None:
        raise UsageError("hash_keys_np needs at least one key")
    return h


def _to_unit_np(v: npt.NDArray[np.int64]) -> npt.NDArray[np.float32]:
    # 24 high bits -> exactly representable float32 in (0, 1).
    return ((v // 128).astype(np.float32) + np.float32(0.5)) / np.float32(2**24)


def _uniforms_np(
    h: npt.NDArray[np.int64],
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    # Two chained nonlinear rounds: (h*h + c1) and (h*h + c2) alone would differ by a
    # constant, making Box-Muller's two uniforms dependent.
    v1 = (h * h + _U1) % PRIME
    v2 = (v1 * v1 + _U2) % PRIME
    return _to_unit_np(v1), _to_unit_np(v2)


def uniform_np(keys: Sequence[npt.ArrayLike]) -> npt.NDArray[np.float32]:
    """Uniform noise in (0, 1), float32, shaped like the broadcast keys."""
    return _uniforms_np(hash_keys_np(keys))[0]


def normal_np(keys: Sequence[npt.ArrayLike]) -> npt.NDArray[np.float32]:
    """Standard normal noise (Box-Muller), float32, shaped like the broadcast keys."""
    h = hash_keys_np(keys)
    u1, u2 = _uniforms_np(h)
    r = np.sqrt(np.float32(-2.0) * np.log(u1))
    return (r * np.cos(np.float32(2.0 * np.pi) * u2)).astype(np.float32)


def normal_pair_np(
    keys: Sequence[npt.ArrayLike],
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    """Two independent standard normals per key tuple (Box-Muller's cos and sin)."""
    h = hash_keys_np(keys)
    u1, u2 = _uniforms_np(h)
    r = np.sqrt(np.float32(-2.0) * np.log(u1))
    a = np.float32(2.0 * np.pi) * u2
    return (r * np.cos(a)).astype(np.float32), (r * np.sin(a)).astype(np.float32)


# ---- torch twin (identical integer arithmetic; exports to ONNX Mul/Add/Mod) ----


def hash_keys(keys: Sequence[torch.Tensor | int]) -> torch.Tensor:
    """Torch version of :func:`hash_keys_np`; keys are int64 tensors or ints."""
    import torch

    h: torch.Tensor | None = None
    for k in keys:
        kt = k if isinstance(k, torch.Tensor) else torch.tensor(k, dtype=torch.int64)
        # The first key (the seed) is reduced; later ones are small indices/positions.
        h = (kt % PRIME + _SALT) % PRIME if h is None else h + kt
        h = (h * h + _ROUNDS[0]) % PRIME
        h = (h * h + _ROUNDS[1]) % PRIME
    if h is None:
        raise UsageError("hash_keys needs at least one key")
    return h


def _uniforms_t(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    import torch

    v1 = (h * h + _U1) % PRIME
    v2 = (v1 * v1 + _U2) % PRIME
    # v >= 0, so truncating division is floor division (and exports as a plain Div).
    u1 = (torch.div(v1, 128, rounding_mode="trunc").to(torch.float32) + 0.5) / float(2**24)
    u2 = (torch.div(v2, 128, rounding_mode="trunc").to(torch.float32) + 0.5) / float(2**24)
    return u1, u2


def uniform(keys: Sequence[torch.Tensor | int]) -> torch.Tensor:
    """Uniform noise in (0, 1), float32, shaped like the broadcast keys."""
    return _uniforms_t(hash_keys(keys))[0]


def normal(keys: Sequence[torch.Tensor | int]) -> torch.Tensor:
    """Standard normal noise (Box-Muller), float32, shaped like the broadcast keys."""
    import torch

    h = hash_keys(keys)
    u1, u2 = _uniforms_t(h)
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos((2.0 * np.pi) * u2)


def normal_pair(keys: Sequence[torch.Tensor | int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch version of :func:`normal_pair_np`: half the hashing per normal."""
    import torch

    h = hash_keys(keys)
    u1, u2 = _uniforms_t(h)
    r = torch.sqrt(-2.0 * torch.log(u1))
    a = (2.0 * np.pi) * u2
    return r * torch.cos(a), r * torch.sin(a)
