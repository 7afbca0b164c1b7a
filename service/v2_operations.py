"""The V2 operation table: each VAE operation as a V2 model, its tensors and the call into `service.operations`.

`service.v2` serves these (model map in its docstring); adding an operation is one `V2Operation` in
OPERATIONS.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, Literal, TypeVar

import numpy as np
import numpy.typing as npt

from service import operations
from service.catalog import ServedModel
from service.errors import InvalidInput, check_limit
from service.manifest import Manifest
from service.metrics import Metrics
from service.operations import F32
from service.responses import with_dtype
from service.schemas import (
    DecodeParams,
    EncodeParams,
    PathParams,
    ReconstructParams,
    RequestParams,
    SampleParams,
    ScoreParams,
)
from service.settings import Settings
from service.v2_binary import InputSpec, Signature

P = TypeVar("P", bound=RequestParams)

SERVER_NAME = "vae-serving"
EXTENSIONS = ("binary_tensor_data", "parameters")
"""Triton's names for what is implemented beyond the core protocol (no shared memory, no repository API)."""
PLATFORM = "onnxruntime_onnx"
"""Triton's platform name for ONNX on onnxruntime: each operation runs the model's ONNX graphs there."""
OCTET = "application/octet-stream"

# ---- the operation table ---------------------------------------------------------------------------------

Dim = Literal["batch", "samples", "image", "latent"]
"""A tensor axis: batch and samples vary (-1), image is the manifest's input_shape, latent its latent_dim."""
IMAGES: tuple[Dim, ...] = ("batch", "image")
LATENTS: tuple[Dim, ...] = ("batch", "latent")
INPUT_KINDS: dict[tuple[Dim, ...], Literal["images", "latents"]] = {IMAGES: "images", LATENTS: "latents"}
"""The inputs an operation may take, by their axes, and the v1 validator that checks each (`v2_binary`)."""


@dataclass(frozen=True)
class Tensor:
    """An input or output of a V2 model; its shape follows from the model's manifest."""

    name: str
    dims: tuple[Dim, ...]
    description: str
    datatypes: tuple[str, ...] = ("FP32",)  # inputs: every datatype taken; metadata shows the first

    def shape(self, manifest: Manifest) -> list[int]:
        sizes: dict[Dim, list[int]] = {
            "batch": [-1],
            "samples": [-1],
            "image": list(manifest.input_shape),
            "latent": [manifest.latent_dim],
        }
        return [size for dim in self.dims for size in sizes[dim]]

    @property
    def shape_text(self) -> str:
        text: dict[Dim, str] = {
            "batch": "-1",
            "samples": "-1",
            "image": "*input_shape",
            "latent": "latent_dim",
        }
        return "[" + ", ".join(text[dim] for dim in self.dims) + "]"

    def input_spec(self, manifest: Manifest) -> InputSpec:
        return InputSpec(self.name, INPUT_KINDS[self.dims], tuple(self.shape(manifest)[1:]), self.datatypes)


@dataclass(frozen=True)
class Call(Generic[P]):
    """One checked inference request: what an operation's `run` needs."""

    served: ServedModel
    params: P
    tensors: Mapping[str, F32]
    settings: Settings
    metrics: Metrics
    operation: str

    def count_samples(self, rows: int) -> None:
        self.metrics.count_samples(self.operation, self.served.manifest.name, rows)


@dataclass(frozen=True)
class Result:
    outputs: dict[str, npt.NDArray[Any]]  # every output the operation has, by name
    seed: int | None  # the seed eps was drawn from; None when none was drawn


@dataclass(frozen=True)
class V2Operation(Generic[P]):
    """One operation as a V2 model: its tensors, its parameters (v1's model) and the function that runs it."""

    name: str
    summary: str
    params: type[P]
    inputs: tuple[Tensor, ...]
    outputs: tuple[Tensor, ...]
    run: Callable[[Call[P]], Awaitable[Result]]
    example: dict[str, Any]  # a JSON request for /docs (the fashion-mnist-mlp sizes)

    def __post_init__(self) -> None:
        for tensor in self.inputs:
            if tensor.dims not in INPUT_KINDS:
                raise ValueError(
                    f"{self.name}: input {tensor.name} {tensor.shape_text} is not one a validator reads"
                )

    def signature(self, model: str, manifest: Manifest, max_batch: int) -> Signature:
        return Signature(
            model=model,
            inputs=tuple(tensor.input_spec(manifest) for tensor in self.inputs),
            outputs=tuple(tensor.name for tensor in self.outputs),
            params=self.params,
            value_range=manifest.value_range,
            max_batch=max_batch,
        )


async def _encode(call: Call[EncodeParams]) -> Result:
    x, samples = call.tensors["images"], call.params.samples
    rows = x.shape[0] * samples
    check_limit(rows, call.settings.max_samples, "samples", "MAX_SAMPLES", "images x samples")
    seed = operations.seed_or_draw(call.params.seed)
    encoding = await operations.encode(call.served, x, samples, operations.make_rng(seed))
    call.count_samples(rows)
    # samples 0 draws no z: an empty [batch, 0, L] keeps the output's shape the metadata announces.
    z = encoding.z if encoding.z is not None else np.empty((len(x), 0, call.served.latent_dim), np.float32)
    return Result({"mu": encoding.mu, "logvar": encoding.logvar, "sigma": encoding.sigma, "z": z}, seed)


async def _sample(call: Call[SampleParams]) -> Result:
    params = call.params
    check_limit(params.n, call.settings.max_samples, "n", "MAX_SAMPLES", "n")
    seed = operations.seed_or_draw(params.seed)
    result = await operations.sample(call.served, params.n, params.temperature, operations.make_rng(seed))
    call.count_samples(params.n)
    return Result({"samples": with_dtype(result.images, params.dtype), "z": result.z}, seed)


async def _reconstruct(call: Call[ReconstructParams]) -> Result:
    x, params = call.tensors["images"], call.params
    seed: int | None = None
    rng: np.random.Generator | None = None
    if params.mode == "sample":  # mode mean draws no eps: no seed to draw or return
        seed = operations.seed_or_draw(params.seed)
        rng = operations.make_rng(seed)
        call.count_samples(len(x))
    result = await operations.reconstruct(call.served, x, params.mode, rng)
    images = with_dtype(result.images, params.dtype)
    return Result({"reconstructions": images, "z": result.z, "error": result.error}, seed)


async def _decode(call: Call[DecodeParams]) -> Result:
    images = await operations.decode(call.served, call.tensors["z"])
    return Result({"samples": with_dtype(images, call.params.dtype)}, None)


async def _score(call: Call[ScoreParams]) -> Result:
    x, k = call.tensors["images"], call.params.k
    rows = x.shape[0] * k
    check_limit(rows, call.settings.max_samples, "k", "MAX_SAMPLES", "images x k")
    seed = operations.seed_or_draw(call.params.seed)
    manifest = call.served.manifest
    likelihood, std = operations.likelihood_of(manifest)
    background = call.served.background if manifest.anomaly is not None else None
    result = await operations.score(call.served, x, k, operations.make_rng(seed), likelihood, std, background)
    call.count_samples(rows)
    bounds = result.bounds
    # no background model: the anomaly outputs keep their shapes, NaN scores that flag nothing
    anomaly = np.full(len(x), np.nan) if result.anomaly is None else result.anomaly
    threshold = np.nan if manifest.anomaly is None else manifest.anomaly.threshold
    outputs = {name: getattr(bounds, name) for name in ("elbo", "iwae", "kl", "recon_error")}
    outputs |= {"anomaly_score": anomaly, "anomaly_threshold": np.full(len(x), threshold)}
    return Result(
        {name: value.astype(np.float32) for name, value in outputs.items()}
        | {"is_anomaly": anomaly > threshold},
        seed,
    )


async def _interpolate(call: Call[PathParams]) -> Result:
    z, params = call.tensors["z"], call.params
    if len(z) != 2:
        raise InvalidInput(f"expected exactly 2 latent vectors (the endpoints), got {len(z)}", field="z")
    check_limit(params.steps, call.settings.max_batch, "steps", "MAX_BATCH", "steps")
    result = await operations.interpolate(call.served, z, params.steps, params.method, latent=True)
    return Result({"images": with_dtype(result.images, params.dtype), "z": result.z, "t": result.t}, None)


IMAGE_IN = Tensor(
    "images",
    IMAGES,
    "Images: FP32 values in the model's value_range ([0, 1]), or UINT8 pixels 0-255 (divided by 255).",
    ("FP32", "UINT8"),
)
IMAGE_OUT = "Images; UINT8 0-255 with parameter dtype uint8."
EXAMPLE_IMAGES = {"name": "images", "datatype": "UINT8", "shape": [1, 1, 28, 28], "data": [0] * 784}

OPERATIONS: dict[str, V2Operation[Any]] = {
    op.name: op
    for op in (
        V2Operation(
            "encode",
            "Posterior of each image: mu, logvar, sigma, and z = mu + sigma * eps (samples per image).",
            EncodeParams,
            (IMAGE_IN,),
            (
                Tensor("mu", LATENTS, "Posterior means."),
                Tensor("logvar", LATENTS, "Posterior log-variances."),
                Tensor("sigma", LATENTS, "exp(logvar / 2)."),
                Tensor(
                    "z", ("batch", "samples", "latent"), "mu + sigma * eps; [batch, 0, L] when samples is 0."
                ),
            ),
            _encode,
            {"inputs": [EXAMPLE_IMAGES], "parameters": {"samples": 2, "seed": 1234}},
        ),
        V2Operation(
            "sample",
            "Generate images: decode z = temperature * eps, eps ~ N(0, I) drawn on the server.",
            SampleParams,
            (),
            (Tensor("samples", IMAGES, IMAGE_OUT), Tensor("z", LATENTS, "temperature * eps.")),
            _sample,
            {"inputs": [], "parameters": {"n": 4, "seed": 1234}},
        ),
        V2Operation(
            "reconstruct",
            "Encode and decode each image; mode mean decodes mu, mode sample decodes mu + sigma * eps.",
            ReconstructParams,
            (IMAGE_IN,),
            (
                Tensor("reconstructions", IMAGES, IMAGE_OUT),
                Tensor("z", LATENTS, "The latents decoded: mu, or mu + sigma * eps."),
                Tensor("error", ("batch",), "Mean squared error per image."),
            ),
            _reconstruct,
            {"inputs": [EXAMPLE_IMAGES], "parameters": {"mode": "sample", "seed": 7}},
        ),
        V2Operation(
            "decode",
            "Decode latent vectors into images.",
            DecodeParams,
            (Tensor("z", LATENTS, "Latent vectors, finite, within [-1000, 1000]."),),
            (Tensor("samples", IMAGES, IMAGE_OUT),),
            _decode,
            {"inputs": [{"name": "z", "datatype": "FP32", "shape": [1, 32], "data": [0.0] * 32}]},
        ),
        V2Operation(
            "score",
            "Likelihood bounds of each image with k importance samples, and the anomaly score against the "
            "model's background model (NaN, never flagged, when it has none).",
            ScoreParams,
            (IMAGE_IN,),
            (
                Tensor("elbo", ("batch",), "Evidence lower bound on log p(x), analytic KL (nats)."),
                Tensor("iwae", ("batch",), "The k-sample importance-weighted bound on log p(x) (nats)."),
                Tensor("kl", ("batch",), "KL(q(z|x) || N(0, I)) (nats)."),
                Tensor("recon_error", ("batch",), "Mean squared error of decode(mu) per image."),
                Tensor(
                    "anomaly_score", ("batch",), "log p_background(x) - log p_model(x) (nats); NaN: none."
                ),
                Tensor("anomaly_threshold", ("batch",), "The threshold (1% of validation images above it)."),
                Tensor("is_anomaly", ("batch",), "anomaly_score > anomaly_threshold.", ("BOOL",)),
            ),
            _score,
            {"inputs": [EXAMPLE_IMAGES], "parameters": {"k": 100, "seed": 1234}},
        ),
        V2Operation(
            "interpolate",
            "Decode steps points between two latent vectors (encode images first for their means), linear or "
            "spherical; the first and last points are exactly the endpoints.",
            PathParams,
            (Tensor("z", LATENTS, "The two endpoints [2, latent_dim]."),),
            (
                Tensor("images", IMAGES, IMAGE_OUT),
                Tensor("z", LATENTS, "The latents decoded."),
                Tensor("t", ("batch",), "Position of each point on the path, 0 to 1."),
            ),
            _interpolate,
            {
                "inputs": [
                    {"name": "z", "datatype": "FP32", "shape": [2, 32], "data": [0.0] * 32 + [1.0] * 32}
                ],
                "parameters": {"steps": 8, "method": "slerp"},
            },
        ),
    )
}
"""Operation name -> its V2 model: the whole map, read by the routes, the metadata and /docs."""
