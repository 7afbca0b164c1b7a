"""Serving benchmark (issue 5): the service under wrk beside its peers, its ceiling and its floor, in one run.

    .venv/bin/python -m bench.serve_bench                     # full run, about 17 minutes
    .venv/bin/python -m bench.serve_bench --duration 3 --concurrency 1,64   # a quick look

Run from the repository root. It measures, on one server core and one onnxruntime thread:

- ceiling   the same ONNX graphs in-process (`InferenceSession.run` in a loop, the service's session
            options): decoder at batch 1 and 256, encoder at batch 64;
- service   `python -m service` with batching on (the default BATCH_WINDOW_MS, or --window-ms);
- service, batching off   the same with BATCH_WINDOW_MS=0;
- naive     `bench/peer_naive.py`: FastAPI returning a dict, one `session.run` per request;
- no-op     `bench/peer_noop.py`: a FastAPI endpoint that does nothing (the HTTP floor).

Each server runs alone, pinned with `taskset` to --server-cpu, with uvicorn's access log off and glibc's
MALLOC_MMAP_THRESHOLD_ as --mmap-threshold says; wrk (one thread) is pinned to --client-cpu and sweeps the
connection counts for each request: `sample` n=1, `sample` n=256 as JSON (float32, and `"dtype": "uint8"`)
and as .npy (`Accept: application/x-npy`), and `encode` of 64 Fashion-MNIST test images as JSON. Per point it reports
requests/s, samples/s, p50, p99, errors (socket errors, timeouts and HTTP statuses >= 400), the server's
CPU use (/proc/PID/stat, all its processes) and, for the service, the mean number of requests merged per
onnxruntime run (the change in `/metrics`' batch histograms over the point). RSS is read after warm-up
and after the sweep.

Then the goals that are ratios of two rates (service / no-op floor, batching on / off, service / in-process
decoder) are measured side by side: both contenders up at once on the server core, taking turns for
--rounds rounds of --round-seconds each, the ratio being the median of the rounds' ratios. This machine's
speed drifts by 10-20% over minutes, so a ratio of two sweep points taken minutes apart would mostly
measure the drift. The markdown report (sweep table, side-by-side table, memory) is printed and written
to --out, followed by the goals of issue 5 as PASS/FAIL lines.

The model is the newest version of the first (or --model) name under --model-dir (default `models`);
if there is none, a stand-in with the same shapes (`bench/serve_standin.py`) is written to a temp dir.
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import os
import platform
import re
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from bench.serve_load import (
    Load,
    Paired,
    Rate,
    Server,
    alternate,
    cpu_seconds,
    free_port,
    http,
    rss_bytes,
    run_wrk,
    wait_idle,
)
from bench.serve_standin import write_standin
from service.manifest import DECODER_INPUT, ENCODER_INPUT, MANIFEST_NAME, Manifest, read_manifest

MMAP_THRESHOLD = 0
"""MALLOC_MMAP_THRESHOLD_ for the servers; 0 leaves glibc's adaptive threshold. Any fixed value also fixes the
trim threshold at 128 KiB, and then every 256-image response pays fresh page faults: in-process, sample n=256
cost 12.1 ms of CPU as JSON and 5.7 ms as .npy with 262144 (or 1048576), against 9.9 and 4.8 ms adaptive.
Pass --mmap-threshold 262144 to trade that CPU for flatter RSS."""
FASHION_TEST_IMAGES = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")
NPY = "application/x-npy"


@dataclass(frozen=True)
class Scenario:
    key: str
    label: str
    endpoint: str  # the path after /v1/models/{model}/
    body: bytes
    accept: str | None
    rows: int  # samples (sample) or images (encode) per request
    graph: str  # the graph it runs, for the ceiling
    batch: int  # the batch that graph sees in-process, for the ceiling


@dataclass(frozen=True)
class ServerSpec:
    key: str
    label: str
    scenarios: tuple[str, ...]


SERVERS = {
    "service": ServerSpec(
        "service",
        "service, batching on",
        ("sample1", "sample256-json", "sample256-u8", "sample256-npy", "encode64"),
    ),
    "service-nobatch": ServerSpec(
        "service-nobatch",
        "service, batching off",
        ("sample1", "sample256-json", "sample256-u8", "sample256-npy", "encode64"),
    ),
    "naive": ServerSpec("naive", "naive peer", ("sample1", "sample256-json", "encode64")),
    "noop": ServerSpec("noop", "no-op floor", ("noop",)),
}


@dataclass
class Point:
    scenario: Scenario
    connections: int
    load: Load
    cpu_s: float  # CPU time the server's processes used during the point
    merged: float | None  # mean requests per onnxruntime run over this point (service only)
    response_bytes: int

    @property
    def samples_per_s(self) -> float:
        return self.load.rps * self.scenario.rows

    @property
    def cpu_percent(self) -> float:
        return 100 * self.cpu_s / self.load.seconds if self.load.seconds else 0.0

    @property
    def per_cpu_second(self) -> float:
        """Successful requests per second of server CPU: req/s with a core to itself, whatever else runs."""
        return self.load.rps * self.load.seconds / self.cpu_s if self.cpu_s else 0.0


@dataclass
class ServerRun:
    spec: ServerSpec
    points: list[Point] = field(default_factory=list)
    rss_warm: int = 0
    rss_end: int = 0
    error: str | None = None

    def point(self, scenario: str, connections: int) -> Point | None:
        return next(
            (p for p in self.points if p.scenario.key == scenario and p.connections == connections), None
        )


# --- model, bodies, ceiling ---------------------------------------------------------------------------


def find_model(model_root: Path, name: str | None) -> Path | None:
    """The newest version directory of `name` (or of the first name) under MODEL_DIR, if any."""
    names = sorted(p for p in model_root.glob("*") if p.is_dir() and (name is None or p.name == name))
    for name_dir in names:
        versions = [p for p in name_dir.iterdir() if (p / MANIFEST_NAME).is_file()]
        if versions:
            return max(
                versions, key=lambda p: (p.name.isdecimal(), int(p.name) if p.name.isdecimal() else 0, p.name)
            )
    return None


def fashion_test_images(count: int, size: int) -> np.ndarray:
    """`count` Fashion-MNIST test images as [count, size] floats in [0, 1] (random if the set is absent)."""
    if FASHION_TEST_IMAGES.is_file():
        with gzip.open(FASHION_TEST_IMAGES) as f:
            raw = np.frombuffer(f.read(), np.uint8, offset=16)  # IDX header: magic, count, rows, cols
        if raw.size >= count * size:
            return raw[: count * size].reshape(count, size) / 255.0
    return np.random.default_rng(0).random((count, size))


def scenarios(manifest: Manifest) -> dict[str, Scenario]:
    images = fashion_test_images(64, manifest.input_size).round(4).tolist()
    sample1 = json.dumps({"n": 1, "seed": 1}).encode()
    sample256 = json.dumps({"n": 256, "seed": 1}).encode()
    sample256_u8 = json.dumps({"n": 256, "seed": 1, "dtype": "uint8"}).encode()
    return {
        "sample1": Scenario("sample1", "sample n=1", "sample", sample1, None, 1, "decoder", 1),
        "sample256-json": Scenario(
            "sample256-json", "sample n=256 JSON", "sample", sample256, None, 256, "decoder", 256
        ),
        "sample256-u8": Scenario(
            "sample256-u8", "sample n=256 JSON uint8", "sample", sample256_u8, None, 256, "decoder", 256
        ),
        "sample256-npy": Scenario(
            "sample256-npy", "sample n=256 .npy", "sample", sample256, NPY, 256, "decoder", 256
        ),
        "encode64": Scenario(
            "encode64",
            "encode 64 JSON",
            "encode",
            json.dumps({"inputs": images}).encode(),
            None,
            64,
            "encoder",
            64,
        ),
        "noop": Scenario("noop", "no-op (sample n=1 body)", "sample", sample1, None, 1, "decoder", 1),
    }


@contextmanager
def pinned_to(cpu: int | None) -> Iterator[None]:
    if cpu is None:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


class Ceiling:
    """The same ONNX graphs run in a loop in this process, on the server's core, one onnxruntime thread."""

    def __init__(self, version_dir: Path, manifest: Manifest, graphs: set[str], cpu: int | None) -> None:
        import onnxruntime as ort

        from service.runtime import session_options

        self.cpu = cpu
        self.inputs = {
            "decoder": (DECODER_INPUT, (manifest.latent_dim,)),
            "encoder": (ENCODER_INPUT, manifest.input_shape),
        }
        files = {"decoder": manifest.files.decoder.path, "encoder": manifest.files.encoder.path}
        with pinned_to(cpu):
            self.sessions = {
                graph: ort.InferenceSession(
                    str(version_dir / files[graph]), session_options(1, 1), providers=["CPUExecutionProvider"]
                )
                for graph in graphs
            }

    def rate(self, graph: str, batch: int, seconds: float) -> float:
        """Rows/s of `graph` at `batch` rows per run, over about `seconds`."""
        name, dims = self.inputs[graph]
        feed = {name: np.random.default_rng(0).random((batch, *dims), dtype=np.float32)}
        session = self.sessions[graph]
        with pinned_to(self.cpu):
            for _ in range(10):
                session.run(None, feed)
            runs, began = 0, time.perf_counter()
            while (elapsed := time.perf_counter() - began) < seconds:
                session.run(None, feed)
                runs += 1
        return runs * batch / elapsed


# --- one server -----------------------------------------------------------------------------------------


def check_response(scenario: Scenario, data: bytes) -> None:
    """Fail early, with the body in the message, if a server answers something other than what is measured."""
    if scenario.key == "noop":
        return
    try:
        if scenario.accept == NPY:
            rows = len(np.load(io.BytesIO(data), allow_pickle=False))
        else:
            body = json.loads(data)
            rows = len(body["samples"] if scenario.endpoint == "sample" else body["mu"])
    except (ValueError, KeyError, TypeError) as error:
        raise RuntimeError(f"{scenario.label}: unexpected response ({error!r}): {data[:200]!r}") from error
    if rows != scenario.rows:
        raise RuntimeError(f"{scenario.label}: expected {scenario.rows} rows, got {rows}")


_BATCH_LINE = re.compile(r"^(\w*batch\w*request\w*)_(sum|count)(\{[^}]*\})?\s+(\S+)$", re.MULTILINE)


def merged_totals(metrics_text: str) -> tuple[float, float]:
    """(sum, count) over every label set of the service's requests-merged-per-run histogram(s)."""
    totals = {"sum": 0.0, "count": 0.0}
    for match in _BATCH_LINE.finditer(metrics_text):
        totals[match[2]] += float(match[4])
    return totals["sum"], totals["count"]


def launch(
    spec: ServerSpec, port: int, args: argparse.Namespace, model_root: Path, version_dir: Path, scratch: Path
) -> tuple[list[str], dict[str, str]]:
    """The command line and environment that start `spec` on `port`, all with the same server settings."""
    env = dict(os.environ) | {
        "INTRA_OP_THREADS": str(args.intra_op_threads),
        "INTER_OP_THREADS": str(args.inter_op_threads),
    }
    if args.mmap_threshold:  # glibc reads it at process start only, hence the environment
        env["MALLOC_MMAP_THRESHOLD_"] = str(args.mmap_threshold)
    if spec.key.startswith("service"):
        env |= {
            "MODEL_DIR": str(model_root),
            "HOST": "127.0.0.1",
            "PORT": str(port),
            "WORKERS": str(args.workers),
            "LOG_LEVEL": "warning",
            "ACCESS_LOG": "false",
        }
        if args.workers > 1:  # one /metrics for all workers (see service/metrics.py)
            metrics_dir = scratch / f"prometheus-{spec.key}"
            metrics_dir.mkdir()
            env["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
        if spec.key == "service-nobatch":
            env["BATCH_WINDOW_MS"] = "0"
        elif args.window_ms is not None:
            env["BATCH_WINDOW_MS"] = str(args.window_ms)
        env |= dict(item.split("=", 1) for item in args.env)
        return [sys.executable, "-m", "service"], env
    env["PEER_MODEL"] = str(version_dir)
    app = {"naive": "bench.peer_naive:app", "noop": "bench.peer_noop:app"}[spec.key]
    command = [
        sys.executable,
        "-m",
        "uvicorn",
        app,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        str(args.workers),
        "--log-level",
        "warning",
        "--no-access-log",
    ]
    return command, env


def sweep_server(
    spec: ServerSpec,
    command: list[str],
    env: dict[str, str],
    base: str,
    chosen: list[Scenario],
    model: str,
    args: argparse.Namespace,
    log_path: Path,
) -> ServerRun:
    """Start one server; check each request's answer and warm it up at the sweep's highest connection count
    (so RSS after warm-up is the steady state, and growth after the sweep means a leak); sweep; stop."""
    run = ServerRun(spec)
    server = Server(command, env, args.server_cpu, log_path)
    metrics_url = f"{base}/metrics" if spec.key.startswith("service") else None
    sizes: dict[str, int] = {}
    try:
        server.wait_ready(f"{base}/readyz")
        for scenario in chosen:
            url = f"{base}/v1/models/{model}/{scenario.endpoint}"
            headers = {"Content-Type": "application/json"} | (
                {"Accept": scenario.accept} if scenario.accept else {}
            )
            data = http("POST", url, scenario.body, headers)
            check_response(scenario, data)
            sizes[scenario.key] = len(data)
            wrk_for(url, scenario, max(args.concurrency), args.warmup, args)
            wait_idle(server.pid)
        run.rss_warm = rss_bytes(server.pid)
        for scenario in chosen:
            url = f"{base}/v1/models/{model}/{scenario.endpoint}"
            for connections in args.concurrency:
                merged_before = (
                    merged_totals(http("GET", metrics_url).decode()) if metrics_url else (0.0, 0.0)
                )
                cpu_before = cpu_seconds(server.pid)
                load = wrk_for(url, scenario, connections, args.duration, args)
                cpu_s = cpu_seconds(server.pid) - cpu_before
                merged = None
                if metrics_url:
                    merged_after = merged_totals(http("GET", metrics_url).decode())
                    runs = merged_after[1] - merged_before[1]
                    merged = (merged_after[0] - merged_before[0]) / runs if runs else None
                run.points.append(Point(scenario, connections, load, cpu_s, merged, sizes[scenario.key]))
                print(
                    f"  {spec.label:22} {scenario.label:24} c={connections:<3} {load.rps:9.0f} req/s  "
                    f"p50 {load.p50_ms:8.2f} ms  p99 {load.p99_ms:8.2f} ms  "
                    f"errors {load.http_errors} HTTP, {load.socket_errors} socket",
                    flush=True,
                )
                wait_idle(server.pid)
        run.rss_end = rss_bytes(server.pid)
    except (RuntimeError, OSError) as error:
        run.error = str(error).strip().splitlines()[0]
        print(f"  {spec.label}: {error}", file=sys.stderr, flush=True)
    finally:
        server.stop()
    return run


def wrk_for(url: str, scenario: Scenario, connections: int, seconds: float, args: argparse.Namespace) -> Load:
    return run_wrk(
        url,
        scenario.body,
        accept=scenario.accept,
        connections=connections,
        seconds=seconds,
        cpu=args.client_cpu,
        timeout_s=max(10.0, seconds),
    )


# --- side by side ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PairGoal:
    """One of issue 5's ratio goals, measured in alternation (`serve_load.alternate`)."""

    text: str  # "what, conditions: A / B (unit)"
    goal: float | None  # the least ratio A / B the goal accepts; None: no goal, measured to inform one
    result: Paired
    errors: int  # HTTP and socket errors over both contenders' rounds


def side_by_side(
    args: argparse.Namespace,
    model_root: Path,
    version_dir: Path,
    scratch: Path,
    model: str,
    all_scenarios: dict[str, Scenario],
    runs: dict[str, ServerRun],
    ceilings: Ceiling,
) -> list[PairGoal]:
    """The goals that compare two rates, with the servers up at once (idle but for the one under load)."""
    keys = [key for key in ("service", "service-nobatch", "noop") if key in args.servers]
    servers: dict[str, Server] = {}
    bases: dict[str, str] = {}
    pairs: list[PairGoal] = []
    errors = 0
    try:
        for key in keys:
            port = free_port()
            command, env = launch(SERVERS[key], port, args, model_root, version_dir, scratch)
            servers[key] = Server(command, env, args.server_cpu, scratch / f"{key}-side-by-side.log")
            bases[key] = f"http://127.0.0.1:{port}"
        for key, server in servers.items():
            server.wait_ready(f"{bases[key]}/readyz")

        def load(key: str, scenario_key: str, connections: int, *, samples: bool = False) -> Rate:
            """wrk's rate for one request at one connection count: requests/s, or samples/s."""
            scenario = all_scenarios[scenario_key]
            url = f"{bases[key]}/v1/models/{model}/{scenario.endpoint}"

            def rate(seconds: float) -> float:
                nonlocal errors
                measured = wrk_for(url, scenario, connections, seconds, args)
                errors += measured.errors
                wait_idle(servers[key].pid)
                return measured.rps * scenario.rows if samples else measured.rps

            rate(args.warmup)  # a fresh process: warm up what this rate will run
            return rate

        def pair(text: str, goal: float | None, a: Rate, b: Rate) -> None:
            errors_before = errors
            result = alternate(a, b, rounds=args.rounds, seconds=args.round_seconds)
            pairs.append(PairGoal(text, goal, result, errors - errors_before))
            rounds = ", ".join(f"{a:,.0f}/{b:,.0f}" for a, b in zip(result.a, result.b, strict=True))
            print(f"  {text}: {result.ratio:.0%} ({result.spread()}: {rounds})", flush=True)

        if {"service", "noop"} <= servers.keys() and "sample1" in args.requests:
            pair(
                "sample n=1, c=64: batching on / no-op floor (req/s)",
                0.75,
                load("service", "sample1", 64),
                load("noop", "noop", 64),
            )
        if {"service", "service-nobatch"} <= servers.keys():
            for key in args.requests:
                label = all_scenarios[key].label
                pair(
                    f"{label}, c=1: batching on / off (req/s)",
                    0.95,
                    load("service", key, 1),
                    load("service-nobatch", key, 1),
                )
        if "service" in servers:
            # uint8 JSON has no goal of its own: it shows what the compact form does against the JSON one
            for key, goal in (("sample256-json", 0.35), ("sample256-u8", None), ("sample256-npy", 0.70)):
                points = (
                    [p for p in runs["service"].points if p.scenario.key == key] if "service" in runs else []
                )
                if key not in args.requests or not points:
                    continue
                best = max(points, key=lambda p: p.samples_per_s).connections
                pair(
                    f"{all_scenarios[key].label}, c={best} (the sweep's best): service / in-process decoder "
                    "at batch 256 (samples/s)",
                    goal,
                    load("service", key, best, samples=True),
                    lambda seconds: ceilings.rate("decoder", 256, seconds),
                )
    except (RuntimeError, OSError) as error:
        print(f"  side by side: {error}", file=sys.stderr, flush=True)
    finally:
        for server in servers.values():
            server.stop()
    return pairs


# --- report ---------------------------------------------------------------------------------------------


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|",
        *("| " + " | ".join(row) + " |" for row in rows),
    ]


def goals(runs: dict[str, ServerRun], pairs: list[PairGoal]) -> list[str]:
    """Issue 5's goals, one PASS/FAIL/SKIP line each: ratios of two rates from the side-by-side rounds,
    the rest from the sweep."""
    lines: list[str] = []

    def verdict(ok: bool | None, text: str, unmeasured: str = "SKIP") -> None:
        lines.append(f"{unmeasured if ok is None else 'PASS' if ok else 'FAIL'}  {text}")

    def at(server: str, scenario: str, connections: int) -> Point | None:
        run = runs.get(server)
        return run.point(scenario, connections) if run else None

    on, naive = at("service", "sample1", 64), at("naive", "sample1", 64)
    if on and naive:
        ratio = on.load.rps / naive.load.rps if naive.load.rps else float("inf")
        verdict(
            ratio >= 3,
            f"sample n=1, c=64: {on.load.rps:,.0f} req/s = {ratio:.2f}x the naive peer's (goal >= 3x)",
        )
    else:
        verdict(None, "sample n=1, c=64 vs the naive peer: not measured")
    if on:
        ratio = on.load.p99_ms / on.load.p50_ms if on.load.p50_ms else float("inf")
        verdict(
            ratio <= 4,
            f"sample n=1, c=64: p99 {on.load.p99_ms:.2f} ms = {ratio:.1f}x p50 {on.load.p50_ms:.2f} ms "
            "(goal <= 4x)",
        )
        merged = on.merged
        verdict(
            None if merged is None else merged >= 4,
            f"sample n=1, c=64, batching on: {merged if merged is not None else float('nan'):.1f} "
            "requests merged per run (goal >= 4)",
        )
    for pair in pairs:
        verdict(
            None if pair.goal is None else pair.result.ratio >= pair.goal,
            f"{pair.text}: {pair.result.ratio:.0%}, median of {pair.result.spread()} "
            f"({'no goal' if pair.goal is None else f'goal >= {pair.goal:.0%}'})",
            unmeasured="INFO",
        )
    if pairs:
        side_errors = sum(pair.errors for pair in pairs)
        verdict(side_errors == 0, f"side by side: {side_errors} HTTP and socket errors (goal 0)")
    for key in ("service", "service-nobatch"):
        run = runs.get(key)
        if run is None:
            continue
        if run.error:
            verdict(False, f"{run.spec.label}: {run.error}")
            continue
        http_errors = sum(p.load.http_errors for p in run.points)
        socket_errors = sum(p.load.socket_errors for p in run.points)
        verdict(
            http_errors + socket_errors == 0,
            f"{run.spec.label}: {http_errors} HTTP errors and {socket_errors} socket errors over "
            f"{len(run.points)} points (goal 0)",
        )
        growth = run.rss_end / run.rss_warm - 1 if run.rss_warm else float("inf")
        verdict(
            growth <= 0.10,
            f"{run.spec.label}: RSS {run.rss_warm / 2**20:.0f} MB after warm-up, "
            f"{run.rss_end / 2**20:.0f} MB after the sweep ({growth:+.1%}; goal within 10%)",
        )
    return lines


def render(
    args: argparse.Namespace,
    model_note: str,
    ceiling: dict[tuple[str, int], float],
    runs: dict[str, ServerRun],
    pairs: list[PairGoal],
    goal_lines: list[str],
) -> str:
    import onnxruntime

    cpu_model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    out = [
        "# Serving benchmark",
        "",
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC; {cpu_model}, {os.cpu_count()} CPUs; "
        f"Python {platform.python_version()}, "
        f"onnxruntime {onnxruntime.__version__}.",
        f"Command: `{' '.join(['python -m bench.serve_bench', *sys.argv[1:]])}`",
        f"Model: {model_note}. Servers pinned to CPU {args.server_cpu}, "
        f"wrk (1 thread) to CPU {args.client_cpu}; WORKERS={args.workers}, "
        f"INTRA_OP_THREADS={args.intra_op_threads}, INTER_OP_THREADS={args.inter_op_threads}, "
        f"MALLOC_MMAP_THRESHOLD_={args.mmap_threshold or 'unset'}, "
        f"BATCH_WINDOW_MS={'service default' if args.window_ms is None else args.window_ms} (on) / 0 (off); "
        f"{args.duration:g} s per point, after {args.warmup:g} s of warm-up per request at "
        f"{max(args.concurrency)} connections.",
        "",
        "## In-process ceiling (same graphs, one onnxruntime thread, the service's session options)",
        "",
        *_table(
            ["graph", "batch", "samples/s"],
            [[g, str(b), f"{v:,.0f}"] for (g, b), v in sorted(ceiling.items())],
        ),
        "",
        "## Under load",
        "",
        "req/s and samples/s (images/s for encode) count successful responses only; p50/p99 cover "
        "every response, errors included; errors are HTTP statuses >= 400 / socket errors and timeouts; "
        "server CPU % is CPU time of the server's processes over the point's wall time (100 = one core); "
        "req/CPU-s is successful requests per second of server CPU time (compare these when other work "
        "shares the machine); "
        "merged/run is the mean number of requests per onnxruntime run over the point, from the "
        "service's /metrics.",
        "",
    ]
    rows = []
    for run in runs.values():
        for p in run.points:
            rows.append(
                [
                    run.spec.label,
                    p.scenario.label,
                    str(p.connections),
                    f"{p.load.rps:,.0f}",
                    f"{p.samples_per_s:,.0f}",
                    f"{p.load.p50_ms:.2f}" if p.load.responses else "-",
                    f"{p.load.p99_ms:.2f}" if p.load.responses else "-",
                    f"{p.load.http_errors}/{p.load.socket_errors}",
                    f"{p.cpu_percent:.0f}",
                    f"{p.per_cpu_second:,.0f}",
                    "" if p.merged is None else f"{p.merged:.1f}",
                    f"{p.response_bytes / 1024:,.1f}",
                ]
            )
    out += _table(
        [
            "server",
            "request",
            "conc",
            "req/s",
            "samples/s",
            "p50 ms",
            "p99 ms",
            "errors HTTP/socket",
            "server CPU %",
            "req/CPU-s",
            "merged/run",
            "response KiB",
        ],
        rows,
    )
    out += [
        "",
        "## Side by side",
        "",
        f"Ratio goals, measured in alternation: A, B, A, B, ... for {args.rounds} rounds of "
        f"{args.round_seconds:g} s, every server up at once on the same core; the ratio is the median of "
        "the rounds' A / B.",
        "",
    ]
    out += _table(
        ["comparison", "A (median)", "B (median)", "A / B", "range", "goal"],
        [
            [
                pair.text,
                f"{statistics.median(pair.result.a):,.0f}",
                f"{statistics.median(pair.result.b):,.0f}",
                f"{pair.result.ratio:.0%}",
                pair.result.range(),
                "-" if pair.goal is None else f">= {pair.goal:.0%}",
            ]
            for pair in pairs
        ],
    )
    out += ["", "## Memory", ""]
    out += _table(
        ["server", "RSS after warm-up MiB", "RSS after sweep MiB", "note"],
        [
            [run.spec.label, f"{run.rss_warm / 2**20:.0f}", f"{run.rss_end / 2**20:.0f}", run.error or ""]
            for run in runs.values()
        ],
    )
    out += ["", "## Goals (issue 5)", "", "```", *goal_lines, "```", ""]
    return "\n".join(out)


# --- command line ---------------------------------------------------------------------------------------


def _int_list(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def _choices(allowed: list[str]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        items = [v for v in text.split(",") if v]
        unknown = sorted(set(items) - set(allowed))
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown {unknown}; choose from {allowed}")
        return items

    return parse


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.serve_bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--model-dir", type=Path, default=Path("models"), help="MODEL_DIR (default: %(default)s)"
    )
    parser.add_argument("--model", help="model name under --model-dir (default: the first)")
    parser.add_argument(
        "--duration", type=float, default=5.0, help="seconds per point (default: %(default)s)"
    )
    parser.add_argument(
        "--warmup", type=float, default=2.0, help="seconds of load per request before the sweep"
    )
    parser.add_argument(
        "--rounds", type=int, default=9, help="rounds per side-by-side comparison (default: %(default)s)"
    )
    parser.add_argument(
        "--round-seconds",
        type=float,
        default=3.0,
        help="seconds per contender per round (default: %(default)s)",
    )
    parser.add_argument(
        "--concurrency", type=_int_list, default=[1, 8, 32, 64], help="wrk connections, e.g. 1,8,32,64"
    )
    parser.add_argument(
        "--servers",
        type=_choices(list(SERVERS)),
        default=list(SERVERS),
        help=f"which servers, comma-separated (default: all of {','.join(SERVERS)})",
    )
    requests = ["sample1", "sample256-json", "sample256-u8", "sample256-npy", "encode64"]
    parser.add_argument(
        "--requests",
        type=_choices(requests),
        default=requests,
        help=f"which requests, comma-separated (default: all of {','.join(requests)})",
    )
    parser.add_argument(
        "--server-cpu", type=int, default=0, help="core for the servers and the ceiling (default: 0)"
    )
    parser.add_argument("--client-cpu", type=int, default=1, help="core for wrk (default: 1)")
    parser.add_argument(
        "--workers", type=int, default=1, help="uvicorn workers for every server (default: 1)"
    )
    parser.add_argument(
        "--intra-op-threads", type=int, default=1, help="onnxruntime intra-op threads (default: 1)"
    )
    parser.add_argument(
        "--inter-op-threads", type=int, default=1, help="onnxruntime inter-op threads (default: 1)"
    )
    parser.add_argument(
        "--window-ms", type=float, help="BATCH_WINDOW_MS with batching on (default: the service's)"
    )
    parser.add_argument(
        "--mmap-threshold",
        type=int,
        default=MMAP_THRESHOLD,
        metavar="BYTES",
        help="MALLOC_MMAP_THRESHOLD_ for every server (default: %(default)s; 0: glibc's own adaptive one)",
    )
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra environment for the service, e.g. MAX_BATCH_ROWS=128 (repeatable)",
    )
    parser.add_argument(
        "--out", type=Path, default=Path("bench/results/serve_bench.md"), help="markdown report"
    )
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.round_seconds <= 0:
        parser.error("--rounds must be at least 1 and --round-seconds positive")
    if not all("=" in item for item in args.env):
        parser.error("--env takes KEY=VALUE")
    if shutil.which("wrk") is None:
        parser.error("wrk is not installed (Debian/Ubuntu: apt-get install wrk)")
    if shutil.which("taskset") is None:
        print("taskset not found: servers and wrk run unpinned", file=sys.stderr)
        args.server_cpu = args.client_cpu = None
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="serve_bench_") as tmp:
        scratch = Path(tmp)
        model_root = args.model_dir
        version_dir = find_model(model_root, args.model) if model_root.is_dir() else None
        if version_dir is None:
            model_root = scratch / "models"
            version_dir = write_standin(model_root)
            model_note = (
                f"no model under {args.model_dir}: stand-in MLP VAE (bench/serve_standin.py, random weights)"
            )
        else:
            model_note = f"{version_dir}"
        manifest = read_manifest(version_dir)
        model_note = f"{manifest.name}/{manifest.version} ({model_note}; {manifest.architecture})"
        print(f"model: {model_note}", flush=True)
        all_scenarios = scenarios(manifest)
        wanted = {
            key: [all_scenarios[k] for k in SERVERS[key].scenarios if k in args.requests or k == "noop"]
            for key in args.servers
        }
        batches = {(s.graph, s.batch) for chosen in wanted.values() for s in chosen}
        ceilings = Ceiling(version_dir, manifest, {graph for graph, _ in batches}, args.server_cpu)
        ceiling = {key: ceilings.rate(*key, min(args.duration, 5.0)) for key in sorted(batches)}
        for (graph, batch), value in sorted(ceiling.items()):
            print(f"  ceiling {graph} batch {batch}: {value:,.0f} samples/s", flush=True)
        runs = {}
        for key in args.servers:
            spec = SERVERS[key]
            port = free_port()
            command, env = launch(spec, port, args, model_root, version_dir, scratch)
            runs[key] = sweep_server(
                spec,
                command,
                env,
                f"http://127.0.0.1:{port}",
                wanted[key],
                manifest.name,
                args,
                scratch / f"{key}.log",
            )
        print("side by side", flush=True)
        pairs = side_by_side(
            args, model_root, version_dir, scratch, manifest.name, all_scenarios, runs, ceilings
        )
    goal_lines = goals(runs, pairs)
    report = render(args, model_note, ceiling, runs, pairs, goal_lines)
    print("\n" + report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
