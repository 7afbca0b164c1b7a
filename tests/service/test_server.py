"""service.server and service.protocol over real sockets: head limits, timeouts and the connection cap against
an in-process server on a free loopback port; SIGTERM's drain, SIGHUP's reload and the open-file limit against
`python -m service`."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager, suppress
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from service.app import create_app
from service.protocol import LINGER_SECONDS
from service.registry import Registry
from service.server import RESERVED_FILES, ServiceServer, open_file_warning, server_config
from tests.service.conftest import MODEL, NEWEST, make_settings, write_model
from tests.service.test_main import ROOT, _Output

pytestmark = pytest.mark.anyio

# ---- an in-process server and a raw client --------------------------------------------------------------


@asynccontextmanager
async def running(model_dir: Path, **overrides: Any) -> AsyncIterator[tuple[ServiceServer, int]]:
    """ServiceServer serving the tiny models on a free loopback port, in this event loop."""
    settings = make_settings(model_dir, host="127.0.0.1", port=0, parse_workers=0, **overrides)
    app = create_app(settings)
    server = ServiceServer(server_config(settings, app, log_config=None), app, settings)
    task = asyncio.create_task(server.serve())
    async with asyncio.timeout(30):
        while not server.started:
            assert not task.done(), "the server stopped during start-up"
            await asyncio.sleep(0.01)
    try:
        yield server, server.servers[0].sockets[0].getsockname()[1]
    finally:
        server.should_exit = True
        await task


class Answer:
    """An HTTP response read off a raw socket."""

    def __init__(self, raw: bytes) -> None:
        head, _, self.body = raw.partition(b"\r\n\r\n")
        status_line, *lines = head.decode("latin-1").split("\r\n")
        self.status = int(status_line.split()[1])
        self.headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}

    def error(self) -> dict[str, Any]:
        body: dict[str, Any] = orjson.loads(self.body)
        return body["error"]  # type: ignore[no-any-return]


async def send_and_read(port: int, data: bytes, timeout: float = 10) -> tuple[bytes, float]:
    """Send `data` on a new connection and read until the server closes it: (what came, seconds taken)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    start = time.monotonic()
    try:
        writer.write(data)
        async with asyncio.timeout(timeout):
            received = await reader.read()
        return received, time.monotonic() - start
    finally:
        writer.close()
        with suppress(ConnectionError):
            await writer.wait_closed()


def request(target: str = "/healthz", headers: list[bytes] | None = None, close: bool = False) -> bytes:
    lines = [f"GET {target} HTTP/1.1\r\nHost: t\r\n".encode(), *(headers or [])]
    return b"".join([*lines, b"Connection: close\r\n" if close else b"", b"\r\n"])


async def healthy(port: int) -> None:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
        assert (await client.get("/healthz")).status_code == 200


# ---- head limits ----------------------------------------------------------------------------------------

HEADER_LINE = b"X-Pad: %d\r\n"


@pytest.mark.parametrize(
    ("data", "status", "setting"),
    [
        (request(headers=[b"X-Big: " + b"a" * (1 << 20) + b"\r\n"]), 431, "MAX_HEADER_BYTES"),
        (request(headers=[b"X-Big: " + b"a" * 70_000 + b"\r\n"] * 2), 431, "MAX_HEADER_BYTES"),
        (request(headers=[HEADER_LINE % i for i in range(100)]), 431, "MAX_HEADERS"),  # with Host: 101
        (request("/healthz?" + "q" * 9000), 414, "MAX_URL_BYTES"),
    ],
    ids=["one-1MiB-header", "two-70KB-headers", "101-header-lines", "9000-byte-url"],
)
async def test_a_head_past_a_limit_is_answered_in_the_error_shape_and_closed(
    model_dir: Path, data: bytes, status: int, setting: str
) -> None:
    async with running(model_dir) as (_, port):
        raw, seconds = await send_and_read(port, data)
        answer = Answer(raw)
        assert answer.status == status
        assert answer.headers["connection"] == "close"
        assert answer.headers["content-type"] == "application/json"
        assert answer.error()["status"] == status and answer.error()["field"] is None
        assert setting in answer.error()["message"]
        assert seconds < LINGER_SECONDS  # closed once we had read the answer, not after the linger
        await healthy(port)


async def test_a_v2_target_gets_the_protocols_error_shape(model_dir: Path) -> None:
    async with running(model_dir) as (_, port):
        raw, _ = await send_and_read(port, request("/v2/health/ready?" + "q" * 9000))
        answer = Answer(raw)
        assert answer.status == 414
        body = orjson.loads(answer.body)
        assert list(body) == ["error"] and "MAX_URL_BYTES" in body["error"]


@pytest.mark.parametrize(
    "data",
    [
        request(headers=[HEADER_LINE % i for i in range(98)], close=True),  # with Host and Connection: 100
        request("/healthz?" + "q" * (8192 - len("/healthz?")), close=True),
        request(headers=[b"X-Big: " + b"a" * 60_000 + b"\r\n"], close=True),
    ],
    ids=["100-header-lines", "8192-byte-url", "60KB-header"],
)
async def test_a_head_within_the_limits_is_served(model_dir: Path, data: bytes) -> None:
    async with running(model_dir) as (_, port):
        raw, _ = await send_and_read(port, data)
        assert Answer(raw).status == 200


# ---- timeouts -------------------------------------------------------------------------------------------


async def test_a_connection_that_sends_nothing_is_closed_after_the_header_timeout(model_dir: Path) -> None:
    async with running(model_dir, header_timeout=0.5) as (_, port):
        raw, seconds = await send_and_read(port, b"")
        assert raw == b"" and 0.4 < seconds < 2


async def test_a_head_trickled_byte_by_byte_is_closed_after_the_header_timeout(model_dir: Path) -> None:
    """Slowloris: each byte arrives in time, the head never ends; the timeout counts from the connection."""
    async with running(model_dir, header_timeout=0.6) as (_, port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        start = time.monotonic()
        writer.write(b"GET /healthz HTTP/1.1\r\nX-Slow: ")
        with suppress(ConnectionError):
            while not reader.at_eof() and time.monotonic() - start < 5:
                writer.write(b"a")
                with suppress(TimeoutError):
                    await asyncio.wait_for(reader.read(), 0.1)
        seconds = time.monotonic() - start
        writer.close()
        with suppress(ConnectionError):
            await writer.wait_closed()
        assert 0.5 < seconds < 2


async def test_a_body_shorter_than_its_content_length_gets_408_after_the_body_timeout(
    model_dir: Path,
) -> None:
    head = b"POST /v1/models/tiny/sample HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
    async with running(model_dir, body_timeout=0.5) as (_, port):
        raw, seconds = await send_and_read(port, head + b"Content-Length: 100\r\n\r\n" + b'{"n": ')
        answer = Answer(raw)
        assert answer.status == 408 and answer.headers["connection"] == "close"
        assert answer.error() == {
            "status": 408,
            "field": None,
            "message": "request body not received within 0.5 s (BODY_TIMEOUT)",
        }
        assert 0.4 < seconds < 2
        await healthy(port)


async def test_an_idle_keep_alive_connection_is_closed_after_the_keep_alive_timeout(model_dir: Path) -> None:
    async with running(model_dir, keep_alive_timeout=0.5, header_timeout=30) as (_, port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(request())
        head = await reader.readuntil(b"\r\n\r\n")
        await reader.readexactly(int(Answer(head).headers["content-length"]))
        start = time.monotonic()
        async with asyncio.timeout(5):
            assert await reader.read() == b""
        writer.close()
        await writer.wait_closed()
        assert 0.4 < time.monotonic() - start < 2


# ---- connections ----------------------------------------------------------------------------------------


async def test_connections_past_max_connections_are_refused_at_once_and_logged_once(
    model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with running(model_dir, max_connections=3, header_timeout=30) as (_, port):
        idle = [await asyncio.open_connection("127.0.0.1", port) for _ in range(3)]
        await asyncio.sleep(0.2)  # all three accepted
        with caplog.at_level(logging.WARNING, logger="service.protocol"):
            for _ in range(4):
                raw, seconds = await send_and_read(port, request())
                assert seconds < 1
                assert raw == b"" or Answer(raw).status == 503
        refusals = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
        assert refusals == ["refused 1 connection(s): 3 open, MAX_CONNECTIONS is 3"]  # the rest wait 5 s
        for _, writer in idle:
            writer.close()
            await writer.wait_closed()
        await asyncio.sleep(0.2)
        await healthy(port)


@pytest.mark.parametrize("enabled", [False, True], ids=["default", "SERVER_HEADER=true"])
async def test_the_server_header_is_sent_only_when_enabled(model_dir: Path, enabled: bool) -> None:
    async with (
        running(model_dir, server_header=enabled) as (_, port),
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client,
    ):
        response = await client.get("/healthz")
    assert response.headers.get("server") == ("uvicorn" if enabled else None)


@pytest.mark.parametrize(
    ("max_connections", "soft", "warns"),
    [
        (1000, 1024, True),
        (1000, 1000 + RESERVED_FILES, False),
        (100, 1024, False),
        (100, resource.RLIM_INFINITY, False),
    ],
    ids=["default-under-1024", "exactly-enough", "plenty", "unlimited"],
)
def test_open_file_warning(max_connections: int, soft: int, warns: bool) -> None:
    warning = open_file_warning(max_connections, soft)
    assert (warning is not None) == warns
    assert warning is None or "MAX_CONNECTIONS" in warning


# ---- signals, in process --------------------------------------------------------------------------------


async def test_sighup_runs_the_registry_reload_on_the_loop_and_survives_its_failure(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    calls: list[str] = []

    async def failing_reload(self: Registry) -> None:
        calls.append("reload")
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(Registry, "reload", failing_reload, raising=False)
    async with running(model_dir) as (server, port):
        assert signal.getsignal(signal.SIGHUP) == server.handle_hup
        with caplog.at_level(logging.INFO, logger="service.server"):
            server.handle_hup(signal.SIGHUP, None)
            server.handle_hup(signal.SIGHUP, None)  # while one is pending: coalesced
            async with asyncio.timeout(5):
                while not server.reloading or not server.reloading.done():
                    await asyncio.sleep(0.05)
        assert calls == ["reload"]
        assert "model reload failed" in caplog.text
        await healthy(port)


# ---- a real process -------------------------------------------------------------------------------------


@contextmanager
def service_process(
    model_dir: Path, tmp_path: Path, open_files: int | None = None, **env: str
) -> Iterator[tuple[subprocess.Popen[str], _Output, str]]:
    """`python -m service` on a free port, started and serving: (process, its output, base URL)."""

    def limit_open_files() -> None:
        if open_files is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (open_files, open_files))

    workers = int(env.get("WORKERS", "1"))
    environment = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "MODEL_DIR": str(model_dir),
        "HOST": "127.0.0.1",
        "PORT": "0",
        "INTRA_OP_THREADS": "1",
        "PARSE_WORKERS": "0",
        "ACCESS_LOG": "false",
        **env,
    }
    with subprocess.Popen(
        [sys.executable, "-m", "service"],
        cwd=tmp_path,
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        preexec_fn=limit_open_files,
    ) as process:
        output = _Output(process)
        try:
            port = output.wait_for(r"Uvicorn running on http://127\.0\.0\.1:(\d+)", process, timeout=60)[1]
            output.wait_for(
                f"(Application startup complete.*){{{workers}}}", process, timeout=60, joined=True
            )
            yield process, output, f"http://127.0.0.1:{port}"
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
            output.join()


class Traffic:
    """Requests on a thread, a new connection each (so that the kernel spreads them over workers), until
    stopped: how many were answered 200 and what went wrong with the others."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.ok = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        limits = httpx.Limits(max_keepalive_connections=0)
        with httpx.Client(base_url=self.url, timeout=10, limits=limits) as client:
            while not self._stop.is_set():
                try:
                    response = client.post(f"/v1/models/{MODEL}/sample", json={"n": 1, "seed": 1})
                except httpx.HTTPError as exc:
                    self.failures.append(repr(exc))
                    continue
                if response.status_code == 200:
                    self.ok += 1
                else:
                    self.failures.append(f"{response.status_code} {response.text}")


def _versions(url: str) -> list[str]:
    versions: list[str] = httpx.get(f"{url}/v1/models/{MODEL}", timeout=10).json()["versions"]
    return versions


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2])
def test_sighup_reloads_models_in_every_worker_without_failing_a_request(
    tmp_path: Path, workers: int
) -> None:
    models = tmp_path / "models"
    write_model(models, MODEL, NEWEST, seed=0)
    with service_process(models, tmp_path, WORKERS=str(workers)) as (process, output, url):
        pids = {int(pid) for pid in re.findall(r"Started server process \[(\d+)\]", output.text)}
        assert len(pids) == workers
        write_model(models, MODEL, "11", seed=1)
        with Traffic(url) as traffic:
            time.sleep(1)
            process.send_signal(signal.SIGHUP)
            for pid in pids:
                output.wait_for(rf"reloading models \(SIGHUP\) in worker {pid}", process, timeout=20)
            if hasattr(Registry, "reload"):
                for pid in pids:
                    output.wait_for(rf"models reloaded in worker {pid}", process, timeout=20)
                assert "11" in _versions(url)
            time.sleep(1)
        assert traffic.failures == [] and traffic.ok > 0
        assert process.poll() is None
        assert {int(p) for p in re.findall(r"Started server process \[(\d+)\]", output.text)} == pids


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_drains_then_stops_within_its_timeouts_despite_a_stuck_client(
    model_dir: Path, tmp_path: Path, workers: int
) -> None:
    """The stuck clients sent a head and part of a body; BODY_TIMEOUT (60 s) would not save us. At the
    shutdown timeout they get 503."""
    drain, shutdown = 2.0, 2.0
    with service_process(
        model_dir,
        tmp_path,
        WORKERS=str(workers),
        DRAIN_SECONDS=str(drain),
        SHUTDOWN_TIMEOUT=str(shutdown),
        BODY_TIMEOUT="60",
    ) as (process, output, url):
        port = int(url.rsplit(":", 1)[1])
        stuck = [socket.create_connection(("127.0.0.1", port)) for _ in range(workers * 2)]
        for sock in stuck:
            sock.sendall(b"POST /v1/models/tiny/sample HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\n{")
        time.sleep(0.5)
        start = time.monotonic()
        process.send_signal(signal.SIGTERM)
        with httpx.Client(
            base_url=url, timeout=5, limits=httpx.Limits(max_keepalive_connections=0)
        ) as client:
            deadline = time.monotonic() + 1
            while client.get("/readyz").status_code != 503:
                assert time.monotonic() < deadline, "/readyz still 200 a second after SIGTERM"
            for _ in range(2 * workers):  # every worker, most likely: a new connection each
                assert client.get("/readyz").status_code == 503
                assert client.post(f"/v1/models/{MODEL}/sample", json={"n": 1}).status_code == 200
        assert process.wait(timeout=drain + shutdown + 8) == 0, output.text
        took = time.monotonic() - start
        for sock in stuck:
            with sock:
                sock.settimeout(1)
                answer = Answer(sock.recv(4096))
                assert answer.status == 503 and "shutting down" in answer.error()["message"]
    assert drain - 0.2 < took < drain + shutdown + 5, took
    assert "draining (SIGTERM)" in output.text


@pytest.mark.slow
def test_more_idle_sockets_than_open_files_do_not_stop_the_server(model_dir: Path, tmp_path: Path) -> None:
    """Open files 256, MAX_CONNECTIONS 150: 300 idle sockets; new requests are refused at once (never left
    hanging), served again once the header timeout has closed the idle ones, and the refusals are logged
    once, not per connection."""
    with service_process(model_dir, tmp_path, open_files=256, MAX_CONNECTIONS="150", HEADER_TIMEOUT="3") as (
        _,
        output,
        url,
    ):
        port = int(url.rsplit(":", 1)[1])
        idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(300)]
        try:
            start = time.monotonic()
            try:
                refused: int | str = httpx.get(f"{url}/healthz", timeout=3).status_code
            except (
                httpx.TransportError
            ) as exc:  # a 503 lost to the reset of our unread request is a refusal too
                refused = type(exc).__name__
            assert refused in (503, "RemoteProtocolError", "ReadError"), refused
            assert time.monotonic() - start < 2
            deadline = time.monotonic() + 10
            while True:  # the header timeout frees the held connections
                with suppress(httpx.TransportError):
                    if httpx.get(f"{url}/healthz", timeout=3).status_code == 200:
                        break
                assert time.monotonic() < deadline, output.text[-2000:]
                time.sleep(0.2)
        finally:
            for sock in idle:
                sock.close()
        assert httpx.post(f"{url}/v1/models/{MODEL}/sample", json={"n": 1}, timeout=10).status_code == 200
        assert "Too many open files" not in output.text
        assert 1 <= len(re.findall(r"refused \d+ connection", output.text)) <= 3
