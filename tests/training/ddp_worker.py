"""One rank of the data-parallel test, launched by torchrun from test_train.py (not collected by pytest).

    torchrun --standalone --nproc-per-node 2 tests/training/ddp_worker.py OUT_DIR DATA_DIR [MAX_MINUTES]

Records every index this rank trained on (by wrapping `training.train.shard_indices`), the checkpoints it
wrote (by wrapping `training.train.save_checkpoint`) and its final weights into OUT_DIR/rank{R}.pt, so the test can
check that shards are disjoint, weights identical and only rank 0 writes. With MAX_MINUTES the run is up to
1000 epochs under that time budget, so the ranks must agree on when to stop.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import torch

import training.train as train_module
from training.config import TrainConfig

out_dir, data_dir = sys.argv[1], sys.argv[2]
max_minutes = float(sys.argv[3]) if len(sys.argv) > 3 else 0.0
seen: list[torch.Tensor] = []
saved: list[str] = []
original = train_module.shard_indices
original_save = train_module.save_checkpoint


def recording_shard_indices(n: int, epoch: int, seed: int, rank: int, world: int) -> torch.Tensor:
    idx = original(n, epoch, seed, rank, world)
    seen.append(idx.clone())
    return idx


def recording_save(path: Path, payload: dict[str, Any]) -> None:
    saved.append(path.name)
    original_save(path, payload)


train_module.shard_indices = recording_shard_indices
train_module.save_checkpoint = recording_save
cfg = TrainConfig(
    data_dir=data_dir,
    val_size=100,
    hidden=(32,),
    latent_dim=4,
    batch_size=50,
    batch_start=0,
    epochs=1000 if max_minutes else 2,
    max_minutes=max_minutes,
    out=out_dir,
    progress=False,
    threads=1,
)
result = train_module.train(cfg)
torch.save(
    {
        "indices": seen,
        "saved": saved,
        "state": result.model.state_dict(),
        "world": int(os.environ["WORLD_SIZE"]),
    },
    f"{out_dir}/rank{os.environ['RANK']}.pt",
)
