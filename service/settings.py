"""Service configuration: one pydantic-settings class read from the environment (and `.env`), validated at start.

Variables have no prefix (`MODEL_DIR`, `WORKERS`, ...). README.md's configuration table and `.env.example`
list every one with its default, by hand; tests/service/test_settings.py checks both against the fields here.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Literal, Self

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from service.access import parse_api_keys

Device = Literal["auto", "cpu", "cuda"]
LogLevel = Literal["critical", "error", "warning", "info", "debug"]


CGROUP_ROOT = Path("/sys/fs/cgroup")


def cpu_quota(root: Path = CGROUP_ROOT) -> float | None:
    """CPUs' worth of time the CFS quota allows (`docker run --cpus`, compose `limits.cpus`), or None if none.

    A container sees its own cgroup at `root`: cgroup v2's cpu.max ("200000 100000" or "max 100000"), else
    v1's cpu/cpu.cfs_quota_us and cpu.cfs_period_us (quota -1: unlimited).
    """
    try:
        quota, period = (root / "cpu.max").read_text().split()
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota_us = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period_us = int((root / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota_us / period_us if quota_us > 0 and period_us > 0 else None


def usable_cpus() -> int:
    """CPUs this process can keep busy: its affinity (`taskset`, cpusets), unlike `os.cpu_count()`, capped by a
    CFS quota, which limits time, not cores: 64 threads under a 2-CPU quota on a 64-core host get throttled."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    quota = cpu_quota()
    return max(1, min(cpus, math.ceil(quota))) if quota else cpus


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        case_sensitive=False,
        hide_input_in_errors=True,  # errors name the setting and the rule, never echo a value (API_KEYS)
    )

    model_dir: Path = Field(Path("models"), description="Directory holding NAME/VERSION/ model directories.")
    device: Device = Field(
        "auto",
        description="auto: CUDA when the installed onnxruntime has the CUDA provider; if the session cannot "
        "create it, CPU. cpu. cuda: fail at start unless the sessions run on CUDA.",
    )
    host: str = Field("127.0.0.1", description="Interface to bind; 0.0.0.0 to serve beyond this machine.")
    port: int = Field(8000, ge=0, le=65535, description="TCP port (0 picks a free one).")
    workers: int = Field(1, ge=1, description="uvicorn worker processes; each loads every model.")
    intra_op_threads: int = Field(
        0, ge=0, description="onnxruntime threads inside one operator; 0 = max(1, usable CPUs // WORKERS)."
    )
    inter_op_threads: int = Field(
        1, ge=1, description="onnxruntime threads across operators (graphs are chains)."
    )
    max_batch: int = Field(
        256, ge=1, description="Most images (encode, reconstruct) or z rows (decode) per request."
    )
    max_samples: int = Field(
        1024, ge=1, description="Most eps rows per request: n for sample, inputs x samples for encode."
    )
    max_body_bytes: int = Field(
        16 * 1024 * 1024, ge=1024, description="Largest request body; larger gets 413."
    )
    max_batch_rows: int = Field(256, ge=1, description="Most rows merged into one onnxruntime run.")
    batch_window_ms: float = Field(
        2.0,
        ge=0,
        le=1000,
        description="How long a batch waits for company (monotonic clock); 0 = no batching.",
    )
    max_queue_rows: int = Field(
        32768,
        ge=1,
        description="Rows waiting or running per graph before requests get 503 (bounds queueing to well "
        "under a second of work; 64 concurrent requests of 256 rows fit).",
    )
    # ---- connections (service.protocol, service.server) ----
    max_connections: int = Field(
        1000, ge=1, description="Open connections per worker; past it new ones are closed at once (logged)."
    )
    max_header_bytes: int = Field(
        64 * 1024, ge=1024, description="Request line and headers together; larger gets 431 (URL alone: 414)."
    )
    max_headers: int = Field(100, ge=1, description="Most header lines per request; more gets 431.")
    max_url_bytes: int = Field(
        8192, ge=64, description="Longest request target (path + query); longer gets 414."
    )
    header_timeout: float = Field(
        10.0, gt=0, description="Seconds to receive a request's line and headers, else the socket is closed."
    )
    body_timeout: float = Field(
        60.0, gt=0, description="Seconds to receive a whole request body, else 408 and the socket is closed."
    )
    keep_alive_timeout: float = Field(
        5.0, gt=0, description="Seconds an idle keep-alive connection stays open."
    )
    server_header: bool = Field(False, description="Send uvicorn's `server: uvicorn` response header.")
    # ---- lifecycle ----
    drain_seconds: float = Field(
        5.0,
        ge=0,
        description="After SIGTERM: /readyz answers 503 and requests are still served this long, so load "
        "balancers stop sending, before the server stops accepting.",
    )
    shutdown_timeout: float = Field(
        20.0,
        gt=0,
        description="After the drain: most seconds in-flight requests get before the process exits.",
    )
    reload_poll_seconds: float = Field(
        0.0,
        ge=0,
        description="Rescan MODEL_DIR this often and load what changed; 0 = only on SIGHUP or "
        "POST /admin/reload.",
    )
    ready_requires_all: bool = Field(
        False,
        description="Readiness needs every version under MODEL_DIR loaded; false: every model name has at least "
        "one servable version.",
    )
    # ---- access ----
    api_keys: SecretStr = Field(
        SecretStr(""),
        description="API keys as NAME:KEY pairs, comma-separated, or the path of a file with one pair per line; "
        "empty = no authentication.",
    )
    metrics_require_key: bool = Field(False, description="With API_KEYS set, /metrics needs a key too.")
    cors_origins: str = Field(
        "",
        description="Origins allowed to call the API from a browser, comma-separated (`*`: any); empty = CORS off.",
    )
    # ---- request parsing ----
    parse_workers: int = Field(
        1, ge=0, description="Processes parsing large JSON bodies off the event loop; 0 = parse in a thread."
    )
    parse_offload_bytes: int = Field(
        256 * 1024, ge=0, description="JSON bodies at least this large are parsed off the event loop."
    )
    max_png_bytes: int = Field(
        64 * 1024, ge=1024, description="Largest base64-decoded PNG item; larger gets 422."
    )
    log_level: LogLevel = Field("info", description="Log level of the service and uvicorn.")
    access_log: bool = Field(
        True, description="uvicorn's per-request access log line (costs CPU under load)."
    )

    @field_validator("api_keys")
    @classmethod
    def _keys_parse(cls, value: SecretStr) -> SecretStr:
        parse_api_keys(
            value.get_secret_value()
        )  # refuses a malformed list or file at start, naming the entry
        return value

    @property
    def cors_origin_list(self) -> list[str]:
        return [origin.strip() for origin in self.cors_origins.split(",") if origin.strip()]

    @model_validator(mode="after")
    def _resolve_threads(self) -> Self:
        """Share the usable cores between workers so WORKERS x INTRA_OP_THREADS does not oversubscribe."""
        if self.intra_op_threads == 0:
            self.intra_op_threads = max(1, usable_cpus() // self.workers)
        return self

    @model_validator(mode="after")
    def _queue_holds_the_largest_request(self) -> Self:
        """A queue smaller than the largest valid request would turn that request into a permanent 503."""
        largest = max(self.max_batch, self.max_samples)
        if self.max_queue_rows < largest:
            raise ValueError(
                f"MAX_QUEUE_ROWS ({self.max_queue_rows}) must be at least max(MAX_BATCH, MAX_SAMPLES) ({largest})"
            )
        return self
