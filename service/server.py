"""The HTTP server: uvicorn with the connection limits and the lifecycle that the service needs.

`run(settings, log_config)` serves the app of `create_app(settings)`: in this process for WORKERS=1, else in
WORKERS processes under `supervisor.Supervisor`. Request heads, timeouts and the connection cap are
`protocol.LimitedHttpToolsProtocol`'s; what this module adds to uvicorn (0.54-0.55) besides:

* SIGTERM stops at once: here it first sets `app.state.draining` (/readyz answers 503) and keeps serving for
  DRAIN_SECONDS, then stops accepting and gives in-flight requests SHUTDOWN_TIMEOUT before it cuts them
  (uvicorn waits forever by default, so a client that never finishes its body holds the process); one still
  receiving its body then gets a 503.
* SIGHUP kills a single-process server and makes uvicorn's multiprocess supervisor replace its workers.
  Here every worker reloads its models in place (`Registry.reload`) and keeps its connections.
* `server: uvicorn` is sent only with SERVER_HEADER=true, and WebSockets are off (ws="none"): the service has
  no WebSocket route, and an upgraded connection would escape the protocol's limits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
import signal
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Generator
from types import FrameType
from typing import Any

import uvicorn
from uvicorn.config import STARTUP_FAILURE

from service.app import ServiceApp, create_app
from service.protocol import ConnectionState, LimitedHttpToolsProtocol, Limits
from service.settings import Settings

log = logging.getLogger(__name__)

RESERVED_FILES = 64
"""File descriptors a worker needs besides its connections: listening socket, event loop, pipes, logs."""


class ServiceServer(uvicorn.Server):
    """uvicorn's server with the service's connection state, a drain on SIGTERM and a model reload on SIGHUP.

    Signals: SIGTERM drains for DRAIN_SECONDS, then stops (a second one ends the drain); SIGINT stops without
    draining (a second one skips waiting for requests, as in uvicorn); SIGHUP reloads the models. Handlers only
    set flags; `on_tick` (every 0.1 s on the loop) acts on them. Unlike uvicorn, the signal is not raised
    again after a graceful stop: the process exits 0.
    """

    def __init__(self, config: uvicorn.Config, app: ServiceApp, settings: Settings) -> None:
        super().__init__(config)
        self.connection_state = ConnectionState(Limits.from_settings(settings))
        self.server_state = self.connection_state
        self.app = app
        self.drain_seconds = settings.drain_seconds
        self.drain_until: float | None = None
        self.drain_announced = False
        self.reload_requested = False
        self.reloading: asyncio.Task[None] | None = None

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        handlers = {
            signal.SIGINT: self.handle_exit,
            signal.SIGTERM: self.handle_exit,
            signal.SIGHUP: self.handle_hup,
        }
        original = {sig: signal.signal(sig, handler) for sig, handler in handlers.items()}
        signal.pthread_sigmask(signal.SIG_UNBLOCK, handlers)  # Supervisor starts workers with SIGHUP blocked
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.app.state.draining = True
        drain = sig == signal.SIGTERM and self.started and self.drain_seconds > 0
        if drain and self.drain_until is None and not self.should_exit:
            self.drain_until = time.monotonic() + self.drain_seconds
        elif self.should_exit and sig == signal.SIGINT:
            self.force_exit = True
        else:
            self.should_exit = True

    def handle_hup(self, sig: int, frame: FrameType | None) -> None:
        self.reload_requested = True

    async def on_tick(self, counter: int) -> bool:
        if self.reload_requested and (self.reloading is None or self.reloading.done()):
            self.reload_requested = False  # requests during a reload run one more after it
            self.reloading = asyncio.create_task(self.reload_models())
        if self.drain_until is not None and not self.should_exit:
            if not self.drain_announced:
                self.drain_announced = True
                log.info("draining (SIGTERM): /readyz answers 503, serving for %g s more", self.drain_seconds)
            self.should_exit = time.monotonic() >= self.drain_until
        return await super().on_tick(counter)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self.connection_state.stopping = True
        if self.reloading is not None and not self.reloading.done():
            self.reloading.cancel()  # the lifespan's shutdown stops the registry next
            with contextlib.suppress(asyncio.CancelledError):
                await self.reloading
        await super().shutdown(sockets)

    async def reload_models(self) -> None:
        log.info("reloading models (SIGHUP) in worker %d", os.getpid())
        reload: Callable[[], Awaitable[object]] | None = getattr(self.app.state.registry, "reload", None)
        if reload is None:
            log.warning("this registry cannot reload models (no Registry.reload)")
            return
        try:
            await reload()
        except Exception:
            log.exception(
                "model reload failed in worker %d; the models loaded before stay served", os.getpid()
            )
        else:
            log.info("models reloaded in worker %d", os.getpid())


def server_config(settings: Settings, app: ServiceApp, log_config: dict[str, Any] | None) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        http=LimitedHttpToolsProtocol,
        ws="none",
        log_config=log_config,
        log_level=settings.log_level,
        access_log=settings.access_log,
        server_header=settings.server_header,
        # uvicorn annotates these two int but hands them to call_later and asyncio.timeout, which take floats
        timeout_keep_alive=settings.keep_alive_timeout,  # type: ignore[arg-type]
        timeout_graceful_shutdown=settings.shutdown_timeout,  # type: ignore[arg-type]
    )


def serve_app(
    settings: Settings, log_config: dict[str, Any] | None, sockets: list[socket.socket] | None
) -> None:
    """Build the app and serve it in this process until a signal stops it (a worker's whole life)."""
    app = create_app(settings)
    server = ServiceServer(server_config(settings, app, log_config), app, settings)
    server.run(sockets=sockets)
    if not server.started:
        raise SystemExit(STARTUP_FAILURE)


def open_file_warning(max_connections: int, soft: int) -> str | None:
    """Why RLIMIT_NOFILE's soft limit is too low for MAX_CONNECTIONS, or None. The limit is per process, so
    each worker needs its own connections plus RESERVED_FILES."""
    needed = max_connections + RESERVED_FILES
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return None
    return (
        f"open-file limit (RLIMIT_NOFILE) {soft} is below MAX_CONNECTIONS ({max_connections}) + {RESERVED_FILES}: "
        "past it, new connections fail before they can be refused; raise `ulimit -n` or lower MAX_CONNECTIONS"
    )


def raise_open_file_limit(max_connections: int) -> None:
    """Raise the soft open-file limit as far as MAX_CONNECTIONS needs (up to the hard limit), or warn."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = max_connections + RESERVED_FILES
    if open_file_warning(max_connections, soft) and (hard == resource.RLIM_INFINITY or hard > soft):
        raised = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))
        log.info("raised the open-file limit (RLIMIT_NOFILE) from %d to %d for MAX_CONNECTIONS", soft, raised)
        soft = raised
    if warning := open_file_warning(max_connections, soft):
        log.warning(warning)


def run(settings: Settings, log_config: dict[str, Any] | None) -> int:
    """Serve until SIGTERM or SIGINT; the exit status (0 after a graceful stop)."""
    from service.supervisor import Supervisor  # here, not at the top: it imports serve_app from this module

    raise_open_file_limit(settings.max_connections)
    if settings.workers == 1:
        serve_app(settings, log_config, sockets=None)
        return 0
    return Supervisor(settings, log_config).run()
