"""What each call computes, on numpy arrays: noise, graph runs, draws.

These functions are the one path behind the server's servicers (where each graph is a
batcher) and the in-process ``Engine`` (where each graph runs directly). Jobs reach them
checked (``vaeserve.engine.checks``). All randomness comes from ``vaeserve.engine.sampling``,
keyed by the job's seed and each row's index, so sample i of seed s does not depend on the
request's size, chunking or batch-mates: the decoder only ever sees z rows, and every draw is
made per row from the counter-based generator.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import numpy as np

from vaeserve.engine import sampling
from vaeserve.manifest import ModelManifest

T = TypeVar("T")

__all__ = [
    "Graph",
    "Model",
    "SampleJob",
    "EncodeJob",
    "DecodeJob",
    "ReconstructJob",
    "ScoreJob",
    "Samples",
    "Encoding",
    "Scores",
    "sample",
    "encode",
    "decode",
    "reconstruct",
    "score",
    "score_noise",
]


class Graph(Protocol):
    """One graph of a model version: a batcher in the server, a direct run in the Engine."""

    async def run(
        self, inputs: Mapping[str, np.ndarray], deadline: float | None = None
    ) -> dict[str, np.ndarray]: ...


class Model(Protocol):
    """What the pipeline needs of a model version."""

    @property
    def manifest(self) -> ModelManifest: ...
    @property
    def encoder(self) -> Graph: ...
    @property
    def decoder(self) -> Graph: ...
    @property
    def prior_means(self) -> np.ndarray | None: ...  # (num_classes, latent_dim) float32

    # Optional: a VAE's learned mixture prior (sampling.MixturePrior). A model without the
    # attribute has the prior its manifest's prior_means imply, as before the mixture existed.
    # prior_mixture: sampling.MixturePrior | None


def _mixture(model: Model) -> sampling.MixturePrior | None:
    return getattr(model, "prior_mixture", None)


@dataclass(frozen=True)
class SampleJob:
    """Samples start..start+count-1 of ``seed``'s sequence."""

    count: int
    start: int
    seed: int
    temperature: float
    labels: np.ndarray | None  # (count,) int64; None for a vae
    draw: bool  # a draw from p(x|z) instead of E[x|z]

    def rows(self, offset: int, count: int) -> SampleJob:
        """The same job restricted to samples offset..offset+count-1 of this one."""
        labels = None if self.labels is None else self.labels[offset : offset + count]
        return SampleJob(count, self.start + offset, self.seed, self.temperature, labels, self.draw)


@dataclass(frozen=True)
class EncodeJob:
    x: np.ndarray  # (n, *sample_shape) in the manifest's sample dtype
    labels: np.ndarray | None  # (n,) int64 for a concat CVAE
    num_draws: int
    seed: int


@dataclass(frozen=True)
class DecodeJob:
    z: np.ndarray  # (n, latent_dim) float32
    labels: np.ndarray | None  # (n,) int64 for a concat CVAE
    draw: bool
    seed: int


@dataclass(frozen=True)
class ReconstructJob:
    x: np.ndarray  # (n, *sample_shape)
    labels: np.ndarray | None


@dataclass(frozen=True)
class ScoreJob:
    """Score inputs start..start+n-1 of ``seed``'s scoring sequence with k draws each."""

    x: np.ndarray  # (n, *sample_shape) in the manifest's sample dtype
    labels: np.ndarray | None  # (n,) int64 for a CVAE (both conditionings)
    k: int
    seed: int
    start: int
    chunk_rows: int  # decoder rows per step: the memory of one step beyond the accumulators


@dataclass(frozen=True)
class Samples:
    x: np.ndarray  # (count, *sample_shape) float32
    z: np.ndarray  # (count, latent_dim) float32
    seed: int  # the seed they were drawn with (chosen by the engine when none was given)


@dataclass(frozen=True)
class Encoding:
    mu: np.ndarray  # (n, latent_dim)
    logvar: np.ndarray  # (n, latent_dim)
    z: np.ndarray | None  # (n, num_draws, latent_dim) when draws were asked for


@dataclass(frozen=True)
class Scores:
    """Per input, in nats, float64 (n,) each."""

    elbo: np.ndarray  # mean_k log p(x|z) - kl
    log_px: np.ndarray  # logsumexp_k log w - log k: the importance-weighted bound
    log_likelihood: np.ndarray  # mean_k log p(x|z)
    # KL(q(z|x) || p(z[|y])): in closed form for a Gaussian prior; under a mixture prior the
    # mean over the k draws of log q(z|x) - log p(z), as training.losses computes it.
    kl: np.ndarray


async def sample(model: Model, job: SampleJob, deadline: float | None = None) -> Samples:
    """z from the prior (class means for a prior CVAE, a mixture's component for a VAE with
    a learned prior; the noise times temperature), then decoded."""
    m = model.manifest
    z = sampling.prior_latents(
        m.latent_dim,
        job.seed,
        job.start,
        job.count,
        job.temperature,
        labels=job.labels,
        prior_means=model.prior_means,
        mixture=_mixture(model),
    )
    x = await _decode(model, z, job.labels, job.draw, job.seed, job.start, deadline)
    return Samples(x=x, z=z, seed=job.seed)


async def encode(model: Model, job: EncodeJob, deadline: float | None = None) -> Encoding:
    """q(z|x[,y]): mean and log-variance; draw j of input i is row i*k+j of ENCODE_STREAM."""
    inputs = {"x": job.x}
    if model.manifest.encoder_takes_label:
        inputs["y"] = job.labels
    out = await model.encoder.run(inputs, deadline)
    mu, logvar = out["mu"], out["logvar"]  # (n, d) each
    if job.num_draws == 0:
        return Encoding(mu, logvar, None)
    n, d = mu.shape
    eps = sampling.normal_rows(job.seed, sampling.ENCODE_STREAM, 0, n * job.num_draws, d)
    eps = eps.reshape(n, job.num_draws, d)
    z = mu[:, None, :] + np.exp(0.5 * logvar)[:, None, :] * eps  # (n, k, d)
    return Encoding(mu, logvar, z.astype(np.float32, copy=False))


async def decode(model: Model, job: DecodeJob, deadline: float | None = None) -> np.ndarray:
    """E[x|z] or a draw from p(x|z) (row i of the draw is row i of OUTPUT_STREAM)."""
    return await _decode(model, job.z, job.labels, job.draw, job.seed, 0, deadline)


async def reconstruct(
    model: Model, job: ReconstructJob, deadline: float | None = None
) -> np.ndarray:
    """decode(mu(x)): the decoder's mean at the posterior mean latent."""
    encoding = await encode(model, EncodeJob(job.x, job.labels, 0, 0), deadline)
    return await _decode(model, encoding.mu, job.labels, False, 0, 0, deadline)


async def _decode(
    model: Model,
    z: np.ndarray,
    labels: np.ndarray | None,
    draw: bool,
    seed: int,
    start: int,
    deadline: float | None,
) -> np.ndarray:
    m = model.manifest
    inputs = {"z": z}
    if m.decoder_takes_label:
        inputs["y"] = labels
    params = await model.decoder.run(inputs, deadline)
    if not draw:
        return params[m.mean_output]
    return sampling.draw_from_likelihood(m.likelihood, params, seed, start, m.gaussian_sigma)


_LOG_2PI = math.log(2.0 * math.pi)
# A Bernoulli decoder answers float32 probabilities; they are clipped here so that a pixel the
# decoder saturates costs at most -log(2**-24) nats instead of an infinity.
_PROB_FLOOR = 2.0**-24


def score_noise(seed: int, start: int, n: int, k: int, width: int) -> np.ndarray:
    """(n, k, width) float32: draw j of input i is row (start + i) * k + j of SCORE_STREAM."""
    eps = sampling.normal_rows(seed, sampling.SCORE_STREAM, start * k, n * k, width)
    return eps.reshape(n, k, width)


async def _inline(function: Callable[..., T], *args: Any) -> T:
    return function(*args)


async def score(
    model: Model,
    job: ScoreJob,
    deadline: float | None = None,
    offload: Callable[..., Awaitable[Any]] = _inline,
) -> Scores:
    """The ELBO, the k-sample importance-weighted bound, E[log p(x|z)] and the KL of each
    input, as ``vaeserve.training.losses`` computes them, in float64.

    The n*k draws (input-major) go through the decoder in steps of at most ``job.chunk_rows``
    rows (``_score_steps``); between steps only per-input accumulators are kept (a running
    logsumexp of log w and the sum of log p(x|z)), so memory does not grow with k.
    """
    m = model.manifest
    inputs = {"x": job.x}
    if m.encoder_takes_label:
        inputs["y"] = job.labels
    out = await model.encoder.run(inputs, deadline)
    mu32, logvar32 = out["mu"], out["logvar"]  # (n, d) float32
    mu, logvar = mu32.astype(np.float64), logvar32.astype(np.float64)
    n, d = mu.shape
    if model.prior_means is not None:
        assert job.labels is not None, "a class-mean prior needs labels"
        prior_mu = model.prior_means[job.labels].astype(np.float64)
    else:
        prior_mu = np.zeros_like(mu)
    mixture = _mixture(model)
    x = job.x.reshape(n, -1).astype(np.float64)
    std32 = np.exp(np.float32(0.5) * logvar32)
    bound = _RunningBound(n, mixture)
    k = job.k
    # Each step's noise and its likelihoods are numpy work of ~10 µs a row. The server passes
    # ``offload=asyncio.to_thread`` so that a Score of many rows never holds its event loop
    # (numpy releases the GIL for the array arithmetic); the engine runs them inline.
    for a, b in _score_steps(n, k, max(1, job.chunk_rows)):
        rows = np.arange(a, b) // k  # the input of each flat row
        z32 = await offload(_score_draws, job, mu32, std32, rows, a, b)
        decoder_inputs = {"z": z32}
        if m.decoder_takes_label:
            decoder_inputs["y"] = job.labels[rows]
        params = await model.decoder.run(decoder_inputs, deadline)
        await offload(
            bound.add, m, rows, x[rows], z32, params, mu[rows], logvar[rows], prior_mu[rows]
        )
    if mixture is None:
        kl = 0.5 * ((mu - prior_mu) ** 2 + np.exp(logvar) - logvar - 1.0).sum(-1)
    else:
        kl = -bound.sum_log_ratio / k
    log_likelihood = bound.sum_log_px / k
    log_bound = bound.run_max + np.log(bound.run_sum) - math.log(k)
    return Scores(elbo=log_likelihood - kl, log_px=log_bound, log_likelihood=log_likelihood, kl=kl)


def _score_draws(
    job: ScoreJob, mu32: np.ndarray, std32: np.ndarray, rows: np.ndarray, a: int, b: int
) -> np.ndarray:
    """z of flat rows [a, b): (b-a, d) float32, as torch's reparameterize computes it."""
    eps = sampling.normal_rows(
        job.seed, sampling.SCORE_STREAM, job.start * job.k + a, b - a, mu32.shape[1]
    )
    return mu32[rows] + std32[rows] * eps


class _RunningBound:
    """Per-input accumulators across decoder steps: a running logsumexp of log w (its max and
    the sum of exp(log w - max)), the sum of log p(x|z), and under a mixture prior the sum of
    log p(z) - log q(z|x) (the KL's Monte Carlo estimate)."""

    def __init__(self, n: int, mixture: sampling.MixturePrior | None = None):
        self.run_max = np.full(n, -np.inf)
        self.run_sum = np.zeros(n)
        self.sum_log_px = np.zeros(n)
        self.sum_log_ratio = np.zeros(n)
        self.mixture = mixture

    def add(self, m, rows, x, z32, params, mu, logvar, prior_mu) -> None:
        log_px = _log_likelihood(m, x, params)
        z = z32.astype(np.float64)
        if self.mixture is None:
            log_pz = _log_normal_diag(z, prior_mu, 0.0)
        else:
            log_pz = self.mixture.log_prob(z)
        log_ratio = log_pz - _log_normal_diag(z, mu, logvar)
        log_w = log_px + log_ratio
        first = rows[0]
        local = rows - first
        width = rows[-1] - first + 1
        part = slice(first, first + width)
        step_max = np.full(width, -np.inf)
        np.maximum.at(step_max, local, log_w)
        new_max = np.maximum(self.run_max[part], step_max)
        scaled = np.exp(log_w - new_max[local])
        self.run_sum[part] = self.run_sum[part] * np.exp(self.run_max[part] - new_max) + (
            np.bincount(local, weights=scaled, minlength=width)
        )
        self.run_max[part] = new_max
        self.sum_log_px[part] += np.bincount(local, weights=log_px, minlength=width)
        if self.mixture is not None:
            self.sum_log_ratio[part] += np.bincount(local, weights=log_ratio, minlength=width)


def _score_steps(n: int, k: int, step: int) -> list[tuple[int, int]]:
    """Flat row ranges [a, b) of the decoder steps: whole inputs (k <= step), or one input's
    draws in blocks of ``step``. An input's draws thus meet the accumulators in the same
    blocks whichever other inputs share its request, so its score has the same bytes."""
    if k <= step:
        per = step // k
        return [(i * k, min(n, i + per) * k) for i in range(0, n, per)]
    return [(i * k + j, i * k + min(k, j + step)) for i in range(n) for j in range(0, k, step)]


def _log_normal_diag(z: np.ndarray, mu: np.ndarray, logvar: np.ndarray | float) -> np.ndarray:
    """log N(z; mu, diag exp(logvar)) summed over the last axis."""
    return -0.5 * (_LOG_2PI + logvar + (z - mu) ** 2 * np.exp(-logvar)).sum(-1)


def _log_likelihood(m: ModelManifest, x: np.ndarray, params: dict[str, np.ndarray]) -> np.ndarray:
    """log p(x|z) per row, summed over pixels, with the normalising constants training uses;
    x (rows, pixels) float64."""
    rows = len(x)
    if m.likelihood == "bernoulli":
        probs = params["probs"].reshape(rows, -1).astype(np.float64)
        probs = np.clip(probs, _PROB_FLOOR, 1.0 - _PROB_FLOOR)
        return (x * np.log(probs) + (1.0 - x) * np.log1p(-probs)).sum(1)
    mean = params["mean"].reshape(rows, -1).astype(np.float64)
    if m.likelihood == "gaussian":
        assert m.gaussian_sigma is not None, "a fixed-sigma Gaussian needs gaussian_sigma"
        log_sigma: np.ndarray | float = math.log(m.gaussian_sigma)
    else:
        log_sigma = np.broadcast_to(
            params["log_sigma"].astype(np.float64), params["mean"].shape
        ).reshape(rows, -1)
    per_pixel = -0.5 * (((x - mean) * np.exp(-log_sigma)) ** 2 + _LOG_2PI) - log_sigma
    return np.broadcast_to(per_pixel, x.shape).sum(1)
