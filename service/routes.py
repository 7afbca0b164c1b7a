"""The v1 HTTP routes, kept thin: resolve the model, read the request, call one operation, respond.

Each model operation is served twice: at /v1/models/{model}/OP (the newest loaded version) and at
/v1/models/{model}/versions/{version}/OP. Its handler gets the model version from one dependency,
`served_model`, and reads its own body (`service.requests`): JSON, or an .npy array with the parameters in
the query string, or no body at all. The app's settings, registry and metrics live on `app.state`. Where
each handler is served, and what /docs says about it, is `service.route_table`.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Annotated, Any

import numpy as np
from fastapi import Depends, Path, Request
from starlette.responses import Response

from service import operations
from service.catalog import ServedModel
from service.errors import Forbidden, check_limit
from service.manifest import Anomaly
from service.media import ARRAY_TYPES, IMAGE_TYPES, PNG, negotiate
from service.metrics import Metrics
from service.registry import Registry
from service.requests import Images, Latents, read_arrays, read_params
from service.responses import encoding_response, image_response, json_response
from service.schemas import (
    AnomalyInfo,
    DecodeParams,
    EncodeParams,
    ModelInfo,
    Readiness,
    ReconstructParams,
    ReloadResponse,
    SampleParams,
    ScoreParams,
)
from service.scoring_http import read_endpoints, score_response, strip_response
from service.settings import Settings

# ---- what a handler can reach ------------------------------------------------------------------------


def settings_of(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def registry_of(request: Request) -> Registry:
    registry: Registry = request.app.state.registry
    return registry


def metrics_of(request: Request) -> Metrics:
    metrics: Metrics = request.app.state.metrics
    return metrics


def served_model(request: Request) -> ServedModel:
    """The model version the path names: `{version}` when it has one, else the newest; NotFound otherwise."""
    params = request.path_params
    return registry_of(request).resolve(params["model"], params.get("version"))


Served = Annotated[ServedModel, Depends(served_model)]
RegistryDep = Annotated[Registry, Depends(registry_of)]
ModelName = Annotated[
    str, Path(description="Model name, a directory under MODEL_DIR.", examples=["fashion-mnist-mlp"])
]
Version = Annotated[str, Path(description="Model version, a directory under MODEL_DIR/NAME.", examples=["1"])]


def images_of(served: ServedModel, settings: Settings) -> Images:
    manifest = served.manifest
    return Images(manifest.input_shape, manifest.value_range, settings.max_batch, settings.max_png_bytes)


# ---- model operations ----------------------------------------------------------------------------------


async def encode(request: Request, served: Served) -> Response:
    settings = settings_of(request)
    media = negotiate(request.headers.get("accept"), ARRAY_TYPES)
    params, x = await read_arrays(request, EncodeParams, images_of(served, settings))
    rows = x.shape[0] * params.samples
    check_limit(rows, settings.max_samples, "samples", "MAX_SAMPLES", "inputs x samples")
    seed = operations.seed_or_draw(params.seed)
    result = await operations.encode(served, x, params.samples, operations.make_rng(seed))
    metrics_of(request).count_samples("encode", served.manifest.name, rows)
    return encoding_response(media, result, seed)


async def sample(request: Request, served: Served) -> Response:
    settings = settings_of(request)
    media = negotiate(request.headers.get("accept"), IMAGE_TYPES)
    params = await read_params(request, SampleParams)
    check_limit(params.n, settings.max_samples, "n", "MAX_SAMPLES", "n")
    seed = operations.seed_or_draw(params.seed)
    result = await operations.sample(served, params.n, params.temperature, operations.make_rng(seed))
    metrics_of(request).count_samples("sample", served.manifest.name, params.n)
    extra = {"z": result.z, "seed": seed}
    return image_response(media, result.images, params.dtype, "samples", extra, seed)


async def reconstruct(request: Request, served: Served) -> Response:
    media = negotiate(request.headers.get("accept"), IMAGE_TYPES)
    params, x = await read_arrays(request, ReconstructParams, images_of(served, settings_of(request)))
    seed: int | None = None
    rng: np.random.Generator | None = None
    if params.mode == "sample":  # mode mean draws no eps: no seed to draw, return or replay
        seed = operations.seed_or_draw(params.seed)
        rng = operations.make_rng(seed)
        metrics_of(request).count_samples("reconstruct", served.manifest.name, x.shape[0])
    result = await operations.reconstruct(served, x, params.mode, rng)
    extra: dict[str, Any] = {"z": result.z, "error": result.error}
    if seed is not None:
        extra["seed"] = seed
    return image_response(media, result.images, params.dtype, "reconstructions", extra, seed)


async def decode(request: Request, served: Served) -> Response:
    media = negotiate(request.headers.get("accept"), IMAGE_TYPES)
    spec = Latents(served.latent_dim, settings_of(request).max_batch)
    params, z = await read_arrays(request, DecodeParams, spec)
    images = await operations.decode(served, z)
    return image_response(media, images, params.dtype, "samples", {}, None)


async def score(request: Request, served: Served) -> Response:
    settings = settings_of(request)
    media = negotiate(request.headers.get("accept"), ARRAY_TYPES)
    params, x = await read_arrays(request, ScoreParams, images_of(served, settings))
    rows = x.shape[0] * params.k
    check_limit(rows, settings.max_samples, "k", "MAX_SAMPLES", "inputs x k")
    seed = operations.seed_or_draw(params.seed)
    likelihood, std = operations.likelihood_of(served.manifest)
    background = served.background if served.manifest.anomaly is not None else None
    rng = operations.make_rng(seed)
    result = await operations.score(served, x, params.k, rng, likelihood, std, background)
    metrics_of(request).count_samples("score", served.manifest.name, rows)
    anomaly = served.manifest.anomaly
    return score_response(media, result, None if anomaly is None else anomaly.threshold, params.k, seed)


async def interpolate(request: Request, served: Served) -> Response:
    settings = settings_of(request)
    media = negotiate(request.headers.get("accept"), IMAGE_TYPES)
    images = images_of(served, settings)
    params, ends, latent = await read_endpoints(request, images, Latents(served.latent_dim, 2))
    check_limit(params.steps, settings.max_batch, "steps", "MAX_BATCH", "steps")
    result = await operations.interpolate(served, ends, params.steps, params.method, latent=latent)
    if media == PNG:
        return strip_response(result.images)
    return image_response(media, result.images, params.dtype, "images", {"z": result.z, "t": result.t}, None)


# ---- metadata, health, metrics -------------------------------------------------------------------------


def model_info(served: ServedModel, versions: list[str]) -> dict[str, Any]:
    manifest = served.manifest
    return ModelInfo(
        name=manifest.name,
        version=manifest.version,
        versions=versions,
        input_shape=list(manifest.input_shape),
        value_range=manifest.value_range,
        latent_dim=manifest.latent_dim,
        likelihood=manifest.likelihood,
        architecture=manifest.architecture,
        dataset=manifest.dataset,
        created=manifest.created.isoformat(),
        metrics=manifest.metrics.model_dump(),
        providers=served.providers,
        graph_providers=served.graph_providers,
        anomaly=None if manifest.anomaly is None else anomaly_info(manifest.anomaly),
        unit_variance=manifest.unit_variance,
    ).model_dump()


def anomaly_info(anomaly: Anomaly) -> AnomalyInfo:
    return AnomalyInfo(
        threshold=anomaly.threshold,
        false_positive_rate=anomaly.false_positive_rate,
        k=anomaly.k,
        test_images=anomaly.test_images,
        auroc={name: figures.model_dump() for name, figures in anomaly.auroc.items()},
    )


async def list_models(registry: RegistryDep) -> Response:
    catalog = registry.catalog  # one set of versions for the whole answer, whatever a reload does
    models = [
        model_info(catalog.resolve(name), list(catalog.versions[name])) for name in sorted(catalog.models)
    ]
    return json_response({"models": models, "refused": [asdict(failure) for failure in catalog.failures]})


async def get_model(model: ModelName, registry: RegistryDep) -> Response:
    catalog = registry.catalog
    return json_response(model_info(catalog.resolve(model), list(catalog.versions[model])))


async def get_model_version(model: ModelName, version: Version, registry: RegistryDep) -> Response:
    catalog = registry.catalog
    return json_response(model_info(catalog.resolve(model, version), list(catalog.versions[model])))


async def healthz() -> Response:
    return json_response({"status": "ok"})


async def readyz(request: Request, registry: RegistryDep) -> Response:
    """503 while draining (after SIGTERM: `app.state.draining`) or while a model name has no servable version
    (READY_REQUIRES_ALL: while any version is refused); refused versions are listed either way."""
    problems = registry.not_ready()
    draining: bool = request.app.state.draining
    loaded = [f"{m.manifest.name}/{m.manifest.version}" for m in registry.served()]
    ready = registry.ready() and not draining
    body = Readiness(ready=ready, draining=draining, models=loaded, not_ready=[asdict(p) for p in problems])
    response = json_response(body.model_dump())
    response.status_code = 200 if ready else 503
    return response


async def prometheus(request: Request) -> Response:
    body, content_type = metrics_of(request).exposition()
    return Response(body, headers={"Content-Type": content_type})


# ---- administration ------------------------------------------------------------------------------------


async def reload_models(request: Request, registry: RegistryDep) -> Response:
    """Rescan MODEL_DIR and swap in what changed. With API_KEYS set, the access middleware has already
    refused callers without a valid key; without API_KEYS nobody may call it."""
    if not settings_of(request).api_keys.get_secret_value().strip():
        raise Forbidden(
            "POST /admin/reload needs an API key, and none is configured: set API_KEYS and call it with "
            "Authorization: Bearer KEY (or send the server SIGHUP)"
        )
    report = await registry.reload()
    body = ReloadResponse(
        loaded=list(report.loaded),
        removed=list(report.removed),
        refused=[asdict(failure) for failure in report.refused],
    )
    return json_response(body.model_dump())
