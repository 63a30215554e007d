"""Reduce on the server (``--reduce server``) against the real tritonserver: the client's
results stay within 1e-5 of the embedded runtime while only the ensemble's sums travel."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from uqserve.bundle import load_bundle
from uqserve.prediction import predict_volume
from uqserve.runtime.embedded import EmbeddedRuntime
from uqserve.runtime.triton import TritonRuntime
from uqserve.serving import ServerError, TritonServer, find_server_tree, write_repository
from uqserve.volumes import read_volume

try:
    find_server_tree()
    HAVE_SERVER = True
except ServerError:
    HAVE_SERVER = False

pytestmark = [
    pytest.mark.triton,
    pytest.mark.skipif(not HAVE_SERVER, reason="tritonserver (server extra) is not installed"),
]

MAPS = ("prob", "tu", "au", "eu", "au_sample", "au_latent")


@pytest.fixture(scope="module")
def reduce_server(
    tmp_path_factory: pytest.TempPathFactory, tiny_bundle: Path, tiny_softmax_bundle: Path
) -> Iterator[TritonServer]:
    """One tritonserver serving both tiny bundles with the reduction step (python flavour)."""
    repo = write_repository(
        [tiny_bundle, tiny_softmax_bundle],
        tmp_path_factory.mktemp("reduce") / "repo",
        instances=1,
        reduce="server",
    )
    with TritonServer(repo) as srv:
        yield srv


def _inferences(server: TritonServer, model: str) -> int:
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(server.grpc_url.removeprefix("grpc://"))
    try:
        stats = client.get_inference_statistics(model_name=model)
        return int(stats.model_stats[0].inference_count)
    finally:
        client.close()


@pytest.mark.parametrize("which", ["tiny_bundle", "tiny_softmax_bundle"])
def test_reduced_results_equal_embedded_within_1e5(
    reduce_server: TritonServer, scan: Path, which: str, request: pytest.FixtureRequest
) -> None:
    bundle = load_bundle(request.getfixturevalue(which))
    volume = read_volume(scan)
    with EmbeddedRuntime(bundle, device="cpu") as emb:
        want = predict_volume(volume, runtime=emb, batch_size=2)
    with TritonRuntime(
        bundle, [reduce_server.grpc_url], shared_memory=which == "tiny_bundle"
    ) as rt:
        assert rt.reduces
        got = predict_volume(volume, runtime=rt, batch_size=2)
    for name in MAPS:
        diff = float(np.abs(getattr(got, name) - getattr(want, name)).max())
        assert diff <= 1e-5, f"{name}: max abs difference {diff}"
    assert np.array_equal(got.seg, want.seg)
    assert np.array_equal(got.sample_counts, want.sample_counts)
    if bundle.manifest.num_samples == 1:
        assert not got.au_latent.any()  # exactly 0, as embedded
    # the server really ran the reduction ensemble
    assert _inferences(reduce_server, f"{bundle.manifest.name}_reduced") > 0
    for key in ("tu", "au", "eu"):
        assert got.report["scores"][key] == pytest.approx(want.report["scores"][key], abs=1e-5)
    assert got.report["volumes"] == want.report["volumes"]


def test_samples_and_client_mode_still_use_the_members(
    reduce_server: TritonServer, tiny_bundle: Path, scan: Path
) -> None:
    """Sample labels need every member; reduce='client' ignores the reduction: both are exact."""
    bundle = load_bundle(tiny_bundle)
    volume = read_volume(scan)
    with EmbeddedRuntime(bundle, device="cpu") as emb:
        want = predict_volume(volume, runtime=emb, batch_size=3, want_samples=True)
    with TritonRuntime(bundle, [reduce_server.grpc_url], reduce="client") as rt:
        assert not rt.reduces
        plain = predict_volume(volume, runtime=rt, batch_size=3)
    with TritonRuntime(bundle, [reduce_server.grpc_url]) as rt:
        with_samples = predict_volume(volume, runtime=rt, batch_size=3, want_samples=True)
    for got in (plain, with_samples):
        for name in MAPS:
            assert np.abs(getattr(got, name) - getattr(want, name)).max() <= 1e-5, name
    assert with_samples.sample_labels is not None and want.sample_labels is not None
    assert np.array_equal(with_samples.sample_labels, want.sample_labels)
