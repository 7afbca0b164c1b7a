"""Does a flood of large JSON bodies stall the event loop? /healthz latency under 16 MiB encode bodies.

    .venv/bin/python -m bench.loop_stall                     # 20 s per setting, about a minute
    .venv/bin/python -m bench.loop_stall --seconds 5 --clients 4

For each setting of where large bodies are parsed (PARSE_WORKERS=1: a process; PARSE_WORKERS=0: a thread,
which holds the GIL like the event loop itself would), it starts `python -m service` on the shipped model,
lets --clients clients send ~16 MiB JSON encode bodies (256 images of long decimal numbers, just under
MAX_BODY_BYTES) in a loop for --seconds, and meanwhile probes /healthz every 50 ms from another process.
It prints the probes' p50, p99 and max latency per setting (the issue's goal: p99 under 100 ms with 8
clients for 20 s, the Docker HEALTHCHECK allowing 2 s) and the encode requests completed.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import httpx
import numpy as np

from bench.serve_load import Server, free_port

MODEL_DIR = Path("models")
BODY_BYTES = 16 * 1024 * 1024 - 4096


def big_body(images: int = 256, pixels: int = 784) -> bytes:
    """A JSON encode body just under 16 MiB: valid values in [0, 1] written with very long mantissas."""
    rng = np.random.default_rng(0)
    width = BODY_BYTES // (images * pixels) - 1  # characters per number, with its comma
    rows = []
    for _ in range(images):
        digits = rng.integers(0, 10, (pixels, width - 2))
        numbers = ["0." + "".join(map(str, row)) for row in digits]
        rows.append("[" + ",".join(numbers) + "]")
    return ('{"inputs":[' + ",".join(rows) + "]}").encode()


async def flood(url: str, body: bytes, stop: float, done: list[int]) -> None:
    headers = {"Content-Type": "application/json"}
    async with httpx.AsyncClient(timeout=120) as client:
        while time.monotonic() < stop:
            response = await client.post(
                f"{url}/v1/models/fashion-mnist-mlp/encode", content=body, headers=headers
            )
            response.raise_for_status()
            done.append(1)


def probe(port: int, seconds: float) -> list[float]:
    """/healthz every 50 ms on one keep-alive connection, from its own process: the flooding clients'
    work must not delay the probe's own measurement."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    latencies = []
    stop = time.monotonic() + seconds
    while time.monotonic() < stop:
        start = time.perf_counter()
        connection.request("GET", "/healthz")
        response = connection.getresponse()
        response.read()
        assert response.status == 200, response.status
        latencies.append(time.perf_counter() - start)
        time.sleep(0.05)
    return latencies


async def measure(port: int, body: bytes, clients: int, seconds: float) -> tuple[list[float], int]:
    url = f"http://127.0.0.1:{port}"
    stop = time.monotonic() + seconds
    done: list[int] = []
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        probed = asyncio.get_running_loop().run_in_executor(pool, probe, port, seconds)
        await asyncio.gather(*(flood(url, body, stop, done) for _ in range(clients)))
        return await probed, len(done)


def run(parse_workers: int, body: bytes, args: argparse.Namespace, scratch: Path) -> str:
    port = free_port()
    env = {**os.environ, "MODEL_DIR": str(MODEL_DIR), "PORT": str(port), "ACCESS_LOG": "false"}
    env["PARSE_WORKERS"] = str(parse_workers)
    server = Server([sys.executable, "-m", "service"], env, None, scratch / f"server-{parse_workers}.log")
    try:
        server.wait_ready(f"http://127.0.0.1:{port}/readyz")
        latencies, completed = asyncio.run(measure(port, body, args.clients, args.seconds))
    finally:
        server.stop()
    ms = sorted(1000 * s for s in latencies)
    p99 = ms[min(len(ms) - 1, int(0.99 * len(ms)))]
    where = "a process" if parse_workers else "a thread"
    return (
        f"| PARSE_WORKERS={parse_workers} ({where}) | {statistics.median(ms):.1f} | {p99:.1f} | {ms[-1]:.1f} "
        f"| {len(ms)} | {completed} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=20.0)
    args = parser.parse_args()
    body = big_body()
    print(f"body: {len(body) / 2**20:.1f} MiB, {args.clients} clients, {args.seconds:.0f} s per setting")
    print("| large bodies parsed in | /healthz p50 ms | p99 ms | max ms | probes | encodes done |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="loop_stall_") as tmp:
        for workers in (1, 0):
            print(run(workers, body, args, Path(tmp)), flush=True)


if __name__ == "__main__":
    main()
