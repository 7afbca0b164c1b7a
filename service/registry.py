"""The model registry: loads MODEL_DIR at start, remembers what it refused, reloads, and says when it is ready.

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
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import KeysView
from dataclasses import dataclass

from service.catalog import EMPTY, Catalog, Fingerprint, Key, LoadFailure, ServedModel
from service.loading import Candidate, Loader, scan
from service.metrics import Metrics
from service.runtime import available_providers, select_providers
from service.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReloadReport:
    """What a reload changed: versions loaded (new or changed files), versions no longer served (their
    directories are gone), and every version under MODEL_DIR that is not served as its files are now."""

    loaded: tuple[str, ...]  # NAME/VERSION
    removed: tuple[str, ...]  # NAME/VERSION
    refused: tuple[LoadFailure, ...]


class Registry:
    """The served model versions: `start()` loads MODEL_DIR, `reload()` rescans it, `stop()` ends serving."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self._root = settings.model_dir.absolute()  # absolute, so messages can be made relative to it
        self._catalog = EMPTY
        self._loader = Loader(settings, metrics, self._root)
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
        self._loader.providers = select_providers(self.settings.device, available_providers())
        log.info(
            "serving models from MODEL_DIR=%s; execution providers requested: %s (DEVICE=%s)",
            root.resolve(),
            self._loader.providers,
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
        candidates: list[Candidate] = []
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
            candidates.append(Candidate(key, directory, seen, serving))

        outcomes = await asyncio.to_thread(self._loader.check_all, candidates, at_start) if candidates else []
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
                    model = self._loader.served_model(candidate.directory, outcome.manifest, outcome.graphs)
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
