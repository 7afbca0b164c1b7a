"""The model registry: broken models refused with reasons while the rest serve, readiness, versions."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import onnx
import pytest

from bench import standin
from bench.standin import rewrite_checksums
from service import manifest as manifest_module
from service.app import create_app
from service.batching import Batcher
from service.catalog import ServedModel, version_key
from service.manifest import DECODER_FILE, ENCODER_FILE, MANIFEST_NAME, read_manifest, sha256_file
from service.runtime import CPU, CUDA
from tests.service.conftest import (
    LATENT,
    NEWEST,
    make_settings,
    serve,
    write_model,
)

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def mixed_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One sound model and seven broken ones, each broken in a different way, plus a stray file."""
    root = tmp_path_factory.mktemp("mixed")
    write_model(root, "good", "1", seed=0)
    corrupt = write_model(root, "corrupt", "1", seed=1)
    with (corrupt / DECODER_FILE).open("ab") as f:
        f.write(b"\0")
    missing = write_model(root, "missing", "1", seed=2)
    (missing / ENCODER_FILE).unlink()
    invalid = write_model(root, "invalid", "1", seed=3)
    text = (invalid / MANIFEST_NAME).read_text()
    (invalid / MANIFEST_NAME).write_text(text.replace('"latent_dim": 4', '"latent_dim": 0'))
    write_model(root, "mismatch", "1", seed=4, manifest_latent=LATENT + 1)  # checksums fine, graphs disagree
    (root / "nomanifest" / "1").mkdir(parents=True)
    moved = write_model(root, "moved", "1", seed=5)
    moved.rename(root / "moved" / "7")  # manifest says version 1, directory says 7
    baked = write_model(root, "baked", "1", seed=6)  # the export bug of a batch axis fixed at 1
    onnx.save(
        standin.decoder(np.random.default_rng(6), (), LATENT, reshape_to=(1, -1, 28, 28)),
        baked / DECODER_FILE,
    )
    rewrite_checksums(baked)
    (root / "README.txt").write_text("not a model")
    return root


EXPECTED_REFUSALS = {
    "corrupt": f"{DECODER_FILE} has sha256",
    "missing": f"{ENCODER_FILE} is missing",
    "invalid": "latent_dim: Input should be greater than or equal to 1",
    "mismatch": "the manifest says 5",
    "nomanifest": f"{MANIFEST_NAME} is missing",
    "moved": "says moved/1 but lives in moved/7",
    "baked": "decoder.onnx: output 'x_mean' has a fixed batch size 1",
}


async def test_broken_models_are_refused_with_reasons_and_the_rest_serve(
    mixed_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR, logger="service.loading"):
        async with serve(mixed_dir) as client:
            ready = await client.get("/readyz")
            assert ready.status_code == 503
            body = ready.json()
            assert body["ready"] is False
            assert body["models"] == ["good/1"]
            reasons = {item["model"]: item["reason"] for item in body["not_ready"]}
            assert reasons.keys() == EXPECTED_REFUSALS.keys()
            assert {item["path"] for item in body["not_ready"]} == {
                f"{item['model']}/{item['version']}" for item in body["not_ready"]
            }
            for name, fragment in EXPECTED_REFUSALS.items():
                assert fragment in reasons[name], reasons[name]
            assert (await client.post("/v1/models/good/sample", json={"n": 1})).status_code == 200
            assert (await client.post("/v1/models/corrupt/sample", json={"n": 1})).status_code == 404
            metrics = (await client.get("/metrics")).text
            assert 'vae_model_loaded{model="good",version="1"} 1.0' in metrics
            assert 'vae_model_loaded{model="corrupt",version="1"} 0.0' in metrics
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(lines) == len(EXPECTED_REFUSALS)  # one line per refused model
    for name in EXPECTED_REFUSALS:
        (line,) = [line for line in lines if line.startswith(f"model {name}/")]
        assert f"{name}/" in line.partition(" not loaded: ")[2]  # the file, relative to MODEL_DIR
        assert str(mixed_dir) not in line


async def test_corrupt_onnx_bytes_with_matching_checksum_are_refused(tmp_path: Path) -> None:
    """A manifest that matches garbage: the checksum passes, onnxruntime refuses, the reason says so."""
    directory = write_model(tmp_path, "garbage", "1", seed=0)
    (directory / DECODER_FILE).write_bytes(b"not an onnx graph")
    rewrite_checksums(directory)
    async with serve(tmp_path) as client:
        body = (await client.get("/readyz")).json()
    (item,) = body["not_ready"]
    assert item["model"] == "garbage"
    assert item["reason"].startswith(f"garbage/1/{DECODER_FILE}: ")
    assert str(tmp_path) not in item["reason"]


async def test_empty_model_dir_is_not_ready(tmp_path: Path) -> None:
    async with serve(tmp_path) as client:
        response = await client.get("/readyz")
    assert response.status_code == 503
    assert "no NAME/VERSION/ model directories" in response.json()["not_ready"][0]["reason"]


async def test_missing_model_dir_fails_at_start(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        async with serve(tmp_path / "absent"):
            pass


def test_version_order() -> None:
    assert sorted(["10", "2", "1", "beta", "alpha"], key=version_key) == ["alpha", "beta", "1", "2", "10"]


async def test_each_graphs_providers_are_logged_and_reported(
    model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="service.loading"):
        async with serve(model_dir):
            pass
    assert f"model tiny/{NEWEST} loaded from" in caplog.text
    assert f"encoder on ['{CPU}'], decoder on ['{CPU}']" in caplog.text


def test_providers_are_both_graphs_best_first(model_dir: Path) -> None:
    def batcher() -> Batcher:
        return Batcher(lambda x: [x], name="fake", max_batch_rows=1, window_ms=0, max_queue_rows=1)

    served = ServedModel(
        manifest=read_manifest(model_dir / "tiny" / NEWEST),
        path=model_dir / "tiny" / NEWEST,
        graph_providers={"encoder": [CPU], "decoder": [CUDA, CPU]},
        encoder=batcher(),
        decoder=batcher(),
    )
    assert served.providers == [CUDA, CPU]


# ---- readiness an orchestrator can live with -----------------------------------------------------------


def _corrupt(directory: Path) -> Path:
    with (directory / DECODER_FILE).open("ab") as f:
        f.write(b"\0")
    return directory


async def test_one_broken_version_leaves_its_model_ready_and_is_listed(tmp_path: Path) -> None:
    write_model(tmp_path, "tiny", "1", seed=0)
    _corrupt(write_model(tmp_path, "tiny", "2", seed=1))
    async with serve(tmp_path) as client:
        ready = await client.get("/readyz")
        listing = (await client.get("/v1/models")).json()
    assert ready.status_code == 200, ready.text
    (item,) = ready.json()["not_ready"]
    assert (item["model"], item["version"], item["path"]) == ("tiny", "2", "tiny/2")
    assert f"tiny/2/{DECODER_FILE} has sha256" in item["reason"]
    assert [m["version"] for m in listing["models"]] == ["1"]
    assert listing["refused"] == [item]
    assert str(tmp_path) not in ready.text + str(listing)


async def test_ready_requires_all_needs_every_version(tmp_path: Path) -> None:
    write_model(tmp_path, "tiny", "1", seed=0)
    _corrupt(write_model(tmp_path, "tiny", "2", seed=1))
    async with serve(tmp_path, ready_requires_all=True) as client:
        ready = await client.get("/readyz")
    assert ready.status_code == 503
    assert [item["path"] for item in ready.json()["not_ready"]] == ["tiny/2"]


async def test_a_model_name_without_a_servable_version_is_not_ready(tmp_path: Path) -> None:
    write_model(tmp_path, "good", "1", seed=0)
    _corrupt(write_model(tmp_path, "broken", "1", seed=1))
    async with serve(tmp_path) as client:
        ready = await client.get("/readyz")
    assert ready.status_code == 503
    assert ready.json()["models"] == ["good/1"]
    assert [item["path"] for item in ready.json()["not_ready"]] == ["broken/1"]


async def test_draining_is_not_ready_even_with_every_model_loaded(model_dir: Path) -> None:
    app = create_app(make_settings(model_dir))
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client,
    ):
        assert (await client.get("/readyz")).status_code == 200
        app.state.draining = True
        response = await client.get("/readyz")
    assert response.status_code == 503
    assert response.json()["draining"] is True and response.json()["not_ready"] == []


async def test_an_empty_model_dir_names_no_absolute_path(tmp_path: Path) -> None:
    async with serve(tmp_path) as client:
        response = await client.get("/readyz")
    (item,) = response.json()["not_ready"]
    assert item["path"] == "."
    assert str(tmp_path) not in response.text


# ---- nothing outside MODEL_DIR is read or hashed -------------------------------------------------------


def _point_encoder_at(directory: Path, path: str, sha256: str) -> None:
    """Rewrite the manifest's encoder entry as a hand-edited manifest could."""
    manifest = json.loads((directory / MANIFEST_NAME).read_text())
    manifest["files"]["encoder"] = {"path": path, "sha256": sha256}
    (directory / MANIFEST_NAME).write_text(json.dumps(manifest))


def _sibling_version(root: Path, outside: Path) -> Path:
    directory = write_model(root, "tiny", "2", seed=1)
    _point_encoder_at(directory, f"../1/{ENCODER_FILE}", sha256_file(root / "tiny" / "1" / ENCODER_FILE))
    return directory


def _absolute_path(root: Path, outside: Path) -> Path:
    directory = write_model(root, "tiny", "2", seed=1)
    _point_encoder_at(directory, str(outside / ENCODER_FILE), sha256_file(outside / ENCODER_FILE))
    return directory


def _symlinked_file(root: Path, outside: Path) -> Path:
    directory = write_model(root, "tiny", "2", seed=1)
    (directory / ENCODER_FILE).unlink()
    (directory / ENCODER_FILE).symlink_to(outside / ENCODER_FILE)
    rewrite_checksums(directory)  # the checksum matches the file outside: only the path can refuse it
    return directory


def _symlinked_version(root: Path, outside: Path) -> Path:
    (root / "tiny" / "2").symlink_to(outside, target_is_directory=True)
    return root / "tiny" / "2"


@pytest.mark.parametrize(
    ("make", "fragment"),
    [
        (_sibling_version, "files.encoder.path: Value error, must stay inside the model directory"),
        (_absolute_path, "files.encoder.path: Value error, must be a relative path"),
        (_symlinked_file, f"encoder file tiny/2/{ENCODER_FILE} resolves outside tiny/2"),
        (_symlinked_version, "tiny/2 resolves outside MODEL_DIR"),
    ],
    ids=["dotdot-to-sibling-version", "absolute-path", "symlinked-file", "symlinked-version-directory"],
)
async def test_files_outside_the_version_directory_are_refused_before_hashing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, make: Callable[[Path, Path], Path], fragment: str
) -> None:
    root, elsewhere = tmp_path / "models", tmp_path / "elsewhere"
    write_model(root, "tiny", "1", seed=0)
    outside = write_model(elsewhere, "tiny", "2", seed=1)  # a sound model, just not under MODEL_DIR
    make(root, outside)
    hashed: list[Path] = []

    def recording_sha256(path: Path) -> str:
        hashed.append(path.resolve())
        return sha256_file(path)

    monkeypatch.setattr(manifest_module, "sha256_file", recording_sha256)
    async with serve(root) as client:
        ready = (await client.get("/readyz")).json()
        pinned = await client.post("/v1/models/tiny/versions/2/sample", json={"n": 1})
    assert pinned.status_code == 404
    (item,) = ready["not_ready"]
    assert item["path"] == "tiny/2"
    assert fragment in item["reason"], item["reason"]
    assert str(tmp_path) not in item["reason"]
    assert hashed and all(path.is_relative_to(root.resolve() / "tiny" / "1") for path in hashed)
