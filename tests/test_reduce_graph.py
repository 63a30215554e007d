"""predict --reduce graph: the members' outputs summed by the reduction graph in onnxruntime
(IOBinding; the CPU execution provider here, the GPU's in production) = the host's sums."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from tests.conftest import blob_volume, write_nifti
from uqserve.errors import UsageError
from uqserve.prediction import Predictor, RuntimeOptions
from uqserve.runtime import open_runtime
from uqserve.runtime.embedded import cuda_available
from uqserve.volumes import read_volume

MAPS = ("tu", "au", "eu", "au_sample", "au_latent", "prob")


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("bundle", ["tiny_bundle", "tiny_softmax_bundle", "softmax-ensemble"])
def test_graph_equals_host(bundle: str, device: str, request: pytest.FixtureRequest) -> None:
    # CI checks the CPU execution provider; on a GPU machine the same test runs the CUDA
    # IOBinding path (member outputs left on the device) against the host sums.
    if device == "cuda" and not cuda_available():
        pytest.skip("no GPU with onnxruntime's CUDA provider")
    path = bundle if "-" in bundle else request.getfixturevalue(bundle)
    volume = read_volume(write_nifti(Path(request.getfixturevalue("tmp_path")) / "s.nii.gz",
                                     blob_volume((48, 40, 5))))  # fmt: skip
    preds = {}
    for mode in ("graph", "host"):
        with Predictor(path, RuntimeOptions(device=device, reduce=mode), seed=3) as p:
            assert p.runtime.reduces == (mode == "graph")
            preds[mode] = p.predict(volume)
    g, h = preds["graph"], preds["host"]
    np.testing.assert_array_equal(g.seg, h.seg)
    for name in MAPS:
        np.testing.assert_allclose(getattr(g, name), getattr(h, name), rtol=0, atol=1e-5)
    np.testing.assert_array_equal(g.sample_counts, h.sample_counts)
    np.testing.assert_array_equal(g.member_foreground, h.member_foreground)
    assert g.report["ood"]["flag"] == h.report["ood"]["flag"]


def test_auto_is_host_on_the_cpu_and_bad_modes_fail(tiny_bundle: Path) -> None:
    with open_runtime(tiny_bundle, device="cpu") as rt:
        assert not rt.reduces
    with pytest.raises(UsageError, match="reduce 'server' unknown"):
        open_runtime(tiny_bundle, device="cpu", reduce="server")


def test_cli_reduce_graph(tiny_bundle: Path, tmp_path: Path) -> None:
    from uqserve.cli import app

    scan = write_nifti(tmp_path / "scan.nii.gz", blob_volume())
    reports = {}
    for mode in ("graph", "host"):
        res = CliRunner().invoke(app, ["predict", str(scan), "-o", str(tmp_path / mode), "-b",
                                       str(tiny_bundle), "--reduce", mode, "--json"])  # fmt: skip
        assert res.exit_code == 0, res.output
        reports[mode] = json.loads(res.stdout.splitlines()[0])
    assert reports["graph"]["volumes"] == reports["host"]["volumes"]  # counts are exact
    res = CliRunner().invoke(app, ["predict", str(scan), "-b", str(tiny_bundle), "--reduce", "x"])
    assert res.exit_code != 0 and "--reduce 'x'" in res.output
