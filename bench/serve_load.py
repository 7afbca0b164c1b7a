"""Load generation and server bookkeeping for `serve_bench`: wrk runs, server processes, /proc readings.

wrk (Debian's `wrk` package) sends the POST bodies, with each request's own headers, from a small Lua script
written to a temp file (`wrk_script`); the path is the URL's. The script's `done` hook prints the totals and
latency percentiles on one line, which is parsed here.
"""

from __future__ import annotations

import math
import os
import re
import signal
import socket
import statistics
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")

_LUA = """\
local f = assert(io.open({body_path}, "rb"))
wrk.method = "POST"
wrk.body = f:read("*a")
f:close()
{headers}
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("WRK_RESULT %d %d %d %d %d %d %d %.1f %.1f\\n",
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(99)))
end
"""


_HEADER_NAME = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+")
_PRINTABLE = re.compile(r"[\x20-\x7e]*")


def lua_string(text: str) -> str:
    """`text` as a Lua string literal (printable ASCII only: header names and values, the temp path)."""
    if not _PRINTABLE.fullmatch(text):
        raise ValueError(f"not printable ASCII: {text!r}")
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def wrk_script(body_path: str, headers: Mapping[str, str]) -> str:
    """The Lua script that POSTs the file at `body_path` with `headers`, and prints the WRK_RESULT line."""
    lines = []
    for name, value in headers.items():
        if not _HEADER_NAME.fullmatch(name):
            raise ValueError(f"not a header name: {name!r}")
        lines.append(f"wrk.headers[{lua_string(name)}] = {lua_string(value)}")
    return _LUA.format(body_path=lua_string(body_path), headers="\n".join(lines))


@dataclass(frozen=True)
class Load:
    """One wrk run. Latency covers every response, error responses included (wrk cannot tell them apart)."""

    responses: int
    seconds: float
    http_errors: int  # responses with status >= 400
    socket_errors: int  # connect, read and write errors and timeouts
    p50_ms: float
    p99_ms: float

    @property
    def errors(self) -> int:
        return self.http_errors + self.socket_errors

    @property
    def rps(self) -> float:
        """Successful responses per second."""
        return (self.responses - self.http_errors) / self.seconds if self.seconds else 0.0

    def truncated(self, connections: int) -> bool:
        """Whether the percentiles understate: wrk drops the requests still in flight when the run ends,
        uncounted, so once latency nears the run's length the slowest requests are the ones that go missing.
        Flagged when p99 reaches half the run, or when the mean latency by Little's law, connections /
        (responses per second), exceeds the run: that is, fewer responses than connections."""
        return self.p99_ms / 1000 >= self.seconds / 2 or self.responses < connections


def run_wrk(
    url: str,
    body: bytes,
    *,
    accept: str | None = None,
    headers: Mapping[str, str] | None = None,
    connections: int,
    seconds: float,
    cpu: int | None,
    timeout_s: float,
) -> Load:
    """POST `body` to `url` over `connections` keep-alive connections for `seconds` (one wrk thread), with
    `headers` (default: JSON's Content-Type) and `accept` as its Accept header, if given."""
    sent = dict(headers or {"Content-Type": "application/json"}) | ({"Accept": accept} if accept else {})
    with tempfile.TemporaryDirectory(prefix="serve_bench_") as tmp:
        body_path = Path(tmp) / "body"
        body_path.write_bytes(body)
        script = Path(tmp) / "post.lua"
        script.write_text(wrk_script(str(body_path), sent))
        command = [
            "wrk",
            "-t1",
            f"-c{connections}",
            f"-d{max(1, round(seconds))}s",
            f"--timeout={max(1, round(timeout_s))}s",
            "-s",
            str(script),
            url,
        ]
        done = subprocess.run(pinned(command, cpu), capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stderr.strip() or done.stdout.strip()}")
    return parse_wrk(done.stdout)


def parse_wrk(stdout: str) -> Load:
    """The Load in the WRK_RESULT line that the Lua script's `done` hook prints (latencies in us)."""
    match = re.search(r"^WRK_RESULT (.+)$", stdout, re.MULTILINE)
    if match is None:
        raise RuntimeError(f"no WRK_RESULT line in wrk's output: {stdout.strip()}")
    fields = match[1].split()
    responses, duration_us, connect, read, write, status, timeout = (int(v) for v in fields[:7])
    p50_us, p99_us = (float(v) for v in fields[7:])
    return Load(
        responses=responses,
        seconds=duration_us / 1e6,
        http_errors=status,
        socket_errors=connect + read + write + timeout,
        p50_ms=p50_us / 1000,
        p99_ms=p99_us / 1000,
    )


def pinned(command: Sequence[str], cpu: int | None) -> list[str]:
    return ["taskset", "-c", str(cpu), *command] if cpu is not None else list(command)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def http(method: str, url: str, body: bytes | None = None, headers: Mapping[str, str] | None = None) -> bytes:
    """One request with the standard library; raises on a status >= 400."""
    return exchange(method, url, body, headers)[2]


def exchange(
    method: str, url: str, body: bytes | None = None, headers: Mapping[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    """One request: (status, response headers with lower-case names, body); raises on a status >= 400."""
    request = urllib.request.Request(url, data=body, method=method, headers=dict(headers or {}))
    with urllib.request.urlopen(request, timeout=60) as response:
        data: bytes = response.read()
        return response.status, {k.lower(): v for k, v in response.headers.items()}, data


class Server:
    """A server process in its own session (so stopping it also stops uvicorn's worker processes)."""

    def __init__(
        self, command: Sequence[str], env: Mapping[str, str], cpu: int | None, log_path: Path
    ) -> None:
        self.log_path = log_path
        self._log = log_path.open("wb")
        self.process = subprocess.Popen(
            pinned(command, cpu),
            env=dict(env),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.process.pid

    def wait_ready(self, url: str, timeout_s: float = 180.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                http("GET", url)
                return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.2)
        raise RuntimeError(f"server not ready after {timeout_s:.0f} s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 20) -> str:
        self._log.flush()
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self._log.close()


def _tree(pid: int) -> list[int]:
    """`pid` and all its descendants (uvicorn's workers when WORKERS > 1)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int(_stat_fields(int(entry.name))[1])
            except (OSError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(children.get(current, []))
    return found


def _stat_fields(pid: int) -> list[str]:
    """/proc/PID/stat from field 3 (state) on; the command name in field 2 may contain spaces."""
    text = Path(f"/proc/{pid}/stat").read_text()
    return text[text.rindex(")") + 2 :].split()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of the process tree so far (fields 14 and 15 of /proc/PID/stat)."""
    total = 0
    for p in _tree(pid):
        try:
            fields = _stat_fields(p)
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / _CLOCK_TICKS


def rss_bytes(pid: int) -> int:
    """Resident memory of the process tree (field 24 of /proc/PID/stat, in pages)."""
    total = 0
    for p in _tree(pid):
        try:
            total += int(_stat_fields(p)[21]) * _PAGE
        except OSError:
            continue
    return total


def wait_idle(pid: int, *, busy_below: float = 0.05, timeout_s: float = 120.0) -> None:
    """Wait until the server tree uses under `busy_below` of a core (work left from the last run drained)."""
    deadline = time.monotonic() + timeout_s
    before = cpu_seconds(pid)
    while time.monotonic() < deadline:
        time.sleep(0.25)
        after = cpu_seconds(pid)
        if after - before < busy_below * 0.25:
            return
        before = after


Rate = Callable[[float], float]
"""Measure something for about `seconds` and return its rate (requests/s, samples/s, ...)."""


@dataclass(frozen=True)
class Paired:
    """Two rates measured in alternation: a[i] and b[i] come from the same round, seconds apart."""

    a: tuple[float, ...]
    b: tuple[float, ...]

    @property
    def ratios(self) -> list[float]:
        return [x / y if y else math.inf for x, y in zip(self.a, self.b, strict=True)]

    @property
    def ratio(self) -> float:
        """The median of the per-round ratios a/b."""
        return statistics.median(self.ratios)

    def range(self, show: Callable[[float], str] = "{:.0%}".format) -> str:
        """The lowest and highest round's ratio, e.g. "81%-108%"."""
        ratios = self.ratios
        return f"{show(min(ratios))}-{show(max(ratios))}"

    def spread(self, show: Callable[[float], str] = "{:.0%}".format) -> str:
        return f"{self.range(show)} over {len(self.a)} rounds"


def alternate(a: Rate, b: Rate, *, rounds: int, seconds: float) -> Paired:
    """Measure a and b in turns for `rounds` rounds, so that both see the same machine: a then b in even
    rounds, b then a in odd ones (ABBA), so that neither always runs straight after the other's load.

    On a shared machine whose speed drifts by 10-20% over minutes (seen here), a ratio of two figures taken
    minutes apart mostly measures the drift; the median of per-round ratios taken seconds apart does not.
    """
    first, second = [], []
    for i in range(rounds):
        if i % 2 == 0:
            first.append(a(seconds))
            second.append(b(seconds))
        else:
            second.append(b(seconds))
            first.append(a(seconds))
    return Paired(tuple(first), tuple(second))
