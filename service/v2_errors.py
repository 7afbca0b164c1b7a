"""The Open Inference Protocol's error shape, `{"error": "message"}`, on every /v2 path.

Whatever answers a /v2 request with an error (the V2 handlers, the body limit's 413, API keys' 401,
routing's 404 and 405, the queue's 503, the error boundary's 500) writes the service's shape; the
`V2ErrorShape` middleware and `v2_error_body` turn it into the protocol's.
"""

from __future__ import annotations

import orjson
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.metrics import protocol_of

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


def v2_response(response: Response) -> Response:
    """An error response of the service, reshaped for the protocol (the error boundary's 500s)."""
    headers = {k: v for k, v in response.headers.items() if k not in ("content-length", "content-type")}
    body = v2_error_body(bytes(response.body))
    return Response(body, status_code=response.status_code, headers=headers, media_type="application/json")


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
