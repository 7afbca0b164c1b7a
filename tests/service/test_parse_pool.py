"""Large JSON bodies are parsed in another process, with the same results and the same errors as inline."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import orjson
import pytest

from service.errors import InvalidInput
from service.parse_pool import ParsePool
from service.requests import Images, parse_body
from service.schemas import EncodeParams
from tests.service.conftest import INPUT_SHAPE, image_batch, serve

pytestmark = pytest.mark.anyio

SPEC = Images(INPUT_SHAPE, (0.0, 1.0), 256, 65536)


def test_service_errors_cross_a_process_boundary_intact() -> None:
    error = InvalidInput("expected a number", field="inputs.3.12", headers={"X-A": "b"})
    back = pickle.loads(pickle.dumps(error))
    assert (type(back), back.message, back.field, back.headers) == (
        InvalidInput,
        "expected a number",
        "inputs.3.12",
        {"X-A": "b"},
    )


async def test_the_pool_parses_in_another_process_like_inline() -> None:
    body = orjson.dumps({"inputs": image_batch(64).tolist(), "samples": 2}, option=orjson.OPT_SERIALIZE_NUMPY)
    pool = ParsePool(workers=1, offload_bytes=1024)
    await pool.start()
    try:
        assert await pool.run(os.getpid) != os.getpid()
        assert pool.offloads(len(body))
        params, array = await pool.run(parse_body, body, "application/json", {}, EncodeParams, SPEC)
        inline_params, inline_array = parse_body(body, "application/json", {}, EncodeParams, SPEC)
        assert params == inline_params
        assert array is not None and inline_array is not None
        np.testing.assert_array_equal(array, inline_array)
        bad = body.replace(b"0.0", b"7.0", 1)
        with pytest.raises(InvalidInput) as caught:
            await pool.run(parse_body, bad, "application/json", {}, EncodeParams, SPEC)
        assert caught.value.field is not None and caught.value.field.startswith("inputs.")
    finally:
        await pool.stop()


async def test_large_bodies_through_the_pool_answer_like_small_ones(model_dir: Path) -> None:
    images = image_batch(8).tolist()
    async with serve(model_dir) as inline, serve(model_dir, parse_workers=1, parse_offload_bytes=0) as pooled:
        for client in (inline, pooled):
            ok = await client.post("/v1/models/tiny/encode", json={"inputs": images, "seed": 3})
            assert ok.status_code == 200
            bad = await client.post("/v1/models/tiny/encode", json={"inputs": [[2.0] * 784]})
            assert bad.status_code == 422 and bad.json()["error"]["field"] == "inputs.0.0"
        answers = [
            (await c.post("/v1/models/tiny/encode", json={"inputs": images, "seed": 3})).json()
            for c in (inline, pooled)
        ]
        assert answers[0] == answers[1]
