"""The ELBO, its terms and the importance-weighted bound, all per image in nats.

Conventions: every function returns one value per image (shape (B,)), summed over pixels and
latent dimensions; log-likelihoods carry their normalising constants, so a number from one
likelihood family is a true log-probability (Bernoulli) or log-density (Gaussian).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vaeserve.training.model import VAE, log_normal_mixture, reparameterize

__all__ = [
    "ElboTerms",
    "bernoulli_log_prob",
    "elbo_terms",
    "evaluate_bounds",
    "gaussian_log_prob",
    "iwae_bound",
    "kl_monte_carlo",
    "kl_normal",
    "log_likelihood",
    "log_normal_diag",
    "training_loss",
]

_LOG_2PI = math.log(2.0 * math.pi)
# Pixels decoded at once by the k-sample bounds (about 16 MB of float32 per output tensor).
_MAX_PIXELS = 1 << 22


@dataclass(frozen=True)
class ElboTerms:
    """Per-image terms of a single-sample ELBO estimate, each (B,)."""

    elbo: torch.Tensor  # log p(x|z) - KL
    log_likelihood: torch.Tensor  # log p(x|z) at one z ~ q(z|x)
    kl: torch.Tensor  # KL(q(z|x) || p(z)) in closed form


def kl_normal(
    mu: torch.Tensor, logvar: torch.Tensor, prior_mu: torch.Tensor | None = None
) -> torch.Tensor:
    """KL(N(μ, diag σ²) || N(μ_p, I)) in closed form, summed over the last axis.

    Kingma & Welling 2014, Appendix B (the seed's eq. 6), with the prior mean μ_p of the
    learned-prior CVAE: ½ Σ_j ((μ_j − μ_p,j)² + σ_j² − log σ_j² − 1).

    Args:
        mu: (..., D) posterior means.
        logvar: (..., D) posterior log-variances.
        prior_mu: (..., D) prior means; None means the standard normal.

    Returns:
        (...,) KL divergences in nats.
    """
    diff = mu if prior_mu is None else mu - prior_mu
    return 0.5 * (diff.pow(2) + logvar.exp() - logvar - 1.0).sum(-1)


def kl_monte_carlo(
    model: VAE,
    z: torch.Tensor,
    mu: torch.Tensor,
    logvar: torch.Tensor,
    y: torch.Tensor | None = None,
) -> torch.Tensor:
    """One-sample estimate log q(z|x) − log p(z[|y]) of KL(q || p) at z ~ q; (...,).

    For a prior without a closed-form KL (the VampPrior's mixture); unbiased, and for
    N(0, I) its mean over draws is `kl_normal` (tested).
    """
    return log_normal_diag(z, mu, logvar) - model.log_prior(z, y)


def log_normal_diag(z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """log N(z; μ, diag exp(logvar)), summed over the last axis; (...,)."""
    return -0.5 * (_LOG_2PI + logvar + (z - mu).pow(2) * torch.exp(-logvar)).sum(-1)


def bernoulli_log_prob(x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """log Bernoulli(x; sigmoid(logits)) summed over all but the first axis; (B,).

    The seed's eq. 11 writes a product over pixels; the log-likelihood is a sum. Computed
    from logits (binary_cross_entropy_with_logits) so saturated pixels stay finite.
    """
    nll = F.binary_cross_entropy_with_logits(logits, x, reduction="none")
    return -nll.flatten(1).sum(1)


def gaussian_log_prob(
    x: torch.Tensor, mean: torch.Tensor, log_sigma: torch.Tensor | float
) -> torch.Tensor:
    """log N(x; mean, σ²) per pixel, summed over all but the first axis; (B,).

    The seed's eq. 13 with its normalising constant D/2·log 2π, D the number of pixels.
    """
    log_sigma = torch.as_tensor(log_sigma, dtype=mean.dtype, device=mean.device)
    sq = ((x - mean) * torch.exp(-log_sigma)).pow(2)
    per_pixel = -0.5 * (sq + _LOG_2PI) - log_sigma
    return per_pixel.expand_as(x).flatten(1).sum(1)


def log_likelihood(model: VAE, x: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
    """log p(x|z) under `model`'s likelihood for decoder parameters `params`; (B,)."""
    likelihood = model.config.likelihood
    if likelihood == "bernoulli":
        return bernoulli_log_prob(x, params["logits"])
    if likelihood == "gaussian":
        return gaussian_log_prob(x, params["mean"], math.log(model.config.gaussian_sigma))
    return gaussian_log_prob(x, params["mean"], params["log_sigma"])


def _labels(model: VAE, y: torch.Tensor | None) -> torch.Tensor | None:
    if model.needs_label and y is None:
        raise ValueError("y: a CVAE's bound needs the class indices (B,) of the images")
    return y if model.needs_label else None


def elbo_terms(
    model: VAE,
    x: torch.Tensor,
    y: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    eps: torch.Tensor | None = None,
) -> ElboTerms:
    """Single-sample ELBO estimate with the KL term in closed form; ``eps`` (B, latent_dim):
    the noise to use instead of drawing it."""
    y = _labels(model, y)
    mu, logvar = model.encode(x, y)
    z = reparameterize(mu, logvar, generator, eps)  # (B, latent_dim)
    rec = log_likelihood(model, x, model.decoder_params(z, y))
    if model.gaussian_prior:
        kl = kl_normal(mu, logvar, model.prior_mean(y, len(x)) if y is not None else None)
    else:
        kl = kl_monte_carlo(model, z, mu, logvar, y)
    return ElboTerms(elbo=rec - kl, log_likelihood=rec, kl=kl)


def _log_weights(
    model: VAE,
    x: torch.Tensor,
    y: torch.Tensor | None,
    k: int,
    beta: float,
    generator: torch.Generator | None,
    eps: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns log w (k, B), log p(x|z) (k, B) and the KL (B,): in closed form for a Gaussian
    prior, else the mean over the k draws of log q(z|x) − log p(z); ``eps`` (k, B,
    latent_dim): the noise to use instead of drawing it."""
    y = _labels(model, y)
    batch = len(x)
    mu, logvar = model.encode(x, y)  # (B, latent_dim)
    prior_mu = model.prior_mean(y, batch) if y is not None else torch.zeros_like(mu)
    # The mixture's components are computed once, not once per chunk of draws.
    components = None if model.gaussian_prior else model.prior_components()

    def log_prior(z: torch.Tensor) -> torch.Tensor:
        if components is None:
            return log_normal_diag(z, prior_mu, torch.zeros_like(mu))
        return log_normal_mixture(z, *components)

    rows = max(1, _MAX_PIXELS // math.prod(model.config.data_shape))
    chunk = max(1, min(k, rows // max(batch, 1)))
    log_w, log_px, log_ratio = [], [], []
    for start in range(0, k, chunk):
        s = min(chunk, k - start)
        noise = None if eps is None else eps[start : start + s]
        z = reparameterize(mu.expand(s, -1, -1), logvar.expand(s, -1, -1), generator, noise)
        flat_y = None if y is None else y.repeat(s)  # matches z.flatten(0, 1): sample-major
        params = model.decoder_params(z.flatten(0, 1), flat_y)
        x_rep = x.expand(s, *x.shape).flatten(0, 1)  # (s*B, C, H, W)
        rec = log_likelihood(model, x_rep, params).view(s, batch)
        log_prior_over_q = log_prior(z) - log_normal_diag(z, mu, logvar)
        log_w.append(rec + beta * log_prior_over_q)  # (s, B)
        log_px.append(rec)
        log_ratio.append(log_prior_over_q)
    if model.gaussian_prior:
        kl = kl_normal(mu, logvar, prior_mu)
    else:
        kl = -torch.cat(log_ratio).mean(0)
    return torch.cat(log_w), torch.cat(log_px), kl


def iwae_bound(
    model: VAE,
    x: torch.Tensor,
    y: torch.Tensor | None = None,
    k: int = 1,
    beta: float = 1.0,
    generator: torch.Generator | None = None,
    eps: torch.Tensor | None = None,
) -> torch.Tensor:
    """Importance-weighted bound log (1/k) Σ_i p(x, z_i)/q(z_i|x) (Burda et al. 2016); (B,).

    With k = 1 its expectation is the ELBO; it never decreases in expectation as k grows and
    tends to log p(x). `beta` scales log p(z)/q(z|x) for KL warm-up (β ≠ 1 is not a bound).
    """
    log_w, _, _ = _log_weights(model, x, y, k, beta, generator, eps)
    return torch.logsumexp(log_w, dim=0) - math.log(k)


def evaluate_bounds(
    model: VAE,
    x: torch.Tensor,
    y: torch.Tensor | None = None,
    k: int = 1000,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (ELBO, importance-weighted bound, KL), each (B,), from one pass of k samples.

    The ELBO averages log p(x|z) over the k samples and subtracts the KL, in closed form for
    a Gaussian prior (the lower-variance estimate), else averaged over the same k draws;
    −bound estimates the NLL −log p(x).
    """
    log_w, log_px, kl = _log_weights(model, x, y, k, 1.0, generator)
    return log_px.mean(0) - kl, torch.logsumexp(log_w, dim=0) - math.log(k), kl


def training_loss(
    model: VAE,
    x: torch.Tensor,
    y: torch.Tensor | None = None,
    beta: float = 1.0,
    k: int = 1,
    eps: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (loss, per-image ELBO estimate): −mean of the β-ELBO (k = 1) or of the IWAE
    bound with k samples. The second value is detached, for progress reports. ``eps``
    (k, B, latent_dim): the noise to use instead of drawing it."""
    if k == 1:
        terms = elbo_terms(model, x, y, eps=None if eps is None else eps[0])
        loss = -(terms.log_likelihood - beta * terms.kl).mean()
        return loss, terms.elbo.detach()
    bound = iwae_bound(model, x, y, k, beta, eps=eps)
    return -bound.mean(), bound.detach()
