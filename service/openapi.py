"""OpenAPI documentation of the model operations, whose bodies the service reads itself.

FastAPI documents a route from its handler's signature. An operation's handler takes the raw request (its
body may be JSON, .npy or nothing, see `service.requests`) and the resolved model, so its entry is written
here instead: the path parameters, the JSON body with the npy alternative, the query parameters that
stand in for the body, the response types, and every error status.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel

from service.media import JSON, NPY, PNG
from service.schemas import ErrorResponse, RequestParams

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
        503: "Queue full or shutting down; retry after Retry-After seconds.",
    }.items()
}
ERRORS[503]["headers"] = {"Retry-After": {"description": "Seconds to wait before retrying.", "schema": INT}}

SERVER_ERRORS = {
    "408": "The body did not arrive within BODY_TIMEOUT.",
    "414": "Request target longer than MAX_URL_BYTES.",
    "431": "Headers over MAX_HEADER_BYTES or MAX_HEADERS.",
}
"""What the server itself answers before any route runs, so on every operation."""
UNAUTHORIZED = "No valid API key (API_KEYS is set): send Authorization: Bearer KEY or X-API-Key: KEY."
SECURITY_SCHEMES = {
    "bearer": {"type": "http", "scheme": "bearer", "description": "Authorization: Bearer KEY"},
    "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
}


def complete(document: dict[str, Any], *, keys: bool, open_paths: Callable[[str], bool]) -> dict[str, Any]:
    """Add what the server answers outside the routes' own code to FastAPI's document, and drop what it
    never sends: the server-level errors on every operation; with API keys, the security schemes, a 401 on
    every guarded operation and no security on the open ones; FastAPI's 422 `HTTPValidationError` on routes
    whose parameters are plain strings (it is never sent: errors have the service's shape)."""
    for path, operations in document["paths"].items():
        shape = "V2Error" if path.startswith("/v2") else "ErrorResponse"  # the protocol's {"error": "..."}
        error = {"application/json": {"schema": {"$ref": f"#/components/schemas/{shape}"}}}
        for operation in operations.values():
            responses = operation["responses"]
            if _is_fastapi_validation(responses.get("422")):
                del responses["422"]
            for status, text in SERVER_ERRORS.items():
                responses.setdefault(status, {"description": text, "content": error})
            if keys and not open_paths(path):
                responses["401"] = {"description": UNAUTHORIZED, "content": error}
            elif keys:
                operation["security"] = []
    schemas = document.setdefault("components", {}).setdefault("schemas", {})
    for unused in ("HTTPValidationError", "ValidationError"):
        schemas.pop(unused, None)
    if keys:
        document["components"]["securitySchemes"] = SECURITY_SCHEMES
        document["security"] = [{"bearer": []}, {"apiKey": []}]
    return document


def _is_fastapi_validation(response: dict[str, Any] | None) -> bool:
    schema = (response or {}).get("content", {}).get("application/json", {}).get("schema", {})
    return bool(schema.get("$ref", "").endswith("/HTTPValidationError"))


PATH_PARAMETERS = {
    "model": {"description": "Model name, a directory under MODEL_DIR.", "example": "fashion-mnist-mlp"},
    "version": {"description": "Model version, a directory under MODEL_DIR/NAME.", "example": "1"},
}


def path_parameters(path: str) -> list[dict[str, Any]]:
    """The OpenAPI parameters of the `{name}` segments in `path`."""
    return [
        {"name": name, "in": "path", "required": True, "schema": {"type": "string"}, **PATH_PARAMETERS[name]}
        for name in re.findall(r"{(\w+)}", path)
    ]


def request_doc(
    path: str,
    request_model: type[BaseModel],
    params_model: type[RequestParams],
    example: dict[str, Any],
    npy: str | None,
    limits: dict[str, tuple[str, int]],
) -> dict[str, Any]:
    """An operation's parameters and body: the JSON schema, the npy alternative, and query parameters.

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
    query = [
        {
            "name": name,
            "in": "query",
            "required": False,
            "schema": schema,
            "description": f"{when} only (a JSON body carries it as a field). {schema.get('description', '')}",
        }
        for name, schema in params_schema.get("properties", {}).items()
    ]
    return {
        "requestBody": {"required": npy is not None, "content": content},
        "parameters": path_parameters(path) + query,
    }


def responses_doc(
    model: type[BaseModel], media: tuple[str, ...], description: str
) -> dict[int | str, dict[str, Any]]:
    """A 200 in each media type the operation offers, with the headers that come with binary bodies."""
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
