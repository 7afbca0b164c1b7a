"""/docs and /redoc work offline: every script and style they load is served by the service itself."""

from __future__ import annotations

import re

import httpx
import pytest

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
async def test_docs_pages_load_only_local_assets(client: httpx.AsyncClient, page: str) -> None:
    response = await client.get(page)
    assert response.status_code == 200
    html = response.text
    assert "http://" not in html and "https://" not in html  # no CDN, no web fonts
    assets = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert assets, "the page loads no scripts?"
    for asset in assets:
        loaded = await client.get(asset)
        assert loaded.status_code == 200, asset
        assert len(loaded.content) > 1000, asset
    assert "/openapi.json" in html
