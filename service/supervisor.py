"""The supervisor for WORKERS > 1: worker processes on one shared socket, signals passed on, dead ones replaced."""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import socket
import time
from multiprocessing.context import SpawnProcess
from typing import Any

import uvicorn
from uvicorn.config import STARTUP_FAILURE

from service.server import serve_app
from service.settings import Settings

log = logging.getLogger(__name__)

SHUTDOWN_MARGIN_SECONDS = 10.0
"""How long the supervisor waits for a worker beyond its drain and shutdown timeout before killing it."""


class Supervisor:
    """WORKERS processes accepting on one socket bound here. SIGHUP is passed on to every worker, which
    reloads its models; SIGTERM or SIGINT sends SIGTERM to every worker, which drains and stops; a worker
    that dies is replaced, except one that failed to start (then all stop, exit status 3, as uvicorn's).

    Workers are spawned with SIGHUP blocked, so one that arrives before a worker has its handler is held
    for it rather than killing it (SIGHUP's default action); `ServiceServer.capture_signals` unblocks it.
    """

    def __init__(self, settings: Settings, log_config: dict[str, Any] | None) -> None:
        self.settings = settings
        self.log_config = log_config
        self.signals: list[int] = []
        self.workers: list[SpawnProcess] = []
        self.sock: socket.socket | None = None

    def run(self) -> int:
        for handled in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(handled, lambda sig, frame: self.signals.append(sig))
        # Config only binds the socket here (with uvicorn's "Uvicorn running on ..." line); workers build theirs.
        self.sock = uvicorn.Config(
            "service.app:app_from_env", host=self.settings.host, port=self.settings.port, log_config=None
        ).bind_socket()
        try:
            self.workers = [self._start() for _ in range(self.settings.workers)]
            log.info("supervisor [%d] started %d workers", os.getpid(), len(self.workers))
            while True:
                while self.signals:
                    sig = self.signals.pop(0)
                    if sig != signal.SIGHUP:
                        log.info(
                            "received %s: stopping %d workers", signal.Signals(sig).name, len(self.workers)
                        )
                        return self._stop()
                    log.info("received SIGHUP: each worker reloads its models")
                    self._send(signal.SIGHUP)
                if (status := self._replace_dead()) is not None:
                    return status
                time.sleep(0.1)
        finally:
            self.sock.close()

    def _start(self) -> SpawnProcess:
        assert self.sock is not None
        process = multiprocessing.get_context("spawn").Process(
            target=serve_app, args=(self.settings, self.log_config, [self.sock]), name="vae-serving worker"
        )
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
        try:
            process.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        return process

    def _send(self, sig: int) -> None:
        for worker in self.workers:
            if worker.pid is not None and worker.is_alive():
                os.kill(worker.pid, sig)

    def _replace_dead(self) -> int | None:
        for index, worker in enumerate(self.workers):
            if worker.is_alive():
                continue
            if worker.exitcode == STARTUP_FAILURE:
                log.error("worker [%s] failed to start; stopping", worker.pid)
                self._stop()
                return STARTUP_FAILURE
            log.warning("worker [%s] exited (status %s); starting another", worker.pid, worker.exitcode)
            self.workers[index] = self._start()
        return None

    def _stop(self) -> int:
        self._send(signal.SIGTERM)
        deadline = time.monotonic() + (
            self.settings.drain_seconds + self.settings.shutdown_timeout + SHUTDOWN_MARGIN_SECONDS
        )
        for worker in self.workers:
            worker.join(max(0.0, deadline - time.monotonic()))
            if worker.is_alive():
                log.error("worker [%s] did not stop in time; killing it", worker.pid)
                worker.kill()
                worker.join()
        return 0
