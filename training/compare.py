"""Paired comparison of checkpoints on the same test images: is one model better, and by how much?

    python -m training compare runs/a/best.pt runs/b/best.pt --iwae-k 1000 --images 1000

For each checkpoint: the test ELBO and active units on all test images (cheap), and the IWAE NLL with k
samples on the first `--images` (costly: k decoder passes per image). The NLL of 1,000 images has a standard
error of about 2.4 nats (images differ by ~75 nats), but two models scored on the same images differ far
less from image to image, so the paired difference of each later checkpoint against the first is reported
with its own, much smaller, standard error.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from training.checkpoints import load_checkpoint
from training.config import TrainConfig
from training.data import binarize_fixed, find_data_dir, load_split
from training.evaluate import elbo_stats, iwae_log_likelihood, latent_stats


def compare(
    checkpoints: list[Path], k: int, images: int, binarized: bool = False, data_dir: str | None = None
) -> list[dict[str, Any]]:
    """One row per checkpoint; every row after the first carries its paired NLL difference to the first."""
    rows: list[dict[str, Any]] = []
    first: torch.Tensor | None = None
    for path in checkpoints:
        model, ckpt = load_checkpoint(path)
        cfg = TrainConfig.from_dict(ckpt["config"], source=str(path))
        x = load_split(find_data_dir(cfg.dataset, data_dir, prefer=cfg.data_dir), "test")
        if binarized:  # the fixed test draw of the run's own seed, as export scores it
            x = binarize_fixed(x, cfg.binarize_seed)
        nll = -iwae_log_likelihood(model, x[:images], k)  # [images]
        active, _ = latent_stats(model, x)
        row: dict[str, Any] = {
            "checkpoint": str(path),
            "epoch": ckpt["epoch"],
            "binarized": binarized,
            "test_elbo": elbo_stats(model, x)["elbo"],
            "active_units": active,
            "nll": nll.mean().item(),
            "nll_se": nll.std().item() / math.sqrt(len(nll)),
            "iwae_k": k,
            "nll_images": len(nll),
        }
        if first is None:
            first = nll
        else:
            diff = nll - first
            row["nll_minus_first"] = diff.mean().item()
            row["nll_minus_first_se"] = diff.std().item() / math.sqrt(len(diff))
        rows.append(row)
    return rows
