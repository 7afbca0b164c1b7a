"""Prometheus metrics: requests, errors, samples and batches counted per model; unknown names mint no series."""

from __future__ import annotations

import httpx
import pytest

from tests.service.conftest import (
    NEWEST,
)

pytestmark = pytest.mark.anyio


async def test_metrics_count_requests_errors_samples_and_batches(client: httpx.AsyncClient) -> None:
    await client.post("/v1/models/tiny/sample", json={"n": 3})
    await client.post("/v1/models/tiny/sample", json={"n": 0})
    await client.post("/v1/models/no-such-model/sample", json={})
    response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    sample = 'endpoint="sample",model="tiny",protocol="v1"'
    assert f'vae_requests_total{{{sample},status="200"}} 1.0' in text
    assert f'vae_request_errors_total{{{sample},status="422"}} 1.0' in text
    unknown = 'endpoint="sample",model="<unknown>",protocol="v1"'
    assert f'vae_request_errors_total{{{unknown},status="404"}} 1.0' in text
    assert f"vae_request_duration_seconds_count{{{sample}}} 2.0" in text
    assert 'vae_samples_generated_total{endpoint="sample",model="tiny"} 3.0' in text
    assert f'vae_model_loaded{{model="tiny",version="{NEWEST}"}} 1.0' in text
    assert f'vae_batch_rows_sum{{graph="decoder",model="tiny",version="{NEWEST}"}} 3.0' in text
    assert "no-such-model" not in text  # unknown names do not mint series
