"""Model control: Triton's model control modes and its repository API (index, load, unload).

The mode (``--model-control-mode``) decides who changes what is served:

* none: every model of the repository (or of ``--models``) is loaded at start; the repository
  API may list, but load and unload are refused. SIGHUP rescans (server/reload.py).
* poll: the same, and the repository is also rescanned every ``--reload-interval`` seconds.
* explicit: only the ``--load-model`` models are loaded at start (none if it is empty); then
  models come and go through load and unload. SIGHUP only refreshes what is loaded: it never
  adds a model or a version, so a model unloaded through the API stays unloaded.

The repository holds models by folder name ("digits"); each is served as several protocol
models ("digits-encoder", "digits-decoder", ...). Load and unload take the folder name, or
one of its protocol models' names for the whole folder. A load serves every version folder
of the model, or the versions a Triton ``version_policy`` picks, the only part of a model
configuration honoured here (the rest comes from each version's manifest). Versions already
served whose files changed are loaded beside the old files and swapped in; calls in flight
finish on the old ones. An unload takes every version of the model out of service at once
and returns when the calls in flight on them have finished (up to ``grace_period_s``).
Rescans and these calls change what is served one at a time (``ModelRegistry.changes``).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from vaeserve.errors import InvalidRequest, ModelControlDisabled, ModelNotFound, NotServing
from vaeserve.manifest import list_versions
from vaeserve.server.reload import Reloader, VersionKey, scan_repository
from vaeserve.server.repository import ModelRegistry
from vaeserve.server.settings import ServerSettings

__all__ = ["IndexEntry", "VersionPolicy", "ModelControl", "reloader"]

# The registry's load states in Triton's words.
STATES = {"loading": "LOADING", "ready": "READY", "failed": "UNAVAILABLE", "unloading": "UNLOADING"}
UNLOADED = "unloaded"  # Triton's reason for a version that is on disk but not loaded
_POLICY_FORMS = (
    '{"all": {}}, {"latest": {"num_versions": N}} or {"specific": {"versions": [N, ...]}}'
)
T = TypeVar("T")


def reloader(registry: ModelRegistry, settings: ServerSettings) -> Reloader:
    """The rescans of ``settings.model_control_mode``: the whole repository (or ``--models``)
    in modes none and poll, only what is loaded in mode explicit."""
    explicit = settings.model_control_mode == "explicit"
    return Reloader(
        registry, settings.repository, () if explicit else settings.models,
        settings.reload_interval_s, lock=registry.changes, refresh_only=explicit,
    )  # fmt: skip


@dataclass(frozen=True)
class IndexEntry:
    """One row of the repository index: a version and its state, or a model without any."""

    name: str
    version: int | None  # None: a model folder that holds no version
    state: str = ""  # READY, LOADING, UNLOADING or UNAVAILABLE; "" with version None
    reason: str = ""


@dataclass(frozen=True)
class VersionPolicy:
    """Which of a model's versions on disk a load serves: all, the latest N, or some."""

    latest: int = 0  # > 0: the N highest version numbers
    specific: tuple[int, ...] = ()

    def select(self, name: str, on_disk: Iterable[int]) -> list[int]:
        """The versions to serve, ascending.

        Raises:
            ModelNotFound: a specific version has no folder.
        """
        versions = sorted(on_disk)
        if self.latest:
            return versions[-self.latest :]
        if self.specific:
            missing = sorted(set(self.specific) - set(versions))
            if missing:
                raise ModelNotFound(
                    f"version_policy.specific.versions {missing} of model {name!r} have no "
                    f"folder in the repository; versions on disk: {versions}"
                )
            return sorted(set(self.specific))
        return versions

    @classmethod
    def from_config(cls, text: str) -> VersionPolicy:
        """The policy of a Triton model configuration in JSON (load's "config" parameter).

        Raises:
            InvalidRequest: not JSON, a field other than version_policy, or a policy that
                is not one of Triton's three forms.
        """
        field = "parameters['config']"
        try:
            config = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InvalidRequest(f"{field}: expected a JSON model configuration, {exc}") from None
        if not isinstance(config, dict):
            raise InvalidRequest(f"{field}: expected a JSON object, got {text[:80]!r}")
        config = {_snake(k): v for k, v in config.items()}
        other = sorted(set(config) - {"version_policy"})
        if other:
            raise InvalidRequest(
                f"{field}: only 'version_policy' is honoured here (each version's manifest "
                f"holds the rest of its configuration), got {other}"
            )
        policy = config.get("version_policy", {"all": {}})
        field += ".version_policy"
        if not (isinstance(policy, dict) and len(policy) == 1):
            raise InvalidRequest(f"{field}: expected one of {_POLICY_FORMS}, got {policy!r}")
        kind, body = next(iter(policy.items()))
        body = {_snake(k): v for k, v in body.items()} if isinstance(body, dict) else body
        if kind == "all" and body == {}:
            return cls()
        if kind == "latest" and isinstance(body, dict) and set(body) == {"num_versions"}:
            return cls(latest=_number(body["num_versions"], f"{field}.latest.num_versions"))
        if kind == "specific" and isinstance(body, dict) and set(body) == {"versions"}:
            versions = body["versions"]
            if isinstance(versions, list) and versions:
                name = f"{field}.specific.versions"
                return cls(specific=tuple(_number(v, name) for v in versions))
        raise InvalidRequest(f"{field}: expected one of {_POLICY_FORMS}, got {policy!r}")


def _snake(key: str) -> str:
    # Protobuf's JSON form accepts lowerCamelCase names too ("numVersions").
    return "".join(f"_{c.lower()}" if c.isupper() else c for c in key)


def _number(value: Any, field: str) -> int:
    # Protobuf's JSON form writes 64-bit integers as strings: "versions": ["1", "2"].
    if isinstance(value, str) and value.isascii() and value.isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidRequest(f"{field}: expected an integer >= 1, got {value!r}")
    return value


def _check_parameters(parameters: Mapping[str, Any], allowed: Mapping[str, type], call: str):
    for name, value in parameters.items():
        if name.startswith("file:"):
            raise InvalidRequest(
                f"parameters[{name!r}]: model files in the request are not supported; "
                "publish the version into the repository (vae-export) and load it by name"
            )
        expected = allowed.get(name)
        if expected is None:
            raise InvalidRequest(
                f"parameters[{name!r}]: not a {call} parameter; expected {sorted(allowed)}"
            )
        if not isinstance(value, expected):
            raise InvalidRequest(
                f"parameters[{name!r}]: expected a {expected.__name__} parameter, got {value!r}"
            )


class ModelControl:
    """The repository API of one server: index, load and unload over its registry."""

    def __init__(
        self, registry: ModelRegistry, settings: ServerSettings, suffixes: Iterable[str] = ()
    ):
        """Args:
        suffixes: of the protocol models' names ("encoder" for "NAME-encoder"), so that
            load and unload also accept those names for their model folder.
        """
        self._registry = registry
        self._root = Path(settings.repository)
        self.mode = settings.model_control_mode
        self._suffixes = frozenset(suffixes)
        self._tasks: set[asyncio.Future[Any]] = set()  # the loop keeps only weak references

    async def index(self, ready_only: bool = False) -> list[IndexEntry]:
        """Every version on disk or loaded, by name then version; READY ones only if asked."""
        on_disk = await asyncio.to_thread(self._on_disk)
        statuses = {(s.name, s.version): s for s in self._registry.statuses()}
        entries = []
        for name in sorted({*on_disk, *(name for name, _ in statuses)}):
            versions = sorted({*on_disk.get(name, ()), *(v for n, v in statuses if n == name)})
            if not versions and not ready_only:
                entries.append(IndexEntry(name, None))
            for version in versions:
                status = statuses.get((name, version))
                entry = IndexEntry(name, version, "UNAVAILABLE", UNLOADED)
                if status is not None:
                    entry = IndexEntry(name, version, STATES[status.state], status.reason)
                if entry.state == "READY" or not ready_only:
                    entries.append(entry)
        return entries

    async def load(self, name: str, parameters: Mapping[str, Any]) -> None:
        """Serve the model folder ``name`` (or of protocol model ``name``) as its policy says.

        Raises:
            ModelControlDisabled: the mode is not explicit.
            InvalidRequest: an unknown parameter, a bad policy, or a version that failed to
                load (the message says why; the versions that loaded serve).
            ModelNotFound: no such model folder, or no version folder in it.
            NotServing: still loading at start, or shutting down.
        """
        self._check_mode("load")
        _check_parameters(parameters, {"config": str}, "load")
        policy = VersionPolicy()
        if "config" in parameters:
            policy = VersionPolicy.from_config(parameters["config"])
        folder = await self._folder(name)
        self._check_ready()
        await self._run(self._load(folder, policy))

    async def unload(self, name: str, parameters: Mapping[str, Any]) -> None:
        """Stop serving every version of model ``name`` and wait for its calls in flight.

        ``unload_dependents`` is accepted and ignored: no model here depends on another.

        Raises:
            ModelControlDisabled: the mode is not explicit.
            InvalidRequest: an unknown parameter.
            ModelNotFound: no such model, neither on disk nor loaded.
            NotServing: still loading at start, or shutting down.
        """
        self._check_mode("unload")
        _check_parameters(parameters, {"unload_dependents": bool}, "unload")
        folder = await self._folder(name)
        self._check_ready()
        await self._run(self._unload(folder))

    def _check_mode(self, call: str) -> None:
        if self.mode != "explicit":
            raise ModelControlDisabled(
                f"explicit model {call} is not allowed: model_control_mode is {self.mode!r}, "
                "expected 'explicit' (start the server with --model-control-mode explicit)"
            )

    async def _folder(self, name: str) -> str:
        if not name or "/" in name or "\\" in name or name.startswith("."):
            raise InvalidRequest(
                f"model_name: expected the name of a model folder of the repository, got {name!r}"
            )
        known = {*await asyncio.to_thread(self._on_disk), *self._loaded()}
        if name in known:
            return name
        model, _, suffix = name.rpartition("-")
        if suffix in self._suffixes and model in known:
            return model
        raise ModelNotFound(f"model {name!r} is not in the repository; models: {sorted(known)}")

    def _on_disk(self) -> dict[str, list[int]]:
        models = {}
        for path in sorted(self._root.iterdir()):
            if path.is_dir() and not path.name.startswith("."):
                try:
                    models[path.name] = list_versions(path)
                except OSError:  # removed while we looked
                    continue
        return models

    def _loaded(self) -> set[str]:
        return {s.name for s in self._registry.statuses()}

    def _check_ready(self) -> None:
        # The first load does not take the registry's lock, and a draining server stays so.
        if not self._registry.ready:
            raise NotServing("the server is still loading models or shutting down; retry")

    async def _run(self, change: Awaitable[T]) -> T:
        # A caller that gives up does not stop a change half way: it runs to its end.
        task = asyncio.ensure_future(change)
        self._tasks.add(task)
        task.add_done_callback(self._finished)
        return await asyncio.shield(task)

    def _finished(self, task: asyncio.Future[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled():
            task.exception()  # seen: a caller that went away cannot; the registry logged it

    async def _load(self, name: str, policy: VersionPolicy) -> None:
        registry = self._registry
        async with registry.changes:
            on_disk = await asyncio.to_thread(scan_repository, self._root, [name])
            if not on_disk:
                raise ModelNotFound(
                    f"model {name!r} holds no version to load: expected version folders "
                    f"{name}/1, {name}/2, ... with a manifest.json each"
                )
            chosen = policy.select(name, (v for _, v in on_disk))
            wanted = {(name, v): on_disk[(name, v)] for v in chosen}
            served = {key for key in registry.served() if key[0] == name}
            prints = registry.fingerprints()
            failures = []
            for key, version in sorted(wanted.items()):
                if key not in served:
                    if not await registry.load_version(version):
                        failures.append(f"version {key[1]}: {self._reason(key)}")
                elif prints.get(key) != version.fingerprint:
                    reason = await registry.replace_version(version)
                    if reason:
                        failures.append(f"version {key[1]} (its old files serve on): {reason}")
            stale: list[VersionKey] = [k for k in registry.failed() if k[0] == name]
            if not failures:
                # Only a load that fully succeeded drops what it does not want: one that
                # failed leaves serving what served (Triton's rule for a failed reload).
                stale += served
            await asyncio.gather(*(registry.unload_version(k) for k in set(stale) - set(wanted)))
            if failures:
                raise InvalidRequest(f"load failed for model {name!r}: {'; '.join(failures)}")

    def _reason(self, key: VersionKey) -> str:
        for status in self._registry.statuses():
            if (status.name, status.version) == key and status.reason:
                return status.reason
        return "the server is shutting down"

    async def _unload(self, name: str) -> None:
        registry = self._registry
        async with registry.changes:
            keys = {(s.name, s.version) for s in registry.statuses() if s.name == name}
            await asyncio.gather(*(registry.unload_version(key) for key in sorted(keys)))
