"""The `python -m training` commands in `./run`, the README and the compose file parse with the training CLI.

`./run data` downloads only where Debian's dataset is absent, so CI (which has it) would never run that line,
and the README's and compose file's commands are run by users, not by the tests."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from training.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]


SOURCES = ("run", "README.md", "docker-compose.yml")


def _training_commands(source: str) -> list[list[str]]:
    """Each `... -m training SUB ARGS` in `source` as argv for the parser: `${VAR:-default}` as its default,
    up to a closing backtick or parenthesis, `&&` or `#` comment; `--help` left out (it exits)."""
    text = (ROOT / source).read_text().replace("\\\n", " ")
    commands = []
    for line in text.splitlines():
        match = re.search(r"-m training ([^`)]*)", line)
        if match is None:
            continue
        command = re.sub(r'"\$\{@:2\}"', "", match[1].split("&&")[0])
        command = re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", command)
        commands.append([arg for arg in shlex.split(command, comments=True) if arg != "--help"])
    return commands


def test_sources_issue_training_commands() -> None:
    assert {argv[0] for argv in _training_commands("run")} >= {"download", "train"}
    assert {argv[0] for argv in _training_commands("README.md")} >= {
        "download",
        "train",
        "evaluate",
        "export",
    }
    assert {argv[0] for argv in _training_commands("docker-compose.yml")} >= {"download", "train"}


@pytest.mark.parametrize(
    "argv",
    [argv for source in SOURCES for argv in _training_commands(source)],
    ids=lambda argv: " ".join(argv)[:60],
)
def test_run_training_command_parses(argv: list[str]) -> None:
    args = build_parser().parse_args(argv)  # exits (SystemExit 2) on an unknown flag
    assert args.command == argv[0]
