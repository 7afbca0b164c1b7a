"""The training loop: schedule, sharding, determinism, the best epoch, time budget, real data, torchrun."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import training.train as train_module
from training.checkpoints import BEST, LAST, load_checkpoint
from training.config import TrainConfig
from training.train import schedule, shard_indices, train

REPO = Path(__file__).resolve().parents[2]


def test_schedule_warms_up_decays_and_ramps() -> None:
    cfg = TrainConfig(
        lr=1e-3, lr_min=1e-5, lr_warmup=0.1, kl_warmup=0.2, beta=0.5, batch_start=64, batch_size=256
    )
    lr0, beta0, batch0 = schedule(cfg, 0.0)
    assert (lr0, beta0, batch0) == (0.0, 0.0, 64)
    assert schedule(cfg, 0.05)[0] == pytest.approx(5e-4)
    assert schedule(cfg, 0.1)[0] == pytest.approx(1e-3)
    assert schedule(cfg, 0.1)[1] == pytest.approx(0.25)
    assert schedule(cfg, 0.55)[0] == pytest.approx((1e-3 + 1e-5) / 2)
    assert schedule(cfg, 1.0)[:2] == (pytest.approx(1e-5), 0.5)
    batches = [schedule(cfg, p / 100)[2] for p in range(101)]
    assert batches == sorted(batches) and set(batches) == {64, 128, 256}


def test_shards_are_disjoint_equal_and_change_per_epoch() -> None:
    shards = [shard_indices(103, epoch=0, seed=1, rank=r, world=4) for r in range(4)]
    assert {len(s) for s in shards} == {25}
    joined = torch.cat(shards)
    assert len(joined.unique()) == 100
    assert not torch.equal(shard_indices(103, 1, 1, 0, 4), shards[0])


TIMING = {"epoch_seconds", "elapsed"}  # the only history columns read from the clock


def _run_record(out: Path) -> dict[str, Any]:
    """Everything of a finished run's last.pt that does not come from the clock."""
    ckpt = torch.load(out / LAST, weights_only=False)
    ckpt["history"] = [{k: v for k, v in row.items() if k not in TIMING} for row in ckpt["history"]]
    del ckpt["elapsed"]
    return ckpt


def _assert_identical(a: Any, b: Any, where: str = "checkpoint") -> None:
    """Tensors bit for bit (torch.equal), everything else by ==, recursing through dicts and lists."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            _assert_identical(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_identical(x, y, f"{where}[{i}]")
    else:
        assert a == b, (where, a, b)


@pytest.mark.parametrize(
    ("threads", "settings"),
    [(1, {}), (2, {"objective": "iwae-dreg", "samples": 3, "binarize": "dynamic"})],
    ids=["elbo, 1 thread", "iwae-dreg, dynamic binarization, 2 threads"],
)
def test_an_epoch_limited_run_is_bit_for_bit_repeatable(
    tiny_config: Callable[..., TrainConfig], tmp_path: Path, threads: int, settings: dict[str, Any]
) -> None:
    """Two runs of the same config on the same thread count: the same weights, optimiser state, history and
    best epoch to the last bit, and the same recorded environment."""
    for name in ("a", "b"):
        train(tiny_config(out=str(tmp_path / name), threads=threads, epochs=2, **settings))
    a, b = _run_record(tmp_path / "a"), _run_record(tmp_path / "b")
    assert a["config"]["out"] != b["config"]["out"]
    a["config"]["out"] = b["config"]["out"]
    _assert_identical(a, b)
    assert a["environment"]["threads"] == threads
    best = [torch.load(tmp_path / name / BEST, weights_only=False)["model"] for name in ("a", "b")]
    _assert_identical(*best, where="best.pt")


def test_dynamic_binarization_draws_binary_batches_afresh(
    tiny_config: Callable[..., TrainConfig], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every training batch is binary and drawn anew each epoch; validation images are one fixed draw."""
    batches: list[torch.Tensor] = []
    step = train_module.train_step

    def recording(run: Any, x: torch.Tensor, *args: Any) -> Any:
        batches.append(x.clone())
        return step(run, x, *args)

    monkeypatch.setattr(train_module, "train_step", recording)
    monkeypatch.setattr(train_module, "shard_indices", lambda n, *_: torch.arange(n))  # same order each epoch
    cfg = tiny_config(binarize="dynamic", epochs=2)
    run, _ = train_module.set_up(cfg, "")
    assert set(run.x_val.unique().tolist()) == {0.0, 1.0}
    train(cfg)
    per_epoch = len(batches) // 2
    assert all(set(b.unique().tolist()) <= {0.0, 1.0} for b in batches)
    assert not torch.equal(batches[0], batches[per_epoch])  # the same images, drawn again


def test_best_checkpoint_is_the_epoch_with_the_highest_median_validation_elbo(
    tiny_config: Callable[..., TrainConfig],
) -> None:
    result = train(tiny_config(epochs=4))
    medians = [row["val_median_elbo"] for row in result.history]
    _, ckpt = load_checkpoint(result.out_dir / BEST)
    assert ckpt["epoch"] == 1 + max(range(len(medians)), key=medians.__getitem__)
    assert ckpt["best_val_median_elbo"] == max(medians)


def test_an_epoch_run_anneals_its_learning_rate_to_the_end(tiny_config: Callable[..., TrainConfig]) -> None:
    cfg = tiny_config(epochs=4)  # 10 steps per epoch
    lrs = [row["lr"] for row in train(cfg).history]
    assert lrs == sorted(lrs, reverse=True)
    assert lrs[-1] < 0.02 * cfg.lr


class FakeClock:
    """A clock that moves only when the test moves it."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_time_budget_stops_training(
    tiny_config: Callable[..., TrainConfig], monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a fake clock every step takes 10 ms and every validation pass 30 ms (130 ms an epoch of 10 steps).
    The 3 s budget, not the 1000 epochs, ends the run: it cuts the last epoch short so that its validation
    pass still fits, and the learning rate has annealed to its floor by then."""
    clock = FakeClock()

    def taking(seconds: float, function: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            clock.now += seconds
            return function(*args, **kwargs)

        return timed

    monkeypatch.setattr(train_module, "train_step", taking(0.01, train_module.train_step))
    monkeypatch.setattr(train_module, "validate", taking(0.03, train_module.validate))
    cfg = tiny_config(epochs=1000, max_minutes=0.05)
    history = train(cfg, clock=clock).history
    assert 1 < len(history) < 1000, len(history)
    assert history[-1]["examples"] < history[0]["examples"]  # stopped mid-epoch
    assert history[-1]["elapsed"] <= 3.0  # the last validation pass included
    assert history[-1]["lr"] == pytest.approx(cfg.lr_min, rel=0.5)


@pytest.mark.slow
def test_loss_decreases_on_real_data(real_dir: Path, tiny_config: Callable[..., TrainConfig]) -> None:
    cfg = tiny_config(
        data_dir=str(real_dir), train_subset=3000, val_size=500, hidden=(128,), latent_dim=8, epochs=4
    )
    history = train(cfg).history
    train_elbo = [row["train_elbo"] for row in history]
    val_elbo = [row["val_elbo"] for row in history]
    assert train_elbo == sorted(train_elbo), train_elbo
    assert val_elbo[-1] > val_elbo[0] + 10, val_elbo


@pytest.mark.slow
@pytest.mark.parametrize("max_minutes", [0.0, 0.05], ids=["2 epochs", "3 s budget"])
def test_torchrun_data_parallel_shards_and_keeps_ranks_identical(
    synthetic_dir: Path, tmp_path: Path, max_minutes: float
) -> None:
    """Under a time budget each rank has its own clock: they must still agree on every step and on the stop."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        str(REPO / "tests" / "training" / "ddp_worker.py"), str(tmp_path), str(synthetic_dir), str(max_minutes),
    ]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert ranks[0]["world"] == 2
    epochs = len(ranks[0]["indices"])
    assert len(ranks[1]["indices"]) == epochs
    assert epochs == 2 if not max_minutes else 1 < epochs < 1000
    for epoch in range(epochs):
        a, b = (set(r["indices"][epoch].tolist()) for r in ranks)
        assert a and b and not a & b
        assert len(a | b) == 500  # all 500 training images (600 minus 100 validation) in each epoch
    for (name, pa), pb in zip(ranks[0]["state"].items(), ranks[1]["state"].values(), strict=True):
        assert torch.equal(pa, pb), name
    assert (tmp_path / BEST).is_file()
    assert ranks[0]["saved"].count(LAST) == epochs and ranks[1]["saved"] == []  # rank 0 alone writes
