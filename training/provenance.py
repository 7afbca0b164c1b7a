"""Where a run came from: the code's git commit, the CPU, the thread count and the library versions.

A run limited by epochs is bit-for-bit repeatable given the same code, machine, thread count and
libraries (see `training.train`); this is what the checkpoints record of those four, and the manifest
shows beside the command.

The commit is that of HEAD when every source file the process has loaded from the repository (the
`training` package, `service.manifest`, ...) is committed as it stands, else "uncommitted": a commit recorded
for code that differs from it would claim a reproducibility it cannot give. Files the run never imported (the
service, the docs, another tool's work in progress) do not alter it and do not count.
"""

from __future__ import annotations

import importlib.metadata
import platform
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
UNCOMMITTED = "uncommitted"
LIBRARIES = ("torch", "numpy", "onnx", "onnxscript", "onnxruntime")


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(
            ["git", *args], cwd=REPO, capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def loaded_sources() -> list[str]:
    """The repository's source files this process has imported, relative to the repository root."""
    paths = set()
    for module in list(sys.modules.values()):
        file = getattr(module, "__file__", None)
        if not file:
            continue
        path = Path(file).resolve()  # a few extension modules name a bare file: it resolves to nothing
        if path.is_file() and path.is_relative_to(REPO) and ".venv" not in path.relative_to(REPO).parts:
            paths.add(path.relative_to(REPO).as_posix())
    return sorted(paths)


def git_commit() -> str:
    """HEAD's hash if the loaded code is committed as it stands, else "uncommitted" (also without git)."""
    head = _git("rev-parse", "--verify", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=all", "--", *loaded_sources())
    if not head or status is None or status:
        return UNCOMMITTED
    return head


def cpu_model() -> str:
    """The CPU's model name as the kernel reports it (Linux), else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for package in LIBRARIES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def environment() -> dict[str, object]:
    """What a checkpoint records of the run's surroundings; `threads` is torch's intra-op thread count."""
    return {
        "git_commit": git_commit(),
        "cpu": cpu_model(),
        "threads": torch.get_num_threads(),
        "libraries": library_versions(),
    }
