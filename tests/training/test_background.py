"""The background model and the AUROCs: the perturbation, the AUROC itself, the evaluation sets, and the whole
step on a tiny exported model (its graphs checksummed, the service loading them and scoring with them)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from service.manifest import BACKGROUND_DECODER_FILE, BACKGROUND_ENCODER_FILE, read_manifest, verify_checksums
from service.runtime import load_graphs, session_options
from training import background
from training.background import (
    EVAL_SETS,
    BackgroundConfig,
    add_background,
    auroc,
    evaluation_sets,
    mnist_digits,
    perturb,
    shuffle_patches,
    validation_proxies,
)
from training.background_tuning import proxy_aurocs
from training.checkpoints import BEST
from training.config import TrainConfig
from training.export import export_checkpoint
from training.train import train


def test_perturb_replaces_about_rate_of_the_pixels_with_uniform_noise() -> None:
    x = torch.zeros(200, 1, 28, 28)
    out = perturb(x, 0.2, torch.Generator().manual_seed(0))
    replaced = out != 0
    assert abs(replaced.float().mean().item() - 0.2) < 0.01
    assert 0.45 < out[replaced].mean().item() < 0.55 and out.max() < 1.0
    again = perturb(x, 0.2, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)  # the generator decides


def test_shuffle_patches_moves_whole_patches_within_each_image() -> None:
    x = torch.arange(3 * 2 * 28 * 28, dtype=torch.float32).reshape(3, 2, 28, 28)
    out = shuffle_patches(x, 7, torch.Generator().manual_seed(0))

    def patches(t: torch.Tensor) -> list[set[bytes]]:  # per image: its 16 patches (both channels) as bytes
        blocks = t.reshape(3, 2, 4, 7, 4, 7).permute(0, 2, 4, 1, 3, 5).reshape(3, 16, -1)
        return [{block.numpy().tobytes() for block in image} for image in blocks]

    assert patches(out) == patches(x)  # the same patches in each image, channels kept together
    assert not torch.equal(out, x)
    assert torch.equal(out, shuffle_patches(x, 7, torch.Generator().manual_seed(0)))
    with pytest.raises(ValueError, match="does not divide"):
        shuffle_patches(x, 5, torch.Generator())


def test_perturb_shuffles_before_the_noise_and_keeps_the_black_share() -> None:
    x = torch.zeros(100, 1, 28, 28)
    x[:, :, :7, :7] = 1.0  # one bright patch per image, in the corner
    out = perturb(x, 0.0, torch.Generator().manual_seed(1), patch=7)
    assert torch.equal(out.sum(dim=(1, 2, 3)), x.sum(dim=(1, 2, 3)))  # no noise: every pixel kept
    assert (out[:, :, :7, :7].sum(dim=(1, 2, 3)) < 49).float().mean() > 0.8  # the patch moved in most images


def test_auroc_is_the_share_of_pairs_ranked_right_with_ties_halved() -> None:
    rng = np.random.default_rng(0)
    inliers, outliers = rng.integers(0, 5, 40).astype(float), rng.integers(2, 8, 30).astype(float)
    pairs = outliers[:, None] - inliers[None, :]
    expected = (np.sum(pairs > 0) + 0.5 * np.sum(pairs == 0)) / pairs.size
    assert auroc(inliers, outliers) == pytest.approx(expected)
    assert auroc(np.zeros(3), np.ones(3)) == 1.0 and auroc(np.ones(3), np.zeros(3)) == 0.0


def test_the_evaluation_sets_and_the_tuning_proxies_are_images_in_range() -> None:
    x = np.random.default_rng(1).random((50, 784)).astype(np.float32)
    sets = evaluation_sets(x)
    assert tuple(sets) == EVAL_SETS
    for name, images in {**sets, **validation_proxies(x)}.items():
        assert images.shape == (50, 784) and images.dtype == np.float32, name
        assert images.min() >= 0.0 and images.max() <= 1.0, name
    np.testing.assert_allclose(sets["inverted"], 1 - x)
    digits = mnist_digits()
    assert digits.shape == (5000, 784) and digits.max() == 1.0
    assert 0.1 < digits.mean() < 0.15  # MNIST's mean pixel is about 0.13; Fashion-MNIST's about 0.29


@pytest.fixture
def model_dir(synthetic_dir: Path, tmp_path: Path) -> Path:
    """A tiny model trained one epoch on the synthetic images and exported: MODEL_DIR/tiny/1."""
    torch.set_num_threads(1)
    cfg = TrainConfig(
        data_dir=str(synthetic_dir), val_size=100, hidden=(32,), latent_dim=4, batch_size=50, batch_start=0,
        epochs=1, out=str(tmp_path / "run"), progress=False, iwae_k=2,
    )  # fmt: skip
    model_dir = tmp_path / "models" / "tiny" / "1"
    export_checkpoint(train(cfg).out_dir / BEST, model_dir, progress=False)
    return model_dir


@pytest.mark.slow
def test_add_background_on_a_tiny_model(model_dir: Path) -> None:
    before = read_manifest(model_dir)
    small = BackgroundConfig(hidden=(16,), latent_dim=3, epochs=1, k=3, test_images=40, val_images=60)
    manifest = add_background(model_dir, small, command="test", progress=False)

    assert read_manifest(model_dir) == manifest
    assert manifest.files == before.files and manifest.metrics == before.metrics  # the model itself untouched
    assert verify_checksums(model_dir, manifest) == []
    anomaly = manifest.anomaly
    assert anomaly is not None and anomaly.background.latent_dim == 3
    assert {anomaly.background.encoder.path, anomaly.background.decoder.path} == {
        BACKGROUND_ENCODER_FILE,
        BACKGROUND_DECODER_FILE,
    }
    assert list(anomaly.auroc) == list(EVAL_SETS) and anomaly.k == 3 and anomaly.test_images == 40
    assert anomaly.threshold_images == 60 and anomaly.false_positive_rate == 0.01
    assert anomaly.auroc["uniform"].anomaly > 0.9  # even one epoch tells noise from bars
    assert manifest.unit_variance is not None and len(manifest.unit_variance) == 4
    graphs = load_graphs(
        model_dir, manifest, providers=["CPUExecutionProvider"], options=session_options(1, 1),
        warmup_rows=2, require_cuda=False,
    )  # fmt: skip
    assert graphs.background is not None  # what the service loads, checked against the manifest's shapes
    (model_dir / BACKGROUND_ENCODER_FILE).write_bytes(b"tampered")
    assert "background encoder" in verify_checksums(model_dir, manifest)[0]


SHIPPED = Path(__file__).resolve().parents[2] / "models" / "fashion-mnist-mlp" / "1"


def test_the_shipped_model_carries_its_background_and_the_figures_the_readme_quotes() -> None:
    manifest = read_manifest(SHIPPED)
    assert verify_checksums(SHIPPED, manifest) == []  # the background graphs included
    anomaly = manifest.anomaly
    assert anomaly is not None and list(anomaly.auroc) == list(EVAL_SETS)
    assert anomaly.false_positive_rate == 0.01 and anomaly.threshold == pytest.approx(-24.42, abs=0.01)
    figures = {name: round(auroc.anomaly, 3) for name, auroc in anomaly.auroc.items()}
    assert figures == {"mnist": 0.978, "noise-0.1": 0.953, "inverted": 1.0, "uniform": 1.0}
    assert min(figures.values()) >= 0.90  # the goal, on every set
    assert round(anomaly.auroc["mnist"].elbo, 3) == 0.553 and round(anomaly.auroc["mnist"].iwae, 3) == 0.461
    assert anomaly.background.config["patch"] == 7 and anomaly.background.config["rate"] == 0.1
    assert manifest.unit_variance is not None
    assert sum(v > 0.01 for v in manifest.unit_variance) == manifest.metrics.active_units


@pytest.mark.slow
def test_tuning_scores_each_candidate_on_the_validation_proxies_only(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(background, "mnist_digits", lambda: pytest.fail("tuning loaded an evaluation set"))
    small = BackgroundConfig(hidden=(16,), latent_dim=3, epochs=1, k=3, val_images=40)
    candidates = [replace(small, patch=0), replace(small, patch=7, rate=0.0)]

    rows = proxy_aurocs(model_dir, candidates)

    assert [(row["patch"], row["rate"]) for row in rows] == [(0, 0.1), (7, 0.0)]
    for row in rows:
        figures = [row[name] for name in ("flipped", "shuffled", "patched", "outlines")]
        assert all(0.0 <= f <= 1.0 for f in figures) and row["worst"] == min(figures)
