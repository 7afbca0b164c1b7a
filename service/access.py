"""Who may call: optional API keys (API_KEYS) checked on every route but the probes, and the key's name.

API_KEYS holds `NAME:KEY` pairs, comma-separated, or is the path of a file with one pair per line (`#`
comments allowed). With none configured the service is open. With keys, every request needs
`Authorization: Bearer KEY` or `X-API-Key: KEY`, except the open paths: the probes (`/healthz`, `/readyz`),
`/metrics` unless METRICS_REQUIRE_KEY, and the API documentation (`/docs`, `/redoc`, `/openapi.json` and
their assets) and the playground's page (`/`, `/playground/`), which describe or call the API but serve no
data themselves. The rule is deny by default: a route added later
needs a key unless it is added to OPEN_PATHS here.

The key's NAME (never the key) labels the request: in `scope["state"]["api_key"]` for the metrics, and in
`current_key` for the access log (`KeyNameFilter`).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
from contextvars import ContextVar
from pathlib import Path

from starlette.types import ASGIApp, Receive, Scope, Send

from service.errors import Unauthorized, render

NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
MIN_KEY_LENGTH = 16
PROBES = frozenset({"/healthz", "/readyz", "/v2/health/live", "/v2/health/ready"})
DOCS = ("/docs", "/redoc", "/openapi.json")  # /docs also covers /docs-assets/ and the OAuth2 redirect
PAGES = ("/playground",)  # the playground's page and files; its API calls carry the key typed into it
CHALLENGE = {"WWW-Authenticate": 'Bearer realm="vae-serving"'}

current_key: ContextVar[str] = ContextVar("current_key", default="-")
"""The name of the key the current request came with ("-": none), for log lines."""


def parse_api_keys(spec: str) -> dict[str, str]:
    """API_KEYS -> {key: name}. Raises ValueError naming the bad entry (never echoing a key)."""
    spec = spec.strip()
    if not spec:
        return {}
    path = Path(spec)
    if path.is_file():
        lines = path.read_text().splitlines()
        entries = [(f"{path}:{n}", line.strip()) for n, line in enumerate(lines, 1)]
        entries = [(where, line) for where, line in entries if line and not line.startswith("#")]
    else:
        entries = [(f"entry {n}", item.strip()) for n, item in enumerate(spec.split(","), 1)]
    keys: dict[str, str] = {}
    for where, entry in entries:
        name, sep, key = entry.partition(":")
        if not sep or not NAME.fullmatch(name):
            raise ValueError(f"API_KEYS {where}: expected NAME:KEY, NAME of letters, digits, '_', '.', '-'")
        if len(key) < MIN_KEY_LENGTH:
            raise ValueError(f"API_KEYS {where} ({name}): keys need at least {MIN_KEY_LENGTH} characters")
        if key in keys or name in keys.values():
            raise ValueError(f"API_KEYS {where} ({name}): each name and each key may appear only once")
        keys[key] = name
    if not keys:
        raise ValueError(f"API_KEYS names {spec!r}, which holds no NAME:KEY line")
    return keys


def is_open(path: str, *, metrics_open: bool) -> bool:
    """Whether `path` is served without a key: the probes, the docs, the playground page (and / leading to
    it) and, if `metrics_open`, /metrics."""
    return (
        path in PROBES
        or path.startswith(DOCS)
        or path == "/"
        or path.startswith(PAGES)
        or (metrics_open and path == "/metrics")
    )


def presented_keys(scope: Scope) -> list[str]:
    """Every credential the request carries: each `X-API-Key`, and each `Authorization` header's token
    (a scheme other than Bearer yields an empty token, which matches no key)."""
    keys = []
    headers: list[tuple[bytes, bytes]] = scope["headers"]
    for name, value in headers:
        if name == b"x-api-key":
            keys.append(value.decode("latin-1").strip())
        elif name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            keys.append(token.strip() if scheme.lower() == "bearer" else "")
    return keys


class ApiKeys:
    """Refuse requests without a valid key (401 in the error shape, with WWW-Authenticate); label the rest.

    Every credential a request carries must be valid and name the same key: a wrong token beside a right
    one is refused, so a client (or a proxy) sending a stale header learns of it.

    Keys are compared as SHA-256 digests with `hmac.compare_digest`, against every configured key whatever
    the outcome, so the time taken does not depend on how much of a key was right.
    """

    def __init__(self, app: ASGIApp, keys: dict[str, str], metrics_open: bool) -> None:
        self.app = app
        self.digests = [(hashlib.sha256(key.encode()).digest(), name) for key, name in keys.items()]
        self.metrics_open = metrics_open

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or not self.digests
            or is_open(scope["path"], metrics_open=self.metrics_open)
        ):
            await self.app(scope, receive, send)
            return
        names = [self._name_of(key) for key in presented_keys(scope)]
        name = names[0] if names and None not in names and len(set(names)) == 1 else None
        if name is None:
            message = "a valid API key is required: send Authorization: Bearer KEY or X-API-Key: KEY"
            error = Unauthorized(message, field="headers.authorization", headers=CHALLENGE)
            await render(error, scope["path"])(scope, receive, send)
            return
        scope.setdefault("state", {})["api_key"] = name
        token = current_key.set(name)
        try:
            await self.app(scope, receive, send)
        finally:
            current_key.reset(token)

    def _name_of(self, key: str) -> str | None:
        digest = hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()
        found = None
        for known, name in self.digests:
            if hmac.compare_digest(digest, known):
                found = name
        return found


class KeyNameFilter(logging.Filter):
    """Adds `api_key` (the current key's name, "-" for none) to log records, for the access log format."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.api_key = current_key.get()
        return True
