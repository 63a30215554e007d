"""uqserve.uncertainty: decomposition properties, streaming = batch, known answers, parity."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import scipy.stats
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from uqserve import bundle
from uqserve.uncertainty import (
    AGGREGATORS,
    Accumulator,
    Decomposition,
    OODResult,
    ambiguity_delta,
    calibrate_ood_threshold,
    calibration_delta,
    decompose,
    entanglement_delta,
    entropy,
    image_score,
    ood_decision,
    ood_delta,
    rank_correlation,
    scan_entanglement,
    volume_distribution,
)

PROPS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FIELDS = ("mean", "tu", "au", "eu", "au_sample", "au_latent")


# --------------------------------------------------------------------------- data


def make_probs(
    seed: int, m: int, s: int, k: int, spatial: tuple[int, ...], hard: float, dtype: type
) -> np.ndarray:
    """[M, S, K, *sp] probabilities; a share ``hard`` of vectors made one-hot (exact zeros)."""
    rng = np.random.default_rng(seed)
    alpha = rng.choice([0.1, 1.0, 10.0])
    p = rng.dirichlet(np.full(k, alpha), size=(m, s, *spatial))  # [M, S, *sp, K]
    onehot = np.eye(k)[p.argmax(axis=-1)]
    p = np.where(rng.random((m, s, *spatial, 1)) < hard, onehot, p)
    return np.moveaxis(p, -1, 2).astype(dtype)


@st.composite
def prob_arrays(draw: st.DrawFn) -> np.ndarray:
    ndim = draw(st.integers(1, 3))
    spatial = tuple(draw(st.lists(st.integers(1, 5), min_size=ndim, max_size=ndim)))
    return make_probs(
        seed=draw(st.integers(0, 2**32 - 1)),
        m=draw(st.integers(1, 4)),
        s=draw(st.integers(1, 3)),
        k=draw(st.integers(2, 4)),
        spatial=spatial,
        hard=draw(st.sampled_from([0.0, 0.3, 1.0])),
        dtype=draw(st.sampled_from([np.float32, np.float64])),
    )


def close(a: object, b: object, field: str, atol: float = 2e-6) -> None:
    np.testing.assert_allclose(
        getattr(a, field), getattr(b, field), atol=atol, rtol=1e-5, err_msg=field
    )


def fg(d: Decomposition) -> np.ndarray:
    assert d.member_foreground is not None
    return d.member_foreground


def sample_entropy(member: np.ndarray) -> np.ndarray:
    """(1/S) Σ_s H[p_s] for [S, K, *sp], via scipy (an independent implementation)."""
    return np.mean(
        [scipy.stats.entropy(member[s].astype(np.float64), axis=0) for s in range(len(member))],
        axis=0,
    )


def random_slabs(rng: np.random.Generator, shape: tuple[int, ...]) -> list[tuple[slice, ...]]:
    """Cut the domain into a random grid of slabs (random cuts along every axis)."""
    per_axis = []
    for n in shape:
        cuts = sorted(set(rng.integers(1, n, size=rng.integers(0, 3)).tolist())) if n > 1 else []
        edges = [0, *cuts, n]
        per_axis.append([slice(a, b) for a, b in itertools.pairwise(edges)])
    grid = np.array(np.meshgrid(*[np.arange(len(a)) for a in per_axis], indexing="ij"))
    cells = grid.reshape(len(shape), -1).T
    slabs = [tuple(per_axis[ax][i] for ax, i in enumerate(cell)) for cell in cells]
    return [slabs[i] for i in rng.permutation(len(slabs))]


# --------------------------------------------------------------------------- properties


@PROPS
@given(prob_arrays())
def test_decomposition_identities_and_bounds(probs: np.ndarray) -> None:
    d = decompose(probs)
    k = probs.shape[2]
    tol = 2e-6 if probs.dtype == np.float64 else 2e-5
    np.testing.assert_allclose(d.tu, d.au + d.eu, atol=tol)
    np.testing.assert_allclose(d.au, d.au_sample + d.au_latent, atol=tol)
    for name in ("au", "eu", "au_sample", "au_latent"):
        assert (getattr(d, name) >= 0).all(), name
    assert (d.au <= d.tu + tol).all() and (d.eu <= d.tu + tol).all()
    assert (d.tu <= math.log(k) + tol).all()
    for name in FIELDS:
        assert getattr(d, name).dtype == np.float32
    np.testing.assert_allclose(d.mean.sum(axis=0), 1, atol=1e-5)
    if probs.shape[0] == 1:
        assert (d.eu <= tol).all()  # one member: no epistemic uncertainty
    if probs.shape[1] == 1:
        assert (d.au_latent <= tol).all()  # one sample: no latent ambiguity


@PROPS
@given(prob_arrays(), st.integers(0, 2**32 - 1))
def test_permutation_invariance(probs: np.ndarray, seed: int) -> None:
    rng = np.random.default_rng(seed)
    ref = decompose(probs)
    perm = probs[rng.permutation(probs.shape[0])][:, rng.permutation(probs.shape[1])]
    out = decompose(perm)
    for f in FIELDS:
        close(out, ref, f)
    assert np.array_equal(fg(out), fg(ref))


@PROPS
@given(prob_arrays(), st.integers(0, 2**32 - 1), st.booleans())
def test_streaming_equals_batch(probs: np.ndarray, seed: int, with_entropy: bool) -> None:
    """Any member order, any (per-member different) split into slabs -> decompose."""
    rng = np.random.default_rng(seed)
    m, s, k = probs.shape[:3]
    spatial = probs.shape[3:]
    acc = Accumulator(k, spatial)
    for mi in rng.permutation(m):
        pm = probs[mi].mean(axis=0, dtype=np.float64).astype(np.float32)
        hs = sample_entropy(probs[mi]).astype(np.float32) if (with_entropy or s > 1) else None
        for slab in random_slabs(rng, spatial):
            acc.add(
                pm[(slice(None), *slab)],
                None if hs is None else hs[slab],
                where=slab,
            )
    got, ref = acc.result(), decompose(probs)
    assert got.num_members == m
    for f in FIELDS:
        close(got, ref, f, atol=1e-5)
    assert np.array_equal(fg(got), fg(ref))


@PROPS
@given(prob_arrays())
def test_entropy_matches_scipy(probs: np.ndarray) -> None:
    p = probs[0, 0]
    np.testing.assert_allclose(
        entropy(p, axis=0), scipy.stats.entropy(p.astype(np.float64), axis=0), atol=1e-6
    )
    moved = np.moveaxis(p, 0, -1)
    np.testing.assert_allclose(entropy(moved, axis=-1), entropy(p, axis=0), atol=1e-7)


# --------------------------------------------------------------------------- known answers


def test_disagreeing_one_hot_members_have_eu_ln2() -> None:
    probs = np.array([[[1.0, 0.0]], [[0.0, 1.0]]])[:, :, :, None]  # [M=2, S=1, K=2, 1]
    d = decompose(probs)
    assert d.eu[0] == pytest.approx(math.log(2), abs=1e-7)
    assert d.tu[0] == pytest.approx(math.log(2), abs=1e-7)
    assert d.au[0] == 0.0  # exactly: 0 ln 0 = 0, no epsilon
    assert bool(fg(d)[0])


def test_identical_members_have_no_eu() -> None:
    one = make_probs(3, 1, 4, 3, (6, 5), 0.0, np.float64)
    d = decompose(np.repeat(one, 3, axis=0))
    assert np.abs(d.eu).max() <= 1e-7
    np.testing.assert_allclose(d.tu, d.au, atol=1e-7)


def test_one_member_with_samples_puts_ambiguity_in_au_latent() -> None:
    # one member, two one-hot samples that disagree: AU = ln 2, all of it latent
    probs = np.array([[[1.0, 0.0], [0.0, 1.0]]])[..., None]  # [1, 2, 2, 1]
    d = decompose(probs)
    assert d.au[0] == pytest.approx(math.log(2), abs=1e-7)
    assert d.au_latent[0] == pytest.approx(math.log(2), abs=1e-7)
    assert d.au_sample[0] == 0.0 and d.eu[0] == 0.0


def test_accumulator_without_sample_entropy_is_s1() -> None:
    probs = make_probs(5, 3, 4, 2, (7, 3), 0.2, np.float32)
    acc = Accumulator(2, (7, 3))
    for m in range(3):
        acc.add(probs[m].mean(axis=0))
    r = acc.result()
    np.testing.assert_allclose(r.au_sample, r.au, atol=1e-7)
    assert np.abs(r.au_latent).max() <= 1e-7


def test_result_release_hands_over_buffers() -> None:
    probs = make_probs(6, 3, 1, 3, (5, 4, 2), 0.2, np.float32)
    acc = Accumulator(3, (5, 4, 2))
    for m in range(3):
        acc.add(probs[m, 0])
    copied = acc.result()
    acc.add(probs[0, 0, :, :2], where=(slice(0, 2),))  # still usable after result()
    with pytest.raises(ValueError, match="between 3 and 4 members"):
        acc.result()
    acc = Accumulator(3, (5, 4, 2))
    for m in range(3):
        acc.add(probs[m, 0])
    released = acc.result(release=True)
    for f in FIELDS:
        np.testing.assert_array_equal(getattr(released, f), getattr(copied, f), err_msg=f)
    with pytest.raises(ValueError, match="new Accumulator"):
        acc.add(probs[0, 0])
    with pytest.raises(ValueError, match="new Accumulator"):
        acc.result()


def test_delta_known_values() -> None:
    assert entanglement_delta(1.0, 0.0, True) == pytest.approx(1.0)
    assert entanglement_delta(0.7, 0.7, True) == pytest.approx(0.0)
    assert entanglement_delta(0.0, 1.0, True) == pytest.approx(-1.0)
    # atan2(1, sqrt 3) = π/6 -> (π/6 - π/4) / (π/4) = -1/3
    assert entanglement_delta(1.0, math.sqrt(3), True) == pytest.approx(-1 / 3)
    assert entanglement_delta(1.0, math.sqrt(3), False) == pytest.approx(1 / 3)
    assert ood_delta(0.9, 0.9) == pytest.approx(0.0)
    assert ambiguity_delta(0.5, 0.0) == pytest.approx(1.0)
    # lower ACE is better: TU perfect (0) against min(0.3, 0.1) = 0.1 -> Δ = 1
    assert calibration_delta(0.0, 0.3, 0.1) == pytest.approx(1.0)
    assert calibration_delta(0.1, 0.1, 0.5) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="finite"):
        ood_delta(float("nan"), 0.5)


# --------------------------------------------------------------------------- image scores


def test_aggregator_names_match_the_manifest() -> None:
    assert AGGREGATORS == bundle.AGGREGATORS


def test_border_aggregator() -> None:
    seg = np.zeros((4, 5), np.uint8)
    seg[1:3, 1:3] = 1  # a 2x2 square: 4 vertical + 4 horizontal label changes
    u = np.arange(20, dtype=np.float32).reshape(4, 5)
    assert image_score(u, "border", seg=seg) == pytest.approx(u.sum() / 8)
    assert image_score(u, "border", seg=np.zeros_like(seg)) == pytest.approx(u.sum())
    seg3 = np.zeros((3, 3, 2), np.uint8)
    seg3[1, 1, 1] = 1  # 2 changes along each of the three axes except z: 1
    assert image_score(np.ones((3, 3, 2)), "border", seg=seg3) == pytest.approx(18 / 5)


@PROPS
@given(
    st.integers(0, 2**32 - 1),
    st.integers(1, 14),
    st.integers(1, 14),
    st.integers(1, 3),
    st.integers(1, 12),
)
def test_patch_aggregator_matches_brute_force(seed: int, h: int, w: int, z: int, p: int) -> None:
    u = np.random.default_rng(seed).random((h, w, z)).astype(np.float32)
    ph, pw = min(p, h), min(p, w)
    brute = max(
        float(u[i : i + ph, j : j + pw, c].sum(dtype=np.float64))
        for i in range(h - ph + 1)
        for j in range(w - pw + 1)
        for c in range(z)
    )
    assert image_score(u, "patch", patch_size=p) == pytest.approx(brute, rel=1e-9)
    if z == 1:
        assert image_score(u[:, :, 0], "patch", patch_size=p) == pytest.approx(brute, rel=1e-9)


def test_threshold_mean_and_foreground_aggregators() -> None:
    u = np.array([[0.1, 0.5, 0.9], [0.2, 0.6, 0.0]])
    assert image_score(u, "mean") == pytest.approx(u.mean())
    assert image_score(u, "threshold", threshold=0.5) == pytest.approx((0.5 + 0.9 + 0.6) / 3)
    assert image_score(u, "threshold", threshold=2.0) == 0.0
    big = np.random.default_rng(0).random((12, 12))
    fg = np.zeros((12, 12), bool)
    fg[0, 0] = True  # dilated by 2 voxels: the 3x3 corner block
    assert image_score(big, "foreground", member_foreground=fg) == pytest.approx(big[:3, :3].mean())
    fg[6, 6] = True
    expected = np.zeros((12, 12), bool)
    expected[:3, :3] = expected[4:9, 4:9] = True
    assert image_score(big, "foreground", member_foreground=fg) == pytest.approx(
        big[expected].mean()
    )
    empty = np.zeros((12, 12), bool)
    assert image_score(big, "foreground", member_foreground=empty) == pytest.approx(big.mean())


def test_image_scorer_shares_label_parts_and_equals_image_score() -> None:
    """One ImageScorer for several maps gives exactly image_score's values; the label
    changes it counts once equal a brute-force count over neighbour pairs."""
    from uqserve.uncertainty import AGGREGATORS, ImageScorer

    rng = np.random.default_rng(3)
    seg = (rng.random((9, 7, 5)) > 0.6).astype(np.uint8)
    fg = rng.random((9, 7, 5)) > 0.9
    scorer = ImageScorer(seg=seg, member_foreground=fg)
    for _ in range(3):
        u = rng.random((9, 7, 5)).astype(np.float32)
        for agg in AGGREGATORS:
            thr = 0.5 if agg == "threshold" else None
            want = image_score(u, agg, seg=seg, member_foreground=fg, threshold=thr)
            assert scorer.score(u, agg, threshold=thr) == want, agg
    brute = sum(
        int(seg[i, j, k] != seg[i + di, j + dj, k + dk])
        for di, dj, dk in ((1, 0, 0), (0, 1, 0), (0, 0, 1))
        for i in range(9 - di)
        for j in range(7 - dj)
        for k in range(5 - dk)
    )
    u = np.ones((9, 7, 5), np.float32)
    assert scorer.score(u, "border") == pytest.approx(u.sum() / brute, rel=1e-12)
    with pytest.raises(ValueError, match="shape"):
        scorer.score(np.ones((9, 7)), "border")


def test_image_score_bad_input() -> None:
    u = np.zeros((4, 4))
    with pytest.raises(ValueError, match="unknown aggregator"):
        image_score(u, "median")
    with pytest.raises(ValueError, match="needs seg"):
        image_score(u, "border")
    with pytest.raises(ValueError, match="shape"):
        image_score(u, "border", seg=np.zeros((4, 5)))
    with pytest.raises(ValueError, match="threshold"):
        image_score(u, "threshold")
    with pytest.raises(ValueError, match="member_foreground"):
        image_score(u, "foreground")
    with pytest.raises(ValueError, match="NaN"):
        image_score(np.full((2, 2), np.nan), "mean")


# --------------------------------------------------------------------------- OOD, correlation


def test_ood_threshold_and_decision() -> None:
    val = np.random.default_rng(1).gamma(2.0, size=200)
    tau = calibrate_ood_threshold(val)
    assert tau == pytest.approx(np.quantile(val, 0.95))
    assert np.mean(val > tau) == pytest.approx(0.05, abs=0.006)
    for score in (0.0, float(np.median(val)), tau, tau * 2, float(val[17])):
        r = ood_decision(score, tau, val)
        assert r.flag == (score > tau)
        assert r.percentile == pytest.approx(scipy.stats.percentileofscore(val, score, kind="weak"))
    r = ood_decision(1.0, None)
    assert r == OODResult(1.0, None, None, None)
    assert r.to_dict() == {"score": 1.0, "threshold": None, "flag": None, "percentile": None}
    with pytest.raises(ValueError, match="quantile"):
        calibrate_ood_threshold(val, quantile=1.5)
    with pytest.raises(ValueError, match="at least 1"):
        calibrate_ood_threshold([])


@pytest.mark.filterwarnings("ignore::scipy.stats.ConstantInputWarning")
@PROPS
@given(st.integers(0, 2**32 - 1), st.integers(3, 60), st.booleans())
def test_rank_correlation_matches_scipy(seed: int, n: int, ties: bool) -> None:
    rng = np.random.default_rng(seed)
    a, b = rng.normal(size=n), rng.normal(size=n)
    if ties:
        a, b = a.round(0), b.round(0)
    got = rank_correlation(a, b)
    ref = scipy.stats.spearmanr(a, b).statistic
    if np.isnan(ref):
        assert got is None
    else:
        assert got == pytest.approx(ref, abs=1e-12)


def test_scan_entanglement() -> None:
    rng = np.random.default_rng(2)
    probs = make_probs(2, 4, 1, 3, (20, 20), 0.0, np.float32)
    d = decompose(probs)
    mask = d.tu > 0.05 * math.log(3)
    ref = scipy.stats.spearmanr(d.au[mask], d.eu[mask]).statistic
    assert scan_entanglement(d.tu, d.au, d.eu, 3) == pytest.approx(ref, abs=1e-9)
    assert scan_entanglement(d.tu, d.au, d.eu, 3, min_voxels=401) is None
    tu = rng.random((5, 5)) + 1
    assert scan_entanglement(tu, tu, tu * 0, 2) is None  # EU constant: undefined


def test_volume_distribution() -> None:
    counts = np.array([[[90, 10, 0]], [[80, 20, 4]]])  # [M=2, S=1, K=3]
    out = volume_distribution(counts, 0.5, ("background", "lesion", "edema"))
    assert set(out) == {"lesion", "edema"}
    assert out["lesion"]["mean_ml"] == pytest.approx(7.5)
    assert out["lesion"]["std_ml"] == pytest.approx(np.std([5.0, 10.0], ddof=1))
    assert out["lesion"]["ci95_ml"] == pytest.approx([5.125, 9.875])
    assert out["edema"]["n_samples"] == 2
    with pytest.raises(ValueError, match="K = 2"):
        volume_distribution(counts, 0.5, ("background", "lesion"))


# --------------------------------------------------------------------------- invalid input


@pytest.mark.parametrize(
    ("probs", "match"),
    [
        (
            np.full((2, 1, 2, 3), 0.5).astype(np.float32) * np.array([1, -1])[:, None],
            "negative|sum",
        ),
        (np.where(np.arange(6).reshape(1, 1, 2, 3) == 1, np.nan, 0.5), "NaN"),
        (np.full((2, 1, 2, 3), 0.6), "sum to 1"),
        (np.full((2, 2, 3), 0.5), "4 dimensions"),
        (np.ones((2, 1, 1, 3)), "K >= 2"),
        (np.array([[[[-0.5], [1.5]]]]), "negative"),
    ],
)
def test_decompose_rejects_bad_input(probs: np.ndarray, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        decompose(probs)


def test_accumulator_rejects_bad_input() -> None:
    acc = Accumulator(2, (4, 4))
    ok = np.full((2, 4, 4), 0.5, np.float32)
    with pytest.raises(ValueError, match="shape"):
        acc.add(ok[:, :2])
    with pytest.raises(ValueError, match="shape"):
        acc.add(ok, where=(slice(0, 2),))
    with pytest.raises(ValueError, match="sum to 1"):
        acc.add(ok * 3)
    with pytest.raises(ValueError, match="logits"):
        acc.add(ok - 1)
    with pytest.raises(ValueError, match="tuple of slices"):
        acc.add(ok, where=[slice(0, 4)])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="member_sample_entropy"):
        acc.add(ok, np.full((4, 4), 2.0))  # above H[mean] = ln 2
    with pytest.raises(ValueError, match="no member outputs"):
        acc.result()
    with pytest.raises(ValueError, match="num_classes"):
        Accumulator(1, (4, 4))
    acc.add(ok)
    acc.add(ok[:, :2], where=(slice(0, 2),))  # second member misses rows 2..3
    with pytest.raises(ValueError, match="between 1 and 2 members"):
        acc.result()
    acc.add(ok[:, 2:], where=(slice(2, 4),))
    assert acc.result().num_members == 2


def test_entropy_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="NaN"):
        entropy(np.array([np.inf, 0.0]))
    with pytest.raises(ValueError, match="float"):
        entropy(np.array(["a", "b"]))


@PROPS
@given(st.integers(0, 2**32 - 1), st.integers(1, 300), st.integers(0, 3))
def test_float32_ranks_equal_scipy_exactly(seed: int, n: int, decimals: int) -> None:
    """The packed-key sort ranks float32 maps exactly as scipy: ties, negatives, ±0."""
    from uqserve.uncertainty.entanglement import _rank

    rng = np.random.default_rng(seed)
    x = rng.normal(scale=3, size=n).round(decimals).astype(np.float32)
    x[rng.random(n) < 0.1] = -0.0  # equal to 0.0, different bits
    x[rng.random(n) < 0.1] = 0.0
    x[rng.random(n) < 0.05] = np.float32(np.finfo(np.float32).max)
    np.testing.assert_array_equal(_rank(x), scipy.stats.rankdata(x))


def test_scan_entanglement_large_equals_rankdata_reference() -> None:
    """Above the parallel threshold (two threads, packed sort) the value is unchanged."""
    from uqserve.uncertainty.entanglement import _PARALLEL_RANKS

    rng = np.random.default_rng(7)
    n = 2 * _PARALLEL_RANKS
    tu = rng.random(n).astype(np.float32)
    au = (tu * rng.random(n)).astype(np.float32).round(4)  # many ties
    eu = np.maximum(tu - au, 0).astype(np.float32)
    mask = tu > 0.05 * math.log(2)
    ra = scipy.stats.rankdata(au[mask])
    rb = scipy.stats.rankdata(eu[mask])
    ra -= ra.mean()
    rb -= rb.mean()
    ref = float(np.clip((ra @ rb) / math.sqrt(float(ra @ ra) * float(rb @ rb)), -1, 1))
    assert scan_entanglement(tu, au, eu, 2) == ref


@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_segmentation_equals_argmax(k: int) -> None:
    from uqserve.uncertainty import segmentation

    rng = np.random.default_rng(k)
    p = rng.dirichlet(np.ones(k), size=(7, 9, 4)).astype(np.float32)
    p = np.moveaxis(p, -1, 0).round(1)  # rounding makes ties: the lower class wins
    got = segmentation(p)
    assert got.dtype == np.uint8 and got.shape == (7, 9, 4)
    np.testing.assert_array_equal(got, np.argmax(p, axis=0))
    with pytest.raises(ValueError, match="expected"):
        segmentation(np.zeros((300, 2)))


@pytest.mark.parametrize("samples", [1, 3])
def test_add_sums_equals_adding_members_one_by_one(samples: int) -> None:
    """What a server-side reduction sends (sums in member order) gives the same maps."""
    probs = make_probs(4, 3, samples, 3, (6, 7, 5), 0.3, np.float32)  # [M, S, K, *sp]
    means = probs.mean(axis=1, dtype=np.float32)  # [M, K, *sp]
    sample_h = np.stack([entropy(p, axis=1).mean(axis=0) for p in probs]).astype(np.float32)
    one = Accumulator(3, (6, 7, 5))
    summed = Accumulator(3, (6, 7, 5))
    for half in (slice(0, 3), slice(3, 7)):  # two slabs along the second axis
        mean_sum = np.zeros((3, 6, 4 if half.start == 3 else 3, 5), np.float32)
        h_sum = np.zeros(mean_sum.shape[1:], np.float32)
        hs_sum = np.zeros_like(h_sum)
        fg = np.zeros(h_sum.shape, bool)
        for m in range(3):
            pm = means[m][:, :, half]
            one.add(pm, None if samples == 1 else sample_h[m][:, half], where=(slice(None), half))
            mean_sum += pm
            h_sum += entropy(pm)
            hs_sum += sample_h[m][:, half]
            fg |= np.argmax(pm, axis=0) != 0
        summed.add_sums(mean_sum, h_sum, None if samples == 1 else hs_sum, fg, 3,
                        where=(slice(None), half))  # fmt: skip
    a, b = one.result(), summed.result()
    assert a.num_members == b.num_members == 3
    for name in ("mean", "tu", "au", "eu", "au_sample", "au_latent", "member_foreground"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    if samples == 1:
        assert not b.au_latent.any()


def test_add_sums_rejects_what_no_members_give() -> None:
    acc = Accumulator(2, (4,))
    p = np.full((2, 4), 1.0, np.float32)  # two members' sum: each column sums to 2
    ok = (p, np.zeros(4, np.float32), None, np.zeros(4, bool))
    with pytest.raises(ValueError, match="do not sum to 1"):
        acc.add_sums(*ok, members=1)
    with pytest.raises(ValueError, match="members must be >= 1"):
        acc.add_sums(*ok, members=0)
    with pytest.raises(ValueError, match=r"entropy_sum must lie in \[0, members x ln K"):
        acc.add_sums(p, np.full(4, 1.5, np.float32), None, ok[3], members=2)
    with pytest.raises(ValueError, match="sample_entropy_sum must lie in"):
        acc.add_sums(p, np.full(4, 0.5, np.float32), np.ones(4, np.float32), ok[3], members=2)
    with pytest.raises(ValueError, match="foreground has shape"):
        acc.add_sums(p, ok[1], None, np.zeros(3, bool), members=2)
    acc.add_sums(*ok, members=2)
    acc.add(np.full((2, 4), 0.5, np.float32))
    r = acc.result()
    assert r.num_members == 3 and np.allclose(r.mean, 0.5)


def test_prepare_member_then_add_prepared_equals_add() -> None:
    """The split add (checks and per-member maps elsewhere, sums here) adds exactly
    what ``add`` adds, and the slab is still checked."""
    from uqserve.uncertainty import Accumulator, prepare_member

    rng = np.random.default_rng(11)
    one, two = Accumulator(3, (4, 5, 6)), Accumulator(3, (4, 5, 6))
    for _ in range(3):
        pm = rng.dirichlet(np.ones(3), size=(4, 5, 6)).astype(np.float32).transpose(3, 0, 1, 2)
        hs = (entropy(pm) * rng.random((4, 5, 6))).astype(np.float32)
        for z in range(4):
            one.add(pm[:, z : z + 1], hs[z : z + 1], where=(slice(z, z + 1),))
            member = prepare_member(3, pm[:, z : z + 1], hs[z : z + 1])
            two.add_prepared(member, where=(slice(z, z + 1),))
    a, b = one.result(), two.result()
    for field in ("mean", "tu", "au", "eu", "au_sample", "au_latent", "member_foreground"):
        assert np.array_equal(getattr(a, field), getattr(b, field)), field
    with pytest.raises(ValueError, match="expected"):
        two.add_prepared(member, where=(slice(0, 2),))


def test_scan_entanglement_does_not_depend_on_the_blas_thread_count() -> None:
    """The last digit of a report must not change with the machine's cores (a BLAS dot
    product splits its sum over threads; make test runs one thread per worker)."""
    from threadpoolctl import threadpool_limits

    rng = np.random.default_rng(11)
    n = 1_000_003
    tu = rng.random(n).astype(np.float32)
    au = (tu * rng.random(n)).astype(np.float32)
    eu = np.maximum(tu - au, 0).astype(np.float32)
    values = []
    for threads in (1, 2, 4):
        with threadpool_limits(limits=threads, user_api="blas"):
            values.append(scan_entanglement(tu, au, eu, 2))
    assert values[0] == values[1] == values[2]
