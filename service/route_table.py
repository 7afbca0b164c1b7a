"""The v1 route table: every route's path, handler and OpenAPI documentation, registered by `add_routes`.

The handlers live in `service.routes`; this module says where each is served and what /docs shows for it
(with this server's MAX_* limits filled in). Adding a model operation is one `OperationSpec` in OPERATIONS.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any

from fastapi import APIRouter, FastAPI
from pydantic import BaseModel
from starlette.responses import PlainTextResponse, Response

from service.dispatch import Operation, OperationRoute
from service.media import ARRAY_TYPES, IMAGE_TYPES
from service.openapi import ERRORS, request_doc, responses_doc
from service.playground import add_playground
from service.routes import (
    decode,
    encode,
    get_model,
    get_model_version,
    healthz,
    interpolate,
    list_models,
    prometheus,
    readyz,
    reconstruct,
    reload_models,
    sample,
    score,
    served_model,
)
from service.schemas import (
    EXAMPLE_PNG,
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
from service.settings import Settings

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
