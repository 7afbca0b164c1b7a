"""The manifest contract: file entries stay inside their model directory; checksums name files as asked."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from service.manifest import DECODER_FILE, FileEntry, read_manifest, verify_checksums
from tests.service.conftest import write_model

SHA = "0" * 64


@pytest.mark.parametrize(
    "path",
    ["encoder.onnx", "graphs/encoder.onnx", "./encoder.onnx", "a..b.onnx"],
    ids=["plain", "subdirectory", "dot-prefix", "dots-in-name"],
)
def test_file_entries_inside_the_directory_are_accepted(path: str) -> None:
    assert FileEntry(path=path, sha256=SHA).path == path


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("../1/encoder.onnx", "'..' is not allowed"),
        ("graphs/../../x.onnx", "'..' is not allowed"),
        ("..", "'..' is not allowed"),
        ("/etc/passwd", "not an absolute one"),
        ("//server/share.onnx", "not an absolute one"),
        ("..\\1\\encoder.onnx", "not '\\'"),
        ("", "must name a file"),
        (".", "must name a file"),
    ],
    ids=[
        "sibling-version",
        "nested-escape",
        "parent",
        "absolute",
        "double-slash",
        "backslash",
        "empty",
        "dot",
    ],
)
def test_file_entries_leaving_the_directory_are_refused(path: str, message: str) -> None:
    with pytest.raises(ValidationError, match="path") as caught:
        FileEntry(path=path, sha256=SHA)
    assert message in str(caught.value)


def test_checksum_problems_name_files_as_asked(tmp_path: Path) -> None:
    directory = write_model(tmp_path, "tiny", "1", seed=0)
    with (directory / DECODER_FILE).open("ab") as f:
        f.write(b"\0")
    manifest = read_manifest(directory)
    (default,) = verify_checksums(directory, manifest)
    assert f"decoder file {directory / DECODER_FILE} has sha256" in default
    (shown,) = verify_checksums(directory, manifest, shown_as="tiny/1")
    assert shown.startswith(f"decoder file tiny/1/{DECODER_FILE} has sha256")
    assert str(tmp_path) not in shown
