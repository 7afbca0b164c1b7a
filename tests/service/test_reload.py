"""Hot reload: MODEL_DIR rescanned while serving (Registry.reload, POST /admin/reload, the poll).

Versions added are served, removed ones stop, broken ones are refused without touching what serves,
unchanged ones keep their sessions, and requests under way never notice.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from bench.standin import rewrite_checksums
from service import loading as loading_module
from service import manifest as manifest_module
from service.app import ServiceApp, create_app
from service.batching import Batcher, BatcherClosed
from service.catalog import ServedModel
from service.manifest import DECODER_FILE, MANIFEST_NAME, read_manifest
from service.registry import Registry
from service.runtime import CPU
from tests.service.conftest import LATENT, make_settings, write_model

pytestmark = pytest.mark.anyio

KEY = "0123456789abcdef0123"
AUTH = {"Authorization": f"Bearer {KEY}", "X-API-Key": KEY}
SAMPLE = {"n": 4, "seed": 7}


@asynccontextmanager
async def running(model_dir: Path, **overrides: Any) -> AsyncIterator[tuple[ServiceApp, httpx.AsyncClient]]:
    """conftest's `serve`, with the app too (its registry is what these tests reload)."""
    app = create_app(make_settings(model_dir, **overrides))
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client,
    ):
        yield app, client


def registry_of(app: ServiceApp) -> Registry:
    registry: Registry = app.state.registry
    return registry


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """MODEL_DIR with tiny/2 only; each test adds, changes or removes versions."""
    write_model(tmp_path, "tiny", "2", seed=0)
    return tmp_path


async def sample(client: httpx.AsyncClient, version: str | None = None) -> httpx.Response:
    path = "/v1/models/tiny" + (f"/versions/{version}" if version else "")
    return await client.post(f"{path}/sample", json=SAMPLE, headers=AUTH)  # the key: for API_KEYS tests


# ---- what a reload does --------------------------------------------------------------------------------


async def test_a_version_added_while_running_is_served_after_reload(root: Path) -> None:
    async with running(root) as (app, client):
        write_model(root, "tiny", "3", seed=1)
        assert (await sample(client, "3")).status_code == 404
        report = await registry_of(app).reload()
        assert (report.loaded, report.removed, report.refused) == (("tiny/3",), (), ())
        assert (await sample(client, "3")).status_code == 200
        info = (await client.get("/v1/models/tiny")).json()
        assert (info["version"], info["versions"]) == ("3", ["2", "3"])
        metrics = (await client.get("/metrics")).text
        assert 'vae_model_loaded{model="tiny",version="3"} 1.0' in metrics


async def test_a_removed_version_stops_being_served_and_its_batchers_stop(root: Path) -> None:
    write_model(root, "tiny", "3", seed=1)
    async with running(root) as (app, client):
        registry = registry_of(app)
        removed = registry.resolve("tiny", "3")
        shutil.rmtree(root / "tiny" / "3")
        report = await registry.reload()
        assert (report.loaded, report.removed, report.refused) == ((), ("tiny/3",), ())
        assert (await sample(client, "3")).status_code == 404
        assert (await client.get("/v1/models/tiny")).json()["versions"] == ["2"]
        await registry.wait_for_retirements()
        with pytest.raises(BatcherClosed):
            await removed.decoder.submit(np.zeros((1, LATENT), np.float32))
        gauge = [
            line for line in (await client.get("/metrics")).text.splitlines() if "vae_model_loaded{" in line
        ]
        assert gauge == ['vae_model_loaded{model="tiny",version="2"} 1.0']


async def test_a_request_holding_a_removed_version_still_completes(root: Path) -> None:
    """Resolved before the reload, called after the version's batchers stopped: it runs, unbatched."""
    write_model(root, "tiny", "3", seed=1)
    async with running(root) as (app, _):
        registry = registry_of(app)
        held = registry.resolve("tiny", "3")
        z = np.random.default_rng(0).standard_normal((2, LATENT), dtype=np.float32)
        before = await held.run_decoder(z)
        shutil.rmtree(root / "tiny" / "3")
        await registry.reload()
        await registry.wait_for_retirements()
        np.testing.assert_array_equal(await held.run_decoder(z), before)
        mu, _ = await held.run_encoder(before)
        assert mu.shape == (2, LATENT)


async def test_retiring_waits_for_the_calls_already_submitted(root: Path) -> None:
    """A call queued behind a run when its version is retired still runs batched: stop comes after it."""
    gate = threading.Event()

    def held_run(z: np.ndarray) -> list[np.ndarray]:
        gate.wait(5)
        return [z]

    def batcher(name: str) -> Batcher:
        return Batcher(held_run, name=name, max_batch_rows=1, window_ms=0, max_queue_rows=8)

    served = ServedModel(
        manifest=read_manifest(root / "tiny" / "2"),
        path=root / "tiny" / "2",
        graph_providers={"encoder": [CPU], "decoder": [CPU]},
        encoder=batcher("encoder"),
        decoder=batcher("decoder"),
    )  # no graphs: nothing to fall back on, so only waiting can save the queued call
    await served.start()
    z = np.ones((1, LATENT), np.float32)
    running_call = asyncio.create_task(served.run_decoder(z))
    queued_call = asyncio.create_task(served.run_decoder(2 * z))
    await asyncio.sleep(0.05)
    retiring = asyncio.create_task(served.retire())
    await asyncio.sleep(0.05)
    assert not retiring.done()
    gate.set()
    results = await asyncio.gather(running_call, queued_call)
    await asyncio.wait_for(retiring, 5)
    np.testing.assert_array_equal(results[1], 2 * z)
    with pytest.raises(BatcherClosed):
        await served.run_decoder(z)


def _bad_checksum(directory: Path) -> None:
    with (directory / DECODER_FILE).open("ab") as f:
        f.write(b"\0")


def _bad_manifest(directory: Path) -> None:
    (directory / MANIFEST_NAME).write_text('{"name": "tiny"')


def _graph_mismatch(directory: Path) -> None:
    text = (directory / MANIFEST_NAME).read_text()
    (directory / MANIFEST_NAME).write_text(
        text.replace(f'"latent_dim": {LATENT}', f'"latent_dim": {LATENT + 1}')
    )


BREAKAGES = [
    (_bad_checksum, f"tiny/VERSION/{DECODER_FILE} has sha256"),
    (_bad_manifest, "tiny/VERSION/model.json is not a valid manifest"),
    (_graph_mismatch, "the manifest says 5"),
]
BREAKAGE_IDS = ["bad-checksum", "bad-manifest", "graph-mismatch"]


@pytest.mark.parametrize(("breakage", "reason"), BREAKAGES, ids=BREAKAGE_IDS)
async def test_a_broken_new_version_is_refused_and_the_good_one_keeps_serving(
    root: Path, breakage: Any, reason: str
) -> None:
    async with running(root) as (app, client):
        registry = registry_of(app)
        serving = registry.resolve("tiny")
        breakage(write_model(root, "tiny", "3", seed=1))
        report = await registry.reload()
        assert (report.loaded, report.removed) == ((), ())
        (refused,) = report.refused
        assert (refused.model, refused.version, refused.path) == ("tiny", "3", "tiny/3")
        assert reason.replace("VERSION", "3") in refused.reason
        assert registry.resolve("tiny") is serving
        assert (await sample(client)).status_code == 200
        ready = await client.get("/readyz")
        assert ready.status_code == 200  # tiny still has a servable version
        assert [item["path"] for item in ready.json()["not_ready"]] == ["tiny/3"]
        assert (await client.get("/v1/models")).json()["refused"][0]["path"] == "tiny/3"


@pytest.mark.parametrize(("breakage", "reason"), BREAKAGES, ids=BREAKAGE_IDS)
async def test_a_broken_update_of_a_serving_version_never_replaces_it(
    root: Path, breakage: Any, reason: str
) -> None:
    async with running(root) as (app, client):
        registry = registry_of(app)
        serving = registry.resolve("tiny", "2")
        expected = (await sample(client, "2")).json()
        breakage(root / "tiny" / "2")
        report = await registry.reload()
        assert (report.loaded, report.removed) == ((), ())
        (refused,) = report.refused
        assert reason.replace("VERSION", "2") in refused.reason
        assert "the version loaded before keeps serving" in refused.reason
        assert registry.resolve("tiny", "2") is serving
        assert (await sample(client, "2")).json() == expected
        again = await registry.reload()  # the same broken files: judged once, not again
        assert again.refused == report.refused and registry.resolve("tiny", "2") is serving


async def test_a_changed_version_is_reloaded_and_the_old_one_retired(root: Path) -> None:
    async with running(root) as (app, client):
        registry = registry_of(app)
        old = registry.resolve("tiny", "2")
        before = (await sample(client, "2")).json()
        shutil.rmtree(root / "tiny" / "2")
        write_model(root, "tiny", "2", seed=5)  # other weights, same NAME/VERSION
        report = await registry.reload()
        assert (report.loaded, report.removed, report.refused) == (("tiny/2",), (), ())
        assert registry.resolve("tiny", "2") is not old
        assert (await sample(client, "2")).json()["samples"] != before["samples"]
        await registry.wait_for_retirements()
        with pytest.raises(BatcherClosed):
            await old.encoder.submit(np.zeros((1, 1, 28, 28), np.float32))


async def test_an_unchanged_version_keeps_its_served_model_and_output(root: Path) -> None:
    async with running(root) as (app, client):
        registry = registry_of(app)
        served = registry.resolve("tiny", "2")
        before = await sample(client, "2")
        write_model(root, "tiny", "3", seed=1)
        await registry.reload()
        shutil.rmtree(root / "tiny" / "3")
        await registry.reload()
        assert registry.resolve("tiny", "2") is served
        after = await sample(client, "2")
        assert before.status_code == after.status_code == 200
        assert after.content == before.content  # bit-identical


async def test_a_reload_that_finds_nothing_changed_opens_no_model_file(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []
    async with running(root) as (app, _):
        registry = registry_of(app)
        monkeypatch.setattr(manifest_module, "sha256_file", lambda path: calls.append(f"hash {path}"))
        monkeypatch.setattr(loading_module, "read_manifest", lambda path: calls.append(f"read {path}"))
        monkeypatch.setattr(loading_module, "load_graphs", lambda *a, **k: calls.append("load"))
        for _ in range(3):
            report = await registry.reload()
            assert (report.loaded, report.removed, report.refused) == ((), (), ())
        assert calls == []


async def test_touched_files_with_the_same_manifest_keep_their_sessions(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Changed file times send a version back to the checks, but equal checksums keep its ServedModel."""
    async with running(root) as (app, _):
        registry = registry_of(app)
        served = registry.resolve("tiny", "2")
        loads: list[object] = []
        monkeypatch.setattr(loading_module, "load_graphs", lambda *a, **k: loads.append(a))
        for path in (root / "tiny" / "2").iterdir():
            os.utime(path, ns=(1_000_000_000, 1_000_000_000))
        report = await registry.reload()
        assert (report.loaded, report.removed, report.refused) == ((), (), ())
        assert registry.resolve("tiny", "2") is served and loads == []


async def test_a_rewritten_manifest_with_new_checksums_is_reloaded(root: Path) -> None:
    """A changed graph with its manifest updated is a new model, even at the same NAME/VERSION."""
    async with running(root) as (app, _):
        registry = registry_of(app)
        old = registry.resolve("tiny", "2")
        source = write_model(root.parent / "source", "tiny", "2", seed=9)
        shutil.copyfile(source / DECODER_FILE, root / "tiny" / "2" / DECODER_FILE)
        rewrite_checksums(root / "tiny" / "2")
        report = await registry.reload()
        assert report.loaded == ("tiny/2",) and registry.resolve("tiny", "2") is not old


async def test_concurrent_reloads_are_serialised(root: Path) -> None:
    async with running(root) as (app, _):
        registry = registry_of(app)
        write_model(root, "tiny", "3", seed=1)
        reports = await asyncio.gather(*(registry.reload() for _ in range(3)))
        assert sorted(report.loaded for report in reports) == [(), (), ("tiny/3",)]


async def test_reload_under_steady_load_fails_no_request(root: Path) -> None:
    """4 clients keep sampling the newest and a pinned version while reloads add and remove the newest.

    A wide batch window keeps requests queued in the batchers when a version is retired.
    """
    async with running(root, batch_window_ms=20) as (app, client):
        registry = registry_of(app)
        statuses: list[int] = []
        stop = asyncio.Event()

        async def keep_sampling(version: str | None) -> None:
            while not stop.is_set():
                statuses.append((await sample(client, version)).status_code)

        workers = [asyncio.create_task(keep_sampling(v)) for v in (None, None, "2", None)]
        loaded, removed = [], []
        for round_ in range(6):
            version = str(10 + round_ // 2)
            if round_ % 2 == 0:
                write_model(root, "tiny", version, seed=round_)
            else:
                shutil.rmtree(root / "tiny" / version)
            await asyncio.sleep(0.05)
            report = await registry.reload()
            loaded += report.loaded
            removed += report.removed
            await asyncio.sleep(0.05)
        stop.set()
        await asyncio.gather(*workers)
        await registry.wait_for_retirements()
    assert loaded == removed == ["tiny/10", "tiny/11", "tiny/12"]
    assert len(statuses) > 20
    assert set(statuses) == {200}, statuses


async def test_the_poll_picks_up_a_new_version_without_a_call(root: Path) -> None:
    async with running(root, reload_poll_seconds=0.05) as (app, client):
        write_model(root, "tiny", "3", seed=1)
        for _ in range(200):
            if (await sample(client, "3")).status_code == 200:
                break
            await asyncio.sleep(0.05)
        else:
            pytest.fail("the poll never loaded tiny/3")
        poller = registry_of(app)._poller
        assert poller is not None and not poller.done()
    assert poller.done()  # stopped with the app


async def test_without_a_poll_interval_nothing_is_picked_up(root: Path) -> None:
    async with running(root) as (app, client):
        write_model(root, "tiny", "3", seed=1)
        await asyncio.sleep(0.2)
        assert (await sample(client, "3")).status_code == 404
        assert registry_of(app)._poller is None


# ---- POST /admin/reload --------------------------------------------------------------------------------


async def test_admin_reload_is_forbidden_without_api_keys(root: Path) -> None:
    async with running(root) as (_, client):
        write_model(root, "tiny", "3", seed=1)
        response = await client.post("/admin/reload")
        assert response.status_code == 403
        error = response.json()["error"]
        assert error["status"] == 403 and "API_KEYS" in error["message"]
        assert (await sample(client, "3")).status_code == 404  # nothing was reloaded


async def test_admin_reload_answers_the_report(root: Path) -> None:
    (root / "tiny" / "9").mkdir()  # refused: no manifest
    async with running(root, api_keys=f"ops:{KEY}") as (_, client):
        write_model(root, "tiny", "3", seed=1)
        response = await client.post("/admin/reload", headers=AUTH)
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["loaded"] == ["tiny/3"] and body["removed"] == []
        (refused,) = body["refused"]
        assert refused == {
            "model": "tiny",
            "version": "9",
            "path": "tiny/9",
            "reason": f"tiny/9/{MANIFEST_NAME} is missing",
        }
        assert str(root) not in response.text
        assert (await sample(client, "3")).status_code == 200


async def test_admin_reload_is_documented(root: Path) -> None:
    async with running(root) as (_, client):
        spec = (await client.get("/openapi.json")).json()
    operation = spec["paths"]["/admin/reload"]["post"]
    assert operation["tags"] == ["admin"]
    assert {"200", "401", "403"} <= operation["responses"].keys()
    schema = operation["responses"]["200"]["content"]["application/json"]["schema"]
    assert schema["$ref"].endswith("/ReloadResponse")
    assert set(spec["components"]["schemas"]["ReloadResponse"]["properties"]) == {
        "loaded",
        "removed",
        "refused",
    }
    assert "refused" in spec["components"]["schemas"]["ModelList"]["properties"]
