"""HTTP routes, kept thin: resolve the model, read and validate the request, call one operation, respond.

Each model operation is served twice: at /v1/models/{model}/OP (the newest loaded version) and at
/v1/models/{model}/versions/{version}/OP. Parameters travel in the JSON body; with an `application/x-npy`
body (the array itself) or no body at all they travel in the query string instead.
"""

from collections.abc import Awaitable, Callable
from dataclasses import asdict
from enum import Enum
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Depends, Path, Request
from fastapi.routing import APIRoute
from pydantic import BaseModel
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from service import operations
from service.encoding import (
    ARRAY_TYPES,
    IMAGE_TYPES,
    JSON,
    NPY,
    PNG,
    encoding_response,
    image_response,
    json_response,
    negotiate,
)
from service.errors import InvalidInput, UnsupportedMedia
from service.metrics import Metrics
from service.operations import F32
from service.registry import Registry, ServedModel
from service.schemas import (
    EXAMPLE_PNG,
    DecodeParams,
    DecodeRequest,
    DecodeResponse,
    EncodeParams,
    EncodeRequest,
    EncodeResponse,
    ErrorResponse,
    ModelInfo,
    ModelList,
    P,
    Readiness,
    ReconstructParams,
    ReconstructRequest,
    ReconstructResponse,
    RequestParams,
    SampleParams,
    SampleRequest,
    SampleResponse,
    check_limit,
    images_from_npy,
    latents_from_npy,
    parse_images,
    parse_json_object,
    parse_latents,
    parse_params,
    read_npy,
)
from service.settings import Settings

MISSING = object()
BINARY = {"schema": {"type": "string", "format": "binary"}}
INT = {"type": "integer"}
ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": text}
    for status, text in {
        400: "Malformed JSON or .npy body.",
        404: "Unknown model or version.",
        406: "No acceptable response type.",
        413: "Body over MAX_BODY_BYTES.",
        415: "Unsupported request Content-Type.",
        422: "A field is invalid: shape, type, range or limit.",
        503: "Queue full (see Retry-After) or shutting down.",
    }.items()
}


def _media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


async def read_request(request: Request, params_model: type[P], array_field: str | None) -> tuple[P, Any]:
    """(validated parameters, the raw array field or the npy array) from a JSON, npy or empty body."""
    body = await request.body()
    media = _media_type(request)
    query = dict(request.query_params) if request.scope["query_string"] else {}
    if media == NPY:
        if array_field is None:
            raise UnsupportedMedia("this endpoint takes a JSON body (or none)", field="body")
        return parse_params(params_model, query, from_query=True), read_npy(body)
    if media not in ("", JSON):
        accepted = "application/json" if array_field is None else "application/json or application/x-npy"
        raise UnsupportedMedia(f"Content-Type {media!r} is not read here; send {accepted}", field="body")
    data = parse_json_object(body)
    if not body.strip():  # no body, not an empty object: `{}` with a query string is still both at once
        params = parse_params(params_model, query, from_query=True)
    elif query:
        raise InvalidInput("with a JSON body, send every parameter in the body", field="query")
    else:
        array = data.pop(array_field, MISSING) if array_field else None
        params = parse_params(params_model, data)
        if array is not MISSING:
            return params, array
    if array_field is not None:
        raise InvalidInput("field required", field=array_field)
    return params, None


def read_images(value: Any, served: ServedModel, settings: Settings) -> F32:
    manifest = served.manifest
    if isinstance(value, np.ndarray):
        return images_from_npy(value, manifest.input_shape, manifest.value_range, settings.max_batch)
    return parse_images(value, manifest.input_shape, manifest.value_range, settings.max_batch)


def request_doc(
    request_model: type[BaseModel],
    params_model: type[RequestParams],
    example: dict[str, Any],
    npy: str | None,
    limits: dict[str, tuple[str, int]],
) -> dict[str, Any]:
    """OpenAPI for a body we parse ourselves: the JSON schema, the npy alternative, and query parameters.

    `limits` maps a field to the configured bound (("maximum" | "maxItems", value)) so /docs shows this
    server's MAX_* settings rather than a placeholder.
    """
    body_schema = request_model.model_json_schema()
    params_schema = params_model.model_json_schema()
    for schema in (body_schema, params_schema):
        for name, (keyword, value) in limits.items():
            if name in schema["properties"]:
                schema["properties"][name][keyword] = value
    content: dict[str, Any] = {JSON: {"schema": body_schema, "example": example}}
    if npy:
        content[NPY] = {**BINARY, "description": npy}
    when = "With an application/x-npy body or no body" if npy else "With no body"
    properties = params_schema.get("properties", {})
    parameters = [
        {
            "name": name,
            "in": "query",
            "required": False,
            "schema": schema,
            "description": f"{when} only (a JSON body carries it as a field). {schema.get('description', '')}",
        }
        for name, schema in properties.items()
    ]
    return {"requestBody": {"required": npy is not None, "content": content}, "parameters": parameters}


def ok(model: type[BaseModel], media: tuple[str, ...], description: str) -> dict[int | str, dict[str, Any]]:
    content: dict[str, Any] = {}
    headers: dict[str, Any] = {}
    if NPY in media:
        content[NPY] = BINARY
        headers["X-Seed"] = {
            "description": "The seed eps was drawn from (binary responses; none from decode or "
            "reconstruct's mode mean, which draw no eps).",
            "schema": INT,
        }
    if PNG in media:
        content[PNG] = BINARY
        headers["X-Grid-Rows"] = {"description": "Rows of the PNG grid.", "schema": INT}
        headers["X-Grid-Cols"] = {
            "description": "Columns of the PNG grid (filled row by row).",
            "schema": INT,
        }
    return {
        200: {"model": model, "description": description, "content": content, "headers": headers},
        **ERRORS,
    }


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
    ).model_dump()


Resolver = Callable[..., ServedModel]
"""The path parameters (model, and version on pinned routes) -> the served model, or NotFound."""
Operation = Callable[[Request, ServedModel], Awaitable[Response]]


class OperationRoute(APIRoute):
    """A model operation's route: documented by FastAPI like any other, served without its per-request machinery.

    FastAPI builds the OpenAPI entry from `endpoint`'s signature and the usual route arguments (the `Depends`
    on `resolve` documents the path parameters). At request time the route calls `resolve(**path_params)`
    and `endpoint(request, served)` itself: the handlers read their bodies themselves and return a Response,
    so FastAPI's dependency solving, its two exit stacks and its second exception wrapper would do nothing
    for them but cost CPU time on every request. Only `service.dispatch` calls this app; it renders the
    exceptions with `errors.render`, as FastAPI's handlers do for every other route.
    """

    def __init__(self, path: str, endpoint: Operation, *, resolve: Resolver, **kwargs: Any) -> None:
        super().__init__(path, endpoint, methods=["POST"], **kwargs)

        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            served = resolve(**scope["path_params"])
            response = await endpoint(Request(scope, receive, send), served)
            await response(scope, receive, send)

        self.app = app


ModelName = Annotated[
    str, Path(description="Model name, a directory under MODEL_DIR.", examples=["fashion-mnist-mlp"])
]
Version = Annotated[str, Path(description="Model version, a directory under MODEL_DIR/NAME.", examples=["1"])]


def add_routes(router: APIRouter, settings: Settings, registry: Registry, metrics: Metrics) -> None:
    """Register every route on `router`, the app's own (an included APIRouter would cost a second dispatch
    per request in FastAPI 0.16x)."""

    # Called by OperationRoute, never by FastAPI: the signatures are there to document the path parameters.
    def newest(model: ModelName) -> ServedModel:
        return registry.resolve(model)

    def pinned(model: ModelName, version: Version) -> ServedModel:
        return registry.resolve(model, version)

    _model_routes(router, "/v1/models/{model}", newest, "", settings, metrics)
    _model_routes(router, "/v1/models/{model}/versions/{version}", pinned, "_version", settings, metrics)

    @router.get(
        "/v1/models",
        tags=["models"],
        summary="The newest version of every model.",
        responses={200: {"model": ModelList}},
    )
    async def list_models() -> Response:
        models = [
            model_info(registry.resolve(name), registry.versions(name)) for name in sorted(registry.models)
        ]
        return json_response({"models": models})

    @router.get(
        "/v1/models/{model}",
        tags=["models"],
        summary="Metadata of a model's newest version.",
        responses={200: {"model": ModelInfo}, 404: ERRORS[404]},
    )
    async def get_model(model: ModelName) -> Response:
        return json_response(model_info(registry.resolve(model), registry.versions(model)))

    @router.get(
        "/v1/models/{model}/versions/{version}",
        tags=["models"],
        summary="Metadata of one model version.",
        responses={200: {"model": ModelInfo}, 404: ERRORS[404]},
    )
    async def get_model_version(model: ModelName, version: Version) -> Response:
        return json_response(model_info(registry.resolve(model, version), registry.versions(model)))

    @router.get("/healthz", tags=["health"], summary="Liveness: 200 while the process is up.")
    async def healthz() -> Response:
        return json_response({"status": "ok"})

    @router.get(
        "/readyz",
        tags=["health"],
        summary="Readiness: 200 when every model under MODEL_DIR is loaded and warmed up, else 503 with reasons.",
        responses={200: {"model": Readiness}, 503: {"model": Readiness}},
    )
    async def readyz() -> Response:
        problems = registry.not_ready()
        loaded = [f"{m.manifest.name}/{m.manifest.version}" for m in registry.served()]
        body = Readiness(ready=not problems, models=loaded, not_ready=[asdict(p) for p in problems])
        response = json_response(body.model_dump())
        response.status_code = 503 if problems else 200
        return response

    @router.get("/metrics", tags=["health"], summary="Prometheus metrics (text format).")
    async def prometheus() -> Response:
        body, content_type = metrics.exposition()
        return Response(body, headers={"Content-Type": content_type})


def _model_routes(
    router: APIRouter,
    prefix: str,
    resolve: Resolver,
    suffix: str,
    settings: Settings,
    metrics: Metrics,
) -> None:
    Served = Annotated[ServedModel, Depends(resolve)]
    tags: list[str | Enum] = ["operations" + (" (pinned version)" if suffix else "")]

    def route(name: str, **doc: Any) -> Callable[[Operation], Operation]:
        def register(endpoint: Operation) -> Operation:
            router.routes.append(
                OperationRoute(
                    f"{prefix}/{name}",
                    endpoint,
                    resolve=resolve,
                    name=name,
                    operation_id=f"{name}{suffix}",
                    tags=tags,
                    **doc,
                )
            )
            return endpoint

        return register

    def drawn(endpoint: str, served: ServedModel, rows: int) -> None:
        if rows:
            metrics.count_samples(endpoint, served.manifest.name, rows)

    @route(
        "encode",
        summary="Posterior of each image: mu, logvar, sigma, and optionally z = mu + sigma * eps.",
        openapi_extra=request_doc(
            EncodeRequest,
            EncodeParams,
            {"inputs": [EXAMPLE_PNG], "samples": 2, "seed": 1234},
            "Images [batch, D] or [batch, *input_shape].",
            {"inputs": ("maxItems", settings.max_batch), "samples": ("maximum", settings.max_samples)},
        ),
        responses=ok(
            EncodeResponse, ARRAY_TYPES, "JSON, or one .npy structured array (fields mu, logvar, sigma, z)."
        ),
    )
    async def encode(request: Request, served: Served) -> Response:
        media = negotiate(request.headers.get("accept"), ARRAY_TYPES)
        params, inputs = await read_request(request, EncodeParams, "inputs")
        x = read_images(inputs, served, settings)
        check_limit(
            x.shape[0] * params.samples, settings.max_samples, "samples", "MAX_SAMPLES", "inputs x samples"
        )
        seed = operations.draw_seed() if params.seed is None else params.seed
        result = await operations.encode(served, x, params.samples, operations.make_rng(seed))
        drawn("encode", served, x.shape[0] * params.samples)
        return encoding_response(media, result, seed)

    @route(
        "sample",
        summary="Generate images: decode z = temperature * eps, eps ~ N(0, I) drawn on the server.",
        openapi_extra=request_doc(
            SampleRequest,
            SampleParams,
            {"n": 4, "seed": 1234, "temperature": 1.0},
            None,
            {"n": ("maximum", settings.max_samples)},
        ),
        responses=ok(SampleResponse, IMAGE_TYPES, "JSON, the images as one .npy array, or a PNG grid."),
    )
    async def sample(request: Request, served: Served) -> Response:
        media = negotiate(request.headers.get("accept"), IMAGE_TYPES)
        params, _ = await read_request(request, SampleParams, None)
        check_limit(params.n, settings.max_samples, "n", "MAX_SAMPLES", "n")
        seed = operations.draw_seed() if params.seed is None else params.seed
        result = await operations.sample(served, params.n, params.temperature, operations.make_rng(seed))
        drawn("sample", served, params.n)
        return image_response(
            media, result.images, params.dtype, "samples", {"z": result.z, "seed": seed}, seed
        )

    @route(
        "reconstruct",
        summary="Encode and decode each image; mode mean decodes mu, mode sample decodes mu + sigma * eps.",
        openapi_extra=request_doc(
            ReconstructRequest,
            ReconstructParams,
            {"inputs": [EXAMPLE_PNG], "mode": "mean", "dtype": "uint8"},
            "Images [batch, D] or [batch, *input_shape].",
            {"inputs": ("maxItems", settings.max_batch)},
        ),
        responses=ok(
            ReconstructResponse, IMAGE_TYPES, "JSON, the reconstructions as one .npy array, or a PNG grid."
        ),
    )
    async def reconstruct(request: Request, served: Served) -> Response:
        media = negotiate(request.headers.get("accept"), IMAGE_TYPES)
        params, inputs = await read_request(request, ReconstructParams, "inputs")
        x = read_images(inputs, served, settings)
        seed: int | None = None
        rng: np.random.Generator | None = None
        if params.mode == "sample":  # mode mean draws no eps: no seed to draw, return or replay
            seed = operations.draw_seed() if params.seed is None else params.seed
            rng = operations.make_rng(seed)
        result = await operations.reconstruct(served, x, params.mode, rng)
        drawn("reconstruct", served, x.shape[0] if params.mode == "sample" else 0)
        extra: dict[str, Any] = {"z": result.z, "error": result.error}
        if seed is not None:
            extra["seed"] = seed
        return image_response(media, result.images, params.dtype, "reconstructions", extra, seed)

    @route(
        "decode",
        summary="Decode latent vectors into images.",
        openapi_extra=request_doc(
            DecodeRequest,
            DecodeParams,
            {"z": [[0.0] * 32]},
            "Latents [batch, latent_dim].",
            {"z": ("maxItems", settings.max_batch)},
        ),
        responses=ok(DecodeResponse, IMAGE_TYPES, "JSON, the images as one .npy array, or a PNG grid."),
    )
    async def decode(request: Request, served: Served) -> Response:
        media = negotiate(request.headers.get("accept"), IMAGE_TYPES)
        params, value = await read_request(request, DecodeParams, "z")
        if isinstance(value, np.ndarray):
            z = latents_from_npy(value, served.latent_dim, settings.max_batch)
        else:
            z = parse_latents(value, served.latent_dim, settings.max_batch)
        images = await operations.decode(served, z)
        return image_response(media, images, params.dtype, "samples", {}, None)
