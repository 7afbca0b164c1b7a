"""Stand-in VAEs built with `onnx.helper`: random weights, the service's ONNX contract, no torch.

The serving benchmark uses a Fashion-MNIST-sized one when no trained model is at hand (the shipped model's
shapes and cost, not its quality); the service tests use a tiny linear one (every route end to end in
milliseconds). Both follow `service.manifest`'s contract with a dynamic batch axis:

    encoder.onnx  x [batch, 1, 28, 28] -> Flatten -> ReLU MLP (`hidden`) -> mu, logvar [batch, latent]
    decoder.onnx  z [batch, latent] -> ReLU MLP (`hidden`) -> 784 -> Sigmoid -> x_mean [batch, 1, 28, 28]

logvar is 2 tanh(.) of its layer, bounded like the trained model's clamp, so sigma stays in [e^-1, e].
The manifest's metrics are placeholders (`dataset` says so). Run `python -m bench.standin DIR` to write
DIR/standin-mlp/1/ (for MODEL_DIR=DIR).
"""

from __future__ import annotations

import argparse
import itertools
import math
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from service.manifest import (
    DECODER_FILE,
    DECODER_INPUT,
    DECODER_OUTPUT,
    ENCODER_FILE,
    ENCODER_INPUT,
    ENCODER_OUTPUTS,
    ExportCheck,
    FileEntry,
    Manifest,
    Metrics,
    ModelFiles,
    TrainingRecord,
    read_manifest,
    sha256_file,
    write_manifest,
)

IMAGE_SHAPE = (1, 28, 28)
PIXELS = math.prod(IMAGE_SHAPE)
BENCH_NAME = "standin-mlp"
BENCH_HIDDEN = (512, 512)  # the shipped model's widths
BENCH_LATENT = 32
OPSET = 18
IR_VERSION = 10  # what torch.onnx writes for opset 18; onnx's default IR can be newer than onnxruntime reads


def _mlp(
    rng: np.random.Generator, x: str, widths: Sequence[int], name: str
) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto], str]:
    """Gemm layers of the given widths, ReLU between them and none after the last: nodes, weights, output."""
    nodes: list[onnx.NodeProto] = []
    weights: list[onnx.TensorProto] = []
    for i, (fan_in, fan_out) in enumerate(itertools.pairwise(widths)):
        layer = f"{name}{i}"
        w = rng.standard_normal((fan_in, fan_out)) * math.sqrt(2.0 / fan_in)  # He initialisation
        b = rng.normal(0.0, 0.5, fan_out)
        weights += [
            numpy_helper.from_array(w.astype(np.float32), f"{layer}.w"),
            numpy_helper.from_array(b.astype(np.float32), f"{layer}.b"),
        ]
        nodes.append(helper.make_node("Gemm", [x, f"{layer}.w", f"{layer}.b"], [f"{layer}.out"]))
        x = f"{layer}.out"
        if i < len(widths) - 2:
            nodes.append(helper.make_node("Relu", [x], [f"{layer}.relu"]))
            x = f"{layer}.relu"
    return nodes, weights, x


def _model(
    nodes: list[onnx.NodeProto],
    inputs: list[onnx.ValueInfoProto],
    outputs: list[onnx.ValueInfoProto],
    weights: list[onnx.TensorProto],
    name: str,
) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, name, inputs, outputs, initializer=weights)
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION, producer_name="standin"
    )
    onnx.checker.check_model(model, full_check=True)
    return model


def encoder(rng: np.random.Generator, hidden: Sequence[int], latent: int) -> onnx.ModelProto:
    mu, logvar = ENCODER_OUTPUTS
    nodes = [helper.make_node("Flatten", [ENCODER_INPUT], ["flat"], axis=1)]  # [b, 1, 28, 28] -> [b, 784]
    trunk, weights, h = _mlp(rng, "flat", [PIXELS, *hidden], "enc")
    if hidden:
        trunk.append(helper.make_node("Relu", [h], ["features"]))
        h = "features"
    features = hidden[-1] if hidden else PIXELS
    mu_nodes, mu_weights, mu_out = _mlp(rng, h, [features, latent], "mu")
    lv_nodes, lv_weights, lv_out = _mlp(rng, h, [features, latent], "logvar")
    weights += [*mu_weights, *lv_weights, numpy_helper.from_array(np.array(2.0, np.float32), "two")]
    nodes += [
        *trunk,
        *mu_nodes,
        helper.make_node("Identity", [mu_out], [mu]),
        *lv_nodes,
        helper.make_node("Tanh", [lv_out], ["logvar.tanh"]),
        helper.make_node("Mul", ["logvar.tanh", "two"], [logvar]),
    ]
    image: list[str | int] = ["batch", *IMAGE_SHAPE]
    return _model(
        nodes,
        [helper.make_tensor_value_info(ENCODER_INPUT, TensorProto.FLOAT, image)],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, ["batch", latent]) for out in ENCODER_OUTPUTS],
        weights,
        "encoder",
    )


def decoder(
    rng: np.random.Generator,
    hidden: Sequence[int],
    latent: int,
    reshape_to: tuple[int, ...] = (-1, *IMAGE_SHAPE),
) -> onnx.ModelProto:
    """The decoder; `reshape_to` other than the default breaks the contract on purpose (tests)."""
    nodes, weights, logits = _mlp(rng, DECODER_INPUT, [latent, *hidden, PIXELS], "dec")
    weights.append(numpy_helper.from_array(np.array(reshape_to, np.int64), "image_shape"))
    nodes += [
        helper.make_node("Sigmoid", [logits], ["probs"]),
        helper.make_node("Reshape", ["probs", "image_shape"], [DECODER_OUTPUT]),  # [b, 784] -> [b, 1, 28, 28]
    ]
    return _model(
        nodes,
        [helper.make_tensor_value_info(DECODER_INPUT, TensorProto.FLOAT, ["batch", latent])],
        [helper.make_tensor_value_info(DECODER_OUTPUT, TensorProto.FLOAT, ["batch", *IMAGE_SHAPE])],
        weights,
        "decoder",
    )


def _files(directory: Path) -> ModelFiles:
    return ModelFiles(
        encoder=FileEntry(path=ENCODER_FILE, sha256=sha256_file(directory / ENCODER_FILE)),
        decoder=FileEntry(path=DECODER_FILE, sha256=sha256_file(directory / DECODER_FILE)),
    )


def write_model(
    root: Path,
    name: str = BENCH_NAME,
    version: str = "1",
    *,
    seed: int = 0,
    hidden: Sequence[int] = BENCH_HIDDEN,
    latent: int = BENCH_LATENT,
    manifest_latent: int | None = None,
) -> Path:
    """Write root/name/version/ (graphs + a manifest with their real checksums); return that directory.

    `manifest_latent` other than `latent` makes the manifest disagree with the graphs (tests).
    """
    rng = np.random.default_rng(seed)
    directory = root / name / version
    directory.mkdir(parents=True, exist_ok=True)
    onnx.save(encoder(rng, hidden, latent), directory / ENCODER_FILE)
    onnx.save(decoder(rng, hidden, latent), directory / DECODER_FILE)
    widths = "-".join(str(w) for w in (PIXELS, *hidden, latent))
    manifest = Manifest(
        name=name,
        version=version,
        created=datetime.now(UTC),
        input_shape=IMAGE_SHAPE,
        latent_dim=latent if manifest_latent is None else manifest_latent,
        likelihood="bernoulli",
        architecture=f"stand-in MLP {widths}, random weights",
        dataset="none: random weights, metrics are placeholders",
        files=_files(directory),
        metrics=Metrics(
            test_elbo=0.0,
            test_nll=0.0,
            iwae_k=1,
            bits_per_dim=0.0,
            active_units=0,
            recon_error=0.0,
            test_images=1,
        ),
        export_check=ExportCheck(encoder_max_abs_diff=0.0, decoder_max_abs_diff=0.0, tolerance=0.0),
        training=TrainingRecord(
            command=f"python -m bench.standin {root}",
            config={"seed": seed},
            epochs=0,
            seconds=0.0,
            device="none",
        ),
        libraries={"onnx": onnx.__version__, "numpy": np.__version__},
    )
    write_manifest(directory, manifest)
    return directory


def rewrite_checksums(directory: Path) -> None:
    """Make the manifest match the ONNX files as they are now (after a test swapped one)."""
    manifest = read_manifest(directory)
    write_manifest(directory, manifest.model_copy(update={"files": _files(directory)}))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model_root", type=Path, help=f"MODEL_DIR to write {BENCH_NAME}/1/ into")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(write_model(args.model_root, seed=args.seed))


if __name__ == "__main__":
    main()
