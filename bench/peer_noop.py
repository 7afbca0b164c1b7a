"""The HTTP floor for the serving benchmark: FastAPI endpoints that do no work at all.

Same routes as the service's sample endpoint and readiness probe, served by the same uvicorn settings, so
`serve_bench` can tell what HTTP, uvicorn and FastAPI routing cost before any model or encoding:

    python -m uvicorn bench.peer_noop:app --host 127.0.0.1 --port 8002 --no-access-log
"""

from __future__ import annotations

from fastapi import FastAPI, Response

app = FastAPI(title="no-op peer")

_EMPTY = b"{}"


@app.post("/v1/models/{model}/sample")
async def sample(model: str) -> Response:
    """Answer at once: the body is neither parsed nor used."""
    return Response(_EMPTY, media_type="application/json")


@app.get("/readyz")
async def readyz() -> Response:
    return Response(_EMPTY, media_type="application/json")
