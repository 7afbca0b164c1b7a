"""Server-side eps through HTTP: reproducible by seed, independent of batch-mates, and the right distribution."""

from __future__ import annotations

import asyncio
import math
import re
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from service import operations
from tests.service.conftest import LATENT, eps_for, f32, image_batch, serve

pytestmark = pytest.mark.anyio

URL = "/v1/models/tiny"


async def post(client: httpx.AsyncClient, op: str, payload: dict[str, Any]) -> dict[str, Any]:
    response = await client.post(f"{URL}/{op}", json=payload)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def test_same_seed_same_results_different_seed_different(client: httpx.AsyncClient) -> None:
    first = await post(client, "sample", {"n": 3, "seed": 7})
    again = await post(client, "sample", {"n": 3, "seed": 7})
    other = await post(client, "sample", {"n": 3, "seed": 8})
    assert first == again
    assert not np.array_equal(f32(first["z"]), f32(other["z"]))


async def test_seed_drawn_when_absent_and_replays(client: httpx.AsyncClient) -> None:
    drawn = await post(client, "sample", {"n": 2})
    seed = drawn["seed"]
    assert isinstance(seed, int) and 0 <= seed < 2**53
    replay = await post(client, "sample", {"n": 2, "seed": seed})
    assert replay == drawn
    assert (await post(client, "sample", {"n": 2}))["seed"] != seed


async def test_eps_is_reproducible_by_a_client_with_numpy(client: httpx.AsyncClient) -> None:
    """The documented layouts: sample z = T * eps[n, L]; encode z[b, s] = mu[b] + sigma[b] * eps[b, s]."""
    sampled = await post(client, "sample", {"n": 5, "seed": 11, "temperature": 0.7})
    np.testing.assert_array_equal(f32(sampled["z"]), np.float32(0.7) * eps_for(11, (5, LATENT)))

    encoded = await post(client, "encode", {"inputs": image_batch(3).tolist(), "samples": 4, "seed": 12})
    mu, sigma = f32(encoded["mu"]), f32(encoded["sigma"])
    np.testing.assert_array_equal(f32(encoded["sigma"]), np.exp(f32(encoded["logvar"]) * np.float32(0.5)))
    expected_z = mu[:, None, :] + sigma[:, None, :] * eps_for(12, (3, 4, LATENT))
    np.testing.assert_array_equal(f32(encoded["z"]), expected_z)

    recon = await post(
        client, "reconstruct", {"inputs": image_batch(2).tolist(), "mode": "sample", "seed": 13}
    )
    enc = await post(client, "encode", {"inputs": image_batch(2).tolist()})
    expected = f32(enc["mu"]) + f32(enc["sigma"]) * eps_for(13, (2, LATENT))
    np.testing.assert_array_equal(f32(recon["z"]), expected)


async def test_encode_z_has_mean_mu_and_std_sigma(client: httpx.AsyncClient) -> None:
    samples = 2000
    body = await post(client, "encode", {"inputs": image_batch(1).tolist(), "samples": samples, "seed": 5})
    mu, sigma, z = f32(body["mu"])[0], f32(body["sigma"])[0], f32(body["z"])[0]
    assert z.shape == (samples, LATENT)
    # 6 standard errors: the mean's is sigma / sqrt(S), the standard deviation's about sigma / sqrt(2 S).
    assert np.all(np.abs(z.mean(axis=0) - mu) < 6 * sigma / math.sqrt(samples))
    assert np.all(np.abs(z.std(axis=0, ddof=1) - sigma) < 6 * sigma / math.sqrt(2 * samples))


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
async def test_sample_z_follows_scaled_standard_normal(client: httpx.AsyncClient, temperature: float) -> None:
    n = 2000
    z = f32((await post(client, "sample", {"n": n, "seed": 21, "temperature": temperature}))["z"])
    assert z.shape == (n, LATENT)
    assert np.all(np.abs(z.mean(axis=0)) < 6 * temperature / math.sqrt(n))
    assert np.all(np.abs(z.std(axis=0, ddof=1) - temperature) < 6 * temperature / math.sqrt(2 * n))
    # Dimensions are independent: off-diagonal correlations within 6 / sqrt(n).
    corr = np.corrcoef(z, rowvar=False)
    assert np.all(np.abs(corr[~np.eye(LATENT, dtype=bool)]) < 6 / math.sqrt(n))


async def test_decode_of_sampled_z_equals_the_sample(client: httpx.AsyncClient) -> None:
    sampled = await post(client, "sample", {"n": 4, "seed": 3})
    decoded = await post(client, "decode", {"z": sampled["z"]})
    np.testing.assert_allclose(f32(decoded["samples"]), f32(sampled["samples"]), rtol=0, atol=1e-5)


async def test_reconstruct_mean_equals_decode_of_mu(client: httpx.AsyncClient) -> None:
    images = image_batch(3)
    recon = await post(client, "reconstruct", {"inputs": images.tolist(), "mode": "mean"})
    encoded = await post(client, "encode", {"inputs": images.tolist()})
    np.testing.assert_array_equal(f32(recon["z"]), f32(encoded["mu"]))
    decoded = await post(client, "decode", {"z": encoded["mu"]})
    np.testing.assert_allclose(f32(recon["reconstructions"]), f32(decoded["samples"]), rtol=0, atol=1e-5)
    mse = ((f32(recon["reconstructions"]) - images) ** 2).reshape(3, -1).mean(axis=1)
    np.testing.assert_allclose(f32(recon["error"]), mse, rtol=1e-5)


async def test_reconstruct_mean_draws_no_seed_and_reports_none(
    client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Mode mean decodes mu: no eps, so no seed is drawn, returned or sent as X-Seed."""

    def no_draw() -> int:
        raise AssertionError("mode mean drew a seed")

    monkeypatch.setattr(operations, "draw_seed", no_draw)
    payload = {"inputs": image_batch(2).tolist(), "mode": "mean"}
    plain = await post(client, "reconstruct", payload)
    assert "seed" not in plain
    seeded = await post(client, "reconstruct", {**payload, "seed": 5})  # accepted, and changes nothing
    assert seeded == plain
    for accept in ("application/x-npy", "image/png"):
        response = await client.post(f"{URL}/reconstruct", json=payload, headers={"Accept": accept})
        assert response.status_code == 200, response.text
        assert "x-seed" not in response.headers

    sampled = await post(client, "reconstruct", {**payload, "mode": "sample", "seed": 5})
    assert sampled["seed"] == 5


def _merged_requests(metrics_text: str) -> float:
    """Requests merged per decoder run, summed, minus the runs: above 0 once any run merged two requests."""
    totals = {}
    for kind in ("sum", "count"):
        pattern = rf'vae_batch_requests_{kind}{{graph="decoder",model="tiny",version="10"}} (\S+)'
        match = re.search(pattern, metrics_text)
        assert match is not None, pattern
        totals[kind] = float(match[1])
    return totals["sum"] - totals["count"]


async def test_results_do_not_depend_on_batch_mates(model_dir: Path) -> None:
    """The same seeded requests alone (batching off) and amid concurrent traffic (batching on, a long window)."""
    probe_sample = {"n": 3, "seed": 99, "temperature": 0.8}
    probe_encode = {"inputs": image_batch(2, seed=4).tolist(), "samples": 3, "seed": 98}
    async with serve(model_dir, batch_window_ms=0) as alone:
        sample_alone = await post(alone, "sample", probe_sample)
        encode_alone = await post(alone, "encode", probe_encode)

    async with serve(model_dir, batch_window_ms=100, max_batch_rows=256) as busy:
        others = [post(busy, "sample", {"n": k, "seed": 1000 + k}) for k in (1, 5, 17, 2)]
        others += [
            post(busy, "encode", {"inputs": image_batch(k, seed=k).tolist(), "seed": k}) for k in (1, 6)
        ]
        results = await asyncio.gather(
            post(busy, "sample", probe_sample), post(busy, "encode", probe_encode), *others
        )
        sample_busy, encode_busy = results[0], results[1]
        assert _merged_requests((await busy.get("/metrics")).text) > 0, (
            "no run merged requests: the test proves nothing"
        )

    np.testing.assert_array_equal(f32(sample_busy["z"]), f32(sample_alone["z"]))
    np.testing.assert_allclose(f32(sample_busy["samples"]), f32(sample_alone["samples"]), rtol=0, atol=1e-5)
    np.testing.assert_allclose(f32(encode_busy["mu"]), f32(encode_alone["mu"]), rtol=0, atol=1e-5)
    np.testing.assert_allclose(f32(encode_busy["z"]), f32(encode_alone["z"]), rtol=0, atol=1e-5)
    # The eps behind z is bit-identical: z is exactly mu + sigma * eps(seed) in both cases.
    for body in (encode_alone, encode_busy):
        expected = f32(body["mu"])[:, None, :] + f32(body["sigma"])[:, None, :] * eps_for(98, (2, 3, LATENT))
        np.testing.assert_array_equal(f32(body["z"]), expected)
