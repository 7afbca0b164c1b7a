"""Ray Serve benchmark: what replicas add (sample n=256 .npy, 2 replicas against 1) and what Ray's ingress
costs per request (sample n=1, Ray with 1 replica against `python -m service`), on this machine's cores.

    .venv/bin/python -m bench.ray_bench                            # about 5 minutes
    .venv/bin/python -m bench.ray_bench --rounds 3 --round-seconds 3

Run from the repository root, with the `ray` extra installed (`./run test` or `./run serve-ray` puts it in
.venv). One local Ray instance as `./run serve-ray` starts it (service_ray.launch: HAProxy ingress,
throughput-optimized) serves deploy/ray/serve.yaml's deployment twice at once: /one with 1 replica and /two
with 2 (1 CPU and 1 onnxruntime thread each); beside it `python -m service` runs with WORKERS=1 and
INTRA_OP_THREADS=1. Access logs are off everywhere. Nothing is pinned: the servers, Ray's own processes and
wrk share every core, as they would on a 2-core node.

Each comparison runs side by side in alternation (serve_load.alternate: --rounds rounds of --round-seconds,
A then B, then B then A), and its ratio is the median of the rounds' ratios, since this machine's speed
drifts over minutes. The markdown table is printed and written to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.serve_load import Paired, Server, alternate, exchange, free_port, run_wrk
from bench.serve_scenarios import find_model

NPY = "application/x-npy"


@dataclass(frozen=True)
class Comparison:
    label: str
    a: str  # what the ratio's numerator measures
    b: str
    goal: float
    paired: Paired


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.ray_bench", description=__doc__.split("\n")[0])
    parser.add_argument("--model-dir", type=Path, default=Path("models"))
    parser.add_argument("--model", default=None, help="model name (default: the first under --model-dir)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--round-seconds", type=float, default=4.0)
    parser.add_argument("--connections-256", type=int, default=8, help="wrk connections for n=256")
    parser.add_argument("--connections-1", type=int, default=16, help="wrk connections for n=1")
    parser.add_argument("--out", type=Path, default=Path("bench/results/ray_bench.md"))
    return parser.parse_args(argv)


def rate(url: str, body: bytes, accept: str | None, connections: int) -> Callable[[float], float]:
    """Successful responses per second of wrk against `url` for the given seconds (errors fail the run)."""

    def measure(seconds: float) -> float:
        load = run_wrk(
            url, body, accept=accept, connections=connections, seconds=seconds, cpu=None, timeout_s=30
        )
        if load.errors:
            raise RuntimeError(f"{load.errors} errors from {url}")
        return load.rps

    return measure


def start_ray(model_dir: Path) -> str:
    """A local Ray instance serving /one (1 replica) and /two (2 replicas) of the config file's deployment."""
    from pydantic.warnings import PydanticDeprecatedSince20

    warnings.simplefilter("ignore", PydanticDeprecatedSince20)  # Ray's own models
    from service_ray import launch

    launch.ray_environment()
    launch.start_local_ray(num_cpus=4)  # logical CPUs: 3 replicas of 1 CPU at once
    port = free_port()
    env = {"MODEL_DIR": str(model_dir.resolve()), "INTRA_OP_THREADS": "1", "ACCESS_LOG": "false"}
    config = launch.load_config(host="127.0.0.1", port=port, env=env)
    (app,) = config["applications"]
    apps = []
    for name, replicas in (("one", 1), ("two", 2)):
        copy: dict[str, Any] = json.loads(json.dumps(app))
        copy.update(name=name, route_prefix=f"/{name}")
        deployment = copy["deployments"][0]
        deployment.update(num_replicas=replicas, logging_config={"enable_access_log": False})
        apps.append(copy)
    config["applications"] = apps
    launch.deploy(config)
    return f"http://127.0.0.1:{port}"


def start_direct(model_dir: Path, scratch: Path) -> tuple[Server, str]:
    port = free_port()
    env = {
        **os.environ,
        "MODEL_DIR": str(model_dir.resolve()),
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "WORKERS": "1",
        "INTRA_OP_THREADS": "1",
        "ACCESS_LOG": "false",
    }
    server = Server([sys.executable, "-m", "service"], env, None, scratch / "direct.log")
    url = f"http://127.0.0.1:{port}"
    server.wait_ready(url + "/readyz")
    return server, url


def check(url: str, body: bytes, accept: str | None) -> None:
    status, headers, _ = exchange(
        "POST", url, body, {"Content-Type": "application/json", "Accept": accept or "*/*"}
    )
    assert status == 200 and (accept is None or headers["content-type"] == accept), (url, status, headers)


def render(args: argparse.Namespace, model: str, comparisons: list[Comparison]) -> str:
    lines = [
        f"Ray Serve benchmark, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {platform.machine()}, "
        f"{len(os.sched_getaffinity(0))} CPUs, load average {os.getloadavg()[0]:.1f} at the end; model {model}; "
        f"{args.rounds} rounds of {args.round_seconds:g} s per comparison (ratio: median of the rounds').",
        "",
        "| comparison | A | B | A req/s | B req/s | A / B | rounds' range | goal | |",
        "|---|---|---|---:|---:|---:|---|---:|---|",
    ]
    for c in comparisons:
        verdict = "PASS" if c.paired.ratio >= c.goal else "FAIL"
        lines.append(
            f"| {c.label} | {c.a} | {c.b} | {statistics.median(c.paired.a):,.0f} | "
            f"{statistics.median(c.paired.b):,.0f} | {c.paired.ratio:.2f}x | {c.paired.range('{:.2f}x'.format)} | "
            f">= {c.goal}x | {verdict} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    version_dir = find_model(args.model_dir, args.model)
    if version_dir is None:
        sys.exit(f"no model under {args.model_dir}")
    name = version_dir.parent.name
    n256 = json.dumps({"n": 256, "seed": 1}).encode()
    n1 = json.dumps({"n": 1, "seed": 1}).encode()
    path = f"/v1/models/{name}/sample"
    with tempfile.TemporaryDirectory(prefix="ray_bench_") as tmp:
        direct, direct_url = start_direct(args.model_dir, Path(tmp))
        try:
            ray_url = start_ray(args.model_dir)
            for url, body, accept in [
                (f"{ray_url}/one{path}", n256, NPY),
                (f"{ray_url}/two{path}", n256, NPY),
                (f"{ray_url}/one{path}", n1, None),
                (direct_url + path, n1, None),
            ]:
                check(url, body, accept)
                rate(url, body, accept, 4)(2.0)  # warm-up
            print("measuring replicas: sample n=256 .npy, /two against /one", flush=True)
            replicas = alternate(
                rate(f"{ray_url}/two{path}", n256, NPY, args.connections_256),
                rate(f"{ray_url}/one{path}", n256, NPY, args.connections_256),
                rounds=args.rounds,
                seconds=args.round_seconds,
            )
            print("measuring overhead: sample n=1, Ray 1 replica against python -m service", flush=True)
            overhead = alternate(
                rate(f"{ray_url}/one{path}", n1, None, args.connections_1),
                rate(direct_url + path, n1, None, args.connections_1),
                rounds=args.rounds,
                seconds=args.round_seconds,
            )
        finally:
            direct.stop()
            try:
                from ray import serve

                serve.shutdown()
                import ray

                ray.shutdown()
            except ImportError:
                pass
    comparisons = [
        Comparison(
            f"sample n=256 .npy, c={args.connections_256}",
            "Ray, 2 replicas",
            "Ray, 1 replica",
            1.6,
            replicas,
        ),
        Comparison(
            f"sample n=1 JSON, c={args.connections_1}",
            "Ray, 1 replica",
            "python -m service",
            0.6,
            overhead,
        ),
    ]
    report = render(args, f"{name}/{version_dir.name}", comparisons)
    print(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
