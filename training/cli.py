"""Command line: `python -m training {download,train,evaluate,compare,export}` (also installed as `vae-train`).

The default Fashion-MNIST model, trained in 10 minutes on 2 CPU cores and exported in one go:

    python -m training train --max-minutes 10 --epochs 1000 --goal-nll 234 \\
        --out runs/fashion-mnist-mlp --export models/fashion-mnist-mlp/1

Run `python -m training train --help` for every flag; the defaults are the default model's settings
(apart from the time budget, the epoch cap and the goal, which the command above sets).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

from training.config import add_config_arguments, config_from_args


def _download(args: argparse.Namespace) -> None:
    from training.data import DATA_DIR_ENV, download

    dest = Path(args.dest or os.environ.get(DATA_DIR_ENV) or Path("data") / args.dataset)
    for path in download(args.dataset, dest, mirrors=args.base_url or None):
        print(f"ok {path}")


def _train(args: argparse.Namespace, argv: list[str]) -> None:
    from training.train import train

    cfg = config_from_args(args)
    result = train(cfg, command=shlex.join(["python", "-m", "training", *argv]))
    if cfg.export and int(os.environ.get("RANK", "0")) == 0:  # under torchrun, rank 0 exports
        from training.export import export_checkpoint

        export_checkpoint(result.best_checkpoint, Path(cfg.export), progress=cfg.progress)


def _evaluate(args: argparse.Namespace) -> None:
    from training.checkpoints import load_checkpoint
    from training.config import TrainConfig
    from training.data import VAL_SEED_OFFSET, binarize_fixed, binarized_sha256, find_data_dir, load_splits
    from training.evaluate import evaluate

    model, ckpt = load_checkpoint(args.checkpoint)
    cfg = TrainConfig.from_dict(ckpt["config"], source=str(args.checkpoint))
    splits = load_splits(
        cfg.dataset,
        str(find_data_dir(cfg.dataset, args.data_dir, prefer=cfg.data_dir)),
        cfg.val_size,
        cfg.seed,
        cfg.train_subset,
    )
    x = splits.test if args.split == "test" else splits.val
    binarized = cfg.binarize == "dynamic" if args.binarized is None else args.binarized
    extra = {}
    if binarized:  # the test set's fixed draw (the validation set's is seeded one further, as in training)
        seed = cfg.binarize_seed if args.split == "test" else cfg.binarize_seed + VAL_SEED_OFFSET
        x = binarize_fixed(x, seed)
        extra = {"binarize_seed": seed, "binarized_sha256": binarized_sha256(x)}
    if args.images:
        x = x[: args.images]
    result = evaluate(model, x, args.iwae_k, progress=args.progress)
    record = {"checkpoint": str(args.checkpoint), "split": args.split, "binarized": binarized, **extra}
    print(json.dumps({**record, **result.to_dict()}, indent=2))


def _compare(args: argparse.Namespace) -> None:
    from training.compare import compare

    rows = compare(args.checkpoints, args.iwae_k, args.images, args.binarized, args.data_dir)
    print(json.dumps(rows, indent=2))


def _export(args: argparse.Namespace) -> None:
    from training.export import export_checkpoint

    export_checkpoint(
        args.checkpoint,
        args.out,
        iwae_k=args.iwae_k,
        data_dir=args.data_dir,
        test_images=args.images,
        progress=args.progress,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m training", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("download", help="Fetch the dataset's IDX files and verify their SHA-256.")
    p.add_argument("--dataset", choices=["fashion-mnist", "mnist"], default="fashion-mnist")
    p.add_argument("--dest", type=Path, help="Target directory (default: $VAE_DATA_DIR or data/DATASET).")
    p.add_argument(
        "--base-url",
        action="append",
        help="Mirror base URL, tried in order; repeatable (default: $VAE_DATA_MIRROR, else official).",
    )

    p = sub.add_parser("train", help="Train a VAE (runs data-parallel under torchrun).")
    add_config_arguments(p)

    for name, help_text in (
        ("evaluate", "Score a checkpoint: ELBO, IWAE NLL, bits/dim, active units, MSE."),
        ("export", "Export a checkpoint to ONNX with its manifest and figures."),
    ):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("checkpoint", type=Path)
        p.add_argument(
            "--data-dir",
            help="Directory with the IDX files (default: the run's own --data-dir if it still has them, "
            "else the lookup order).",
        )
        p.add_argument("--images", type=int, default=0, help="Use only the first N images (0 = all).")
        p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
        if name == "evaluate":
            p.add_argument("--iwae-k", type=int, default=1000, help="Importance samples per image.")
            p.add_argument("--split", choices=["test", "val"], default="test")
            p.add_argument(
                "--binarized",
                action=argparse.BooleanOptionalAction,
                default=None,
                help="Score the fixed seeded binarization of the images (default: if the run trained with "
                "--binarize dynamic).",
            )
        else:
            p.add_argument(
                "--out",
                type=Path,
                required=True,
                help="Model directory MODEL_DIR/NAME/VERSION (the name and version the service reports).",
            )
            p.add_argument("--iwae-k", type=int, help="Importance samples (default: the run's --iwae-k).")
    p = sub.add_parser(
        "compare", help="Paired comparison of checkpoints: NLL on the same test images, with standard errors."
    )
    p.add_argument("checkpoints", type=Path, nargs="+")
    p.add_argument("--iwae-k", type=int, default=1000, help="Importance samples per image.")
    p.add_argument("--images", type=int, default=1000, help="Score the NLL on the first N test images.")
    p.add_argument(
        "--binarized",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="Score the fixed seeded binarization of the test images.",
    )
    p.add_argument("--data-dir", help="Directory with the IDX files (default: the lookup order).")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (2 for bad input or data, with a one-line reason)."""
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    from training.data import DataError
    from training.export import ExportError

    try:
        if args.command == "download":
            _download(args)
        elif args.command == "train":
            _train(args, argv)
        elif args.command == "evaluate":
            _evaluate(args)
        elif args.command == "compare":
            _compare(args)
        else:
            _export(args)
    except (DataError, ExportError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
