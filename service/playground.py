"""The playground: a web page at /playground/ (and / redirects there) for trying a model without writing code.

Plain HTML, CSS and JavaScript in `service/playground/`, served by the service itself: no CDN, no build step,
nothing fetched from elsewhere, so it works on a machine without internet access. The page calls the v1 API
on the same origin (sample, decode, reconstruct, score, encode, interpolate, the model's metadata); with
API_KEYS set it sends the key typed into its key field as X-API-Key, and the page itself and its files are
open (`service.access`), as /docs is.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.staticfiles import StaticFiles
from starlette.responses import RedirectResponse

PLAYGROUND = "/playground"
PAGE_DIR = Path(__file__).parent / "playground"


def add_playground(app: FastAPI) -> None:
    app.mount(f"{PLAYGROUND}/", StaticFiles(directory=PAGE_DIR, html=True), name="playground")

    async def to_the_page(request: Request) -> RedirectResponse:
        return RedirectResponse(f"{request.scope.get('root_path', '')}{PLAYGROUND}/")

    for path in ("/", PLAYGROUND):
        app.add_api_route(path, to_the_page, include_in_schema=False)
