"""Choosing the background model's settings on validation images only, never on the evaluation sets.

    python -m training.background_tuning models/fashion-mnist-mlp/1 --rate 0.1,0.2 --patch 0,7

For every combination of the settings given, trains a background model as `python -m training.background`
would (in memory, nothing written) and prints the AUROC of the anomaly score on validation images against
`validation_proxies` of other validation images: upside down, pixels shuffled, a quarter swapped, outlines.
The evaluation sets (MNIST digits and the rest) are not loaded. Pick the settings whose worst proxy is best;
then `python -m training.background` measures them once on the evaluation sets.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import tempfile
from dataclasses import replace
from pathlib import Path

from service.manifest import BACKGROUND_DECODER_FILE, BACKGROUND_ENCODER_FILE, read_manifest
from training.background import (
    BackgroundConfig,
    OnnxVAE,
    aurocs,
    export_background,
    measure,
    train_background,
    validation_proxies,
)
from training.config import TrainConfig
from training.data import load_splits


def proxy_aurocs(model_dir: Path, candidates: list[BackgroundConfig], progress: bool = False) -> list[dict]:
    """One row per candidate: its settings, training seconds and anomaly-score AUROC on each proxy; inliers
    are the first `val_images` validation images, the proxies are made from the next `val_images`."""
    manifest = read_manifest(model_dir)
    main_cfg = TrainConfig.from_dict(manifest.training.config, source=str(model_dir / "model.json"))
    splits = load_splits(
        main_cfg.dataset, main_cfg.data_dir, main_cfg.val_size, main_cfg.seed, main_cfg.train_subset
    )
    flat = math.prod(manifest.input_shape)
    main = OnnxVAE(model_dir)
    rows = []
    for cfg in candidates:
        n = cfg.val_images
        inliers = splits.val[:n].reshape(-1, flat).numpy()
        proxies = validation_proxies(splits.val[n : 2 * n].reshape(-1, flat).numpy())
        background, seconds = train_background(main_cfg, cfg, splits.train, progress)
        with tempfile.TemporaryDirectory() as scratch:
            export_background(background, Path(scratch), splits.val[:64])
            graphs = OnnxVAE(Path(scratch), BACKGROUND_ENCODER_FILE, BACKGROUND_DECODER_FILE)
            scored = measure(main, graphs, inliers, cfg.k, 10, manifest)
            figures = {
                name: round(aurocs(scored, measure(main, graphs, x, cfg.k, 40 + i, manifest)).anomaly, 4)
                for i, (name, x) in enumerate(proxies.items())
            }
        rows.append(
            {
                "rate": cfg.rate,
                "patch": cfg.patch,
                "epochs": cfg.epochs,
                "seconds": round(seconds, 1),
                **figures,
                "worst": min(figures.values()),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m training.background_tuning",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model_dir", type=Path, help="An exported model: MODEL_DIR/NAME/VERSION.")
    parser.add_argument("--rate", default="0.1", help="Noise rates to try, comma-separated.")
    parser.add_argument("--patch", default="7", help="Patch sides to try (0: no shuffling), comma-separated.")
    parser.add_argument("--epochs", default="3", help="Training epochs to try, comma-separated.")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=False)
    args = parser.parse_args(argv)
    grid = itertools.product(
        (float(v) for v in args.rate.split(",")),
        (int(v) for v in args.patch.split(",")),
        (int(v) for v in args.epochs.split(",")),
    )
    candidates = [
        replace(BackgroundConfig(), rate=rate, patch=patch, epochs=epochs) for rate, patch, epochs in grid
    ]
    proxy_aurocs(args.model_dir.resolve(), candidates, args.progress)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
