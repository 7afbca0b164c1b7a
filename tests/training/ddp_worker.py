"""One rank of the data-parallel test, launched by torchrun from test_train.py (not collected by pytest).

    torchrun --standalone --nproc-per-node 2 tests/training/ddp_worker.py OUT_DIR DATA_DIR

Records every index this rank trained on (by wrapping `training.train.shard_indices`) and its final
weights into OUT_DIR/rank{R}.pt, so the test can check that shards are disjoint and weights identical.
"""

from __future__ import annotations

import os
import sys

import torch

import training.train as train_module
from training.config import TrainConfig

out_dir, data_dir = sys.argv[1], sys.argv[2]
seen: list[torch.Tensor] = []
original = train_module.shard_indices


def recording_shard_indices(n: int, epoch: int, seed: int, rank: int, world: int) -> torch.Tensor:
    idx = original(n, epoch, seed, rank, world)
    seen.append(idx.clone())
    return idx


train_module.shard_indices = recording_shard_indices
cfg = TrainConfig(
    data_dir=data_dir,
    val_size=100,
    hidden=(32,),
    latent_dim=4,
    batch_size=50,
    batch_start=0,
    epochs=2,
    out=out_dir,
    progress=False,
    threads=1,
)
result = train_module.train(cfg)
torch.save(
    {"indices": seen, "state": result.model.state_dict(), "world": int(os.environ["WORLD_SIZE"])},
    f"{out_dir}/rank{os.environ['RANK']}.pt",
)
