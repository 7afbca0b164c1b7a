"""Parsing large JSON bodies off the event loop, in a small pool of processes.

orjson and numpy hold the GIL while they turn a 16 MiB JSON body into arrays (tens of milliseconds), so a
thread would not help: every other request, `/healthz` included, would wait on the GIL. Bodies of at least
PARSE_OFFLOAD_BYTES are therefore parsed by `service.requests.parse_body` in one of PARSE_WORKERS processes
(spawned, not forked: the server process runs onnxruntime's threads); the bytes go over a pipe and the checked
float32 array comes back. Smaller bodies and .npy bodies (a buffer view, no parsing) stay inline, where a
round trip to another process would cost more than it saves. PARSE_WORKERS=0 parses in a thread instead.

The pool is bounded by construction: PARSE_WORKERS processes, and a caller waits for a free one; client
errors (`ServiceError`) cross the process boundary intact. A worker that dies (killed, out of memory) breaks
the pool: it is replaced, and that one body is parsed in a thread.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import signal
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")


def _ignore_group_signals() -> None:
    """Workers leave Ctrl-C and SIGHUP to the server process: a signal sent to the whole process group
    (a terminal hangup, `kill -HUP -PGID`) must not kill them under the server."""
    for signum in (signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)


def _ready() -> bool:
    """Run once per worker at start, so the first request does not pay for the imports."""
    import service.requests  # noqa: F401  (the parser and everything it imports)

    return True


class ParsePool:
    def __init__(self, workers: int, offload_bytes: int) -> None:
        self.workers = workers
        self.offload_bytes = offload_bytes
        self._pool: ProcessPoolExecutor | None = None

    async def start(self) -> None:
        if self.workers:
            self._pool = self._new_pool()
            loop = asyncio.get_running_loop()
            await asyncio.gather(*(loop.run_in_executor(self._pool, _ready) for _ in range(self.workers)))

    async def stop(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    def offloads(self, size: int) -> bool:
        return size >= self.offload_bytes

    async def run(self, function: Callable[..., T], *args: object) -> T:
        """`function(*args)` in a worker process (a thread when PARSE_WORKERS=0); its exception re-raised."""
        pool = self._pool
        if pool is None:
            return await asyncio.to_thread(function, *args)
        try:
            return await asyncio.get_running_loop().run_in_executor(pool, function, *args)
        except BrokenProcessPool:
            log.error("a body-parsing process died; starting a new pool (this body is parsed in a thread)")
            if self._pool is pool:  # not replaced yet by another caller that saw the same failure
                pool.shutdown(wait=False, cancel_futures=True)
                self._pool = self._new_pool()
            return await asyncio.to_thread(function, *args)

    def _new_pool(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(
            self.workers, mp_context=multiprocessing.get_context("spawn"), initializer=_ignore_group_signals
        )
