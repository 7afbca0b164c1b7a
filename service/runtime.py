"""onnxruntime: execution provider choice, session options, graph checks against the manifest, warm-up.

Only this module imports onnxruntime. A session's `run` releases the GIL and is safe to call from several
threads at once, which is what the batchers' worker threads do.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from service.manifest import DECODER_INPUT, DECODER_OUTPUT, ENCODER_INPUT, ENCODER_OUTPUTS, Manifest
from service.settings import Device

log = logging.getLogger(__name__)

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


class ProviderUnavailable(RuntimeError):
    """DEVICE=cuda on a machine or onnxruntime build without CUDA: refuse to start rather than run slowly."""


class GraphError(ValueError):
    """An ONNX graph that cannot be served: unreadable, at odds with the manifest, or failing its warm-up."""


def select_providers(device: Device, available: Sequence[str]) -> list[str]:
    """Execution providers to request, best first; CPU is always last so unsupported operators can fall back.

    `available` is what the installed onnxruntime was built with (`get_available_providers`), not what the
    machine has: with DEVICE=auto a CUDA build without a usable GPU is asked for CUDA anyway, its session
    comes up on CPU, and the load log and /v1/models/{model} say so.
    """
    has_cuda = CUDA in available
    if device == "cuda" and not has_cuda:
        raise ProviderUnavailable(
            f"DEVICE=cuda but onnxruntime offers only {list(available)}; "
            "install onnxruntime-gpu (instead of onnxruntime) with a matching CUDA, or set DEVICE=auto or cpu"
        )
    if device != "cpu" and has_cuda:
        return [CUDA, CPU]
    return [CPU]


def session_options(intra_op_threads: int, inter_op_threads: int) -> ort.SessionOptions:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = intra_op_threads
    opts.inter_op_num_threads = inter_op_threads
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Idle intra-op threads would otherwise spin on the cores the event loop and the other graph need.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.log_severity_level = 3  # errors only; onnxruntime's warnings are about graph rewrites
    return opts


@dataclass(frozen=True)
class Graph:
    """One loaded ONNX graph and how to call it."""

    session: ort.InferenceSession
    input_name: str
    output_names: tuple[str, ...]

    def run(self, x: np.ndarray) -> list[np.ndarray]:
        """Stacked rows [n, ...] -> each output [n, ...], in `output_names` order."""
        outputs: list[np.ndarray] = self.session.run(list(self.output_names), {self.input_name: x})
        return outputs

    @property
    def providers(self) -> list[str]:
        return list(self.session.get_providers())


def _check_io(kind: str, nodes: Sequence[ort.NodeArg], expected: dict[str, tuple[int, ...]]) -> None:
    """Each expected tensor exists, is float32, has a dynamic batch axis and the manifest's other dims."""
    by_name = {node.name: node for node in nodes}
    for name, dims in expected.items():
        node = by_name.get(name)
        if node is None:
            raise GraphError(f"{kind} {name!r} missing; the graph has {sorted(by_name)}")
        if node.type != "tensor(float)":
            raise GraphError(f"{kind} {name!r} is {node.type}, expected tensor(float)")
        shape = list(node.shape)
        if len(shape) != 1 + len(dims):
            raise GraphError(
                f"{kind} {name!r} has shape {shape}, expected [batch, {', '.join(map(str, dims))}]"
            )
        if isinstance(shape[0], int):
            raise GraphError(
                f"{kind} {name!r} has a fixed batch size {shape[0]}; batching needs a dynamic axis"
            )
        for axis, (got, want) in enumerate(zip(shape[1:], dims, strict=True), start=1):
            if isinstance(got, int) and got != want:
                raise GraphError(f"{kind} {name!r} axis {axis} is {got}, the manifest says {want}")


def load_graph(
    path: Path,
    *,
    input_name: str,
    input_dims: tuple[int, ...],
    outputs: dict[str, tuple[int, ...]],
    providers: list[str],
    options: ort.SessionOptions,
    warmup_rows: int,
    require_cuda: bool,
) -> Graph:
    """Open, check against the manifest's shapes, and warm up (batch 1 and `warmup_rows`) so the first
    request neither pays for lazy initialisation nor meets a shape the graph cannot take.

    Raises GraphError whose message starts with the file, or ProviderUnavailable.
    """
    try:
        return _open_checked(
            path, input_name, input_dims, outputs, providers, options, warmup_rows, require_cuda
        )
    except ProviderUnavailable:
        raise
    except Exception as exc:  # onnxruntime has its own exception types for unreadable or failing graphs
        raise GraphError(f"{path}: {exc}") from exc


def _open_checked(
    path: Path,
    input_name: str,
    input_dims: tuple[int, ...],
    outputs: dict[str, tuple[int, ...]],
    providers: list[str],
    options: ort.SessionOptions,
    warmup_rows: int,
    require_cuda: bool,
) -> Graph:
    session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
    # Otherwise a provider failure inside run() makes onnxruntime rebuild the session on CPU (set_providers)
    # and retry, silently, while another worker thread may be running the same session (2 runs in flight on
    # CUDA). A failed run must fail its batch, like any other.
    session.disable_fallback()
    if require_cuda and CUDA not in session.get_providers():
        raise ProviderUnavailable(
            f"{path}: CUDAExecutionProvider was requested but the session fell back to CPU"
        )
    _check_io("input", session.get_inputs(), {input_name: input_dims})
    _check_io("output", session.get_outputs(), outputs)
    graph = Graph(session=session, input_name=input_name, output_names=tuple(outputs))
    for rows in sorted({1, warmup_rows}):
        results = graph.run(np.zeros((rows, *input_dims), dtype=np.float32))
        for (name, dims), result in zip(outputs.items(), results, strict=True):
            if result.shape != (rows, *dims) or result.dtype != np.float32:
                raise GraphError(
                    f"output {name!r} came out {result.dtype}{list(result.shape)} for {rows} rows, "
                    f"expected float32{[rows, *dims]}"
                )
    return graph


@dataclass(frozen=True)
class Graphs:
    encoder: Graph
    decoder: Graph
    background: Graphs | None = None  # the anomaly score's background model, when the manifest has one


def load_graphs(
    model_dir: Path,
    manifest: Manifest,
    *,
    providers: list[str],
    options: ort.SessionOptions,
    warmup_rows: int,
    require_cuda: bool,
) -> Graphs:
    """The model's encoder and decoder and, when the manifest has an anomaly section, its background's."""
    view = manifest.background_view()
    background = None
    if view is not None:
        background = load_graphs(
            model_dir,
            view,
            providers=providers,
            options=options,
            warmup_rows=warmup_rows,
            require_cuda=require_cuda,
        )
    latent = (manifest.latent_dim,)
    encoder = load_graph(
        model_dir / manifest.files.encoder.path,
        input_name=ENCODER_INPUT,
        input_dims=manifest.input_shape,
        outputs={name: latent for name in ENCODER_OUTPUTS},
        providers=providers,
        options=options,
        warmup_rows=warmup_rows,
        require_cuda=require_cuda,
    )
    decoder = load_graph(
        model_dir / manifest.files.decoder.path,
        input_name=DECODER_INPUT,
        input_dims=latent,
        outputs={DECODER_OUTPUT: manifest.input_shape},
        providers=providers,
        options=options,
        warmup_rows=warmup_rows,
        require_cuda=require_cuda,
    )
    return Graphs(encoder=encoder, decoder=decoder, background=background)


def available_providers() -> list[str]:
    return list(ort.get_available_providers())
