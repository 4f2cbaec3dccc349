"""One model version opened in onnxruntime: its manifest checked against both graphs, warmed up.

``open_version`` is the one way a version folder becomes runnable: the server's registry
wraps the two runners in batchers, the in-process ``Engine`` runs them directly.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vaeserve.engine.runner import OnnxRunner
from vaeserve.engine.sampling import MixturePrior
from vaeserve.manifest import (
    ModelManifest,
    TensorSpec,
    check_graph_io,
    load_version_manifest,
    read_mixture,
)

__all__ = ["OpenVersion", "GraphOpener", "open_version", "prior_means", "mixture_prior"]

GraphOpener = Callable[[Path], OnnxRunner]
# Rows of the warm-up runs: the first run allocates, the larger one sizes the arenas.
_WARMUP_ROWS = (1, 64)


@dataclass(frozen=True)
class OpenVersion:
    """A version folder's manifest and its two graphs, open and checked."""

    manifest: ModelManifest
    manifest_json: str  # manifest.json as the exporter wrote it, for GetModelInfo
    path: Path
    encoder: OnnxRunner
    decoder: OnnxRunner
    prior: MixturePrior | None = None  # a learned mixture prior's numbers (manifest 'prior')


def open_version(folder: Path, open_graph: GraphOpener, max_warmup_rows: int = 64) -> OpenVersion:
    """Read, check and warm up the version in ``folder``.

    Args:
        open_graph: opens one graph file (provider and threads already chosen).
        max_warmup_rows: the largest warm-up batch (the server's max_batch_size).

    Raises:
        ManifestError: the manifest is malformed, a checksum or a graph's declared inputs and
            outputs disagree with it (the message names the file and the tensor).
        ProviderUnavailable / OSError: a graph cannot be opened.
    """
    manifest = load_version_manifest(folder)
    prior = mixture_prior(manifest, folder)
    runners = {}
    for role, spec in (("encoder", manifest.encoder), ("decoder", manifest.decoder)):
        runner = open_graph(folder / spec.file)
        check_graph_io(spec, *runner.signature(), source=str(folder / spec.file))
        for rows in _WARMUP_ROWS:
            inputs = _zeros(spec.inputs, min(rows, max_warmup_rows))
            runner.run(inputs)
            runner.run_small(inputs)
        runners[role] = runner
    # What write_manifest wrote, without reading the file a second time.
    text = json.dumps(manifest.to_dict(), indent=2) + "\n"
    return OpenVersion(manifest, text, folder, runners["encoder"], runners["decoder"], prior)


def prior_means(manifest: ModelManifest) -> np.ndarray | None:
    """The class means of a prior CVAE as (num_classes, latent_dim) float32; None otherwise."""
    if manifest.prior_means is None:
        return None
    return np.asarray(manifest.prior_means, dtype=np.float32)


def mixture_prior(manifest: ModelManifest, folder: Path) -> MixturePrior | None:
    """The mixture prior named by the manifest's ``prior`` field, read from ``folder``
    (whose checksums ``load_version_manifest`` has verified); None without one.

    Raises:
        ManifestError: the file's arrays disagree with the manifest.
    """
    if manifest.prior is None:
        return None
    means, logvars, weights = read_mixture(
        Path(folder) / manifest.prior.file, manifest.prior, manifest.latent_dim
    )
    return MixturePrior(means, logvars, weights)


def _zeros(inputs: Mapping[str, TensorSpec], rows: int) -> dict[str, np.ndarray]:
    """A warm-up batch: zeros of every declared input (class 0 for labels)."""
    return {
        name: np.zeros((rows, *spec.shape[1:]), dtype=spec.dtype) for name, spec in inputs.items()
    }
