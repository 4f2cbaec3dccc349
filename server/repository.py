"""The model registry: a repository folder → checked manifests, warm sessions and batchers.

Layout: ``<repository>/<name>/<version>/{manifest.json, encoder.onnx, decoder.onnx}``. Each
version is checked (manifest schema, file checksums, the graphs' real inputs/outputs against
the manifest), warmed up, and given one batcher per graph. A version that fails any of this
is logged and reported as FAILED while the others serve; ``latest`` is the highest loaded
version. Servicers (the typed API, the Open Inference Protocol) share one registry.

Hot reload (server/reload.py) and the repository API (server/model_control.py) add, replace
and remove versions while serving, one change at a time (``changes``): a new version is
loaded and warmed up beside the served ones, then registered in one step; a replaced or
removed one is taken out of ``get`` at once and stops only when the calls that hold it
through ``use`` are done. Load states go to the metrics, and each load, failed load and
unload is one log line.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vaeserve.engine.runner import CPU_PROVIDER, OnnxRunner
from vaeserve.engine.sampling import MixturePrior
from vaeserve.engine.version import GraphOpener, OpenVersion, open_version, prior_means
from vaeserve.errors import ModelNotFound, NotServing, ProviderUnavailable, RepositoryError
from vaeserve.manifest import (
    ModelManifest,
    list_versions,
)
from vaeserve.server.batcher import DynamicBatcher
from vaeserve.server.metrics import GraphKey, ServerMetrics
from vaeserve.server.reload import Fingerprint, VersionKey, VersionOnDisk, fingerprint
from vaeserve.server.settings import ServerSettings, usable_cores

__all__ = ["RepositoryError", "VersionStatus", "LoadedModel", "ModelRegistry"]

logger = logging.getLogger(__name__)

_GRAPHS = ("encoder", "decoder")


@dataclass(frozen=True)
class VersionStatus:
    """Load state of one version: "loading", "ready", "failed" or "unloading"."""

    name: str
    version: int
    state: str
    reason: str = ""


@dataclass(frozen=True)
class LoadedModel:
    """A servable version: its manifest and one batcher per graph."""

    manifest: ModelManifest
    path: Path
    provider: str
    encoder: DynamicBatcher
    decoder: DynamicBatcher
    prior_means: np.ndarray | None  # (num_classes, latent_dim) float32 for a prior CVAE
    manifest_json: str  # the file's text, verbatim, for GetModelInfo
    prior_mixture: MixturePrior | None = None  # a VAE's learned mixture prior (prior.npz)


class _InUse:
    """``ModelRegistry.use``: a class, not a generator context manager, because every call
    enters one (1.9 instead of 2.8 µs a call)."""

    __slots__ = ("_registry", "_model")

    def __init__(self, registry: ModelRegistry, model: LoadedModel):
        self._registry, self._model = registry, model

    def __enter__(self) -> LoadedModel:
        self._registry._enter(self._model)
        return self._model

    def __exit__(self, *exc_info: object) -> None:
        self._registry._exit(self._model)


class ModelRegistry:
    """Every served version, by name and number; ``get`` is what servicers call."""

    def __init__(
        self,
        settings: ServerSettings,
        runner_factory: GraphOpener,
        metrics: ServerMetrics | None = None,
    ):
        """Args:
        runner_factory: opens one graph file (provider and threads already chosen).
        metrics: where batchers and load states report; a registry of its own if None.
        """
        self._settings = settings
        self._open = runner_factory
        self.metrics = metrics or ServerMetrics(settings.batching.max_batch_size)
        self.metrics.set_queue_depth_source(self._queue_depths)
        self._models: dict[str, dict[int, LoadedModel]] = {}
        self._status: dict[tuple[str, int], VersionStatus] = {}
        self._failed: dict[VersionKey, Fingerprint] = {}  # retried once their files change
        self._prints: dict[VersionKey, Fingerprint] = {}  # of the files each served one came from
        # By LoadedModel identity, not (name, version): a replaced version and its successor
        # share the key, and only the old one's calls are waited for.
        self._users: collections.Counter[int] = collections.Counter()  # calls in use()
        self._idle: dict[int, asyncio.Event] = {}  # set when a retired version is unused
        # Rescans and repository API calls change the served versions one at a time.
        self.changes = asyncio.Lock()
        self._ready = False
        self._draining = False
        self._in_flight = 0  # calls inside use(), so that shutdown can wait for them
        self.refused = 0  # calls answered UNAVAILABLE, so that shutdown sees them stop coming

    @property
    def ready(self) -> bool:
        """True once every version has been loaded (or has failed) and warmed up."""
        return self._ready and not self._draining

    def discover(self) -> list[Path]:
        """The version folders to load, each marked "loading".

        Raises:
            RepositoryError: the repository is missing, or a model named in the settings
                has no folder in it.
        """
        root = self._settings.repository
        if not root.is_dir():
            raise RepositoryError(f"repository {root} is not a folder")
        names = self._settings.models
        # Triton's "--load-model *": every model, as without --models in the other modes.
        if names == ("*",) or (not names and self._settings.model_control_mode != "explicit"):
            names = tuple(sorted(p.name for p in root.iterdir() if p.is_dir()))
        missing = [n for n in names if not (root / n).is_dir()]
        if missing:
            raise RepositoryError(f"models {missing} have no folder in repository {root}")
        folders = []
        for name in names:
            for version in list_versions(root / name):
                folders.append(root / name / str(version))
                self._set(name, version, "loading")
        return folders

    async def load(self) -> None:
        """Load, check and warm every discovered version, then mark the registry ready."""
        folders = self.discover()
        for folder in folders:
            await self._load_folder(folder, fingerprint(folder))
        self._ready = True
        logger.info("serving %d version(s) of %d model(s)", self.count(), len(self._models))

    async def load_version(self, version: VersionOnDisk) -> bool:
        """Load, check and warm up one version beside the served ones, then serve it.

        Returns:
            True if it serves now; False if it failed (logged, state "failed") or the
            registry is shutting down.
        """
        self._set(version.name, version.version, "loading")
        return await self._load_folder(version.path, version.fingerprint)

    async def replace_version(self, version: VersionOnDisk) -> str:
        """Serve a served version's changed files instead of the ones it was loaded from:
        loaded and warmed up beside the old ones, then swapped in; calls already in ``use``
        finish on the old ones.

        Returns:
            "" once the new files serve; else why they could not (the old files serve on).
        """
        old = self._models[version.name][version.version]
        try:
            sessions = await self._open_folder(version.path)
        except Exception as exc:  # noqa: BLE001 - the served files keep serving
            _log_failed(version.path, exc)
            return str(exc)
        if self._draining:
            return "the server is shutting down"
        await self._add(sessions, version.fingerprint)
        await self._retire(old, version.key, unloading=False)
        return ""

    async def _load_folder(self, folder: Path, prints: Fingerprint) -> bool:
        name, version = folder.parent.name, int(folder.name)
        try:
            sessions = await self._open_folder(folder)
        except Exception as exc:  # noqa: BLE001 - one bad version must not stop the rest
            _log_failed(folder, exc)
            self._set(name, version, "failed", str(exc))
            self._failed[(name, version)] = prints
            return False
        if self._draining:
            return False
        self._failed.pop((name, version), None)
        await self._add(sessions, prints)
        return True

    async def _open_folder(self, folder: Path) -> OpenVersion:
        loop = asyncio.get_running_loop()
        pool = ThreadPoolExecutor(1, thread_name_prefix="vaeserve-loader")
        try:
            rows = self._settings.batching.max_batch_size
            return await loop.run_in_executor(pool, open_version, folder, self._open, rows)
        finally:
            # Cancelled (shutdown while loading): never block the loop on a version that is
            # still loading; the thread ends once it is done.
            pool.shutdown(wait=False)

    async def unload_version(self, key: VersionKey) -> None:
        """Stop serving a version: new calls no longer find it, calls in ``use`` finish on it
        (for up to ``grace_period_s``), then its batchers finish their queues and stop."""
        name, version = key
        versions = self._models.get(name, {})
        model = versions.pop(version, None)
        if not versions:
            self._models.pop(name, None)
        self._failed.pop(key, None)
        self._prints.pop(key, None)
        if model is not None:
            await self._retire(model, key, unloading=True)
            event = {"event": "model_unloaded", "model": name, "version": version}
            logger.info("unloaded %s version %d", name, version, extra=event)
        self._status.pop(key, None)  # a failed version whose folder is gone is forgotten
        self.metrics.set_model_state(name, version, None)

    async def _retire(self, model: LoadedModel, key: VersionKey, unloading: bool) -> None:
        """Stop a version no longer in ``get`` once the calls that hold it are done (for up
        to ``grace_period_s``)."""
        if unloading:
            self._set(*key, "unloading")
        idle = self._idle.setdefault(id(model), asyncio.Event())
        try:
            if self._users[id(model)]:
                await asyncio.wait_for(idle.wait(), self._settings.grace_period_s)
        except TimeoutError:
            logger.warning(
                "%s version %d: %d call(s) still running after %.1f s; unloading",
                *key, self._users[id(model)], self._settings.grace_period_s,
            )  # fmt: skip
        finally:  # cancelled by shutdown too: close() no longer sees this version
            self._idle.pop(id(model), None)
            await model.encoder.stop()
            await model.decoder.stop()

    def served(self) -> list[VersionKey]:
        """(name, version) of every loaded version."""
        return [(name, v) for name, versions in self._models.items() for v in versions]

    def failed(self) -> dict[VersionKey, Fingerprint]:
        """Versions that failed to load, with a fingerprint of their files at the time."""
        return dict(self._failed)

    def fingerprints(self) -> dict[VersionKey, Fingerprint]:
        """Served versions, with a fingerprint of the files each was loaded from."""
        return dict(self._prints)

    async def _add(self, s: OpenVersion, prints: Fingerprint) -> None:
        m = s.manifest
        model = LoadedModel(
            manifest=m,
            path=s.path,
            provider=s.decoder.provider,
            encoder=self._batcher(s.encoder, m, "encoder"),
            decoder=self._batcher(s.decoder, m, "decoder"),
            prior_means=prior_means(m),
            manifest_json=s.manifest_json,
            prior_mixture=s.prior,
        )
        # No suspension point from here to the registration (start() never suspends): a
        # cancelled load cannot leave started batchers that close() would not find.
        await model.encoder.start()
        await model.decoder.start()
        self._models.setdefault(m.name, {})[m.version] = model
        self._prints[(m.name, m.version)] = prints
        self._set(m.name, m.version, "ready")
        event = {"event": "model_loaded", "model": m.name, "version": m.version}
        logger.info("loaded %s version %d on %s", m.name, m.version, model.provider, extra=event)

    def _batcher(self, runner: OnnxRunner, m: ModelManifest, graph: str) -> DynamicBatcher:
        observer = self.metrics.graph_observer(GraphKey(m.name, m.version, graph))
        name = f"{m.name}/{m.version}/{graph}"
        batching = self._settings.batching
        if batching.instances == 0:
            instances = 1
            if runner.provider == CPU_PROVIDER:
                instances = self._settings.intra_op_threads or usable_cores()
            batching = dataclasses.replace(batching, instances=min(instances, 64))
        return DynamicBatcher(runner, batching, name=name, observer=observer)

    def _queue_depths(self) -> Iterable[tuple[GraphKey, int]]:
        for model in self.models():
            m = model.manifest
            for graph in _GRAPHS:
                yield GraphKey(m.name, m.version, graph), getattr(model, graph).queue_length

    def get(self, name: str, version: int = 0) -> LoadedModel:
        """The served version ``version`` of ``name``; 0 means the highest loaded one.

        Raises:
            NotServing: still loading, or shutting down.
            ModelNotFound: no such model, or no such loaded version.
        """
        if not self.ready:
            self.refused += 1
            raise NotServing(
                "the server is shutting down; retry on another replica"
                if self._draining
                else "the server is still loading models; retry shortly"
            )
        versions = self._models.get(name)
        if versions is None:
            raise ModelNotFound(
                f"model.name {name!r} is not served here; served models: {sorted(self._models)}"
            )
        if version == 0:
            return versions[max(versions)]
        model = versions.get(version)
        if model is None:
            raise ModelNotFound(
                f"model.version {version} of {name!r} is not loaded; "
                f"loaded versions: {sorted(versions)} (0 means the latest)"
            )
        return model

    def use(self, name: str, version: int = 0) -> _InUse:
        """``get`` for the length of one call (``with registry.use(...) as model``); shutdown
        and unloading wait while any call is inside."""
        return self.hold(self.get(name, version))

    def hold(self, model: LoadedModel) -> _InUse:
        """``use`` of a model ``get`` just returned (with no ``await`` in between)."""
        return _InUse(self, model)

    def _enter(self, model: LoadedModel) -> None:
        self._in_flight += 1
        self._users[id(model)] += 1

    def _exit(self, model: LoadedModel) -> None:
        key = id(model)
        self._in_flight -= 1
        self._users[key] -= 1
        if not self._users[key]:
            del self._users[key]
            if key in self._idle:  # an unload waits for this version's last call
                self._idle[key].set()

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def versions(self, name: str) -> list[int]:
        """Loaded versions of ``name``, ascending."""
        return sorted(self._models.get(name, {}))

    def statuses(self) -> list[VersionStatus]:
        """Every discovered version with its load state, by name then version."""
        return [self._status[key] for key in sorted(self._status)]

    def models(self) -> list[LoadedModel]:
        """Every loaded version, by name then version."""
        return [v[n] for _, v in sorted(self._models.items()) for n in sorted(v)]

    def count(self) -> int:
        return sum(len(v) for v in self._models.values())

    def drain(self) -> None:
        """Refuse new requests (UNAVAILABLE); queued and running ones still finish."""
        self._draining = True

    async def close(self) -> None:
        """Stop every batcher after it has finished its queue."""
        self.drain()
        for model in self.models():
            self._set(model.manifest.name, model.manifest.version, "unloading")
            await model.encoder.stop()
            await model.decoder.stop()

    def _set(self, name: str, version: int, state: str, reason: str = "") -> None:
        self._status[(name, version)] = VersionStatus(name, version, state, reason)
        self.metrics.set_model_state(name, version, state)


def _log_failed(folder: Path, exc: Exception) -> None:
    logger.error(
        "skipping %s: %s", folder, exc, exc_info=not _expected(exc),
        extra={"event": "model_load_failed", "model": folder.parent.name,
               "version": int(folder.name)},
    )  # fmt: skip


def _expected(exc: Exception) -> bool:
    # Bad files are the user's to fix and their message says how; anything else gets a trace.
    return isinstance(exc, (ValueError, OSError, ProviderUnavailable))
