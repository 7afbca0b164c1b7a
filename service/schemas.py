"""The pydantic wire models: request parameters, and the request and response bodies as OpenAPI shows them.

The `*Params` models validate an operation's small fields (seed, n, mode, ...) at run time
(`service.requests`). The `*Request` / `*Response` models add the bulk arrays for the OpenAPI document only:
those arrays are read by `service.requests` and written by `service.responses` straight from numpy.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

SEED_MAX = 2**63 - 1
EXAMPLE_PNG = "iVBORw0KGgoAAAANSUhEUgAAABwAAAAcCAAAAABXZoBIAAAAHklEQVR42mNgGGSAEUqfQBG1gFBM+HSOSo4gyYEAAMzjASauBQeoAAAAAElFTkSuQmCC"
"""A 28 x 28 grayscale PNG (a bright rectangle), small enough to try from /docs."""

ImageDtype = Literal["float32", "uint8"]
Seed = Annotated[
    int | None,
    Field(
        ge=0,
        le=SEED_MAX,
        description="Seed of the request's NumPy PCG64 generator; omitted or null: drawn from OS entropy "
        "(below 2**53) and returned.",
        examples=[1234],
    ),
]
DtypeField = Annotated[
    ImageDtype,
    Field(description="Image values in the response: float32 in [0, 1], or uint8 0-255 (round(x * 255))."),
]


class RequestParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class EncodeParams(RequestParams):
    samples: int = Field(
        0,
        ge=0,
        description="z draws per input; 0 returns only mu, logvar and sigma. inputs x samples <= MAX_SAMPLES.",
    )
    seed: Seed = None


class SampleParams(RequestParams):
    n: int = Field(16, ge=1, description="Number of images to generate (at most MAX_SAMPLES).")
    temperature: float = Field(
        1.0,
        ge=0.0,
        le=10.0,
        allow_inf_nan=False,
        description="Scale of z: z = temperature * eps, eps ~ N(0, I).",
    )
    seed: Seed = None
    dtype: DtypeField = "float32"


class ReconstructParams(RequestParams):
    mode: Literal["mean", "sample"] = Field(
        "mean", description="mean: decode mu; sample: decode z = mu + sigma * eps with server-side eps."
    )
    seed: Seed = Field(
        None,
        description="Mode sample: the seed of the request's NumPy PCG64 generator; omitted or null: drawn "
        "from OS entropy (below 2**53) and returned. Mode mean draws no eps and ignores it.",
    )
    dtype: DtypeField = "float32"


class DecodeParams(RequestParams):
    dtype: DtypeField = "float32"


class ScoreParams(RequestParams):
    k: int = Field(
        100,
        ge=1,
        description="Importance samples per input: z_i = mu + sigma * eps_i, i = 1..k. inputs x k <= MAX_SAMPLES.",
    )
    seed: Seed = None


class PathParams(RequestParams):
    """interpolate's parameters as V2 takes them (its endpoints are always latents there)."""

    steps: int = Field(
        8, ge=2, description="Points on the path, both endpoints included (at most MAX_BATCH)."
    )
    method: Literal["linear", "slerp"] = Field(
        "linear",
        description="linear: (1 - t) a + t b; slerp: along the great circle through a and b (keeps the norm "
        "typical for draws from the prior).",
    )
    dtype: DtypeField = "float32"


class InterpolateParams(PathParams):
    latent: bool = Field(
        False,
        description=".npy bodies only: true when the array holds two latent vectors [2, latent_dim], false "
        "for two images (JSON bodies say which by their field: inputs or z).",
    )


InputsField = Annotated[
    list[str | list[Any]],
    Field(
        min_length=1,
        description="Images (at most MAX_BATCH): each a list of numbers in [0, 1], flat or in the model's "
        "input_shape, or a base64 8-bit grayscale PNG.",
        examples=[[EXAMPLE_PNG]],
    ),
]
LatentsField = Annotated[
    list[list[float]],
    Field(
        min_length=1,
        description="Latent vectors [batch, latent_dim] (batch at most MAX_BATCH; latent_dim from "
        "GET /v1/models/{model}), numbers in [-1000, 1000].",
        examples=[[[0.0] * 32]],
    ),
]


class EncodeRequest(EncodeParams):
    inputs: InputsField


class SampleRequest(SampleParams):
    pass


class ReconstructRequest(ReconstructParams):
    inputs: InputsField


class DecodeRequest(DecodeParams):
    z: LatentsField


class ScoreRequest(ScoreParams):
    inputs: InputsField


class InterpolateRequest(InterpolateParams):
    inputs: list[str | list[Any]] | None = Field(
        None,
        min_length=2,
        max_length=2,
        description="Two images (forms as for encode): the path runs between their posterior means. "
        "Give inputs or z, not both.",
        examples=[[EXAMPLE_PNG, EXAMPLE_PNG]],
    )
    z: list[list[float]] | None = Field(
        None,
        min_length=2,
        max_length=2,
        description="Two latent vectors [2, latent_dim], numbers in [-1000, 1000]. Give inputs or z.",
    )


Matrix = list[list[float]]


class EncodeResponse(BaseModel):
    mu: Matrix = Field(description="Posterior means [batch, latent_dim].")
    logvar: Matrix = Field(description="Posterior log-variances [batch, latent_dim].")
    sigma: Matrix = Field(description="exp(logvar / 2) [batch, latent_dim].")
    z: list[Matrix] | None = Field(
        None, description="mu + sigma * eps [batch, samples, latent_dim]; present only when samples > 0."
    )
    seed: int = Field(description="The seed eps was drawn from.")


class SampleResponse(BaseModel):
    samples: list[Any] = Field(description="Decoded images [n, *input_shape].")
    z: Matrix = Field(description="temperature * eps [n, latent_dim].")
    seed: int


class ReconstructResponse(BaseModel):
    reconstructions: list[Any] = Field(description="Decoded images [batch, *input_shape].")
    z: Matrix = Field(description="The latents decoded: mu (mode mean) or mu + sigma * eps (mode sample).")
    seed: int | None = Field(None, description="The seed eps was drawn from; absent in mode mean (no eps).")
    error: list[float] = Field(description="Mean squared error per image over all pixels.")


class DecodeResponse(BaseModel):
    samples: list[Any] = Field(description="Decoded images [batch, *input_shape].")


class AnomalyResult(BaseModel):
    score: float = Field(
        description="log p_background(x) - log p_model(x) in nats (ELBOs): high means unlike the training data."
    )
    threshold: float = Field(
        description="Scores above it are flagged: 1% of validation images are (the manifest's threshold)."
    )
    is_anomaly: bool = Field(description="score > threshold.")


class ScoreItem(BaseModel):
    elbo: float = Field(
        description="Evidence lower bound on log p(x), analytic KL (nats; higher: more typical)."
    )
    iwae: float = Field(
        description="The k-sample importance-weighted bound on log p(x) (nats), >= elbo on average."
    )
    kl: float = Field(description="KL(q(z|x) || N(0, I)) in closed form (nats).")
    recon_error: float = Field(
        description="Mean squared error of decode(mu) against the input, over all pixels."
    )
    anomaly: AnomalyResult | None = Field(
        None,
        description="Absent when the model version has no background model (GET the model: anomaly null).",
    )


class ScoreResponse(BaseModel):
    scores: list[ScoreItem] = Field(description="One per input, in order.")
    k: int
    seed: int = Field(description="The seed eps was drawn from.")


class InterpolateResponse(BaseModel):
    images: list[Any] = Field(
        description="Decoded points [steps, *input_shape], from the first endpoint to the last."
    )
    z: Matrix = Field(
        description="The latents decoded [steps, latent_dim]; the first and last are the endpoints."
    )
    t: list[float] = Field(description="Position of each point on the path, 0 to 1.")


class AnomalyInfo(BaseModel):
    threshold: float
    false_positive_rate: float = Field(description="Share of validation images flagged at the threshold.")
    k: int = Field(description="Importance samples the figures were measured with.")
    test_images: int
    auroc: dict[str, dict[str, float]] = Field(
        description="Per out-of-distribution set: AUROC of -elbo, -iwae and the anomaly score against held-out "
        "test images.",
        examples=[{"mnist": {"elbo": 0.54, "iwae": 0.43, "anomaly": 0.9}}],
    )


class ModelInfo(BaseModel):
    name: str
    version: str
    versions: list[str] = Field(description="Every loaded version, oldest first.")
    input_shape: list[int]
    value_range: list[float] = Field(min_length=2, max_length=2, description="[low, high] of input values.")
    latent_dim: int
    likelihood: str
    architecture: str
    dataset: str
    created: str
    metrics: dict[str, float | int]
    providers: list[str] = Field(
        description="onnxruntime execution providers the encoder's and decoder's sessions use, best first."
    )
    graph_providers: dict[str, list[str]] = Field(
        description="Per graph (encoder, decoder): the providers its session uses, best first.",
        examples=[{"encoder": ["CPUExecutionProvider"], "decoder": ["CPUExecutionProvider"]}],
    )
    anomaly: AnomalyInfo | None = Field(
        None,
        description="The anomaly score's threshold and measured AUROCs; null: score answers without one.",
    )
    unit_variance: list[float] | None = Field(
        None,
        description="Variance of each latent unit's posterior mean over validation images (a unit is active "
        "above 0.01); null when not recorded.",
    )


class NotReadyItem(BaseModel):
    """A version under MODEL_DIR that is not served as its files are now, and why."""

    model: str = Field(examples=["fashion-mnist-mlp"])
    version: str = Field(examples=["2"])
    path: str = Field(
        description="The version's directory, relative to MODEL_DIR.", examples=["fashion-mnist-mlp/2"]
    )
    reason: str = Field(
        examples=["decoder file fashion-mnist-mlp/2/decoder.onnx has sha256 9f86..., manifest says 2c26..."]
    )


class ModelList(BaseModel):
    models: list[ModelInfo] = Field(description="The newest version of each model.")
    refused: list[NotReadyItem] = Field(
        description="Versions under MODEL_DIR that are not served as their files are now, with the reason; "
        "a refused update of a version that was already serving leaves that version serving."
    )


class Readiness(BaseModel):
    ready: bool = Field(
        description="Every model name has at least one servable version (READY_REQUIRES_ALL: every version "
        "under MODEL_DIR is loaded), MODEL_DIR is not empty, and the server is not draining."
    )
    draining: bool = Field(description="Shutting down (after SIGTERM): still serving, but not for long.")
    models: list[str] = Field(description="Loaded NAME/VERSION pairs.")
    not_ready: list[NotReadyItem] = Field(
        description="Every version not served (listed even while ready), or why there is none."
    )


class ReloadResponse(BaseModel):
    loaded: list[str] = Field(
        description="NAME/VERSION loaded by this reload: new versions, or versions whose files changed.",
        examples=[["fashion-mnist-mlp/3"]],
    )
    removed: list[str] = Field(
        description="NAME/VERSION no longer served: their directories are gone. Requests already holding "
        "one still complete.",
        examples=[["fashion-mnist-mlp/1"]],
    )
    refused: list[NotReadyItem] = Field(
        description="Every version under MODEL_DIR not served as its files are now, with the reason."
    )


class ErrorDetail(BaseModel):
    status: int
    field: str | None = Field(description="Dotted path of the offending part of the request.")
    message: str


class ErrorResponse(BaseModel):
    error: ErrorDetail
