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

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Generic, Literal, TypeVar

import numpy as np
import numpy.typing as npt
import orjson
from fastapi import APIRouter, Depends, FastAPI, Path, Request
from pydantic import BaseModel, Field
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import operations
from service.catalog import Catalog, ServedModel
from service.dispatch import Operation, OperationRoute, Resolve
from service.errors import BadRequest, InvalidInput, NotFound, check_limit
from service.manifest import Manifest
from service.media import JSON
from service.metrics import Metrics, protocol_of
from service.openapi import BINARY, INT, path_parameters
from service.operations import F32
from service.parse_pool import ParsePool
from service.registry import Registry
from service.responses import json_response, with_dtype
from service.routes import readyz
from service.schemas import DecodeParams, EncodeParams, ReconstructParams, RequestParams, SampleParams
from service.settings import Settings
from service.v2_binary import HEADER_LENGTH, InputSpec, Signature, read_request, write_response

SERVER_NAME = "vae-serving"
EXTENSIONS = ("binary_tensor_data", "parameters")
"""Triton's names for what is implemented beyond the core protocol (no shared memory, no repository API)."""
PLATFORM = "onnxruntime_onnx"
"""Triton's platform name for ONNX on onnxruntime: each operation runs the model's ONNX graphs there."""
OCTET = "application/octet-stream"

P = TypeVar("P", bound=RequestParams)

# ---- the operation table ---------------------------------------------------------------------------------

Dim = Literal["batch", "samples", "image", "latent"]
"""A tensor axis: batch and samples vary (-1), image is the manifest's input_shape, latent its latent_dim."""
IMAGES: tuple[Dim, ...] = ("batch", "image")
LATENTS: tuple[Dim, ...] = ("batch", "latent")
INPUT_KINDS: dict[tuple[Dim, ...], Literal["images", "latents"]] = {IMAGES: "images", LATENTS: "latents"}
"""The inputs an operation may take, by their axes, and the v1 validator that checks each (`v2_binary`)."""


@dataclass(frozen=True)
class Tensor:
    """An input or output of a V2 model; its shape follows from the model's manifest."""

    name: str
    dims: tuple[Dim, ...]
    description: str
    datatypes: tuple[str, ...] = ("FP32",)  # inputs: every datatype taken; metadata shows the first

    def shape(self, manifest: Manifest) -> list[int]:
        sizes: dict[Dim, list[int]] = {
            "batch": [-1],
            "samples": [-1],
            "image": list(manifest.input_shape),
            "latent": [manifest.latent_dim],
        }
        return [size for dim in self.dims for size in sizes[dim]]

    @property
    def shape_text(self) -> str:
        text: dict[Dim, str] = {
            "batch": "-1",
            "samples": "-1",
            "image": "*input_shape",
            "latent": "latent_dim",
        }
        return "[" + ", ".join(text[dim] for dim in self.dims) + "]"

    def input_spec(self, manifest: Manifest) -> InputSpec:
        return InputSpec(self.name, INPUT_KINDS[self.dims], tuple(self.shape(manifest)[1:]), self.datatypes)


@dataclass(frozen=True)
class Call(Generic[P]):
    """One checked inference request: what an operation's `run` needs."""

    served: ServedModel
    params: P
    tensors: Mapping[str, F32]
    settings: Settings
    metrics: Metrics
    operation: str

    def count_samples(self, rows: int) -> None:
        self.metrics.count_samples(self.operation, self.served.manifest.name, rows)


@dataclass(frozen=True)
class Result:
    outputs: dict[str, npt.NDArray[Any]]  # every output the operation has, by name
    seed: int | None  # the seed eps was drawn from; None when none was drawn


@dataclass(frozen=True)
class V2Operation(Generic[P]):
    """One operation as a V2 model: its tensors, its parameters (v1's model) and the function that runs it."""

    name: str
    summary: str
    params: type[P]
    inputs: tuple[Tensor, ...]
    outputs: tuple[Tensor, ...]
    run: Callable[[Call[P]], Awaitable[Result]]
    example: dict[str, Any]  # a JSON request for /docs (the fashion-mnist-mlp sizes)

    def __post_init__(self) -> None:
        for tensor in self.inputs:
            if tensor.dims not in INPUT_KINDS:
                raise ValueError(
                    f"{self.name}: input {tensor.name} {tensor.shape_text} is not one a validator reads"
                )

    def signature(self, model: str, manifest: Manifest, max_batch: int) -> Signature:
        return Signature(
            model=model,
            inputs=tuple(tensor.input_spec(manifest) for tensor in self.inputs),
            outputs=tuple(tensor.name for tensor in self.outputs),
            params=self.params,
            value_range=manifest.value_range,
            max_batch=max_batch,
        )


def _seed(requested: int | None) -> int:
    return operations.draw_seed() if requested is None else requested


async def _encode(call: Call[EncodeParams]) -> Result:
    x, samples = call.tensors["images"], call.params.samples
    rows = x.shape[0] * samples
    check_limit(rows, call.settings.max_samples, "samples", "MAX_SAMPLES", "images x samples")
    seed = _seed(call.params.seed)
    encoding = await operations.encode(call.served, x, samples, operations.make_rng(seed))
    call.count_samples(rows)
    # samples 0 draws no z: an empty [batch, 0, L] keeps the output's shape the metadata announces.
    z = encoding.z if encoding.z is not None else np.empty((len(x), 0, call.served.latent_dim), np.float32)
    return Result({"mu": encoding.mu, "logvar": encoding.logvar, "sigma": encoding.sigma, "z": z}, seed)


async def _sample(call: Call[SampleParams]) -> Result:
    params = call.params
    check_limit(params.n, call.settings.max_samples, "n", "MAX_SAMPLES", "n")
    seed = _seed(params.seed)
    result = await operations.sample(call.served, params.n, params.temperature, operations.make_rng(seed))
    call.count_samples(params.n)
    return Result({"samples": with_dtype(result.images, params.dtype), "z": result.z}, seed)


async def _reconstruct(call: Call[ReconstructParams]) -> Result:
    x, params = call.tensors["images"], call.params
    seed: int | None = None
    rng: np.random.Generator | None = None
    if params.mode == "sample":  # mode mean draws no eps: no seed to draw or return
        seed = _seed(params.seed)
        rng = operations.make_rng(seed)
        call.count_samples(len(x))
    result = await operations.reconstruct(call.served, x, params.mode, rng)
    images = with_dtype(result.images, params.dtype)
    return Result({"reconstructions": images, "z": result.z, "error": result.error}, seed)


async def _decode(call: Call[DecodeParams]) -> Result:
    images = await operations.decode(call.served, call.tensors["z"])
    return Result({"samples": with_dtype(images, call.params.dtype)}, None)


IMAGE_IN = Tensor(
    "images",
    IMAGES,
    "Images: FP32 values in the model's value_range ([0, 1]), or UINT8 pixels 0-255 (divided by 255).",
    ("FP32", "UINT8"),
)
IMAGE_OUT = "Images; UINT8 0-255 with parameter dtype uint8."
EXAMPLE_IMAGES = {"name": "images", "datatype": "UINT8", "shape": [1, 1, 28, 28], "data": [0] * 784}

OPERATIONS: dict[str, V2Operation[Any]] = {
    op.name: op
    for op in (
        V2Operation(
            "encode",
            "Posterior of each image: mu, logvar, sigma, and z = mu + sigma * eps (samples per image).",
            EncodeParams,
            (IMAGE_IN,),
            (
                Tensor("mu", LATENTS, "Posterior means."),
                Tensor("logvar", LATENTS, "Posterior log-variances."),
                Tensor("sigma", LATENTS, "exp(logvar / 2)."),
                Tensor(
                    "z", ("batch", "samples", "latent"), "mu + sigma * eps; [batch, 0, L] when samples is 0."
                ),
            ),
            _encode,
            {"inputs": [EXAMPLE_IMAGES], "parameters": {"samples": 2, "seed": 1234}},
        ),
        V2Operation(
            "sample",
            "Generate images: decode z = temperature * eps, eps ~ N(0, I) drawn on the server.",
            SampleParams,
            (),
            (Tensor("samples", IMAGES, IMAGE_OUT), Tensor("z", LATENTS, "temperature * eps.")),
            _sample,
            {"inputs": [], "parameters": {"n": 4, "seed": 1234}},
        ),
        V2Operation(
            "reconstruct",
            "Encode and decode each image; mode mean decodes mu, mode sample decodes mu + sigma * eps.",
            ReconstructParams,
            (IMAGE_IN,),
            (
                Tensor("reconstructions", IMAGES, IMAGE_OUT),
                Tensor("z", LATENTS, "The latents decoded: mu, or mu + sigma * eps."),
                Tensor("error", ("batch",), "Mean squared error per image."),
            ),
            _reconstruct,
            {"inputs": [EXAMPLE_IMAGES], "parameters": {"mode": "sample", "seed": 7}},
        ),
        V2Operation(
            "decode",
            "Decode latent vectors into images.",
            DecodeParams,
            (Tensor("z", LATENTS, "Latent vectors, finite, within [-1000, 1000]."),),
            (Tensor("samples", IMAGES, IMAGE_OUT),),
            _decode,
            {"inputs": [{"name": "z", "datatype": "FP32", "shape": [1, 32], "data": [0.0] * 32}]},
        ),
    )
}
"""Operation name -> its V2 model: the whole map, read by the routes, the metadata and /docs."""


# ---- finding the model a path names -------------------------------------------------------------------


def registry_of(request: Request) -> Registry:
    registry: Registry = request.app.state.registry
    return registry


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


# ---- the protocol's error shape ------------------------------------------------------------------------


def v2_error_body(body: bytes) -> bytes:
    """The service's error body {"error": {"status", "field", "message"}} as the protocol's
    {"error": message}; any other body unchanged."""
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        return body
    error = parsed.get("error") if isinstance(parsed, dict) else None
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return orjson.dumps({"error": error["message"]})
    return body


class V2ErrorShape:
    """On /v2 paths, every error response goes out in the protocol's shape, `{"error": "message"}`.

    The service renders every error once, in its own shape (`service.errors`), wherever it arises: in the V2
    handlers, in the body limit and API key middlewares below this one, in FastAPI's routing. Added last, this
    middleware sits above them all and rewrites those bodies on V2 paths only; successful responses and
    every other path pass through untouched.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or protocol_of(scope["path"]) != "v2":
            await self.app(scope, receive, send)
            return
        start: Message | None = None
        chunks: list[bytes] = []

        async def reshaping_send(message: Message) -> None:
            nonlocal start
            if message["type"] == "http.response.start" and message["status"] >= 400:
                start = message
                return
            if start is None or message["type"] != "http.response.body":
                await send(message)
                return
            chunks.append(message.get("body", b""))
            if message.get("more_body", False):
                return
            body = v2_error_body(b"".join(chunks))
            headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
            headers.append((b"content-length", str(len(body)).encode()))
            await send({**start, "headers": headers})
            await send({"type": "http.response.body", "body": body})

        await self.app(scope, receive, reshaping_send)


# ---- documentation -------------------------------------------------------------------------------------


class V2Error(BaseModel):
    error: str = Field(description="What was wrong, naming the input, output or parameter.")


class V2Tensor(BaseModel):
    name: str
    datatype: str = Field(examples=["FP32"])
    shape: list[int] = Field(description="-1 for a variable axis (the batch).", examples=[[-1, 1, 28, 28]])


class V2ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str] = Field(examples=[list(EXTENSIONS)])


class V2ModelMetadata(BaseModel):
    name: str = Field(examples=["fashion-mnist-mlp.encode"])
    versions: list[str] = Field(description="Every loaded version, oldest first.")
    platform: str = Field(examples=[PLATFORM])
    inputs: list[V2Tensor]
    outputs: list[V2Tensor]


class V2ModelReady(BaseModel):
    name: str
    ready: bool


class V2Live(BaseModel):
    live: bool


class V2Ready(BaseModel):
    ready: bool


Parameters = dict[str, str | int | float | bool]


class V2RequestInput(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: Parameters | None = Field(None, description="binary_data_size: the data follow the JSON.")
    data: list[Any] | None = Field(None, description="Row-major values, flat or nested.")


class V2RequestOutput(BaseModel):
    name: str
    parameters: Parameters | None = Field(None, description="binary_data: true sends it after the JSON.")


class V2InferenceRequest(BaseModel):
    id: str | None = Field(None, description="Echoed in the response.")
    parameters: Parameters | None = None
    inputs: list[V2RequestInput]
    outputs: list[V2RequestOutput] | None = Field(None, description="Omitted: every output.")


class V2ResponseOutput(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: Parameters | None = Field(None, description="binary_data_size when the data follow the JSON.")
    data: list[Any] | None = Field(None, description="Row-major values, flat.")


class V2InferenceResponse(BaseModel):
    model_name: str
    model_version: str
    id: str | None = None
    parameters: Parameters | None = Field(None, description="seed: the seed eps was drawn from.")
    outputs: list[V2ResponseOutput]


def _inline(schema: dict[str, Any]) -> dict[str, Any]:
    """A pydantic JSON schema with its `$defs` substituted in place (an OpenAPI body cannot refer to them)."""
    defs: dict[str, Any] = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return resolve(defs[ref.removeprefix("#/$defs/")])
            return {key: resolve(value) for key, value in node.items()}
        if isinstance(node, list):
            return [resolve(value) for value in node]
        return node

    resolved: dict[str, Any] = resolve(schema)
    return resolved


def _tensor_rows(tensors: tuple[Tensor, ...]) -> str:
    return "".join(
        f"| `{t.name}` | {' or '.join(t.datatypes)} | `{t.shape_text}` | {t.description} |\n" for t in tensors
    )


def _description(operation: V2Operation[Any], settings: Settings) -> str:
    """The operation's tensors, parameters and this server's limits, as Markdown for /docs."""
    params = operation.params.model_json_schema()["properties"]
    lines = "".join(f"| `{name}` | {spec.get('description', '')} |\n" for name, spec in params.items())
    table = "| tensor | datatype | shape | meaning |\n|---|---|---|---|\n"
    inputs = _tensor_rows(operation.inputs) or "| (none) | | | |\n"
    return (
        f"V2 model `NAME.{operation.name}`. {operation.summary}\n\n"
        f"**Inputs** (a batch of at most MAX_BATCH = {settings.max_batch})\n\n{table}{inputs}\n"
        "**Outputs** (every one, unless `outputs` names some; in binary with `binary_data`)\n\n"
        f"{table}{_tensor_rows(operation.outputs)}\n"
        "**Parameters** (the request's `parameters`, and `binary_data_output`; eps rows at most "
        f"MAX_SAMPLES = {settings.max_samples})\n\n| name | meaning |\n|---|---|\n{lines}"
    )


ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": V2Error, "description": text}
    for status, text in {
        400: "Malformed header, JSON, shape, datatype, size, value or parameter.",
        404: "Unknown model or version.",
        413: "Body over MAX_BODY_BYTES.",
        503: "Queue full or shutting down; retry after Retry-After seconds.",
    }.items()
}
ERRORS[503]["headers"] = {"Retry-After": {"description": "Seconds to wait before retrying.", "schema": INT}}
HEADER_DOC = {
    "name": "Inference-Header-Content-Length",
    "in": "header",
    "required": False,
    "schema": INT,
    "description": "With binary tensor data: the length of the JSON part of the body.",
}


def _infer_doc(operation: V2Operation[Any], path: str, settings: Settings) -> dict[str, Any]:
    request = _inline(V2InferenceRequest.model_json_schema())
    params = _inline(operation.params.model_json_schema())
    params["properties"]["binary_data_output"] = {"type": "boolean", "description": "Every output in binary."}
    request["properties"]["parameters"] = params
    return {
        "summary": f"NAME.{operation.name}: {operation.summary}",
        "description": _description(operation, settings),
        "openapi_extra": {
            "parameters": [*path_parameters(path), HEADER_DOC],
            "requestBody": {
                "required": True,
                "content": {
                    JSON: {"schema": request, "example": operation.example},
                    OCTET: {
                        **BINARY,
                        "description": "The JSON request, then the binary tensor data; "
                        "Inference-Header-Content-Length gives the JSON's length.",
                    },
                },
            },
        },
        "responses": {
            200: {
                "model": V2InferenceResponse,
                "description": "JSON, or (binary outputs) JSON then the binary tensor data, the JSON's "
                "length in Inference-Header-Content-Length.",
                "content": {OCTET: BINARY},
                "headers": {"Inference-Header-Content-Length": {"schema": INT}},
            },
            **ERRORS,
        },
    }


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
                    **_infer_doc(operation, path, settings),
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
