"""The V2 routes' OpenAPI documentation: the protocol's wire models and each operation's infer entry."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from service.media import JSON
from service.openapi import BINARY, INT, path_parameters
from service.settings import Settings
from service.v2_operations import EXTENSIONS, OCTET, PLATFORM, Tensor, V2Operation

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


def infer_doc(operation: V2Operation[Any], path: str, settings: Settings) -> dict[str, Any]:
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
