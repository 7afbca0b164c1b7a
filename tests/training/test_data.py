"""IDX reading, splits, lookup order and the verified download (against a file server on loopback)."""

from __future__ import annotations

import functools
import gzip
import shutil
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch

from service.manifest import sha256_file
from tests.training.conftest import write_idx
from training import data
from training.data import (
    FILES,
    DataError,
    binarize_fixed,
    binarized_sha256,
    download,
    find_data_dir,
    load_splits,
    read_idx,
)


def test_read_idx_round_trips(tmp_path: Path) -> None:
    array = np.arange(2 * 28 * 28).reshape(2, 28, 28) % 256
    write_idx(tmp_path / "x.gz", array)
    assert np.array_equal(read_idx(tmp_path / "x.gz"), array)


def _corrupt(kind: str, path: Path) -> None:
    array = np.zeros((3, 28, 28), dtype=np.uint8)
    if kind == "truncated gzip":
        write_idx(path, array)
        path.write_bytes(path.read_bytes()[:-20])
    elif kind == "not gzip":
        path.write_bytes(b"this is not a gzip file at all")
    elif kind == "bad magic":
        with gzip.open(path, "wb") as f:
            f.write(b"\x12\x34\x08\x03" + b"\x00" * 100)
    elif kind == "short payload":
        header = bytes([0, 0, 8, 3]) + b"".join(d.to_bytes(4, "big") for d in (3, 28, 28))
        with gzip.open(path, "wb") as f:
            f.write(header + b"\x00" * (3 * 28 * 28 - 5))
    elif kind == "empty":
        with gzip.open(path, "wb") as f:
            f.write(b"")


@pytest.mark.parametrize("kind", ["truncated gzip", "not gzip", "bad magic", "short payload", "empty"])
def test_bad_files_are_rejected_with_the_file_named(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    _corrupt(kind, path)
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte\.gz"):
        read_idx(path)


def test_splits_are_float_in_unit_range_disjoint_and_fixed_by_seed(synthetic_dir: Path) -> None:
    a = load_splits("fashion-mnist", str(synthetic_dir), val_size=100, seed=7)
    b = load_splits("fashion-mnist", str(synthetic_dir), val_size=100, seed=7)
    c = load_splits("fashion-mnist", str(synthetic_dir), val_size=100, seed=8)
    assert a.train.shape == (500, 1, 28, 28) and a.val.shape == (100, 1, 28, 28) and len(a.test) == 200
    assert a.train.dtype == torch.float32 and a.train.min() >= 0 and a.train.max() <= 1
    assert torch.equal(a.val, b.val) and not torch.equal(a.val, c.val)
    rows = {tuple(r.tolist()) for r in a.train.flatten(1)}
    assert not any(tuple(r.tolist()) in rows for r in a.val.flatten(1))


def test_lookup_order_is_flag_then_recorded_then_env_then_defaults(
    tmp_path: Path, synthetic_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    flag, recorded, env, debian, local = (
        shutil.copytree(synthetic_dir, tmp_path / name)
        for name in ("flag", "recorded", "env", "debian", "local")
    )
    shutil.move(local, tmp_path / "data" / "fashion-mnist")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(data, "DEBIAN_DIR", debian)
    monkeypatch.setenv(data.DATA_DIR_ENV, str(env))
    assert find_data_dir("fashion-mnist", flag, prefer=recorded) == flag
    assert find_data_dir("fashion-mnist", prefer=recorded) == recorded
    assert find_data_dir("fashion-mnist", prefer=tmp_path / "gone") == env  # a recorded dir may be gone
    monkeypatch.delenv(data.DATA_DIR_ENV)
    assert find_data_dir("fashion-mnist") == debian
    monkeypatch.setattr(data, "DEBIAN_DIR", tmp_path / "nowhere")
    assert find_data_dir("fashion-mnist") == Path("data") / "fashion-mnist"
    with pytest.raises(DataError, match="lacks"):
        find_data_dir("fashion-mnist", tmp_path / "gone")  # an explicit directory must hold the files
    with pytest.raises(DataError, match="python -m training download --dataset mnist"):
        find_data_dir("mnist")  # Debian's directory is Fashion-MNIST's only


def test_another_datasets_files_are_refused(synthetic_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The synthetic files stand in for MNIST's: asked for as Fashion-MNIST they are refused, as MNIST taken."""
    table = {name: sha256_file(synthetic_dir / name) for name in FILES}
    monkeypatch.setitem(data.SHA256, "mnist", table)
    with pytest.raises(DataError, match="holds the mnist files, not fashion-mnist's: pass --dataset mnist"):
        find_data_dir("fashion-mnist", synthetic_dir)
    assert find_data_dir("mnist", synthetic_dir) == synthetic_dir
    table["t10k-labels-idx1-ubyte.gz"] = "0" * 64  # one file differs: not MNIST's set, so a custom one
    assert find_data_dir("fashion-mnist", synthetic_dir) == synthetic_dir


@pytest.fixture
def file_server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """An HTTP server on 127.0.0.1 serving tmp_path/www; yields (base URL, served directory)."""
    root = tmp_path / "www"
    root.mkdir()

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/", root
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def _serve_with_matching_table(
    root: Path, synthetic_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> dict[str, str]:
    """Serve the synthetic files and make them the 'official' checksums for the duration of the test."""
    table = {}
    for name in FILES:
        shutil.copy(synthetic_dir / name, root / name)
        table[name] = sha256_file(root / name)
    monkeypatch.setitem(data.SHA256, "mnist", table)
    return table


def test_download_fetches_and_verifies(
    tmp_path: Path, file_server: tuple[str, Path], synthetic_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base, root = file_server
    _serve_with_matching_table(root, synthetic_dir, monkeypatch)
    dest = tmp_path / "dest"
    paths = download("mnist", dest, mirrors=[base + "missing/", base])  # first mirror 404s, second works
    assert sorted(p.name for p in paths) == sorted(data.SHA256["mnist"])
    assert load_splits("mnist", str(dest), val_size=10).test.shape == (200, 1, 28, 28)
    assert not list(dest.glob("*.part"))


def test_download_refuses_a_checksum_mismatch(
    tmp_path: Path, file_server: tuple[str, Path], synthetic_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base, root = file_server
    _serve_with_matching_table(root, synthetic_dir, monkeypatch)
    tampered = root / "t10k-labels-idx1-ubyte.gz"
    tampered.write_bytes(tampered.read_bytes() + b"\x00")
    dest = tmp_path / "dest"
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte.gz.*sha256"):
        download("mnist", dest, mirrors=[base])
    assert not (dest / "t10k-labels-idx1-ubyte.gz").exists()
    assert not list(dest.glob("*.part"))


def test_download_uses_the_mirror_env_and_the_real_checksums(
    tmp_path: Path, file_server: tuple[str, Path], real_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The official Fashion-MNIST table accepts the real files (served locally: no network here)."""
    base, root = file_server
    for name in data.SHA256["fashion-mnist"]:
        (root / name).symlink_to(real_dir / name)
    monkeypatch.setenv(data.MIRROR_ENV, base)
    paths = download("fashion-mnist", tmp_path / "dest")
    assert [p.read_bytes() == (real_dir / p.name).read_bytes() for p in paths] == [True] * 4


def test_cli_download_reports_a_mismatch_as_an_error(
    tmp_path: Path, file_server: tuple[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    from training.cli import main

    base, root = file_server
    for name in data.SHA256["mnist"]:
        (root / name).write_bytes(b"not the real file")
    assert main(["download", "--dataset", "mnist", "--dest", str(tmp_path / "d"), "--base-url", base]) == 2
    assert "sha256" in capsys.readouterr().err


def test_fixed_binarization_is_seeded_binary_and_unbiased() -> None:
    x = torch.rand(50, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    b = binarize_fixed(x, seed=3)
    assert b.dtype == torch.float32 and b.shape == x.shape and set(b.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(b, binarize_fixed(x, seed=3)) and not torch.equal(b, binarize_fixed(x, seed=4))
    assert binarized_sha256(b) == binarized_sha256(binarize_fixed(x, seed=3)) != binarized_sha256(1 - b)
    assert abs(b.mean().item() - x.mean().item()) < 0.01  # 39,200 Bernoulli draws: SD 0.0025
    assert torch.equal(binarize_fixed(torch.zeros(2, 1, 28, 28), 3), torch.zeros(2, 1, 28, 28))
    assert torch.equal(binarize_fixed(torch.ones(2, 1, 28, 28), 3), torch.ones(2, 1, 28, 28))


def test_fixed_binarization_is_repeatable_from_its_description_with_numpy_alone(synthetic_dir: Path) -> None:
    """What the manifest's `binarization.method` says, done without torch, gives the same images."""
    pixels = read_idx(synthetic_dir / data.IMAGE_FILES["test"])[:, None]  # [N, 1, 28, 28] uint8
    x = pixels.astype(np.float32) / np.float32(255)
    by_hand = np.random.default_rng(7).random(x.shape) < x
    b = binarize_fixed(data.load_split(synthetic_dir, "test"), 7)
    assert np.array_equal(b.numpy().astype(bool), by_hand)
    assert "default_rng(seed).random(x.shape) < x" in data.BINARIZATION_METHOD
