"""Ray Serve for real: a local Ray instance, deploy/ray/serve.yaml deployed as `./run serve-ray` deploys it, 2
replicas behind Ray's ingress (HAProxy, service_ray.launch.RAY_DEFAULTS), on the loopback address.

- The v1 contract: the tests of tests/service that need nothing but a `client` (routes, operations,
  responses, request bodies) run here again, the same functions, against `python -m service` over TCP and
  against Ray; the `server` fixture is parametrized over both.
- Both replicas answer (the X-Serve-Replica header), and a seed gives bit-identical z on either.
- A replica's process killed under a steady load: Ray replaces it; failed first attempts are counted and
  bounded, and no request fails once the client retries (a seeded request is idempotent); /readyz never
  says 200 for a replica that cannot answer.
- Past max_ongoing_requests + max_queued_requests, requests get a 503 at once and nothing hangs.

Everything shares one Ray instance (about 10 s to start, 20-40 s per deployment on 2 loaded cores).
"""

from __future__ import annotations

import concurrent.futures
import importlib.util
import inspect
import os
import subprocess
import sys
import threading
import time
import warnings
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from pydantic import SecretStr
from pydantic.warnings import PydanticDeprecatedSince20

import tests.service.test_operations
import tests.service.test_requests
import tests.service.test_responses
import tests.service.test_routes
from bench import standin
from bench.serve_load import free_port
from service.settings import Settings
from tests.service.conftest import MODEL, VERSIONS, eps_for, make_settings, write_model

ROOT = Path(__file__).resolve().parents[2]

if importlib.util.find_spec("ray") is None:
    if os.environ.get("CI"):
        raise RuntimeError("ray is not installed: `./run test` installs the `ray` extra into .venv")
    pytest.skip("ray is not installed (the `ray` extra; `./run test` installs it)", allow_module_level=True)

RAY_WARNINGS = "ignore::pydantic.warnings.PydanticDeprecatedSince20"
"""Ray 2.60's own models use pydantic v1 idioms (extra keywords on Field): not ours to fix."""

with warnings.catch_warnings():
    warnings.simplefilter("ignore", PydanticDeprecatedSince20)
    from service_ray import launch
    from service_ray.deployment import REPLICA_HEADER

pytestmark = [pytest.mark.slow, pytest.mark.anyio, pytest.mark.filterwarnings(RAY_WARNINGS)]

REPLICAS = 2


# ---- the servers ---------------------------------------------------------------------------------------


def settings_env(settings: Settings) -> dict[str, str]:
    """Every setting as the environment variable that reproduces it (what a replica reads)."""
    env = {}
    for name in Settings.model_fields:
        value = getattr(settings, name)
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        env[name.upper()] = str(value).lower() if isinstance(value, bool) else str(value)
    return env


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def contract_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The settings of tests/service (conftest.make_settings) on its model directory (tiny/2, tiny/10)."""
    root = tmp_path_factory.mktemp("models")
    for seed, version in enumerate(VERSIONS):
        write_model(root, MODEL, version, seed)
    return settings_env(make_settings(root))


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[None]:
    """A local Ray instance with Ray's switches as `./run serve-ray` sets them (a stopping replica drains for
    1 s rather than 5, so that teardown is quick); Serve and Ray stop after."""
    import ray
    from ray import serve

    with pytest.MonkeyPatch.context() as patch:
        environ = dict(os.environ, RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S="1")
        launch.ray_environment(environ)
        for name, value in environ.items():
            patch.setenv(name, value)
        launch.start_local_ray(num_cpus=4)  # logical CPUs: 2 replicas at 1 CPU, and the overload app's
        try:
            yield
        finally:
            serve.shutdown()
            ray.shutdown()


@pytest.fixture(scope="module")
def ray_url(ray_cluster: None, contract_env: dict[str, str]) -> str:
    """deploy/ray/serve.yaml with 2 replicas and the contract settings, on a free loopback port."""
    port = free_port()
    config = launch.load_config(host="127.0.0.1", port=port, replicas=REPLICAS, env=contract_env)
    launch.deploy(config)
    return f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def uvicorn_url(contract_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`python -m service` with the same settings, as the reference the Ray deployment must match."""
    port = free_port()
    env = {**os.environ, **contract_env, "HOST": "127.0.0.1", "PORT": str(port), "PYTHONPATH": str(ROOT)}
    log = tmp_path_factory.mktemp("uvicorn") / "serve.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "service"], cwd=log.parent, env=env, stdout=out, stderr=subprocess.STDOUT
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, lambda: process.poll() is None, log)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


def wait_ready(url: str, alive: Callable[[], bool], log: Path, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert alive(), f"the server exited:\n{log.read_text()}"
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    pytest.fail(f"{url} not ready after {timeout_s} s:\n{log.read_text()}")


@pytest.fixture(scope="module", params=["uvicorn", "ray"])
def server(request: pytest.FixtureRequest) -> str:
    """The base URL of `python -m service`, then of the Ray deployment: the contract tests run on both."""
    url: str = request.getfixturevalue(f"{request.param}_url")
    return url


@pytest.fixture
async def client(server: str) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=server, timeout=60) as c:
        yield c


# ---- the v1 contract: tests/service's client-only tests, the same functions ------------------------------


def contract_tests(*modules: Any) -> dict[str, Callable[..., Any]]:
    """The test functions of `modules` whose only fixture is `client` (others are parametrize arguments)."""
    found: dict[str, Callable[..., Any]] = {}
    for module in modules:
        for name, function in vars(module).items():
            if not (name.startswith("test_") and inspect.iscoroutinefunction(function)):
                continue
            parametrized = {
                arg.strip()
                for mark in getattr(function, "pytestmark", [])
                if mark.name == "parametrize"
                for arg in (mark.args[0].split(",") if isinstance(mark.args[0], str) else mark.args[0])
            }
            arguments = set(inspect.signature(function).parameters)
            if "client" in arguments and arguments - parametrized == {"client"}:
                assert name not in found, f"two contract tests named {name}"
                found[name] = function
    return found


CONTRACT = contract_tests(
    tests.service.test_routes,
    tests.service.test_operations,
    tests.service.test_responses,
    tests.service.test_requests,
)
globals().update(CONTRACT)


def test_the_contract_tests_are_collected() -> None:
    assert len(CONTRACT) >= 15, sorted(CONTRACT)


# ---- replicas --------------------------------------------------------------------------------------------


SAMPLE = "/v1/models/tiny/sample"


def replicas_answering(url: str, requests: int = 40) -> Counter[str]:
    """Which replica answered each of `requests` seeded samples, one connection each."""
    seen: Counter[str] = Counter()
    for _ in range(requests):
        response = httpx.post(url + SAMPLE, json={"n": 1, "seed": 1}, timeout=30)
        assert response.status_code == 200, response.text
        seen[response.headers[REPLICA_HEADER]] += 1
    return seen


def test_both_replicas_answer_and_a_seed_gives_the_same_z_on_either(ray_url: str) -> None:
    seen = replicas_answering(ray_url)
    assert len(seen) == REPLICAS, seen

    by_replica: dict[str, list[Any]] = {}
    for _ in range(60):
        response = httpx.post(ray_url + SAMPLE, json={"n": 3, "seed": 1234}, timeout=30)
        by_replica.setdefault(response.headers[REPLICA_HEADER], response.json()["z"])
        if len(by_replica) == REPLICAS:
            break
    assert len(by_replica) == REPLICAS, "one replica answered every request"
    first, second = by_replica.values()
    assert first == second  # the JSON floats, digit for digit
    z = np.asarray(first, dtype=np.float32)
    np.testing.assert_array_equal(z, eps_for(1234, (3, 4)))  # and what a client computes with numpy


# ---- a replica killed under load ------------------------------------------------------------------------


@dataclass
class Tally:
    """What the load saw: first attempts that failed, requests that still failed after the retries."""

    sent: int = 0
    failed_first: int = 0
    failed_finally: int = 0
    retries: int = 0
    replicas: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)


RETRYABLE = {500, 502, 503, 504}
"""Statuses a client retries for an idempotent request (connection errors too)."""


def seeded_request(client: httpx.Client, url: str, tally: Tally, seed: int, attempts: int = 5) -> None:
    """One seeded sample, retried on a connection error or a 5xx (it is idempotent: same seed, same answer)."""
    for attempt in range(attempts):
        try:
            response = client.post(url + SAMPLE, json={"n": 2, "seed": seed})
            outcome = str(response.status_code)
            ok = response.status_code == 200
            if ok:
                z = np.asarray(response.json()["z"], dtype=np.float32)
                np.testing.assert_array_equal(z, eps_for(seed, (2, 4)))
        except httpx.TransportError as exc:
            outcome, ok, response = type(exc).__name__, False, None
        with tally.lock:
            if attempt == 0:
                tally.sent += 1
            else:
                tally.retries += 1
            if ok:
                assert response is not None
                tally.replicas[response.headers[REPLICA_HEADER]] += 1
                return
            tally.errors[outcome] += 1
            if attempt == 0:
                tally.failed_first += 1
        if response is not None and response.status_code not in RETRYABLE:
            break
        time.sleep(0.1 * 2**attempt)
    with tally.lock:
        tally.failed_finally += 1


def steady_load(
    url: str, tally: Tally, stop: threading.Event, clients: int
) -> list[concurrent.futures.Future[None]]:
    pool = concurrent.futures.ThreadPoolExecutor(clients)

    def loop(worker: int) -> None:
        with httpx.Client(timeout=30) as client:
            seed = worker * 1_000_000
            while not stop.is_set():
                seeded_request(client, url, tally, seed)
                seed += 1
                time.sleep(0.02)

    futures = [pool.submit(loop, worker) for worker in range(clients)]
    pool.shutdown(wait=False)
    return futures


def readiness_probe(
    url: str, stop: threading.Event, answers: list[tuple[float, int, str | None, bool]]
) -> None:
    """/readyz every 100 ms on a new connection: (time, status, replica, ready) per answer, -1 for no answer."""
    while not stop.is_set():
        try:
            response = httpx.get(url + "/readyz", timeout=5)
            ready = response.status_code == 200 and response.json()["ready"] is True
            answers.append(
                (time.monotonic(), response.status_code, response.headers.get(REPLICA_HEADER), ready)
            )
        except httpx.TransportError:
            answers.append((time.monotonic(), -1, None, False))
        time.sleep(0.1)


def replica_actor_name(replica: str) -> str:
    return f"SERVE_REPLICA::vae#vae#{replica}"


def running_replicas() -> int:
    from ray import serve

    deployment = serve.status().applications["vae"].deployments["vae"]
    return int(deployment.replica_states.get("RUNNING", 0))


CLIENTS = 4


def test_a_killed_replica_is_replaced_and_retried_requests_all_succeed(ray_url: str) -> None:
    import ray

    tally, stop = Tally(), threading.Event()
    answers: list[tuple[float, int, str | None, bool]] = []
    futures = steady_load(ray_url, tally, stop, CLIENTS)
    probe = threading.Thread(target=readiness_probe, args=(ray_url, stop, answers), daemon=True)
    probe.start()
    try:
        time.sleep(3)
        with tally.lock:
            before = set(tally.replicas)
        assert len(before) == REPLICAS, f"load reached {before} only"
        victim = sorted(before)[0]
        killed_at = time.monotonic()
        ray.kill(ray.get_actor(replica_actor_name(victim), namespace="serve"), no_restart=True)

        deadline = time.monotonic() + 120
        while True:
            with tally.lock:
                replaced = set(tally.replicas) - before
            if replaced and running_replicas() == REPLICAS:
                break
            assert time.monotonic() < deadline, f"no replacement after 120 s: {serve_state()}"
            time.sleep(0.5)
        recovered_at = time.monotonic()
        time.sleep(3)  # steady load on the new pair
    finally:
        stop.set()
        for future in futures:
            future.result(timeout=120)
        probe.join(timeout=10)

    print(
        f"\nkilled replica {victim}: replaced by {sorted(replaced)} in {recovered_at - killed_at:.1f} s; "
        f"{tally.sent} requests, {tally.failed_first} failed first attempts {dict(tally.errors)}, "
        f"{tally.retries} retries, {tally.failed_finally} failed after retries"
    )
    assert tally.failed_finally == 0
    # Only the requests in flight on the killed replica can fail: one per client at most (Ray's ingress
    # retries connection failures itself, so a request sent after the kill goes to the other replica).
    assert tally.failed_first <= CLIENTS, dict(tally.errors)

    # Readiness stays honest: every 200 says ready and comes from a live replica (never the killed one
    # after its death), the survivor keeps answering 200 while it is alone, and the new replica says ready.
    assert all(ready for _, status, _, ready in answers if status == 200)
    after_kill = [(status, replica) for t, status, replica, _ in answers if t > killed_at + 1.0]
    assert (200, victim) not in after_kill, "the killed replica answered /readyz"
    alone = [status for t, status, _, _ in answers if killed_at + 1.0 < t < recovered_at]
    assert not alone or 200 in alone, f"/readyz while one replica was left: {Counter(alone)}"
    assert answered_by(ray_url, replaced), "the new replica never answered /readyz with 200"


def answered_by(url: str, replicas: set[str]) -> bool:
    """Whether /readyz answers 200 from one of `replicas` within 40 tries (new connections)."""
    for _ in range(40):
        response = httpx.get(url + "/readyz", timeout=5)
        if response.status_code == 200 and response.headers.get(REPLICA_HEADER) in replicas:
            return True
    return False


def serve_state() -> Any:
    from ray import serve

    return serve.status().applications.get("vae")


# ---- overload --------------------------------------------------------------------------------------------

SLOW_QUEUE = {"max_ongoing_requests": 1, "max_queued_requests": 1}
CONCURRENT = 12


@pytest.fixture(scope="module")
def overload_url(ray_cluster: None, ray_url: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A second application at /overload: one replica of a slow stand-in model (hidden 2048x2048, so that a
    1024-row sample takes a good part of a second) that runs one request at a time and queues one more."""
    root = tmp_path_factory.mktemp("slow-models")
    standin.write_model(root, "slow", "1", seed=0, hidden=(2048, 2048), latent=4)
    config = launch.load_config(replicas=1, env=settings_env(make_settings(root, max_batch_rows=1024)))
    (app,) = config["applications"]
    app.update(name="overload", route_prefix="/overload")
    app["deployments"][0].update(SLOW_QUEUE)
    config.update(
        applications=[app], http_options={"host": "127.0.0.1", "port": int(ray_url.rsplit(":", 1)[1])}
    )
    launch.deploy(config)
    return ray_url + "/overload"


def test_overload_past_the_queue_is_a_fast_503_and_nothing_hangs(overload_url: str) -> None:
    url = overload_url + "/v1/models/slow/sample?n=1024&seed=1&dtype=uint8"

    def post(_: object = None) -> tuple[int, float]:
        start = time.monotonic()
        response = httpx.post(url, headers={"Accept": "application/x-npy"}, timeout=60)
        return response.status_code, time.monotonic() - start

    assert post()[0] == 200  # warm
    alone = post()[1]
    with concurrent.futures.ThreadPoolExecutor(CONCURRENT) as pool:
        started = time.monotonic()
        results = list(pool.map(post, range(CONCURRENT)))
        total = time.monotonic() - started
    statuses = Counter(status for status, _ in results)
    served = sorted(seconds for status, seconds in results if status == 200)
    rejected = sorted(seconds for status, seconds in results if status == 503)
    print(
        f"\none request alone {alone:.2f} s; {CONCURRENT} at once: {dict(statuses)} in {total:.2f} s; "
        f"503s in {rejected[0]:.2f}-{rejected[-1]:.2f} s, 200s in {served[0]:.2f}-{served[-1]:.2f} s"
    )
    assert set(statuses) <= {200, 503}, statuses
    capacity = SLOW_QUEUE["max_ongoing_requests"] + SLOW_QUEUE["max_queued_requests"]
    assert len(served) >= 1 and len(rejected) >= CONCURRENT - capacity - 1  # one may race a finishing request
    # A rejection does not wait for the queue: the last 503 comes before the last request that was let in.
    assert rejected[-1] < served[-1], (rejected, served)
    assert total < 30
