"""Settings: no prefix, validated at start, cores not oversubscribed, documented as they are."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from pydantic import TypeAdapter, ValidationError

from service import settings as settings_module
from service.__main__ import logging_config
from service.settings import Settings, cpu_quota, usable_cpus


def test_onnxruntime_threads_default_to_the_usable_cpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("INTRA_OP_THREADS", raising=False)
    assert Settings(_env_file=None).intra_op_threads == usable_cpus()


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        ({"cpu.max": "200000 100000\n"}, 2.0),
        ({"cpu.max": "150000 100000\n"}, 1.5),
        ({"cpu.max": "max 100000\n"}, None),
        ({"cpu/cpu.cfs_quota_us": "50000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 0.5),
        ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
        ({}, None),
    ],
    ids=["v2-2cpus", "v2-1.5cpus", "v2-unlimited", "v1-half", "v1-unlimited", "no-cgroup"],
)
def test_cpu_quota_reads_cgroup_v2_and_v1(
    tmp_path: Path, files: dict[str, str], expected: float | None
) -> None:
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert cpu_quota(tmp_path) == expected


@pytest.mark.parametrize(("quota", "expected"), [(None, 8), (2.0, 2), (1.5, 2), (0.5, 1), (64.0, 8)])
def test_usable_cpus_is_the_affinity_capped_by_the_quota(
    monkeypatch: pytest.MonkeyPatch, quota: float | None, expected: int
) -> None:
    """compose's `limits.cpus: 2` on a many-core host: 2 threads, not one per core to be throttled."""
    monkeypatch.setattr(settings_module.os, "sched_getaffinity", lambda pid: set(range(8)))
    monkeypatch.setattr(settings_module, "cpu_quota", lambda: quota)
    assert usable_cpus() == expected


def test_environment_without_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODEL_DIR", "/srv/models")
    monkeypatch.setenv("WORKERS", "2")
    monkeypatch.setenv("BATCH_WINDOW_MS", "0")
    monkeypatch.setenv("DEVICE", "cpu")
    monkeypatch.delenv("INTRA_OP_THREADS", raising=False)
    settings = Settings(_env_file=None)
    assert settings.model_dir == Path("/srv/models")
    assert settings.workers == 2
    assert settings.intra_op_threads == max(1, usable_cpus() // 2)  # the cores are shared between workers
    assert settings.batch_window_ms == 0.0


def test_env_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MAX_BATCH", raising=False)
    env = tmp_path / ".env"
    env.write_text("MAX_BATCH=8\nINTRA_OP_THREADS=3\n")
    settings = Settings(_env_file=env)
    assert settings.max_batch == 8
    assert settings.intra_op_threads == 3


@pytest.mark.parametrize(
    ("values", "field"),
    [
        ({"device": "tpu"}, "device"),
        ({"workers": 0}, "workers"),
        ({"batch_window_ms": -1}, "batch_window_ms"),
        ({"port": 70000}, "port"),
        ({"max_queue_rows": 100}, "MAX_QUEUE_ROWS"),
        ({"log_level": "loud"}, "log_level"),
    ],
    ids=["device", "workers", "window", "port", "queue-below-largest-request", "log-level"],
)
def test_invalid_settings_are_refused(values: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError, match=field):
        Settings(_env_file=None, **values)


def test_logging_config_adds_the_service_logger() -> None:
    config = logging_config("warning")
    assert config["loggers"]["service"]["level"] == "WARNING"
    assert "uvicorn" in config["loggers"]


ROOT = Path(__file__).resolve().parents[2]
FIELDS = {name.upper(): field for name, field in Settings.model_fields.items()}


def _as_default(name: str, text: str) -> object:
    """A documented default, parsed the way the environment's string would be."""
    annotation = FIELDS[name].annotation
    assert annotation is not None
    return TypeAdapter(annotation).validate_python(text)


def _readme_table() -> dict[str, str]:
    """README.md's configuration table: variable -> the first `code` in its default column ("empty": "")."""
    section = (ROOT / "README.md").read_text().split("## Configuration", 1)[1].split("\n## ", 1)[0]
    return dict(re.findall(r"^\| `([A-Z_]+)` \| (?:`([^`]*)`|empty)", section, flags=re.MULTILINE))


def _env_example() -> dict[str, str]:
    """.env.example's `NAME=value` lines, commented out or not."""
    lines = (ROOT / ".env.example").read_text().splitlines()
    return {m[1]: m[2] for line in lines if (m := re.fullmatch(r"#? ?([A-Z][A-Z0-9_]*)=(.*)", line))}


@pytest.mark.parametrize("source", [_readme_table, _env_example], ids=["readme-table", "env-example"])
def test_every_setting_is_documented_with_its_default(source: Any) -> None:
    documented: dict[str, str] = source()
    assert FIELDS.keys() <= documented.keys(), f"missing: {sorted(FIELDS.keys() - documented.keys())}"
    if source is _readme_table:  # the table lists settings only; .env.example has compose's variables too
        assert documented.keys() <= FIELDS.keys(), (
            f"not settings: {sorted(documented.keys() - FIELDS.keys())}"
        )
    wrong = {
        name: (documented[name], FIELDS[name].default)
        for name in FIELDS
        if _as_default(name, documented[name]) != FIELDS[name].default
    }
    assert not wrong, f"documented vs real defaults: {wrong}"


def test_env_example_works_uncommented(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every line of .env.example, uncommented, is accepted and changes nothing."""
    for name in FIELDS:
        monkeypatch.delenv(name, raising=False)
    env = tmp_path / ".env"
    env.write_text("".join(f"{name}={value}\n" for name, value in _env_example().items()))
    assert Settings(_env_file=env) == Settings(_env_file=None)
