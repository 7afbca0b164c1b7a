"""The serving benchmark's pure parts: wrk's result line, /metrics totals, paired rounds, goal lines.

No server and no wrk: what the benchmark reads is built here, from the same libraries that write it.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import replace

import pytest
from prometheus_client import generate_latest

from bench.serve_load import Load, Paired, alternate, parse_wrk
from bench.serve_pairs import CEILING, Side, comparisons
from bench.serve_report import TRUNCATED, goals, sweep_table
from bench.serve_scenarios import REQUESTS, SERVERS, Scenario, scenarios
from bench.serve_sweep import BATCH_REQUESTS, Point, ServerRun, brief, merged_totals
from service.metrics import Metrics

SCENARIOS = scenarios(784)


def load(responses: int = 1000, seconds: float = 5.0, p50_ms: float = 10.0, p99_ms: float = 20.0) -> Load:
    return Load(responses, seconds, http_errors=0, socket_errors=0, p50_ms=p50_ms, p99_ms=p99_ms)


def point(scenario: Scenario, connections: int, measured: Load, merged: float | None = None) -> Point:
    return Point(scenario, connections, measured, cpu_s=1.0, merged=merged, response_bytes=100)


def bench_args(servers: list[str], requests: list[str], concurrency: list[int]) -> argparse.Namespace:
    return argparse.Namespace(servers=servers, requests=requests, concurrency=concurrency)


def test_scenarios_are_the_requests_and_the_floor() -> None:
    assert list(SCENARIOS) == [*REQUESTS, "noop"]
    assert all(SCENARIOS[key].key == key for key in SCENARIOS)


# --- wrk ------------------------------------------------------------------------------------------------


def test_parse_wrk_reads_the_result_line() -> None:
    stdout = (
        "Running 5s test @ http://127.0.0.1:8000/v1/models/m/sample\n"
        "WRK_RESULT 1000 5000000 1 2 3 4 5 1500.0 9000.0\n"
        "Requests/sec: 200.00\n"
    )
    measured = parse_wrk(stdout)
    assert measured == Load(
        responses=1000, seconds=5.0, http_errors=4, socket_errors=11, p50_ms=1.5, p99_ms=9.0
    )
    assert measured.rps == pytest.approx(996 / 5)
    assert measured.errors == 15


def test_parse_wrk_without_the_result_line_raises() -> None:
    with pytest.raises(RuntimeError, match="no WRK_RESULT"):
        parse_wrk("unable to connect to 127.0.0.1:8000 Connection refused\n")


@pytest.mark.parametrize(
    ("measured", "connections", "truncated"),
    [
        (load(responses=1000, seconds=5.0, p99_ms=2499.0), 64, False),
        (load(responses=1000, seconds=5.0, p99_ms=2500.0), 64, True),  # p99 at half the run
        (load(responses=63, seconds=5.0, p99_ms=100.0), 64, True),  # 64 / (63 / 5 s) = 5.08 s > 5 s
        (load(responses=64, seconds=5.0, p99_ms=100.0), 64, False),  # 64 / (64 / 5 s) = 5 s, not beyond
        (load(responses=0, seconds=5.0, p99_ms=0.0), 1, True),
        # the naive peer at sample n=256, c=64 (README): 2.2 req/s over 5 s, p99 4.9 s
        (load(responses=11, seconds=5.0, p50_ms=3001.9, p99_ms=4931.9), 64, True),
    ],
    ids=["short", "p99-half", "littles-law", "littles-law-edge", "no-responses", "naive-n256"],
)
def test_truncated(measured: Load, connections: int, truncated: bool) -> None:
    assert measured.truncated(connections) is truncated


def test_sweep_table_marks_truncated_points_and_explains_them() -> None:
    run = ServerRun(SERVERS["naive"])
    run.points = [
        point(SCENARIOS["sample256-json"], 1, load(responses=50, p99_ms=120.0)),
        point(SCENARIOS["sample256-json"], 64, load(responses=11, p99_ms=4931.9)),
    ]
    table = sweep_table({"naive": run})
    short, long = (row.split(" | ")[6] for row in table[2:4])
    assert (short, long) == ("120.00", "4931.90†")
    assert table[-1] == TRUNCATED
    run.points.pop()
    assert TRUNCATED not in sweep_table({"naive": run})


# --- /metrics -------------------------------------------------------------------------------------------


def test_merged_totals_sums_the_batch_requests_histogram_over_label_sets() -> None:
    metrics = Metrics()
    decoder = metrics.batch_observer("m", "1", "decoder")
    encoder = metrics.batch_observer("m", "1", "encoder")
    for requests in (4, 8, 32):
        decoder(requests, requests * 2, 0.001)  # rows differ: vae_batch_rows must not be counted
    encoder(3, 192, 0.002)
    metrics.observe_request("sample", "m", 200, 0.01)
    text = generate_latest(metrics.registry).decode()
    assert f"{BATCH_REQUESTS}_sum" in text
    assert merged_totals(text) == (47.0, 4.0)


def test_merged_totals_without_the_histogram_is_zero() -> None:
    assert merged_totals("# HELP up Up.\n# TYPE up gauge\nup 1.0\n") == (0.0, 0.0)


# --- paired rounds --------------------------------------------------------------------------------------


def test_paired_ratio_range_and_spread() -> None:
    paired = Paired(a=(90.0, 100.0, 120.0), b=(100.0, 100.0, 100.0))
    assert paired.ratios == [0.9, 1.0, 1.2]
    assert paired.ratio == 1.0
    assert paired.range() == "90%-120%"
    assert paired.spread() == "90%-120% over 3 rounds"
    assert paired.range("{:.2f}x".format) == "0.90x-1.20x"


def test_paired_ratio_over_a_zero_rate_is_infinite() -> None:
    assert Paired(a=(1.0,), b=(0.0,)).ratio == float("inf")


def test_alternate_runs_abba_and_pairs_by_round() -> None:
    calls: list[tuple[str, float]] = []

    def fake(name: str, base: float) -> Callable[[float], float]:
        def rate(seconds: float) -> float:
            calls.append((name, seconds))
            return base + sum(1 for called, _ in calls if called == name)  # base + the round it ran in

        return rate

    paired = alternate(fake("a", 100.0), fake("b", 200.0), rounds=5, seconds=0.5)
    assert "".join(name for name, _ in calls) == "abbaabbaab"
    assert {seconds for _, seconds in calls} == {0.5}
    assert paired.a == (101.0, 102.0, 103.0, 104.0, 105.0)
    assert paired.b == (201.0, 202.0, 203.0, 204.0, 205.0)


# --- goals ----------------------------------------------------------------------------------------------


def measured_run(key: str, concurrency: tuple[int, ...] = (1, 64)) -> ServerRun:
    run = ServerRun(SERVERS[key], rss_warm=200 * 2**20, rss_end=210 * 2**20)
    for request in REQUESTS:
        for connections in concurrency:
            run.points.append(point(SCENARIOS[request], connections, load(), merged=8.0))
    return run


def test_goals_skip_what_the_options_leave_out_with_the_reason() -> None:
    args = bench_args(servers=["service"], requests=["sample1"], concurrency=[1, 8])
    runs = {"service": measured_run("service", (1, 8))}
    lines = goals(args, runs, comparisons(args, runs, SCENARIOS))
    verdicts = [line.split(":")[0] for line in lines if not line.startswith("SKIP  ")]
    assert verdicts == ["PASS  service, batching on"] * 2  # its errors and RSS: the rest is not measured
    for expected in (
        "SKIP  sample n=1, c=64: batching on / naive peer (req/s) (goal >= 3.00x): naive not in --servers",
        "SKIP  sample n=1, c=1: batching on / off (req/s) (goal >= 95%): service-nobatch not in --servers",
        "SKIP  sample n=256 .npy, c=1: batching on / off (req/s) (goal >= 95%): "
        "sample256-npy not in --requests",
        "SKIP  side by side: HTTP and socket errors (goal 0): no comparison measured",
        "SKIP  sample n=1, c=64: p99 / p50 (goal <= 4x): c=64 not in --concurrency",
        "SKIP  sample n=1, c=64, batching on: requests merged per run (goal >= 4): c=64 not in --concurrency",
        "SKIP  service, batching off: RSS after the sweep (goal within 10% of after warm-up): "
        "service-nobatch not in --servers",
    ):
        assert expected in lines


def test_goals_skip_what_a_failed_side_by_side_phase_left() -> None:
    args = bench_args(servers=list(SERVERS), requests=list(REQUESTS), concurrency=[1, 64])
    runs = {key: measured_run(key) for key in ("service", "service-nobatch")}
    planned = comparisons(args, runs, SCENARIOS)
    first = replace(planned[0], result=Paired((1000.0,), (200.0,)))
    pairs = [first, *(replace(p, missing="not measured: server exited with 1") for p in planned[1:])]
    lines = goals(args, runs, pairs)
    assert lines[0] == (
        "PASS  sample n=1, c=64: batching on / naive peer (req/s): 5.00x, "
        "median of 5.00x-5.00x over 1 rounds (goal >= 3.00x)"
    )
    assert sum(line.endswith(": not measured: server exited with 1") for line in lines) == len(planned) - 1
    assert "PASS  sample n=1, c=64, batching on: 8.0 requests merged per run (goal >= 4)" in lines


def test_every_goal_has_a_line_measured_or_not() -> None:
    everything = bench_args(servers=list(SERVERS), requests=list(REQUESTS), concurrency=[1, 64])
    runs = {key: measured_run(key) for key in ("service", "service-nobatch")}
    pairs = [replace(p, result=Paired((95.0,), (100.0,))) for p in comparisons(everything, runs, SCENARIOS)]
    measured = goals(everything, runs, pairs)
    assert not any(line.startswith("SKIP") for line in measured), measured
    assert (
        "PASS  sample n=1, c=64: batching on / no-op floor (req/s): 95%, median of 95%-95% over 1 rounds "
        "(goal >= 75%)"
    ) in measured
    assert (
        "PASS  service, batching on: RSS 200 MiB after warm-up, 210 MiB after the sweep "
        "(+5.0%; goal within 10%)"
    ) in measured
    nothing = bench_args(servers=[], requests=[], concurrency=[])
    skipped = goals(nothing, {}, comparisons(nothing, {}, SCENARIOS))
    assert len(skipped) == len(measured)
    assert all(line.startswith("SKIP") for line in skipped), skipped


def test_the_ceiling_side_needs_no_server() -> None:
    args = bench_args(servers=["service"], requests=["sample256-npy"], concurrency=[1, 64])
    runs = {"service": measured_run("service")}
    npy = next(
        p
        for p in comparisons(args, runs, SCENARIOS)
        if p.a.request == "sample256-npy" and p.b.server == CEILING
    )
    assert npy.missing is None
    assert npy.a == Side("service", "sample256-npy", 1, samples=True)  # every point ties: the first wins
    assert npy.text.startswith(
        "sample n=256 .npy, c=1 (the sweep's best): service / in-process decoder at batch 256"
    )


def test_brief_keeps_the_first_line_and_points_to_the_rest() -> None:
    assert brief(RuntimeError("server exited with 1:\ninvalid settings")) == (
        "server exited with 1 (the rest on stderr)"
    )
    assert brief(OSError("connection refused")) == "connection refused"
