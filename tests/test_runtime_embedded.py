"""EmbeddedRuntime on real onnxruntime sessions of tiny bundles; open_runtime wiring."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from tests._bundles import make_tiny_bundle
from uqserve.bundle import BundleError, load_bundle, sha256_file
from uqserve.errors import UsageError
from uqserve.runtime import Batch, MemberOutputs, RuntimeServiceError, open_runtime
from uqserve.runtime.embedded import (
    EmbeddedRuntime,
    cpu_count,
    cuda_available,
    cuda_provider_options,
    session_providers,
)


def _batch(b: int = 3, h: int = 32, w: int = 40, seed: int = 5) -> Batch:
    rng = np.random.default_rng(0)
    return Batch(
        image=rng.normal(size=(b, 1, h, w)).astype(np.float32),
        seed=np.full(b, seed, np.int64),
        offset=np.array([[z, 0, 0] for z in range(b)], np.int64),
        valid=np.array([[h - 2, w - 3]] * b, np.int64),
    )


def test_parallel_members_equal_sequential_bit_for_bit(tiny_bundle: Path) -> None:
    bundle = load_bundle(tiny_bundle)
    batch = _batch()
    with EmbeddedRuntime(bundle, device="cpu", workers=1) as seq:
        a = seq.infer(batch, want_samples=True)
    with EmbeddedRuntime(bundle, device="cpu", workers=2, threads=1) as par:
        b = par.infer(batch, want_samples=True)
    for x, y in zip(a, b, strict=True):
        for field in ("mean", "sample_entropy", "sample_counts", "sample_labels"):
            assert np.array_equal(getattr(x, field), getattr(y, field)), field


def test_infer_shapes_and_values(tiny_bundle: Path) -> None:
    bundle = load_bundle(tiny_bundle)
    batch = _batch()
    with EmbeddedRuntime(bundle, device="cpu") as rt:
        assert rt.device == "cpu" and rt.name == "embedded"
        # members share the cores: workers x threads never oversubscribes
        assert rt.workers == min(cpu_count(), 2)
        assert rt.workers * rt.threads <= max(cpu_count(), rt.workers)
        outs = rt.infer(batch)
        assert len(outs) == 2
        for o in outs:
            assert o.mean.shape == (3, 2, 32, 40) and o.mean.dtype == np.float32
            np.testing.assert_allclose(o.mean.sum(axis=1), 1.0, atol=1e-5)
            assert o.sample_entropy.shape == (3, 32, 40)
            assert o.sample_counts.shape == (3, 3, 2)
            # counts cover the valid region only
            np.testing.assert_array_equal(o.sample_counts.sum(axis=2), 30 * 37)
            assert o.sample_labels is None
        # the members differ (weights), so an ensemble has EU > 0
        assert not np.array_equal(outs[0].mean, outs[1].mean)
        with_samples = rt.infer(batch, want_samples=True)
    for o, s in zip(outs, with_samples, strict=True):
        np.testing.assert_array_equal(o.mean, s.mean)
        assert s.sample_labels is not None and s.sample_labels.shape == (3, 3, 32, 40)
        assert s.sample_labels.dtype == np.uint8
        # The labels are the samples the counts were taken from.
        valid = s.sample_labels[:, :, :30, :37]
        counts = np.stack([(valid == k).sum(axis=(2, 3)) for k in range(2)], axis=-1)
        np.testing.assert_array_equal(counts, s.sample_counts)


def test_infer_equals_plain_session(tiny_bundle: Path) -> None:
    bundle = load_bundle(tiny_bundle)
    batch = _batch(seed=11)
    sess = ort.InferenceSession(str(bundle.member_path(1)), providers=["CPUExecutionProvider"])
    expected = sess.run(["mean", "sample_entropy"], batch.feeds())
    with EmbeddedRuntime(bundle, device="cpu", threads=1) as rt:
        got = rt.infer(batch)[1]
    np.testing.assert_array_equal(got.mean, expected[0])
    np.testing.assert_array_equal(got.sample_entropy, expected[1])


def test_infer_many_in_order(tiny_bundle: Path) -> None:
    bundle = load_bundle(tiny_bundle)
    batches = [_batch(b=1, seed=s) for s in (1, 2, 3)]
    with EmbeddedRuntime(bundle, device="cpu") as rt:
        many = list(rt.infer_many(batches))
        single = [rt.infer(b) for b in batches]
    for a, b in zip(many, single, strict=True):
        np.testing.assert_array_equal(a[0].mean, b[0].mean)
    assert not np.array_equal(many[0][0].mean, many[1][0].mean)  # seed changes SSN samples


@pytest.mark.parametrize(
    ("workers", "threads"),
    [(1, 1), (2, 1), (1, 2), (2, 2)],  # on 2 cores: overlapped, then grouped (cores taken)
)
def test_infer_many_schedules_give_the_same_outputs(
    tiny_bundle: Path, workers: int, threads: int
) -> None:
    """Whether batches overlap the caller or run in groups, the outputs and their order
    are those of one ``infer`` per batch; ``want_samples`` is honoured throughout."""
    bundle = load_bundle(tiny_bundle)
    batches = [_batch(b=1, seed=s) for s in range(7)]  # not a multiple of any group
    with EmbeddedRuntime(bundle, device="cpu", workers=1, threads=1) as ref:
        single = [ref.infer(b, want_samples=True) for b in batches]
    with EmbeddedRuntime(bundle, device="cpu", workers=workers, threads=threads) as rt:
        assert rt._overlap == (workers * threads < cpu_count())
        many = list(rt.infer_many(iter(batches), want_samples=True))
    assert len(many) == len(batches)
    for got, want in zip(many, single, strict=True):
        for g, w in zip(got, want, strict=True):
            for field in ("mean", "sample_entropy", "sample_counts", "sample_labels"):
                assert np.array_equal(getattr(g, field), getattr(w, field)), field


def test_prepare_hook_runs_in_the_workers_and_travels_with_the_outputs(
    tiny_bundle: Path,
) -> None:
    """``infer_many(prepare=...)`` calls the hook once per member and batch in the
    runtime's worker threads; its result comes back as ``outputs.prepared``."""
    import threading

    from uqserve.runtime.base import Runtime

    def hook(m: int, out: MemberOutputs) -> tuple[int, str, float]:
        return m, threading.current_thread().name, float(out.mean.sum())

    batches = [_batch(b=1, seed=s) for s in range(3)]
    with EmbeddedRuntime(load_bundle(tiny_bundle), device="cpu", workers=2, threads=1) as rt:
        many = list(rt.infer_many(batches, prepare=hook))
        plain = list(Runtime.infer_many(rt, batches, prepare=hook))  # the base: caller's thread
    for got, base in zip(many, plain, strict=True):
        for m, (g, b) in enumerate(zip(got, base, strict=True)):
            assert g.prepared[0] == m and g.prepared[2] == float(g.mean.sum())
            assert g.prepared[1].startswith("uqserve-member")
            assert b.prepared[1] == threading.current_thread().name
            np.testing.assert_array_equal(g.mean, b.mean)


def test_group_size_gives_every_worker_the_same_number_of_runs() -> None:
    from uqserve.runtime.embedded import group_size

    assert group_size(5, 1) == 1  # one worker never waits for another
    for members in range(1, 9):
        for workers in range(2, 9):
            g = group_size(members, workers)
            assert (g * members) % workers == 0  # no worker idles at the group's end
            assert g * members >= 8 * workers  # the wait for the slowest is amortised
    assert group_size(5, 2) == 4  # 20 runs, 10 per worker


def test_groups_of_large_batches_stay_under_the_memory_budget(tiny_bundle: Path) -> None:
    """Outputs of a group are held together: large batches (3D patches) make smaller
    groups, down to one batch at a time."""

    def batch(side: int) -> Batch:
        image = np.broadcast_to(np.float32(0), (1, 1, side, side))  # no memory behind it
        return Batch(image, np.zeros(1, np.int64), np.zeros((1, 3), np.int64),
                     np.array([[side, side]], np.int64))  # fmt: skip

    with EmbeddedRuntime(load_bundle(tiny_bundle), device="cpu", workers=2, threads=1) as rt:
        assert rt._group == 8  # 2 members on 2 workers
        assert rt._group_for(batch(1024), want_samples=False) == 8  # 2 x 12 MiB per batch
        assert rt._group_for(batch(2048), want_samples=False) == 2  # 2 x 48 MiB
        assert rt._group_for(batch(4096), want_samples=False) == 1  # 2 x 192 MiB
        # sample labels add S = 3 bytes per voxel and member: 2 x 74 vs 2 x 93 MiB
        assert rt.bundle.manifest.num_samples == 3
        assert rt._group_for(batch(1800), want_samples=False) == 3
        assert rt._group_for(batch(1800), want_samples=True) == 2


def test_infer_many_stops_cleanly_and_reports_member_failures(tiny_bundle: Path) -> None:
    bundle = load_bundle(tiny_bundle)
    with EmbeddedRuntime(bundle, device="cpu", workers=2, threads=1) as rt:
        results = rt.infer_many(_batch(b=1, seed=s) for s in range(20))
        next(results)
        results.close()  # the caller stops early: what was queued is dropped
        assert rt.infer(_batch(b=1))[0].mean.shape == (1, 2, 32, 40)  # still usable
        bad = Batch(
            image=np.zeros((1, 1, 32, 40), np.float32),
            seed=np.zeros(1, np.int64),
            offset=np.zeros((1, 2), np.int64),  # wrong shape: onnxruntime refuses it
            valid=np.array([[32, 40]], np.int64),
        )
        with pytest.raises(Exception, match=r"offset|dimension|shape"):
            list(rt.infer_many([_batch(b=1), bad, _batch(b=1)]))
    with pytest.raises(RuntimeServiceError, match="closed"):
        rt.infer(_batch(b=1))


def test_member_that_fails_to_load(tmp_path: Path) -> None:
    folder = make_tiny_bundle(tmp_path / "b")
    (folder / "member_1.onnx").write_bytes(b"not an onnx graph")
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["members"][1]["sha256"] = sha256_file(folder / "member_1.onnx")
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=r"member_1.onnx: member 1 cannot be loaded"):
        EmbeddedRuntime(load_bundle(folder), device="cpu")


def test_member_with_wrong_signature(tmp_path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    folder = make_tiny_bundle(tmp_path / "b", num_members=1, eu="none")
    graph = helper.make_graph(
        [helper.make_node("Identity", ["image"], ["mean"])],
        "bad",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["B", 1, "H", "W"])],
        [helper.make_tensor_value_info("mean", TensorProto.FLOAT, ["B", 1, "H", "W"])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.save(model, str(folder / "member_0.onnx"))
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["members"][0]["sha256"] = sha256_file(folder / "member_0.onnx")
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="lacks seed, offset, valid, sample_entropy"):
        EmbeddedRuntime(load_bundle(folder), device="cpu")


def test_device_options(tiny_bundle: Path) -> None:
    bundle = load_bundle(tiny_bundle)
    with pytest.raises(ValueError, match="device 'tpu' unknown"):
        EmbeddedRuntime(bundle, device="tpu")
    with pytest.raises(ValueError, match="threads"):
        EmbeddedRuntime(bundle, device="cpu", threads=0)
    auto = EmbeddedRuntime(bundle, device="auto")
    assert auto.device == ("cuda" if cuda_available() else "cpu")
    if not cuda_available():
        with pytest.raises(RuntimeServiceError, match='use `device="cpu"`'):
            EmbeddedRuntime(bundle, device="cuda")


def test_open_runtime(tiny_bundle: Path, tmp_path: Path) -> None:
    rt = open_runtime(tiny_bundle, device="cpu")
    assert isinstance(rt, EmbeddedRuntime) and rt.bundle.path == tiny_bundle
    with pytest.raises(BundleError, match="not a bundle"):
        open_runtime(tmp_path)
    t0 = time.perf_counter()
    # Port 9 (discard) on loopback: nothing listens; the error must be clear and quick.
    with pytest.raises((RuntimeServiceError, ValueError)) as info:
        open_runtime(tiny_bundle, servers=["grpc://127.0.0.1:9"])
    assert "127.0.0.1:9" in str(info.value)
    assert time.perf_counter() - t0 < 60


# --------------------------------------------------------------------------- precision


def test_cuda_options_keep_fp32_and_skip_exhaustive_search_by_default() -> None:
    opts = cuda_provider_options()
    assert opts["use_tf32"] == "0" and opts["cudnn_conv_algo_search"] == "HEURISTIC"
    assert cuda_provider_options("tf32")["use_tf32"] == "1"
    assert cuda_provider_options("fp16")["use_tf32"] == "0"
    # what every member session is created with on a GPU: the options ride along
    assert session_providers(True) == [("CUDAExecutionProvider", opts), "CPUExecutionProvider"]
    assert session_providers(True, "tf32", "EXHAUSTIVE")[0] == (
        "CUDAExecutionProvider",
        {"device_id": "0", "use_tf32": "1", "cudnn_conv_algo_search": "EXHAUSTIVE"},
    )
    assert session_providers(False) == ["CPUExecutionProvider"]
    with pytest.raises(UsageError, match="precision 'fp64' unknown"):
        cuda_provider_options("fp64")
    with pytest.raises(UsageError, match="conv_algo_search 'FAST' unknown"):
        session_providers(True, "fp32", "FAST")


@pytest.mark.parametrize("precision", ["tf32", "fp16"])
def test_reduced_precision_is_refused_on_cpu(tiny_bundle: Path, precision: str) -> None:
    with pytest.raises(UsageError, match=f"precision '{precision}' needs a GPU"):
        EmbeddedRuntime(load_bundle(tiny_bundle), device="cpu", precision=precision)
    with pytest.raises(UsageError, match="applies to the embedded runtime"):
        open_runtime(tiny_bundle, servers=["grpc://127.0.0.1:1"], precision=precision)
    with EmbeddedRuntime(load_bundle(tiny_bundle), device="cpu") as rt:
        assert rt.precision == "fp32"


@pytest.mark.parametrize("name", ["softmax-ensemble", "ssn-ensemble"])
def test_fp16_member_keeps_float32_io_and_stays_close(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import onnx

    from uqserve.runtime._fp16 import fp16_member

    monkeypatch.setenv("UQSERVE_CACHE_DIR", str(tmp_path))
    bundle = load_bundle(name)
    path = bundle.member_path(0)
    data = fp16_member(path, bundle.manifest.members[0].sha256)
    cached = list((tmp_path / "fp16").glob("*.onnx"))
    assert len(cached) == 1 and cached[0].read_bytes() == data
    model = onnx.load_from_string(data)
    half = {
        v.name for v in onnx.shape_inference.infer_shapes(model).graph.value_info
        if v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    }  # fmt: skip
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    assert convs and all(n.output[0] in half for n in convs)
    # norms, softmax and the entropies stay float32
    for node in model.graph.node:
        if node.op_type in ("InstanceNormalization", "Softmax", "Log"):
            assert node.output[0] not in half, node.name
    batch = _batch(b=2, h=64, w=64)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    names = ["mean", "sample_entropy", "sample_counts"]
    got = ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"]).run(
        names, batch.feeds()
    )
    ref = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"]).run(
        names, batch.feeds()
    )
    for g, r in zip(got, ref, strict=True):
        assert g.dtype == r.dtype == np.float32 and g.shape == r.shape
    diff = float(np.abs(got[0] - ref[0]).max())
    assert 0 < diff < 5e-3  # float16 is really used, and close
    np.testing.assert_allclose(got[0].sum(axis=1), 1.0, atol=1e-5)
    # the cache answers the next time (same bytes, no conversion needed)
    assert fp16_member(path, bundle.manifest.members[0].sha256) == data


def test_sidecar_predictor_keeps_its_sessions_across_series(tiny_bundle: Path) -> None:
    from uqserve.sidecar import BundlePredictor
    from uqserve.volumes import Volume, VolumeError

    predictor = BundlePredictor(str(tiny_bundle), device="cpu")
    rng = np.random.default_rng(3)
    good = Volume(
        data=rng.normal(size=(24, 20, 2)).astype(np.float32), affine=np.eye(4), source="good"
    )
    try:
        predictor(good)
        runtime = predictor._runtime
        assert runtime is not None
        bad = Volume(data=np.zeros((4, 4, 2, 2), np.float32), affine=np.eye(4), source="bad")
        with pytest.raises(VolumeError):
            predictor(bad)
        predictor(good)
        assert predictor._runtime is runtime  # opened once, reused after a bad series
    finally:
        predictor.close()
