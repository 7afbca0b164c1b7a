"""The training run, top to bottom: set-up, then epoch -> validation -> checkpoint until epochs or time end.

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
progress, large ones fast epochs).

With `--binarize dynamic` every training batch is drawn afresh as x ~ Bernoulli(pixel intensities) from the
epoch's noise generator, and the validation images are binarized once (`data.binarize_fixed`), so the
best epoch is chosen on one fixed set of binary images.

Reproducibility: a run limited by epochs (no `--max-minutes`) is bit-for-bit repeatable on CPU given the
same code, machine, thread count (`--threads`) and library versions: init, permutation, noise and
binarization are all seeded, re-seeded per epoch so that `--resume` continues exactly, and nothing else
depends on the clock. The checkpoints record those four (`training.provenance`). A time-limited run is not
repeatable: its schedule and its stop follow the clock.

About 420 lines in one file, on purpose: set-up, epoch, validation, checkpoint and stop are one run read top
to bottom (nanoGPT's shape); checkpoint I/O and figures already live in their own modules.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from training.checkpoints import BEST, LAST, RunState, checkpoint_payload, resume, save_checkpoint
from training.config import TrainConfig
from training.data import VAL_SEED_OFFSET, binarize_fixed, load_splits
from training.evaluate import elbo_stats
from training.model import VAE
from training.objectives import ElboTerms, training_terms
from training.provenance import environment

# hook(epochs done as a float, model, training seconds so far); runs with the training clock stopped
ProgressHook = Callable[[float, VAE, float], None]
Clock = Callable[[], float]


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
class Run:
    """One training job as set up: its settings, where it runs, its data, its model and optimiser."""

    cfg: TrainConfig
    command: str  # recorded in the checkpoints, and from there in the manifest
    ranks: Dist
    device: torch.device
    out_dir: Path
    x_train: torch.Tensor  # [N, 1, 28, 28] on the device
    x_val: torch.Tensor
    model: VAE
    net: torch.nn.Module  # the model, or DistributedDataParallel around it
    optimizer: torch.optim.Optimizer
    environment: dict[str, object]  # commit, CPU, threads, libraries (`training.provenance`)

    @property
    def budget(self) -> float:
        """Training seconds allowed (0: no time limit)."""
        return self.cfg.max_minutes * 60.0

    def progress(self, state: RunState) -> float:
        """Training progress p: examples seen of all epochs' examples, or the budget spent if that is more."""
        p = state.seen / (len(self.x_train) // self.ranks.world * self.cfg.epochs)
        return max(p, state.elapsed / self.budget) if self.budget else p

    def share(self, *values: float) -> list[float]:
        """Rank 0's values on every rank when there is a time budget: each rank has its own clock, but all
        must agree on the schedule and on when to stop."""
        if not self.budget or self.ranks.world == 1:
            return list(values)
        shared = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.broadcast(shared, src=0)
        return shared.tolist()


class Stopwatch:
    """Training seconds, continuing from `start`; paused while progress hooks run."""

    def __init__(self, clock: Clock, start: float) -> None:
        self.clock = clock
        self.origin = clock() - start

    def read(self) -> float:
        return self.clock() - self.origin

    @contextmanager
    def paused(self) -> Iterator[None]:
        stopped = self.clock()
        try:
            yield
        finally:
            self.origin += self.clock() - stopped


@dataclass
class EpochResult:
    sums: torch.Tensor  # loss, recon, KL and examples, summed over every rank's steps
    lr: float  # the last step's learning rate and KL weight
    beta: float
    out_of_time: bool  # the time budget ran out before the shard did


@dataclass
class TrainResult:
    model: VAE
    history: list[dict[str, float]]
    seconds: float
    out_dir: Path

    @property
    def best_checkpoint(self) -> Path:
        return self.out_dir / BEST


def train(
    cfg: TrainConfig,
    command: str = "",
    hook: ProgressHook | None = None,
    hook_every: int = 0,
    clock: Clock = time.perf_counter,
) -> TrainResult:
    """Run one training job; returns the final model and the per-epoch history.

    `hook` runs on rank 0 after each epoch and, if `hook_every` > 0, every `hook_every` training examples,
    with the training clock stopped: the benchmark uses it to score the test set as training goes without
    charging that time to training. `command` is recorded in the checkpoints (and so in the manifest).
    `clock` measures the time budget (tests pass a fake one).
    """
    run, state = set_up(cfg, command)
    val_seconds = 0.0  # the last validation pass's: a time-limited epoch stops in time for the next one
    out_of_time = False
    while state.epoch < cfg.epochs and run.progress(state) < 1.0 and not out_of_time:
        # -- epoch -------------------------------------------------------------------------------------------
        watch = Stopwatch(clock, state.elapsed)
        start_elapsed = state.elapsed
        epoch = train_epoch(run, state, watch, val_seconds, hook, hook_every)
        out_of_time = epoch.out_of_time
        state.epoch += 1

        # -- validation (on the training clock) --------------------------------------------------------------
        val_start = clock()
        val = validate(run)
        val_seconds = clock() - val_start
        epoch_seconds = watch.read() - start_elapsed
        # the next epoch's schedule and this loop's test use rank 0's clock
        state.elapsed, val_seconds = run.share(start_elapsed + epoch_seconds, val_seconds)

        # -- checkpoint --------------------------------------------------------------------------------------
        row = epoch_row(state, epoch, val, epoch_seconds)
        improved = record_epoch(run, state, row)
        if run.ranks.main:
            log_epoch(row, improved)
            if hook is not None:
                hook(float(state.epoch), run.model, state.elapsed)

    # -- stop: out of epochs or out of time ------------------------------------------------------------------
    if run.ranks.world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return TrainResult(model=run.model, history=state.history, seconds=state.elapsed, out_dir=run.out_dir)


def set_up(cfg: TrainConfig, command: str) -> tuple[Run, RunState]:
    """Settings -> placement -> data -> model and optimiser, restored from OUT/last.pt with --resume."""
    torch.set_flush_denormal(True)  # denormal floats, common late in training, slow CPU matmuls down
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    ranks, device = init_distributed(resolve_device(cfg.device))
    out_dir = Path(cfg.out)
    if ranks.main:
        out_dir.mkdir(parents=True, exist_ok=True)

    # the whole set as tensors on the device: batches are index lookups
    splits = load_splits(cfg.dataset, cfg.data_dir, cfg.val_size, cfg.seed, cfg.train_subset)
    x_val = splits.val
    if cfg.binarize == "dynamic":  # one fixed draw: every epoch is scored on the same binary images
        x_val = binarize_fixed(x_val, cfg.binarize_seed + VAL_SEED_OFFSET)

    torch.manual_seed(cfg.seed)  # the same on every rank: identical initial weights
    model = VAE(cfg).to(device)
    # fused: one kernel for the whole update instead of a dozen per-tensor ops
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    state = RunState()
    if cfg.resume:
        state, command = resume(out_dir / LAST, cfg, model, optimizer, device)
    net: torch.nn.Module = model
    if ranks.world > 1:
        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    run = Run(
        cfg=cfg,
        command=command,
        ranks=ranks,
        device=device,
        out_dir=out_dir,
        x_train=splits.train.to(device),
        x_val=x_val.to(device),
        model=model,
        net=net,
        optimizer=optimizer,
        environment=environment(),
    )
    return run, state


def train_epoch(
    run: Run,
    state: RunState,
    watch: Stopwatch,
    val_seconds: float,
    hook: ProgressHook | None,
    hook_every: int,
) -> EpochResult:
    """One pass over this rank's shard, cut short when the rest of the time budget is needed."""
    cfg, ranks = run.cfg, run.ranks
    run.model.train()
    idx = shard_indices(len(run.x_train), state.epoch, cfg.seed, ranks.rank, ranks.world).to(run.device)
    # noise re-seeded per (epoch, rank): ranks draw different eps, and a resumed run draws the same eps
    noise = torch.Generator(device=run.device).manual_seed(
        (cfg.seed * 100_003 + state.epoch) * 1009 + ranks.rank
    )
    sums = torch.zeros(4, dtype=torch.float64, device=run.device)  # loss, recon, kl, examples
    show = cfg.progress and ranks.main
    bar = tqdm(total=len(idx), desc=f"epoch {state.epoch + 1}", unit="img", leave=False, disable=not show)
    start_elapsed = state.elapsed
    lr = beta = 0.0
    i = step = 0
    out_of_time = False
    while i < len(idx) and not out_of_time:
        step_start = state.elapsed
        lr, beta, batch = schedule(cfg, run.progress(state))
        xb = run.x_train[idx[i : i + max(1, batch // ranks.world)]]  # [b, 1, 28, 28]
        i += len(xb)
        if cfg.binarize == "dynamic":
            xb = torch.bernoulli(xb, generator=noise)
        terms = train_step(run, xb, lr, beta, noise)
        step += 1
        state.seen += len(xb)
        with torch.no_grad():
            sums[:3] += torch.stack([terms.loss.sum(), terms.recon.sum(), terms.kl.sum()]).double()
            sums[3] += len(xb)
        elapsed = watch.read()
        # stop early enough that one more step and the validation pass still fit in the budget, with a
        # margin for a machine whose speed varies (other jobs on the same cores)
        state.elapsed, reserve = run.share(elapsed, 2.0 * (elapsed - step_start) + 1.5 * val_seconds)
        out_of_time = bool(run.budget) and state.elapsed + reserve >= run.budget
        bar.update(len(xb))
        crossed = hook_every and state.seen // hook_every > (state.seen - len(xb)) // hook_every
        if hook is not None and crossed and ranks.main:
            with watch.paused():
                hook(state.epoch + i / len(idx), run.model, state.elapsed)
                run.model.train()
        if show and step % 20 == 0:  # reading the sums syncs a GPU stream: now and then, not every step
            loss, recon, kl, count = sums.tolist()
            rate = count * ranks.world / max(state.elapsed - start_elapsed, 1e-9)
            bar.set_postfix(
                loss=f"{loss / count:.1f}",
                recon=f"{recon / count:.1f}",
                kl=f"{kl / count:.1f}",
                ex_s=f"{rate:.0f}",
            )
    bar.close()
    if ranks.world > 1:
        dist.all_reduce(sums)
    return EpochResult(sums, lr, beta, out_of_time)


def train_step(run: Run, x: torch.Tensor, lr: float, beta: float, noise: torch.Generator) -> ElboTerms:
    """One optimiser step on the batch x [b, 1, 28, 28] at learning rate `lr` and KL weight `beta`."""
    cfg = run.cfg
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    use_amp = cfg.amp and run.device.type == "cuda"
    with torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=use_amp):
        terms = training_terms(
            run.net, x, objective=cfg.objective, samples=cfg.samples, kl=cfg.kl, beta=beta, generator=noise
        )
    run.optimizer.zero_grad(set_to_none=True)
    terms.loss.mean().backward()
    if cfg.grad_clip:
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), cfg.grad_clip)
    run.optimizer.step()
    return terms


def validate(run: Run) -> dict[str, float]:
    """Mean and median validation ELBO (NaN without a validation set)."""
    if not len(run.x_val):
        return {"elbo": math.nan, "median_elbo": math.nan}
    return elbo_stats(run.model, run.x_val, seed=run.cfg.seed)


def epoch_row(
    state: RunState, epoch: EpochResult, val: dict[str, float], epoch_seconds: float
) -> dict[str, float]:
    """The epoch's line in the history: per-example means of the training terms, validation ELBO, schedule."""
    loss, recon, kl, n = epoch.sums.tolist()
    return {
        "epoch": state.epoch,
        "train_loss": loss / n,
        "train_elbo": -(recon + kl) / n,
        "train_recon": recon / n,
        "train_kl": kl / n,
        "val_elbo": val["elbo"],
        "val_median_elbo": val["median_elbo"],
        "lr": epoch.lr,
        "beta": epoch.beta,
        "epoch_seconds": epoch_seconds,
        "elapsed": state.elapsed,
        "examples": n,
    }


def record_epoch(run: Run, state: RunState, row: dict[str, float]) -> bool:
    """Add the row to the history and, on rank 0, write last.pt and, if the epoch is the best, best.pt.

    Best is the highest median validation ELBO (robust to a single odd image; see `elbo_stats`); with no
    validation set, the latest epoch. Returns whether this epoch is the best so far.
    """
    state.history.append(row)
    has_val = len(run.x_val) > 0
    score = row["val_median_elbo"] if has_val else row["train_elbo"]
    improved = score > state.best_val_median_elbo or not has_val
    state.best_val_median_elbo = max(state.best_val_median_elbo, score)
    if run.ranks.main:
        payload = checkpoint_payload(
            run.cfg,
            run.command,
            run.model,
            run.optimizer,
            state,
            run.device,
            run.ranks.world,
            run.environment,
        )
        save_checkpoint(run.out_dir / LAST, payload)
        if improved:
            save_checkpoint(run.out_dir / BEST, payload)
    return improved


def log_epoch(row: dict[str, float], improved: bool) -> None:
    tqdm.write(
        f"epoch {row['epoch']:4.0f} | train elbo {row['train_elbo']:8.2f} (recon {row['train_recon']:7.2f}"
        f" kl {row['train_kl']:6.2f}) | val elbo {row['val_elbo']:8.2f} median {row['val_median_elbo']:8.2f}"
        f"{' *' if improved else '  '} | lr {row['lr']:.2e} beta {row['beta']:.2f}"
        f" | {row['epoch_seconds']:5.1f} s, {row['elapsed']:6.1f} s total"
    )
