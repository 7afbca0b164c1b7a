"""Checkpoints: what a run writes after every epoch, what `--resume` reads back, and what export loads.

A checkpoint is one `torch.save`d dict that describes itself, as nanoGPT's do: the run's config and command
beside the weights, the optimiser state and how far the run got (`RunState`). The run directory holds

    last.pt   after every epoch: what `--resume` continues from
    best.pt   the epoch with the highest median validation ELBO: what export ships
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from training.config import TrainConfig
from training.model import VAE

LAST, BEST = "last.pt", "best.pt"
RESUME_MAY_CHANGE = frozenset(
    {
        "resume",
        "epochs",
        "max_minutes",
        "progress",
        "export",
        "threads",
        "device",
        "data_dir",
        "iwae_k",
        "goal_nll",
    }
)
"""Settings a resumed run may change: budgets, where things are, how it reports; not model or optimiser."""


@dataclass
class RunState:
    """How far a run has got: saved in every checkpoint, so that `--resume` continues exactly."""

    epoch: int = 0  # epochs completed
    seen: int = 0  # training examples this rank has stepped on
    elapsed: float = 0.0  # training seconds (steps and validation; the progress hooks excluded)
    history: list[dict[str, float]] = field(default_factory=list)  # one row per epoch
    best_val_median_elbo: float = -math.inf


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """Write atomically: a crash mid-save never leaves a truncated checkpoint behind."""
    tmp = path.with_suffix(".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)


def checkpoint_payload(
    cfg: TrainConfig,
    command: str,
    model: VAE,
    optimizer: torch.optim.Optimizer,
    state: RunState,
    device: torch.device,
    world_size: int,
    environment: dict[str, object] | None = None,
) -> dict[str, Any]:
    """Everything a checkpoint holds; `config` and `command` let it be rebuilt and described on its own,
    `environment` (`training.provenance`) says what it takes to repeat it."""
    return {
        "config": cfg.model_dump(),
        "command": command,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "epoch": state.epoch,
        "seen": state.seen,
        "elapsed": state.elapsed,
        "history": state.history,
        "best_val_median_elbo": state.best_val_median_elbo,
        "device": str(device),
        "world_size": world_size,
        "environment": environment or {},
    }


def check_resumable(saved: TrainConfig, cfg: TrainConfig) -> None:
    """Refuse to resume with other model or optimisation settings: the weights would not load, or two runs'
    settings would be mixed under one recorded config."""
    before, now = saved.model_dump(), cfg.model_dump()
    changed = sorted(key for key in now if key not in RESUME_MAY_CHANGE and before[key] != now[key])
    if changed:
        differences = ", ".join(f"{key} {before[key]!r} (now {now[key]!r})" for key in changed)
        raise ValueError(
            f"--resume: the run in {cfg.out} was trained with other settings: {differences}; "
            "pass the run's own settings (its checkpoint's config) or train into a new --out"
        )


def resume(
    path: Path, cfg: TrainConfig, model: VAE, optimizer: torch.optim.Optimizer, device: torch.device
) -> tuple[RunState, str]:
    """Load `path` into the model and optimiser; returns the run's state and its original command."""
    ckpt = torch.load(path, map_location=device, weights_only=False)
    check_resumable(TrainConfig.from_dict(ckpt["config"], source=str(path)), cfg)
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    state = RunState(
        epoch=ckpt["epoch"],
        seen=ckpt["seen"],
        elapsed=ckpt["elapsed"],
        history=ckpt["history"],
        best_val_median_elbo=ckpt["best_val_median_elbo"],
    )
    return state, ckpt["command"]


def load_checkpoint(path: Path | str) -> tuple[VAE, dict[str, Any]]:
    """Rebuild the model a checkpoint describes (its config travels with it) and load its weights.

    A config key this version does not know is refused (ConfigError), not dropped."""
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    model = VAE(TrainConfig.from_dict(ckpt["config"], source=str(path)))
    model.load_state_dict(ckpt["model"])
    model.eval()
    return model, ckpt


def run_record(checkpoint: Path, ckpt: dict[str, Any]) -> dict[str, Any]:
    """The whole run's epochs, seconds and history: the checkpoint holds them only up to its own epoch, so
    they come from `last.pt` beside it when that continues the same history (else from the checkpoint)."""
    last_path = checkpoint.parent / LAST
    if last_path.is_file() and last_path.resolve() != checkpoint.resolve():
        last = torch.load(last_path, map_location="cpu", weights_only=False)
        if last["history"][: len(ckpt["history"])] == ckpt["history"]:
            ckpt = last
    return {"epochs": ckpt["epoch"], "seconds": ckpt["elapsed"], "history": ckpt["history"]}
