"""The HTTP/1.1 protocol: uvicorn's httptools protocol with the connection limits that uvicorn (0.54-0.55)
lacks. `server.server_config` installs it; it runs under `server.ServiceServer`, whose `ConnectionState`
(defined here) carries the limits and counts the connections.

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

Answers written here rather than by the app (431, 414, 408, 503) half-close the socket and discard what the
client still sends for up to LINGER_SECONDS: closing with unread input makes the kernel send a reset, which
can destroy the answer before the client reads it.
"""

from __future__ import annotations

import asyncio
import logging
from asyncio import TimerHandle
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httptools
import orjson
import uvicorn
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
from uvicorn.server import ServerState

from service.errors import error_body
from service.settings import Settings

log = logging.getLogger(__name__)

LINGER_SECONDS = 2.0
"""After an answer of our own, how long what the client still sends is read and dropped before closing."""
REFUSAL_LOG_SECONDS = 5.0
"""At most one warning about refused connections per this many seconds (per worker)."""


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


def error_message(
    status: int, message: str, headers: list[tuple[bytes, bytes]], *, v2: bool = False
) -> bytes:
    """A whole HTTP/1.1 response in the service's error shape (the V2 protocol's for a /v2 target), closing
    the connection."""
    body = orjson.dumps({"error": message}) if v2 else error_body(status, message)
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
        v2 = getattr(self, "url", b"").startswith(b"/v2")  # the target as far as it was read
        return error_message(status, message, [*self.server_state.default_headers, *headers], v2=v2)

    def _arm(self, seconds: float, callback: Callable[[], None]) -> None:
        self._disarm()
        self.timer = self.loop.call_later(seconds, callback)

    def _disarm(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
