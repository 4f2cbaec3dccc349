"""A fake reload target (the registry's side of ``Reloader``), for the reload and
model-control tests."""

from __future__ import annotations


class FakeTarget:
    """Records what the reloader asks; versions named in ``broken`` fail to load."""

    def __init__(self, served=(), broken=()):
        self.loaded = set(served)
        self.failures: dict = {}
        self.broken = set(broken)
        self.calls: list[tuple[str, tuple[str, int]]] = []

    def served(self):
        return set(self.loaded)

    def failed(self):
        return dict(self.failures)

    async def load_version(self, version):
        self.calls.append(("load", version.key))
        if version.key in self.broken:
            self.failures[version.key] = version.fingerprint
            return False
        self.loaded.add(version.key)
        return True

    async def unload_version(self, key):
        self.calls.append(("unload", key))
        self.loaded.discard(key)
