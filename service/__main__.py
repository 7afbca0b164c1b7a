"""`python -m service` (or `vae-serve`): validate the settings, then run uvicorn with them.

uvicorn always gets the factory import string, so WORKERS > 1 works the same way as one worker: each worker
process builds its own app from the environment (and `.env`). SIGTERM and Ctrl-C shut down gracefully:
uvicorn drains connections and runs the lifespan's shutdown; after a SIGTERM the process then exits 0.
"""

from __future__ import annotations

import copy
import signal
import sys
from types import FrameType
from typing import Any

import uvicorn
from pydantic import ValidationError
from uvicorn.config import LOGGING_CONFIG

from service.settings import Settings


def logging_config(level: str) -> dict[str, Any]:
    """uvicorn's logging config plus the `service` logger on the same handler."""
    config = copy.deepcopy(LOGGING_CONFIG)
    config["loggers"]["service"] = {"handlers": ["default"], "level": level.upper(), "propagate": False}
    return config


def _exit_cleanly(signum: int, frame: FrameType | None) -> None:
    """uvicorn (>= 0.29) re-raises SIGTERM after its graceful shutdown, which would make the exit status
    -15; it re-raises into the handler it found, this one, so an orchestrator's stop reads as success."""
    sys.exit(0)


def main() -> None:
    try:
        settings = Settings()
    except ValidationError as exc:
        sys.exit(f"invalid settings:\n{exc}")
    signal.signal(signal.SIGTERM, _exit_cleanly)
    uvicorn.run(
        "service.app:app_from_env",
        factory=True,
        host=settings.host,
        port=settings.port,
        workers=settings.workers,
        log_level=settings.log_level,
        log_config=logging_config(settings.log_level),
        access_log=settings.access_log,
    )


if __name__ == "__main__":
    main()
