"""The service as a Ray Serve deployment: the app of `service.app.create_app`, one per replica, behind Ray's proxy.

Each replica reads the same environment variables as `python -m service` (`service.settings.Settings`),
builds the same app (the same routes, the operations' short path, the same middlewares), and runs its
lifespan: it loads and warms up every model under MODEL_DIR, a path every node can read, and starts its own
batchers. Ray replaces uvicorn's workers; what `service.server` adds around uvicorn (head limits, timeouts,
the SIGTERM drain) is Ray's proxy's job here.

Differences from `python -m service`, each because a replica is not a whole machine:

* INTRA_OP_THREADS left at 0 means the CPUs Ray gave this replica (`ray_actor_options.num_cpus`, at least
  1), not the node's usable CPUs: replicas sharing a node do not oversubscribe it.
* Replica health is the registry's readiness (`check_health`): a replica with a model name and no servable
  version fails Ray's health check, and Ray replaces it.
* Every response says which replica answered in `X-Serve-Replica` (the replica's id).

Options (replicas or autoscaling, queue bounds, CPUs) come from the config file, `deploy/ray/serve.yaml`;
the defaults below are what a plain `serve run service_ray.deployment:app` gets.
"""

from __future__ import annotations

import math
from typing import Self

import ray
from pydantic import model_validator
from ray import serve
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.app import ServiceApp, create_app
from service.settings import Settings

REPLICA_HEADER = "X-Serve-Replica"


def replica_cpus() -> int:
    """Whole CPUs Ray assigned to this replica (a fractional share counts as one)."""
    assigned = float(ray.get_runtime_context().get_assigned_resources().get("CPU", 0.0))  # type: ignore[no-untyped-call]
    return max(1, math.floor(assigned))


class ReplicaSettings(Settings):
    """The settings of `python -m service` (environment and `.env` alike), but INTRA_OP_THREADS=0 means this
    replica's CPUs: it replaces Settings' validator of the same name, which would count the node's."""

    @model_validator(mode="after")
    def _resolve_threads(self) -> Self:
        if self.intra_op_threads == 0:
            self.intra_op_threads = replica_cpus()
        return self


class ReplicaHeader:
    """ASGI middleware: names the replica that answered in every HTTP response's headers."""

    def __init__(self, app: ASGIApp, replica: str) -> None:
        self.app = app
        self.replica = replica

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_named(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message).append(REPLICA_HEADER, self.replica)
            await send(message)

        await self.app(scope, receive, send_named)


@serve.deployment(
    name="vae",
    num_replicas=1,
    ray_actor_options={"num_cpus": 1},
    max_ongoing_requests=64,
    max_queued_requests=256,
    health_check_period_s=5,
    graceful_shutdown_timeout_s=20,
)
@serve.ingress()
class VAEService:
    """One replica: the service's app (built in the replica, from its environment) and its health."""

    def __init__(self) -> None:
        self.settings = ReplicaSettings()
        self.service: ServiceApp = create_app(self.settings)
        self.replica = serve.get_replica_context().replica_tag

    def __serve_build_asgi_app__(self) -> ASGIApp:
        return ReplicaHeader(self.service, self.replica)

    def check_health(self) -> None:
        """Ray calls this every `health_check_period_s`: the replica is healthy while it would answer /readyz
        with 200 (readiness without the drain, which Ray does itself)."""
        registry = self.service.state.registry
        if not registry.ready():
            problems = "; ".join(f"{p.path}: {p.reason}" for p in registry.not_ready()) or "nothing loaded"
            raise RuntimeError(f"not ready: {problems}")


app = VAEService.bind()
"""The application `serve run` / `serve deploy` import: `import_path: service_ray.deployment:app`."""
