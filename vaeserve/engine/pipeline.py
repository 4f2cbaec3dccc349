"""What each call computes, on numpy arrays: noise, graph runs, draws.

These functions are the one path behind the server's servicers (where each graph is a
batcher) and the in-process ``Engine`` (where each graph runs directly). Jobs reach them
checked (``vaeserve.engine.checks``). All randomness comes from ``vaeserve.engine.sampling``,
keyed by the job's seed and each row's index, so sample i of seed s does not depend on the
request's size, chunking or batch-mates: the decoder only ever sees z rows, and every draw is
made per row from the counter-based generator.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from vaeserve.engine import sampling
from vaeserve.manifest import ModelManifest

__all__ = [
    "Graph",
    "Model",
    "SampleJob",
    "EncodeJob",
    "DecodeJob",
    "ReconstructJob",
    "Samples",
    "Encoding",
    "sample",
    "encode",
    "decode",
    "reconstruct",
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
class Samples:
    x: np.ndarray  # (count, *sample_shape) float32
    z: np.ndarray  # (count, latent_dim) float32
    seed: int  # the seed they were drawn with (chosen by the engine when none was given)


@dataclass(frozen=True)
class Encoding:
    mu: np.ndarray  # (n, latent_dim)
    logvar: np.ndarray  # (n, latent_dim)
    z: np.ndarray | None  # (n, num_draws, latent_dim) when draws were asked for


async def sample(model: Model, job: SampleJob, deadline: float | None = None) -> Samples:
    """z from the prior (class means for a prior CVAE, times temperature), then decoded."""
    m = model.manifest
    z = sampling.prior_latents(
        m.latent_dim,
        job.seed,
        job.start,
        job.count,
        job.temperature,
        labels=job.labels,
        prior_means=model.prior_means,
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
