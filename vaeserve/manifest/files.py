"""Manifest files and version folders on disk: read, write, list and load them.

Layout of a model repository::

    <repository>/<name>/<version>/encoder.onnx
    <repository>/<name>/<version>/decoder.onnx
    <repository>/<name>/<version>/manifest.json
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from vaeserve.atomic import write_atomically
from vaeserve.errors import ManifestError
from vaeserve.manifest.checking import verify_files
from vaeserve.manifest.schema import ModelManifest

__all__ = [
    "MANIFEST_FILE",
    "FILE_MODE",
    "DIR_MODE",
    "read_manifest",
    "write_manifest",
    "is_version_name",
    "list_versions",
    "load_version_manifest",
]

MANIFEST_FILE = "manifest.json"
# A published version is a folder named by a positive decimal integer without leading zeros.
# Anything else in a model folder (notably the exporter's ".staging-*" folders) is not a version.
_VERSION_RE = re.compile(r"^[1-9][0-9]{0,17}$")
# Files and folders of a version are published world-readable: the server may run as another
# (non-root) user than the exporter, and mkstemp/mkdtemp create them private (0600/0700).
FILE_MODE = 0o644
DIR_MODE = 0o755


def read_manifest(path: str | os.PathLike[str]) -> ModelManifest:
    """Read and validate ``manifest.json`` (schema only; see ``verify_files``).

    Raises:
        FileNotFoundError: no manifest at ``path``.
        ManifestError: not JSON, or a field is malformed.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no manifest (expected {MANIFEST_FILE})") from None
    try:
        data = json.loads(raw.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{path}: not valid JSON ({exc})") from None
    return ModelManifest.from_dict(data, source=str(path))


def write_manifest(manifest: ModelManifest, path: str | os.PathLike[str]) -> None:
    """Write ``manifest`` as JSON atomically (temp file in the same folder, then rename)."""
    # allow_nan=False: NaN/Infinity are not JSON, and other clients' parsers reject them.
    text = json.dumps(manifest.to_dict(), indent=2, sort_keys=False, allow_nan=False) + "\n"
    write_atomically(path, lambda f: f.write(text.encode("utf-8")))


def is_version_name(name: str) -> bool:
    """True if ``name`` is a published version folder's name ("1", "2", ...; no leading 0)."""
    return bool(_VERSION_RE.match(name))


def list_versions(model_dir: str | os.PathLike[str]) -> list[int]:
    """The published versions in ``<repository>/<name>``, ascending.

    Folders that are not a version number are skipped: the exporter stages a version in a
    folder starting with "." and renames it into place only once it is complete.

    Raises:
        NotADirectoryError: ``model_dir`` exists but is not a folder.
    """
    model_dir = Path(model_dir)
    if not model_dir.exists():
        return []
    if not model_dir.is_dir():
        raise NotADirectoryError(f"{model_dir}: expected a model folder of version folders")
    return sorted(
        int(entry.name)
        for entry in model_dir.iterdir()
        if is_version_name(entry.name) and entry.is_dir()
    )


def load_version_manifest(version_dir: str | os.PathLike[str]) -> ModelManifest:
    """Read and fully verify one published version folder, ``<repository>/<name>/<version>``.

    Checks the schema (``read_manifest``), that the folder is named after the manifest's
    ``version`` and its parent after its ``name``, and each graph's file and sha256
    (``verify_files``). The graphs' inputs/outputs need onnxruntime: see ``check_graph_io``.

    Raises:
        FileNotFoundError: no folder, or no manifest in it.
        ManifestError: naming the file and the field that is wrong.
    """
    version_dir = Path(version_dir)
    if not version_dir.is_dir():
        raise FileNotFoundError(f"{version_dir}: no such version folder")
    path = version_dir / MANIFEST_FILE
    manifest = read_manifest(path)
    if version_dir.name != str(manifest.version):
        raise ManifestError(
            f"{path}: field 'version' is {manifest.version}, but the version folder is "
            f"named {version_dir.name!r}"
        )
    if version_dir.resolve().parent.name != manifest.name:
        raise ManifestError(
            f"{path}: field 'name' is {manifest.name!r}, but the model folder is "
            f"named {version_dir.resolve().parent.name!r}"
        )
    verify_files(manifest, version_dir)
    return manifest
