"""Provenance: the commit recorded only for committed code, the CPU, threads and library versions."""

from __future__ import annotations

import re

import pytest
import torch

import training.train  # noqa: F401  (loads the training code, as a run does)
from training import provenance

HEAD = "0123456789abcdef0123456789abcdef01234567"


@pytest.mark.parametrize(
    ("head", "status", "expected"),
    [
        (HEAD, "", HEAD),
        (HEAD, " M training/train.py", provenance.UNCOMMITTED),
        (HEAD, "?? training/new.py", provenance.UNCOMMITTED),
        (None, None, provenance.UNCOMMITTED),
    ],
    ids=["clean", "modified", "untracked", "no git"],
)
def test_the_commit_is_recorded_only_for_code_as_committed(
    monkeypatch: pytest.MonkeyPatch, head: str | None, status: str | None, expected: str
) -> None:
    calls: list[tuple[str, ...]] = []

    def fake_git(*args: str) -> str | None:
        calls.append(args)
        return head if args[0] == "rev-parse" else status

    monkeypatch.setattr(provenance, "_git", fake_git)
    assert provenance.git_commit() == expected
    status_call = next(c for c in calls if c[0] == "status")
    assert status_call[status_call.index("--") + 1 :] == tuple(provenance.loaded_sources())


def test_the_code_that_counts_is_the_code_that_was_loaded() -> None:
    sources = provenance.loaded_sources()
    assert {"training/provenance.py", "training/train.py", "service/manifest.py"} <= set(sources)
    assert all((provenance.REPO / s).is_file() and not s.startswith(".venv") for s in sources)


def test_the_environment_names_commit_cpu_threads_and_libraries() -> None:
    env = provenance.environment()
    commit = env["git_commit"]
    assert isinstance(commit, str)
    assert commit == provenance.UNCOMMITTED or re.fullmatch(r"[0-9a-f]{40}", commit)
    assert env["cpu"] and env["threads"] == torch.get_num_threads()
    assert isinstance(env["libraries"], dict) and {"python", "torch", "numpy"} <= env["libraries"].keys()
