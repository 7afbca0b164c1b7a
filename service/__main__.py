"""`python -m service` (or `vae-serve`): validate the settings, configure logging, then serve (`service.server`).

With WORKERS > 1 each worker process builds its own app from the settings validated here. SIGTERM drains
(/readyz 503 for DRAIN_SECONDS, in-flight requests get SHUTDOWN_TIMEOUT), SIGINT stops without the drain,
SIGHUP reloads the models in every worker; after a graceful stop the process exits 0.
"""

from __future__ import annotations

import copy
import logging
import logging.config
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

from pydantic import ValidationError
from uvicorn.config import LOGGING_CONFIG

from service.server import run
from service.settings import Settings


def logging_config(level: str) -> dict[str, Any]:
    """uvicorn's logging config plus the `service` logger on the same handler, and the API key's name (`-`
    for none; `service.access`) at the end of each access line."""
    config = copy.deepcopy(LOGGING_CONFIG)
    config["loggers"]["service"] = {"handlers": ["default"], "level": level.upper(), "propagate": False}
    config["filters"] = {"api_key": {"()": "service.access.KeyNameFilter"}}
    config["handlers"]["access"]["filters"] = ["api_key"]
    config["formatters"]["access"]["fmt"] += " key=%(api_key)s"
    return config


MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


@contextmanager
def worker_metrics(workers: int) -> Iterator[Path | None]:
    """With several workers, a shared directory for prometheus-client's multiprocess mode, so that /metrics
    counts every worker's requests rather than those of whichever worker answers the scrape.

    A directory given in PROMETHEUS_MULTIPROC_DIR is emptied first (stale files from an earlier run would be
    added in); otherwise a temporary one is made for this run and removed after it. Workers inherit it
    through the environment, which prometheus-client reads at import.
    """
    if workers == 1:
        yield None
        return
    given = os.environ.get(MULTIPROC_ENV)
    path = Path(given) if given else Path(tempfile.mkdtemp(prefix="vae-serving-metrics-"))
    path.mkdir(parents=True, exist_ok=True)
    for stale in path.glob("*.db"):
        stale.unlink()
    os.environ[MULTIPROC_ENV] = str(path)
    logging.getLogger("service").info("metrics of %d workers aggregated in %s", workers, path)
    try:
        yield path
    finally:
        if not given:
            shutil.rmtree(path, ignore_errors=True)
            del os.environ[MULTIPROC_ENV]


def _exit_cleanly(signum: int, frame: FrameType | None) -> None:
    """A SIGTERM before the server has its own handlers (while the app is built) exits 0 too, so an
    orchestrator's stop always reads as success."""
    sys.exit(0)


def main() -> None:
    try:
        settings = Settings()
    except ValidationError as exc:
        sys.exit(f"invalid settings:\n{exc}")
    signal.signal(signal.SIGTERM, _exit_cleanly)
    config = logging_config(settings.log_level)
    logging.config.dictConfig(config)
    with worker_metrics(settings.workers):
        status = run(settings, config)
    sys.exit(status)


if __name__ == "__main__":
    main()
