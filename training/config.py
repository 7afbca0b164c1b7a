"""The training configuration: one pydantic model, and the `train` command's flags generated from it.

Every field is a flag (`latent_dim` -> `--latent-dim`) whose default is the field's default and whose help is
the field's description, so the defaults below *are* the documented default model. Checkpoints and the
manifest carry the config as a plain dict; `TrainConfig.from_dict` reads one back and refuses a key it does
not know (a setting renamed or removed since) instead of dropping it.
"""

from __future__ import annotations

import argparse
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

Dataset = Literal["fashion-mnist", "mnist"]
Architecture = Literal["mlp", "conv"]
Activation = Literal["relu", "gelu", "silu", "softplus", "tanh", "elu"]
LikelihoodName = Literal["bernoulli", "gaussian"]
KLEstimator = Literal["analytic", "mc"]
Objective = Literal["elbo", "iwae", "iwae-dreg"]
Binarize = Literal["none", "dynamic"]
DeviceName = Literal["auto", "cpu", "cuda"]


class ConfigError(ValueError):
    """A config that does not validate; the message is one line that names every offending key."""


class TrainConfig(BaseModel):
    """Everything that defines a training run."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # data
    dataset: Dataset = Field("fashion-mnist", description="Which image set to train on.")
    data_dir: str | None = Field(
        None, description="Directory with the four IDX .gz files (else $VAE_DATA_DIR, then the Debian path)."
    )
    val_size: int = Field(5000, ge=0, description="Training images held out for validation.")
    train_subset: int = Field(
        0, description="Use only the first N training images (0 = all); for smoke tests."
    )
    binarize: Binarize = Field(
        "none",
        description="none: grey levels in [0, 1]; dynamic: each training batch drawn afresh as x ~ Bernoulli(pixel), "
        "validation and test images binarized once with binarize_seed.",
    )
    binarize_seed: int = Field(
        0, description="Seed of the fixed binarization of the test (and validation) images."
    )
    # model
    arch: Architecture = Field("mlp", description="Encoder/decoder family.")
    hidden: tuple[int, ...] = Field((512, 512), description="MLP hidden widths (the decoder mirrors them).")
    channels: tuple[int, ...] = Field((32, 64), description="Conv channels of the two stride-2 stages.")
    latent_dim: int = Field(32, ge=1, description="Dimension of z.")
    activation: Activation = Field("gelu", description="Hidden-layer nonlinearity.")
    likelihood: LikelihoodName = Field(
        "bernoulli", description="p(x|z): Bernoulli logits or a Gaussian mean."
    )
    gaussian_std: float = Field(
        0.1, gt=0, description="Fixed pixel standard deviation of the Gaussian likelihood."
    )
    # objective
    objective: Objective = Field(
        "elbo",
        description="Training objective: the ELBO, the IWAE bound with k = samples, or IWAE with the "
        "doubly-reparameterized encoder gradient (DReG).",
    )
    kl: KLEstimator = Field("analytic", description="KL term: closed form (SGVB B) or Monte Carlo (SGVB A).")
    samples: int = Field(
        1, ge=1, description="Samples of z per example: L of the ELBO, or k of the IWAE objectives."
    )
    beta: float = Field(1.0, description="Weight of the KL term after warm-up.")
    kl_warmup: float = Field(
        0.02, ge=0, lt=1, description="Fraction of training over which the KL weight ramps 0 -> beta."
    )
    # optimisation
    epochs: int = Field(100, ge=1, description="Maximum number of epochs.")
    max_minutes: float = Field(
        0.0, ge=0, description="Training time budget; the lr schedule follows elapsed time (0 = epochs only)."
    )
    batch_size: int = Field(256, ge=1, description="Global batch size (split across ranks).")
    batch_start: int = Field(
        128, ge=0, description="Start at this batch size and double up to batch_size (0 = no ramp)."
    )
    batch_ramp: float = Field(
        0.02, gt=0, le=1, description="Fraction of training over which the batch size ramp runs."
    )
    lr: float = Field(2e-3, gt=0, description="Peak Adam learning rate.")
    lr_min: float = Field(1e-5, description="Learning rate at the end of the cosine decay.")
    lr_warmup: float = Field(0.001, ge=0, lt=1, description="Fraction of training with a linear lr ramp-up.")
    weight_decay: float = Field(0.01, description="AdamW weight decay.")
    grad_clip: float = Field(
        200.0,
        description="Clip the gradient norm to this (well above its usual size): stops KL spikes (0 = off).",
    )
    seed: int = Field(0, description="Seeds the split, the batch order, init and the noise.")
    # run
    device: DeviceName = Field("auto", description="auto picks cuda when available.")
    amp: bool = Field(False, description="bfloat16 autocast on cuda (ignored on cpu).")
    threads: int = Field(0, description="torch intra-op threads (0 = torch's default).")
    out: str = Field("runs/default", description="Run directory for checkpoints and logs.")
    resume: bool = Field(False, description="Continue from OUT/last.pt.")
    progress: bool = Field(True, description="Show a progress bar per epoch.")
    export: str | None = Field(
        None, description="After training, export the best checkpoint to this model directory."
    )
    iwae_k: int = Field(1000, ge=1, description="Importance samples for the exported test NLL.")
    goal_nll: float = Field(
        0.0, ge=0, description="Target test NLL recorded in the manifest with --max-minutes (0 = no goal)."
    )

    @field_validator("hidden")
    @classmethod
    def _hidden_widths(cls, hidden: tuple[int, ...]) -> tuple[int, ...]:
        if not hidden or min(hidden) < 1:
            raise ValueError("hidden needs at least one positive width")
        return hidden

    @field_validator("channels")
    @classmethod
    def _conv_channels(cls, channels: tuple[int, ...]) -> tuple[int, ...]:
        if len(channels) != 2 or min(channels) < 1:
            raise ValueError("channels needs two positive widths")
        return channels

    @model_validator(mode="after")
    def _batch_ramp_start(self) -> TrainConfig:
        if self.batch_start > self.batch_size:
            raise ValueError("batch_start must be in [0, batch_size]")
        return self

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], source: str = "config") -> TrainConfig:
        """Validate a config read back from `source` (a checkpoint, a manifest, the command line).

        Lists stand for tuples (JSON has no tuples). Raises ConfigError, naming `source` and every key that is
        unknown or invalid.
        """
        try:
            return cls.model_validate(values)
        except ValidationError as e:
            raise ConfigError(f"{source}: {_one_line(e)}") from None


def _one_line(error: ValidationError) -> str:
    problems = []
    for e in error.errors(include_url=False):
        key = ".".join(str(part) for part in e["loc"])
        if e["type"] == "extra_forbidden":
            problems.append(f"unknown setting {key!r} (renamed or removed?)")
        elif e["type"] == "value_error":  # the validators above: their messages name their keys
            problems.append(str(e["ctx"]["error"]))
        else:
            problems.append(f"{key}: {e['msg']}")
    return "; ".join(problems)


def _int_tuple(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _parsing(annotation: Any) -> dict[str, Any]:
    """How argparse reads a field of this type: the `add_argument` keywords."""
    if annotation is bool:
        return {"action": argparse.BooleanOptionalAction}
    if get_origin(annotation) is Literal:
        return {"choices": get_args(annotation)}
    if annotation == tuple[int, ...]:
        return {"type": _int_tuple, "metavar": "N,N"}
    if get_origin(annotation) in (types.UnionType, typing.Union):  # X | None: the flag gives an X
        (inner,) = (a for a in get_args(annotation) if a is not type(None))
        return {"type": inner}
    return {"type": annotation}


def _shown(default: Any) -> str:
    return ",".join(map(str, default)) if isinstance(default, tuple) else str(default)


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per `TrainConfig` field, typed from its annotation, with its description as the help.

    Flags not given stay out of the namespace, so the model's own defaults apply."""
    for name, field in TrainConfig.model_fields.items():
        parser.add_argument(
            "--" + name.replace("_", "-"),
            dest=name,
            default=argparse.SUPPRESS,
            help=f"{field.description} (default: {_shown(field.default)})",
            **_parsing(field.annotation),
        )


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The config the flags describe; invalid values raise ConfigError (a ValueError) with the reason."""
    given = {name: value for name, value in vars(args).items() if name in TrainConfig.model_fields}
    return TrainConfig.from_dict(given, source="train")
