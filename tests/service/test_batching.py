"""The micro-batcher against fake graphs: row-dependent (an affine map, a row sum), raising, sleeping, gated.

Nothing here asserts a duration. A gated fake holds a run in flight until the test lets it go, so what
merges with what is decided by the order of events, not by the machine's speed; timeouts only stop a
hang from becoming a stuck suite.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from service.batching import QUIET_TURNS, Batcher, BatcherClosed, BatcherOverloaded, BatchFailed

pytestmark = pytest.mark.anyio

Array = npt.NDArray[Any]
HANG = 20.0  # seconds; only ever reached by a hang


def rows(n: int, start: int = 0) -> Array:
    """n distinct float32 rows of 3 values, numbered from `start`."""
    return np.arange(3 * start, 3 * (start + n), dtype=np.float32).reshape(n, 3)


def row_outputs(x: Array) -> list[Array]:
    """Two outputs that depend on each row alone (as an MLP's do): an affine map and the row sum."""
    return [x * 2.0 + 1.0, x.sum(axis=1)]


class FakeGraph:
    """A run function that records every batch; when gated, each run waits for a permit from the test."""

    def __init__(
        self, fn: Callable[[Array], list[Array]] = row_outputs, *, gated: bool = False, sleep_s: float = 0.0
    ) -> None:
        self.fn = fn
        self.sleep_s = sleep_s
        self.batches: list[Array] = []
        self._started = threading.Semaphore(0)
        self._permits = threading.Semaphore(0)
        self._open = threading.Event()
        if not gated:
            self._open.set()

    def __call__(self, x: Array) -> list[Array]:
        self.batches.append(x.copy())
        self._started.release()
        if not self._open.is_set() and not self._permits.acquire(timeout=HANG):
            raise TimeoutError("the test never let this run through")
        if self.sleep_s:
            time.sleep(self.sleep_s)
        return self.fn(x)

    async def started(self) -> None:
        """Wait until the next run has begun (it is in the worker thread, possibly waiting for a permit)."""
        assert await asyncio.to_thread(self._started.acquire, True, HANG)

    def allow(self, runs: int = 1) -> None:
        self._permits.release(runs)

    def open(self) -> None:
        """Let every run through from now on, waiting ones included."""
        self._open.set()
        self._permits.release(1000)

    @property
    def sizes(self) -> list[int]:
        return [len(b) for b in self.batches]


@contextlib.asynccontextmanager
async def running(graph: FakeGraph, **options: Any) -> AsyncIterator[Batcher]:
    settings: dict[str, Any] = {"max_batch_rows": 8, "window_ms": 5.0, "max_queue_rows": 1000} | options
    batcher = Batcher(graph, name="fake", **settings)
    await batcher.start()
    try:
        yield batcher
    finally:
        graph.open()
        await batcher.stop()


def spawn(batcher: Batcher, x: Array) -> asyncio.Task[list[Array]]:
    return asyncio.create_task(batcher.submit(x))


async def settle() -> None:
    """Let every task that is ready run until it blocks (a few loop turns; no wall-clock waiting)."""
    for _ in range(10):
        await asyncio.sleep(0)


def assert_outputs(got: list[Array], x: Array) -> None:
    want = row_outputs(x)
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(g, w)


async def test_merged_requests_get_their_own_rows_back_in_order() -> None:
    graph = FakeGraph(gated=True)
    async with running(graph, max_batch_rows=64) as batcher:
        first = spawn(batcher, rows(1, 0))
        await graph.started()  # the first run is in flight; everything below queues behind it
        inputs = [rows(n, start) for n, start in [(3, 100), (1, 200), (5, 300), (2, 400)]]
        tasks = [spawn(batcher, x) for x in inputs]
        await settle()
        graph.open()
        async with asyncio.timeout(HANG):
            results = await asyncio.gather(first, *tasks)
    assert graph.sizes == [1, 11]  # the four queued requests ran as one batch
    np.testing.assert_array_equal(graph.batches[1], np.concatenate(inputs))
    for got, x in zip(results, [rows(1, 0), *inputs], strict=True):
        assert_outputs(got, x)


async def test_batches_never_exceed_max_batch_rows() -> None:
    graph = FakeGraph(gated=True)
    async with running(graph, max_batch_rows=4) as batcher:
        first = spawn(batcher, rows(1, 0))
        await graph.started()
        inputs = [rows(n, 10 * i) for i, n in enumerate([1, 3, 2, 4, 1, 2], start=1)]
        tasks = [spawn(batcher, x) for x in inputs]
        await settle()
        graph.open()
        async with asyncio.timeout(HANG):
            results = await asyncio.gather(*tasks)
            await first
    assert graph.sizes == [1, 4, 4, 4, 1]  # batches filled exactly, requests sliced where needed
    for got, x in zip(results, inputs, strict=True):
        assert_outputs(got, x)


@pytest.mark.parametrize("window_ms", [0.0, 5.0], ids=["batching-off", "batching-on"])
async def test_oversized_request_is_split_and_rejoined_in_order(window_ms: float) -> None:
    graph = FakeGraph()
    async with running(graph, max_batch_rows=4, window_ms=window_ms) as batcher:
        x = rows(10)
        async with asyncio.timeout(HANG):
            got = await batcher.submit(x)
    assert graph.sizes == [4, 4, 2]
    assert_outputs(got, x)


async def test_requests_that_keep_arriving_merge_and_a_quiet_loop_runs_the_batch_at_once() -> None:
    graph = FakeGraph()
    async with running(graph, max_batch_rows=1000, window_ms=60_000) as batcher:
        tasks = []
        for i in range(20):  # one new request every other loop turn, never QUIET_TURNS turns apart
            tasks.append(spawn(batcher, rows(1, i)))
            for _ in range(QUIET_TURNS - 1):
                await asyncio.sleep(0)
        async with asyncio.timeout(HANG):  # then nothing more comes: no waiting out the one-minute window
            results = await asyncio.gather(*tasks)
    assert graph.sizes == [20]
    for i, got in enumerate(results):
        assert_outputs(got, rows(1, i))


async def test_a_lone_request_does_not_wait_out_the_window() -> None:
    graph = FakeGraph()
    async with running(graph, window_ms=60_000) as batcher:
        async with asyncio.timeout(HANG):
            for i in range(3):
                assert_outputs(await batcher.submit(rows(1, i)), rows(1, i))
    assert graph.sizes == [1, 1, 1]


async def test_the_window_bounds_the_wait_while_requests_keep_arriving() -> None:
    graph = FakeGraph()
    async with running(graph, max_batch_rows=10**6, window_ms=20, max_queue_rows=10**6) as batcher:
        stream: list[asyncio.Task[list[Array]]] = []

        async def feed() -> None:  # a new request every loop turn: the loop never goes quiet
            while True:
                stream.append(spawn(batcher, rows(1, len(stream))))
                await asyncio.sleep(0)

        feeder = asyncio.create_task(feed())
        await asyncio.sleep(0)
        async with asyncio.timeout(HANG):
            assert_outputs(
                await stream[0], rows(1, 0)
            )  # released by the window, not by quiet or a full batch
        feeder.cancel()
        async with asyncio.timeout(HANG):
            results = await asyncio.gather(*stream)
    assert graph.sizes[0] > 1  # the first batch merged what arrived within its window
    for i, got in enumerate(results):
        assert_outputs(got, rows(1, i))


async def test_batching_off_runs_each_request_alone() -> None:
    graph = FakeGraph(gated=True)
    async with running(graph, window_ms=0) as batcher:
        first = spawn(batcher, rows(2, 0))
        await graph.started()
        tasks = [spawn(batcher, rows(n, 10 * n)) for n in (1, 3, 1)]
        await settle()
        graph.open()
        async with asyncio.timeout(HANG):
            await asyncio.gather(first, *tasks)
    assert graph.sizes == [2, 1, 3, 1]


@pytest.mark.parametrize("max_batch_rows", [3, 64], ids=["sliced", "whole"])
async def test_results_identical_with_batching_on_and_off(max_batch_rows: int) -> None:
    sizes = np.random.default_rng(0).integers(1, 9, size=40)
    inputs = [rows(int(n), 100 * i) for i, n in enumerate(sizes)]
    outcomes: dict[float, list[list[Array]]] = {}
    for window_ms in (0.0, 2.0):
        graph = FakeGraph(sleep_s=0.002)
        async with running(graph, max_batch_rows=max_batch_rows, window_ms=window_ms) as batcher:
            async with asyncio.timeout(HANG):
                outcomes[window_ms] = await asyncio.gather(*(batcher.submit(x) for x in inputs))
        assert sum(graph.sizes) == sum(sizes) and max(graph.sizes) <= max_batch_rows
    for off, on, x in zip(outcomes[0.0], outcomes[2.0], inputs, strict=True):
        assert_outputs(off, x)
        assert_outputs(on, x)


async def test_a_failed_run_reaches_every_caller_in_it_and_later_batches_still_run() -> None:
    def fail_on_negative(x: Array) -> list[Array]:
        if (x < 0).any():
            raise RuntimeError("poisoned row")
        return row_outputs(x)

    graph = FakeGraph(fail_on_negative, gated=True)
    async with running(graph, max_batch_rows=64) as batcher:
        first = spawn(batcher, rows(1, 0))
        await graph.started()
        victims = [spawn(batcher, rows(2, 10)), spawn(batcher, -rows(1, 20)), spawn(batcher, rows(3, 30))]
        await settle()
        graph.open()
        async with asyncio.timeout(HANG):
            outcomes = await asyncio.gather(*victims, return_exceptions=True)
            assert_outputs(await first, rows(1, 0))
            later = await batcher.submit(rows(2, 40))
        assert batcher.queued_rows == 0
    for outcome in outcomes:
        assert isinstance(outcome, BatchFailed)
        assert isinstance(outcome.__cause__, RuntimeError)
        assert "3 request(s)" in str(outcome)
    assert len({id(outcome) for outcome in outcomes}) == 3  # one exception each: tracebacks never mix
    assert_outputs(later, rows(2, 40))


@pytest.mark.parametrize(
    "bad_run",
    [
        pytest.param(lambda x: [x[:-1]], id="too-few-rows"),
        pytest.param(lambda x: [x, np.ones(())], id="scalar-output"),
    ],
)
async def test_outputs_without_one_row_per_input_fail_the_batch(
    bad_run: Callable[[Array], list[Array]],
) -> None:
    async with running(FakeGraph(bad_run)) as batcher:
        with pytest.raises(BatchFailed) as caught:
            async with asyncio.timeout(HANG):
                await batcher.submit(rows(2))
    assert isinstance(caught.value.__cause__, ValueError)


async def test_overloaded_at_once_past_the_queue_limit_and_admitted_again_after_draining() -> None:
    graph = FakeGraph(gated=True)
    async with running(graph, max_batch_rows=8, max_queue_rows=4) as batcher:
        in_flight = spawn(batcher, rows(3, 0))
        await graph.started()
        queued = spawn(batcher, rows(1, 10))
        await settle()
        assert batcher.queued_rows == 4  # in flight and waiting both count
        with pytest.raises(BatcherOverloaded) as caught:
            await batcher.submit(rows(1, 20))  # raises before ever waiting
        assert caught.value.retry_after_s >= 0
        assert "4 rows queued" in str(caught.value)
        graph.open()
        async with asyncio.timeout(HANG):
            await asyncio.gather(in_flight, queued)
            assert batcher.queued_rows == 0
            assert_outputs(await batcher.submit(rows(4, 30)), rows(4, 30))


async def test_a_request_larger_than_the_queue_is_refused() -> None:
    async with running(FakeGraph(), max_queue_rows=4) as batcher:
        with pytest.raises(BatcherOverloaded):
            await batcher.submit(rows(5))


async def test_a_cancelled_waiting_caller_is_dropped_without_disturbing_the_others() -> None:
    graph = FakeGraph(gated=True)
    async with running(graph, max_batch_rows=64, max_queue_rows=10) as batcher:
        first = spawn(batcher, rows(1, 0))
        await graph.started()
        keep_a, gone, keep_b = (
            spawn(batcher, rows(2, 10)),
            spawn(batcher, rows(4, 20)),
            spawn(batcher, rows(1, 30)),
        )
        await settle()
        assert batcher.queued_rows == 8
        gone.cancel()
        await asyncio.wait({gone})
        assert batcher.queued_rows == 4  # its rows are given back at once
        graph.open()
        async with asyncio.timeout(HANG):
            results = await asyncio.gather(first, keep_a, keep_b)
    assert gone.cancelled()
    assert graph.sizes == [1, 3]  # the cancelled rows never ran
    np.testing.assert_array_equal(graph.batches[1], np.concatenate([rows(2, 10), rows(1, 30)]))
    for got, x in zip(results, [rows(1, 0), rows(2, 10), rows(1, 30)], strict=True):
        assert_outputs(got, x)


async def test_a_cancelled_caller_in_flight_is_accounted_until_its_run_ends() -> None:
    graph = FakeGraph(gated=True)
    async with running(graph, max_batch_rows=4) as batcher:
        first = spawn(batcher, rows(1, 0))
        await graph.started()
        partner, gone = spawn(batcher, rows(1, 10)), spawn(batcher, rows(5, 20))
        await settle()
        graph.allow(1)
        await graph.started()  # run 2 holds partner and 3 of gone's 5 rows; 2 rows wait
        assert batcher.queued_rows == 6
        gone.cancel()
        await asyncio.wait({gone})
        assert batcher.queued_rows == 4  # the waiting 2 are given back; the 4 in flight still count
        graph.open()
        async with asyncio.timeout(HANG):
            assert_outputs(await first, rows(1, 0))
            assert_outputs(await partner, rows(1, 10))
        assert batcher.queued_rows == 0
    assert gone.cancelled()
    assert graph.sizes == [1, 4]  # gone's last 2 rows never ran


async def test_stop_fails_waiting_callers_and_lets_the_run_in_flight_finish() -> None:
    graph = FakeGraph(gated=True)
    batcher = Batcher(graph, name="fake", max_batch_rows=2, window_ms=5, max_queue_rows=100)
    with pytest.raises(BatcherClosed, match="not running"):
        await batcher.submit(rows(1))
    await batcher.start()
    in_flight = spawn(batcher, rows(2, 0))
    await graph.started()
    waiting = [spawn(batcher, rows(1, 10)), spawn(batcher, rows(3, 20))]
    await settle()
    stopping = asyncio.create_task(batcher.stop())
    await settle()
    assert not stopping.done()  # it waits for the run in flight
    graph.open()
    async with asyncio.timeout(HANG):
        await stopping
        assert_outputs(await in_flight, rows(2, 0))
        outcomes = await asyncio.gather(*waiting, return_exceptions=True)
    assert all(isinstance(outcome, BatcherClosed) for outcome in outcomes)
    assert graph.sizes == [2]
    with pytest.raises(BatcherClosed):
        await batcher.submit(rows(1))
    await batcher.stop()  # a second stop is harmless


async def test_on_run_is_told_requests_merged_rows_and_seconds_of_every_run() -> None:
    calls: list[tuple[int, int, float]] = []
    graph = FakeGraph(gated=True)
    options = {"max_batch_rows": 4, "on_run": lambda *args: calls.append(args)}
    async with running(graph, **options) as batcher:
        first = spawn(batcher, rows(1, 0))
        await graph.started()
        tasks = [spawn(batcher, rows(n, 10 * n)) for n in (2, 1, 3)]
        await settle()
        graph.open()
        async with asyncio.timeout(HANG):
            await asyncio.gather(first, *tasks)
    assert [(merged, n) for merged, n, _ in calls] == [(1, 1), (3, 4), (1, 2)]
    assert all(seconds >= 0 for _, _, seconds in calls)


async def test_a_failing_on_run_hook_does_not_reach_the_callers(caplog: pytest.LogCaptureFixture) -> None:
    def broken_hook(requests: int, rows: int, seconds: float) -> None:
        raise RuntimeError("metrics are down")

    async with running(FakeGraph(), on_run=broken_hook) as batcher:
        async with asyncio.timeout(HANG):
            assert_outputs(await batcher.submit(rows(2)), rows(2))
    assert "on_run hook of batcher 'fake' raised" in caplog.text


@pytest.mark.parametrize("window_ms", [0.0, 1.0], ids=["batching-off", "batching-on"])
async def test_many_concurrent_callers_all_finish_with_their_own_rows(window_ms: float) -> None:
    sizes = np.random.default_rng(1).integers(1, 40, size=200)
    inputs = [rows(int(n), 1000 * i) for i, n in enumerate(sizes)]
    graph = FakeGraph(sleep_s=0.001)
    async with running(graph, max_batch_rows=32, window_ms=window_ms, max_queue_rows=10_000) as batcher:
        async with asyncio.timeout(HANG):
            results = await asyncio.gather(*(batcher.submit(x) for x in inputs))
        assert batcher.queued_rows == 0
    for got, x in zip(results, inputs, strict=True):
        assert_outputs(got, x)


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param({"max_batch_rows": 0}, id="max_batch_rows"),
        pytest.param({"window_ms": -1.0}, id="negative-window"),
        pytest.param({"window_ms": float("nan")}, id="nan-window"),
        pytest.param({"max_queue_rows": 0}, id="max_queue_rows"),
        pytest.param({"max_concurrent_runs": 0}, id="max_concurrent_runs"),
    ],
)
def test_settings_are_checked(bad: dict[str, Any]) -> None:
    settings: dict[str, Any] = {"max_batch_rows": 8, "window_ms": 5.0, "max_queue_rows": 100} | bad
    with pytest.raises(ValueError, match=next(iter(bad))):
        Batcher(row_outputs, name="fake", **settings)


@pytest.mark.parametrize("shape", [(0, 3), ()], ids=["no-rows", "scalar"])
async def test_submit_needs_at_least_one_row(shape: tuple[int, ...]) -> None:
    async with running(FakeGraph()) as batcher:
        with pytest.raises(ValueError, match="n >= 1"):
            await batcher.submit(np.zeros(shape, dtype=np.float32))


async def test_two_runs_in_flight_when_allowed() -> None:
    graph = FakeGraph(gated=True)
    async with running(graph, max_batch_rows=2, max_concurrent_runs=2) as batcher:
        tasks = [spawn(batcher, rows(2, 0)), spawn(batcher, rows(2, 10))]
        await graph.started()
        await graph.started()  # both runs are in their worker threads at once
        graph.open()
        async with asyncio.timeout(HANG):
            results = await asyncio.gather(*tasks)
    for got, x in zip(results, [rows(2, 0), rows(2, 10)], strict=True):
        assert_outputs(got, x)


async def test_runs_happen_off_the_event_loop_and_stop_ends_the_worker_threads() -> None:
    threads: list[threading.Thread] = []

    def record_thread(x: Array) -> list[Array]:
        threads.append(threading.current_thread())
        return row_outputs(x)

    batcher = Batcher(record_thread, name="fake", max_batch_rows=8, window_ms=0.0, max_queue_rows=100)
    await batcher.start()
    for start in range(3):
        assert_outputs(await batcher.submit(rows(2, start)), rows(2, start))
    await batcher.stop()
    assert len(set(threads)) == 1 and threads[0] is not threading.current_thread()
    threads[0].join(timeout=HANG)
    assert not threads[0].is_alive()


async def test_a_crashed_collector_fails_waiting_and_later_callers_instead_of_hanging(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    graph = FakeGraph(gated=True)
    async with running(graph, max_batch_rows=2) as batcher:
        in_flight = spawn(batcher, rows(2, 0))
        await graph.started()
        waiting = spawn(batcher, rows(1, 10))
        await settle()

        def broken_take() -> list[Any]:
            raise RuntimeError("a bug in the collector")

        monkeypatch.setattr(batcher, "_take", broken_take)
        graph.allow()  # the run ends, the collector takes its slot back and calls the broken _take
        async with asyncio.timeout(HANG):
            assert_outputs(await in_flight, rows(2, 0))  # the run in flight still delivers
            with pytest.raises(BatcherClosed, match="collector failed with RuntimeError"):
                await waiting
        with pytest.raises(BatcherClosed):
            await batcher.submit(rows(1))
    assert "collector of batcher 'fake' crashed" in caplog.text
    assert "a bug in the collector" in caplog.text  # the traceback is logged
