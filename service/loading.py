"""Checking and loading one model version: scanning MODEL_DIR/NAME/VERSION/, fingerprinting its files, and
turning a sound version directory into a warmed-up `ServedModel`.

A version directory is served only if its `model.json` validates, names the same NAME and VERSION as its
path, its files stay inside the version directory (checked before anything is read or hashed), its ONNX
files match the manifest's SHA-256, and both graphs agree with the manifest's shapes and survive a
warm-up run. Anything else is logged as one line naming the directory and the reason, listed by /readyz and
GET /v1/models, and does not stop the other models from loading. Clients only ever see paths relative to
MODEL_DIR.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from service.batching import Batcher
from service.catalog import Fingerprint, Key, LoadFailure, ServedModel
from service.manifest import MANIFEST_NAME, Manifest, read_manifest, verify_checksums
from service.metrics import Metrics
from service.runtime import (
    CUDA,
    Graph,
    GraphError,
    Graphs,
    ProviderUnavailable,
    load_graphs,
    session_options,
)
from service.settings import Settings

log = logging.getLogger(__name__)


def _describe(exc: ValidationError, shown: str) -> str:
    problems = "; ".join(
        f"{'.'.join(str(p) for p in err['loc']) or '(root)'}: {err['msg']}" for err in exc.errors()[:3]
    )
    more = f" (+{exc.error_count() - 3} more)" if exc.error_count() > 3 else ""
    return f"{shown} is not a valid manifest: {problems}{more}"


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


def fingerprint(version_dir: Path) -> Fingerprint:
    """Stat every file under a version directory (no file is opened): what a cheap rescan compares."""
    entries: list[tuple[str, int, int, int, int]] = []
    for dirpath, dirnames, filenames in os.walk(version_dir):
        dirnames.sort()
        for filename in sorted(filenames):
            path = os.path.join(dirpath, filename)
            inside = os.path.relpath(path, version_dir)
            try:
                st = os.stat(path)  # follows symlinks: a link retargeted is a change
            except OSError:
                entries.append((inside, -1, -1, -1, -1))
                continue
            entries.append((inside, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino))
    return tuple(entries)


def scan(root: Path) -> dict[Key, tuple[Path, Fingerprint]]:
    """Every MODEL_DIR/NAME/VERSION/ directory (hidden ones skipped) and its fingerprint.

    Raises OSError when MODEL_DIR itself cannot be listed; a NAME directory vanishing meanwhile is skipped.
    """
    found: dict[Key, tuple[Path, Fingerprint]] = {}
    for name_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        try:
            version_dirs = sorted(p for p in name_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
        except OSError:
            continue
        for version_dir in version_dirs:
            found[(name_dir.name, version_dir.name)] = (version_dir, fingerprint(version_dir))
    return found


@dataclass(frozen=True)
class Candidate:
    key: Key
    directory: Path
    fingerprint: Fingerprint
    serving: ServedModel | None  # the version serving under this key now, if any


@dataclass(frozen=True)
class Checked:
    """A candidate that passed: the ServedModel to keep, or the graphs to build a new one from."""

    manifest: Manifest
    keep: ServedModel | None
    graphs: Graphs | None


class Loader:
    """Checks, loads and warms up candidate versions for the Registry, off the event loop."""

    def __init__(self, settings: Settings, metrics: Metrics, root: Path) -> None:
        self.settings = settings
        self.metrics = metrics
        self._root = root  # absolute, so messages can be made relative to it
        self.providers: list[str] = []  # set by Registry.start from DEVICE

    def check_all(self, candidates: list[Candidate], at_start: bool) -> list[Checked | LoadFailure]:
        """Worker thread: check, load and warm up each candidate (hashing and session creation block)."""
        return [self._check_one(candidate, at_start) for candidate in candidates]

    def _check_one(self, candidate: Candidate, at_start: bool) -> Checked | LoadFailure:
        name, version = candidate.key
        shown = f"{name}/{version}"
        try:
            manifest = self._checked_manifest(candidate.directory, shown)
            if candidate.serving is not None and candidate.serving.manifest == manifest:
                return Checked(manifest, keep=candidate.serving, graphs=None)
            graphs = load_graphs(
                candidate.directory,
                manifest,
                providers=self.providers,
                options=session_options(self.settings.intra_op_threads, self.settings.inter_op_threads),
                warmup_rows=self.settings.max_batch_rows,
                require_cuda=self.settings.device == "cuda",
            )
        except ProviderUnavailable as exc:
            if at_start:
                raise  # DEVICE=cuda without CUDA: the server must not start
            return self._refusal(candidate, self._relative(str(exc)))
        except (_Refused, GraphError) as exc:
            return self._refusal(candidate, self._relative(str(exc)))
        return Checked(manifest, keep=None, graphs=graphs)

    def _refusal(self, candidate: Candidate, reason: str) -> LoadFailure:
        name, version = candidate.key
        if candidate.serving is not None:
            reason += "; the version loaded before keeps serving"
        log.error("model %s/%s not loaded: %s", name, version, reason)
        return LoadFailure(model=name, version=version, path=f"{name}/{version}", reason=reason)

    def _relative(self, text: str) -> str:
        """Name files relative to MODEL_DIR in a message that carries their absolute path (GraphError's)."""
        return text.replace(f"{self._root}{os.sep}", "")

    def _checked_manifest(self, version_dir: Path, shown: str) -> Manifest:
        manifest_path = version_dir / MANIFEST_NAME
        shown_manifest = f"{shown}/{MANIFEST_NAME}"
        inside = version_dir.resolve()
        if not inside.is_relative_to(self._root.resolve()):
            raise _Refused(f"{shown} resolves outside MODEL_DIR (a symlink?); only files inside it are read")
        if not manifest_path.resolve().is_relative_to(inside):
            raise _Refused(f"{shown_manifest} resolves outside {shown}; only files inside it are read")
        try:
            manifest = read_manifest(version_dir)
        except FileNotFoundError:
            raise _Refused(f"{shown_manifest} is missing") from None
        except OSError as exc:
            raise _Refused(f"{shown_manifest} cannot be read: {exc.strerror or type(exc).__name__}") from None
        except ValidationError as exc:
            raise _Refused(_describe(exc, shown_manifest)) from None
        if (manifest.name, manifest.version) != (version_dir.parent.name, version_dir.name):
            raise _Refused(
                f"{shown_manifest} says {manifest.name}/{manifest.version} but lives in "
                f"{version_dir.parent.name}/{version_dir.name}"
            )
        for role, entry in manifest.file_entries():
            if not (version_dir / entry.path).resolve().is_relative_to(inside):
                raise _Refused(
                    f"{role} file {shown}/{entry.path} resolves outside {shown} (a symlink?); "
                    "only files inside it are read"
                )
        try:
            problems = verify_checksums(version_dir, manifest, shown_as=shown)
        except OSError as exc:
            raise _Refused(
                f"cannot read a model file of {shown}: {exc.strerror or type(exc).__name__}"
            ) from None
        if problems:
            raise _Refused("; ".join(problems))
        return manifest

    def served_model(self, version_dir: Path, manifest: Manifest, graphs: Graphs) -> ServedModel:
        settings, metrics = self.settings, self.metrics
        log.info(
            "model %s/%s loaded from %s/%s; encoder on %s, decoder on %s",
            manifest.name,
            manifest.version,
            version_dir.parent.name,
            version_dir.name,
            graphs.encoder.providers,
            graphs.decoder.providers,
        )
        background = None
        view = manifest.background_view()
        if graphs.background is not None and view is not None:  # its batchers: graphs background_*
            background = ServedModel(
                manifest=view,
                path=version_dir,
                graph_providers={
                    "encoder": graphs.background.encoder.providers,
                    "decoder": graphs.background.decoder.providers,
                },
                encoder=_batcher(
                    graphs.background.encoder, "background_encoder", settings, metrics, manifest
                ),
                decoder=_batcher(
                    graphs.background.decoder, "background_decoder", settings, metrics, manifest
                ),
                graphs=graphs.background,
            )
        return ServedModel(
            manifest=manifest,
            path=version_dir,
            graph_providers={"encoder": graphs.encoder.providers, "decoder": graphs.decoder.providers},
            encoder=_batcher(graphs.encoder, "encoder", settings, metrics, manifest),
            decoder=_batcher(graphs.decoder, "decoder", settings, metrics, manifest),
            graphs=graphs,
            background=background,
        )


class _Refused(Exception):
    """A model version that cannot be served, with the reason for the log and /readyz."""
