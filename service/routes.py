"""The v1 HTTP routes, kept thin: resolve the model, read the request, call one operation, respond.

Each model operation is served twice: at /v1/models/{model}/OP (the newest loaded version) and at
/v1/models/{model}/versions/{version}/OP. Its handler gets the model version from one dependency,
`served_model`, and reads its own body (`service.requests`): JSON, or an .npy array with the parameters in
the query string, or no body at all. The app's settings, registry and metrics live on `app.state`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from enum import Enum
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Depends, FastAPI, Path, Request
from pydantic import BaseModel
from starlette.responses import PlainTextResponse, Response

from service import operations
from service.catalog import ServedModel
from service.dispatch import Operation, OperationRoute
from service.errors import Forbidden, check_limit
from service.manifest import Anomaly
from service.media import ARRAY_TYPES, IMAGE_TYPES, PNG, negotiate
from service.metrics import Metrics
from service.openapi import ERRORS, request_doc, responses_doc
from service.playground import add_playground
from service.registry import Registry
from service.requests import Images, Latents, read_arrays, read_params
from service.responses import encoding_response, image_response, json_response
from service.schemas import (
    EXAMPLE_PNG,
    AnomalyInfo,
    DecodeParams,
    DecodeRequest,
    DecodeResponse,
    EncodeParams,
    EncodeRequest,
    EncodeResponse,
    ErrorResponse,
    InterpolateParams,
    InterpolateRequest,
    InterpolateResponse,
    ModelInfo,
    ModelList,
    Readiness,
    ReconstructParams,
    ReconstructRequest,
    ReconstructResponse,
    ReloadResponse,
    RequestParams,
    SampleParams,
    SampleRequest,
    SampleResponse,
    ScoreParams,
    ScoreRequest,
    ScoreResponse,
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


def seed_of(requested: int | None) -> int:
    return operations.draw_seed() if requested is None else requested


# ---- model operations ----------------------------------------------------------------------------------


async def encode(request: Request, served: Served) -> Response:
    settings = settings_of(request)
    media = negotiate(request.headers.get("accept"), ARRAY_TYPES)
    params, x = await read_arrays(request, EncodeParams, images_of(served, settings))
    rows = x.shape[0] * params.samples
    check_limit(rows, settings.max_samples, "samples", "MAX_SAMPLES", "inputs x samples")
    seed = seed_of(params.seed)
    result = await operations.encode(served, x, params.samples, operations.make_rng(seed))
    metrics_of(request).count_samples("encode", served.manifest.name, rows)
    return encoding_response(media, result, seed)


async def sample(request: Request, served: Served) -> Response:
    settings = settings_of(request)
    media = negotiate(request.headers.get("accept"), IMAGE_TYPES)
    params = await read_params(request, SampleParams)
    check_limit(params.n, settings.max_samples, "n", "MAX_SAMPLES", "n")
    seed = seed_of(params.seed)
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
        seed = seed_of(params.seed)
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
    seed = seed_of(params.seed)
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


# ---- the route table -----------------------------------------------------------------------------------

PREFIXES = {"": "/v1/models/{model}", "_version": "/v1/models/{model}/versions/{version}"}
"""Operation id suffix -> path prefix: the newest version, and a pinned one."""


@dataclass(frozen=True)
class OperationSpec:
    """One model operation: its handler and what /docs says about it."""

    handler: Operation
    summary: str
    request: type[BaseModel]
    params: type[RequestParams]
    example: dict[str, Any]
    array: str | None  # what an .npy body holds; None: the operation takes no array
    limits: dict[str, tuple[str, str]]  # field -> (JSON schema keyword, the Settings field bounding it)
    response: type[BaseModel]
    media: tuple[str, ...]
    answers: str  # the 200's description

    def openapi(self, path: str, settings: Settings) -> dict[str, Any]:
        """OperationRoute's documentation arguments, with this server's MAX_* limits filled in."""
        limits = {field: (keyword, getattr(settings, name)) for field, (keyword, name) in self.limits.items()}
        return {
            "summary": self.summary,
            "openapi_extra": request_doc(path, self.request, self.params, self.example, self.array, limits),
            "responses": responses_doc(self.response, self.media, self.answers),
        }


IMAGES = "Images [batch, D] or [batch, *input_shape]."
OPERATIONS = {
    "encode": OperationSpec(
        encode,
        "Posterior of each image: mu, logvar, sigma, and optionally z = mu + sigma * eps.",
        EncodeRequest,
        EncodeParams,
        {"inputs": [EXAMPLE_PNG], "samples": 2, "seed": 1234},
        IMAGES,
        {"inputs": ("maxItems", "max_batch"), "samples": ("maximum", "max_samples")},
        EncodeResponse,
        ARRAY_TYPES,
        "JSON, or one .npy structured array (fields mu, logvar, sigma, z).",
    ),
    "sample": OperationSpec(
        sample,
        "Generate images: decode z = temperature * eps, eps ~ N(0, I) drawn on the server.",
        SampleRequest,
        SampleParams,
        {"n": 4, "seed": 1234, "temperature": 1.0},
        None,
        {"n": ("maximum", "max_samples")},
        SampleResponse,
        IMAGE_TYPES,
        "JSON, the images as one .npy array, or a PNG grid.",
    ),
    "reconstruct": OperationSpec(
        reconstruct,
        "Encode and decode each image; mode mean decodes mu, mode sample decodes mu + sigma * eps.",
        ReconstructRequest,
        ReconstructParams,
        {"inputs": [EXAMPLE_PNG], "mode": "mean", "dtype": "uint8"},
        IMAGES,
        {"inputs": ("maxItems", "max_batch")},
        ReconstructResponse,
        IMAGE_TYPES,
        "JSON, the reconstructions as one .npy array, or a PNG grid.",
    ),
    "decode": OperationSpec(
        decode,
        "Decode latent vectors into images.",
        DecodeRequest,
        DecodeParams,
        {"z": [[0.0] * 32]},
        "Latents [batch, latent_dim].",
        {"z": ("maxItems", "max_batch")},
        DecodeResponse,
        IMAGE_TYPES,
        "JSON, the images as one .npy array, or a PNG grid.",
    ),
    "score": OperationSpec(
        score,
        "Likelihood bounds of each image (elbo, iwae with k importance samples, kl, recon_error) and, when the "
        "model has a background model, its anomaly score and flag.",
        ScoreRequest,
        ScoreParams,
        {"inputs": [EXAMPLE_PNG], "k": 100, "seed": 1234},
        IMAGES,
        {"inputs": ("maxItems", "max_batch"), "k": ("maximum", "max_samples")},
        ScoreResponse,
        ARRAY_TYPES,
        "JSON, or one .npy structured array (fields elbo, iwae, kl, recon_error, and anomaly_score, is_anomaly "
        "with a background model; the threshold in X-Anomaly-Threshold).",
    ),
    "interpolate": OperationSpec(
        interpolate,
        "Decode a path between two images (their posterior means) or two latent vectors: steps points, "
        "linear or spherical, the first and last exactly the endpoints.",
        InterpolateRequest,
        InterpolateParams,
        {"inputs": [EXAMPLE_PNG, EXAMPLE_PNG], "steps": 8, "method": "slerp", "dtype": "uint8"},
        "Two images [2, D] or [2, *input_shape], or with latent=true two latents [2, latent_dim].",
        {"steps": ("maximum", "max_batch")},
        InterpolateResponse,
        IMAGE_TYPES,
        "JSON, the images as one .npy array, or a PNG strip (one row, first endpoint on the left).",
    ),
}


def add_routes(app: FastAPI, settings: Settings) -> None:
    """Register every route on the app's own router (an included APIRouter would cost a second dispatch per
    request in FastAPI 0.16x). The operations' documentation shows this server's MAX_* limits."""
    router: APIRouter = app.router
    for suffix, prefix in PREFIXES.items():
        tags: list[str | Enum] = ["operations" + (" (pinned version)" if suffix else "")]
        for name, spec in OPERATIONS.items():
            path = f"{prefix}/{name}"
            router.routes.append(
                OperationRoute(
                    path,
                    spec.handler,
                    resolve=served_model,
                    name=name,
                    operation_id=f"{name}{suffix}",
                    tags=tags,
                    **spec.openapi(path, settings),
                )
            )
    for path, endpoint, tag, summary, responses in INFO_ROUTES:
        router.add_api_route(path, endpoint, tags=[tag], summary=summary, responses=responses)
    router.add_api_route(  # the one text route: documented as text/plain, not FastAPI's default JSON
        "/metrics",
        prometheus,
        tags=["health"],
        summary="Prometheus metrics (text exposition format).",
        response_class=PlainTextResponse,
    )
    for path, endpoint, tag, summary, responses in ADMIN_ROUTES:
        router.add_api_route(
            path, endpoint, methods=["POST"], tags=[tag], summary=summary, responses=responses
        )
    add_playground(app)


INFO_ROUTES: list[tuple[str, Callable[..., Awaitable[Response]], str, str, dict[int | str, Any]]] = [
    (
        "/v1/models",
        list_models,
        "models",
        "The newest version of every model, and the versions refused with their reasons.",
        {200: {"model": ModelList}},
    ),
    (
        "/v1/models/{model}",
        get_model,
        "models",
        "Metadata of a model's newest version.",
        {200: {"model": ModelInfo}, 404: ERRORS[404]},
    ),
    (
        "/v1/models/{model}/versions/{version}",
        get_model_version,
        "models",
        "Metadata of one model version.",
        {200: {"model": ModelInfo}, 404: ERRORS[404]},
    ),
    ("/healthz", healthz, "health", "Liveness: 200 while the process is up.", {}),
    (
        "/readyz",
        readyz,
        "health",
        "Readiness: 200 when every model name has a loaded, warmed-up version (READY_REQUIRES_ALL: every "
        "version), else 503; refused versions listed either way.",
        {200: {"model": Readiness}, 503: {"model": Readiness}},
    ),
]
"""(path, handler, tag, summary, responses) of the GET routes FastAPI serves itself."""

ADMIN_ROUTES: list[tuple[str, Callable[..., Awaitable[Response]], str, str, dict[int | str, Any]]] = [
    (
        "/admin/reload",
        reload_models,
        "admin",
        "Rescan MODEL_DIR: load new and changed versions, stop serving removed ones, refuse broken ones "
        "(which never replace a serving version). Needs API_KEYS and a key.",
        {
            200: {"model": ReloadResponse, "description": "What the reload changed, and what stays refused."},
            401: {"model": ErrorResponse, "description": "No valid API key."},
            403: {"model": ErrorResponse, "description": "API_KEYS is not set: reloading over HTTP is off."},
        },
    ),
]
"""(path, handler, tag, summary, responses) of the POST routes that change the server's state."""
