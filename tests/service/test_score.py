"""POST .../score: likelihood bounds re-derived with numpy, the anomaly score against a background model, seeded
eps that no batching changes, the .npy form, V2, and every bad input a 4xx naming its field."""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import numpy as np
import onnx
import onnxruntime as ort
import pytest

from bench import standin
from service.manifest import (
    BACKGROUND_DECODER_FILE,
    BACKGROUND_ENCODER_FILE,
    DECODER_FILE,
    ENCODER_FILE,
    Anomaly,
    Auroc,
    BackgroundModel,
    FileEntry,
    read_manifest,
    sha256_file,
    write_manifest,
)
from service.media import NPY
from tests.service.conftest import LATENT, eps_for, image_batch, serve, write_model

pytestmark = pytest.mark.anyio

BACKGROUND_LATENT = 3
THRESHOLD = 5.0
SCORED, PLAIN = "/v1/models/scored", "/v1/models/plain"


def add_background(directory: Path, seed: int, threshold: float = THRESHOLD) -> Path:
    """Give a stand-in model directory a stand-in background model and an `anomaly` section."""
    rng = np.random.default_rng(seed)
    onnx.save(standin.encoder(rng, (), BACKGROUND_LATENT), directory / BACKGROUND_ENCODER_FILE)
    onnx.save(standin.decoder(rng, (), BACKGROUND_LATENT), directory / BACKGROUND_DECODER_FILE)
    manifest = read_manifest(directory)
    entry = {
        name: FileEntry(path=name, sha256=sha256_file(directory / name))
        for name in (BACKGROUND_ENCODER_FILE, BACKGROUND_DECODER_FILE)
    }
    anomaly = Anomaly(
        score="elbo_background - elbo_model",
        background=BackgroundModel(
            encoder=entry[BACKGROUND_ENCODER_FILE],
            decoder=entry[BACKGROUND_DECODER_FILE],
            latent_dim=BACKGROUND_LATENT,
            architecture="stand-in",
            perturbation="none: random weights",
            config={},
            seconds=0.0,
            max_abs_diff=0.0,
        ),
        threshold=threshold,
        false_positive_rate=0.01,
        threshold_images=100,
        test_false_positive_rate=0.02,
        k=10,
        test_images=100,
        auroc={"mnist": Auroc(elbo=0.5, iwae=0.4, anomaly=0.9)},
        command="stand-in",
        created=datetime.now(UTC),
    )
    write_manifest(
        directory, manifest.model_copy(update={"anomaly": anomaly, "unit_variance": [1.0, 0.5, 0.0, 2.0]})
    )
    return directory


@pytest.fixture(scope="module")
def scored_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """MODEL_DIR with `scored` (a background model) and `plain` (none): the same weights."""
    root = tmp_path_factory.mktemp("scored")
    add_background(write_model(root, "scored", "1", seed=3), seed=9)
    write_model(root, "plain", "1", seed=3)
    return root


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
async def client(scored_dir: Path) -> AsyncIterator[httpx.AsyncClient]:
    async with serve(scored_dir, max_batch=8, max_samples=64) as c:
        yield c


# ---- the maths, re-derived -------------------------------------------------------------------------------


def sessions(
    directory: Path, encoder: str, decoder: str
) -> tuple[ort.InferenceSession, ort.InferenceSession]:
    cpu = ["CPUExecutionProvider"]
    return (
        ort.InferenceSession(str(directory / encoder), providers=cpu),
        ort.InferenceSession(str(directory / decoder), providers=cpu),
    )


def expected_bounds(
    directory: Path, encoder: str, decoder: str, x: np.ndarray, eps: np.ndarray
) -> dict[str, np.ndarray]:
    """elbo, iwae, kl, recon_error of images x [n, 1, 28, 28] with eps [n, k, L], in float64 from first
    principles (a Bernoulli on the decoder's means, the Gaussian densities written out)."""
    enc, dec = sessions(directory, encoder, decoder)
    mu, logvar = enc.run(None, {"x": x})
    n, k, latent = eps.shape
    sigma = np.exp(logvar * np.float32(0.5))
    z = mu[:, None] + sigma[:, None] * eps
    p = dec.run(None, {"z": z.reshape(n * k, latent)})[0].reshape(n, k, -1).astype(np.float64)
    p = np.clip(p, 2.0**-126, 1 - 2.0**-24)  # as documented: float32's range short of 0 and 1
    flat = x.reshape(n, 1, -1).astype(np.float64)
    log_px = np.sum(flat * np.log(p) + (1 - flat) * np.log(1 - p), axis=-1)
    z64, mu64, lv64 = z.astype(np.float64), mu.astype(np.float64)[:, None], logvar.astype(np.float64)[:, None]
    log_pz = np.sum(-0.5 * np.log(2 * np.pi) - 0.5 * z64**2, axis=-1)
    log_qz = np.sum(-0.5 * np.log(2 * np.pi) - 0.5 * lv64 - 0.5 * (z64 - mu64) ** 2 / np.exp(lv64), axis=-1)
    kl = 0.5 * np.sum(mu.astype(np.float64) ** 2 + np.exp(logvar.astype(np.float64)) - 1 - logvar, axis=-1)
    log_w = log_px + log_pz - log_qz
    iwae = np.log(np.mean(np.exp(log_w - log_w.max(1, keepdims=True)), axis=1)) + log_w.max(1)
    recon = dec.run(None, {"z": mu})[0].reshape(n, -1)
    return {
        "elbo": log_px.mean(1) - kl,
        "iwae": iwae,
        "kl": kl,
        "recon_error": np.mean((recon - x.reshape(n, -1)) ** 2, axis=1),
    }


async def test_bounds_match_a_first_principles_derivation(
    client: httpx.AsyncClient, scored_dir: Path
) -> None:
    x = image_batch(3, seed=1)
    response = await client.post(f"{PLAIN}/score", json={"inputs": x.tolist(), "k": 7, "seed": 42})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["k"] == 7 and body["seed"] == 42 and len(body["scores"]) == 3
    assert all("anomaly" not in item for item in body["scores"])  # plain has no background model
    expected = expected_bounds(
        scored_dir / "plain" / "1", ENCODER_FILE, DECODER_FILE, x, eps_for(42, (3, 7, LATENT))
    )
    for name, values in expected.items():
        np.testing.assert_allclose([item[name] for item in body["scores"]], values, rtol=1e-5, atol=1e-5)
    assert all(item["iwae"] >= item["elbo"] - 1e-6 for item in body["scores"])  # Burda et al.: iwae >= elbo
    assert (await client.get(PLAIN)).json()["anomaly"] is None


async def test_anomaly_is_the_elbo_ratio_against_the_background(
    client: httpx.AsyncClient, scored_dir: Path
) -> None:
    x = image_batch(4, seed=2)
    body = (await client.post(f"{SCORED}/score", json={"inputs": x.tolist(), "k": 5, "seed": 9})).json()
    directory = scored_dir / "scored" / "1"
    eps = eps_for(
        9, (4 * 5 * LATENT + 4 * 5 * BACKGROUND_LATENT,)
    )  # one generator: model's eps, then the background's
    model = expected_bounds(
        directory, ENCODER_FILE, DECODER_FILE, x, eps[: 4 * 5 * LATENT].reshape(4, 5, LATENT)
    )
    background = expected_bounds(
        directory,
        BACKGROUND_ENCODER_FILE,
        BACKGROUND_DECODER_FILE,
        x,
        eps[4 * 5 * LATENT :].reshape(4, 5, BACKGROUND_LATENT),
    )
    scores = [item["anomaly"]["score"] for item in body["scores"]]
    np.testing.assert_allclose(scores, background["elbo"] - model["elbo"], rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose([item["elbo"] for item in body["scores"]], model["elbo"], rtol=1e-5)
    for item in body["scores"]:
        assert item["anomaly"]["threshold"] == THRESHOLD
        assert item["anomaly"]["is_anomaly"] == (item["anomaly"]["score"] > THRESHOLD)


async def test_the_same_seed_gives_the_same_bits_under_any_batching(client: httpx.AsyncClient) -> None:
    x = image_batch(2, seed=3)
    request = {"inputs": x.tolist(), "k": 16, "seed": 1234}
    alone = (await client.post(f"{SCORED}/score", json=request)).json()
    others = [
        client.post(f"{SCORED}/score", json={"inputs": image_batch(3, seed=s).tolist(), "k": 9, "seed": s})
        for s in range(6)
    ]
    crowded, *_ = await asyncio.gather(client.post(f"{SCORED}/score", json=request), *others)
    assert crowded.json() == alone  # every float, bit for bit
    assert (await client.post(f"{SCORED}/score", json={**request, "seed": 1235})).json() != alone


async def test_a_seed_is_drawn_when_absent_and_replays(client: httpx.AsyncClient) -> None:
    x = image_batch(1, seed=4).tolist()
    first = (await client.post(f"{SCORED}/score", json={"inputs": x, "k": 3})).json()
    assert first["k"] == 3 and 0 <= first["seed"] < 2**53
    again = (await client.post(f"{SCORED}/score", json={"inputs": x, "k": 3, "seed": first["seed"]})).json()
    assert again == first
    default_k = (await client.post(f"{PLAIN}/score?k=50", json={"inputs": x})).json()
    assert default_k["k"] == 50


async def test_npy_in_and_out(client: httpx.AsyncClient) -> None:
    x = image_batch(2, seed=5)
    buffer = io.BytesIO()
    np.save(buffer, x)
    response = await client.post(
        f"{SCORED}/score?k=4&seed=3", content=buffer.getvalue(), headers={"Content-Type": NPY, "Accept": NPY}
    )
    assert response.status_code == 200, response.text
    assert response.headers["x-seed"] == "3" and float(response.headers["x-anomaly-threshold"]) == THRESHOLD
    record = np.load(io.BytesIO(response.content), allow_pickle=False)
    assert record.dtype.names == ("elbo", "iwae", "kl", "recon_error", "anomaly_score", "is_anomaly")
    as_json = (await client.post(f"{SCORED}/score", json={"inputs": x.tolist(), "k": 4, "seed": 3})).json()
    assert record["elbo"].tolist() == [item["elbo"] for item in as_json["scores"]]
    assert record["is_anomaly"].tolist() == [item["anomaly"]["is_anomaly"] for item in as_json["scores"]]
    plain = await client.post(
        f"{PLAIN}/score?k=4&seed=3", content=buffer.getvalue(), headers={"Content-Type": NPY, "Accept": NPY}
    )
    assert np.load(io.BytesIO(plain.content)).dtype.names == ("elbo", "iwae", "kl", "recon_error")
    assert "x-anomaly-threshold" not in plain.headers


async def test_metadata_carries_the_threshold_aurocs_and_unit_variance(client: httpx.AsyncClient) -> None:
    info = (await client.get(SCORED)).json()
    assert info["anomaly"] == {
        "threshold": THRESHOLD,
        "false_positive_rate": 0.01,
        "k": 10,
        "test_images": 100,
        "auroc": {"mnist": {"elbo": 0.5, "iwae": 0.4, "anomaly": 0.9}},
    }
    assert info["unit_variance"] == [1.0, 0.5, 0.0, 2.0]


IMAGE = image_batch(1, seed=6)[0].reshape(-1).tolist()
BAD = [
    ("k zero", {"inputs": [IMAGE], "k": 0}, "k", "greater than or equal to 1"),
    (
        "k past the limit",
        {"inputs": [IMAGE], "k": 65},
        "k",
        "inputs x k is 65; the limit (MAX_SAMPLES) is 64",
    ),
    ("inputs x k past the limit", {"inputs": [IMAGE] * 2, "k": 33}, "k", "inputs x k is 66"),
    ("k a string", {"inputs": [IMAGE], "k": "3"}, "k", "integer"),
    ("k fractional", {"inputs": [IMAGE], "k": 2.5}, "k", "integer"),
    ("negative seed", {"inputs": [IMAGE], "seed": -1}, "seed", "greater than or equal to 0"),
    ("no inputs", {"k": 3}, "inputs", "field required"),
    ("empty inputs", {"inputs": [], "k": 3}, "inputs", ""),
    ("too many inputs", {"inputs": [IMAGE] * 9, "k": 1}, "inputs", "MAX_BATCH"),
    ("pixel past 1", {"inputs": [[*IMAGE[:-1], 1.5]], "k": 1}, "inputs.0.783", "[0, 1]"),
    ("wrong size", {"inputs": [IMAGE[:-1]], "k": 1}, "inputs.0", "783"),
    ("unknown field", {"inputs": [IMAGE], "samples": 3}, "samples", "unknown field"),
]


@pytest.mark.parametrize(("request_body", "field", "message"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
async def test_bad_input_is_a_422_naming_its_field(
    client: httpx.AsyncClient, request_body: dict[str, object], field: str, message: str
) -> None:
    response = await client.post(f"{SCORED}/score", json=request_body)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["field"] == field and message in error["message"]


async def test_nan_and_malformed_bodies(client: httpx.AsyncClient) -> None:
    nan = ('{"inputs": [[' + ", ".join(["NaN"] + ["0.5"] * 783) + "]]}").encode()
    response = await client.post(f"{SCORED}/score", content=nan, headers={"Content-Type": "application/json"})
    assert response.status_code == 422 and response.json()["error"]["field"] == "inputs.0.0"
    broken = await client.post(f"{SCORED}/score", content=b"{", headers={"Content-Type": "application/json"})
    assert broken.status_code == 400
    png = await client.post(f"{SCORED}/score", json={"inputs": [IMAGE]}, headers={"Accept": "image/png"})
    assert png.status_code == 406
    missing = await client.post("/v1/models/nope/score", json={"inputs": [IMAGE]})
    assert missing.status_code == 404


async def test_v2_score_answers_as_v1(client: httpx.AsyncClient) -> None:
    x = image_batch(2, seed=7)
    data = {"name": "images", "datatype": "FP32", "shape": list(x.shape), "data": x.reshape(-1).tolist()}
    for model, path in (("scored", SCORED), ("plain", PLAIN)):
        v2 = await client.post(
            f"/v2/models/{model}.score/infer", json={"inputs": [data], "parameters": {"k": 4, "seed": 8}}
        )
        assert v2.status_code == 200, v2.text
        outputs = {o["name"]: o for o in v2.json()["outputs"]}
        assert v2.json()["parameters"] == {"seed": 8}
        v1 = (await client.post(f"{path}/score", json={"inputs": x.tolist(), "k": 4, "seed": 8})).json()[
            "scores"
        ]
        np.testing.assert_array_equal(
            np.float32(outputs["elbo"]["data"]), np.float32([item["elbo"] for item in v1])
        )
        assert outputs["is_anomaly"]["datatype"] == "BOOL"
        if model == "scored":
            np.testing.assert_array_equal(
                np.float32(outputs["anomaly_score"]["data"]),
                np.float32([item["anomaly"]["score"] for item in v1]),
            )
            assert outputs["anomaly_threshold"]["data"] == [THRESHOLD, THRESHOLD]
        else:  # no background model: NaN scores that flag nothing
            assert outputs["is_anomaly"]["data"] == [False, False]
    too_many = await client.post(
        "/v2/models/scored.score/infer", json={"inputs": [data], "parameters": {"k": 40}}
    )
    assert too_many.status_code == 400 and "MAX_SAMPLES" in too_many.json()["error"]


async def test_a_background_file_that_fails_its_checksum_refuses_the_version(tmp_path: Path) -> None:
    directory = add_background(write_model(tmp_path, "scored", "1", seed=0), seed=1)
    (directory / BACKGROUND_DECODER_FILE).write_bytes(b"not the graph")
    async with serve(tmp_path) as c:
        ready = (await c.get("/readyz")).json()
    assert (
        "background decoder file scored/1/background_decoder.onnx has sha256"
        in ready["not_ready"][0]["reason"]
    )
