"""`python -m service_ray` (`./run serve-ray`): the service on Ray Serve, on a local Ray instance, from a config file.

    python -m service_ray                           # deploy/ray/serve.yaml (2 replicas) on http://HOST:PORT
    python -m service_ray --replicas 1              # the same with one replica
    MODEL_DIR=/srv/models PORT=9000 python -m service_ray

It validates the settings as `python -m service` does (the same environment variables, which every replica
reads), starts a local Ray instance with the usable CPUs of this machine on the loopback address, deploys
the config file through Ray's own `serve run` (with HOST and PORT as its http_options, and --replicas as
num_replicas), waits until every replica is up, and serves until SIGTERM or SIGINT, which stop the
replicas gracefully. On a cluster, use `ray start` and `serve deploy` instead (deploy/README.md#ray-serve).

Ray's own switches are environment variables too; unless set, this module sets RAY_DEFAULTS below: the
HAProxy ingress and Ray's throughput-optimized mode, which Ray documents for high-throughput serving
(measured: bench/README.md#ray-serve).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import FrameType
from typing import Any

import yaml
from pydantic import ValidationError

from service.settings import Settings, usable_cpus

log = logging.getLogger("service_ray")

CONFIG = Path(__file__).resolve().parents[1] / "deploy" / "ray" / "serve.yaml"
RAY_DEFAULTS = {
    "RAY_USAGE_STATS_ENABLED": "0",  # no usage report to Ray's servers
    "RAY_SERVE_ENABLE_HA_PROXY": "1",  # HAProxy in front of the replicas' own HTTP servers
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",  # user code on the replica's event loop, logs to files only
    # A stopping replica stays reachable this long (Ray's default: 30 s) while HAProxy stops sending it
    # requests, then finishes those in flight: DRAIN_SECONDS of python -m service.
    "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "5",
}
"""Read by every Ray process at start: set before Ray starts (here, or on each `ray start`)."""


def ray_environment(environ: dict[str, str] | None = None) -> None:
    """RAY_DEFAULTS into the environment (os.environ by default), where not set already."""
    target = os.environ if environ is None else environ
    for name, value in RAY_DEFAULTS.items():
        target.setdefault(name, value)


def load_config(
    path: Path = CONFIG,
    *,
    host: str | None = None,
    port: int | None = None,
    replicas: int | None = None,
    env: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The config file with HTTP address, replica count and environment variables replaced, validated by Ray's
    schema. `replicas` replaces autoscaling too; `env` joins (and wins over) each application's env_vars."""
    from ray.serve.schema import ServeDeploySchema

    config: dict[str, Any] = yaml.safe_load(path.read_text())
    http = config.setdefault("http_options", {})
    if host is not None:
        http["host"] = host
    if port is not None:
        http["port"] = port
    for app in config["applications"]:
        if env:
            env_vars = app.setdefault("runtime_env", {}).setdefault("env_vars", {})
            env_vars.update(env)
        if replicas is not None:
            for deployment in app.get("deployments", []):
                deployment.pop("autoscaling_config", None)
                deployment["num_replicas"] = replicas
    ServeDeploySchema.model_validate(config)
    return config


def deploy(config: Mapping[str, Any], *, timeout_s: float = 180.0) -> None:
    """Deploy `config` onto the Ray instance this process is connected to, with Ray's `serve run` (which starts
    Serve's controller and ingress with the config's http_options), and wait until every application runs."""
    from ray.serve.scripts import cli

    with tempfile.NamedTemporaryFile("w", suffix=".yaml", prefix="serve-") as file:
        yaml.safe_dump(dict(config), file, sort_keys=False)
        file.flush()
        cli.main(["run", "--non-blocking", file.name], standalone_mode=False)
    wait_running([app["name"] for app in config["applications"]], timeout_s=timeout_s)


def wait_running(names: Iterable[str], *, timeout_s: float) -> None:
    """Until `serve.status()` says RUNNING for every named application; a failed deployment raises at once."""
    from ray import serve
    from ray.serve.schema import ApplicationStatus

    names = list(names)
    deadline = time.monotonic() + timeout_s
    while True:
        applications = serve.status().applications
        failed = {
            name: applications[name].message
            for name in names
            if name in applications and applications[name].status == ApplicationStatus.DEPLOY_FAILED
        }
        if failed:
            raise RuntimeError(f"deployment failed: {failed}")
        if all(
            name in applications and applications[name].status == ApplicationStatus.RUNNING for name in names
        ):
            return
        if time.monotonic() > deadline:
            states = {name: applications[name].status if name in applications else "absent" for name in names}
            raise TimeoutError(f"not running after {timeout_s:.0f} s: {states}")
        time.sleep(0.5)


def start_local_ray(num_cpus: int) -> None:
    """A Ray instance on this machine alone: its processes talk over the loopback address, no dashboard."""
    import ray

    ray.init(
        num_cpus=num_cpus,
        include_dashboard=False,
        namespace="serve",
        _node_ip_address="127.0.0.1",
        configure_logging=False,
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m service_ray", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--config", type=Path, default=CONFIG, help="Ray Serve config file (default: %(default)s)"
    )
    parser.add_argument("--replicas", type=int, help="replicas (replaces num_replicas and autoscaling)")
    parser.add_argument(
        "--num-cpus", type=int, default=None, help="CPUs of the local Ray instance (default: usable CPUs)"
    )
    return parser.parse_args(argv)


def _stop_on_signals() -> threading.Event:
    stop = threading.Event()

    def handle(signum: int, frame: FrameType | None) -> None:
        log.info("signal %d: stopping the replicas", signum)
        stop.set()

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)
    return stop


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        settings = Settings()
    except ValidationError as exc:
        sys.exit(f"invalid settings:\n{exc}")
    if settings.port == 0:
        sys.exit("PORT=0 (any free port) is not supported on Ray: Ray's ingress needs a fixed port")
    # Replicas start in Ray's worker directories: a relative MODEL_DIR means this directory's.
    os.environ["MODEL_DIR"] = str(settings.model_dir.resolve())
    config = load_config(args.config, host=settings.host, port=settings.port, replicas=args.replicas)
    ray_environment()
    start_local_ray(args.num_cpus or usable_cpus())
    stop = _stop_on_signals()  # after ray.init, which installs handlers of its own

    import ray
    from ray import serve

    try:
        deploy(config)
        log.info(
            "serving %s on http://%s:%d (Ctrl-C stops)", os.environ["MODEL_DIR"], settings.host, settings.port
        )
        stop.wait()
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0
