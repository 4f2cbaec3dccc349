"""A version's learned prior p(z): its manifest field and the file that holds its numbers.

A VAE trained with the VampPrior has p(z) = Σ_k w_k N(z; m_k, diag exp(logvar_k)), the
mixture of the encoder's posteriors at its pseudo-inputs. The exporter evaluates those
posteriors once and writes the mixture to ``prior.npz`` in the version folder (``means`` and
``logvars`` (K, latent_dim) float32, ``weights`` (K,) float64); the manifest's ``prior`` field
names the file, its sha256 and K, so the server samples and scores with exactly the exported
prior and never runs the pseudo-inputs through the encoder. A version without the field has
the standard normal prior (or a prior CVAE's class means, ``prior_means``), as before.

numpy is imported where the file is read or written: the manifest's schema stays importable
without it.
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vaeserve.errors import ManifestError
from vaeserve.manifest.fields import file_reference

__all__ = ["MIXTURE_KIND", "PRIOR_FILE", "PriorSpec", "read_mixture", "read_prior", "write_mixture"]

MIXTURE_KIND = "gaussian-mixture"
PRIOR_FILE = "prior.npz"
# The weights are float64 and renormalised by the sampler; a file whose weights stray further
# from 1 than rounding was written by something else.
_WEIGHT_SUM_TOLERANCE = 1e-6


@dataclass(frozen=True)
class PriorSpec:
    """The manifest's ``prior`` field: a Gaussian mixture stored in ``file``."""

    file: str
    sha256: str
    components: int
    kind: str = MIXTURE_KIND

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "file": self.file,
            "sha256": self.sha256,
            "components": self.components,
        }


def read_prior(value: Any, source: str) -> PriorSpec | None:
    """The ``prior`` field of a manifest (None when absent or null).

    Raises:
        ManifestError: naming the sub-field that is malformed.
    """
    if value is None:
        return None
    where = f"{source}: field 'prior'"
    if not isinstance(value, Mapping):
        raise ManifestError(f"{where} is {value!r}, expected a JSON object or null")
    kind = value.get("kind")
    if kind != MIXTURE_KIND:
        raise ManifestError(f"{where}.kind is {kind!r}, expected {MIXTURE_KIND!r}")
    file, sha = file_reference(value, where)
    components = value.get("components")
    if isinstance(components, bool) or not isinstance(components, int) or components < 1:
        raise ManifestError(f"{where}.components is {components!r}, expected an integer >= 1")
    return PriorSpec(file=file, sha256=sha, components=components)


def write_mixture(path: str | os.PathLike[str], means: Any, logvars: Any, weights: Any) -> None:
    """Write a mixture prior as an uncompressed npz (plain arrays, no pickles)."""
    import numpy as np

    buffer = io.BytesIO()
    np.savez(
        buffer,
        means=np.asarray(means, dtype=np.float32),
        logvars=np.asarray(logvars, dtype=np.float32),
        weights=np.asarray(weights, dtype=np.float64),
    )
    Path(path).write_bytes(buffer.getvalue())


def read_mixture(path: str | os.PathLike[str], spec: PriorSpec, latent_dim: int) -> tuple:
    """(means, logvars) (K, latent_dim) float32 and weights (K,) float64 of a mixture file.

    The file's checksum is checked by ``verify_files``; this checks what it holds against the
    manifest: the arrays, their shapes, finite values and weights that are a distribution.

    Raises:
        FileNotFoundError: no such file.
        ManifestError: naming the file and the array that is wrong.
    """
    import numpy as np

    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in ("means", "logvars", "weights") if key in data}
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as exc:
        raise ManifestError(f"{path}: not a readable npz of plain arrays ({exc})") from None
    k = spec.components
    expected = {"means": (k, latent_dim), "logvars": (k, latent_dim), "weights": (k,)}
    for key, shape in expected.items():
        array = arrays.get(key)
        if array is None:
            raise ManifestError(f"{path}: array '{key}' is missing, expected shape {list(shape)}")
        if array.shape != shape or array.dtype.kind != "f":
            raise ManifestError(
                f"{path}: array '{key}' is {array.dtype}{list(array.shape)}, expected floats "
                f"of shape {list(shape)} (prior.components {k}, latent_dim {latent_dim})"
            )
        if not np.isfinite(array).all():
            raise ManifestError(f"{path}: array '{key}' holds NaN or Inf values")
    weights = arrays["weights"].astype(np.float64)
    if (weights < 0).any() or abs(weights.sum() - 1.0) > _WEIGHT_SUM_TOLERANCE:
        raise ManifestError(
            f"{path}: array 'weights' sums to {weights.sum():.9g} with minimum "
            f"{weights.min():.3g}, expected non-negative weights summing to 1"
        )
    means = arrays["means"].astype(np.float32)
    logvars = arrays["logvars"].astype(np.float32)
    return means, logvars, weights
