"""Adaptive micro-batching: merge rows from concurrent requests into one model run.

One `Batcher` wraps one ONNX graph (the service keeps one for the encoder and one for the decoder, shared by
every endpoint). Callers `await submit(rows)`; a collector task on the event loop gathers queued rows into a
batch and hands it to a worker thread, which stacks the rows, calls `run` once and gives the outputs back to
be split among the callers, in order. The event loop never runs the model.

When a batch runs (monotonic clock throughout):

- As soon as `max_batch_rows` rows are waiting.
- When the window closes: `window_ms` after the oldest waiting request arrived. This bounds the wait.
- Adaptive: as soon as the event loop has gone `QUIET_TURNS` turns without a new request. A request reaches
  `submit` within two turns of its bytes arriving, so a quiet loop means no batch-mate is on its way, and
  waiting longer would only leave the core idle. Under load the loop never goes quiet and batches fill up to the window; at low concurrency
  a request waits a few microseconds, not the window. Rows that pile up while a run is in flight always
  merge.
- `window_ms == 0` switches batching off: every run holds one request (or one slice of it).
- A request larger than `max_batch_rows` is sliced across runs; batches are filled exactly, so a request
  may also straddle two runs. Its caller gets the rows back whole and in order.
- At most `max_concurrent_runs` runs are in flight (default 1). On CPU one run with all intra-op threads
  is the fastest use of the cores, and the next batch gathers while it runs. On a GPU, 2 lets one batch's
  host-device copies overlap the other's compute.

Bounds and failures, all surfaced as exceptions the service maps to HTTP answers:

    Exception
    ├── BatcherOverloaded  rows queued + in flight would pass `max_queue_rows`: raised at once (HTTP 503
    │                      with Retry-After), never a wait in an unbounded queue
    ├── BatchFailed        `run` raised or returned the wrong number of rows: every caller in that batch gets
    │                      its own BatchFailed, the original error chained as `__cause__`; later batches run
    └── BatcherClosed      submit before `start()` or after `stop()`, or still queued when `stop()` came;
                           also every waiting and later caller if the collector task ever dies (a bug:
                           logged with its traceback), so that nobody waits forever

A caller that goes away (its task is cancelled) gives back its queued rows at once; rows of it already in
a run are counted until that run ends. Nobody else in the batch notices.

One file of about 400 lines, on purpose: the queue accounting (`_queued_rows`, `_waiting_rows`), the
collector, the slicing of requests across runs and the worker threads keep one set of invariants between
them, which reads best in one place.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["BatchFailed", "Batcher", "BatcherClosed", "BatcherOverloaded", "RunFn"]

Array = npt.NDArray[Any]
RunFn = Callable[[Array], list[Array]]
"""Stacked rows [n, ...] -> the graph's outputs, each [n, ...] (e.g. a bound `InferenceSession.run`)."""

OnRun = Callable[[int, int, float], None]
"""Called on the event loop after every run, failed ones included: (requests merged, rows, run seconds)."""

QUIET_TURNS = 3
"""Event-loop turns without a new request after which a batch stops waiting (see the module docstring)."""

_logger = logging.getLogger(__name__)


class BatcherOverloaded(Exception):
    """The queue is full; `retry_after_s` estimates when the rows queued now will have drained."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class BatchFailed(Exception):
    """The model run for this caller's batch failed; `__cause__` holds the original error."""


class BatcherClosed(Exception):
    """The batcher is not running (not yet started, or stopped)."""


_Outcome = tuple[list[Array], Exception | None, float]
"""What a worker hands back for one run: (outputs, None, seconds) or ([], error, seconds)."""


class _Workers:
    """Threads that run batches off the event loop and hand each outcome back with `call_soon_threadsafe`.

    `loop.run_in_executor` on a ThreadPoolExecutor does the same through two kinds of future and the pool's
    bookkeeping, which cost more than the rest of a lone request's trip through the batcher
    (`python -m bench.serve_costs` measures that trip).
    """

    def __init__(self, count: int, name: str) -> None:
        self._jobs: queue.SimpleQueue[tuple[asyncio.Future[_Outcome], Callable[[], _Outcome]] | None]
        self._jobs = queue.SimpleQueue()
        self._threads = [
            threading.Thread(target=self._serve, name=f"batch-{name}-{i}", daemon=True) for i in range(count)
        ]
        for thread in self._threads:
            thread.start()

    def run(self, job: Callable[[], _Outcome]) -> asyncio.Future[_Outcome]:
        """Queue `job` (which must not raise) for a worker; the future completes on the calling loop."""
        future: asyncio.Future[_Outcome] = asyncio.get_running_loop().create_future()
        self._jobs.put((future, job))
        return future

    def stop(self) -> None:
        """Let each thread finish its current job and end (daemon threads: exit never waits for them)."""
        for _ in self._threads:
            self._jobs.put(None)

    def _serve(self) -> None:
        while (item := self._jobs.get()) is not None:
            future, job = item
            outcome = job()
            with contextlib.suppress(RuntimeError):  # the loop has closed: nobody is waiting any more
                future.get_loop().call_soon_threadsafe(_resolve, future, outcome)


def _resolve(future: asyncio.Future[_Outcome], outcome: _Outcome) -> None:
    if not future.done():  # a caller's task cancelled during shutdown cancels this future too
        future.set_result(outcome)


@dataclass(eq=False, slots=True)
class _Request:
    """One caller's rows; `taken` rows have been handed to runs, `done` rows have come back."""

    rows: Array
    size: int  # len(rows)
    future: asyncio.Future[list[Array]]
    arrived: float
    taken: int = 0
    done: int = 0
    parts: list[tuple[int, list[Array]]] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class _Slice:
    request: _Request
    start: int
    stop: int


class Batcher:
    """Merge concurrent `submit` calls into runs of at most `max_batch_rows` rows (see the module doc)."""

    def __init__(
        self,
        run: RunFn,
        *,
        name: str,
        max_batch_rows: int,
        window_ms: float,
        max_queue_rows: int,
        on_run: OnRun | None = None,
        max_concurrent_runs: int = 1,
    ) -> None:
        if max_batch_rows < 1:
            raise ValueError(f"max_batch_rows must be at least 1, got {max_batch_rows}")
        if not window_ms >= 0:  # also rejects NaN
            raise ValueError(f"window_ms must be >= 0, got {window_ms}")
        if max_queue_rows < 1:
            raise ValueError(f"max_queue_rows must be at least 1, got {max_queue_rows}")
        if max_concurrent_runs < 1:
            raise ValueError(f"max_concurrent_runs must be at least 1, got {max_concurrent_runs}")
        self.name = name
        self.max_batch_rows = max_batch_rows
        self.window_s = window_ms / 1000.0
        self.max_queue_rows = max_queue_rows
        self.max_concurrent_runs = max_concurrent_runs
        self._run = run
        self._on_run = on_run
        self._queue: deque[_Request] = deque()
        self._waiting_rows = 0  # rows queued and not yet handed to a run
        self._queued_rows = 0  # waiting + in flight: what max_queue_rows bounds
        self._wakeup = asyncio.Event()
        self._slots = asyncio.Semaphore(max_concurrent_runs)
        self._runs: set[asyncio.Task[None]] = set()
        self._collector: asyncio.Task[None] | None = None
        self._workers: _Workers | None = None
        self._closed = False
        self._arrivals = 0  # requests submitted so far, to tell a quiet event loop
        self._seconds_per_row = 0.0  # moving average, for the Retry-After estimate

    @property
    def queued_rows(self) -> int:
        """Rows waiting or in a run right now (what `max_queue_rows` bounds)."""
        return self._queued_rows

    async def start(self) -> None:
        """Start the collector on the running loop (call from the app's lifespan)."""
        if self._collector is not None or self._closed:
            raise RuntimeError(f"batcher {self.name!r} can only be started once")
        self._workers = _Workers(self.max_concurrent_runs, self.name)
        self._collector = asyncio.create_task(self._collect(), name=f"batcher-{self.name}")
        self._collector.add_done_callback(self._collector_ended)

    async def stop(self) -> None:
        """Refuse new work, fail queued callers with BatcherClosed, and let the runs in flight finish."""
        self._closed = True
        if self._collector is None or self._workers is None:  # never started, or stopped already
            return
        self._collector.cancel()
        await asyncio.wait({self._collector})
        self._fail_queued(f"batcher {self.name!r} stopped before this request ran")
        if self._runs:
            await asyncio.wait(set(self._runs))
        self._workers.stop()
        self._workers = None

    async def submit(self, rows: Array) -> list[Array]:
        """Run `rows` [n, ...] (n >= 1) in some batch; return the caller's n rows of each output, in order."""
        if self._collector is None or self._closed:
            raise BatcherClosed(f"batcher {self.name!r} is not running")
        if rows.ndim < 1 or len(rows) < 1:
            raise ValueError(f"submit needs rows of shape [n >= 1, ...], got shape {rows.shape}")
        n = len(rows)
        if self._queued_rows + n > self.max_queue_rows:
            raise BatcherOverloaded(
                f"batcher {self.name!r} is full: {self._queued_rows} rows queued, {n} more would pass the "
                f"limit of {self.max_queue_rows}",
                retry_after_s=self.window_s + self._queued_rows * self._seconds_per_row,
            )
        request = _Request(rows, n, asyncio.get_running_loop().create_future(), time.monotonic())
        self._queue.append(request)
        self._waiting_rows += n
        self._queued_rows += n
        self._arrivals += 1
        self._wakeup.set()
        try:
            return await request.future
        finally:
            if request.future.cancelled():  # the caller went away: give back what has not run yet
                self._release_untaken(request)

    def _collector_ended(self, task: asyncio.Task[None]) -> None:
        """The collector only ends by stop()'s cancel; if it ever raised, nobody would take queued rows again,
        so close the batcher and fail every waiting caller rather than let them (and later ones) hang."""
        if task.cancelled():
            return
        error = task.exception()
        _logger.error("collector of batcher %r crashed; the batcher is closed", self.name, exc_info=error)
        self._closed = True
        self._fail_queued(f"batcher {self.name!r} closed: its collector failed with {error!r}")

    def _fail_queued(self, message: str) -> None:
        """Fail every waiting caller with its own BatcherClosed."""
        for request in self._queue:
            self._fail(request, BatcherClosed(message))
        self._queue.clear()

    # --- collector: runs on the event loop -------------------------------------------------------------

    async def _collect(self) -> None:
        while True:
            await self._slots.acquire()
            batch = await self._next_batch()
            task = asyncio.create_task(self._run_batch(batch))
            self._runs.add(task)
            task.add_done_callback(self._runs.discard)

    async def _next_batch(self) -> list[_Slice]:
        """Wait for rows, hold the batch open while more keep arriving, and take up to max_batch_rows."""
        while True:
            while self._waiting_rows == 0:
                self._wakeup.clear()
                await self._wakeup.wait()
            if self.window_s > 0:
                await self._gather()
            batch = self._take()
            if batch:  # empty when every waiting caller went away meanwhile
                return batch

    async def _gather(self) -> None:
        """Return when the batch is full, the window has closed, or the loop went quiet (module docstring)."""
        while self._queue[0].taken == self._queue[0].size:  # an abandoned head must not time the window
            self._queue.popleft()
        deadline = self._queue[0].arrived + self.window_s
        quiet = 0
        while (
            quiet < QUIET_TURNS and self._waiting_rows < self.max_batch_rows and time.monotonic() < deadline
        ):
            arrivals = self._arrivals
            await asyncio.sleep(0)  # one turn of the loop: other requests get parsed and reach submit
            quiet = quiet + 1 if self._arrivals == arrivals else 0

    def _take(self) -> list[_Slice]:
        """Pop the oldest waiting rows, filling the batch exactly (the last request taken may be sliced)."""
        batch: list[_Slice] = []
        room = self.max_batch_rows
        while room and self._queue:
            request = self._queue[0]
            if request.taken == request.size:  # abandoned or failed while waiting
                self._queue.popleft()
                continue
            count = min(room, request.size - request.taken)
            batch.append(_Slice(request, request.taken, request.taken + count))
            request.taken += count
            self._waiting_rows -= count
            room -= count
            if request.taken == request.size:
                self._queue.popleft()
            if self.window_s == 0:  # batching off: one request per run
                break
        return batch

    async def _run_batch(self, batch: list[_Slice]) -> None:
        rows = sum(s.stop - s.start for s in batch)
        requests = list(dict.fromkeys(s.request for s in batch))  # distinct, in batch order
        assert self._workers is not None
        try:
            outputs, failure, seconds = await self._workers.run(lambda: self._stack_and_run(batch, rows))
        except asyncio.CancelledError:  # the loop is shutting down under us: nobody may hang
            self._end_run(rows)
            for request in requests:
                self._fail(request, BatcherClosed(f"batcher {self.name!r} was cancelled during a run"))
            raise
        self._end_run(rows)
        if failure is None:
            self._deliver(batch, outputs)
        else:
            for request in requests:
                error = BatchFailed(
                    f"batcher {self.name!r}: model run failed on a batch of {rows} rows from "
                    f"{len(requests)} request(s): {failure!r}"
                )
                error.__cause__ = failure
                self._fail(request, error)
        self._record(len(requests), rows, seconds)

    def _stack_and_run(self, batch: list[_Slice], rows: int) -> _Outcome:
        """Worker thread: stack the slices, run the graph once, check that every output has one row per input.

        Returns (outputs, None, seconds) or ([], error, seconds): the error is handed over rather than
        raised so that a failed run is timed like any other.
        """
        began = time.perf_counter()
        try:
            parts = [s.request.rows[s.start : s.stop] for s in batch]
            stacked = parts[0] if len(parts) == 1 else np.concatenate(parts)
            outputs = self._run(stacked)
            for i, output in enumerate(outputs):
                if output.ndim < 1 or len(output) != rows:
                    raise ValueError(f"output {i} has shape {output.shape}, expected {rows} rows")
        except Exception as error:
            return [], error, time.perf_counter() - began
        return outputs, None, time.perf_counter() - began

    def _end_run(self, rows: int) -> None:
        self._queued_rows -= rows
        self._slots.release()

    def _deliver(self, batch: list[_Slice], outputs: list[Array]) -> None:
        """Split a run's outputs back to the callers; complete each request once all its rows are back."""
        offset = 0
        for s in batch:
            count = s.stop - s.start
            request = s.request
            if request.future.done():  # cancelled, or failed in another run
                offset += count
                continue
            request.parts.append((s.start, [output[offset : offset + count] for output in outputs]))
            request.done += count
            offset += count
            if request.done == request.size:
                if len(request.parts) == 1:
                    request.future.set_result(request.parts[0][1])
                else:
                    request.parts.sort(key=lambda part: part[0])
                    pieces = [piece for _, piece in request.parts]
                    request.future.set_result(
                        [np.concatenate(column) for column in zip(*pieces, strict=True)]
                    )
                request.parts.clear()

    def _fail(self, request: _Request, error: Exception) -> None:
        if not request.future.done():
            request.future.set_exception(error)
        request.parts.clear()
        self._release_untaken(request)

    def _release_untaken(self, request: _Request) -> None:
        """Give back a finished request's queued rows; `_take` drops the request when it reaches it."""
        untaken = request.size - request.taken
        request.taken = request.size
        self._waiting_rows -= untaken
        self._queued_rows -= untaken

    def _record(self, requests: int, rows: int, seconds: float) -> None:
        if seconds > 0:
            self._seconds_per_row += 0.2 * (seconds / rows - self._seconds_per_row)
        if self._on_run is not None:
            try:
                self._on_run(requests, rows, seconds)
            except Exception:  # a metrics hook must not fail the callers whose results are already set
                _logger.exception("on_run hook of batcher %r raised", self.name)
