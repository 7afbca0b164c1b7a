"""The model registry: scans MODEL_DIR/NAME/VERSION/, loads what is sound, remembers what is not, reloads.

A version directory is served only if its `model.json` validates, names the same NAME and VERSION as its
path, its files stay inside the version directory (checked before anything is read or hashed), its ONNX
files match the manifest's SHA-256, and both graphs agree with the manifest's shapes and survive a
warm-up run. Anything else is logged as one line naming the directory and the reason, listed by /readyz and
GET /v1/models, and does not stop the other models from loading. Clients only ever see paths relative to
MODEL_DIR.

What serves is one immutable `Catalog`; `reload()` (SIGHUP, POST /admin/reload, the RELOAD_POLL_SECONDS
poll) rescans MODEL_DIR and swaps in a new catalog with one assignment, so a request resolves against the
old set or the new one, never a half-built one:

- a version whose files are unchanged (same file sizes, times and inodes) is not looked at again: the same
  `ServedModel`, or the same refusal. A poll that finds nothing changed lists directories and stats files,
  nothing more;
- a new or changed version is checked, loaded and warmed up in a thread (onnxruntime blocks), and its
  batchers are started before the swap. A changed version whose manifest is equal to the served one keeps
  its `ServedModel` (the files were verified against the same checksums);
- a version that fails is refused with a reason and never replaces or removes a version already serving;
- a version whose directory is gone, or that was replaced, stops being handed to new requests; its
  batchers stop only once the calls already submitted have come back, and a request that resolved it
  before the swap and calls it later still completes (unbatched, on a thread: `ServedModel.retire`).

Readiness: every model name has at least one servable version (with READY_REQUIRES_ALL, every version under
MODEL_DIR loaded); an empty MODEL_DIR is not ready.

The newest version of a name is the greatest loaded version, where versions that are plain integers
compare numerically (2 < 10) and rank above all others, and other versions compare as strings.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import KeysView, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from pydantic import ValidationError

from service.batching import Array, Batcher, BatcherClosed
from service.errors import NotFound
from service.manifest import MANIFEST_NAME, Manifest, read_manifest, verify_checksums
from service.metrics import Metrics
from service.operations import F32
from service.runtime import (
    CPU,
    CUDA,
    Graph,
    GraphError,
    Graphs,
    ProviderUnavailable,
    available_providers,
    load_graphs,
    select_providers,
    session_options,
)
from service.settings import Settings

log = logging.getLogger(__name__)

Key = tuple[str, str]
"""(name, version)."""
Fingerprint = tuple[tuple[str, int, int, int, int], ...]
"""Each file under a version directory: (path inside it, size, mtime_ns, ctime_ns, inode), sorted."""


def version_key(version: str) -> tuple[int, int, str]:
    """Sort key: integers numerically and above every non-integer version, which sort as strings."""
    return (1, int(version), "") if version.isdecimal() else (0, 0, version)


@dataclass(frozen=True)
class LoadFailure:
    model: str
    version: str
    path: str  # relative to MODEL_DIR
    reason: str


@dataclass(frozen=True)
class ReloadReport:
    """What a reload changed: versions loaded (new or changed files), versions no longer served (their
    directories are gone), and every version under MODEL_DIR that is not served as its files are now."""

    loaded: tuple[str, ...]  # NAME/VERSION
    removed: tuple[str, ...]  # NAME/VERSION
    refused: tuple[LoadFailure, ...]


@dataclass(eq=False)
class ServedModel:
    """A loaded model version: its manifest and one batcher per graph. Implements `operations.VAE`."""

    manifest: Manifest
    path: Path
    graph_providers: dict[str, list[str]]  # "encoder" and "decoder" -> its session's providers, best first
    encoder: Batcher
    decoder: Batcher
    graphs: Graphs | None = field(default=None, repr=False)  # for calls after retirement (None: fakes)
    _in_flight: int = field(default=0, init=False, repr=False)  # calls submitted, not yet back
    _retired: bool = field(default=False, init=False, repr=False)
    _idle: asyncio.Event = field(default_factory=asyncio.Event, init=False, repr=False)

    @property
    def providers(self) -> list[str]:
        """Every provider either graph's session uses, best first (CPU, every session's fallback, last)."""
        names = dict.fromkeys(name for graph in self.graph_providers.values() for name in graph)
        return sorted(names, key=lambda name: name == CPU)

    @property
    def latent_dim(self) -> int:
        return self.manifest.latent_dim

    async def run_encoder(self, x: F32) -> tuple[F32, F32]:
        mu, logvar = await self._call(self.encoder, x, None if self.graphs is None else self.graphs.encoder)
        return mu, logvar

    async def run_decoder(self, z: F32) -> F32:
        (x_mean,) = await self._call(self.decoder, z, None if self.graphs is None else self.graphs.decoder)
        return x_mean

    async def _call(self, batcher: Batcher, rows: Array, graph: Graph | None) -> list[Array]:
        self._in_flight += 1
        try:
            return await batcher.submit(rows)
        except BatcherClosed:
            if not self._retired or graph is None:
                raise  # shutting down: 503
            # Resolved before a reload retired this version, called after its batchers stopped: the
            # request still completes, on the session it resolved, without batch-mates.
            return await asyncio.to_thread(graph.run, rows)
        finally:
            self._in_flight -= 1
            if self._retired and not self._in_flight:
                self._idle.set()

    async def start(self) -> None:
        await self.encoder.start()
        await self.decoder.start()

    async def stop(self) -> None:
        """Stop both batchers now: queued calls fail with BatcherClosed (503), runs in flight finish."""
        await self.encoder.stop()
        await self.decoder.stop()

    async def retire(self) -> None:
        """No longer served to new requests: wait for the calls already submitted, then stop the batchers.

        Calls that come later (a request resolved this version before the reload) run unbatched on a thread.
        """
        self._retired = True
        while self._in_flight:
            self._idle.clear()
            await self._idle.wait()
        await self.stop()


@dataclass(frozen=True)
class Catalog:
    """One immutable view of MODEL_DIR: what serves, what was refused, and the files each was judged on."""

    models: Mapping[str, Mapping[str, ServedModel]]  # name -> version -> model
    newest: Mapping[str, str]
    versions: Mapping[str, tuple[str, ...]]  # name -> loaded versions, oldest first
    failures: tuple[LoadFailure, ...]
    names: frozenset[str]  # every name with a version directory, served or not
    served_from: Mapping[Key, Fingerprint]  # the files each served version was verified against
    refused: Mapping[Key, tuple[Fingerprint, LoadFailure]]  # the files each refusal was about

    @classmethod
    def build(
        cls,
        served: Mapping[Key, tuple[ServedModel, Fingerprint]],
        refused: Mapping[Key, tuple[Fingerprint, LoadFailure]],
        names: frozenset[str],
    ) -> Catalog:
        models: dict[str, dict[str, ServedModel]] = {}
        for (name, version), (model, _) in sorted(served.items(), key=lambda kv: _order(kv[0])):
            models.setdefault(name, {})[version] = model
        versions = {name: tuple(by_version) for name, by_version in models.items()}
        return cls(
            models=MappingProxyType({name: MappingProxyType(v) for name, v in models.items()}),
            newest=MappingProxyType({name: v[-1] for name, v in versions.items()}),
            versions=MappingProxyType(versions),
            failures=tuple(
                failure for _, (_, failure) in sorted(refused.items(), key=lambda kv: _order(kv[0]))
            ),
            names=names,
            served_from=MappingProxyType({key: fingerprint for key, (_, fingerprint) in served.items()}),
            refused=MappingProxyType(dict(refused)),
        )

    def served(self) -> list[ServedModel]:
        return [m for versions in self.models.values() for m in versions.values()]

    def lookup(self, key: Key) -> ServedModel | None:
        return self.models.get(key[0], {}).get(key[1])

    def resolve(self, name: str, version: str | None = None) -> ServedModel:
        """The named version, or the newest loaded one; NotFound names what exists instead."""
        versions = self.models.get(name)
        if not versions:
            raise NotFound(f"no model {name!r}; loaded: {sorted(self.models)}", field="model")
        if version is None:
            return versions[self.newest[name]]
        served = versions.get(version)
        if served is None:
            raise NotFound(
                f"model {name!r} has no version {version!r}; loaded: {list(self.versions[name])}",
                field="version",
            )
        return served


EMPTY = Catalog.build({}, {}, frozenset())


def _order(key: Key) -> tuple[str, tuple[int, int, str]]:
    return key[0], version_key(key[1])


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
class _Candidate:
    key: Key
    directory: Path
    fingerprint: Fingerprint
    serving: ServedModel | None  # the version serving under this key now, if any


@dataclass(frozen=True)
class _Checked:
    """A candidate that passed: the ServedModel to keep, or the graphs to build a new one from."""

    manifest: Manifest
    keep: ServedModel | None
    graphs: Graphs | None


class Registry:
    """The served model versions: `start()` loads MODEL_DIR, `reload()` rescans it, `stop()` ends serving."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self._root = settings.model_dir.absolute()  # absolute, so messages can be made relative to it
        self._catalog = EMPTY
        self._providers: list[str] = []
        self._lock = asyncio.Lock()  # one reload at a time
        self._retiring: dict[ServedModel, asyncio.Task[None]] = {}
        self._poller: asyncio.Task[None] | None = None
        self._closed = False

    # ---- what requests read: one catalog per call ---------------------------------------------------

    @property
    def catalog(self) -> Catalog:
        """The current catalog: read it once to see one consistent set across several lookups."""
        return self._catalog

    def served(self) -> list[ServedModel]:
        return self._catalog.served()

    def model_names(self) -> KeysView[str]:
        """The loaded models' names, in the current catalog: a membership test is one dict lookup."""
        return self._catalog.models.keys()

    def versions(self, name: str) -> list[str]:
        return list(self._catalog.versions.get(name, ()))

    def resolve(self, name: str, version: str | None = None) -> ServedModel:
        """The named version, or the newest loaded one; NotFound names what exists instead."""
        return self._catalog.resolve(name, version)

    def not_ready(self) -> list[LoadFailure]:
        """Every version not served as its files are now (listed whether or not it blocks readiness), or,
        for an empty MODEL_DIR, that."""
        catalog = self._catalog
        if not catalog.names:
            return [LoadFailure("", "", ".", "no NAME/VERSION/ model directories found in MODEL_DIR")]
        return list(catalog.failures)

    def ready(self) -> bool:
        """Some model is served, and every model name has a served version (READY_REQUIRES_ALL: every
        version under MODEL_DIR is served as its files are now)."""
        catalog = self._catalog
        if not catalog.models:
            return False
        if self.settings.ready_requires_all:
            return not catalog.failures
        return all(name in catalog.models for name in catalog.names)

    # ---- lifecycle ------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Load MODEL_DIR (off the event loop) and start every batcher; with RELOAD_POLL_SECONDS, the poll.

        Raises for problems no model can survive: a missing MODEL_DIR or an unavailable DEVICE.
        """
        root = self.settings.model_dir
        if not root.is_dir():
            raise FileNotFoundError(f"MODEL_DIR {root} is not a directory")
        self._providers = select_providers(self.settings.device, available_providers())
        log.info(
            "serving models from MODEL_DIR=%s; execution providers requested: %s (DEVICE=%s)",
            root.resolve(),
            self._providers,
            self.settings.device,
        )
        async with self._lock:
            await self._reload(at_start=True)
        if self.settings.reload_poll_seconds > 0:
            self._poller = asyncio.create_task(
                self._poll(self.settings.reload_poll_seconds), name="registry-reload-poll"
            )

    async def stop(self) -> None:
        """Stop the poll, wait for a reload under way, then stop every batcher (queued calls get 503)."""
        if self._poller is not None:
            self._poller.cancel()
            await asyncio.wait({self._poller})
            self._poller = None
        async with self._lock:
            self._closed = True
            retiring = dict(self._retiring)
            for task in retiring.values():
                task.cancel()
            if retiring:
                await asyncio.wait(retiring.values())
            for served in [*retiring, *self._catalog.served()]:
                await served.stop()

    async def reload(self) -> ReloadReport:
        """Rescan MODEL_DIR and swap in what changed (module docstring); one reload at a time."""
        async with self._lock:
            if self._closed:
                return ReloadReport((), (), self._catalog.failures)
            return await self._reload(at_start=False)

    async def wait_for_retirements(self) -> None:
        """Return once every version retired so far has stopped its batchers."""
        while self._retiring:
            await asyncio.wait(set(self._retiring.values()))

    async def _poll(self, every: float) -> None:
        while True:
            await asyncio.sleep(every)
            try:
                await self.reload()
            except Exception:  # the poll must outlive a bad scan; the next one tries again
                log.exception("reloading MODEL_DIR failed")

    # ---- the reload ---------------------------------------------------------------------------------

    async def _reload(self, *, at_start: bool) -> ReloadReport:
        old = self._catalog
        try:
            found = await asyncio.to_thread(scan, self._root)
        except OSError as exc:
            if at_start:
                raise
            reason = f"MODEL_DIR cannot be listed ({exc.strerror or type(exc).__name__}); nothing changed"
            log.error("reload: %s", reason)
            return ReloadReport((), (), (*old.failures, LoadFailure("", "", ".", reason)))

        served: dict[Key, tuple[ServedModel, Fingerprint]] = {}
        refused: dict[Key, tuple[Fingerprint, LoadFailure]] = {}
        candidates: list[_Candidate] = []
        for key, (directory, seen) in found.items():
            serving = old.lookup(key)
            if serving is not None and old.served_from.get(key) == seen:
                served[key] = (serving, seen)  # unchanged
                continue
            if key in old.refused and old.refused[key][0] == seen:  # judged already, still the same files
                refused[key] = old.refused[key]
                if serving is not None:
                    served[key] = (serving, old.served_from[key])
                continue
            candidates.append(_Candidate(key, directory, seen, serving))

        outcomes = await asyncio.to_thread(self._check_all, candidates, at_start) if candidates else []
        started: list[ServedModel] = []
        try:
            for candidate, outcome in zip(candidates, outcomes, strict=True):
                if isinstance(outcome, LoadFailure):
                    if candidate.serving is not None:  # a broken update never takes a good version away
                        served[candidate.key] = (candidate.serving, old.served_from[candidate.key])
                    refused[candidate.key] = (candidate.fingerprint, outcome)
                elif outcome.keep is not None:  # same manifest, same checksums: same sessions
                    served[candidate.key] = (outcome.keep, candidate.fingerprint)
                else:
                    assert outcome.graphs is not None
                    model = self._served_model(candidate.directory, outcome.manifest, outcome.graphs)
                    await model.start()
                    started.append(model)
                    served[candidate.key] = (model, candidate.fingerprint)
        except BaseException:  # cancelled (shutdown) mid-way: nothing swapped in, nothing left running
            for model in started:
                await model.stop()
            raise

        new = Catalog.build(served, refused, frozenset(name for name, _ in found))
        self._catalog = new  # the swap: requests from here on resolve against the new set

        kept = {model for model, _ in served.values()}
        gone = [(key, model) for key, model in _keyed(old) if model not in kept]
        for key, model in gone:
            how = "replaced" if key in served else "removed"
            log.info("model %s %s; it stops once its calls in flight are done", _label(key), how)
            self._retire(model)
        self._update_gauge(old, new)
        new_models = set(started)
        loaded = tuple(_label(key) for key, model in _keyed(new) if model in new_models)
        removed = tuple(_label(key) for key, _ in gone if key not in served)
        if not at_start and (candidates or gone):
            log.info(
                "reload: loaded %s, removed %s, %d refused", list(loaded), list(removed), len(new.failures)
            )
        return ReloadReport(loaded=loaded, removed=removed, refused=new.failures)

    def _check_all(self, candidates: list[_Candidate], at_start: bool) -> list[_Checked | LoadFailure]:
        """Worker thread: check, load and warm up each candidate (hashing and session creation block)."""
        return [self._check_one(candidate, at_start) for candidate in candidates]

    def _check_one(self, candidate: _Candidate, at_start: bool) -> _Checked | LoadFailure:
        name, version = candidate.key
        shown = f"{name}/{version}"
        try:
            manifest = self._checked_manifest(candidate.directory, shown)
            if candidate.serving is not None and candidate.serving.manifest == manifest:
                return _Checked(manifest, keep=candidate.serving, graphs=None)
            graphs = load_graphs(
                candidate.directory,
                manifest,
                providers=self._providers,
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
        return _Checked(manifest, keep=None, graphs=graphs)

    def _refusal(self, candidate: _Candidate, reason: str) -> LoadFailure:
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
        for role, entry in (("encoder", manifest.files.encoder), ("decoder", manifest.files.decoder)):
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

    def _served_model(self, version_dir: Path, manifest: Manifest, graphs: Graphs) -> ServedModel:
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
        return ServedModel(
            manifest=manifest,
            path=version_dir,
            graph_providers={"encoder": graphs.encoder.providers, "decoder": graphs.decoder.providers},
            encoder=_batcher(graphs.encoder, "encoder", settings, metrics, manifest),
            decoder=_batcher(graphs.decoder, "decoder", settings, metrics, manifest),
            graphs=graphs,
        )

    def _retire(self, model: ServedModel) -> None:
        task = asyncio.create_task(
            model.retire(), name=f"retire-{model.manifest.name}/{model.manifest.version}"
        )
        self._retiring[model] = task
        task.add_done_callback(lambda _: self._retiring.pop(model, None))

    def _update_gauge(self, old: Catalog, new: Catalog) -> None:
        """vae_model_loaded: 1 served, 0 refused (and not served), no series for directories that are gone."""
        for key in old.served_from.keys() | old.refused.keys():
            if key not in new.served_from and key not in new.refused:
                with contextlib.suppress(KeyError):
                    self.metrics.model_loaded.remove(*key)
        for key in new.refused:
            if key not in new.served_from:
                self.metrics.model_loaded.labels(*key).set(0)
        for key in new.served_from:
            self.metrics.model_loaded.labels(*key).set(1)


def _keyed(catalog: Catalog) -> list[tuple[Key, ServedModel]]:
    """Every served version with its key, in order."""
    return [
        ((name, version), model)
        for name, versions in catalog.models.items()
        for version, model in versions.items()
    ]


def _label(key: Key) -> str:
    return f"{key[0]}/{key[1]}"


class _Refused(Exception):
    """A model version that cannot be served, with the reason for the log and /readyz."""
