"""The model registry: scans MODEL_DIR/NAME/VERSION/, loads what is sound, remembers what is not.

A version directory is served only if its `model.json` validates, names the same NAME and VERSION as its
path, its ONNX files match the manifest's SHA-256, and both graphs agree with the manifest's shapes and
survive a warm-up run. Anything else is logged as one line naming the file and the reason, listed by
/readyz, and does not stop the other models from loading.

The newest version of a name is the greatest loaded version, where versions that are plain integers
compare numerically (2 < 10) and rank above all others, and other versions compare as strings.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import KeysView
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import ValidationError

from service.batching import Batcher
from service.errors import NotFound
from service.manifest import MANIFEST_NAME, Manifest, read_manifest, verify_checksums
from service.metrics import Metrics
from service.operations import F32
from service.runtime import (
    CPU,
    CUDA,
    Graph,
    GraphError,
    available_providers,
    load_graphs,
    select_providers,
    session_options,
)
from service.settings import Settings

log = logging.getLogger(__name__)


def version_key(version: str) -> tuple[int, int, str]:
    """Sort key: integers numerically and above every non-integer version, which sort as strings."""
    return (1, int(version), "") if version.isdecimal() else (0, 0, version)


@dataclass(frozen=True)
class LoadFailure:
    model: str
    version: str
    path: str
    reason: str


@dataclass
class ServedModel:
    """A loaded model version: its manifest and one batcher per graph. Implements `operations.VAE`."""

    manifest: Manifest
    path: Path
    graph_providers: dict[str, list[str]]  # "encoder" and "decoder" -> its session's providers, best first
    encoder: Batcher
    decoder: Batcher

    @property
    def providers(self) -> list[str]:
        """Every provider either graph's session uses, best first (CPU, every session's fallback, last)."""
        names = dict.fromkeys(name for graph in self.graph_providers.values() for name in graph)
        return sorted(names, key=lambda name: name == CPU)

    @property
    def latent_dim(self) -> int:
        return self.manifest.latent_dim

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.manifest.input_shape

    async def run_encoder(self, x: F32) -> tuple[F32, F32]:
        mu, logvar = await self.encoder.submit(x)
        return mu, logvar

    async def run_decoder(self, z: F32) -> F32:
        (x_mean,) = await self.decoder.submit(z)
        return x_mean


def _describe(exc: ValidationError, path: Path) -> str:
    problems = "; ".join(
        f"{'.'.join(str(p) for p in err['loc']) or '(root)'}: {err['msg']}" for err in exc.errors()[:3]
    )
    more = f" (+{exc.error_count() - 3} more)" if exc.error_count() > 3 else ""
    return f"{path} is not a valid manifest: {problems}{more}"


def _batcher(graph: Graph, name: str, settings: Settings, metrics: Metrics, manifest: Manifest) -> Batcher:
    return Batcher(
        graph.run,
        name=f"{manifest.name}/{manifest.version}/{name}",
        max_batch_rows=settings.max_batch_rows,
        window_ms=settings.batch_window_ms,
        max_queue_rows=settings.max_queue_rows,
        on_run=metrics.batch_observer(manifest.name, manifest.version, name),
        # On a GPU a second run in flight overlaps one batch's copies with the other's compute; on CPU one
        # run already has every intra-op thread.
        max_concurrent_runs=2 if CUDA in graph.providers else 1,
    )


@dataclass
class Registry:
    settings: Settings
    metrics: Metrics
    models: dict[str, dict[str, ServedModel]] = field(default_factory=dict)
    failures: list[LoadFailure] = field(default_factory=list)
    newest: dict[str, str] = field(default_factory=dict)

    def load(self) -> None:
        """Scan MODEL_DIR and load every version (blocking: hashing, session creation, warm-up).

        Raises at start for problems no model can survive: a missing MODEL_DIR or an unavailable DEVICE.
        """
        root = self.settings.model_dir
        if not root.is_dir():
            raise FileNotFoundError(f"MODEL_DIR {root} is not a directory")
        providers = select_providers(self.settings.device, available_providers())
        log.info("execution providers requested: %s (DEVICE=%s)", providers, self.settings.device)
        for name_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            for version_dir in sorted(
                p for p in name_dir.iterdir() if p.is_dir() and not p.name.startswith(".")
            ):
                self._load_one(version_dir, providers)
        self.newest = {name: self.versions(name)[-1] for name in self.models}

    def _load_one(self, version_dir: Path, providers: list[str]) -> None:
        name, version = version_dir.parent.name, version_dir.name
        try:
            manifest = self._checked_manifest(version_dir)
            graphs = load_graphs(
                version_dir,
                manifest,
                providers=providers,
                options=session_options(self.settings.intra_op_threads, self.settings.inter_op_threads),
                warmup_rows=self.settings.max_batch_rows,
                require_cuda=self.settings.device == "cuda",
            )
        except (_Refused, GraphError) as exc:
            self._refuse(name, version, version_dir, str(exc))
            return
        self.models.setdefault(name, {})[version] = ServedModel(
            manifest=manifest,
            path=version_dir,
            graph_providers={"encoder": graphs.encoder.providers, "decoder": graphs.decoder.providers},
            encoder=_batcher(graphs.encoder, "encoder", self.settings, self.metrics, manifest),
            decoder=_batcher(graphs.decoder, "decoder", self.settings, self.metrics, manifest),
        )
        self.metrics.model_loaded.labels(name, version).set(1)
        log.info(
            "model %s/%s loaded from %s; encoder on %s, decoder on %s",
            name,
            version,
            version_dir,
            graphs.encoder.providers,
            graphs.decoder.providers,
        )

    def _checked_manifest(self, version_dir: Path) -> Manifest:
        manifest_path = version_dir / MANIFEST_NAME
        try:
            manifest = read_manifest(version_dir)
        except FileNotFoundError:
            raise _Refused(f"{manifest_path} is missing") from None
        except OSError as exc:
            raise _Refused(f"{manifest_path} cannot be read: {exc}") from None
        except ValidationError as exc:
            raise _Refused(_describe(exc, manifest_path)) from None
        if (manifest.name, manifest.version) != (version_dir.parent.name, version_dir.name):
            raise _Refused(
                f"{manifest_path} says {manifest.name}/{manifest.version} but lives in "
                f"{version_dir.parent.name}/{version_dir.name}"
            )
        try:
            problems = verify_checksums(version_dir, manifest)
        except OSError as exc:
            raise _Refused(f"cannot read a model file: {exc}") from None
        if problems:
            raise _Refused("; ".join(problems))
        return manifest

    def _refuse(self, name: str, version: str, path: Path, reason: str) -> None:
        log.error("model %s/%s not loaded: %s", name, version, reason)
        self.failures.append(LoadFailure(model=name, version=version, path=str(path), reason=reason))
        self.metrics.model_loaded.labels(name, version).set(0)

    async def start(self) -> None:
        """Load off the event loop, then start every batcher inside the running loop."""
        await asyncio.to_thread(self.load)
        for served in self.served():
            await served.encoder.start()
            await served.decoder.start()

    async def stop(self) -> None:
        for served in self.served():
            await served.encoder.stop()
            await served.decoder.stop()

    def served(self) -> list[ServedModel]:
        return [m for versions in self.models.values() for m in versions.values()]

    def model_names(self) -> KeysView[str]:
        """The loaded models' names: a live view, so a membership test is one dict lookup per request."""
        return self.models.keys()

    def versions(self, name: str) -> list[str]:
        return sorted(self.models.get(name, {}), key=version_key)

    def resolve(self, name: str, version: str | None = None) -> ServedModel:
        """The named version, or the newest loaded one; NotFound names what exists instead."""
        versions = self.models.get(name)
        if not versions:
            raise NotFound(f"no model {name!r}; loaded: {sorted(self.models)}", field="model")
        if version is None:
            return versions[self.newest[name]]
        if version not in versions:
            raise NotFound(
                f"model {name!r} has no version {version!r}; loaded: {self.versions(name)}", field="version"
            )
        return versions[version]

    def not_ready(self) -> list[LoadFailure]:
        """Why /readyz is 503: load failures or an empty MODEL_DIR."""
        if not self.models and not self.failures:
            return [
                LoadFailure("", "", str(self.settings.model_dir), "no NAME/VERSION/ model directories found")
            ]
        return list(self.failures)


class _Refused(Exception):
    """A model version that cannot be served, with the reason for the log and /readyz."""
