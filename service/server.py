"""The HTTP server: uvicorn with the connection limits and the lifecycle that the service needs.

`run(settings, log_config)` serves the app of `create_app(settings)`: in this process for WORKERS=1, else in
WORKERS processes under a small supervisor. What uvicorn (0.54-0.55, httptools) does not do by itself, and
what this module adds:

* Request heads have no size limit: httptools accumulates a header of any size before its callback, so two
  128 MiB headers stall the event loop. `LimitedHttpToolsProtocol` feeds the parser at most MAX_HEADER_BYTES
  of request line and headers and counts header lines (MAX_HEADERS): past either, 431; a request target over
  MAX_URL_BYTES, 414. These answers are in the service's error shape with `Connection: close`.
* Nothing times out while a request is read: uvicorn's only timer is keep-alive, armed after a response.
  HEADER_TIMEOUT runs from the connection (or the first byte of a later request) to the end of the head,
  then the socket is closed; BODY_TIMEOUT bounds the whole body, then 408 (if no response started) and close.
* Connections are unbounded: `limit_concurrency` answers 503 only once a head has been read, so idle sockets
  still take file descriptors until accept() fails with EMFILE and every client hangs. Past MAX_CONNECTIONS
  open connections per worker, a new one gets a minimal 503 and is closed before anything is read; one
  warning line every few seconds says how many were refused.
* SIGTERM stops at once: here it first sets `app.state.draining` (/readyz answers 503) and keeps serving for
  DRAIN_SECONDS, then stops accepting and gives in-flight requests SHUTDOWN_TIMEOUT before it cuts them
  (uvicorn waits forever by default, so a client that never finishes its body holds the process); one still
  receiving its body then gets a 503.
* SIGHUP kills a single-process server and makes uvicorn's multiprocess supervisor replace its workers.
  Here every worker reloads its models in place (`Registry.reload`) and keeps its connections.
* `server: uvicorn` is sent only with SERVER_HEADER=true, and WebSockets are off (ws="none"): the service has
  no WebSocket route, and an upgraded connection would escape the limits above.

Answers written here rather than by the app (431, 414, 408, 503) half-close the socket and discard what the
client still sends for up to LINGER_SECONDS: closing with unread input makes the kernel send a reset, which
can destroy the answer before the client reads it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import resource
import signal
import socket
import threading
import time
from asyncio import TimerHandle
from collections.abc import Awaitable, Callable, Generator
from dataclasses import dataclass
from multiprocessing.context import SpawnProcess
from types import FrameType
from typing import Any

import httptools
import uvicorn
from uvicorn.config import STARTUP_FAILURE
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
from uvicorn.server import ServerState

from service.app import ServiceApp, create_app
from service.errors import error_body
from service.settings import Settings

log = logging.getLogger(__name__)

LINGER_SECONDS = 2.0
"""After an answer of our own, how long what the client still sends is read and dropped before closing."""
REFUSAL_LOG_SECONDS = 5.0
"""At most one warning about refused connections per this many seconds (per worker)."""
RESERVED_FILES = 64
"""File descriptors a worker needs besides its connections: listening socket, event loop, pipes, logs."""
SHUTDOWN_MARGIN_SECONDS = 10.0
"""How long the supervisor waits for a worker beyond its drain and shutdown timeout before killing it."""


@dataclass(frozen=True)
class Limits:
    """What one connection may take (settings of the same names; sizes in bytes, times in seconds)."""

    max_connections: int
    max_header_bytes: int
    max_headers: int
    max_url_bytes: int
    header_timeout: float
    body_timeout: float
    shutdown_timeout: float

    @classmethod
    def from_settings(cls, settings: Settings) -> Limits:
        return cls(
            max_connections=settings.max_connections,
            max_header_bytes=settings.max_header_bytes,
            max_headers=settings.max_headers,
            max_url_bytes=settings.max_url_bytes,
            header_timeout=settings.header_timeout,
            body_timeout=settings.body_timeout,
            shutdown_timeout=settings.shutdown_timeout,
        )


class ConnectionState(ServerState):
    """uvicorn's state shared by one server's connections (its `connections` set is the per-worker count),
    plus the limits and the tally of refused connections behind the rate-limited warning."""

    def __init__(self, limits: Limits) -> None:
        super().__init__()
        self.limits = limits
        self.refused = 0
        self._report: TimerHandle | None = None
        self.stopping = False  # the server stopped accepting: our answers close without lingering

    def note_refused(self, loop: asyncio.AbstractEventLoop) -> None:
        """Count a refused connection; the first one is reported at once, later ones every few seconds."""
        self.refused += 1
        if self._report is None:
            self._flush(loop)

    def _flush(self, loop: asyncio.AbstractEventLoop) -> None:
        if not self.refused:
            self._report = None
            return
        log.warning(
            "refused %d connection(s): %d open, MAX_CONNECTIONS is %d",
            self.refused,
            len(self.connections),
            self.limits.max_connections,
        )
        self.refused = 0
        self._report = loop.call_later(REFUSAL_LOG_SECONDS, self._flush, loop)


class _Refused(Exception):
    """Raised inside a parser callback to stop parsing a request that breaks a limit."""


def error_message(status: int, message: str, headers: list[tuple[bytes, bytes]]) -> bytes:
    """A whole HTTP/1.1 response in the service's error shape, closing the connection."""
    body = error_body(status, message)
    lines = [STATUS_LINE[status]]
    lines += [name + b": " + value + b"\r\n" for name, value in headers]
    lines += [
        b"content-type: application/json\r\n",
        b"content-length: %d\r\n" % len(body),
        b"connection: close\r\n",
        b"\r\n",
        body,
    ]
    return b"".join(lines)


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with MAX_CONNECTIONS, head limits and header/body timeouts (module
    docstring). One timer per connection: the head's until its end, then the body's until the message ends;
    between requests uvicorn's keep-alive timer runs, and the next byte starts the head's again."""

    def __init__(
        self,
        config: uvicorn.Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        if not isinstance(server_state, ConnectionState):
            raise TypeError("LimitedHttpToolsProtocol runs under service.server.ServiceServer")
        self.state = server_state
        self.limits = server_state.limits
        self.timer: TimerHandle | None = None
        self.in_head = True  # reading a request line and headers (or waiting for one)
        self.head_bytes = 0
        self.header_lines = 0
        self.refusal: tuple[int, str] | None = None  # set by a parser callback that raises _Refused
        self.answered = False  # we answered and closed the request side: input is dropped

    # connection

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if len(self.connections) >= self.limits.max_connections:
            self.transport = transport
            self.answered = True
            transport.write(
                self._error(503, "too many open connections; retry later", (b"retry-after", b"1"))
            )
            transport.close()
            self.state.note_refused(self.loop)
            return
        super().connection_made(transport)
        self._arm(self.limits.header_timeout, self._head_timed_out)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        """uvicorn's, but the parser gets at most MAX_HEADER_BYTES of a head."""
        if self.answered:
            return
        self._unset_keepalive_if_required()
        if self.in_head and self.timer is None:  # the first byte of a later request
            self._arm(self.limits.header_timeout, self._head_timed_out)
        while data and not self.answered and not self.transport.is_closing():
            if self.in_head:
                room = self.limits.max_header_bytes - self.head_bytes
                if room <= 0:
                    limit = self.limits.max_header_bytes
                    self._answer(431, f"request line and headers exceed {limit} bytes (MAX_HEADER_BYTES)")
                    return
                chunk, data = data[:room], data[room:]
                self.head_bytes += len(chunk)
            else:  # a pipelined head arriving with the end of a body is counted from the next read on
                chunk, data = data, b""
            try:
                self.parser.feed_data(chunk)
            except httptools.HttpParserUpgrade:
                self._unsupported_upgrade_warning()  # ws="none": the service has no WebSocket routes
                return
            except httptools.HttpParserError:
                if self.refusal is not None:
                    self._answer(*self.refusal)
                else:
                    self.logger.warning("Invalid HTTP request received.")
                    self.send_400_response("Invalid HTTP request received.")
                return

    def shutdown(self) -> None:
        """The server stops: a request still receiving its body gets until SHUTDOWN_TIMEOUT, then 503 (rather
        than uvicorn's cancellation at that deadline, which answers a plain-text 500)."""
        super().shutdown()
        if self.answered:  # lingering after an answer of ours
            self.transport.close()
        elif not self.in_head and self.timer is not None:  # the body timer runs
            seconds = self.limits.shutdown_timeout * 0.9
            if self.timer.when() > self.loop.time() + seconds:
                self._arm(seconds, lambda: self._answer(503, "the server is shutting down; retry"))

    # parser callbacks

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.header_lines = 0

    def on_url(self, url: bytes) -> None:
        super().on_url(url)
        if len(self.url) > self.limits.max_url_bytes:
            self._refuse(414, f"request target exceeds {self.limits.max_url_bytes} bytes (MAX_URL_BYTES)")

    def on_header(self, name: bytes, value: bytes) -> None:
        self.header_lines += 1
        if self.header_lines > self.limits.max_headers:
            self._refuse(431, f"more than {self.limits.max_headers} header lines (MAX_HEADERS)")
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self.in_head = False
        self._disarm()
        super().on_headers_complete()
        self._arm(self.limits.body_timeout, self._body_timed_out)

    def on_message_complete(self) -> None:
        self._disarm()
        self.in_head = True
        self.head_bytes = 0
        super().on_message_complete()

    # limits

    def _refuse(self, status: int, message: str) -> None:
        self.refusal = (status, message)
        raise _Refused(message)

    def _head_timed_out(self) -> None:
        self.timer = None
        self.transport.close()

    def _body_timed_out(self) -> None:
        self.timer = None
        if self.cycle is not None and self.cycle.response_started:
            self.transport.close()
        else:
            self._answer(
                408, f"request body not received within {self.limits.body_timeout:g} s (BODY_TIMEOUT)"
            )

    def _answer(self, status: int, message: str) -> None:
        """Answer in the error shape, stop reading requests, and close once the client had time to read it."""
        self.answered = True
        self._disarm()
        self._unset_keepalive_if_required()
        if self.cycle is not None and not self.cycle.response_complete:
            # The app, if it is waiting for this body, reads a disconnect and its answer goes nowhere.
            self.cycle.disconnected = True
            self.cycle.message_event.set()
        self.transport.write(self._error(status, message))
        if self.access_log:  # uvicorn's access line; method and path are known once the head is read
            client = f"{self.client[0]}:{self.client[1]}" if self.client else "-"
            scope = self.scope or {}
            method, path = scope.get("method", "-"), scope.get("path", "-")
            self.access_logger.info('%s - "%s %s HTTP/%s" %d', client, method, path, "1.1", status)
        if self.state.stopping:
            self.transport.close()
        elif self.transport.can_write_eof():
            self.transport.write_eof()
            self.timer = self.loop.call_later(LINGER_SECONDS, self.transport.close)
        else:
            self.transport.close()

    def _error(self, status: int, message: str, *headers: tuple[bytes, bytes]) -> bytes:
        return error_message(status, message, [*self.server_state.default_headers, *headers])

    def _arm(self, seconds: float, callback: Callable[[], None]) -> None:
        self._disarm()
        self.timer = self.loop.call_later(seconds, callback)

    def _disarm(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


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
    raise_open_file_limit(settings.max_connections)
    if settings.workers == 1:
        serve_app(settings, log_config, sockets=None)
        return 0
    return Supervisor(settings, log_config).run()
