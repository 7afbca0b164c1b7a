"""Pure ASGI middleware that bounds request bodies (413) before any handler reads them into memory."""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import PayloadTooLarge, error_body


class BodySizeLimit:
    """Refuse bodies over `max_bytes`: at once when Content-Length says so, else while counting streamed bytes.

    A chunked upload has no Content-Length, so the count on `receive` is what actually bounds memory; the
    PayloadTooLarge it raises surfaces in the handler reading the body and is rendered by the error handler.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    await self._reject(
                        send, 400, "Content-Length is not an integer", "headers.content-length"
                    )
                    return
                if declared > self.max_bytes:
                    await self._reject(send, 413, self._message(declared), "body")
                    return
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise PayloadTooLarge(self._message(received, at_least=True), field="body")
            return message

        await self.app(scope, counting_receive, send)

    def _message(self, size: int, at_least: bool = False) -> str:
        prefix = "at least " if at_least else ""
        return f"request body is {prefix}{size} bytes; MAX_BODY_BYTES is {self.max_bytes}"

    @staticmethod
    async def _reject(send: Send, status: int, message: str, field: str) -> None:
        body = error_body(status, message, field)
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
