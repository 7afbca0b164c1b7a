"""The training configuration: one dataclass, and an argparse parser generated from it.

Every field is a command-line flag (`latent_dim` -> `--latent-dim`) whose default is the field's default, so
the defaults below *are* the documented default model, and a checkpoint can carry its config as a plain dict.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, get_args, get_origin

Dataset = Literal["fashion-mnist", "mnist"]
Architecture = Literal["mlp", "conv"]
Activation = Literal["relu", "gelu", "silu", "softplus", "tanh", "elu"]
LikelihoodName = Literal["bernoulli", "gaussian"]
KLEstimator = Literal["analytic", "mc"]
DeviceName = Literal["auto", "cpu", "cuda"]


@dataclass
class TrainConfig:
    """Everything that defines a training run. `help` metadata becomes the flag's help text."""

    # data
    dataset: Dataset = field(default="fashion-mnist", metadata={"help": "Which image set to train on."})
    data_dir: str | None = field(
        default=None,
        metadata={
            "help": "Directory with the four IDX .gz files (else $VAE_DATA_DIR, then the Debian path)."
        },
    )
    val_size: int = field(default=5000, metadata={"help": "Training images held out for validation."})
    train_subset: int = field(
        default=0, metadata={"help": "Use only the first N training images (0 = all); for smoke tests."}
    )
    # model
    arch: Architecture = field(default="mlp", metadata={"help": "Encoder/decoder family."})
    hidden: tuple[int, ...] = field(
        default=(512, 512), metadata={"help": "MLP hidden widths (decoder mirrors them), e.g. 512,512."}
    )
    channels: tuple[int, ...] = field(
        default=(32, 64), metadata={"help": "Conv channels of the two stride-2 stages, e.g. 32,64."}
    )
    latent_dim: int = field(default=32, metadata={"help": "Dimension of z."})
    activation: Activation = field(default="gelu", metadata={"help": "Hidden-layer nonlinearity."})
    likelihood: LikelihoodName = field(
        default="bernoulli", metadata={"help": "p(x|z): Bernoulli logits or a Gaussian mean."}
    )
    gaussian_std: float = field(
        default=0.1, metadata={"help": "Fixed pixel standard deviation of the Gaussian likelihood."}
    )
    # objective
    kl: KLEstimator = field(
        default="analytic", metadata={"help": "KL term: closed form (SGVB B) or Monte Carlo (SGVB A)."}
    )
    samples: int = field(default=1, metadata={"help": "Samples of z per example in the training ELBO (L)."})
    beta: float = field(default=1.0, metadata={"help": "Weight of the KL term after warm-up."})
    kl_warmup: float = field(
        default=0.02, metadata={"help": "Fraction of training over which the KL weight ramps 0 -> beta."}
    )
    # optimisation
    epochs: int = field(default=100, metadata={"help": "Maximum number of epochs."})
    max_minutes: float = field(
        default=0.0,
        metadata={"help": "Training time budget; the lr schedule follows elapsed time (0 = epochs only)."},
    )
    batch_size: int = field(default=256, metadata={"help": "Global batch size (split across ranks)."})
    batch_start: int = field(
        default=128, metadata={"help": "Start at this batch size and double up to batch_size (0 = no ramp)."}
    )
    batch_ramp: float = field(
        default=0.02, metadata={"help": "Fraction of training over which the batch size ramp runs."}
    )
    lr: float = field(default=2e-3, metadata={"help": "Peak Adam learning rate."})
    lr_min: float = field(default=1e-5, metadata={"help": "Learning rate at the end of the cosine decay."})
    lr_warmup: float = field(
        default=0.001, metadata={"help": "Fraction of training with a linear lr ramp-up."}
    )
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay."})
    grad_clip: float = field(
        default=200.0,
        metadata={"help": "Clip the gradient norm (typical: ~50) to this; stops rare KL spikes (0 = off)."},
    )
    seed: int = field(default=0, metadata={"help": "Seeds the split, the batch order, init and the noise."})
    # run
    device: DeviceName = field(default="auto", metadata={"help": "auto picks cuda when available."})
    amp: bool = field(default=False, metadata={"help": "bfloat16 autocast on cuda (ignored on cpu)."})
    threads: int = field(default=0, metadata={"help": "torch intra-op threads (0 = torch's default)."})
    out: str = field(default="runs/default", metadata={"help": "Run directory for checkpoints and logs."})
    resume: bool = field(default=False, metadata={"help": "Continue from OUT/last.pt."})
    progress: bool = field(default=True, metadata={"help": "Show a progress bar per epoch."})
    export: str | None = field(
        default=None, metadata={"help": "After training, export the best checkpoint to this model directory."}
    )
    iwae_k: int = field(default=1000, metadata={"help": "Importance samples for the exported test NLL."})
    goal_nll: float = field(
        default=0.0,
        metadata={"help": "Target test NLL recorded in the manifest with --max-minutes (0 = no goal)."},
    )

    def __post_init__(self) -> None:
        checks = [
            (self.val_size >= 0, "val_size must be >= 0"),
            (self.latent_dim >= 1, "latent_dim must be >= 1"),
            (self.samples >= 1, "samples must be >= 1"),
            (self.epochs >= 1, "epochs must be >= 1"),
            (self.batch_size >= 1, "batch_size must be >= 1"),
            (self.lr > 0, "lr must be > 0"),
            (0 <= self.batch_start <= self.batch_size, "batch_start must be in [0, batch_size]"),
            (0.0 < self.batch_ramp <= 1.0, "batch_ramp must be in (0, 1]"),
            (0.0 <= self.kl_warmup < 1.0, "kl_warmup must be in [0, 1)"),
            (0.0 <= self.lr_warmup < 1.0, "lr_warmup must be in [0, 1)"),
            (self.max_minutes >= 0, "max_minutes must be >= 0"),
            (self.gaussian_std > 0, "gaussian_std must be > 0"),
            (len(self.hidden) >= 1 and min(self.hidden) >= 1, "hidden needs at least one positive width"),
            (len(self.channels) == 2 and min(self.channels) >= 1, "channels needs two positive widths"),
            (self.iwae_k >= 1, "iwae_k must be >= 1"),
            (self.goal_nll >= 0, "goal_nll must be >= 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """Rebuild from `to_dict` output (tuples come back from JSON/pickle as lists)."""
        known = {f.name for f in dataclasses.fields(cls)}
        clean = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items() if k in known}
        return cls(**clean)


def _int_tuple(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one flag per `TrainConfig` field, typed from its annotation."""
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        hint = hints[f.name]
        help_text = f"{f.metadata.get('help', '')} (default: {f.default})"
        if hint is bool:
            parser.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=f.default, help=help_text
            )
        elif get_origin(hint) is Literal:
            parser.add_argument(flag, choices=get_args(hint), default=f.default, help=help_text)
        elif hint == tuple[int, ...]:
            parser.add_argument(flag, type=_int_tuple, default=f.default, metavar="N,N", help=help_text)
        elif get_origin(hint) in (types.UnionType, typing.Union):
            (inner,) = (a for a in get_args(hint) if a is not type(None))
            parser.add_argument(flag, type=inner, default=f.default, help=help_text)
        else:
            parser.add_argument(flag, type=hint, default=f.default, help=help_text)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Build the config from parsed flags; invalid combinations raise ValueError with the reason."""
    return TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})
