"""The model zoo: registry, configs, counter-based noise, losses, MC-dropout masks."""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from uqserve.models import (  # noqa: E402
    AU_METHODS,
    COMBINATIONS,
    ModelConfig,
    build_network,
    member_graph,
    noise,
    parse_combination,
)
from uqserve.models.dropout import dropout_layers, freeze_dropout_masks  # noqa: E402
from uqserve.models.heads import HashNoise  # noqa: E402

TINY = {"width": 8, "depth": 3}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_combinations_cover_the_grid() -> None:
    assert len(COMBINATIONS) == 20  # 4 AU x 5 EU (none, ensemble, mcdropout, swag, swagdiag)
    assert parse_combination("ssn-ensemble") == ("ssn", "ensemble")
    for name in COMBINATIONS:
        au, eu = parse_combination(name)
        assert f"{au}-{eu}" == name
    with pytest.raises(ValueError, match="softmax-ensemble"):
        parse_combination("ssn-laplace")


def test_model_config_round_trip_and_validation() -> None:
    cfg = ModelConfig(width=12, depth=2, dropout=0.2, num_samples=7, dropout_positions=["decoder"])
    again = ModelConfig.from_dict(cfg.to_dict())
    assert again == cfg and again.dropout_positions == ("decoder",)
    assert cfg.multiple == 2
    with pytest.raises(ValueError, match="num_classes"):
        ModelConfig(num_classes=1)
    with pytest.raises(ValueError, match="dropout_positions"):
        ModelConfig(dropout_positions=("everywhere",))
    with pytest.raises(ValueError, match="unknown fields"):
        ModelConfig.from_dict({"widht": 8})
    with pytest.raises(ValueError, match="unknown AU method"):
        build_network("swag", ModelConfig())


# ---------------------------------------------------------------- noise


def test_torch_noise_equals_numpy_twin() -> None:
    keys_np = [
        np.int64(2**40 + 3),
        2,
        np.arange(5)[:, None, None],
        7,
        np.arange(3)[None, :, None],
        np.arange(11),
    ]
    keys_t = [
        k if isinstance(k, int) else torch.from_numpy(np.asarray(k, dtype=np.int64))
        for k in keys_np
    ]
    h_np, h_t = noise.hash_keys_np(keys_np), noise.hash_keys(keys_t).numpy()
    assert h_np.shape == (5, 3, 11) and np.array_equal(h_np, h_t)
    assert (h_np >= 0).all() and (h_np < noise.PRIME).all()
    np.testing.assert_array_equal(noise.uniform_np(keys_np), noise.uniform(keys_t).numpy())
    np.testing.assert_allclose(noise.normal_np(keys_np), noise.normal(keys_t).numpy(), atol=1e-5)
    for a, b in zip(noise.normal_pair_np(keys_np), noise.normal_pair(keys_t), strict=True):
        np.testing.assert_allclose(a, b.numpy(), atol=1e-5)
    np.testing.assert_array_equal(noise.normal_pair_np(keys_np)[0], noise.normal_np(keys_np))


def test_noise_is_standard_normal_and_uncorrelated() -> None:
    y = np.arange(256)[:, None]
    x = np.arange(256)[None, :]
    z = noise.normal_np([123, 0, 0, noise.STREAM_SSN_DIAG, 0, 5, y, x]).astype(np.float64)
    assert abs(z.mean()) < 0.02 and abs(z.std() - 1) < 0.02
    assert abs((np.abs(z) > 2).mean() - 0.0455) < 0.004  # Gaussian tails, not just moments
    # Neighbouring pixels, samples, classes and seeds must not correlate (a
    # linear hash gives about 0.6 between neighbours).
    other_sample = noise.normal_np([123, 0, 1, noise.STREAM_SSN_DIAG, 0, 5, y, x])
    other_class = noise.normal_np([123, 0, 0, noise.STREAM_SSN_DIAG, 1, 5, y, x])
    other_seed = noise.normal_np([124, 0, 0, noise.STREAM_SSN_DIAG, 0, 5, y, x])
    pairs = [
        (z[:, :-1], z[:, 1:]),
        (z[:-1], z[1:]),
        (z, other_sample),
        (z, other_class),
        (z, other_seed),
    ]
    for a, b in pairs:
        assert abs(np.corrcoef(np.ravel(a), np.ravel(b))[0, 1]) < 0.03
    cos, sin = noise.normal_pair_np([123, 0, 0, noise.STREAM_SSN_DIAG, 0, 5, y, x])
    assert abs(sin.std() - 1) < 0.02 and abs(np.corrcoef(cos.ravel(), sin.ravel())[0, 1]) < 0.03
    u = noise.uniform_np([9, np.arange(100_000)])
    assert 0 < u.min() and u.max() < 1 and abs(u.mean() - 0.5) < 0.01


def test_pixel_noise_does_not_depend_on_tiling_or_batching() -> None:
    seed = torch.tensor([77, 77], dtype=torch.int64)
    slab = HashNoise(seed[:1], torch.tensor([[3, 0, 16]]), 1, 4, 64, 32).pixel_normal(2, 3)
    tiles = HashNoise(seed, torch.tensor([[3, 0, 16], [3, 32, 16]]), 1, 4, 32, 32).pixel_normal(
        2, 3
    )
    torch.testing.assert_close(slab[0, :, :, :32], tiles[0], rtol=0, atol=0)
    torch.testing.assert_close(slab[0, :, :, 32:], tiles[1], rtol=0, atol=0)
    # channels 0, 1 of three are the cos of pairs 0, 1; channel 2 is the sin of pair 0
    expect = noise.normal_pair_np(
        [77, 1, np.arange(4)[:, None, None], 2, 0, 3, np.arange(64)[:, None], 16 + np.arange(32)]
    )[1]
    np.testing.assert_allclose(slab[0, :, 2].numpy(), expect, atol=1e-5)
    # Global noise has no position: the same for every tile and slice of a volume.
    g = HashNoise(seed, torch.tensor([[0, 0, 0], [9, 32, 64]]), 1, 4, 32, 32).global_normal(1, 10)
    torch.testing.assert_close(g[0], g[1], rtol=0, atol=0)
    other_member = HashNoise(seed, torch.zeros(2, 3, dtype=torch.int64), 2, 4, 8, 8)
    assert not torch.equal(other_member.global_normal(1, 10), g)


# ---------------------------------------------------------------- losses


def _batch(n: int = 4, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    image = torch.randn(n, 1, size, size, generator=gen)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    disc = ((yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size / 4) ** 2).long()
    target = disc.expand(n, size, size).clone()
    image = image * 0.3 + target.unsqueeze(1).float()
    return image, target


@pytest.mark.parametrize("au", AU_METHODS)
def test_loss_trains_every_au_method(au: str) -> None:
    torch.manual_seed(0)
    net = build_network(
        au, ModelConfig(**TINY, num_samples=1 if au == "softmax" else 4, punet_warmup=5)
    )
    image, target = _batch()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    net.train()
    losses = []
    for _ in range(25):
        loss, logs = net.loss(image, target)
        assert loss.ndim == 0 and torch.isfinite(loss)
        assert logs and all(np.isfinite(v) for v in logs.values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert net.step == 25
    assert np.mean(losses[-5:]) < np.mean(losses[:5])
    probs = net.eval()(image[:2])
    s = 1 if au == "softmax" else 4
    assert probs.shape == (2, s, 2, 32, 32)
    torch.testing.assert_close(probs.sum(2), torch.ones(2, s, 32, 32))


def test_loss_rejects_bad_shapes() -> None:
    net = build_network("softmax", ModelConfig(**TINY))
    image, target = _batch(2)
    with pytest.raises(ValueError, match="target must be"):
        net.loss(image, target[:, :16])
    with pytest.raises(ValueError, match="multiples of 4"):
        net.loss(image[:, :, :30, :30], target[:, :30, :30])
    with pytest.raises(ValueError, match=r"image must be \[B, 1, H, W\]"):
        net.loss(image.repeat(1, 2, 1, 1), target)


def test_ssn_warmup_zeroes_the_factor_and_keeps_diagonal_and_mc_loss() -> None:
    net = build_network("ssn", ModelConfig(**TINY, ssn_warmup=2))
    image, target = _batch(2)
    loss, logs = net.loss(image, target)
    assert logs.get("warmup") == 1.0
    loss.backward()
    grads = {n: p.grad for n, p in net.named_parameters()}
    # The factor head gets no gradient; the diagonal and the mean heads do.
    assert grads["factor_head.weight"] is None or not grads["factor_head.weight"].any()
    assert grads["diag_head.weight"].abs().sum() > 0 and grads["mean_head.weight"].abs().sum() > 0
    net.zero_grad()
    net.loss(image, target)
    loss, logs = net.loss(image, target)
    assert "warmup" not in logs
    loss.backward()
    assert net.factor_head.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------- MC dropout


def test_mc_dropout_masks_are_fresh_per_image_and_shared_by_its_tiles() -> None:
    # Softmax: no AU noise, so two tiles of one slice differ only if their masks do.
    net = build_network("softmax", ModelConfig(**TINY, dropout=0.3)).eval()
    image, _ = _batch(1)
    img = image.repeat(4, 1, 1, 1)
    seed = torch.tensor([5, 5, 5, 6])
    # Tiles 0 and 1 of slice 0 (different y0), slice 1, and slice 0 under another seed.
    offset = torch.tensor([[0, 0, 0], [0, 32, 0], [1, 0, 0], [0, 0, 0]])
    valid = torch.full((4, 2), 32)
    g0 = member_graph(net, 0, 1, eu="mcdropout", seed=5)
    with torch.no_grad():
        a = g0(img, seed, offset, valid)[0]
        again = g0(img, seed, offset, valid)[0]
        other_member = member_graph(net, 1, 1, eu="mcdropout", seed=5)(img, seed, offset, valid)[0]
    assert torch.equal(a, again)  # reproducible from (seed, member, slice)
    assert torch.equal(a[0], a[1])  # tiles of one slice share its masks
    assert (a[0] - a[2]).abs().max() > 1e-3  # a new slice: a new forward pass, new masks
    assert (a[0] - a[3]).abs().max() > 1e-3  # another run seed
    assert (a[0] - other_member[0]).abs().max() > 1e-3  # another member
    assert all(layer.keys is None for layer in dropout_layers(net))  # net untouched
    # The PUNet prior/posterior nets and the diffusion denoiser have dropout too.
    # PUNet: backbone 5 + prior 3 + posterior 3; diffusion: the UNet denoiser's 5
    # (it has no separate backbone); the cheap head: backbone 5 + 1 in the head.
    for au, extra, n in (
        ("punet", {}, 11),
        ("diffusion", {}, 5),
        ("diffusion", {"diffusion_denoiser": "head"}, 6),
    ):
        cfg = ModelConfig(**TINY, dropout=0.2, **extra)  # type: ignore[arg-type]
        assert len(dropout_layers(build_network(au, cfg))) == n


def test_fresh_masks_per_row_and_call_for_the_diffusion_denoiser() -> None:
    from uqserve.models.dropout import FreshMasks

    keys = FreshMasks(member=2)
    keys.seed, keys.z = torch.tensor([7, 7]), torch.tensor([0, 1])
    per_image = keys.mask(0, 16, 0.5)
    assert per_image.shape == (2, 1, 16, 1, 1)
    assert not torch.equal(per_image[0], per_image[1])  # another slice, other masks
    keys.rows, keys.call = torch.arange(3), 1
    rows = keys.mask(0, 16, 0.5)
    assert rows.shape == (2, 3, 16, 1, 1)
    assert not torch.equal(rows[0, 0], rows[0, 1])  # every sample its own masks
    keys.call = 2
    assert not torch.equal(keys.mask(0, 16, 0.5), rows)  # and every step
    assert set(rows.unique().tolist()) <= {0.0, 2.0}  # kept channels scaled by 1/(1-p)


def test_mc_dropout_masks_are_frozen_per_member() -> None:
    net = build_network("softmax", ModelConfig(**TINY, dropout=0.3, mc_dropout_masks="frozen"))
    net = net.eval()
    layers = dropout_layers(net)
    assert len(layers) == 5  # encoder, bottleneck and decoder blocks
    image, _ = _batch(2)
    args = (
        image,
        torch.zeros(2, dtype=torch.int64),
        torch.zeros(2, 3, dtype=torch.int64),
        torch.full((2, 2), 32),
    )
    g0, g1 = (
        member_graph(net, 0, 1, eu="mcdropout", seed=5),
        member_graph(net, 1, 1, eu="mcdropout", seed=5),
    )
    with torch.no_grad():
        a, a2, b = g0(*args)[0], g0(*args)[0], g1(*args)[0]
    assert torch.equal(a, a2)  # each member is deterministic
    assert (a - b).abs().max() > 1e-3  # members differ
    m0 = [layer.mask for layer in dropout_layers(g0.net)]
    m0_again = [
        layer.mask for layer in dropout_layers(member_graph(net, 0, 1, eu="mcdropout", seed=5).net)
    ]
    assert all(torch.equal(x, y) for x, y in zip(m0, m0_again, strict=True))
    keep = torch.cat([(m > 0).float() for m in m0]).mean()
    assert 0.5 < float(keep) < 0.9  # about 1 - p
    assert all(layer.mask is None for layer in layers)  # the trained network is untouched
    with pytest.raises(ValueError, match="dropout > 0"):
        member_graph(build_network("softmax", ModelConfig(**TINY)), 0, 1, eu="mcdropout")
    with pytest.raises(ValueError, match="dropout > 0"):
        member_graph(
            build_network("softmax", ModelConfig(**TINY, mc_dropout_masks="frozen")),
            0,
            1,
            eu="mcdropout",
        )
    with pytest.raises(ValueError, match="mc_dropout_masks"):
        ModelConfig(mc_dropout_masks="sometimes")
    assert freeze_dropout_masks(build_network("softmax", ModelConfig(**TINY)), 0, 0) == 0


@pytest.mark.parametrize("au", ["ssn", "punet", "diffusion"])
@pytest.mark.parametrize("eu", ["ensemble", "mcdropout"])
def test_samples_drawn_in_chunks_equal_samples_drawn_at_once(au: str, eu: str) -> None:
    """The member graph's chunked sample loop changes memory, not results (also with
    MC-dropout masks, which the diffusion denoiser draws per sample and step)."""
    torch.manual_seed(3)
    drop = 0.2 if eu == "mcdropout" else 0.0
    cfg = ModelConfig(**TINY, num_samples=7, diffusion_steps=2, dropout=drop)
    net = build_network(au, cfg).eval()
    feeds = (
        torch.randn(2, 1, 32, 32),
        torch.tensor([5, 9]),
        torch.tensor([[0, 0, 0], [4, 32, 0]]),
        torch.tensor([[32, 32], [20, 28]]),
    )
    with torch.no_grad():
        whole = member_graph(net, 1, 7, eu=eu, sample_chunk=7)(*feeds)
        chunked = member_graph(net, 1, 7, eu=eu, sample_chunk=3)(*feeds)  # chunks of 3, 3, 1
    torch.testing.assert_close(chunked[0], whole[0], rtol=0, atol=1e-6)  # mean
    torch.testing.assert_close(chunked[1], whole[1], rtol=0, atol=1e-6)  # sample entropy
    assert torch.equal(chunked[2], whole[2]) and torch.equal(chunked[3], whole[3])
    # The samples differ (H[mean] > mean H), so the chunks' noise is really tested.
    h_mean = -(whole[0] * torch.log(whole[0].clamp_min(1e-30))).sum(1)
    assert float((h_mean - whole[1]).max()) > 1e-5  # float rounding is ~1e-7
    with pytest.raises(ValueError, match="sample_chunk"):
        member_graph(net, 0, 7, sample_chunk=0)


# ---------------------------------------------------------------- diffusion (as the paper)


def test_diffusion_schedule_is_cos2_input_scaled_and_logsnr_clamped() -> None:
    from uqserve.models.heads import diffusion_gamma, stratified_times

    g = diffusion_gamma(torch.tensor([0.0, 0.5, 1.0]), 0.1, 10.0)
    # The ends: logSNR = +10 and -10 exactly.
    assert torch.log(g[0] / (1 - g[0])).item() == pytest.approx(10.0, abs=1e-9)
    assert torch.log(g[2] / (1 - g[2])).item() == pytest.approx(-10.0, abs=1e-9)
    # t = 1/2: cos² = 1/2; scaled by 0.1² in SNR terms: 0.005 / 0.505, then the linear map
    # onto [sigmoid(-10), sigmoid(10)].
    lo, hi = 1 / (1 + math.exp(10)), 1 / (1 + math.exp(-10))
    assert g[1].item() == pytest.approx(0.005 / 0.505 * (hi - lo) + lo, rel=1e-9)
    torch.manual_seed(0)
    t = stratified_times(8).sort().values
    assert ((t >= torch.arange(8) / 8) & (t < (torch.arange(8) + 1) / 8)).all()


def test_diffusion_time_embedding_is_the_papers() -> None:
    from uqserve.models.heads import time_embedding

    # The paper: t in [0, 1] as is, max period 10, cos then sin; dim 4: frequencies 1, 10^-1/2.
    emb = time_embedding(torch.tensor([0.0, 0.5, 1.0]), 4)
    f = torch.tensor([1.0, 10**-0.5])
    t = torch.tensor([[0.0], [0.5], [1.0]])
    torch.testing.assert_close(emb, torch.cat([torch.cos(t * f), torch.sin(t * f)], dim=1))


def test_diffusion_denoiser_is_the_whole_unet_with_mse_on_softmax() -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(**TINY, num_samples=2, diffusion_steps=1)
    net = build_network("diffusion", cfg)
    assert not hasattr(net, "backbone")  # the denoiser is the network
    image, target = _batch(2)
    loss, logs = net.loss(image, target)
    assert (
        0.0 < float(loss.detach()) < 1.0 and "mse" in logs
    )  # MSE between probabilities and one-hot
    loss.backward()
    assert all(p.grad is not None for p in net.denoiser.parameters())
    # One DDIM step: the sample is softmax(denoiser([x_T, image], t = 1)) of the start noise.
    net.eval()
    seed, offset = torch.tensor([3, 3]), torch.zeros(2, 3, dtype=torch.int64)
    noise = HashNoise(seed, offset, 0, 2, 32, 32)
    with torch.no_grad():
        probs = net.sample_probs_from((image,), noise, 2)
        x_t = noise.pixel_normal(4, 2).reshape(-1, 2, 32, 32)
        rows = image.unsqueeze(1).expand(2, 2, 1, 32, 32).reshape(-1, 1, 32, 32)
        direct = torch.softmax(net.denoise(rows, x_t, torch.tensor([1.0])), dim=1)
    torch.testing.assert_close(probs.reshape(-1, 2, 32, 32), direct, rtol=1e-5, atol=1e-6)
