"""Checkpoints: atomic writes, exact resume, refusing other settings, rebuilding the model, the run record."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from training.checkpoints import BEST, LAST, load_checkpoint, run_record, save_checkpoint
from training.config import TrainConfig
from training.train import train


def test_a_failed_save_leaves_the_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / LAST
    save_checkpoint(path, {"epoch": 1})

    def crash(payload: object, file: Path) -> None:
        Path(file).write_bytes(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {"epoch": 2})
    assert torch.load(path, weights_only=False) == {"epoch": 1}


def _run_one_epoch_of_three(tiny_config: Callable[..., TrainConfig], out: Path) -> Path:
    """Train a 3-epoch run but stop it after its first epoch (as a crash would), via the progress hook."""

    class Stop(Exception):
        pass

    def stop_after_first_epoch(epoch: float, model: torch.nn.Module, seconds: float) -> None:
        if epoch >= 1:
            raise Stop

    with pytest.raises(Stop):
        train(tiny_config(out=str(out), epochs=3, batch_start=10), hook=stop_after_first_epoch)
    return out


def test_resume_continues_exactly(tiny_config: Callable[..., TrainConfig], tmp_path: Path) -> None:
    straight = train(tiny_config(out=str(tmp_path / "straight"), epochs=3, batch_start=10))
    interrupted = _run_one_epoch_of_three(tiny_config, tmp_path / "interrupted")
    assert torch.load(interrupted / LAST, weights_only=False)["epoch"] == 1
    resumed = train(tiny_config(out=str(interrupted), epochs=3, batch_start=10, resume=True))
    for (name, pa), pb in zip(
        straight.model.state_dict().items(), resumed.model.state_dict().values(), strict=True
    ):
        assert torch.equal(pa, pb), name
    assert [r["epoch"] for r in resumed.history] == [1, 2, 3]


def test_resume_refuses_other_model_settings(tiny_config: Callable[..., TrainConfig], tmp_path: Path) -> None:
    out = _run_one_epoch_of_three(tiny_config, tmp_path / "run")
    with pytest.raises(ValueError, match=r"latent_dim 4 \(now 8\), lr 0.003 \(now 0.01\)"):
        train(tiny_config(out=str(out), epochs=3, batch_start=10, resume=True, latent_dim=8, lr=0.01))
    resumed = train(tiny_config(out=str(out), epochs=4, batch_start=10, resume=True, max_minutes=5))
    assert [r["epoch"] for r in resumed.history] == [1, 2, 3, 4]  # budgets may change


def test_best_and_last_checkpoints_rebuild_the_model(tiny_config: Callable[..., TrainConfig]) -> None:
    cfg = tiny_config(arch="conv", channels=(4, 8), epochs=1)
    result = train(cfg, command="python -m training train --arch conv")
    model, ckpt = load_checkpoint(result.out_dir / BEST)
    assert (result.out_dir / LAST).is_file()
    assert ckpt["command"] == "python -m training train --arch conv"
    x = torch.rand(3, 1, 28, 28)
    assert torch.equal(model.encode(x).mu, result.model.eval().encode(x).mu)


def _history(epochs: int) -> list[dict[str, float]]:
    return [{"epoch": e, "train_elbo": -300.0 + e} for e in range(1, epochs + 1)]


def test_the_run_record_comes_from_last_when_it_continues_the_same_run(tmp_path: Path) -> None:
    best = {"epoch": 2, "elapsed": 20.0, "history": _history(2)}
    save_checkpoint(tmp_path / BEST, best)
    assert run_record(tmp_path / BEST, best) == {"epochs": 2, "seconds": 20.0, "history": _history(2)}

    save_checkpoint(tmp_path / LAST, {"epoch": 5, "elapsed": 50.0, "history": _history(5)})
    assert run_record(tmp_path / BEST, best) == {"epochs": 5, "seconds": 50.0, "history": _history(5)}

    another_run = [dict(_history(1)[0], train_elbo=-1.0)]
    save_checkpoint(tmp_path / LAST, {"epoch": 5, "elapsed": 50.0, "history": another_run})
    assert run_record(tmp_path / BEST, best)["epochs"] == 2
