"""Serving benchmark (issue 5): the service under wrk beside its peers, its ceiling and its floor, in one run.

    .venv/bin/python -m bench.serve_bench                     # full run, about 17 minutes
    .venv/bin/python -m bench.serve_bench --duration 3 --concurrency 1,64   # a quick look

Run from the repository root. It measures, on one server core and (by default) one onnxruntime thread:

- ceiling   the same ONNX graphs in-process (`InferenceSession.run` in a loop, the service's session
            options and --intra-op-threads/--inter-op-threads): decoder at batch 1 and 256, encoder at
            batch 64;
- service   `python -m service` with batching on (the default BATCH_WINDOW_MS, or --window-ms);
- service, batching off   the same with BATCH_WINDOW_MS=0;
- naive     `bench/peer_naive.py`: FastAPI returning a dict, one `session.run` per request;
- no-op     `bench/peer_noop.py`: a FastAPI endpoint that does nothing (the HTTP floor).

Each server runs alone, pinned with `taskset` to --server-cpu, with uvicorn's access log off and glibc's
MALLOC_MMAP_THRESHOLD_ as --mmap-threshold says; wrk (one thread) is pinned to --client-cpu and sweeps the
connection counts for each request: `sample` n=1, `sample` n=256 as JSON (float32, and `"dtype": "uint8"`)
and as .npy (`Accept: application/x-npy`), and `encode` of 64 Fashion-MNIST test images as JSON. Per point it reports
requests/s, samples/s, p50, p99 (marked † where wrk's end-of-run cut makes them understate), errors
(socket errors, timeouts and HTTP statuses >= 400), the server's CPU use (/proc/PID/stat, all its
processes) and, for the service, the mean number of requests merged per onnxruntime run (the change in
`/metrics`' vae_batch_requests histogram over the point). RSS is read after warm-up and after the sweep.

Then the goals that are ratios of two rates (service / naive peer, service / no-op floor, batching on / off,
service / in-process decoder) are measured side by side: the servers up at once on the server core, the
two contenders taking turns (ABBA) for --rounds rounds of --round-seconds each, the ratio being the median
of the rounds' ratios. This machine's speed drifts by 10-20% over minutes, so a ratio of two sweep points
taken minutes apart would mostly measure the drift. The markdown report (sweep table, side-by-side table,
memory) is printed and written to --out, followed by every goal of issue 5 on one line: PASS, FAIL, INFO
(measured, no goal) or SKIP with the reason it was not measured.

Exit status: 1 when a phase hit an error (a server's sweep, or the side-by-side phase), else 0; a goal
that FAILs is a result, not an error.

The model is the newest version of the first (or --model) name under --model-dir (default `models`);
if there is none, a stand-in with the same shapes (`bench/standin.py`) is written to a temp dir.
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from prometheus_client.parser import text_string_to_metric_families

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
from service.manifest import DECODER_INPUT, ENCODER_INPUT, MANIFEST_NAME, Manifest, read_manifest

MMAP_THRESHOLD = 0
"""MALLOC_MMAP_THRESHOLD_ for the servers; 0 leaves glibc's adaptive threshold. Any fixed value also fixes the
trim threshold at 128 KiB, and then every 256-image response pays fresh page faults: `orjson.dumps` of 256
float32 images cost 9.2-9.8 ms of CPU with 1048576 against 7.1-7.5 ms adaptive (`python -m bench.serve_costs`
with and without the variable). Pass --mmap-threshold 1048576 to trade that CPU for flatter RSS."""
FASHION_TEST_IMAGES = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")
NPY = "application/x-npy"
REQUESTS = ("sample1", "sample256-json", "sample256-u8", "sample256-npy", "encode64")
"""The requests --requests chooses from (keys of `scenarios`, which also has the no-op floor's "noop")."""
BATCH_REQUESTS = "vae_batch_requests"
"""service/metrics.py's histogram of requests merged per onnxruntime run, one label set per graph."""
CEILING = "ceiling"
"""A `Side.server` that is no server: the in-process ceiling."""
TRUNCATED = (
    "† wrk drops the requests still in flight when a point ends, without counting them, so where latency "
    "nears the point's length (p99 at least half of it, or connections / req/s beyond it) the slowest "
    "requests go unrecorded and p50/p99 understate."
)


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
    "service": ServerSpec("service", "service, batching on", REQUESTS),
    "service-nobatch": ServerSpec("service-nobatch", "service, batching off", REQUESTS),
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

    @property
    def truncated(self) -> bool:
        """Whether wrk's end-of-run cut makes this point's percentiles understate (`Load.truncated`)."""
        return self.load.truncated(self.connections)


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


def scenarios(input_size: int) -> dict[str, Scenario]:
    """Every request of REQUESTS, and the no-op floor's, for a model of `input_size` values per image."""
    images = fashion_test_images(64, input_size).round(4).tolist()
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
    """The same ONNX graphs run in a loop in this process, on the server's core, with the servers' session
    options and onnxruntime thread counts. --mmap-threshold does not reach it: glibc reads
    MALLOC_MMAP_THRESHOLD_ at process start, and this process has started already."""

    def __init__(
        self,
        version_dir: Path,
        manifest: Manifest,
        graphs: set[str],
        cpu: int | None,
        intra_op_threads: int,
        inter_op_threads: int,
    ) -> None:
        import onnxruntime as ort

        from service.runtime import session_options

        self.cpu = cpu
        self.inputs = {
            "decoder": (DECODER_INPUT, (manifest.latent_dim,)),
            "encoder": (ENCODER_INPUT, manifest.input_shape),
        }
        files = {"decoder": manifest.files.decoder.path, "encoder": manifest.files.encoder.path}
        options = session_options(intra_op_threads, inter_op_threads)
        with pinned_to(cpu):
            self.sessions = {
                graph: ort.InferenceSession(
                    str(version_dir / files[graph]), options, providers=["CPUExecutionProvider"]
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


def merged_totals(metrics_text: str) -> tuple[float, float]:
    """(sum, count) of BATCH_REQUESTS over all its label sets (graphs, models) in a /metrics text."""
    totals = {f"{BATCH_REQUESTS}_sum": 0.0, f"{BATCH_REQUESTS}_count": 0.0}
    for family in text_string_to_metric_families(metrics_text):
        if family.name == BATCH_REQUESTS:
            for sample in family.samples:
                if sample.name in totals:
                    totals[sample.name] += sample.value
    return totals[f"{BATCH_REQUESTS}_sum"], totals[f"{BATCH_REQUESTS}_count"]


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
                point = Point(scenario, connections, load, cpu_s, merged, sizes[scenario.key])
                run.points.append(point)
                print(
                    f"  {spec.label:22} {scenario.label:24} c={connections:<3} {load.rps:9.0f} req/s  "
                    f"p50 {load.p50_ms:8.2f} ms  p99 {load.p99_ms:8.2f} ms"
                    f"{'†' if point.truncated else ' '} "
                    f"errors {load.http_errors} HTTP, {load.socket_errors} socket",
                    flush=True,
                )
                wait_idle(server.pid)
        run.rss_end = rss_bytes(server.pid)
    except (RuntimeError, OSError) as error:
        run.error = brief(error)
        print(f"  {spec.label}: {error}", file=sys.stderr, flush=True)
    finally:
        server.stop()
    return run


def brief(error: Exception) -> str:
    """An error's first line, for the report; the whole of it (a server's log tail, say) goes to stderr."""
    lines = str(error).strip().splitlines()
    return lines[0].rstrip(":") + (" (the rest on stderr)" if len(lines) > 1 else "")


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
class Side:
    """One contender of a comparison: wrk against a server, or the in-process ceiling."""

    server: str  # a SERVERS key, or CEILING (which runs the request's graph at the request's batch)
    request: str  # a `scenarios` key
    connections: int = 0  # wrk's connections (none for the ceiling)
    samples: bool = False  # the rate in samples/s rather than requests/s


@dataclass(frozen=True)
class PairGoal:
    """One of issue 5's ratio goals, measured in alternation (`serve_load.alternate`)."""

    text: str  # "what, conditions: A / B (unit)"
    goal: float | None  # the least ratio A / B the goal accepts; None: no goal, measured to inform one
    a: Side
    b: Side
    result: Paired | None = None
    errors: int = 0  # HTTP and socket errors over both contenders' rounds
    missing: str | None = None  # why there is no result

    def show(self, ratio: float) -> str:
        """A ratio the way its goal reads: "3.00x" against a goal of 1.5 or more, else a percentage."""
        return f"{ratio:.2f}x" if self.goal is not None and self.goal >= 1.5 else f"{ratio:.0%}"


def unmeasured(args: argparse.Namespace, server: str, request: str) -> str | None:
    """Why --servers and --requests leave `request` on `server` out of this run, if they do."""
    if server == CEILING:
        return None
    if server not in args.servers:
        return f"{server} not in --servers"
    if request in REQUESTS and request not in args.requests:
        return f"{request} not in --requests"
    if request not in SERVERS[server].scenarios:
        return f"{server} does not serve {request}"
    return None


def comparisons(
    args: argparse.Namespace, runs: dict[str, ServerRun], all_scenarios: dict[str, Scenario]
) -> list[PairGoal]:
    """Issue 5's ratio goals in the order they are measured, with `missing` set on those that this run's
    --servers, --requests or sweep leave out."""
    planned: list[PairGoal] = []

    def add(text: str, goal: float | None, a: Side, b: Side, missing: str | None = None) -> None:
        why = unmeasured(args, a.server, a.request) or unmeasured(args, b.server, b.request) or missing
        planned.append(PairGoal(text, goal, a, b, missing=why))

    add(
        "sample n=1, c=64: batching on / naive peer (req/s)",
        3.0,
        Side("service", "sample1", 64),
        Side("naive", "sample1", 64),
    )
    add(
        "sample n=1, c=64: batching on / no-op floor (req/s)",
        0.75,
        Side("service", "sample1", 64),
        Side("noop", "noop", 64),
    )
    for key in REQUESTS:
        add(
            f"{all_scenarios[key].label}, c=1: batching on / off (req/s)",
            0.95,
            Side("service", key, 1),
            Side("service-nobatch", key, 1),
        )
    # uint8 JSON has no goal of its own: it shows what the compact form does against the JSON one
    service = runs.get("service")
    for key, goal in (("sample256-json", 0.35), ("sample256-u8", None), ("sample256-npy", 0.70)):
        scenario = all_scenarios[key]
        points = [p for p in service.points if p.scenario.key == key] if service else []
        best = max(points, key=lambda p: p.samples_per_s).connections if points else 0
        where = f"c={best} (the sweep's best)" if best else "the sweep's best c"
        add(
            f"{scenario.label}, {where}: service / in-process {scenario.graph} at batch {scenario.batch} "
            "(samples/s)",
            goal,
            Side("service", key, best, samples=True),
            Side(CEILING, key, samples=True),
            None
            if points
            else "no sweep point" + (f": {service.error}" if service and service.error else ""),
        )
    return planned


def side_by_side(
    args: argparse.Namespace,
    model_root: Path,
    version_dir: Path,
    scratch: Path,
    model: str,
    all_scenarios: dict[str, Scenario],
    planned: list[PairGoal],
    ceilings: Ceiling,
) -> tuple[list[PairGoal], str | None]:
    """Measure the planned comparisons that can be, with their servers up at once (idle but for the one under
    load). Returns all of them, and the error that stopped the phase if one did: the comparisons it left
    unmeasured carry that error as `missing`."""
    pairs = list(planned)
    keys = [
        key for key in SERVERS if any(key in (p.a.server, p.b.server) for p in pairs if p.missing is None)
    ]
    servers: dict[str, Server] = {}
    bases: dict[str, str] = {}
    errors = 0
    phase_error = None
    try:
        for key in keys:
            port = free_port()
            command, env = launch(SERVERS[key], port, args, model_root, version_dir, scratch)
            servers[key] = Server(command, env, args.server_cpu, scratch / f"{key}-side-by-side.log")
            bases[key] = f"http://127.0.0.1:{port}"
        for key, server in servers.items():
            server.wait_ready(f"{bases[key]}/readyz")

        def rate(side: Side) -> Rate:
            """The measurement of one side, warmed up: requests/s or samples/s over about `seconds`."""
            scenario = all_scenarios[side.request]
            if side.server == CEILING:
                return lambda seconds: ceilings.rate(scenario.graph, scenario.batch, seconds)
            url = f"{bases[side.server]}/v1/models/{model}/{scenario.endpoint}"

            def measure(seconds: float) -> float:
                nonlocal errors
                measured = wrk_for(url, scenario, side.connections, seconds, args)
                errors += measured.errors
                wait_idle(servers[side.server].pid)
                return measured.rps * scenario.rows if side.samples else measured.rps

            measure(args.warmup)  # a fresh process: warm up what this rate will run
            return measure

        for i, pair in enumerate(pairs):
            if pair.missing is not None:
                continue
            a, b = rate(pair.a), rate(pair.b)
            errors_before = errors
            result = alternate(a, b, rounds=args.rounds, seconds=args.round_seconds)
            pairs[i] = replace(pair, result=result, errors=errors - errors_before)
            rounds = ", ".join(f"{a:,.0f}/{b:,.0f}" for a, b in zip(result.a, result.b, strict=True))
            print(
                f"  {pair.text}: {pair.show(result.ratio)} ({result.spread(pair.show)}: {rounds})", flush=True
            )
    except (RuntimeError, OSError) as error:
        phase_error = brief(error)
        print(f"  side by side: {error}", file=sys.stderr, flush=True)
        pairs = [
            replace(p, missing=f"not measured: {phase_error}")
            if p.result is None and p.missing is None
            else p
            for p in pairs
        ]
    finally:
        for server in servers.values():
            server.stop()
    return pairs, phase_error


# --- report ---------------------------------------------------------------------------------------------


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|",
        *("| " + " | ".join(row) + " |" for row in rows),
    ]


def no_point(
    args: argparse.Namespace, runs: dict[str, ServerRun], server: str, request: str, connections: int
) -> str:
    """Why the sweep has no point for `request` on `server` at `connections`."""
    if why := unmeasured(args, server, request):
        return why
    if connections not in args.concurrency:
        return f"c={connections} not in --concurrency"
    run = runs.get(server)
    return f"not measured: {run.error}" if run and run.error else "not measured"


def goals(args: argparse.Namespace, runs: dict[str, ServerRun], pairs: list[PairGoal]) -> list[str]:
    """Every goal of issue 5 on one line: PASS or FAIL, INFO (measured, no goal), or SKIP and why it was not
    measured. The ratios of two rates come from the side-by-side rounds, the rest from the sweep."""
    lines: list[str] = []

    def verdict(ok: bool | None, text: str) -> None:
        lines.append(f"{'INFO' if ok is None else 'PASS' if ok else 'FAIL'}  {text}")

    def skip(text: str, why: str) -> None:
        lines.append(f"SKIP  {text}: {why}")

    for pair in pairs:
        if pair.result is None:
            goal = "no goal" if pair.goal is None else f"goal >= {pair.show(pair.goal)}"
            skip(f"{pair.text} ({goal})", pair.missing or "not measured")
            continue
        verdict(
            None if pair.goal is None else pair.result.ratio >= pair.goal,
            f"{pair.text}: {pair.show(pair.result.ratio)}, median of {pair.result.spread(pair.show)} "
            f"({'no goal' if pair.goal is None else f'goal >= {pair.show(pair.goal)}'})",
        )
    measured = [pair for pair in pairs if pair.result is not None]
    if measured:
        side_errors = sum(pair.errors for pair in measured)
        verdict(side_errors == 0, f"side by side: {side_errors} HTTP and socket errors (goal 0)")
    else:
        skip("side by side: HTTP and socket errors (goal 0)", "no comparison measured")

    run = runs.get("service")
    on = run.point("sample1", 64) if run else None
    if on is None:
        why = no_point(args, runs, "service", "sample1", 64)
        skip("sample n=1, c=64: p99 / p50 (goal <= 4x)", why)
        skip("sample n=1, c=64, batching on: requests merged per run (goal >= 4)", why)
    else:
        ratio = on.load.p99_ms / on.load.p50_ms if on.load.p50_ms else float("inf")
        verdict(
            ratio <= 4,
            f"sample n=1, c=64: p99 {on.load.p99_ms:.2f} ms{'†' if on.truncated else ''} = {ratio:.1f}x "
            f"p50 {on.load.p50_ms:.2f} ms (goal <= 4x)",
        )
        if on.merged is None:
            skip(
                "sample n=1, c=64, batching on: requests merged per run (goal >= 4)",
                f"no {BATCH_REQUESTS} runs in /metrics over the point",
            )
        else:
            verdict(
                on.merged >= 4,
                f"sample n=1, c=64, batching on: {on.merged:.1f} requests merged per run (goal >= 4)",
            )
    for key in ("service", "service-nobatch"):
        label = SERVERS[key].label
        run = runs.get(key)
        if run is None or run.error:
            if run is None:
                skip(f"{label}: HTTP and socket errors over the sweep (goal 0)", f"{key} not in --servers")
            else:
                verdict(False, f"{label}: the sweep stopped: {run.error}")
            skip(
                f"{label}: RSS after the sweep (goal within 10% of after warm-up)",
                f"{key} not in --servers" if run is None else "the sweep did not finish",
            )
            continue
        http_errors = sum(p.load.http_errors for p in run.points)
        socket_errors = sum(p.load.socket_errors for p in run.points)
        verdict(
            http_errors + socket_errors == 0,
            f"{label}: {http_errors} HTTP errors and {socket_errors} socket errors over "
            f"{len(run.points)} points (goal 0)",
        )
        growth = run.rss_end / run.rss_warm - 1 if run.rss_warm else float("inf")
        verdict(
            growth <= 0.10,
            f"{label}: RSS {run.rss_warm / 2**20:.0f} MiB after warm-up, "
            f"{run.rss_end / 2**20:.0f} MiB after the sweep ({growth:+.1%}; goal within 10%)",
        )
    return lines


def sweep_table(runs: dict[str, ServerRun]) -> list[str]:
    """Every sweep point, p99 marked † where it understates (`Load.truncated`); the footnote if any is."""
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
                    (f"{p.load.p99_ms:.2f}" if p.load.responses else "-") + ("†" if p.truncated else ""),
                    f"{p.load.http_errors}/{p.load.socket_errors}",
                    f"{p.cpu_percent:.0f}",
                    f"{p.per_cpu_second:,.0f}",
                    "" if p.merged is None else f"{p.merged:.1f}",
                    f"{p.response_bytes / 1024:,.1f}",
                ]
            )
    table = _table(
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
    if any(p.truncated for run in runs.values() for p in run.points):
        table += ["", TRUNCATED]
    return table


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
        "## In-process ceiling (same graphs, the service's session options, "
        f"{args.intra_op_threads} intra-op / {args.inter_op_threads} inter-op onnxruntime threads)",
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
    out += sweep_table(runs)
    out += [
        "",
        "## Side by side",
        "",
        f"Ratio goals, measured in alternation, A then B in even rounds and B then A in odd ones (ABBA), for "
        f"{args.rounds} rounds of {args.round_seconds:g} s, every server up at once on the same core; the "
        "ratio is the median of the rounds' A / B. Comparisons not measured are listed as SKIP under Goals.",
        "",
    ]
    out += _table(
        ["comparison", "A (median)", "B (median)", "A / B", "range", "goal"],
        [
            [
                pair.text,
                f"{statistics.median(pair.result.a):,.0f}",
                f"{statistics.median(pair.result.b):,.0f}",
                pair.show(pair.result.ratio),
                pair.result.range(pair.show),
                "-" if pair.goal is None else f">= {pair.show(pair.goal)}",
            ]
            for pair in pairs
            if pair.result is not None
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
    parser.add_argument(
        "--requests",
        type=_choices(list(REQUESTS)),
        default=list(REQUESTS),
        help=f"which requests, comma-separated (default: all of {','.join(REQUESTS)})",
    )
    parser.add_argument(
        "--server-cpu", type=int, default=0, help="core for the servers and the ceiling (default: 0)"
    )
    parser.add_argument("--client-cpu", type=int, default=1, help="core for wrk (default: 1)")
    parser.add_argument(
        "--workers", type=int, default=1, help="uvicorn workers for every server (default: 1)"
    )
    parser.add_argument(
        "--intra-op-threads",
        type=int,
        default=1,
        help="onnxruntime intra-op threads, servers and ceiling (default: 1)",
    )
    parser.add_argument(
        "--inter-op-threads",
        type=int,
        default=1,
        help="onnxruntime inter-op threads, servers and ceiling (default: 1)",
    )
    parser.add_argument(
        "--window-ms", type=float, help="BATCH_WINDOW_MS with batching on (default: the service's)"
    )
    parser.add_argument(
        "--mmap-threshold",
        type=int,
        default=MMAP_THRESHOLD,
        metavar="BYTES",
        help="MALLOC_MMAP_THRESHOLD_ for every server, not the in-process ceiling (default: %(default)s; "
        "0: glibc's own adaptive one)",
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
            from bench.standin import write_model  # onnx takes most of a second to import

            model_root = scratch / "models"
            version_dir = write_model(model_root)
            model_note = (
                f"no model under {args.model_dir}: stand-in MLP VAE (bench/standin.py, random weights)"
            )
        else:
            model_note = f"{version_dir}"
        manifest = read_manifest(version_dir)
        model_note = f"{manifest.name}/{manifest.version} ({model_note}; {manifest.architecture})"
        print(f"model: {model_note}", flush=True)
        all_scenarios = scenarios(math.prod(manifest.input_shape))
        wanted = {
            key: [all_scenarios[k] for k in SERVERS[key].scenarios if k in args.requests or k == "noop"]
            for key in args.servers
        }
        batches = {(s.graph, s.batch) for chosen in wanted.values() for s in chosen}
        ceilings = Ceiling(
            version_dir,
            manifest,
            {graph for graph, _ in batches},
            args.server_cpu,
            args.intra_op_threads,
            args.inter_op_threads,
        )
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
        pairs, side_error = side_by_side(
            args,
            model_root,
            version_dir,
            scratch,
            manifest.name,
            all_scenarios,
            comparisons(args, runs, all_scenarios),
            ceilings,
        )
    goal_lines = goals(args, runs, pairs)
    report = render(args, model_note, ceiling, runs, pairs, goal_lines)
    print("\n" + report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)
    print(f"written to {args.out}")
    return 1 if side_error or any(run.error for run in runs.values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())
