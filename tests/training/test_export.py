"""ONNX export: parity with PyTorch, the manifest, the figures, the CLI end to end, and the shipped model."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from service.manifest import (
    DECODER_FILE,
    DECODER_INPUT,
    DECODER_OUTPUT,
    ENCODER_FILE,
    ENCODER_INPUT,
    ENCODER_OUTPUTS,
    read_manifest,
    verify_checksums,
)
from training import export
from training.checkpoints import BEST, LAST, load_checkpoint
from training.config import TrainConfig
from training.export import TOLERANCE, ExportError, export_checkpoint
from training.train import train

REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "models" / "fashion-mnist-mlp" / "1"


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory, synthetic_dir: Path) -> tuple[Path, Path]:
    """A tiny model trained one epoch on the synthetic data and exported: (checkpoint, model dir)."""
    root = tmp_path_factory.mktemp("export")
    torch.set_num_threads(1)
    cfg = TrainConfig(
        data_dir=str(synthetic_dir), val_size=100, hidden=(32,), latent_dim=4, batch_size=50, batch_start=0, epochs=1,
        out=str(root / "run"), progress=False, iwae_k=8,
    )  # fmt: skip
    result = train(cfg, command="python -m training train --tiny")
    model_dir = root / "tiny" / "3"
    export_checkpoint(result.out_dir / BEST, model_dir, progress=False)
    return result.out_dir / BEST, model_dir


def _sessions(model_dir: Path) -> tuple[ort.InferenceSession, ort.InferenceSession]:
    return (
        ort.InferenceSession(str(model_dir / ENCODER_FILE), providers=["CPUExecutionProvider"]),
        ort.InferenceSession(str(model_dir / DECODER_FILE), providers=["CPUExecutionProvider"]),
    )


def test_export_writes_the_files_and_a_valid_manifest(exported: tuple[Path, Path]) -> None:
    _, model_dir = exported
    for name in (
        ENCODER_FILE,
        DECODER_FILE,
        "model.json",
        "samples.png",
        "reconstructions.png",
        "curves.png",
    ):
        assert (model_dir / name).is_file(), name
    assert sorted(p.name for p in model_dir.iterdir() if p.suffix not in {".png", ".json"}) == [
        DECODER_FILE,
        ENCODER_FILE,
    ]  # weights inside the graphs, no external-data side files
    manifest = read_manifest(model_dir)
    assert (manifest.name, manifest.version, manifest.latent_dim) == ("tiny", "3", 4)
    assert manifest.input_shape == (1, 28, 28) and manifest.likelihood == "bernoulli"
    assert manifest.metrics.iwae_k == 8 and manifest.metrics.test_images == 200
    assert manifest.metrics.test_nll <= -manifest.metrics.test_elbo + 1.0  # IWAE bound is the tighter one
    assert manifest.metrics.bits_per_dim == pytest.approx(manifest.metrics.test_nll / (784 * np.log(2)))
    assert manifest.training.command == "python -m training train --tiny"
    assert manifest.training.epochs == manifest.training.best_epoch == 1
    assert manifest.training.config["latent_dim"] == 4
    assert {"torch", "onnxruntime", "onnx"} <= manifest.libraries.keys()
    assert verify_checksums(model_dir, manifest) == []


def test_onnx_matches_torch_at_any_batch_size(exported: tuple[Path, Path], synthetic_dir: Path) -> None:
    checkpoint, model_dir = exported
    model, _ = load_checkpoint(checkpoint)
    encoder, decoder = _sessions(model_dir)
    assert [i.name for i in encoder.get_inputs()] == [ENCODER_INPUT]
    assert [o.name for o in encoder.get_outputs()] == list(ENCODER_OUTPUTS)
    assert [i.name for i in decoder.get_inputs()] == [DECODER_INPUT]
    assert [o.name for o in decoder.get_outputs()] == [DECODER_OUTPUT]
    gen = torch.Generator().manual_seed(0)
    for batch in (1, 5, 64):
        x = torch.rand(batch, 1, 28, 28, generator=gen)
        z = torch.randn(batch, 4, generator=gen) * 3
        mu, logvar = encoder.run(None, {ENCODER_INPUT: x.numpy()})
        (x_mean,) = decoder.run(None, {DECODER_INPUT: z.numpy()})
        with torch.no_grad():
            q = model.encode(x)
            expected = model.decode_mean(z)
        assert mu.shape == logvar.shape == (batch, 4) and x_mean.shape == (batch, 1, 28, 28)
        assert np.abs(mu - q.mu.numpy()).max() <= TOLERANCE
        assert np.abs(logvar - q.logvar.numpy()).max() <= TOLERANCE
        assert np.abs(x_mean - expected.numpy()).max() <= TOLERANCE
        assert x_mean.min() >= 0.0 and x_mean.max() <= 1.0
    manifest = read_manifest(model_dir)
    assert (
        max(manifest.export_check.encoder_max_abs_diff, manifest.export_check.decoder_max_abs_diff)
        <= TOLERANCE
    )


def test_a_tampered_file_fails_the_checksums(exported: tuple[Path, Path], tmp_path: Path) -> None:
    _, model_dir = exported
    copy = tmp_path / "copy"
    copy.mkdir()
    for path in model_dir.iterdir():
        copy.joinpath(path.name).write_bytes(path.read_bytes())
    with (copy / DECODER_FILE).open("ab") as f:
        f.write(b"\0")
    problems = verify_checksums(copy, read_manifest(copy))
    assert len(problems) == 1 and "decoder" in problems[0]


def test_the_manifest_records_the_whole_run_not_the_best_epoch(
    exported: tuple[Path, Path], tmp_path: Path
) -> None:
    """The run went on 3 epochs (and 50 s) past its best: the manifest says so, and the curves show them."""
    checkpoint, _ = exported
    best = torch.load(checkpoint, weights_only=False)
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(checkpoint, run / BEST)
    later = [dict(best["history"][-1], epoch=best["epoch"] + i) for i in (1, 2, 3)]
    last = best | {
        "epoch": best["epoch"] + 3,
        "elapsed": best["elapsed"] + 50,
        "history": best["history"] + later,
    }
    torch.save(last, run / LAST)
    manifest = export_checkpoint(run / BEST, tmp_path / "tiny" / "4", test_images=20, progress=False)
    assert manifest.training.epochs == best["epoch"] + 3
    assert manifest.training.best_epoch == best["epoch"]
    assert manifest.training.seconds == round(best["elapsed"] + 50, 1)

    torch.save(best | {"history": [dict(best["history"][0], train_elbo=-1.0)]}, run / LAST)  # another run's
    manifest = export_checkpoint(run / BEST, tmp_path / "tiny" / "5", test_images=20, progress=False)
    assert manifest.training.epochs == manifest.training.best_epoch == best["epoch"]


def test_a_failed_export_leaves_the_previous_version_in_place(
    exported: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    checkpoint, model_dir = exported
    target = tmp_path / "tiny" / "3"
    shutil.copytree(model_dir, target)
    before = {p.name: p.read_bytes() for p in target.iterdir()}

    def disagree(*args: object, **kwargs: object) -> None:
        raise ExportError("ONNX graphs differ from PyTorch")

    monkeypatch.setattr(export, "check_parity", disagree)
    with pytest.raises(ExportError):
        export_checkpoint(checkpoint, target, test_images=20, progress=False)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert [p.name for p in target.parent.iterdir()] == ["3"]  # no half-written or hidden directories left
    with pytest.raises(ExportError):
        export_checkpoint(checkpoint, tmp_path / "tiny" / "9", test_images=20, progress=False)
    assert [p.name for p in target.parent.iterdir()] == ["3"]


def test_re_export_in_place_replaces_the_version(exported: tuple[Path, Path], tmp_path: Path) -> None:
    checkpoint, model_dir = exported
    target = tmp_path / "tiny" / "3"
    shutil.copytree(model_dir, target)
    (target / "stale.txt").write_text("from the previous export")
    manifest = export_checkpoint(checkpoint, target, test_images=20, progress=False)
    assert not (target / "stale.txt").exists() and manifest.metrics.test_images == 20
    assert read_manifest(target).files == manifest.files and verify_checksums(target, manifest) == []
    assert [p.name for p in target.parent.iterdir()] == ["3"]
    assert target.stat().st_mode & 0o777 == 0o755


@pytest.mark.slow
def test_cli_trains_and_exports_on_real_data(real_dir: Path, tmp_path: Path) -> None:
    """`python -m training train ... --export DIR`, one short epoch on a real subset, then `evaluate`."""
    model_dir = tmp_path / "models" / "smoke" / "1"
    args = [
        "train", "--data-dir", str(real_dir), "--train-subset", "3000", "--val-size", "500", "--epochs", "1",
        "--hidden", "64", "--latent-dim", "8", "--iwae-k", "2", "--threads", "1", "--no-progress",
        "--out", str(tmp_path / "run"), "--export", str(model_dir),
    ]  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-m", "training", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "onnxruntime vs torch" in done.stdout and "epoch    1" in done.stdout
    manifest = read_manifest(model_dir)
    assert verify_checksums(model_dir, manifest) == []
    assert manifest.metrics.test_images == 10_000 and manifest.dataset == "fashion-mnist"
    assert manifest.training.command.startswith("python -m training train --data-dir")
    assert manifest.goal is None

    done = subprocess.run(
        [sys.executable, "-m", "training", "evaluate", str(tmp_path / "run" / BEST), "--iwae-k", "2",
         "--images", "100", "--data-dir", str(real_dir), "--no-progress"],
        cwd=REPO, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads(done.stdout)
    assert figures["images"] == 100 and figures["nll"] > 0 and figures["elbo"] < 0


def test_cli_reports_missing_data_clearly(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from training.cli import main

    status = main(["train", "--data-dir", str(tmp_path), "--out", str(tmp_path / "run"), "--no-progress"])
    assert status == 2
    assert "lacks train-images-idx3-ubyte.gz" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cli_reports_a_missing_gpu_clearly(
    synthetic_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from training.cli import main

    argv = [
        "train",
        "--data-dir",
        str(synthetic_dir),
        "--device",
        "cuda",
        "--out",
        str(tmp_path),
        "--no-progress",
    ]
    assert main(argv) == 2
    assert "--device cuda was asked for but torch sees no CUDA device" in capsys.readouterr().err


def test_cli_reports_a_failed_export_clearly(
    exported: tuple[Path, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from training.cli import main

    def disagree(*args: object, **kwargs: object) -> None:
        raise ExportError("ONNX graphs differ from PyTorch by more than 0.0001")

    monkeypatch.setattr(export, "check_parity", disagree)
    checkpoint, _ = exported
    assert (
        main(
            ["export", str(checkpoint), "--out", str(tmp_path / "m" / "1"), "--images", "20", "--no-progress"]
        )
        == 2
    )
    assert "error: ONNX graphs differ from PyTorch" in capsys.readouterr().err


def test_the_shipped_default_model_matches_its_manifest() -> None:
    manifest = read_manifest(SHIPPED)
    assert verify_checksums(SHIPPED, manifest) == []
    assert manifest.goal is not None, "the default model records the goal it was trained to meet"
    assert manifest.goal.max_train_seconds is not None
    assert manifest.training.seconds <= manifest.goal.max_train_seconds
    assert manifest.metrics.iwae_k >= 1000 and manifest.metrics.test_images == 10_000
    assert manifest.dataset == "fashion-mnist" and manifest.likelihood == "bernoulli"
    assert manifest.training.command.startswith("python -m training train ")
    assert f"--export {SHIPPED.relative_to(REPO)}" in manifest.training.command
    for figure in ("samples.png", "reconstructions.png", "curves.png"):
        assert (SHIPPED / figure).is_file()


def test_the_shipped_default_model_meets_its_goal() -> None:
    manifest = read_manifest(SHIPPED)
    assert manifest.goal is not None
    assert manifest.metrics.test_nll <= manifest.goal.max_test_nll
