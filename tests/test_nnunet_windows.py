"""nnU-Net's sliding-window steps, run by nnU-Net's own code, against uqserve's.

Fast and exact: no model folder, no ONNX. nnU-Net's ``compute_gaussian``,
``pad_nd_image`` and ``nnUNetPredictor.predict_sliding_window_return_logits``
(its padding, window steps, float16 Gaussian and float16 logit sums) run on a
small random convolution, a network whose windows disagree near their edges
(zero padding in the convolution) and so exercise the blending; uqserve cuts
the same volume into windows with ``windows.iter_tiles``, runs the same
convolution on them and blends them with ``stitch.stitch``. The slow,
end-to-end comparison with nnU-Net's trained-model pipeline is
``test_nnunet_parity``.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator
from types import SimpleNamespace

import numpy as np
import pytest

from uqserve.bundle import InputSpec, Manifest, Member, Padding
from uqserve.prediction.stitch import stitch
from uqserve.prediction.windows import iter_tiles, nnunet_gaussian, plan_tiles
from uqserve.runtime import Batch, MemberOutputs

torch = pytest.importorskip("torch")
with contextlib.redirect_stdout(io.StringIO()):  # nnunetv2.paths warns on stdout
    sliding = pytest.importorskip("nnunetv2.inference.sliding_window_prediction")
    predict_mod = pytest.importorskip("nnunetv2.inference.predict_from_raw_data")


@pytest.mark.parametrize("patch", [(32, 32), (24, 17), (8, 32, 32), (7, 20, 17), (96, 96, 96)])
def test_gaussian_is_nnunets_bit_for_bit(patch: tuple[int, ...]) -> None:
    """Catches a Gaussian centred at (n - 1) / 2 instead of n // 2 (even sizes), another
    sigma or truncation, a float32 map, and zeros (3D corners underflow in float16)
    not raised to the smallest weight."""
    theirs = sliding.compute_gaussian(patch, 1.0 / 8, 10, device=torch.device("cpu")).numpy()
    ours = nnunet_gaussian(patch)
    assert ours.dtype == theirs.dtype == np.float16
    assert np.array_equal(ours, theirs)
    if len(patch) == 3:
        assert (theirs.astype(np.float32) < np.finfo(np.float16).tiny).any()  # subnormal corners


def _manifest(patch: tuple[int, ...], pad: Padding) -> Manifest:
    """A one-member softmax manifest with nnU-Net's window settings."""
    inp = InputSpec(
        dims=len(patch), patch=patch, tile_size=(patch[-2], patch[-1]), multiple=1,
        pad=pad, blend="logits", gaussian="nnunet",
    )  # fmt: skip
    return Manifest(
        name="nnunet-windows", au="softmax", eu="none", num_members=1, num_samples=1,
        classes=("background", "lesion"), members=(Member("member_0.onnx", "0" * 64),),
        input=inp,
    )  # fmt: skip


def _predictor(net: object, patch: tuple[int, ...]) -> object:
    """nnU-Net's predictor on the CPU around ``net``, as its model-folder loader sets it up."""
    p = predict_mod.nnUNetPredictor(
        tile_step_size=0.5, use_gaussian=True, use_mirroring=False,
        perform_everything_on_device=False, device=torch.device("cpu"),
        verbose=False, allow_tqdm=False,
    )  # fmt: skip
    p.network = net
    p.configuration_manager = SimpleNamespace(patch_size=list(patch))
    p.label_manager = SimpleNamespace(num_segmentation_heads=2)
    p.allowed_mirroring_axes = None
    return p


def _outputs(batches: Iterator[Batch], net: object) -> Iterator[list[MemberOutputs]]:
    """The convolution on uqserve's windows, as a runtime returns a member's outputs."""
    for batch in batches:
        x = torch.from_numpy(batch.image)
        with torch.no_grad():
            z = net(x).numpy()  # type: ignore[operator]
        p = np.exp(z - z.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        b, sp = z.shape[0], z.shape[2:]
        out = MemberOutputs(
            mean=p.astype(np.float32), sample_entropy=np.zeros((b, *sp), np.float32),
            sample_counts=np.zeros((b, 1, 2), np.float32), logits=z,
        )  # fmt: skip
        yield [out]


@pytest.mark.parametrize(
    ("patch", "grid"),
    [
        ((8, 16, 16), (6, 40, 13)),  # smaller than the patch along z and x, larger along y
        ((8, 16, 16), (13, 21, 35)),  # larger along every axis: overlapping windows
        ((16, 16), (3, 11, 37)),  # 2d: slices [D] of [H, W], padded rows, windowed columns
    ],
)
def test_padding_and_logit_blending_are_nnunets(
    patch: tuple[int, ...], grid: tuple[int, int, int]
) -> None:
    """uqserve's blended logits equal nnU-Net's ``predict_sliding_window_return_logits``.

    Catches reflection or far-edge padding instead of nnU-Net's centred 0 (the
    padded windows' convolution sees other voxels), windows at other starts, a
    float32 or another Gaussian, probability blending, and float32 sums
    instead of nnU-Net's float16 ones (which round most at the window corners).
    """
    torch.manual_seed(0)
    conv = torch.nn.Conv3d if len(patch) == 3 else torch.nn.Conv2d
    net = conv(1, 2, 3, padding=1).eval()
    with torch.no_grad():
        net.weight.mul_(8.0)  # logits of several units: probabilities far from 0.5
    rng = np.random.default_rng(0)
    work = rng.normal(size=grid).astype(np.float32)  # [D, H, W], normalised
    nnunet_pad = Padding(mode="constant", value=0.0, centre=True)
    man = _manifest(patch, nnunet_pad)
    # uqserve: the model array is [X', Y', Z'] = [W, H, D] (3D) or slices along axis 2
    shape = tuple(reversed(grid)) if len(patch) == 3 else (grid[1], grid[2], grid[0])
    plan = plan_tiles(shape, 2, man, batch_size=1, overlap=0.5)  # nnU-Net: one at a time
    assert plan.grid == grid
    batches = iter_tiles(work, plan, seed=0, pad=nnunet_pad)
    st = stitch(_outputs(batches, net), plan, man, want_labels=False)
    ours = np.moveaxis(st.member_mean[0], (1, 2, 3), (3, 2, 1))  # [K, W, H, D] -> [K, D, H, W]
    if len(patch) == 2:
        ours = np.moveaxis(st.member_mean[0], 3, 1)  # [K, H, W, D] -> [K, D, H, W]
    predictor = _predictor(net, patch)
    theirs = predictor.predict_sliding_window_return_logits(torch.from_numpy(work[None]))
    assert theirs.dtype == torch.float16 and tuple(theirs.shape) == (2, *grid)
    theirs = theirs.float().numpy()
    assert st.logits and np.array_equal(ours, theirs), float(np.abs(ours - theirs).max())
