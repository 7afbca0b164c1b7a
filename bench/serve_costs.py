"""Where a request's CPU goes, in-process on one core: the figures behind the README's "Where the time goes".

    .venv/bin/python -m bench.serve_costs            # about 20 s; prints one line per figure

No sockets and no load generator: each figure is CPU time (time.process_time) per unit of work in this
process, pinned to --cpu, on the model under --model-dir (default: the shipped one):

- a `sample n=1` request, 32 at a time (median of 5 turns), through the service (its short path for
  operations, `service.dispatch`), through the same service with the dispatch sending operations on into
  FastAPI's own stack and router (what the short path skips), through the operation's route alone, and
  through a FastAPI no-op endpoint (`bench/peer_noop.py`);
- the pieces of a small request: the JSON of one image, the decoder's share of a 32-row batch, seeding
  the request's generator;
- for 256 images: one decoder run, and `orjson.dumps` of the sample response as float32 and as uint8;
- a lone request's trip through the batcher, with a model that returns at once (batching on and off).

It is a benchmark, not a test: it prints figures and asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import uvloop
from starlette.types import Message, Receive, Scope, Send

from bench.peer_noop import app as noop_app
from bench.serve_scenarios import find_model
from service.app import create_app
from service.batching import Batcher
from service.dispatch import OperationDispatch, OperationRoute
from service.grid import as_uint8
from service.manifest import DECODER_INPUT, read_manifest
from service.operations import make_rng
from service.runtime import session_options
from service.settings import Settings

ASGI = Callable[[Scope, Receive, Send], Awaitable[None]]
BODY = b'{"n": 1, "seed": 1}'
ROUNDS = 5  # each request path measured this many times, in turns; the median is printed


def cpu_us(work: Callable[[], object], repeat: int) -> float:
    """CPU microseconds per call of `work`, after a warm-up."""
    for _ in range(max(1, repeat // 10)):
        work()
    began = time.process_time()
    for _ in range(repeat):
        work()
    return (time.process_time() - began) / repeat * 1e6


async def per_request_us(app: ASGI, path: str, concurrent: int = 32, rounds: int = 200) -> float:
    """CPU microseconds per POST of BODY to `path`, `concurrent` requests at a time."""
    scope: Scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(BODY)).encode())],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 2),
        "state": {},
    }

    async def receive() -> Message:
        return {"type": "http.request", "body": BODY, "more_body": False}

    async def send(message: Message) -> None:
        if message["type"] == "http.response.start" and message["status"] != 200:
            raise RuntimeError(f"{path}: status {message['status']}")

    async def batch() -> None:
        await asyncio.gather(*(app(dict(scope), receive, send) for _ in range(concurrent)))

    for _ in range(20):
        await batch()
    began = time.process_time()
    for _ in range(rounds):
        await batch()
    return (time.process_time() - began) / (rounds * concurrent) * 1e6


async def lone_request_us(window_ms: float, repeat: int = 5000) -> float:
    """CPU microseconds for one request at a time through a batcher whose model returns at once."""
    batcher = Batcher(
        lambda x: [x], name="costs", max_batch_rows=256, window_ms=window_ms, max_queue_rows=4096
    )
    await batcher.start()
    rows = np.zeros((1, 32), np.float32)
    for _ in range(200):
        await batcher.submit(rows)
    began = time.process_time()
    for _ in range(repeat):
        await batcher.submit(rows)
    await batcher.stop()
    return (time.process_time() - began) / repeat * 1e6


async def requests(model_dir: Path, name: str) -> list[tuple[str, float]]:
    settings = Settings(_env_file=None, model_dir=model_dir, intra_op_threads=1, device="cpu")
    app = create_app(settings)
    # The same service with the dispatch sending operations on into FastAPI's own stack and router.
    fastapi_app = create_app(settings)
    fastapi_app.middleware_stack = fastapi_app.build_middleware_stack()
    dispatch = fastapi_app.middleware_stack
    while not isinstance(dispatch, OperationDispatch):
        dispatch = dispatch.app  # type: ignore[attr-defined]
    dispatch.match = lambda scope: None  # type: ignore[method-assign]
    path = f"/v1/models/{name}/sample"
    route = next(
        r for r in app.router.routes if isinstance(r, OperationRoute) and r.path.endswith("}/sample")
    )

    async def route_alone(scope: Scope, receive: Receive, send: Send) -> None:
        scope["app"], scope["path_params"] = app, {"model": name}
        await route.app(scope, receive, send)

    paths: list[tuple[str, ASGI]] = [
        ("sample n=1 through the service (operations' short path)", app),
        ("sample n=1 through FastAPI's stack and router instead", fastapi_app),
        ("sample n=1 through its route alone", route_alone),
        ("no-op FastAPI endpoint", noop_app),
    ]
    async with app.router.lifespan_context(app), fastapi_app.router.lifespan_context(fastapi_app):
        seen: dict[str, list[float]] = {label: [] for label, _ in paths}
        for _ in range(ROUNDS):  # in turns, so that a drifting machine affects every path alike
            for label, target in paths:
                seen[label].append(await per_request_us(target, path))
        figures = [(label, statistics.median(values)) for label, values in seen.items()]
        return [
            *figures,
            ("lone request through the batcher, batching on", await lone_request_us(2.0)),
            ("lone request through the batcher, batching off", await lone_request_us(0.0)),
        ]


def pieces(version_dir: Path) -> list[tuple[str, float]]:
    import onnxruntime as ort

    manifest = read_manifest(version_dir)
    session = ort.InferenceSession(
        str(version_dir / manifest.files.decoder.path),
        session_options(1, 1),
        providers=["CPUExecutionProvider"],
    )
    z = np.random.default_rng(0).standard_normal((256, manifest.latent_dim), dtype=np.float32)
    images = session.run(None, {DECODER_INPUT: z})[0]
    pixels = as_uint8(images)
    option = orjson.OPT_SERIALIZE_NUMPY
    z32 = z[:32]
    return [
        (
            "orjson.dumps of the sample response, 1 float32 image",
            cpu_us(lambda: orjson.dumps({"samples": images[:1], "z": z[:1], "seed": 1}, option=option), 5000),
        ),
        (
            "decoder run, 32 images, per image",
            cpu_us(lambda: session.run(None, {DECODER_INPUT: z32}), 1000) / 32,
        ),
        ("a request's generator: Generator(PCG64(seed))", cpu_us(lambda: make_rng(12345), 20000)),
        ("decoder run, 256 images", cpu_us(lambda: session.run(None, {DECODER_INPUT: z}), 100)),
        (
            "orjson.dumps of the sample response, 256 float32 images",
            cpu_us(lambda: orjson.dumps({"samples": images, "z": z, "seed": 1}, option=option), 50),
        ),
        (
            "orjson.dumps of the sample response, 256 uint8 images",
            cpu_us(lambda: orjson.dumps({"samples": pixels, "z": z, "seed": 1}, option=option), 50),
        ),
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.serve_costs",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--model-dir", type=Path, default=Path("models"), help="MODEL_DIR (default: %(default)s)"
    )
    parser.add_argument("--cpu", type=int, default=0, help="core to pin this process to (default: 0)")
    args = parser.parse_args(argv)
    version_dir = find_model(args.model_dir, None)
    if version_dir is None:
        parser.error(f"no model under {args.model_dir}")
    os.sched_setaffinity(0, {args.cpu})
    figures: list[tuple[str, Any]] = uvloop.run(requests(args.model_dir, version_dir.parent.name))
    figures += pieces(version_dir)
    for label, us in figures:
        print(f"{label:60} {us:10,.1f} us CPU")


if __name__ == "__main__":
    main()
