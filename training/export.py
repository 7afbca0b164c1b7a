"""Export a checkpoint as the ONNX pair the service loads, checked against PyTorch, with its manifest.

    python -m training export runs/default/best.pt --out models/fashion-mnist-mlp/1

Writes into the model directory:
    encoder.onnx       x [batch, 1, 28, 28] -> mu, logvar [batch, latent_dim]   (logvar clamped as in training)
    decoder.onnx       z [batch, latent_dim] -> x_mean [batch, 1, 28, 28], pixel means in [0, 1]
    model.json         `service.manifest.Manifest`: metrics, checksums, config, command, library versions,
                       the run's commit, CPU and threads, and with --binarize dynamic the test set's draw
    samples.png        decoder means for z drawn from the prior
    reconstructions.png  test images (odd rows) over their reconstructions decode(mu) (even rows)
    curves.png         train and validation ELBO per epoch

Both graphs are exported with a dynamic batch axis (dynamo exporter, opset 18, weights inside the file) and
run in onnxruntime on real test images and random latents at batch sizes other than the traced one; export
fails if any output differs from PyTorch by more than `TOLERANCE`. A model trained with `--binarize dynamic`
is scored on the fixed seeded binarization of the test images (`data.binarize_fixed`), so its figures are
true log-likelihoods of binary images; it still serves inputs in [0, 1].
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import warnings
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from service.manifest import (
    DECODER_FILE,
    DECODER_INPUT,
    DECODER_OUTPUT,
    ENCODER_FILE,
    ENCODER_INPUT,
    ENCODER_OUTPUTS,
    Binarization,
    ExportCheck,
    FileEntry,
    Goal,
    Manifest,
    Metrics,
    ModelFiles,
    TrainingRecord,
    sha256_file,
    write_manifest,
)
from training.checkpoints import load_checkpoint, run_record
from training.config import TrainConfig
from training.data import BINARIZATION_METHOD, binarize_fixed, binarized_sha256, find_data_dir, load_split
from training.evaluate import EvalResult, evaluate
from training.figures import save_figures
from training.model import VAE
from training.provenance import library_versions

TOLERANCE = 1e-4
OPSET = 18


class ExportError(RuntimeError):
    """The exported graphs disagree with PyTorch, or the export itself failed."""


class EncoderGraph(nn.Module):
    """x -> (mu, logvar): the encoder as served."""

    def __init__(self, vae: VAE) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q = self.vae.encode(x)
        return q.mu, q.logvar


class DecoderGraph(nn.Module):
    """z -> pixel means in [0, 1]: the decoder as served."""

    def __init__(self, vae: VAE) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.vae.decode_mean(z)


def _export_graph(
    module: nn.Module, example: torch.Tensor, input_name: str, output_names: list[str], path: Path
) -> None:
    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    onnx_logger = logging.getLogger("torch.onnx")
    level = onnx_logger.level
    onnx_logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            # torch 2.13's exporter trips its own pytree deprecation and logs a line per torchvision op it
            # cannot register (torchvision is not used here); neither is anything a caller can act on
            warnings.filterwarnings("ignore", r".*isinstance\(treespec, LeafSpec\)", FutureWarning)
            torch.onnx.export(
                module,
                (example,),
                path,
                input_names=[input_name],
                output_names=output_names,
                dynamic_shapes={input_name: {0: batch}},
                opset_version=OPSET,
                dynamo=True,
                external_data=False,  # one self-contained file per graph, as the manifest's checksums assume
                verbose=False,
            )
    finally:
        onnx_logger.setLevel(level)


def export_onnx(model: VAE, out_dir: Path) -> tuple[Path, Path]:
    """Write encoder.onnx and decoder.onnx into out_dir (traced at batch 3; the batch axis stays dynamic)."""
    model.eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    encoder_path, decoder_path = out_dir / ENCODER_FILE, out_dir / DECODER_FILE
    with torch.no_grad():
        _export_graph(
            EncoderGraph(model).eval(),
            torch.rand(3, *model.input_shape),
            ENCODER_INPUT,
            list(ENCODER_OUTPUTS),
            encoder_path,
        )
        _export_graph(
            DecoderGraph(model).eval(),
            torch.randn(3, model.latent_dim),
            DECODER_INPUT,
            [DECODER_OUTPUT],
            decoder_path,
        )
    return encoder_path, decoder_path


def check_parity(model: VAE, out_dir: Path, images: torch.Tensor, seed: int = 0) -> ExportCheck:
    """Max |onnxruntime - torch| over real images and random latents, at two batch sizes each."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    encoder = ort.InferenceSession(str(out_dir / ENCODER_FILE), options, providers=["CPUExecutionProvider"])
    decoder = ort.InferenceSession(str(out_dir / DECODER_FILE), options, providers=["CPUExecutionProvider"])
    z_all = torch.randn(len(images), model.latent_dim, generator=torch.Generator().manual_seed(seed))
    enc_diff = dec_diff = 0.0
    with torch.inference_mode():
        for n in (1, len(images)):
            x, z = images[:n], z_all[:n]
            q = model.encode(x)
            mu, logvar = encoder.run(list(ENCODER_OUTPUTS), {ENCODER_INPUT: x.numpy()})
            enc_diff = max(
                enc_diff,
                float(np.abs(mu - q.mu.numpy()).max()),
                float(np.abs(logvar - q.logvar.numpy()).max()),
            )
            (x_mean,) = decoder.run([DECODER_OUTPUT], {DECODER_INPUT: z.numpy()})
            dec_diff = max(dec_diff, float(np.abs(x_mean - model.decode_mean(z).numpy()).max()))
            if x_mean.min() < 0.0 or x_mean.max() > 1.0:
                raise ExportError(
                    f"decoder.onnx produced values outside [0, 1]: {x_mean.min()}..{x_mean.max()}"
                )
    check = ExportCheck(encoder_max_abs_diff=enc_diff, decoder_max_abs_diff=dec_diff, tolerance=TOLERANCE)
    print(f"onnxruntime vs torch: encoder max |diff| {enc_diff:.2e}, decoder max |diff| {dec_diff:.2e}")
    if max(enc_diff, dec_diff) > TOLERANCE:
        raise ExportError(f"ONNX graphs differ from PyTorch by more than {TOLERANCE}: {check}")
    return check


def describe_architecture(cfg: TrainConfig) -> str:
    if cfg.arch == "mlp":
        sizes = "-".join(str(n) for n in (784, *cfg.hidden, cfg.latent_dim))
        return f"mlp {sizes} {cfg.activation}"
    c1, c2 = cfg.channels
    return f"conv {c1}-{c2} hidden {cfg.hidden[0]} latent {cfg.latent_dim} {cfg.activation}"


def build_manifest(
    cfg: TrainConfig,
    ckpt: dict[str, Any],
    run: dict[str, Any],
    result: EvalResult,
    check: ExportCheck,
    out_dir: Path,
    name: str,
    version: str,
    binarization: Binarization | None = None,
) -> Manifest:
    environment = ckpt.get("environment") or {}  # checkpoints written before it was recorded lack it
    goal = None
    if cfg.goal_nll:
        goal = Goal(max_test_nll=cfg.goal_nll, max_train_seconds=cfg.max_minutes * 60 or None)
    return Manifest(
        name=name,
        version=version,
        created=datetime.now(UTC),
        input_shape=VAE.input_shape,
        latent_dim=cfg.latent_dim,
        likelihood=cfg.likelihood,
        architecture=describe_architecture(cfg),
        dataset=cfg.dataset,
        files=ModelFiles(
            encoder=FileEntry(path=ENCODER_FILE, sha256=sha256_file(out_dir / ENCODER_FILE)),
            decoder=FileEntry(path=DECODER_FILE, sha256=sha256_file(out_dir / DECODER_FILE)),
        ),
        metrics=Metrics(
            test_elbo=result.elbo,
            test_nll=result.nll,
            iwae_k=result.iwae_k,
            bits_per_dim=result.bits_per_dim,
            active_units=result.active_units,
            recon_error=result.recon_error,
            test_images=result.images,
        ),
        export_check=check,
        training=TrainingRecord(
            command=ckpt.get("command", ""),
            config=cfg.model_dump(),
            epochs=run["epochs"],
            best_epoch=ckpt["epoch"],
            seconds=round(run["seconds"], 1),
            device=ckpt.get("device", "cpu"),
            git_commit=environment.get("git_commit"),
            cpu=environment.get("cpu"),
            threads=environment.get("threads"),
            libraries=environment.get("libraries"),
        ),
        goal=goal,
        binarization=binarization,
        libraries=library_versions(),
    )


def _replace_dir(new: Path, target: Path) -> None:
    """Put directory `new` at `target`, moving an existing `target` aside first and deleting it after."""
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    if target.exists():
        target.rename(old)
    new.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def export_checkpoint(
    checkpoint: Path,
    out_dir: Path,
    *,
    iwae_k: int | None = None,
    data_dir: str | None = None,
    test_images: int = 0,
    progress: bool = True,
) -> Manifest:
    """Evaluate, export, check and describe one checkpoint; returns the manifest it wrote.

    The name and version are the directory layout `.../NAME/VERSION`, as the service requires. Everything
    is written into a hidden sibling directory that replaces `out_dir` only once the parity check passed and
    the manifest is written: a failed export leaves the previous version (or nothing) in place, never graphs
    without a manifest, which the service would refuse. `test_images` > 0 evaluates on the first N test
    images only (for smoke tests; the manifest records how many were used).
    """
    model, ckpt = load_checkpoint(checkpoint)
    cfg = TrainConfig.from_dict(ckpt["config"], source=str(checkpoint))
    x_test = load_split(find_data_dir(cfg.dataset, data_dir, prefer=cfg.data_dir), "test")
    binarization = None
    if cfg.binarize == "dynamic":  # a model of binary images is scored on binary images: one seeded draw
        x_test = binarize_fixed(x_test, cfg.binarize_seed)
        binarization = Binarization(
            train=cfg.binarize,
            method=BINARIZATION_METHOD,
            test_seed=cfg.binarize_seed,
            test_sha256=binarized_sha256(x_test),
        )
    if test_images:
        x_test = x_test[:test_images]
    k = iwae_k or cfg.iwae_k
    result = evaluate(model, x_test, k, progress=progress)
    print(
        f"test: elbo {result.elbo:.2f}, nll {result.nll:.2f} (IWAE k={k}, {result.images} images), "
        f"{result.bits_per_dim:.4f} bits/dim, {result.active_units} active units, mse {result.recon_error:.4f}"
    )
    run = run_record(Path(checkpoint), ckpt)
    out_dir = out_dir.resolve()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.export-", dir=out_dir.parent))
    try:
        staging.chmod(0o755)  # mkdtemp's 0700 would hide the model from a service running as another user
        export_onnx(model, staging)
        check = check_parity(model, staging, x_test[:256])
        save_figures(model, x_test, run["history"], staging)
        manifest = build_manifest(
            cfg, ckpt, run, result, check, staging, out_dir.parent.name, out_dir.name, binarization
        )
        write_manifest(staging, manifest)
        _replace_dir(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if manifest.goal and manifest.metrics.test_nll > manifest.goal.max_test_nll:
        print(f"warning: test NLL {result.nll:.2f} misses the goal of {manifest.goal.max_test_nll}")
    print(f"exported to {out_dir}")
    return manifest
