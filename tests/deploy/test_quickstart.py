"""The quick start as users run it: `./run serve` on the shipped model, and the serving install without torch."""

from __future__ import annotations

import ast
import os
import signal
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

import httpx
import numpy as np
import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
SERVE_PYTHON = ROOT / ".venv-serve" / "bin" / "python"
DEFAULT_MODEL = "fashion-mnist-mlp"
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

pytestmark = pytest.mark.slow


def _serve_python() -> Path:
    """The serving venv that `./run test` builds; outside CI a missing one is a skip, in CI a failure."""
    if not SERVE_PYTHON.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{SERVE_PYTHON} is missing: `./run test` should have created it")
        pytest.skip(f"{SERVE_PYTHON} is missing: run `./run test` (it creates the serving install)")
    return SERVE_PYTHON


def test_serving_install_has_no_torch() -> None:
    code = (
        "import importlib.util, sys\n"
        "import service.app, service.__main__\n"
        "assert importlib.util.find_spec('torch') is None, 'torch is installed in the serving venv'\n"
        "assert not [m for m in sys.modules if m.split('.')[0] in ('torch', 'training')], 'torch imported'\n"
        "print('ok')\n"
    )
    result = subprocess.run(
        [_serve_python(), "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_docker_serving_requirements_have_no_torch() -> None:
    """The serve image installs exactly these (docker/requirements.py serve): torch must not be among them."""
    out = subprocess.run(
        [sys.executable, "docker/requirements.py", "serve"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    names = {line.split(">")[0].split("=")[0].split("[")[0].strip().lower() for line in out.splitlines()}
    assert "onnxruntime" in names and "fastapi" in names
    assert not names & {"torch", "onnx", "onnxscript", "torchvision"}


def _closure(requirements: list[str]) -> set[str]:
    """The distributions these requirements install, transitively (as installed here, markers applied)."""
    names: set[str] = set()
    todo = [Requirement(r) for r in requirements]
    while todo:
        requirement = todo.pop()
        name = canonicalize_name(requirement.name)
        extras = requirement.extras or {""}
        if name == canonicalize_name(PROJECT["name"]):
            todo += [Requirement(r) for extra in extras for r in PROJECT["optional-dependencies"][extra]]
            continue
        if name in names and extras == {""}:
            continue
        names.add(name)
        for line in metadata.requires(name) or []:
            inner = Requirement(line)
            if inner.marker is None or any(inner.marker.evaluate({"extra": e}) for e in extras):
                todo.append(inner)
    return names


OWN_PACKAGES = {"service", "bench", "tests", "training", "service_ray"}


def _imports(path: Path) -> set[str]:
    """Every module `path` requires, anywhere in it (functions included), as dotted names; imports guarded by
    `except ImportError` are optional (a test that skips without them) and left out."""
    names: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.Try) and any(_catches_import_error(h) for h in node.handlers):
            for child in [*node.handlers, *node.orelse, *node.finalbody]:
                visit(child)
            return
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return names


def _catches_import_error(handler: ast.ExceptHandler) -> bool:
    caught = handler.type
    kinds = caught.elts if isinstance(caught, ast.Tuple) else [caught]
    return any(isinstance(k, ast.Name) and k.id in ("ImportError", "ModuleNotFoundError") for k in kinds)


def _third_party_imports(start: list[Path]) -> set[str]:
    """Top-level names of the non-project modules that `start` imports, following the project's own
    modules transitively (what our code asks for, not what installed packages import optionally)."""
    seen: set[Path] = set()
    todo, found = list(start), set()
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for name in _imports(path):
            top = name.split(".")[0]
            if top not in OWN_PACKAGES:
                found.add(top)
                continue
            module = ROOT.joinpath(*name.split("."))
            for candidate in (module.with_suffix(".py"), module / "__init__.py"):
                if candidate.is_file():
                    todo.append(candidate)
    return found - set(sys.stdlib_module_names) - {"__future__"}


def test_service_tests_need_only_the_serve_and_dev_installs() -> None:
    """What the service README documents (`.[serve,dev]`) runs tests/service: no torch, no training, no ray."""
    modules = _third_party_imports(sorted((ROOT / "tests" / "service").glob("*.py")))
    assert "onnx" in modules and "fastapi" in modules  # the walk does reach the project's imports
    by_module = metadata.packages_distributions()
    missing = {module for module in modules if module not in by_module}
    assert not missing, f"imported but installed by nothing here: {sorted(missing)}"
    imported = {canonicalize_name(dist) for module in modules for dist in by_module[module]}
    allowed = _closure([*PROJECT["dependencies"], "vae-serving[serve,dev]"])
    assert imported <= allowed, f"imported but not in .[serve,dev]: {sorted(imported - allowed)}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def quickstart_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`./run serve` exactly as the README says, on a free loopback port, until the test is done."""
    _serve_python()
    log_path = tmp_path_factory.mktemp("quickstart") / "serve.log"
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("MODEL_DIR", "DEVICE", "WORKERS")}
    env.update(PORT=str(port), HOST="127.0.0.1")
    log = log_path.open("wb")
    proc = subprocess.Popen(["./run", "serve"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert proc.poll() is None, f"./run serve exited early:\n{log_path.read_text()}"
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        else:
            pytest.fail(f"./run serve did not become ready within 120 s:\n{log_path.read_text()}")
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
        finally:
            log.close()
    assert code == 0, f"./run serve exited with {code} on SIGTERM"


def test_quickstart_answers_every_endpoint(quickstart_url: str) -> None:
    with httpx.Client(base_url=quickstart_url, timeout=30) as client:
        assert client.get("/healthz").status_code == 200
        assert client.get("/readyz").status_code == 200
        names = [m["name"] if isinstance(m, dict) else m for m in client.get("/v1/models").json()["models"]]
        assert DEFAULT_MODEL in names

        meta = client.get(f"/v1/models/{DEFAULT_MODEL}").json()
        assert meta["dataset"] == "fashion-mnist"
        assert list(meta["input_shape"]) == [1, 28, 28]
        latent = meta["latent_dim"]

        sample = client.post(f"/v1/models/{DEFAULT_MODEL}/sample", json={"n": 4, "seed": 7}).json()
        images = np.asarray(sample["samples"], dtype=np.float32)
        assert images.shape == (4, 1, 28, 28)
        assert images.min() >= 0.0 and images.max() <= 1.0
        assert np.asarray(sample["z"]).shape == (4, latent)
        assert sample["seed"] == 7

        encoded = client.post(
            f"/v1/models/{DEFAULT_MODEL}/encode", json={"inputs": images.tolist(), "samples": 3, "seed": 1}
        ).json()
        assert np.asarray(encoded["mu"]).shape == (4, latent)
        assert np.asarray(encoded["z"]).shape == (4, 3, latent)
        np.testing.assert_allclose(np.exp(np.asarray(encoded["logvar"]) / 2), encoded["sigma"], rtol=1e-5)

        recon = client.post(
            f"/v1/models/{DEFAULT_MODEL}/reconstruct", json={"inputs": images.tolist()}
        ).json()
        assert np.asarray(recon["reconstructions"]).shape == (4, 1, 28, 28)
        assert len(recon["error"]) == 4

        decoded = client.post(f"/v1/models/{DEFAULT_MODEL}/decode", json={"z": sample["z"]}).json()
        np.testing.assert_allclose(np.asarray(decoded["samples"]), images, atol=1e-5)

        png = client.post(
            f"/v1/models/{DEFAULT_MODEL}/sample", json={"n": 16, "seed": 3}, headers={"Accept": "image/png"}
        )
        assert png.status_code == 200 and png.content.startswith(b"\x89PNG\r\n\x1a\n")

        metrics = client.get("/metrics").text
        assert "sample" in metrics and DEFAULT_MODEL in metrics
