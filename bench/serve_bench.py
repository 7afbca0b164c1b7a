"""Serving benchmark (issue 5): the service under wrk beside its peers, its ceiling and its floor, in one run.

    .venv/bin/python -m bench.serve_bench                     # full run, about 25 minutes
    .venv/bin/python -m bench.serve_bench --duration 3 --concurrency 1,64   # a quick look

Run from the repository root. It measures, on one server core and (by default) one onnxruntime thread:

- ceiling   the same ONNX graphs in-process (`InferenceSession.run` in a loop, the service's session
            options and --intra-op-threads/--inter-op-threads): decoder at batch 1 and 256, encoder at
            batch 64 and 256;
- service   `python -m service` with batching on (the default BATCH_WINDOW_MS, or --window-ms);
- service, batching off   the same with BATCH_WINDOW_MS=0;
- naive     `bench/peer_naive.py`: FastAPI returning a dict, one `session.run` per request;
- no-op     `bench/peer_noop.py`: a FastAPI endpoint that does nothing (the HTTP floor).

Each server runs alone, pinned with `taskset` to --server-cpu, with uvicorn's access log off and glibc's
MALLOC_MMAP_THRESHOLD_ as --mmap-threshold says; wrk (one thread) is pinned to --client-cpu and sweeps the
connection counts for each request: `sample` n=1, `sample` n=256 as JSON (float32, and `"dtype": "uint8"`)
and as .npy (`Accept: application/x-npy`), and `encode` of 64 Fashion-MNIST test images as JSON; then,
on the service with batching on, `encode` of 256 test images as a uint8 .npy both ways, and the same work
through the Open Inference Protocol (V2, `POST /v2/models/NAME.OPERATION/infer`): `sample` n=1 as JSON,
`sample` n=256 and `encode` of the 256 images (UINT8) with binary tensor data both ways (Triton's
extension: the JSON, then the raw tensors, the JSON's length in Inference-Header-Content-Length); the
report prints these beside their v1 counterparts. Per point it reports
requests/s, samples/s, p50, p99 (marked † where wrk's end-of-run cut makes them understate), errors
(socket errors, timeouts and HTTP statuses >= 400), the server's CPU use (/proc/PID/stat, all its
processes) and, for the service, the mean number of requests merged per onnxruntime run (the change in
`/metrics`' vae_batch_requests histogram over the point). RSS is read after warm-up and after the sweep.

Then the goals that are ratios of two rates (service / naive peer, service / no-op floor, batching on / off,
service / in-process graph, V2 / v1) are measured side by side: the servers up at once on the server core,
the two contenders taking turns (ABBA) for --rounds rounds of --round-seconds each, the ratio being the
median of the rounds' ratios. This machine's speed drifts by 10-20% over minutes, so a ratio of two sweep
points taken minutes apart would mostly measure the drift. The markdown report (sweep table, V2 beside v1,
side-by-side table, memory) is printed and written to --out, followed by every goal (issue 5's, V2's) on
one line: PASS, FAIL, INFO (measured, no goal) or SKIP with the reason it was not measured.

Exit status: 1 when a phase hit an error (a server's sweep, or the side-by-side phase), else 0; a goal
that FAILs is a result, not an error.

The model is the newest version of the first (or --model) name under --model-dir (default `models`);
if there is none, a stand-in with the same shapes (`bench/standin.py`) is written to a temp dir.
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.serve_load import free_port
from bench.serve_pairs import comparisons, side_by_side
from bench.serve_report import goals, render
from bench.serve_scenarios import REQUESTS, SERVERS, Ceiling, Scenario, find_model, scenarios
from bench.serve_sweep import ServerRun, launch, sweep_server
from service.manifest import Manifest, read_manifest

MMAP_THRESHOLD = 0
"""MALLOC_MMAP_THRESHOLD_ for the servers; 0 leaves glibc's adaptive threshold. Any fixed value also fixes the
trim threshold at 128 KiB, and then every 256-image response pays fresh page faults: `orjson.dumps` of 256
float32 images cost 9.2-9.8 ms of CPU with 1048576 against 7.1-7.5 ms adaptive (`python -m bench.serve_costs`
with and without the variable). Pass --mmap-threshold 1048576 to trade that CPU for flatter RSS."""


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


THREADS = "onnxruntime {} threads, servers and ceiling (default: 1)"
OPTIONS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("--model-dir", {"type": Path, "default": Path("models"), "help": "MODEL_DIR (default: %(default)s)"}),
    ("--model", {"help": "model name under --model-dir (default: the first)"}),
    ("--duration", {"type": float, "default": 5.0, "help": "seconds per point (default: %(default)s)"}),
    ("--warmup", {"type": float, "default": 2.0, "help": "seconds of load per request before the sweep"}),
    (
        "--rounds",
        {"type": int, "default": 9, "help": "rounds per side-by-side comparison (default: %(default)s)"},
    ),
    (
        "--round-seconds",
        {"type": float, "default": 3.0, "help": "seconds per contender per round (default: %(default)s)"},
    ),
    (
        "--concurrency",
        {"type": _int_list, "default": [1, 8, 32, 64], "help": "wrk connections, e.g. 1,8,32,64"},
    ),
    (
        "--servers",
        {
            "type": _choices(list(SERVERS)),
            "default": list(SERVERS),
            "help": f"which servers, comma-separated (default: all of {','.join(SERVERS)})",
        },
    ),
    (
        "--requests",
        {
            "type": _choices(list(REQUESTS)),
            "default": list(REQUESTS),
            "help": f"which requests, comma-separated (default: all of {','.join(REQUESTS)})",
        },
    ),
    (
        "--server-cpu",
        {"type": int, "default": 0, "help": "core for the servers and the ceiling (default: 0)"},
    ),
    ("--client-cpu", {"type": int, "default": 1, "help": "core for wrk (default: 1)"}),
    ("--workers", {"type": int, "default": 1, "help": "uvicorn workers for every server (default: 1)"}),
    ("--intra-op-threads", {"type": int, "default": 1, "help": THREADS.format("intra-op")}),
    ("--inter-op-threads", {"type": int, "default": 1, "help": THREADS.format("inter-op")}),
    ("--window-ms", {"type": float, "help": "BATCH_WINDOW_MS with batching on (default: the service's)"}),
    (
        "--mmap-threshold",
        {
            "type": int,
            "default": MMAP_THRESHOLD,
            "metavar": "BYTES",
            "help": "MALLOC_MMAP_THRESHOLD_ for every server, not the in-process ceiling (default: %(default)s; "
            "0: glibc's own adaptive one)",
        },
    ),
    (
        "--env",
        {
            "action": "append",
            "default": [],
            "metavar": "KEY=VALUE",
            "help": "extra environment for the service, e.g. MAX_BATCH_ROWS=128 (repeatable)",
        },
    ),
    ("--out", {"type": Path, "default": Path("bench/results/serve_bench.md"), "help": "markdown report"}),
)
"""Every option, in --help's order: (flag, `add_argument` keywords)."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.serve_bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    for flag, options in OPTIONS:
        parser.add_argument(flag, **options)
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


# --- the run --------------------------------------------------------------------------------------------


def load_model(args: argparse.Namespace, scratch: Path) -> tuple[Path, Path, Manifest, str]:
    """MODEL_DIR, the version directory and its manifest, and a note on the model for the report; a stand-in
    written under `scratch` when --model-dir has no model."""
    model_root = args.model_dir
    version_dir = find_model(model_root, args.model) if model_root.is_dir() else None
    if version_dir is None:
        from bench.standin import write_model  # onnx takes most of a second to import

        model_root = scratch / "models"
        version_dir = write_model(model_root)
        model_note = f"no model under {args.model_dir}: stand-in MLP VAE (bench/standin.py, random weights)"
    else:
        model_note = f"{version_dir}"
    manifest = read_manifest(version_dir)
    model_note = f"{manifest.name}/{manifest.version} ({model_note}; {manifest.architecture})"
    return model_root, version_dir, manifest, model_note


def measure_ceiling(
    args: argparse.Namespace, version_dir: Path, manifest: Manifest, wanted: dict[str, list[Scenario]]
) -> tuple[Ceiling, dict[tuple[str, int], float]]:
    """The in-process sessions (the side-by-side phase reuses them) and their rate at every (graph, batch)
    that the chosen requests run."""
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
    return ceilings, ceiling


def sweep_all(
    args: argparse.Namespace,
    model_root: Path,
    version_dir: Path,
    scratch: Path,
    model: str,
    wanted: dict[str, list[Scenario]],
) -> dict[str, ServerRun]:
    """Each server of --servers alone, one after the other, through its sweep."""
    runs = {}
    for key in args.servers:
        spec = SERVERS[key]
        port = free_port()
        command, env = launch(spec, port, args, model_root, version_dir, scratch)
        base = f"http://127.0.0.1:{port}"
        runs[key] = sweep_server(spec, command, env, base, wanted[key], model, args, scratch / f"{key}.log")
    return runs


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="serve_bench_") as tmp:
        scratch = Path(tmp)
        model_root, version_dir, manifest, model_note = load_model(args, scratch)
        print(f"model: {model_note}", flush=True)
        all_scenarios = scenarios(math.prod(manifest.input_shape), tuple(manifest.input_shape))
        wanted = {
            key: [all_scenarios[k] for k in SERVERS[key].scenarios if k in args.requests or k == "noop"]
            for key in args.servers
        }
        ceilings, ceiling = measure_ceiling(args, version_dir, manifest, wanted)
        runs = sweep_all(args, model_root, version_dir, scratch, manifest.name, wanted)
        print("side by side", flush=True)
        planned = comparisons(args, runs, all_scenarios)
        pairs, side_error = side_by_side(
            args, model_root, version_dir, scratch, manifest.name, all_scenarios, planned, ceilings
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
