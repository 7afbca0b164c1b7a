"""The playground in a real browser: Debian's Chromium, driven by Playwright, against the service on a loopback
port (uvicorn in a thread of this process).

The page must load with no console errors and no request leaving the machine, decode as a slider moves, draw
the same sample grid for the same seed, reconstruct and score a drawing or an upload, and show API errors as
readable messages. A screenshot is kept in $PLAYGROUND_ARTIFACTS (default: test-artifacts/).

`./run test` installs Chromium (apt-get, as root) and Playwright (the `browser` extra). Elsewhere, without
them, these tests are skipped, except in CI (CI set), where they must run.
"""

from __future__ import annotations

import io
import os
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import uvicorn
from PIL import Image

from service.app import create_app
from tests.service.conftest import make_settings, write_model
from tests.service.test_score import add_background

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
KEY = "playground-test-key-0123456789"
ARTIFACTS = Path(os.environ.get("PLAYGROUND_ARTIFACTS", "test-artifacts"))

try:
    from playwright.sync_api import Browser, ConsoleMessage, Page, Route, sync_playwright
except ImportError:  # pragma: no cover - the `browser` extra is not installed
    sync_playwright = None  # type: ignore[assignment]

if sync_playwright is None or not shutil.which(CHROMIUM):
    reason = f"needs Playwright (the browser extra) and Chromium at {CHROMIUM} (./run test installs both)"
    if os.environ.get("CI"):
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason, allow_module_level=True)

pytestmark = pytest.mark.slow


class LoopbackServer:
    """The service under uvicorn on 127.0.0.1 and a free port, in a thread."""

    def __init__(self, model_dir: Path, **settings: Any) -> None:
        app = create_app(make_settings(model_dir, max_batch=64, max_samples=1024, **settings))
        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        self.port = self.socket.getsockname()[1]
        config = uvicorn.Config(app, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> LoopbackServer:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the service did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.socket.close()


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("playground")
    add_background(write_model(root, "scored", "1", seed=3), seed=9)
    return root


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield browser
        browser.close()


class Visit:
    """A page of the playground, recording console errors and every request, and refusing any that would
    leave the machine."""

    def __init__(self, browser: Browser, base: str) -> None:
        self.base = base
        self.errors: list[str] = []
        self.requests: list[str] = []
        self.refused: list[str] = []
        self.page: Page = browser.new_page(viewport={"width": 1400, "height": 1100})
        self.page.on("console", self._console)
        self.page.on("pageerror", lambda error: self.errors.append(f"page error: {error}"))
        self.page.route("**/*", self._route)

    def _console(self, message: ConsoleMessage) -> None:
        if message.type in ("error", "warning"):
            self.errors.append(f"console {message.type}: {message.text}")

    def _route(self, route: Route) -> None:
        url = route.request.url
        self.requests.append(url)
        if url.startswith(self.base + "/") or url.startswith("data:"):
            route.continue_()
        else:
            self.refused.append(url)
            route.abort()

    def open(self) -> Page:
        self.page.goto(self.base + "/")
        self.page.wait_for_function("document.querySelector('#metadata').rows.length > 0")
        return self.page

    def pixels(self, canvas: str) -> str:
        """The canvas as a PNG data URL: equal exactly when every pixel is."""
        data: str = self.page.evaluate("(id) => document.getElementById(id).toDataURL()", canvas)
        return data

    def drawn(self, canvas: str) -> str:
        """The canvas once a response has been painted on it (the page sets data-drawn then)."""
        self.page.wait_for_function("(id) => document.getElementById(id).dataset.drawn", arg=canvas)
        return self.pixels(canvas)

    def wait_for_change(self, canvas: str, before: str) -> str:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            now = self.pixels(canvas)
            if now != before:
                return now
            self.page.wait_for_timeout(50)
        pytest.fail(f"#{canvas} did not change")


@pytest.fixture(scope="module")
def server(models: Path) -> Iterator[LoopbackServer]:
    with LoopbackServer(models) as running:
        yield running


@pytest.fixture
def visit(browser: Browser, server: LoopbackServer) -> Iterator[Visit]:
    v = Visit(browser, server.url)
    yield v
    v.page.close()


def test_the_page_loads_offline_with_no_console_errors(visit: Visit) -> None:
    page = visit.open()
    page.wait_for_function("document.querySelectorAll('#sliders input').length === 4")
    assert page.url == visit.base + "/playground/"
    assert visit.errors == [] and visit.refused == []
    assert any(url.endswith("/playground/app.js") for url in visit.requests)
    assert "0.900" in page.locator("#anomaly").inner_text()  # the AUROC from the manifest
    # ordered by unit variance (the manifest's [1.0, 0.5, 0.0, 2.0]): z3, z0, z1, then the inactive z2
    units = page.locator("#sliders input").evaluate_all("(all) => all.map((s) => s.dataset.unit)")
    assert units == ["3", "0", "1", "2"]
    page.goto(visit.base + "/docs")
    page.wait_for_selector(".swagger-ui .information-container")  # Swagger UI from the service's own assets
    assert visit.refused == [] and visit.errors == []


def test_moving_a_slider_changes_the_decoded_image(visit: Visit) -> None:
    visit.open()
    before = visit.drawn("decoded")
    slider = visit.page.locator("#sliders input").first
    slider.focus()
    visit.page.keyboard.press("End")  # to +3
    after = visit.wait_for_change("decoded", before)
    assert after != before and visit.errors == []


def test_the_sample_grid_follows_the_seed_and_repeats_for_the_same_seed(visit: Visit) -> None:
    page = visit.open()
    first = visit.drawn("grid")
    assert 'seed\\":1234' in page.locator("#curl").inner_text().replace('"', '\\"')
    page.fill("#seed", "99")
    page.dispatch_event("#seed", "change")
    other = visit.wait_for_change("grid", first)
    page.fill("#seed", "1234")
    page.dispatch_event("#seed", "change")
    again = visit.wait_for_change("grid", other)
    assert again == first and other != first


def _draw(page: Page) -> None:
    box = page.locator("#pad").bounding_box()
    assert box is not None
    page.mouse.move(box["x"] + 60, box["y"] + 50)
    page.mouse.down()
    for x, y in ((160, 50), (160, 190), (60, 190), (60, 50)):
        page.mouse.move(box["x"] + x, box["y"] + y, steps=8)
    page.mouse.up()


def test_a_drawing_gets_a_reconstruction_and_a_score(visit: Visit) -> None:
    page = visit.open()
    blank = visit.pixels("reconstruction")
    _draw(page)
    page.click("#score")
    visit.wait_for_change("reconstruction", blank)
    page.wait_for_selector("#score-table .flag")
    text = page.locator("#score-table").inner_text()
    assert "elbo" in text and "anomaly score" in text and "threshold 5.00" in text
    assert page.locator("#score-table .flag").inner_text().startswith(("yes", "no"))
    # the drawing as an endpoint, a sample as the other: an interpolation strip
    page.click("#drawing-a")
    page.wait_for_function("document.querySelector('#ends').textContent.startsWith('A: my image')")
    page.locator("#grid").click(position={"x": 10, "y": 10})
    page.wait_for_function("document.querySelector('#ends').textContent.includes('B: sample 1')")
    page.click("#interpolate")
    page.wait_for_function("document.querySelector('#strip').width > 200")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "playground.png"), full_page=True)
    assert visit.errors == [] and visit.refused == []


def test_an_uploaded_image_is_drawn_on_the_pad(visit: Visit, tmp_path: Path) -> None:
    page = visit.open()
    blank = visit.pixels("pad")
    picture = np.zeros((56, 56), np.uint8)
    picture[10:46, 20:36] = 255
    buffer = io.BytesIO()
    Image.fromarray(picture).save(buffer, format="PNG")
    path = tmp_path / "upload.png"
    path.write_bytes(buffer.getvalue())
    page.set_input_files("#upload", str(path))
    visit.wait_for_change("pad", blank)
    page.click("#score")
    page.wait_for_selector("#score-table .flag")


def test_api_errors_are_shown_and_a_key_typed_in_is_used(browser: Browser, models: Path) -> None:
    with LoopbackServer(models, api_keys=f"tester:{KEY}") as keyed:
        visit = Visit(browser, keyed.url)
        page = visit.page
        page.goto(keyed.url + "/")  # the page itself needs no key
        page.wait_for_selector("#error:not([hidden])")
        assert page.locator("#error").inner_text().startswith("401")
        page.fill("#key", KEY)
        page.press("#key", "Tab")  # leaving the field commits it (a change event)
        page.wait_for_selector("#error", state="hidden")
        page.wait_for_function("document.getElementById('grid').dataset.drawn")
        # a mistake the API refuses, shown with its field
        page.evaluate("document.getElementById('steps').value = 99")
        page.locator("#grid").click(position={"x": 10, "y": 10})
        page.locator("#grid").click(position={"x": 60, "y": 60})
        page.click("#interpolate")
        page.wait_for_selector("#error:not([hidden])")
        assert page.locator("#error").inner_text() == "422 (steps): steps is 99; the limit (MAX_BATCH) is 64"
        page.close()
    assert visit.refused == []
    assert [
        e for e in visit.errors if "401" not in e and "422" not in e
    ] == []  # the browser logs failed fetches
