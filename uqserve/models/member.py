"""The member graph: backbone once, S samples from the head, reduced in the graph.

Samples are drawn ``sample_chunk`` at a time and folded into running sums, so the
graph's working memory is that of one chunk whatever S is (onnxruntime frees a
chunk's tensors before the next chunk's are made).

``forward(image [B,C,H,W] f32, seed [B] i64, offset [B,3] i64, valid [B,2] i64)``
returns ``mean [B,K,H,W]``, ``sample_entropy [B,H,W]``, ``sample_counts [B,S,K]``
(valid region only) and ``sample_labels [B,S,H,W]`` uint8 — the signature in
``docs/architecture.md`` shared by all twenty combinations. A volumetric network
(``ModelConfig.dims=3``) gives the 3D form of ``uqserve.contracts``: a ``D`` axis
before ``H``, ``valid [B,3]`` and ``offset [B,3]`` the window's global start.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from uqserve.errors import UsageError
from uqserve.models.config import DEFAULT_SAMPLE_CHUNK
from uqserve.models.dropout import FreshMasks, freeze_dropout_masks, fresh_dropout_masks
from uqserve.models.heads import HashNoise, SegNetwork


def summarize(probs: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Reduce ``probs [B,S,K,H,W]`` (or ``[B,S,K,D,H,W]``) over its S samples, so that
    chunks add up.

    Returns the sum of the probabilities ``[B,K,H,W]``, the sum of the sample
    entropies ``[B,H,W]``, the per-sample counts ``[B,S,K]`` (inside ``valid
    [B, 2 or 3]``, the unpadded extent of each axis) and the labels
    ``[B,S,H,W]`` uint8 (each with the ``D`` axis in 3D).
    """
    k, spatial = probs.shape[2], probs.shape[3:]
    n = len(spatial)
    sum_p = probs.sum(dim=1)
    # 0 ln 0 = 0 exactly: clamp only inside the log (p * log(1e-30) is 0 when p is 0).
    plogp = probs * torch.log(probs.clamp_min(1e-30))
    sum_h = -plogp.sum(dim=(1, 2))
    labels = probs.argmax(dim=2)  # [B,S,(D,)H,W] int64
    inside = torch.ones(1, *([1] * n), dtype=torch.bool)
    for a, size in enumerate(spatial):  # inside the valid extent along every axis
        shape = [1] * (n + 1)
        shape[a + 1] = -1
        pos = torch.arange(size, dtype=torch.int64).view(shape)
        inside = inside & (pos < valid[:, a].view(-1, *([1] * n)))
    inside_f = inside.to(torch.float32).unsqueeze(1).unsqueeze(1)  # [B,1,1,(D,)H,W]
    classes = torch.arange(k, dtype=torch.int64).view(1, 1, -1, *([1] * n))
    onehot = (labels.unsqueeze(2) == classes).to(torch.float32)  # [B,S,K,(D,)H,W]
    counts = (onehot * inside_f).sum(dim=tuple(range(3, 3 + n)))
    return sum_p, sum_h, counts, labels.to(torch.uint8)


#: The buffer (and ONNX initializer) holding a member graph's index.
MEMBER_KEY = "member_key"


class MemberGraph(nn.Module):
    """One exported member: a trained network, its index and its sample count."""

    def __init__(
        self,
        net: nn.Module,
        member: int,
        num_samples: int,
        *,
        eu: str = "ensemble",
        seed: int = 0,
        sample_chunk: int = DEFAULT_SAMPLE_CHUNK,
    ) -> None:
        super().__init__()
        if not isinstance(net, SegNetwork):
            raise UsageError("member_graph needs a network from uqserve.models.build_network")
        if net.au == "softmax" and num_samples != 1:
            raise UsageError("softmax members draw exactly one sample (num_samples=1)")
        if num_samples < 1:
            raise UsageError(f"num_samples must be >= 1, got {num_samples}")
        if sample_chunk < 1:
            raise UsageError(f"sample_chunk must be >= 1, got {sample_chunk}")
        net = copy.deepcopy(net).eval()
        self.fresh: FreshMasks | None = None
        if eu == "mcdropout":
            if net.config.mc_dropout_masks == "frozen":
                found = freeze_dropout_masks(net, seed, member) > 0
            else:
                self.fresh = fresh_dropout_masks(net, member)
                found = self.fresh is not None
            if not found:
                raise UsageError("mcdropout member needs a network with dropout > 0")
        self.net = net
        self.member = int(member)
        # The member index as a named int64 initializer (MEMBER_KEY) of the exported
        # graph: members that differ only in it (fresh-mask MC dropout) are one export
        # with this value replaced (uqserve.exporting), not one export each.
        self.member_key: torch.Tensor
        self.register_buffer(MEMBER_KEY, torch.tensor(self.member, dtype=torch.int64))
        self.num_samples = int(num_samples)
        self.sample_chunk = int(sample_chunk)

    def forward(
        self,
        image: torch.Tensor,
        seed: torch.Tensor,
        offset: torch.Tensor,
        valid: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        h, w = image.shape[-2:]
        if self.fresh is not None:  # MC dropout: this forward pass's masks, per image
            # A volume's windows share one mask set (z 0), so windows do not change it.
            z = offset[:, 0] * 0 if image.ndim == 5 else offset[:, 0]
            self.fresh.seed, self.fresh.z = seed, z
            self.fresh.member = self.member_key
        context = self.net.head_context(image, self.net.features(image))
        total, chunk = self.num_samples, self.sample_chunk
        # Unrolled at export: each chunk's [B, c, K, H, W] tensors die before the next.
        parts = []
        for first in range(0, total, chunk):
            c = min(chunk, total - first)
            noise = HashNoise(seed, offset, self.member_key, c, h, w, first_sample=first)
            parts.append(summarize(self.net.sample_probs_from(context, noise, c), valid))
        sum_p, sum_h = parts[0][0], parts[0][1]
        for p in parts[1:]:
            sum_p, sum_h = sum_p + p[0], sum_h + p[1]
        counts = torch.cat([p[2] for p in parts], dim=1)
        labels = torch.cat([p[3] for p in parts], dim=1)
        return sum_p / total, sum_h / total, counts, labels
