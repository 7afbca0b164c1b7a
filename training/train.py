"""The training run, top to bottom: settings -> data -> model -> optimizer -> loop -> validate -> checkpoint.

    python -m training train --out runs/default                    # one process
    torchrun --standalone --nproc-per-node 2 -m training train ...  # data-parallel, same flags

Under torchrun every rank holds the full data in memory, draws the same seeded permutation each epoch and
trains on its own slice of it (`shard_indices`); DistributedDataParallel averages gradients (gloo on CPU,
nccl on GPU), so all ranks keep identical weights and rank 0 alone logs and writes checkpoints.

The schedule is a function of training progress p in [0, 1]: the fraction of all epochs' examples seen,
or, with `--max-minutes`, the larger of that and the fraction of the time budget spent, so a time-limited
run still anneals to the end of its budget. The learning rate ramps up linearly over `lr_warmup`, then
follows a cosine to `lr_min`; the KL weight ramps from 0 to beta over `kl_warmup`; with `--batch-start` the
batch size doubles from there up to `batch_size` during `batch_ramp` (small batches make fast early
progress, large ones fast epochs). Epoch-limited runs are bit-for-bit reproducible on CPU (seeded init,
permutation and noise, re-seeded per epoch so that `--resume` continues exactly).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from training.config import TrainConfig
from training.data import load_splits
from training.evaluate import elbo_stats
from training.model import VAE
from training.objectives import negative_elbo

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
"""Settings a resumed run may change: budgets, where things are, how it reports; not the model or its optimiser."""

# hook(epochs done as a float, model, training seconds so far); runs with the training clock stopped
ProgressHook = Callable[[float, VAE, float], None]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but torch sees no CUDA device")
    return torch.device(name)


@dataclass(frozen=True)
class Dist:
    """Where this process sits in a (possibly one-process) data-parallel job."""

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device) -> tuple[Dist, torch.device]:
    """Join the torchrun job if launched by torchrun (WORLD_SIZE set), else run alone."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist(), device
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    return Dist(dist.get_rank(), dist.get_world_size()), device


def shard_indices(n: int, epoch: int, seed: int, rank: int, world: int) -> torch.Tensor:
    """This rank's training indices for `epoch`: a slice of one permutation shared by all ranks.

    The permutation depends only on (seed, epoch), so the ranks' slices are disjoint and together cover
    the set; it is truncated to a multiple of `world` so every rank runs the same number of steps.
    """
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    usable = n - n % world
    return perm[rank:usable:world]


def schedule(cfg: TrainConfig, progress: float) -> tuple[float, float, int]:
    """(learning rate, KL weight, global batch size) at training progress p in [0, 1]."""
    p = min(max(progress, 0.0), 1.0)
    batch = cfg.batch_size
    if cfg.batch_start and p < cfg.batch_ramp:  # double from batch_start towards batch_size
        doublings = int(math.log2(cfg.batch_size / cfg.batch_start) * p / cfg.batch_ramp)
        batch = min(cfg.batch_size, cfg.batch_start * 2**doublings)
    if cfg.lr_warmup > 0 and p < cfg.lr_warmup:
        lr = cfg.lr * p / cfg.lr_warmup
    else:
        t = (p - cfg.lr_warmup) / (1.0 - cfg.lr_warmup)
        lr = cfg.lr_min + 0.5 * (cfg.lr - cfg.lr_min) * (1.0 + math.cos(math.pi * t))
    beta = cfg.beta * min(1.0, p / cfg.kl_warmup) if cfg.kl_warmup > 0 else cfg.beta
    return lr, beta, batch


@dataclass
class TrainResult:
    model: VAE
    history: list[dict[str, float]] = field(default_factory=list)
    best_val_median_elbo: float = -math.inf
    seconds: float = 0.0
    out_dir: Path = Path()

    @property
    def best_checkpoint(self) -> Path:
        return self.out_dir / BEST


def _save(path: Path, payload: dict[str, Any]) -> None:
    """Write atomically: a crash mid-save never leaves a truncated checkpoint behind."""
    tmp = path.with_suffix(".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)


def check_resumable(saved: dict[str, Any], cfg: TrainConfig) -> None:
    """Refuse to resume with other model or optimisation settings: the weights would not load, or two runs'
    settings would be mixed under one recorded config."""
    now = cfg.to_dict()
    changed = sorted(key for key in now if key not in RESUME_MAY_CHANGE and saved.get(key) != now[key])
    if changed:
        differences = ", ".join(f"{key} {saved.get(key)!r} (now {now[key]!r})" for key in changed)
        raise ValueError(
            f"--resume: the run in {cfg.out} was trained with other settings: {differences}; "
            "pass the run's own settings (its checkpoint's config) or train into a new --out"
        )


def load_checkpoint(path: Path | str) -> tuple[VAE, dict[str, Any]]:
    """Rebuild the model a checkpoint describes (its config travels with it) and load its weights."""
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    model = VAE(TrainConfig.from_dict(ckpt["config"]))
    model.load_state_dict(ckpt["model"])
    model.eval()
    return model, ckpt


def train(
    cfg: TrainConfig, command: str = "", hook: ProgressHook | None = None, hook_every: int = 0
) -> TrainResult:
    """Run one training job; returns the final model and the per-epoch history.

    `hook` runs on rank 0 after each epoch and, if `hook_every` > 0, every `hook_every` training examples,
    with the training clock stopped: the benchmark uses it to score the test set as training goes without
    charging that time to training. `command` is recorded in the checkpoints (and so in the manifest).
    """
    # -- settings --------------------------------------------------------------------------------------------
    torch.set_flush_denormal(True)  # denormal floats in late training slow CPU matmuls by ~20%
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    dev_info, device = init_distributed(resolve_device(cfg.device))
    out_dir = Path(cfg.out)
    if dev_info.main:
        out_dir.mkdir(parents=True, exist_ok=True)
    use_amp = cfg.amp and device.type == "cuda"

    # -- data: the whole set as tensors on the device; batches are index lookups ----------------------------
    splits = load_splits(cfg.dataset, cfg.data_dir, cfg.val_size, cfg.seed, cfg.train_subset)
    x_train, x_val = splits.train.to(device), splits.val.to(device)
    shard_len = (len(x_train) - len(x_train) % dev_info.world) // dev_info.world
    total_examples = shard_len * cfg.epochs  # per rank
    budget = cfg.max_minutes * 60.0

    # -- model and optimizer (same seed on every rank: identical initial weights) ----------------------------
    torch.manual_seed(cfg.seed)
    model = VAE(cfg).to(device)
    # fused: one kernel for the whole update instead of a dozen per-tensor ops; a fifth of a CPU step at batch 256
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    start_epoch, seen, elapsed = 0, 0, 0.0
    history: list[dict[str, float]] = []
    best_val = -math.inf
    if cfg.resume:
        ckpt = torch.load(out_dir / LAST, map_location=device, weights_only=False)
        check_resumable(ckpt["config"], cfg)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        start_epoch, seen, elapsed = ckpt["epoch"], ckpt["seen"], ckpt["elapsed"]
        history, best_val = ckpt["history"], ckpt["best_val_median_elbo"]
        command = ckpt.get("command", command)
    net: torch.nn.Module = model
    if dev_info.world > 1:
        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    def progress_now() -> float:
        p = seen / total_examples
        return max(p, elapsed / budget) if budget else p

    def checkpoint(epoch: int) -> dict[str, Any]:
        return {
            "config": cfg.to_dict(),
            "command": command,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "epoch": epoch,
            "seen": seen,
            "elapsed": elapsed,
            "history": history,
            "best_val_median_elbo": best_val,
            "device": str(device),
            "world_size": dev_info.world,
        }

    # -- loop ------------------------------------------------------------------------------------------------
    epoch = start_epoch
    val_seconds = 0.0
    out_of_time = False
    while epoch < cfg.epochs and progress_now() < 1.0 and not out_of_time:
        model.train()
        clock = time.perf_counter()
        start_elapsed = elapsed
        idx = shard_indices(len(x_train), epoch, cfg.seed, dev_info.rank, dev_info.world).to(device)
        # noise re-seeded per (epoch, rank): ranks draw different eps, and a resumed run draws the same eps
        noise = torch.Generator(device=device).manual_seed(
            (cfg.seed * 100_003 + epoch) * 1009 + dev_info.rank
        )
        sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, recon, kl, examples
        bar = tqdm(
            total=len(idx),
            desc=f"epoch {epoch + 1}",
            unit="img",
            leave=False,
            disable=not (cfg.progress and dev_info.main),
        )
        lr = beta = 0.0
        i = step = 0
        while i < len(idx):
            step_start = elapsed
            lr, beta, batch = schedule(cfg, progress_now())
            for group in optimizer.param_groups:
                group["lr"] = lr
            xb = x_train[idx[i : i + max(1, batch // dev_info.world)]]  # [b, 1, 28, 28]
            i += len(xb)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                terms = negative_elbo(net, xb, samples=cfg.samples, kl=cfg.kl, beta=beta, generator=noise)
            loss = terms.loss.mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            step += 1
            seen += len(xb)
            with torch.no_grad():
                sums[:3] += torch.stack([terms.loss.sum(), terms.recon.sum(), terms.kl.sum()]).double()
                sums[3] += len(xb)
            elapsed = start_elapsed + time.perf_counter() - clock
            # stop early enough that one more step and the validation pass still fit in the budget, with a
            # margin for a machine whose speed varies (other jobs on the same cores)
            reserve = 2.0 * (elapsed - step_start) + 1.5 * val_seconds
            if budget and dev_info.world > 1:  # every rank must agree on the schedule and on when to stop
                shared = torch.tensor([elapsed, reserve], dtype=torch.float64, device=device)
                dist.broadcast(shared, src=0)
                elapsed, reserve = shared.tolist()
            bar.update(len(xb))
            if (
                hook is not None
                and hook_every
                and dev_info.main
                and seen // hook_every > (seen - len(xb)) // hook_every
            ):
                paused = time.perf_counter()
                hook(epoch + i / len(idx), model, elapsed)
                model.train()
                clock += time.perf_counter() - paused
            if step % 20 == 0:  # reading the sums syncs a GPU stream; do it now and then, not every step
                loss_sum, recon_sum, kl_sum, count = sums.tolist()
                bar.set_postfix(
                    loss=f"{loss_sum / count:.1f}",
                    recon=f"{recon_sum / count:.1f}",
                    kl=f"{kl_sum / count:.1f}",
                    ex_s=f"{count * dev_info.world / max(elapsed - start_elapsed, 1e-9):.0f}",
                )
            if budget and elapsed + reserve >= budget:
                out_of_time = True
                break
        bar.close()
        if dev_info.world > 1:
            dist.all_reduce(sums)
        epoch += 1

        # -- validate and checkpoint ---------------------------------------------------------------------
        val_clock = time.perf_counter()
        val = (
            elbo_stats(model, x_val, seed=cfg.seed)
            if len(x_val)
            else {"elbo": math.nan, "median_elbo": math.nan}
        )
        val_seconds = time.perf_counter() - val_clock
        elapsed = start_elapsed + time.perf_counter() - clock
        if budget and dev_info.world > 1:  # the next epoch's schedule and the loop's test use rank 0's clock
            shared = torch.tensor([elapsed, val_seconds], dtype=torch.float64, device=device)
            dist.broadcast(shared, src=0)
            elapsed, val_seconds = shared.tolist()
        n = sums[3].item()
        row = {
            "epoch": epoch,
            "train_loss": sums[0].item() / n,
            "train_elbo": -(sums[1].item() + sums[2].item()) / n,
            "train_recon": sums[1].item() / n,
            "train_kl": sums[2].item() / n,
            "val_elbo": val["elbo"],
            "val_median_elbo": val["median_elbo"],
            "lr": lr,
            "beta": beta,
            "epoch_seconds": time.perf_counter() - clock,
            "elapsed": elapsed,
            "examples": n,
        }
        history.append(row)
        # best = the highest median validation ELBO (robust to a single odd image; see elbo_stats);
        # with no validation set, the latest epoch
        score = row["val_median_elbo"] if len(x_val) else row["train_elbo"]
        improved = score > best_val or not len(x_val)
        best_val = max(best_val, score)
        if dev_info.main:
            payload = checkpoint(epoch)
            _save(out_dir / LAST, payload)
            if improved:
                _save(out_dir / BEST, payload)
            tqdm.write(
                f"epoch {epoch:4d} | train elbo {row['train_elbo']:8.2f} (recon {row['train_recon']:7.2f}"
                f" kl {row['train_kl']:6.2f}) | val elbo {row['val_elbo']:8.2f} median {row['val_median_elbo']:8.2f}"
                f"{' *' if improved else '  '}"
                f" | lr {lr:.2e} beta {beta:.2f} | {row['epoch_seconds']:5.1f} s, {elapsed:6.1f} s total"
            )
            if hook is not None:
                hook(float(epoch), model, elapsed)

    if dev_info.world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return TrainResult(
        model=model, history=history, best_val_median_elbo=best_val, seconds=elapsed, out_dir=out_dir
    )
