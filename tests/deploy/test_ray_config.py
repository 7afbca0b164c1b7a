"""deploy/ray/serve.yaml and service_ray without a Ray instance: the config is valid for Ray and carries the
knobs users tune, `./run serve-ray`'s overrides land where Ray reads them, and `service` never imports Ray."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import tomllib
import warnings
from pathlib import Path

import pytest
import yaml
from pydantic.warnings import PydanticDeprecatedSince20

ROOT = Path(__file__).resolve().parents[2]

if importlib.util.find_spec("ray") is None:
    if os.environ.get("CI"):
        raise RuntimeError("ray is not installed: `./run test` installs the `ray` extra into .venv")
    pytest.skip("ray is not installed (the `ray` extra; `./run test` installs it)", allow_module_level=True)

with warnings.catch_warnings():
    warnings.simplefilter("ignore", PydanticDeprecatedSince20)  # Ray's own models
    from ray.serve.deployment import Application
    from ray.serve.schema import ServeDeploySchema

    from service_ray import deployment, launch
    from service_ray.deployment import app as serve_app

pytestmark = pytest.mark.filterwarnings("ignore::pydantic.warnings.PydanticDeprecatedSince20")

KNOBS = {"max_ongoing_requests", "max_queued_requests", "ray_actor_options", "graceful_shutdown_timeout_s"}


def test_the_config_file_is_valid_for_ray_and_has_the_knobs() -> None:
    raw = yaml.safe_load(launch.CONFIG.read_text())
    config = ServeDeploySchema.model_validate(raw)
    (app,) = config.applications
    assert app.import_path == "service_ray.deployment:app" and app.route_prefix == "/"
    (deployment,) = raw["applications"][0]["deployments"]
    assert deployment.keys() >= KNOBS
    assert deployment["num_replicas"] == 2
    assert deployment["ray_actor_options"]["num_cpus"] == int(app.runtime_env["env_vars"]["INTRA_OP_THREADS"])
    # the commented-out autoscaling block is valid too, in place of num_replicas
    autoscaling = {"min_replicas": 1, "max_replicas": 8, "target_ongoing_requests": 16}
    raw["applications"][0]["deployments"][0] = {**deployment, "autoscaling_config": autoscaling}
    del raw["applications"][0]["deployments"][0]["num_replicas"]
    ServeDeploySchema.model_validate(raw)


def test_the_import_path_is_a_serve_application_named_as_in_the_config() -> None:
    assert isinstance(serve_app, Application)
    raw = yaml.safe_load(launch.CONFIG.read_text())
    assert serve_app._bound_deployment.name == raw["applications"][0]["deployments"][0]["name"]


def test_overrides_replace_address_replicas_and_environment() -> None:
    config = launch.load_config(host="127.0.0.1", port=9123, replicas=1, env={"MODEL_DIR": "/srv/models"})
    assert config["http_options"]["host"] == "127.0.0.1" and config["http_options"]["port"] == 9123
    (app,) = config["applications"]
    assert app["deployments"][0]["num_replicas"] == 1
    assert app["runtime_env"]["env_vars"] == {"INTRA_OP_THREADS": "1", "MODEL_DIR": "/srv/models"}


def test_ray_defaults_never_replace_what_is_set() -> None:
    environ = {"RAY_SERVE_ENABLE_HA_PROXY": "0"}
    launch.ray_environment(environ)
    assert environ["RAY_SERVE_ENABLE_HA_PROXY"] == "0"
    assert environ["RAY_USAGE_STATS_ENABLED"] == "0"


@pytest.mark.parametrize(
    ("given", "threads"), [("0", 3), ("2", 2)], ids=["0: the replica's CPUs", "2: as given"]
)
def test_replica_threads_are_the_replicas_cpus_not_the_nodes(
    monkeypatch: pytest.MonkeyPatch, given: str, threads: int
) -> None:
    monkeypatch.setattr(deployment, "replica_cpus", lambda: 3)
    monkeypatch.setenv("INTRA_OP_THREADS", given)
    assert deployment.ReplicaSettings(_env_file=None).intra_op_threads == threads


def test_the_service_never_imports_ray() -> None:
    code = (
        "import sys, service.app, service.__main__, service.server\n"
        "assert not [m for m in sys.modules if m.split('.')[0] == 'ray'], 'ray imported'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_the_ray_image_matches_the_ray_pin_and_gets_the_code_it_copies() -> None:
    dockerfile = (ROOT / "deploy" / "ray" / "Dockerfile").read_text()
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    (pin,) = [r for r in extras["ray"] if r.startswith("ray[serve]==")]
    version = pin.split("==")[1]
    assert f"rayproject/ray:{version}-py311-cpu" in dockerfile  # Ray's base image, the same version
    copied = re.findall(r"^COPY --chown=ray (\S+)", dockerfile, re.MULTILINE)
    ignore = (ROOT / ".dockerignore").read_text().split()
    for path in copied:  # .dockerignore keeps everything out but what it lets back in with "!"
        assert f"!{path}" in ignore, path
    assert "service_ray/" in copied and "models/" in copied
    for name in launch.RAY_DEFAULTS:  # the image turns on what ./run serve-ray does
        assert f"{name}={launch.RAY_DEFAULTS[name]}" in dockerfile, name
