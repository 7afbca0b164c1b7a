"""What the serving benchmark measures: the requests, the servers that answer them, the model, the ceiling.

A `Scenario` is one request (its path, headers and body, how many rows it returns, the graph and batch it
runs); `SERVERS` says which server answers which. `Ceiling` runs the same graphs in this process: the rate
no server beats.

The V2 (Open Inference Protocol) requests go to `/v2/models/NAME.OPERATION/infer`, as JSON or with
Triton's binary tensor data extension (`v2_binary_body`): the JSON inference request, then the raw
little-endian tensor bytes, the JSON's length in `Inference-Header-Content-Length`
(`service/v2_binary.py`). Each is paired with the v1 request that does the same work (`V2_PAIRS`).
"""

from __future__ import annotations

import gzip
import io
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
JSON = "application/json"
NPY = "application/x-npy"
OCTET = "application/octet-stream"
HEADER_LENGTH = "Inference-Header-Content-Length"
"""Triton's binary tensor data extension: the length of the JSON part of a body that binary data follow."""
V1_REQUESTS = ("sample1", "sample256-json", "sample256-u8", "sample256-npy", "encode64")
"""Issue 5's requests: each is also measured with batching off."""
V2_REQUESTS = ("encode256-npy", "v2-sample1-json", "v2-sample256-bin", "v2-encode256-bin")
"""The V2 requests, and encode256-npy: the v1 request that does v2-encode256-bin's work."""
REQUESTS = V1_REQUESTS + V2_REQUESTS
"""The requests --requests chooses from (keys of `scenarios`, which also has the no-op floor's "noop")."""
V2_PAIRS = (
    ("sample1", "v2-sample1-json"),
    ("sample256-npy", "v2-sample256-bin"),
    ("encode256-npy", "v2-encode256-bin"),
)
"""(v1 request, V2 request doing the same work), printed side by side in the report."""


@dataclass(frozen=True)
class Scenario:
    key: str
    label: str
    endpoint: str  # the operation: sample or encode
    body: bytes
    accept: str | None
    rows: int  # samples (sample) or images (encode) per request
    graph: str  # the graph it runs, for the ceiling
    batch: int  # the batch that graph sees in-process, for the ceiling
    protocol: str = "v1"  # v1: POST /v1/models/NAME/OPERATION; v2: POST /v2/models/NAME.OPERATION/infer
    content_type: str = JSON
    extra_headers: tuple[tuple[str, str], ...] = ()  # beyond Content-Type and Accept
    binary_output: bool = False  # V2: the rows output comes as binary tensor data

    def path(self, model: str) -> str:
        """The request's path on a server that serves `model`."""
        if self.protocol == "v2":
            return f"/v2/models/{model}.{self.endpoint}/infer"
        return f"/v1/models/{model}/{self.endpoint}"

    @property
    def headers(self) -> dict[str, str]:
        """Every request header the benchmark sets (wrk adds Host and Content-Length)."""
        accept = {"Accept": self.accept} if self.accept else {}
        return {"Content-Type": self.content_type, **accept, **dict(self.extra_headers)}


@dataclass(frozen=True)
class ServerSpec:
    key: str
    label: str
    scenarios: tuple[str, ...]


SERVERS = {
    "service": ServerSpec("service", "service, batching on", REQUESTS),
    "service-nobatch": ServerSpec("service-nobatch", "service, batching off", V1_REQUESTS),
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


def fashion_test_pixels(count: int, size: int) -> np.ndarray:
    """`count` Fashion-MNIST test images as [count, size] uint8 pixels (random if the set is absent)."""
    if FASHION_TEST_IMAGES.is_file():
        with gzip.open(FASHION_TEST_IMAGES) as f:
            raw = np.frombuffer(f.read(), np.uint8, offset=16)
        if raw.size >= count * size:
            return raw[: count * size].reshape(count, size).copy()
    return np.random.default_rng(0).integers(0, 256, (count, size), dtype=np.uint8)


def npy_file(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def v2_json_body(parameters: dict[str, object], inputs: list[dict[str, object]] | None = None) -> bytes:
    """A V2 inference request in JSON: `inputs` (JSON tensors) and `parameters`; every output as JSON."""
    return json.dumps({"inputs": inputs or [], "parameters": parameters}).encode()


def v2_binary_body(
    inputs: dict[str, tuple[str, np.ndarray]], outputs: list[str], parameters: dict[str, object]
) -> tuple[bytes, int]:
    """A V2 inference request with the binary tensor data extension: `inputs` as name -> (datatype, array),
    sent as raw little-endian row-major bytes after the JSON in their order; `outputs` asked for as binary
    data. Returns the body and the JSON's length (the Inference-Header-Content-Length header)."""
    tensors, chunks = [], []
    for name, (datatype, array) in inputs.items():
        data = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
        tensors.append(
            {
                "name": name,
                "datatype": datatype,
                "shape": list(array.shape),
                "parameters": {"binary_data_size": len(data)},
            }
        )
        chunks.append(data)
    request = {
        "inputs": tensors,
        "outputs": [{"name": name, "parameters": {"binary_data": True}} for name in outputs],
        "parameters": parameters,
    }
    header = json.dumps(request).encode()
    return b"".join([header, *chunks]), len(header)


def v2_binary_scenario(
    key: str,
    label: str,
    endpoint: str,
    inputs: dict[str, tuple[str, np.ndarray]],
    outputs: list[str],
    parameters: dict[str, object],
    shape: tuple[int, str, int],
) -> Scenario:
    """A V2 request with binary tensor data both ways; `shape` is (rows, graph, batch)."""
    body, header_length = v2_binary_body(inputs, outputs, parameters)
    rows, graph, batch = shape
    return Scenario(
        key,
        label,
        endpoint,
        body,
        None,
        rows,
        graph,
        batch,
        protocol="v2",
        content_type=OCTET,
        extra_headers=((HEADER_LENGTH, str(header_length)),),
        binary_output=True,
    )


def scenarios(input_size: int, input_shape: tuple[int, ...] | None = None) -> dict[str, Scenario]:
    """Every request of REQUESTS, and the no-op floor's, for a model of `input_size` values per image
    (`input_shape`, the manifest's, for the V2 images tensor; default [1, input_size])."""
    shape = tuple(input_shape) if input_shape else (1, input_size)
    images = fashion_test_images(64, input_size).round(4).tolist()
    pixels256 = fashion_test_pixels(256, input_size).reshape(256, *shape)
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
        "encode256-npy": Scenario(
            "encode256-npy",
            "encode 256 uint8 .npy",
            "encode",
            npy_file(pixels256),
            NPY,
            256,
            "encoder",
            256,
            content_type=NPY,
        ),
        "v2-sample1-json": Scenario(
            "v2-sample1-json",
            "V2 sample n=1 JSON",
            "sample",
            v2_json_body({"n": 1, "seed": 1}),
            None,
            1,
            "decoder",
            1,
            protocol="v2",
        ),
        "v2-sample256-bin": v2_binary_scenario(
            "v2-sample256-bin",
            "V2 sample n=256 binary",
            "sample",
            {},
            ["samples"],
            {"n": 256, "seed": 1},
            (256, "decoder", 256),
        ),
        "v2-encode256-bin": v2_binary_scenario(
            "v2-encode256-bin",
            "V2 encode 256 UINT8 binary",
            "encode",
            {"images": ("UINT8", pixels256)},
            ["mu", "logvar", "sigma", "z"],
            {},
            (256, "encoder", 256),
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
