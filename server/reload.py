"""Hot reload: rescan the model repository and bring the served versions in line with it.

A rescan compares the version folders on disk with what is served. A new version is loaded,
checked and warmed up off the event loop, and only then added to the registry in one step,
so requests see either the old set of versions or the new one. A version whose folder is gone
is taken out of the registry at once (no new request reaches it), then drained: requests that
already hold it finish on it before its batchers stop. A version that fails to load is logged
and remembered with a fingerprint of its files, so it is retried only once those change; the
versions already served keep serving.

Rescans run every ``interval_s`` seconds and on ``trigger()`` (wired to SIGHUP), one at a time.
In model control mode "explicit" (server/model_control.py) a rescan only refreshes what is
loaded: it retries failed versions whose files changed and unloads versions whose folders are
gone, but never adds a model or a version, since only the repository API decides those.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from vaeserve.manifest import list_versions

__all__ = ["VersionKey", "Fingerprint", "VersionOnDisk", "ReloadPlan", "ReloadTarget",
           "Reloader", "fingerprint", "scan_repository", "plan_reload"]  # fmt: skip

logger = logging.getLogger(__name__)

VersionKey = tuple[str, int]  # (model name, version)
Fingerprint = tuple[tuple[str, int, int], ...]  # (file name, size, mtime_ns) per file


@dataclass(frozen=True)
class VersionOnDisk:
    """A published version folder and a fingerprint of the files in it."""

    name: str
    version: int
    path: Path
    fingerprint: Fingerprint

    @property
    def key(self) -> VersionKey:
        return self.name, self.version


@dataclass(frozen=True)
class ReloadPlan:
    """What a rescan changes: versions to load, then versions to drain and unload."""

    load: tuple[VersionOnDisk, ...] = ()
    unload: tuple[VersionKey, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.load or self.unload)


class ReloadTarget(Protocol):
    """What the reloader changes: the registry of served versions (server/repository.py)."""

    def served(self) -> Iterable[VersionKey]: ...

    def failed(self) -> Mapping[VersionKey, Fingerprint]: ...

    async def load_version(self, version: VersionOnDisk) -> bool: ...

    async def unload_version(self, key: VersionKey) -> None: ...


def fingerprint(folder: Path) -> Fingerprint:
    """(name, size, mtime) of each file in ``folder``: changes when any file is replaced."""
    entries = []
    for path in sorted(folder.iterdir()):
        try:
            st = path.stat()
        except OSError:  # removed while we looked: the next scan sees the new state
            continue
        entries.append((path.name, st.st_size, st.st_mtime_ns))
    return tuple(entries)


def scan_repository(root: Path, names: Iterable[str] = ()) -> dict[VersionKey, VersionOnDisk]:
    """Every published version folder under ``root`` (of ``names`` only, when given).

    Folders that are not positive version numbers (e.g. the exporter's ".staging-*") are
    skipped: a version appears only once it is complete and renamed into place.

    Raises:
        OSError: ``root`` cannot be listed.
    """
    models = list(names) or sorted(p.name for p in root.iterdir() if p.is_dir())
    found = {}
    for name in models:
        try:
            versions = list_versions(root / name)
        except OSError as exc:  # NotADirectoryError, or the folder went away mid-scan
            logger.warning("rescan: skipping model folder %s: %s", root / name, exc)
            continue
        for version in versions:
            folder = root / name / str(version)
            try:
                found[(name, version)] = VersionOnDisk(name, version, folder, fingerprint(folder))
            except OSError as exc:
                logger.warning("rescan: skipping %s: %s", folder, exc)
    return found


def plan_reload(
    on_disk: Mapping[VersionKey, VersionOnDisk],
    served: Iterable[VersionKey],
    failed: Mapping[VersionKey, Fingerprint],
) -> ReloadPlan:
    """The changes that make the served versions match the disk.

    A version that failed before is retried only if its files changed since; one whose folder
    is gone is unloaded too, so that it is no longer reported as failed.
    """
    served = set(served)
    load = [
        v for key, v in sorted(on_disk.items())
        if key not in served and failed.get(key) != v.fingerprint
    ]  # fmt: skip
    unload = sorted((served | set(failed)) - set(on_disk))
    return ReloadPlan(tuple(load), tuple(unload))


class Reloader:
    """Runs rescans against a target: periodically, on ``trigger()``, or by ``rescan()``."""

    def __init__(
        self, target: ReloadTarget, root: Path, names: Iterable[str] = (),
        interval_s: float = 0.0, lock: asyncio.Lock | None = None, refresh_only: bool = False,
    ):  # fmt: skip
        """Args:
        interval_s: seconds between periodic rescans; 0 rescans only when triggered.
        lock: held while a rescan changes ``target``, shared with whatever else changes it.
        refresh_only: rescan only the versions ``target`` serves or failed to load.
        """
        self._target = target
        self._root = Path(root)
        self._names = tuple(names)
        self._interval_s = interval_s
        self._lock = lock or asyncio.Lock()
        self._refresh_only = refresh_only
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def rescan(self) -> ReloadPlan:
        """Scan once and apply the changes; returns what was planned."""
        async with self._lock:
            served, failed = list(self._target.served()), self._target.failed()
            names = self._names
            if self._refresh_only:
                known = {*served, *failed}
                names = tuple(sorted({name for name, _ in known}))
                if not names:  # scan_repository would take no names for all of them
                    return ReloadPlan()
            try:
                on_disk = await asyncio.to_thread(scan_repository, self._root, names)
            except OSError as exc:
                logger.error("rescan of %s failed, serving what is loaded: %s", self._root, exc)
                return ReloadPlan()
            if self._refresh_only:
                on_disk = {key: v for key, v in on_disk.items() if key in known}
            plan = plan_reload(on_disk, served, failed)
            for version in plan.load:
                await self._target.load_version(version)
            # Unloads drain concurrently: one long-running request must not delay the others.
            await asyncio.gather(*(self._target.unload_version(key) for key in plan.unload))
            return plan

    def start(self) -> None:
        """Start the rescan loop on the running event loop."""
        self._loop = asyncio.get_running_loop()
        self._task = self._loop.create_task(self._run(), name="vaeserve-reloader")

    def trigger(self) -> None:
        """Ask for a rescan now; safe from signal handlers and other threads."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._wakeup.set)

    async def stop(self) -> None:
        """Stop the loop; a rescan in progress is cancelled between steps."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    async def _run(self) -> None:
        timeout = self._interval_s or None
        while True:
            try:
                await asyncio.wait_for(self._wakeup.wait(), timeout)
            except TimeoutError:
                pass
            self._wakeup.clear()
            try:
                plan = await self.rescan()
            except Exception:  # noqa: BLE001 - the loop must outlive one bad rescan
                logger.exception("rescan failed; serving what is loaded")
                continue
            if plan:
                logger.info("rescan: %d version(s) loaded or tried, %d unloaded",
                            len(plan.load), len(plan.unload))  # fmt: skip
