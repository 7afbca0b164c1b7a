"""The Open Inference Protocol ("V2", as KServe, Triton and MLServer speak it): a second front door to the
same operations, registry, batchers, limits and metrics as v1.

Model map: every operation of every loaded model NAME is one V2 model, `NAME.OPERATION`, so a V2 client finds
each from the metadata alone. I = the manifest's input_shape ([1, 28, 28]), L = its latent_dim, -1 a batch
(or encode's samples) axis:

    V2 model          inputs           outputs                                           parameters
    NAME.encode       images [-1, *I]  mu, logvar, sigma [-1, L]; z [-1, -1, L]          samples, seed
    NAME.sample       (none)           samples [-1, *I]; z [-1, L]                       n, temperature,
                                                                                         seed, dtype
    NAME.reconstruct  images [-1, *I]  reconstructions [-1, *I]; z [-1, L]; error [-1]  mode, seed, dtype
    NAME.decode       z [-1, L]        samples [-1, *I]                                  dtype
    NAME.score        images [-1, *I]  elbo, iwae, kl, recon_error, anomaly_score,       k, seed
                                       anomaly_threshold [-1]; is_anomaly [-1] (BOOL)
    NAME.interpolate  z [2, L]         images [-1, *I]; z [-1, L]; t [-1]                steps, method,
                                                                                         dtype

images are FP32 in [0, 1] or UINT8 pixels 0-255 (divided by 255, as v1 reads uint8 .npy); z is FP32; every
output is FP32, the image outputs UINT8 (0-255) with `dtype: "uint8"`. Output names are v1's JSON fields.

The parameters are v1's, validated by the same models (`service.schemas`), sent as the request's
`parameters`. When eps is drawn, the seed used comes back in the response's `parameters.seed`. The handlers
call the same `service.operations` functions as v1's, which draw eps per request before batching: the same
seed gives the same eps (and z = temperature * eps) as v1, bit for bit, whatever the batching. encode with
samples 0 returns z as [batch, 0, L].

Routes (Triton's and KServe's paths): GET /v2 (server metadata), /v2/health/live, /v2/health/ready (the
status of v1's /readyz), GET /v2/models/{NAME.OP}[/versions/{v}] (metadata), .../ready, and POST .../infer.
Each operation's infer route is an `OperationRoute` (`service.dispatch`): the same short path as v1's
operations. A body is JSON, or JSON followed by binary tensor data (`service.v2_binary`); large JSON bodies
are read in the parse pool, as in v1. To add an operation, add one `V2Operation` to OPERATIONS.

Errors: on every /v2 path, whatever answers (these handlers, the body limit's 413, API keys' 401, routing's
404 and 405, the queue's 503 with Retry-After), the body is the protocol's `{"error": "message"}`
(`V2ErrorShape`, outermost of the app's middlewares). Client mistakes are 400, unknown models and versions
404.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Path, Request
from starlette.responses import Response

from service.catalog import Catalog, ServedModel
from service.dispatch import Operation, OperationRoute, Resolve
from service.errors import BadRequest, InvalidInput, NotFound
from service.media import JSON
from service.parse_pool import ParsePool
from service.responses import json_response
from service.routes import readyz, registry_of
from service.settings import Settings
from service.v2_binary import HEADER_LENGTH, read_request, write_response
from service.v2_errors import V2ErrorShape
from service.v2_openapi import (
    ERRORS,
    V2Live,
    V2ModelMetadata,
    V2ModelReady,
    V2Ready,
    V2ServerMetadata,
    infer_doc,
)
from service.v2_operations import (
    EXTENSIONS,
    OCTET,
    OPERATIONS,
    PLATFORM,
    SERVER_NAME,
    Call,
    Tensor,
    V2Operation,
)

# ---- finding the model a path names -------------------------------------------------------------------


def find_model(catalog: Catalog, model: str, version: str | None) -> tuple[ServedModel, V2Operation[Any]]:
    """NAME.OPERATION (and a version, or the newest) -> the model version and the operation; else NotFound."""
    name, _, operation_name = model.rpartition(".")
    operation = OPERATIONS.get(operation_name)
    if operation is None or name not in catalog.models:
        raise NotFound(
            f"unknown model {model!r}; the V2 models are NAME.OPERATION with NAME one of "
            f"{sorted(catalog.models)} and OPERATION one of {list(OPERATIONS)}"
        )
    if version is not None and version not in catalog.models[name]:
        raise NotFound(
            f"model {model!r} has no version {version!r}; versions: {list(catalog.versions[name])}"
        )
    return catalog.resolve(name, version), operation


def _resolver(operation: str) -> Resolve:
    """The fast path's resolve for one operation's infer routes (`{model}` is NAME there)."""

    def resolve(request: Request) -> ServedModel:
        params = request.path_params
        served, _ = find_model(
            registry_of(request).catalog, f"{params['model']}.{operation}", params.get("version")
        )
        return served

    return resolve


def _route_model(request: Request) -> ServedModel:
    """An infer handler's model, as FastAPI's signature analysis (and /docs) sees it: the matched route's
    resolve. On the fast path, OperationRoute calls the route's own resolve (`_resolver`) instead."""
    return _resolver(request.scope["route"].name)(request)


V2Served = Annotated[ServedModel, Depends(_route_model)]
ModelName = Annotated[
    str, Path(description="Model name, a directory under MODEL_DIR.", examples=["fashion-mnist-mlp"])
]
OperationName = Annotated[
    str, Path(description="Operation: " + ", ".join(OPERATIONS) + ".", examples=["encode"])
]
Version = Annotated[str, Path(description="Model version, a directory under MODEL_DIR/NAME.", examples=["1"])]


# ---- inference -------------------------------------------------------------------------------------------


def _json_length(body: bytes, header_length: str | None) -> int:
    """The length of a body's JSON part (what parsing costs), for the parse pool's choice."""
    if header_length is not None and header_length.strip().isdecimal():
        return min(int(header_length.strip()[:19]), len(body))
    return len(body)


def infer_handler(operation: V2Operation[Any]) -> Operation:
    """POST .../NAME.OPERATION/infer: read and check the body, run the operation, answer its outputs."""

    async def infer(request: Request, served: V2Served) -> Response:
        state = request.app.state
        settings: Settings = state.settings
        model = f"{served.manifest.name}.{operation.name}"
        signature = operation.signature(model, served.manifest, settings.max_batch)
        body = await request.body()
        header_length = request.headers.get(HEADER_LENGTH)
        pool: ParsePool = state.parse_pool
        if pool.offloads(_json_length(body, header_length)):
            decoded = await pool.run(read_request, body, header_length, signature)
        else:
            decoded = read_request(body, header_length, signature)
        call = Call(served, decoded.params, decoded.tensors, settings, state.metrics, operation.name)
        try:
            result = await operation.run(call)
        except InvalidInput as exc:  # a limit on a parameter (MAX_SAMPLES)
            raise BadRequest(f"parameter {exc.field!r}: {exc.message}") from None
        header: dict[str, Any] = {"model_name": model, "model_version": served.manifest.version}
        if decoded.id is not None:
            header["id"] = decoded.id
        if result.seed is not None:
            header["parameters"] = {"seed": result.seed}
        outputs = [(name, result.outputs[name], binary) for name, binary in decoded.outputs]
        content, json_length = write_response(header, outputs)
        if json_length is None:
            return Response(content, media_type=JSON)
        return Response(
            content, media_type=OCTET, headers={"Inference-Header-Content-Length": str(json_length)}
        )

    return infer


async def infer_unknown(request: Request) -> Response:
    """POST .../infer for a name no operation route matched: NotFound with what exists."""
    params = request.path_params
    served, operation = find_model(registry_of(request).catalog, params["model"], params.get("version"))
    return await infer_handler(operation)(request, served)  # not reached: every NAME.OP has its route


# ---- metadata and health ---------------------------------------------------------------------------------


async def server_metadata(request: Request) -> Response:
    return json_response(
        {"name": SERVER_NAME, "version": request.app.version, "extensions": list(EXTENSIONS)}
    )


async def server_live() -> Response:
    return json_response({"live": True})


async def server_ready(request: Request) -> Response:
    """Ready exactly when v1's /readyz is (its status: 200 or 503)."""
    status = (await readyz(request, registry_of(request))).status_code
    response = json_response({"ready": status == 200})
    response.status_code = status
    return response


def _metadata(request: Request, model: str, version: str | None) -> Response:
    catalog = registry_of(request).catalog
    served, operation = find_model(catalog, model, version)
    manifest = served.manifest

    def tensors(group: tuple[Tensor, ...]) -> list[dict[str, Any]]:
        return [{"name": t.name, "datatype": t.datatypes[0], "shape": t.shape(manifest)} for t in group]

    return json_response(
        {
            "name": model,
            "versions": list(catalog.versions[manifest.name]),
            "platform": PLATFORM,
            "inputs": tensors(operation.inputs),
            "outputs": tensors(operation.outputs),
        }
    )


def _ready(request: Request, model: str, version: str | None) -> Response:
    find_model(registry_of(request).catalog, model, version)  # served means loaded and warmed up
    return json_response({"name": model, "ready": True})


async def model_metadata(request: Request, model: ModelName, operation: OperationName) -> Response:
    return _metadata(request, f"{model}.{operation}", None)


async def model_metadata_version(
    request: Request, model: ModelName, operation: OperationName, version: Version
) -> Response:
    return _metadata(request, f"{model}.{operation}", version)


async def model_ready(request: Request, model: ModelName, operation: OperationName) -> Response:
    return _ready(request, f"{model}.{operation}", None)


async def model_ready_version(
    request: Request, model: ModelName, operation: OperationName, version: Version
) -> Response:
    return _ready(request, f"{model}.{operation}", version)


async def metadata_unknown(request: Request) -> Response:
    return _metadata(request, request.path_params["model"], request.path_params.get("version"))


async def ready_unknown(request: Request) -> Response:
    return _ready(request, request.path_params["model"], request.path_params.get("version"))


# ---- the route table -----------------------------------------------------------------------------------

TAGS: list[Any] = ["V2 (Open Inference Protocol)"]
PREFIXES = {
    "": "/v2/models/{model}.{operation}",
    "_version": "/v2/models/{model}.{operation}/versions/{version}",
}
"""Operation id suffix -> model path; {operation} stands for one operation name on the infer routes."""

GET_ROUTES: list[tuple[str, Callable[..., Awaitable[Response]], str, str, dict[int | str, Any]]] = [
    ("/v2", server_metadata, "server_metadata", "Server metadata.", {200: {"model": V2ServerMetadata}}),
    (
        "/v2/health/live",
        server_live,
        "server_live",
        "Liveness: 200 while the process is up.",
        {200: {"model": V2Live}},
    ),
    (
        "/v2/health/ready",
        server_ready,
        "server_ready",
        "Readiness: 200 exactly when /readyz is, else 503.",
        {200: {"model": V2Ready}, 503: {"model": V2Ready}},
    ),
    (
        PREFIXES[""],
        model_metadata,
        "model_metadata",
        "Metadata of NAME.OPERATION (its newest version): inputs, outputs, versions.",
        {200: {"model": V2ModelMetadata}, 404: ERRORS[404]},
    ),
    (
        PREFIXES["_version"],
        model_metadata_version,
        "model_metadata",
        "Metadata of NAME.OPERATION at one version.",
        {200: {"model": V2ModelMetadata}, 404: ERRORS[404]},
    ),
    (
        PREFIXES[""] + "/ready",
        model_ready,
        "model_ready",
        "Whether NAME.OPERATION is ready (loaded and warmed up).",
        {200: {"model": V2ModelReady}, 404: ERRORS[404]},
    ),
    (
        PREFIXES["_version"] + "/ready",
        model_ready_version,
        "model_ready",
        "Whether NAME.OPERATION at one version is ready.",
        {200: {"model": V2ModelReady}, 404: ERRORS[404]},
    ),
]
"""(path, handler, name, summary, responses) of the documented GET routes."""

FALLBACKS: list[tuple[str, Callable[..., Awaitable[Response]], str, str]] = [
    ("/v2/", server_metadata, "GET", "server_metadata"),  # the specification's spelling of the path
    ("/v2/models/{model}", metadata_unknown, "GET", "unknown_model"),
    ("/v2/models/{model}/versions/{version}", metadata_unknown, "GET", "unknown_model"),
    ("/v2/models/{model}/ready", ready_unknown, "GET", "unknown_model"),
    ("/v2/models/{model}/versions/{version}/ready", ready_unknown, "GET", "unknown_model"),
    ("/v2/models/{model}/infer", infer_unknown, "POST", "unknown_model"),
    ("/v2/models/{model}/versions/{version}/infer", infer_unknown, "POST", "unknown_model"),
]
"""(path, handler, method, name) of undocumented routes, after the others: /v2/, and names that are not
NAME.OPERATION, which get a 404 saying what exists."""


def add_v2_routes(app: FastAPI, settings: Settings) -> None:
    """Register the V2 routes on the app's router (after v1's, so v1 requests never scan them) and the V2
    error shape as the outermost middleware."""
    router: APIRouter = app.router
    for suffix, prefix in PREFIXES.items():
        for operation in OPERATIONS.values():
            path = prefix.replace("{operation}", operation.name) + "/infer"
            router.routes.append(
                OperationRoute(
                    path,
                    infer_handler(operation),
                    resolve=_resolver(operation.name),
                    name=operation.name,
                    operation_id=f"v2_{operation.name}_infer{suffix}",
                    tags=TAGS,
                    **infer_doc(operation, path, settings),
                )
            )
    for path, endpoint, name, summary, responses in GET_ROUTES:
        router.add_api_route(
            path,
            endpoint,
            name=name,
            operation_id=f"v2_{name}{'_version' if '{version}' in path else ''}",
            tags=TAGS,
            summary=summary,
            responses=responses,
        )
    for path, endpoint, method, name in FALLBACKS:
        router.add_api_route(path, endpoint, methods=[method], name=name, include_in_schema=False)
    app.add_middleware(V2ErrorShape)
