"""Training benchmark: our default and strong configurations against the pytorch/examples VAE, on this CPU.

    .venv/bin/python -m bench.train_bench                 # full run: about 70 minutes on 2 cores
    .venv/bin/python -m bench.train_bench --only default  # the reference and the default: about 30 minutes
    .venv/bin/python -m bench.train_bench --quick         # smoke run: 1 epoch / 20 s each, k=10, 500 images

Both train on Fashion-MNIST with the same Bernoulli likelihood on [0, 1] intensities. The reference is
written the common way (pytorch/examples `vae/main.py`): 784-400-20 MLP, ReLU, Adam 1e-3, batch 128, a
torch DataLoader over a TensorDataset, summed BCE + KL, 100 epochs, all 60k training images. Ours is
`TrainConfig()`'s defaults with the default model's 10-minute budget; the strong one is the config recorded in
`models/fashion-mnist-strong/1/model.json` (its own time budget). For each the table reports training
seconds per epoch, final test ELBO and IWAE NLL (k=1000, all 10k test images) in nats, and the training
time at which the test ELBO first reached -245 nats (scored every 10k training examples with the clock
stopped). The table goes to stdout and to bench/results/train_bench.md. It is a benchmark, not a test:
it prints figures and asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from training.config import TrainConfig
from training.data import load_splits
from training.evaluate import elbo_stats, iwae_log_likelihood
from training.model import DiagonalGaussian
from training.provenance import cpu_model
from training.train import train

TARGET_ELBO = -245.0
HOOK_EVERY = 10_000  # training examples between test-set checks (until the target is reached)
RESULTS = Path(__file__).parent / "results" / "train_bench.md"
STRONG_MANIFEST = Path(__file__).parents[1] / "models" / "fashion-mnist-strong" / "1" / "model.json"


def strong_config(seed: int, minutes: float | None) -> TrainConfig:
    """The shipped strong model's recorded config, run in its own directory without exporting."""
    recorded = json.loads(STRONG_MANIFEST.read_text())["training"]["config"]
    overrides = {"seed": seed, "out": "runs/bench-strong", "progress": False, "export": None, "resume": False}
    if minutes is not None:
        overrides["max_minutes"] = minutes
    return TrainConfig.from_dict(recorded | overrides, source=str(STRONG_MANIFEST))


class ReferenceVAE(nn.Module):
    """pytorch/examples vae/main.py, with the interface `training.evaluate` expects."""

    input_shape = (1, 28, 28)
    latent_dim = 20
    likelihood = "bernoulli"

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(784, 400)
        self.fc21 = nn.Linear(400, 20)
        self.fc22 = nn.Linear(400, 20)
        self.fc3 = nn.Linear(20, 400)
        self.fc4 = nn.Linear(400, 784)

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        h = F.relu(self.fc1(x.reshape(-1, 784)))
        return DiagonalGaussian(self.fc21(h), self.fc22(h))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Bernoulli logits [..., 1, 28, 28] (the original applies the sigmoid inside; same model)."""
        return self.fc4(F.relu(self.fc3(z))).reshape(*z.shape[:-1], *self.input_shape)

    def decode_mean(self, z: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.decode(z))

    def forward(
        self, x: torch.Tensor, eps: torch.Tensor
    ) -> tuple[torch.Tensor, DiagonalGaussian, torch.Tensor]:
        q = self.encode(x)
        z = q.sample(eps)
        return self.decode(z), q, z


@dataclass
class Tracker:
    """Scores the test ELBO as training goes, until it first reaches the target, and remembers when."""

    x_test: torch.Tensor
    images: int
    reached_at: float | None = None
    reached_epoch: float | None = None

    def __call__(self, epoch: float, model: nn.Module, seconds: float) -> None:
        if self.reached_at is not None:
            return
        elbo = elbo_stats(model, self.x_test[: self.images])["elbo"]  # type: ignore[arg-type]
        if elbo >= TARGET_ELBO:
            self.reached_at, self.reached_epoch = seconds, epoch
            print(f"  reached test ELBO {elbo:.2f} >= {TARGET_ELBO} at {seconds:.1f} s (epoch {epoch:.2f})")


@dataclass
class Row:
    name: str
    epochs: float
    seconds: float
    test_elbo: float
    test_nll: float
    tracker: Tracker
    threads: int

    @property
    def seconds_per_epoch(self) -> float:
        return self.seconds / self.epochs


def train_reference(
    x_train: torch.Tensor, tracker: Tracker, epochs: int, seed: int
) -> tuple[nn.Module, float]:
    """The pytorch/examples loop, timed the same way as ours (clock stopped while the tracker scores)."""
    torch.set_flush_denormal(False)  # the common setup does not flush denormals
    torch.manual_seed(seed)
    model = ReferenceVAE()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loader = DataLoader(TensorDataset(x_train), batch_size=128, shuffle=True)
    elapsed, seen = 0.0, 0
    for epoch in range(epochs):
        model.train()
        clock = time.perf_counter()
        train_loss = 0.0
        for i, (data,) in enumerate(loader):
            optimizer.zero_grad()
            q = model.encode(data)
            recon = model.decode_mean(q.sample())
            bce = F.binary_cross_entropy(recon, data, reduction="sum")
            kld = -0.5 * torch.sum(1 + q.logvar - q.mu.pow(2) - q.logvar.exp())
            loss = bce + kld
            loss.backward()
            train_loss += loss.item()
            optimizer.step()
            seen += len(data)
            if tracker.reached_at is None and seen // HOOK_EVERY > (seen - len(data)) // HOOK_EVERY:
                paused = time.perf_counter()
                tracker(epoch + (i + 1) / len(loader), model, elapsed + paused - clock)
                model.train()
                clock += time.perf_counter() - paused
        elapsed += time.perf_counter() - clock
        print(f"  reference epoch {epoch + 1}: train loss {train_loss / len(x_train):.2f}, {elapsed:.1f} s")
        tracker(float(epoch + 1), model, elapsed)
    return model, elapsed


def score(model: nn.Module, x_test: torch.Tensor, k: int) -> tuple[float, float]:
    elbo = elbo_stats(model, x_test)["elbo"]  # type: ignore[arg-type]
    nll = -iwae_log_likelihood(model, x_test, k, progress=True).mean().item()  # type: ignore[arg-type]
    return elbo, nll


def table(rows: list[Row], k: int, images: int) -> str:
    lines = [
        f"| model | threads | epochs | s / epoch | train s | test ELBO | IWAE NLL (k={k}) "
        f"| time to ELBO {TARGET_ELBO:g} |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        t = r.tracker
        reached = (
            f"{t.reached_at:.1f} s (epoch {t.reached_epoch:.2f})"
            if t.reached_at is not None
            else "not reached"
        )
        lines.append(
            f"| {r.name} | {r.threads} | {r.epochs:.1f} | {r.seconds_per_epoch:.2f} | {r.seconds:.0f} | {r.test_elbo:.2f} "
            f"| {r.test_nll:.2f} | {reached} |"
        )
    lines.append("")
    lines.append(
        f"Fashion-MNIST, Bernoulli likelihood, {images} test images; torch {torch.__version__}, "
        f"{cpu_model()}."
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="A smoke run of the script, not a measurement.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--only",
        choices=["default", "strong"],
        help="Train the reference and this one of ours (default: both).",
    )
    args = parser.parse_args(argv)
    ref_epochs, minutes, k, images = (1, 1 / 3, 10, 500) if args.quick else (100, 10.0, 1000, 10_000)

    cfg = TrainConfig(max_minutes=minutes, epochs=1000, seed=args.seed, out="runs/bench", progress=False)
    splits = load_splits(cfg.dataset, val_size=cfg.val_size, seed=cfg.seed)
    x_full = torch.cat([splits.train, splits.val])  # the reference trains on all 60k, as in pytorch/examples
    x_test = splits.test[:images]
    rows = []

    print(f"reference: pytorch/examples VAE, {ref_epochs} epochs")
    threads = torch.get_num_threads()
    tracker = Tracker(x_test, images)
    model, seconds = train_reference(x_full, tracker, ref_epochs, args.seed)
    elbo, nll = score(model, x_test, k)
    rows.append(
        Row("reference (pytorch/examples, 784-400-20)", ref_epochs, seconds, elbo, nll, tracker, threads)
    )

    ours = []
    if args.only != "strong":
        ours.append(("default", cfg))
    if args.only != "default" and STRONG_MANIFEST.is_file():
        ours.append(("strong", strong_config(args.seed, minutes if args.quick else None)))
    elif args.only != "default":
        print(f"no {STRONG_MANIFEST}: no strong model shipped yet, its row is skipped")
    for name, our_cfg in ours:
        print(f"ours: {name} configuration, {our_cfg.max_minutes:g} minutes")
        tracker = Tracker(x_test, images)
        result = train(our_cfg, hook=tracker, hook_every=HOOK_EVERY)
        epochs = result.history[-1]["examples"] / len(splits.train) + len(result.history) - 1
        elbo, nll = score(result.model, x_test, k)
        arch = "-".join(str(n) for n in (784, *our_cfg.hidden, our_cfg.latent_dim))
        objective = "" if our_cfg.objective == "elbo" else f", {our_cfg.objective} k={our_cfg.samples}"
        row = Row(
            f"ours ({name}, {arch}{objective})",
            epochs,
            result.seconds,
            elbo,
            nll,
            tracker,
            torch.get_num_threads(),
        )
        rows.append(row)

    text = table(rows, k, images)
    print(text)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(text + "\n")
    print(f"written to {RESULTS}")


if __name__ == "__main__":
    main()
