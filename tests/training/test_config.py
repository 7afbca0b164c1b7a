"""The config model: flags generated from its fields, validation, and configs read back from files."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

from service.manifest import read_manifest
from training.cli import main
from training.config import ConfigError, TrainConfig, add_config_arguments, config_from_args

SHIPPED = Path(__file__).resolve().parents[2] / "models" / "fashion-mnist-mlp" / "1"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(formatter_class=lambda prog: argparse.HelpFormatter(prog, width=10_000))
    add_config_arguments(parser)
    return parser


def _parse(argv: list[str]) -> TrainConfig:
    return config_from_args(_parser().parse_args(argv))


def test_every_config_field_is_a_flag_with_its_default() -> None:
    assert _parse([]) == TrainConfig()
    cfg = _parse(
        ["--hidden", "128,64", "--latent-dim", "8", "--no-progress", "--arch", "conv", "--data-dir", "d"]
    )
    assert (cfg.hidden, cfg.latent_dim, cfg.progress, cfg.arch, cfg.data_dir) == (
        (128, 64),
        8,
        False,
        "conv",
        "d",
    )


def test_flag_help_is_the_field_description() -> None:
    text = _parser().format_help()
    for name, field in TrainConfig.model_fields.items():
        assert field.description, name
        assert field.description in text, name
    assert "Dimension of z. (default: 32)" in text


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--kl-warmup", "1.5"], "kl_warmup: Input should be less than 1"),
        (["--batch-start", "512"], r"batch_start must be in \[0, batch_size\]"),
        (["--lr", "0"], "lr: Input should be greater than 0"),
        (["--hidden", "64,0"], "hidden needs at least one positive width"),
    ],
    ids=["warmup", "batch-ramp", "lr", "hidden"],
)
def test_invalid_values_are_refused_in_one_line(argv: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message) as refused:
        _parse(argv)
    assert "\n" not in str(refused.value)


def test_config_survives_a_round_trip_through_json() -> None:
    cfg = TrainConfig(hidden=(7, 5), channels=(3, 4))
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.model_dump()))) == cfg


def test_configs_are_frozen() -> None:
    with pytest.raises(ValueError, match="frozen"):
        TrainConfig().lr = 1.0  # type: ignore[misc]


def test_the_shipped_manifests_config_validates() -> None:
    stored = read_manifest(SHIPPED).training.config
    cfg = TrainConfig.from_dict(stored, source=str(SHIPPED / "model.json"))
    assert (cfg.hidden, cfg.latent_dim, cfg.max_minutes) == ((512, 512), 32, 10.0)
    dumped = json.loads(json.dumps(cfg.model_dump()))
    assert {key: dumped[key] for key in stored} == stored  # every key kept
    # settings added since it was made default to what that run did: the ELBO on grey levels
    added = {key: dumped[key] for key in dumped.keys() - stored.keys()}
    assert added == {"objective": "elbo", "binarize": "none", "binarize_seed": 0}


def test_an_unknown_or_renamed_key_is_refused_by_name() -> None:
    stored = dict(read_manifest(SHIPPED).training.config)
    stored["latent"] = stored.pop("latent_dim")  # as if the setting had been renamed since
    with pytest.raises(ConfigError) as refused:
        TrainConfig.from_dict(stored, source="model.json")
    assert str(refused.value) == "model.json: unknown setting 'latent' (renamed or removed?)"


def test_a_checkpoint_with_an_unknown_key_is_refused_by_the_cli(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    checkpoint = tmp_path / "best.pt"
    torch.save({"config": TrainConfig().model_dump() | {"dropout": 0.1}, "model": {}}, checkpoint)
    assert main(["evaluate", str(checkpoint), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {checkpoint}: unknown setting 'dropout' (renamed or removed?)\n"
