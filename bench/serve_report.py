"""The serving benchmark's markdown report: the run's setup, its tables, and every goal (issue 5's and V2's)
on a line.

Each goal reads PASS, FAIL, INFO (measured, no goal) or SKIP with the reason it was not measured, so a
partial run (fewer servers, requests or connection counts) still lists them all.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
from datetime import UTC, datetime
from pathlib import Path

from bench.serve_pairs import PairGoal, unmeasured
from bench.serve_scenarios import SERVERS, V2_PAIRS
from bench.serve_sweep import BATCH_REQUESTS, Point, ServerRun

TRUNCATED = (
    "† wrk drops the requests still in flight when a point ends, without counting them, so where latency "
    "nears the point's length (p99 at least half of it, or connections / req/s beyond it) the slowest "
    "requests go unrecorded and p50/p99 understate."
)
SWEEP_COLUMNS = [
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
]
LOAD_NOTE = (
    "req/s and samples/s (images/s for encode) count successful responses only; p50/p99 cover "
    "every response, errors included; errors are HTTP statuses >= 400 / socket errors and timeouts; "
    "server CPU % is CPU time of the server's processes over the point's wall time (100 = one core); "
    "req/CPU-s is successful requests per second of server CPU time (compare these when other work "
    "shares the machine); "
    "merged/run is the mean number of requests per onnxruntime run over the point, from the "
    "service's /metrics."
)
MERGED = "sample n=1, c=64, batching on: requests merged per run (goal >= 4)"
V2_COLUMNS = [
    "v1 request",
    "V2 request",
    "conc",
    "v1 req/s",
    "V2 req/s",
    "V2 / v1",
    "v1 p50 / p99 ms",
    "V2 p50 / p99 ms",
    "v1 / V2 share of ceiling",
]
V2_NOTE = (
    "The service's sweep points for each V2 request beside the v1 request doing the same work, at each "
    "connection count (batching on). These points were taken minutes apart, so the machine's drift is in "
    "their ratios; the V2 goals are measured side by side (below). Share of ceiling: samples/s (images/s "
    "for encode) over the in-process graph at the request's batch, for the 256-row requests."
)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|",
        *("| " + " | ".join(row) + " |" for row in rows),
    ]


def _verdict(ok: bool | None, text: str) -> str:
    return f"{'INFO' if ok is None else 'PASS' if ok else 'FAIL'}  {text}"


def _skip(text: str, why: str) -> str:
    return f"SKIP  {text}: {why}"


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
    """Every goal (issue 5's and V2's) on one line: PASS or FAIL, INFO (measured, no goal), or SKIP and why it
    was not measured. The ratios of two rates come from the side-by-side rounds, the rest from the sweep."""
    return [*pair_goals(pairs), *latency_goals(args, runs), *sweep_goals(runs)]


def pair_goals(pairs: list[PairGoal]) -> list[str]:
    """A line per side-by-side comparison, then one for the HTTP and socket errors over all of them."""
    lines: list[str] = []
    for pair in pairs:
        goal = "no goal" if pair.goal is None else f"goal >= {pair.show(pair.goal)}"
        if pair.result is None:
            lines.append(_skip(f"{pair.text} ({goal})", pair.missing or "not measured"))
            continue
        lines.append(
            _verdict(
                None if pair.goal is None else pair.result.ratio >= pair.goal,
                f"{pair.text}: {pair.show(pair.result.ratio)}, median of {pair.result.spread(pair.show)} "
                f"({goal})",
            )
        )
    measured = [pair for pair in pairs if pair.result is not None]
    if measured:
        side_errors = sum(pair.errors for pair in measured)
        lines.append(
            _verdict(side_errors == 0, f"side by side: {side_errors} HTTP and socket errors (goal 0)")
        )
    else:
        lines.append(_skip("side by side: HTTP and socket errors (goal 0)", "no comparison measured"))
    return lines


def latency_goals(args: argparse.Namespace, runs: dict[str, ServerRun]) -> list[str]:
    """The service's sample n=1 point at c=64: p99 against p50, and requests merged per onnxruntime run."""
    run = runs.get("service")
    on = run.point("sample1", 64) if run else None
    if on is None:
        why = no_point(args, runs, "service", "sample1", 64)
        return [_skip("sample n=1, c=64: p99 / p50 (goal <= 4x)", why), _skip(MERGED, why)]
    ratio = on.load.p99_ms / on.load.p50_ms if on.load.p50_ms else float("inf")
    lines = [
        _verdict(
            ratio <= 4,
            f"sample n=1, c=64: p99 {on.load.p99_ms:.2f} ms{'†' if on.truncated else ''} = {ratio:.1f}x "
            f"p50 {on.load.p50_ms:.2f} ms (goal <= 4x)",
        )
    ]
    if on.merged is None:
        lines.append(_skip(MERGED, f"no {BATCH_REQUESTS} runs in /metrics over the point"))
    else:
        lines.append(
            _verdict(
                on.merged >= 4,
                f"sample n=1, c=64, batching on: {on.merged:.1f} requests merged per run (goal >= 4)",
            )
        )
    return lines


def sweep_goals(runs: dict[str, ServerRun]) -> list[str]:
    """For the service with batching on and off: errors over the sweep, and RSS growth after it."""
    lines: list[str] = []
    for key in ("service", "service-nobatch"):
        label = SERVERS[key].label
        run = runs.get(key)
        if run is None or run.error:
            if run is None:
                lines.append(
                    _skip(
                        f"{label}: HTTP and socket errors over the sweep (goal 0)", f"{key} not in --servers"
                    )
                )
            else:
                lines.append(_verdict(False, f"{label}: the sweep stopped: {run.error}"))
            lines.append(
                _skip(
                    f"{label}: RSS after the sweep (goal within 10% of after warm-up)",
                    f"{key} not in --servers" if run is None else "the sweep did not finish",
                )
            )
            continue
        http_errors = sum(p.load.http_errors for p in run.points)
        socket_errors = sum(p.load.socket_errors for p in run.points)
        lines.append(
            _verdict(
                http_errors + socket_errors == 0,
                f"{label}: {http_errors} HTTP errors and {socket_errors} socket errors over "
                f"{len(run.points)} points (goal 0)",
            )
        )
        growth = run.rss_end / run.rss_warm - 1 if run.rss_warm else float("inf")
        lines.append(
            _verdict(
                growth <= 0.10,
                f"{label}: RSS {run.rss_warm / 2**20:.0f} MiB after warm-up, "
                f"{run.rss_end / 2**20:.0f} MiB after the sweep ({growth:+.1%}; goal within 10%)",
            )
        )
    return lines


def sweep_table(runs: dict[str, ServerRun]) -> list[str]:
    """Every sweep point, p99 marked † where it understates (`Load.truncated`); the footnote if any is."""
    rows = [
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
        for run in runs.values()
        for p in run.points
    ]
    table = _table(SWEEP_COLUMNS, rows)
    if any(p.truncated for run in runs.values() for p in run.points):
        table += ["", TRUNCATED]
    return table


def _latency(p: Point) -> str:
    if not p.load.responses:
        return "-"
    return f"{p.load.p50_ms:.2f} / {p.load.p99_ms:.2f}{'†' if p.truncated else ''}"


def _share(p: Point, ceiling: dict[tuple[str, int], float]) -> str:
    rate = ceiling.get((p.scenario.graph, p.scenario.batch))
    return f"{p.samples_per_s / rate:.0%}" if rate and p.scenario.batch > 1 else "-"


def v2_table(runs: dict[str, ServerRun], ceiling: dict[tuple[str, int], float]) -> list[str]:
    """The service's V2 sweep points beside the v1 ones doing the same work (`V2_PAIRS`), connection count by
    connection count; nothing when the sweep has no such pair."""
    run = runs.get("service")
    rows = []
    for v1_key, v2_key in V2_PAIRS:
        for v1 in (p for p in run.points if p.scenario.key == v1_key) if run else ():
            v2 = run.point(v2_key, v1.connections) if run else None
            if v2 is None:
                continue
            ratio = f"{v2.load.rps / v1.load.rps:.0%}" if v1.load.rps else "-"
            rows.append(
                [
                    v1.scenario.label,
                    v2.scenario.label,
                    str(v1.connections),
                    f"{v1.load.rps:,.0f}",
                    f"{v2.load.rps:,.0f}",
                    ratio,
                    _latency(v1),
                    _latency(v2),
                    f"{_share(v1, ceiling)} / {_share(v2, ceiling)}",
                ]
            )
    if not rows:
        return []
    return ["", "## V2 beside v1", "", V2_NOTE, "", *_table(V2_COLUMNS, rows)]


def render(
    args: argparse.Namespace,
    model_note: str,
    ceiling: dict[tuple[str, int], float],
    runs: dict[str, ServerRun],
    pairs: list[PairGoal],
    goal_lines: list[str],
) -> str:
    """The whole report: setup, ceiling, sweep, V2 beside v1, side by side, memory and goals."""
    out = [*setup_section(args, model_note), *ceiling_section(args, ceiling)]
    out += ["", "## Under load", "", LOAD_NOTE, "", *sweep_table(runs)]
    out += v2_table(runs, ceiling)
    out += pairs_section(args, pairs)
    out += ["", "## Memory", ""]
    out += _table(
        ["server", "RSS after warm-up MiB", "RSS after sweep MiB", "note"],
        [
            [run.spec.label, f"{run.rss_warm / 2**20:.0f}", f"{run.rss_end / 2**20:.0f}", run.error or ""]
            for run in runs.values()
        ],
    )
    out += ["", "## Goals (issue 5, V2)", "", "```", *goal_lines, "```", ""]
    return "\n".join(out)


def setup_section(args: argparse.Namespace, model_note: str) -> list[str]:
    """The title, then when, on what machine and software, with what command and server settings."""
    import onnxruntime

    cpu_model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    return [
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
    ]


def ceiling_section(args: argparse.Namespace, ceiling: dict[tuple[str, int], float]) -> list[str]:
    return [
        "",
        "## In-process ceiling (same graphs, the service's session options, "
        f"{args.intra_op_threads} intra-op / {args.inter_op_threads} inter-op onnxruntime threads)",
        "",
        *_table(
            ["graph", "batch", "samples/s"],
            [[g, str(b), f"{v:,.0f}"] for (g, b), v in sorted(ceiling.items())],
        ),
    ]


def pairs_section(args: argparse.Namespace, pairs: list[PairGoal]) -> list[str]:
    """The side-by-side comparisons that were measured: each contender's median, the ratio and its range."""
    rows = [
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
    ]
    return [
        "",
        "## Side by side",
        "",
        f"Ratio goals, measured in alternation, A then B in even rounds and B then A in odd ones (ABBA), for "
        f"{args.rounds} rounds of {args.round_seconds:g} s, every server up at once on the same core; the "
        "ratio is the median of the rounds' A / B. Comparisons not measured are listed as SKIP under Goals.",
        "",
        *_table(["comparison", "A (median)", "B (median)", "A / B", "range", "goal"], rows),
    ]
