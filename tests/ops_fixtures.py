"""Helpers of the Open Inference Protocol, metrics, security and reload tests (not a test module).

They serve the tiny concat CVAE that the client's tests export once per session
(``client_fixtures.tiny_repository``), each test module from a copy of its own when it changes
the repository, through the in-process ``ServerThread`` of ``serving_fixtures``.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from client_fixtures import CVAE, tiny_repository

from vaeserve.manifest import MANIFEST_FILE
from vaeserve.server.settings import BatchingSettings, ServerSettings

__all__ = ["CVAE", "DECODER", "ENCODER", "pristine_version", "copy_repository", "add_version",
           "settings", "wait_until", "decoder_inputs"]  # fmt: skip

DECODER = f"{CVAE}-decoder"
ENCODER = f"{CVAE}-encoder"
WAIT_S = 30.0


def settings(repository: Path, **fields: Any) -> ServerSettings:
    """A CPU server on 127.0.0.1, any free port; batches of up to 16 rows."""
    batching = fields.pop("batching", BatchingSettings(max_batch_size=16, max_queue_delay_ms=2.0))
    base: dict[str, Any] = {"repository": repository, "port": 0, "device": "cpu",
                            "intra_op_threads": 1, "max_samples_per_request": 64}  # fmt: skip
    return ServerSettings(**{**base, **fields}, batching=batching)


def pristine_version(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Version 1 of the tiny CVAE as exported for the session; copy it, never change it."""
    return tiny_repository(tmp_path_factory) / CVAE / "1"


def copy_repository(tmp_path_factory: pytest.TempPathFactory, target: Path) -> Path:
    """``target`` holding version 1 of the tiny CVAE only."""
    shutil.copytree(pristine_version(tmp_path_factory), target / CVAE / "1")
    return target


def add_version(source: Path, repository: Path, version: int, broken: bool = False) -> Path:
    """Publish a copy of ``source`` (a version 1) as ``version`` the way the exporter does:
    staged beside its place, then renamed into it.

    ``broken`` tampers with the decoder so that its checksum no longer matches the manifest.
    """
    staging = repository / CVAE / f".staging-{version}"
    shutil.copytree(source, staging)
    manifest = staging / MANIFEST_FILE
    text = manifest.read_text()
    manifest.write_text(text.replace('"version": 1,', f'"version": {version},', 1))
    if broken:
        with open(staging / "decoder.onnx", "ab") as f:
            f.write(b"tampered")
    target = repository / CVAE / str(version)
    staging.rename(target)
    return target


def wait_until(condition: Callable[[], Any], what: str, timeout_s: float = WAIT_S) -> Any:
    """Poll ``condition`` until it returns something true; fail the test after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        result = condition()
        if result:
            return result
        time.sleep(0.02)
    pytest.fail(f"timed out after {timeout_s} s waiting for {what}")


def decoder_inputs(rows: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(z, y) for the tiny CVAE's decoder: (rows, 2) float32 and (rows,) int64 classes."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((rows, 2)).astype(np.float32)
    y = (np.arange(rows) % 10).astype(np.int64)
    return z, y
