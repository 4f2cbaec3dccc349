"""Checks of a manifest against its graphs: the files' bytes and the tensors they declare.

The schema (``schema.py``) checks a manifest on its own; these check it against what is on
disk (``verify_files``) and against what onnxruntime reports of a loaded graph
(``check_graph_io``). Neither imports onnx or onnxruntime: the caller passes what it read.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from vaeserve.errors import ManifestError
from vaeserve.manifest.graphs import ORT_TYPES, GraphSpec
from vaeserve.manifest.schema import ModelManifest

__all__ = ["sha256_of_file", "verify_files", "check_graph_io"]


def sha256_of_file(path: str | os.PathLike[str]) -> str:
    """The sha256 of the file at ``path`` as 64 lowercase hex digits, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_files(manifest: ModelManifest, version_dir: str | os.PathLike[str]) -> None:
    """Check that each graph file (and a mixture prior's file) exists and matches its recorded
    sha256.

    Raises:
        ManifestError: naming the file that is missing or differs.
    """
    version_dir = Path(version_dir)
    files = [(f"{role} graph", role, getattr(manifest, role)) for role in ("encoder", "decoder")]
    if manifest.prior is not None:
        files.append(("prior", "prior", manifest.prior))
    for what, field, spec in files:
        path = version_dir / spec.file
        if not path.is_file():
            raise ManifestError(f"{path}: {what} file is missing")
        actual = sha256_of_file(path)
        if actual != spec.sha256:
            raise ManifestError(
                f"{path}: sha256 is {actual}, manifest field '{field}.sha256' says {spec.sha256}"
            )


def check_graph_io(
    graph: GraphSpec,
    actual_inputs: Iterable[tuple[str, str, list[Any]]],
    actual_outputs: Iterable[tuple[str, str, list[Any]]],
    source: str,
) -> None:
    """Compare a graph's real inputs/outputs with what the manifest declares.

    Args:
        graph: the manifest's declaration.
        actual_inputs / actual_outputs: (name, onnxruntime type string such as
            "tensor(float)", shape with a string or None for symbolic axes), as reported by
            ``onnxruntime.InferenceSession.get_inputs()`` / ``get_outputs()``.
        source: the graph file, for messages.

    Raises:
        ManifestError: naming the file and the tensor that disagrees.
    """
    for kind, declared, actual in (
        ("input", graph.inputs, list(actual_inputs)),
        ("output", graph.outputs, list(actual_outputs)),
    ):
        names = [name for name, _, _ in actual]
        if sorted(names) != sorted(declared):
            raise ManifestError(
                f"{source}: graph {kind}s are {names}, manifest declares {list(declared)}"
            )
        for name, ort_type, shape in actual:
            spec = declared[name]
            dtype = ORT_TYPES.get(ort_type, ort_type)
            dims = [d if isinstance(d, int) else -1 for d in shape]
            if dtype != spec.dtype or dims != list(spec.shape):
                raise ManifestError(
                    f"{source}: {kind} '{name}' is {dtype}{dims} in the graph, "
                    f"manifest declares {spec.dtype}{list(spec.shape)}"
                )
