"""The naive peer for the serving benchmark: the same model served the way most FastAPI tutorials do it.

Plain `def` handlers (run in FastAPI's thread pool), a pydantic request body, one `InferenceSession.run`
per request, and a dict of nested lists returned for FastAPI to render (`jsonable_encoder`, then
`json.dumps`). Same graphs, same onnxruntime thread counts (INTRA_OP_THREADS, INTER_OP_THREADS; default 1)
and same uvicorn settings as the service, so the difference `serve_bench` reports is the serving path:

    PEER_MODEL=models/fashion-mnist-mlp/1 python -m uvicorn bench.peer_naive:app --port 8001 --no-access-log

PEER_MODEL is one version directory (graphs + model.json).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from fastapi import FastAPI
from pydantic import BaseModel, Field

from service.manifest import DECODER_INPUT, ENCODER_INPUT, read_manifest

_state: dict[str, Any] = {}


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    model_dir = Path(os.environ["PEER_MODEL"])
    manifest = read_manifest(model_dir)
    options = ort.SessionOptions()
    options.intra_op_num_threads = int(os.environ.get("INTRA_OP_THREADS", "1"))
    options.inter_op_num_threads = int(os.environ.get("INTER_OP_THREADS", "1"))
    _state["manifest"] = manifest
    _state["encoder"] = ort.InferenceSession(str(model_dir / manifest.files.encoder.path), options)
    _state["decoder"] = ort.InferenceSession(str(model_dir / manifest.files.decoder.path), options)
    yield
    _state.clear()


app = FastAPI(title="naive peer", lifespan=lifespan)


class SampleRequest(BaseModel):
    n: int = Field(1, ge=1, le=1024)
    seed: int | None = None


class EncodeRequest(BaseModel):
    inputs: list[list[float]]


@app.post("/v1/models/{model}/sample", response_model=None)
def sample(model: str, request: SampleRequest) -> dict[str, Any]:
    z = np.random.default_rng(request.seed).standard_normal(
        (request.n, _state["manifest"].latent_dim), np.float32
    )
    (images,) = _state["decoder"].run(None, {DECODER_INPUT: z})
    return {"samples": images.tolist(), "z": z.tolist(), "seed": request.seed}


@app.post("/v1/models/{model}/encode", response_model=None)
def encode(model: str, request: EncodeRequest) -> dict[str, Any]:
    x = np.asarray(request.inputs, dtype=np.float32).reshape(-1, *_state["manifest"].input_shape)
    mu, logvar = _state["encoder"].run(None, {ENCODER_INPUT: x})
    return {"mu": mu.tolist(), "logvar": logvar.tolist()}


@app.get("/readyz")
def readyz() -> dict[str, str]:
    return {"status": "ready"}
