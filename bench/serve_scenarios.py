"""What the serving benchmark measures: the requests, the servers that answer them, the model, the ceiling.

A `Scenario` is one request (its body, how many rows it returns, the graph and batch it runs); `SERVERS`
says which server answers which. `Ceiling` runs the same graphs in this process: the rate no server beats.
"""

from __future__ import annotations

import gzip
import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from service.manifest import DECODER_INPUT, ENCODER_INPUT, MANIFEST_NAME, Manifest

FASHION_TEST_IMAGES = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")
NPY = "application/x-npy"
REQUESTS = ("sample1", "sample256-json", "sample256-u8", "sample256-npy", "encode64")
"""The requests --requests chooses from (keys of `scenarios`, which also has the no-op floor's "noop")."""


@dataclass(frozen=True)
class Scenario:
    key: str
    label: str
    endpoint: str  # the path after /v1/models/{model}/
    body: bytes
    accept: str | None
    rows: int  # samples (sample) or images (encode) per request
    graph: str  # the graph it runs, for the ceiling
    batch: int  # the batch that graph sees in-process, for the ceiling


@dataclass(frozen=True)
class ServerSpec:
    key: str
    label: str
    scenarios: tuple[str, ...]


SERVERS = {
    "service": ServerSpec("service", "service, batching on", REQUESTS),
    "service-nobatch": ServerSpec("service-nobatch", "service, batching off", REQUESTS),
    "naive": ServerSpec("naive", "naive peer", ("sample1", "sample256-json", "encode64")),
    "noop": ServerSpec("noop", "no-op floor", ("noop",)),
}


def find_model(model_root: Path, name: str | None) -> Path | None:
    """The newest version directory of `name` (or of the first name) under MODEL_DIR, if any."""
    names = sorted(p for p in model_root.glob("*") if p.is_dir() and (name is None or p.name == name))
    for name_dir in names:
        versions = [p for p in name_dir.iterdir() if (p / MANIFEST_NAME).is_file()]
        if versions:
            return max(
                versions, key=lambda p: (p.name.isdecimal(), int(p.name) if p.name.isdecimal() else 0, p.name)
            )
    return None


def fashion_test_images(count: int, size: int) -> np.ndarray:
    """`count` Fashion-MNIST test images as [count, size] floats in [0, 1] (random if the set is absent)."""
    if FASHION_TEST_IMAGES.is_file():
        with gzip.open(FASHION_TEST_IMAGES) as f:
            raw = np.frombuffer(f.read(), np.uint8, offset=16)  # IDX header: magic, count, rows, cols
        if raw.size >= count * size:
            return raw[: count * size].reshape(count, size) / 255.0
    return np.random.default_rng(0).random((count, size))


def scenarios(input_size: int) -> dict[str, Scenario]:
    """Every request of REQUESTS, and the no-op floor's, for a model of `input_size` values per image."""
    images = fashion_test_images(64, input_size).round(4).tolist()
    sample1 = json.dumps({"n": 1, "seed": 1}).encode()
    sample256 = json.dumps({"n": 256, "seed": 1}).encode()
    sample256_u8 = json.dumps({"n": 256, "seed": 1, "dtype": "uint8"}).encode()
    return {
        "sample1": Scenario("sample1", "sample n=1", "sample", sample1, None, 1, "decoder", 1),
        "sample256-json": Scenario(
            "sample256-json", "sample n=256 JSON", "sample", sample256, None, 256, "decoder", 256
        ),
        "sample256-u8": Scenario(
            "sample256-u8", "sample n=256 JSON uint8", "sample", sample256_u8, None, 256, "decoder", 256
        ),
        "sample256-npy": Scenario(
            "sample256-npy", "sample n=256 .npy", "sample", sample256, NPY, 256, "decoder", 256
        ),
        "encode64": Scenario(
            "encode64",
            "encode 64 JSON",
            "encode",
            json.dumps({"inputs": images}).encode(),
            None,
            64,
            "encoder",
            64,
        ),
        "noop": Scenario("noop", "no-op (sample n=1 body)", "sample", sample1, None, 1, "decoder", 1),
    }


@contextmanager
def pinned_to(cpu: int | None) -> Iterator[None]:
    """This process on `cpu` alone for the block (anywhere, if None), as the servers are under `taskset`."""
    if cpu is None:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


class Ceiling:
    """The same ONNX graphs run in a loop in this process, on the server's core, with the servers' session
    options and onnxruntime thread counts. --mmap-threshold does not reach it: glibc reads
    MALLOC_MMAP_THRESHOLD_ at process start, and this process has started already."""

    def __init__(
        self,
        version_dir: Path,
        manifest: Manifest,
        graphs: set[str],
        cpu: int | None,
        intra_op_threads: int,
        inter_op_threads: int,
    ) -> None:
        import onnxruntime as ort

        from service.runtime import session_options

        self.cpu = cpu
        self.inputs = {
            "decoder": (DECODER_INPUT, (manifest.latent_dim,)),
            "encoder": (ENCODER_INPUT, manifest.input_shape),
        }
        files = {"decoder": manifest.files.decoder.path, "encoder": manifest.files.encoder.path}
        options = session_options(intra_op_threads, inter_op_threads)
        with pinned_to(cpu):
            self.sessions = {
                graph: ort.InferenceSession(
                    str(version_dir / files[graph]), options, providers=["CPUExecutionProvider"]
                )
                for graph in graphs
            }

    def rate(self, graph: str, batch: int, seconds: float) -> float:
        """Rows/s of `graph` at `batch` rows per run, over about `seconds`."""
        name, dims = self.inputs[graph]
        feed = {name: np.random.default_rng(0).random((batch, *dims), dtype=np.float32)}
        session = self.sessions[graph]
        with pinned_to(self.cpu):
            for _ in range(10):
                session.run(None, feed)
            runs, began = 0, time.perf_counter()
            while (elapsed := time.perf_counter() - began) < seconds:
                session.run(None, feed)
                runs += 1
        return runs * batch / elapsed
