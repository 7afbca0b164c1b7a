"""The `model.json` manifest: the one contract between `training` (which writes it) and `service` (which reads it).

An exported model is a directory `NAME/VERSION/` holding `encoder.onnx`, `decoder.onnx` and this manifest.
The graphs have fixed tensor names so that neither side has to guess:

    encoder.onnx   x [batch, *input_shape] float32 in [0, 1]  ->  mu, logvar [batch, latent_dim] float32
    decoder.onnx   z [batch, latent_dim] float32              ->  x_mean [batch, *input_shape] float32 in [0, 1]

This module is torch-free and onnxruntime-free: training imports it to write the manifest, the service to
validate it, so a field can never mean one thing on one side and another on the other.
"""

from __future__ import annotations

import hashlib
from datetime import datetime
from pathlib import Path, PurePosixPath
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MANIFEST_NAME = "model.json"
ENCODER_FILE = "encoder.onnx"
DECODER_FILE = "decoder.onnx"
BACKGROUND_ENCODER_FILE = "background_encoder.onnx"
BACKGROUND_DECODER_FILE = "background_decoder.onnx"

ENCODER_INPUT = "x"
ENCODER_OUTPUTS = ("mu", "logvar")
DECODER_INPUT = "z"
DECODER_OUTPUT = "x_mean"

Likelihood = Literal["bernoulli", "gaussian"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FileEntry(_Strict):
    path: str = Field(description="File name relative to the model directory, inside it.")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="Hex SHA-256 of the file's bytes.")

    @field_validator("path")
    @classmethod
    def _inside_the_model_directory(cls, path: str) -> str:
        """Refuse names that leave the model directory, so nothing outside it is ever read or hashed.

        Lexical only: a symlink inside the directory can still point out of it, which the reader checks
        against the resolved path (`service.loading`).
        """
        parts = PurePosixPath(path).parts
        if path.startswith("/"):
            raise ValueError("must be a relative path inside the model directory, not an absolute one")
        if "\\" in path:
            raise ValueError("must separate directories with '/', not '\\'")
        if ".." in parts:
            raise ValueError("must stay inside the model directory: '..' is not allowed")
        if not parts:  # "" or "."
            raise ValueError("must name a file inside the model directory")
        return path


class ModelFiles(_Strict):
    encoder: FileEntry
    decoder: FileEntry


class Metrics(_Strict):
    """Test-set figures, in nats per image unless the name says otherwise."""

    test_elbo: float = Field(description="Mean ELBO on the test set (nats, higher is better).")
    test_nll: float = Field(
        description="IWAE bound on -log p(x) on the test set (nats, lower is better); with a Bernoulli decoder on "
        "grey-level pixels, on the binary cross-entropy (see training/evaluate.py)."
    )
    iwae_k: int = Field(ge=1, description="Importance samples per image used for test_nll.")
    bits_per_dim: float = Field(description="test_nll / (D ln 2), D = pixels per image.")
    active_units: int = Field(ge=0, description="Latent units with Cov_x(E_q[z]) > 0.01.")
    recon_error: float = Field(description="Mean squared error of decode(mu) against the test images.")
    test_images: int = Field(ge=1, description="How many test images the figures are over.")


class ExportCheck(_Strict):
    """The worst |onnxruntime - torch| seen when the graphs were checked at export."""

    encoder_max_abs_diff: float
    decoder_max_abs_diff: float
    tolerance: float


class Goal(_Strict):
    """The acceptance target the model was trained against, so a test can hold the shipped files to it."""

    max_test_nll: float = Field(description="metrics.test_nll must be at most this (nats).")
    max_train_seconds: float | None = Field(default=None, description="training.seconds must not exceed it.")


class TrainingRecord(_Strict):
    command: str = Field(description="The exact command that trained the model.")
    config: dict[str, object] = Field(description="The full training configuration.")
    epochs: int = Field(description="Epochs the run trained.")
    best_epoch: int | None = Field(
        default=None, description="The epoch of the exported weights (the best validation score)."
    )
    seconds: float = Field(description="Wall-clock training time of the run.")
    device: str
    # what it takes to repeat the run (absent from manifests written before they were recorded)
    git_commit: str | None = Field(
        default=None,
        description='The commit of the training code, or "uncommitted" when it differed from any commit.',
    )
    cpu: str | None = Field(default=None, description="The CPU model the run trained on.")
    threads: int | None = Field(default=None, ge=1, description="torch intra-op threads of the run.")
    libraries: dict[str, str] | None = Field(
        default=None, description="Library versions the run trained with."
    )


class Binarization(_Strict):
    """How the images behind `metrics` were binarized, when they were: the figures are then true
    log-likelihoods of binary images, and anyone can repeat the test set's draw from `method` and `test_seed`
    and check it against `test_sha256`."""

    train: Literal["dynamic"] = Field(description="dynamic: each training batch drawn afresh.")
    method: str = Field(description="How the fixed test set was drawn from the grey-level images.")
    test_seed: int
    test_sha256: str = Field(
        pattern=r"^[0-9a-f]{64}$", description="SHA-256 of the binary test images as uint8 0/1 in C order."
    )


class Auroc(_Strict):
    """Area under the ROC curve of each score, higher meaning anomalous: -elbo, -iwae and the anomaly score."""

    elbo: float = Field(ge=0.0, le=1.0)
    iwae: float = Field(ge=0.0, le=1.0)
    anomaly: float = Field(ge=0.0, le=1.0)


class BackgroundModel(_Strict):
    """The VAE the anomaly score compares the model with: same graph contract, its own latent size."""

    encoder: FileEntry
    decoder: FileEntry
    latent_dim: int = Field(ge=1)
    architecture: str
    perturbation: str = Field(description="How its training images were perturbed.")
    config: dict[str, object] = Field(description="The settings it was made with (training.background).")
    seconds: float = Field(description="Wall-clock training time.")
    max_abs_diff: float = Field(description="Worst |onnxruntime - torch| of its graphs at export.")


class Anomaly(_Strict):
    """The anomaly score served by `score`: its background model, threshold and measured AUROCs."""

    score: str = Field(description="What the score is, in words.")
    background: BackgroundModel
    threshold: float = Field(description="Scores above it are flagged (nats).")
    false_positive_rate: float = Field(
        ge=0.0, le=1.0, description="Share of validation images above the threshold, by construction."
    )
    threshold_images: int = Field(ge=1, description="Validation images the threshold was set on.")
    test_false_positive_rate: float = Field(
        ge=0.0, le=1.0, description="Share of the held-out test images above the threshold."
    )
    k: int = Field(ge=1, description="Importance samples per image in the measurements.")
    test_images: int = Field(ge=1, description="Held-out test images the AUROCs are measured on.")
    auroc: dict[str, Auroc] = Field(description="Test images against each out-of-distribution set.")
    command: str = Field(description="The command that made the background model and these figures.")
    created: datetime


class Manifest(_Strict):
    format_version: Literal[1] = 1
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    version: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    created: datetime
    input_shape: tuple[int, ...] = Field(min_length=1, description="One image's shape, e.g. [1, 28, 28].")
    value_range: tuple[float, float] = (0.0, 1.0)
    latent_dim: int = Field(ge=1)
    likelihood: Likelihood
    architecture: str
    dataset: str
    files: ModelFiles
    metrics: Metrics
    export_check: ExportCheck
    training: TrainingRecord
    goal: Goal | None = Field(default=None, description="The target this model was trained to meet, if any.")
    binarization: Binarization | None = Field(
        default=None, description="Present when the model trained and was scored on binarized images."
    )
    libraries: dict[str, str] = Field(description="Versions of the libraries that produced the files.")
    anomaly: Anomaly | None = Field(
        default=None, description="The anomaly score's background model and figures; None: `score` has none."
    )
    unit_variance: list[float] | None = Field(
        default=None,
        description="Variance of each latent unit's posterior mean over validation images, unit by unit (how "
        "much the model uses it: active above 0.01).",
    )

    def file_entries(self) -> list[tuple[str, FileEntry]]:
        """Every graph file the manifest names, with its role."""
        entries = [("encoder", self.files.encoder), ("decoder", self.files.decoder)]
        if self.anomaly is not None:
            background = self.anomaly.background
            entries += [
                ("background encoder", background.encoder),
                ("background decoder", background.decoder),
            ]
        return entries

    def background_view(self) -> Manifest | None:
        """The background model as a manifest of its own (its files and latent size, the rest this one's),
        so that it loads and runs like any model; None without one."""
        if self.anomaly is None:
            return None
        background = self.anomaly.background
        return self.model_copy(
            update={
                "files": ModelFiles(encoder=background.encoder, decoder=background.decoder),
                "latent_dim": background.latent_dim,
                "anomaly": None,
            }
        )


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file (read in chunks: large graphs do not sit in memory twice)."""
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def read_manifest(model_dir: Path) -> Manifest:
    """Parse and validate `model_dir/model.json` (raises OSError or pydantic.ValidationError)."""
    return Manifest.model_validate_json((model_dir / MANIFEST_NAME).read_bytes())


def write_manifest(model_dir: Path, manifest: Manifest) -> Path:
    path = model_dir / MANIFEST_NAME
    path.write_text(manifest.model_dump_json(indent=2) + "\n")
    return path


def verify_checksums(model_dir: Path, manifest: Manifest, *, shown_as: str | None = None) -> list[str]:
    """Return one problem per file that is missing or whose SHA-256 differs from the manifest (empty if fine).

    Problems name each file as `shown_as/entry.path` (default: `model_dir/entry.path`), so a server can
    name it relative to its MODEL_DIR rather than show where it lives on disk.
    """
    problems = []
    for role, entry in manifest.file_entries():
        path = model_dir / entry.path
        shown = path if shown_as is None else f"{shown_as}/{entry.path}"
        if not path.is_file():
            problems.append(f"{role} file {shown} is missing")
            continue
        actual = sha256_file(path)
        if actual != entry.sha256:
            problems.append(f"{role} file {shown} has sha256 {actual}, manifest says {entry.sha256}")
    return problems
