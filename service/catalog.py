"""What is served: `ServedModel` (one loaded version and its batchers) and `Catalog`, one immutable view of
MODEL_DIR that requests resolve against (the registry swaps in a new one on reload).

The newest version of a name is the greatest loaded version, where versions that are plain integers
compare numerically (2 < 10) and rank above all others, and other versions compare as strings.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from service.batching import Array, Batcher, BatcherClosed
from service.errors import NotFound
from service.manifest import Manifest
from service.operations import F32
from service.runtime import CPU, Graph, Graphs

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


@dataclass(eq=False)
class ServedModel:
    """A loaded model version: its manifest and one batcher per graph. Implements `operations.VAE`."""

    manifest: Manifest
    path: Path
    graph_providers: dict[str, list[str]]  # "encoder" and "decoder" -> its session's providers, best first
    encoder: Batcher
    decoder: Batcher
    graphs: Graphs | None = field(default=None, repr=False)  # for calls after retirement (None: fakes)
    background: ServedModel | None = None  # the anomaly score's background model (manifest.anomaly), if any
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
        if self.background is not None:
            await self.background.start()

    async def stop(self) -> None:
        """Stop both batchers now: queued calls fail with BatcherClosed (503), runs in flight finish."""
        await self.encoder.stop()
        await self.decoder.stop()
        if self.background is not None:
            await self.background.stop()

    async def retire(self) -> None:
        """No longer served to new requests: wait for the calls already submitted, then stop the batchers.

        Calls that come later (a request resolved this version before the reload) run unbatched on a thread.
        """
        self._retired = True
        if self.background is not None:
            await self.background.retire()
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
