"""The serving benchmark's ratio goals, measured side by side: two contenders taking turns (ABBA).

The machine's speed drifts by 10-20% over minutes, so a ratio of two sweep points taken minutes apart would
mostly measure the drift. Here every server a comparison needs is up at once on the server core, and each
ratio is the median of per-round ratios taken seconds apart (`serve_load.alternate`).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, replace
from pathlib import Path

from bench.serve_load import Paired, Rate, Server, alternate, free_port, wait_idle
from bench.serve_scenarios import REQUESTS, SERVERS, V1_REQUESTS, Ceiling, Scenario
from bench.serve_sweep import ServerRun, brief, launch, wrk_for

CEILING = "ceiling"
"""A `Side.server` that is no server: the in-process ceiling."""
CEILING_GOALS: tuple[tuple[str, float | None], ...] = (
    ("sample256-json", 0.35),
    ("sample256-u8", None),
    ("sample256-npy", 0.70),
    ("encode256-npy", None),
    ("v2-sample256-bin", 0.70),
    ("v2-encode256-bin", 0.70),
)
"""(request, the least share of the in-process ceiling it should reach; None: measured, no goal)."""
V2_JSON_CONNECTIONS = (64, 1)
V2_JSON_GOAL = 0.85
"""V2 JSON sample n=1 within 15% of v1's requests/s, at each of V2_JSON_CONNECTIONS."""


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
    """The ratio goals (issue 5's, then V2's: its binary requests against the ceiling, its JSON n=1 against
    v1) in the order they are measured, with `missing` set on those that this run's --servers, --requests or
    sweep leave out."""
    planned: list[PairGoal] = []

    def add(text: str, goal: float | None, a: Side, b: Side, missing: str | None = None) -> None:
        why = unmeasured(args, a.server, a.request) or unmeasured(args, b.server, b.request) or missing
        planned.append(PairGoal(text, goal, a, b, missing=why))

    on_64 = Side("service", "sample1", 64)
    add("sample n=1, c=64: batching on / naive peer (req/s)", 3.0, on_64, Side("naive", "sample1", 64))
    add("sample n=1, c=64: batching on / no-op floor (req/s)", 0.75, on_64, Side("noop", "noop", 64))
    for key in V1_REQUESTS:
        add(
            f"{all_scenarios[key].label}, c=1: batching on / off (req/s)",
            0.95,
            Side("service", key, 1),
            Side("service-nobatch", key, 1),
        )
    # uint8 JSON has no goal of its own: it shows what the compact form does against the JSON one; nor has
    # encode256-npy: it is the v1 figure beside V2's binary encode
    service = runs.get("service")
    for key, goal in CEILING_GOALS:
        scenario = all_scenarios[key]
        points = [p for p in service.points if p.scenario.key == key] if service else []
        best = max(points, key=lambda p: p.samples_per_s).connections if points else 0
        where = f"c={best} (the sweep's best)" if best else "the sweep's best c"
        unit = "images/s" if scenario.endpoint == "encode" else "samples/s"
        add(
            f"{scenario.label}, {where}: service / in-process {scenario.graph} at batch {scenario.batch} "
            f"({unit})",
            goal,
            Side("service", key, best, samples=True),
            Side(CEILING, key, samples=True),
            None
            if points
            else "no sweep point" + (f": {service.error}" if service and service.error else ""),
        )
    for connections in V2_JSON_CONNECTIONS:
        add(
            f"sample n=1, c={connections}: V2 JSON / v1 (req/s)",
            V2_JSON_GOAL,
            Side("service", "v2-sample1-json", connections),
            Side("service", "sample1", connections),
        )
    return planned


class Contenders:
    """The servers of the side-by-side phase, up at once (idle but for the one under load), and the rates
    measured against them; `errors` counts HTTP and socket errors over every wrk run."""

    def __init__(
        self, args: argparse.Namespace, model: str, all_scenarios: dict[str, Scenario], ceilings: Ceiling
    ) -> None:
        self.args = args
        self.model = model
        self.all_scenarios = all_scenarios
        self.ceilings = ceilings
        self.servers: dict[str, Server] = {}
        self.bases: dict[str, str] = {}
        self.errors = 0

    def start(self, keys: list[str], model_root: Path, version_dir: Path, scratch: Path) -> None:
        """Start every server of `keys`, then wait until all are ready."""
        for key in keys:
            port = free_port()
            command, env = launch(SERVERS[key], port, self.args, model_root, version_dir, scratch)
            self.servers[key] = Server(
                command, env, self.args.server_cpu, scratch / f"{key}-side-by-side.log"
            )
            self.bases[key] = f"http://127.0.0.1:{port}"
        for key, server in self.servers.items():
            server.wait_ready(f"{self.bases[key]}/readyz")

    def stop(self) -> None:
        for server in self.servers.values():
            server.stop()

    def rate(self, side: Side) -> Rate:
        """The measurement of one side, warmed up: requests/s or samples/s over about `seconds`."""
        scenario = self.all_scenarios[side.request]
        if side.server == CEILING:
            return lambda seconds: self.ceilings.rate(scenario.graph, scenario.batch, seconds)
        url = self.bases[side.server] + scenario.path(self.model)

        def measure(seconds: float) -> float:
            measured = wrk_for(url, scenario, side.connections, seconds, self.args)
            self.errors += measured.errors
            wait_idle(self.servers[side.server].pid)
            return measured.rps * scenario.rows if side.samples else measured.rps

        measure(self.args.warmup)  # a fresh process: warm up what this rate will run
        return measure

    def compare(self, pair: PairGoal) -> PairGoal:
        """`pair` measured in --rounds ABBA rounds of --round-seconds each, its rounds printed."""
        a, b = self.rate(pair.a), self.rate(pair.b)
        errors_before = self.errors
        result = alternate(a, b, rounds=self.args.rounds, seconds=self.args.round_seconds)
        measured = replace(pair, result=result, errors=self.errors - errors_before)
        rounds = ", ".join(f"{a:,.0f}/{b:,.0f}" for a, b in zip(result.a, result.b, strict=True))
        print(f"  {pair.text}: {pair.show(result.ratio)} ({result.spread(pair.show)}: {rounds})", flush=True)
        return measured


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
    contenders = Contenders(args, model, all_scenarios, ceilings)
    phase_error = None
    try:
        contenders.start(keys, model_root, version_dir, scratch)
        for i, pair in enumerate(pairs):
            if pair.missing is None:
                pairs[i] = contenders.compare(pair)
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
        contenders.stop()
    return pairs, phase_error
