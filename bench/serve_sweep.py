"""One server under the serving benchmark's sweep: how it is started, and what each point of its sweep reads.

`launch` gives every server the same settings; `sweep_server` checks and warms up each request, then runs
wrk at each connection count and records requests/s, latency, server CPU, merged requests and RSS.
`check_response` reads every kind of answer measured (v1 JSON and .npy, V2 JSON and binary tensor data)
far enough to count its rows, so a server that answers something else stops the sweep.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from bench.serve_load import Load, Server, cpu_seconds, exchange, http, rss_bytes, run_wrk, wait_idle
from bench.serve_scenarios import HEADER_LENGTH, NPY, Scenario, ServerSpec

BATCH_REQUESTS = "vae_batch_requests"
"""service/metrics.py's histogram of requests merged per onnxruntime run, one label set per graph."""
PEER_APPS = {"naive": "bench.peer_naive:app", "noop": "bench.peer_noop:app"}
ROWS_FIELD = {"sample": "samples", "encode": "mu"}
"""The JSON field (v1) or output (V2) whose rows `check_response` counts, by operation."""
ITEM_SIZES = {"BOOL": 1, "UINT8": 1, "INT8": 1, "UINT16": 2, "INT16": 2, "FP16": 2}
ITEM_SIZES |= {"UINT32": 4, "INT32": 4, "FP32": 4, "UINT64": 8, "INT64": 8, "FP64": 8}
"""Bytes per element of the V2 datatypes, for binary_data_size."""


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


def check_response(
    scenario: Scenario, data: bytes, headers: dict[str, str] | None = None, status: int = 200
) -> None:
    """Fail early, with the body in the message, if a server answers something other than what is measured:
    a status other than 200, or a body without `scenario.rows` rows. `headers` are the response's, names in
    lower case (V2 binary tensor data needs Inference-Header-Content-Length)."""
    if status != 200:
        raise RuntimeError(f"{scenario.label}: status {status}: {data[:200]!r}")
    if scenario.key == "noop":
        return
    try:
        if scenario.protocol == "v2":
            rows = v2_rows(scenario, data, headers or {})
        elif scenario.accept == NPY:
            rows = len(np.load(io.BytesIO(data), allow_pickle=False))
        else:
            rows = len(json.loads(data)[ROWS_FIELD[scenario.endpoint]])
    except (ValueError, KeyError, TypeError, IndexError) as error:
        raise RuntimeError(f"{scenario.label}: unexpected response ({error!r}): {data[:200]!r}") from error
    if rows != scenario.rows:
        raise RuntimeError(f"{scenario.label}: expected {scenario.rows} rows, got {rows}")


def v2_rows(scenario: Scenario, data: bytes, headers: dict[str, str]) -> int:
    """The rows of a V2 response's samples (sample) or mu (encode) output, after checking that every output
    is whole: JSON `data` holding shape's element count, or binary data of shape x datatype bytes, in order,
    accounting for the body after the JSON exactly (Triton's binary tensor data extension). Raises ValueError
    when `scenario.binary_output` and the rows output is not binary data."""
    length = headers.get(HEADER_LENGTH.lower())
    if scenario.binary_output and length is None:
        raise ValueError(f"no {HEADER_LENGTH} header: the outputs are not binary data")
    json_length = len(data) if length is None else int(length)
    if not 0 < json_length <= len(data):
        raise ValueError(f"{HEADER_LENGTH} {json_length} for a body of {len(data)} bytes")
    outputs = json.loads(data[:json_length])["outputs"]
    binary_bytes = 0
    for output in outputs:
        count = math.prod(output["shape"])
        size = (output.get("parameters") or {}).get("binary_data_size")
        if size is None:
            if len(output["data"]) != count:
                raise ValueError(
                    f"output {output['name']}: {len(output['data'])} values for {output['shape']}"
                )
        elif size != count * ITEM_SIZES[output["datatype"]]:
            raise ValueError(f"output {output['name']}: binary_data_size {size} for {output['shape']}")
        else:
            binary_bytes += size
    if binary_bytes != len(data) - json_length:
        raise ValueError(f"{len(data) - json_length} bytes after the JSON, outputs declare {binary_bytes}")
    wanted = next(o for o in outputs if o["name"] == ROWS_FIELD[scenario.endpoint])
    if scenario.binary_output and "binary_data_size" not in (wanted.get("parameters") or {}):
        raise ValueError(f"output {wanted['name']} is JSON, not binary data")
    rows: int = wanted["shape"][0]
    return rows


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
        return [sys.executable, "-m", "service"], env | service_env(spec, port, args, model_root, scratch)
    env["PEER_MODEL"] = str(version_dir)
    command = [sys.executable, "-m", "uvicorn", PEER_APPS[spec.key], "--host", "127.0.0.1"]
    command += ["--port", str(port), "--workers", str(args.workers)]
    return [*command, "--log-level", "warning", "--no-access-log"], env


def service_env(
    spec: ServerSpec, port: int, args: argparse.Namespace, model_root: Path, scratch: Path
) -> dict[str, str]:
    """The service's own settings for `spec`: where, how many workers, batching on or off, and --env."""
    env = {
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
    return env | dict(item.split("=", 1) for item in args.env)


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
    try:
        server.wait_ready(f"{base}/readyz")
        sizes = warm_up(server.pid, base, chosen, model, args)
        run.rss_warm = rss_bytes(server.pid)
        for scenario in chosen:
            url = base + scenario.path(model)
            for connections in args.concurrency:
                point = measure_point(
                    server.pid, url, metrics_url, scenario, connections, sizes[scenario.key], args
                )
                run.points.append(point)
                load = point.load
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


def warm_up(
    pid: int, base: str, chosen: list[Scenario], model: str, args: argparse.Namespace
) -> dict[str, int]:
    """Check each request's answer, then load it for --warmup seconds; returns each answer's size in bytes."""
    sizes: dict[str, int] = {}
    for scenario in chosen:
        url = base + scenario.path(model)
        status, headers, data = exchange("POST", url, scenario.body, scenario.headers)
        check_response(scenario, data, headers, status)
        sizes[scenario.key] = len(data)
        wrk_for(url, scenario, max(args.concurrency), args.warmup, args)
        wait_idle(pid)
    return sizes


def measure_point(
    pid: int,
    url: str,
    metrics_url: str | None,
    scenario: Scenario,
    connections: int,
    response_bytes: int,
    args: argparse.Namespace,
) -> Point:
    """wrk at `connections` for --duration, with the server's CPU time and (service) merged requests over it."""
    merged_before = merged_totals(http("GET", metrics_url).decode()) if metrics_url else (0.0, 0.0)
    cpu_before = cpu_seconds(pid)
    load = wrk_for(url, scenario, connections, args.duration, args)
    cpu_s = cpu_seconds(pid) - cpu_before
    merged = None
    if metrics_url:
        merged_after = merged_totals(http("GET", metrics_url).decode())
        runs = merged_after[1] - merged_before[1]
        merged = (merged_after[0] - merged_before[0]) / runs if runs else None
    return Point(scenario, connections, load, cpu_s, merged, response_bytes)


def brief(error: Exception) -> str:
    """An error's first line, for the report; the whole of it (a server's log tail, say) goes to stderr."""
    lines = str(error).strip().splitlines()
    return lines[0].rstrip(":") + (" (the rest on stderr)" if len(lines) > 1 else "")


def wrk_for(url: str, scenario: Scenario, connections: int, seconds: float, args: argparse.Namespace) -> Load:
    """wrk (one thread, on --client-cpu) sending `scenario`'s request to `url`; its timeout at least 10 s."""
    return run_wrk(
        url,
        scenario.body,
        headers=scenario.headers,
        connections=connections,
        seconds=seconds,
        cpu=args.client_cpu,
        timeout_s=max(10.0, seconds),
    )
