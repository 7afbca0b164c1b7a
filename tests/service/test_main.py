"""The service as deployed: the one test against a real uvicorn process, and the trained model if present."""

from __future__ import annotations

import gzip
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from service.manifest import read_manifest
from tests.service.conftest import f32, serve

ROOT = Path(__file__).resolve().parents[2]
REAL_MODEL = ROOT / "models" / "fashion-mnist-mlp" / "1"
TEST_IMAGES = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")


class _Output:
    """Collects a process's output on a thread so the test can wait for a line without blocking forever."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        self.lines: list[str] = []
        assert process.stdout is not None
        self._thread = threading.Thread(target=self._read, args=(process.stdout,), daemon=True)
        self._thread.start()

    def _read(self, stream: object) -> None:
        for line in stream:  # type: ignore[attr-defined]
            self.lines.append(line)

    def wait_for(
        self, pattern: str, process: subprocess.Popen[str], timeout: float, joined: bool = False
    ) -> re.Match[str]:
        """The first line matching `pattern` (or, `joined`, the first match in the whole output so far)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in [self.text] if joined else self.lines:
                if match := re.search(pattern, line, re.DOTALL):
                    return match
            if process.poll() is not None:
                break
            time.sleep(0.05)
        pytest.fail(f"no line matching {pattern!r}; output:\n{self.text}")

    def join(self) -> None:
        self._thread.join(timeout=10)

    @property
    def text(self) -> str:
        return "".join(self.lines)


def _sample_requests_counted(client: httpx.Client) -> float:
    """vae_requests_total over every label set with endpoint="sample", from one scrape of /metrics."""
    families = text_string_to_metric_families(client.get("/metrics").text)
    return sum(
        sample.value
        for family in families
        if family.name == "vae_requests"
        for sample in family.samples
        if sample.name == "vae_requests_total" and sample.labels.get("endpoint") == "sample"
    )


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2])
def test_uvicorn_process_serves_over_tcp_and_stops_cleanly_on_sigterm(
    model_dir: Path, tmp_path: Path, workers: int
) -> None:
    """With 2 workers, /metrics counts both workers' requests, whichever worker answers the scrape."""
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "MODEL_DIR": str(model_dir),
        "HOST": "127.0.0.1",
        "PORT": "0",  # the kernel picks a free port; uvicorn logs which
        "WORKERS": str(workers),
        "INTRA_OP_THREADS": "1",
        "LOG_LEVEL": "info",
        "DRAIN_SECONDS": "0.5",  # SIGTERM drains this long (service.server) before the shutdown
    }
    with subprocess.Popen(
        [sys.executable, "-m", "service"],
        cwd=tmp_path,  # no stray .env
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group: a failing test stops the workers too
    ) as process:
        output = _Output(process)
        try:
            port = int(
                output.wait_for(r"Uvicorn running on http://127\.0\.0\.1:(\d+)", process, timeout=60)[1]
            )
            # with several workers the parent binds the port and each worker listens once it has started
            output.wait_for(
                f"(Application startup complete.*){{{workers}}}", process, timeout=60, joined=True
            )
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
                assert client.get("/healthz").json() == {"status": "ok"}
                assert client.get("/readyz").status_code == 200
                sampled = client.post("/v1/models/tiny/sample", json={"n": 2, "seed": 1})
                assert sampled.status_code == 200
                assert f32(sampled.json()["samples"]).shape == (2, 1, 28, 28)
                assert client.post("/v1/models/tiny/sample", json={"n": 0}).status_code == 422
            if workers > 1:  # a new connection per request, so that the kernel spreads them over the workers
                url = f"http://127.0.0.1:{port}"
                with httpx.Client(
                    base_url=url, timeout=10, limits=httpx.Limits(max_keepalive_connections=0)
                ) as c:
                    before = _sample_requests_counted(c)
                    for seed in range(20):
                        assert (
                            c.post("/v1/models/tiny/sample", json={"n": 1, "seed": seed}).status_code == 200
                        )
                    assert [_sample_requests_counted(c) - before for _ in range(6)] == [20.0] * 6
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=30) == 0, output.text
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
            output.join()
    assert "model tiny/10 loaded" in output.text
    assert "Application shutdown complete" in output.text
    if workers > 1:
        metrics_dir = re.search(r"metrics of 2 workers aggregated in (\S+)", output.text)
        assert metrics_dir is not None and not Path(metrics_dir[1]).exists()  # removed at exit


def _test_images(count: int) -> np.ndarray:
    """The first `count` Fashion-MNIST test images as [count, 1, 28, 28] float32 in [0, 1]."""
    with gzip.open(TEST_IMAGES, "rb") as f:
        data = np.frombuffer(f.read(16 + count * 784)[16:], dtype=np.uint8)
    return (data.reshape(count, 1, 28, 28) / np.float32(255)).astype(np.float32)


@pytest.mark.anyio
async def test_the_trained_fashion_mnist_model(anyio_backend: str) -> None:
    if not (REAL_MODEL / "model.json").exists():
        pytest.skip(f"{REAL_MODEL}/model.json is absent: train and export it first (the training half)")
    if not TEST_IMAGES.exists():
        pytest.skip(f"{TEST_IMAGES} is absent (Debian package dataset-fashion-mnist)")
    manifest = read_manifest(REAL_MODEL)
    images = _test_images(256)
    async with serve(ROOT / "models", max_batch=256) as client:
        info = (await client.get("/v1/models/fashion-mnist-mlp/versions/1")).json()
        assert info["latent_dim"] == manifest.latent_dim
        sampled = (await client.post("/v1/models/fashion-mnist-mlp/versions/1/sample", json={"n": 8})).json()
        assert f32(sampled["samples"]).shape == (8, *manifest.input_shape)
        recon = await client.post(
            "/v1/models/fashion-mnist-mlp/versions/1/reconstruct", json={"inputs": images.tolist()}
        )
        assert recon.status_code == 200
    # The served model reconstructs test images about as well as its manifest says it did at export.
    error = float(np.mean(recon.json()["error"]))
    assert error < 1.5 * manifest.metrics.recon_error + 1e-3, (error, manifest.metrics.recon_error)
