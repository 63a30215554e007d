"""Dockerfile linted by hadolint; Kubernetes manifests validated offline against the schemas."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
K8S = ROOT / "deploy" / "kubernetes"
BIN = Path(sys.executable).parent


def tool(name: str) -> str:
    path = BIN / name
    if path.is_file():
        return str(path)
    found = shutil.which(name)
    if found is None:
        pytest.skip(f"{name} is not installed (pip install -e '.[dev]' brings it)")
    return found


def hadolint(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [tool("hadolint"), "--no-color", "--failure-threshold", "info", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def kube_validate(*paths: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [tool("kubernetes-validate"), "--strict", "--quiet", *map(str, paths)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_dockerfile_passes_hadolint(tmp_path: Path) -> None:
    r = hadolint(DOCKERFILE)
    assert r.returncode == 0, r.stdout + r.stderr
    # The linter does bite: an unpinned base image and apt-get without pins fail.
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN apt-get update && apt-get install -y curl\n")
    assert hadolint(bad).returncode != 0


def stages(text: str) -> dict[str, str]:
    """Stage name -> its body (lines up to the next FROM), with ARG defaults expanded."""
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", text, flags=re.M))
    out: dict[str, str] = {}
    for block in re.split(r"^(?=FROM )", text, flags=re.M)[1:]:
        first = block.splitlines()[0]
        m = re.match(r"FROM (\S+) AS (\S+)", first)
        assert m, first
        image = re.sub(r"\$\{(\w+)\}", lambda g: args[g.group(1)], m.group(1))
        out[m.group(2)] = f"FROM {image}\n" + block.split("\n", 1)[1]
    return out


def test_dockerfile_targets() -> None:
    s = stages(DOCKERFILE.read_text())
    assert {"server", "sidecar"} <= set(s)
    server, sidecar = s["server"], s["sidecar"]
    assert re.match(r"FROM nvcr\.io/nvidia/tritonserver:\d\d\.\d\d-py3\n", server), server
    assert "HEALTHCHECK" in server and "/v2/health/ready" in server
    assert "COPY --from=repository /models /models" in server
    assert "--flavour onnxruntime" in s["repository"]
    assert re.match(r"FROM python:\d+\.\d+\.\d+-slim", sidecar)
    assert '".[dicom]"' in sidecar and "torch" not in sidecar and "export" not in sidecar
    assert re.search(r"^USER \d+$", sidecar, flags=re.M), "the sidecar must not run as root"
    # No torch reaches the sidecar through the base dependencies or the dicom extra.
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for dep in [*project["dependencies"], *project["optional-dependencies"]["dicom"]]:
        assert not dep.lower().startswith("torch"), dep
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    assert {"**", "!pyproject.toml", "!README.md", "!uqserve/"} <= set(ignore)


def test_kubernetes_manifests_validate_offline(tmp_path: Path) -> None:
    files = sorted(K8S.glob("*.yaml"))
    assert [f.name for f in files] == ["sidecar.yaml", "triton.yaml"]
    r = kube_validate(*files)
    assert r.returncode == 0, r.stdout + r.stderr
    # The validator does bite: a typo'd field and a wrong type fail.
    bad = tmp_path / "bad.yaml"
    bad.write_text((K8S / "triton.yaml").read_text().replace("replicas: 1", 'replicas: "one"', 1))
    assert kube_validate(bad).returncode != 0
    bad.write_text((K8S / "triton.yaml").read_text().replace("readinessProbe", "readynessProbe", 1))
    assert kube_validate(bad).returncode != 0


def load_docs(name: str) -> dict[str, dict[str, Any]]:
    yaml = pytest.importorskip("yaml")
    docs = [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]
    return {d["kind"]: d for d in docs}


def test_triton_deployment_is_wired_for_gpu_serving() -> None:
    docs = load_docs("triton.yaml")
    deploy, service, hpa = docs["Deployment"], docs["Service"], docs["HorizontalPodAutoscaler"]
    pod = deploy["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    shm = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    vol = {v["name"]: v for v in pod["volumes"]}
    (dshm,) = [n for n, p in shm.items() if p == "/dev/shm"]
    assert vol[dshm]["emptyDir"]["medium"] == "Memory"
    labels = deploy["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert {p["port"] for p in service["spec"]["ports"]} == {8000, 8001, 8002}
    assert hpa["spec"]["scaleTargetRef"]["name"] == deploy["metadata"]["name"]


def test_sidecar_deployment_talks_to_the_triton_service() -> None:
    from typer.main import get_command

    from uqserve.cli import app

    triton = load_docs("triton.yaml")["Service"]
    docs = load_docs("sidecar.yaml")
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    args = container["args"]
    assert f"--server=grpc://{triton['metadata']['name']}:8001" in args
    # The args parse with the real `uqserve sidecar` command line.
    group = get_command(app)
    sidecar = group.commands["sidecar"]  # type: ignore[attr-defined]
    ctx = sidecar.make_context("sidecar", list(args))
    assert ctx.params["server"] == [f"grpc://{triton['metadata']['name']}:8001"]
    claim = docs["PersistentVolumeClaim"]["metadata"]["name"]
    assert any(v.get("persistentVolumeClaim", {}).get("claimName") == claim for v in pod["volumes"])
