"""A stand-in Fashion-MNIST-sized MLP VAE, built with `onnx.helper`, so the serving benchmark can always run.

It has the shipped model's shapes and cost, not its quality: random weights, and a manifest whose metrics are
zeros (`dataset` and `architecture` say so). The graphs follow `service.manifest`'s contract:

    encoder.onnx  x [batch, 1, 28, 28] -> Flatten -> 784-512-512 ReLU MLP -> mu, logvar [batch, 32]
    decoder.onnx  z [batch, 32] -> 32-512-512 ReLU MLP -> 784 -> Sigmoid -> x_mean [batch, 1, 28, 28]

Run `python -m bench.serve_standin DIR` to write DIR/standin-mlp/1/ (for MODEL_DIR=DIR).
"""

from __future__ import annotations

import argparse
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
    sha256_file,
    write_manifest,
)

NAME = "standin-mlp"
VERSION = "1"
IMAGE_SHAPE = (1, 28, 28)
PIXELS = 784
HIDDEN = 512
LATENT = 32
OPSET = 18
IR_VERSION = (
    10  # what torch.onnx writes for opset 18; onnx 1.23 would default to an IR newer than onnxruntime reads
)


def _dense(rng: np.random.Generator, name: str, fan_in: int, fan_out: int) -> list[onnx.TensorProto]:
    """He-initialised weight [fan_in, fan_out] and zero bias, as Gemm initialisers."""
    weight = (rng.standard_normal((fan_in, fan_out)) * np.sqrt(2.0 / fan_in)).astype(np.float32)
    return [
        numpy_helper.from_array(weight, f"{name}.w"),
        numpy_helper.from_array(np.zeros(fan_out, np.float32), f"{name}.b"),
    ]


def _gemm(name: str, x: str, out: str) -> onnx.NodeProto:
    return helper.make_node("Gemm", [x, f"{name}.w", f"{name}.b"], [out], name=name)


def _model(
    nodes: list[onnx.NodeProto],
    inputs: list[onnx.ValueInfoProto],
    outputs: list[onnx.ValueInfoProto],
    init: list[onnx.TensorProto],
    name: str,
) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, name, inputs, outputs, initializer=init)
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        ir_version=IR_VERSION,
        producer_name="serve_standin",
    )
    onnx.checker.check_model(model, full_check=True)
    return model


def encoder(rng: np.random.Generator) -> onnx.ModelProto:
    init = _dense(rng, "enc1", PIXELS, HIDDEN) + _dense(rng, "enc2", HIDDEN, HIDDEN)
    init += _dense(rng, "mu", HIDDEN, LATENT) + _dense(rng, "logvar", HIDDEN, LATENT)
    mu, logvar = ENCODER_OUTPUTS
    nodes = [
        helper.make_node("Flatten", [ENCODER_INPUT], ["flat"], axis=1),  # [b, 1, 28, 28] -> [b, 784]
        _gemm("enc1", "flat", "h1"),
        helper.make_node("Relu", ["h1"], ["a1"]),
        _gemm("enc2", "a1", "h2"),
        helper.make_node("Relu", ["h2"], ["a2"]),
        _gemm("mu", "a2", mu),
        _gemm("logvar", "a2", logvar),
    ]
    image: list[str | int] = ["batch", *IMAGE_SHAPE]
    return _model(
        nodes,
        [helper.make_tensor_value_info(ENCODER_INPUT, TensorProto.FLOAT, image)],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, ["batch", LATENT]) for out in ENCODER_OUTPUTS],
        init,
        "encoder",
    )


def decoder(rng: np.random.Generator) -> onnx.ModelProto:
    init = _dense(rng, "dec1", LATENT, HIDDEN) + _dense(rng, "dec2", HIDDEN, HIDDEN)
    init += _dense(rng, "dec3", HIDDEN, PIXELS)
    init.append(numpy_helper.from_array(np.array([-1, *IMAGE_SHAPE], np.int64), "image_shape"))
    nodes = [
        _gemm("dec1", DECODER_INPUT, "h1"),
        helper.make_node("Relu", ["h1"], ["a1"]),
        _gemm("dec2", "a1", "h2"),
        helper.make_node("Relu", ["h2"], ["a2"]),
        _gemm("dec3", "a2", "logits"),
        helper.make_node("Sigmoid", ["logits"], ["probs"]),
        helper.make_node("Reshape", ["probs", "image_shape"], [DECODER_OUTPUT]),  # [b, 784] -> [b, 1, 28, 28]
    ]
    return _model(
        nodes,
        [helper.make_tensor_value_info(DECODER_INPUT, TensorProto.FLOAT, ["batch", LATENT])],
        [helper.make_tensor_value_info(DECODER_OUTPUT, TensorProto.FLOAT, ["batch", *IMAGE_SHAPE])],
        init,
        "decoder",
    )


def write_standin(model_root: Path, seed: int = 0) -> Path:
    """Write `model_root/standin-mlp/1/` (graphs + manifest with real checksums); return that directory."""
    rng = np.random.default_rng(seed)
    out = model_root / NAME / VERSION
    out.mkdir(parents=True, exist_ok=True)
    onnx.save(encoder(rng), out / ENCODER_FILE)
    onnx.save(decoder(rng), out / DECODER_FILE)
    manifest = Manifest(
        name=NAME,
        version=VERSION,
        created=datetime.now(UTC),
        input_shape=IMAGE_SHAPE,
        latent_dim=LATENT,
        likelihood="bernoulli",
        architecture=f"stand-in MLP {PIXELS}-{HIDDEN}-{HIDDEN}-{LATENT}, random weights (benchmark only)",
        dataset="none: random weights, metrics are placeholders",
        files=ModelFiles(
            encoder=FileEntry(path=ENCODER_FILE, sha256=sha256_file(out / ENCODER_FILE)),
            decoder=FileEntry(path=DECODER_FILE, sha256=sha256_file(out / DECODER_FILE)),
        ),
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
            command=f"python -m bench.serve_standin {model_root}",
            config={"seed": seed},
            epochs=0,
            seconds=0.0,
            device="none",
        ),
        libraries={"onnx": onnx.__version__, "numpy": np.__version__},
    )
    write_manifest(out, manifest)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model_root", type=Path, help="MODEL_DIR to write standin-mlp/1/ into")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(write_standin(args.model_root, args.seed))


if __name__ == "__main__":
    main()
