"""A VampPrior VAE's prior as the server reads it: the mixture of the encoder's posteriors at
the pseudo-inputs, evaluated once at export and written beside the graphs (prior.npz).

The server never runs the pseudo-inputs through the encoder: what it samples and scores with
is this file, which the parity gate then checks against the torch model's own log p(z).
"""

from __future__ import annotations

from pathlib import Path

import torch

from vaeserve.engine.sampling import MixturePrior
from vaeserve.manifest import PRIOR_FILE, PriorSpec, read_mixture, sha256_of_file, write_mixture

__all__ = ["write_prior"]


def write_prior(model: torch.nn.Module, staging: Path) -> tuple[PriorSpec, MixturePrior] | None:
    """Writes a VampPrior's mixture to ``staging``/PRIOR_FILE and reads it back as the server
    will; returns its manifest field and the mixture, or None for a Gaussian prior."""
    if model.config.prior != "vamp":
        return None
    with torch.no_grad():
        means, logvars, log_weights = model.prior_components()
    weights = torch.softmax(log_weights.double(), 0)  # sums to 1 in float64
    path = staging / PRIOR_FILE
    write_mixture(path, means.cpu().numpy(), logvars.cpu().numpy(), weights.cpu().numpy())
    spec = PriorSpec(file=PRIOR_FILE, sha256=sha256_of_file(path), components=len(weights))
    return spec, MixturePrior(*read_mixture(path, spec, model.config.latent_dim))
