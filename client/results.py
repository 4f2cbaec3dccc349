"""What VaeClient and AsyncVaeClient return: the server's answers as frozen dataclasses
holding numpy arrays, each built from its answer by ``from_answer``."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from vaeserve.client.tensors import Answer
from vaeserve.info import ModelInfo

__all__ = ["ModelInfo", "SampleResult", "EncodeResult", "DecodeResult", "ScoreResult"]


@dataclass(frozen=True)
class SampleResult:
    """Samples start_index.. of ``seed`` (arrays are read-only views of the answer's bytes)."""

    model_name: str
    model_version: int
    seed: int
    start_index: int
    samples: np.ndarray  # (n, *sample_shape) in the requested encoding
    labels: np.ndarray | None  # (n,) int64 for a cvae
    latents: np.ndarray | None  # (n, latent_dim) float32 when asked for

    @classmethod
    def from_answer(cls, answer: Answer) -> SampleResult:
        resp = answer.message
        return cls(
            model_name=resp.model_name,
            model_version=resp.model_version,
            seed=resp.seed,
            start_index=resp.start_index,
            samples=answer.tensor("samples"),
            labels=answer.optional_tensor("labels"),
            latents=answer.optional_tensor("latents"),
        )


@dataclass(frozen=True)
class EncodeResult:
    model_name: str
    model_version: int
    mu: np.ndarray  # (n, latent_dim) float32
    logvar: np.ndarray  # (n, latent_dim) float32
    z: np.ndarray | None  # (n, num_draws, latent_dim) float32 when num_draws > 0
    seed: int

    @classmethod
    def from_answer(cls, answer: Answer) -> EncodeResult:
        return cls(
            model_name=answer.message.model_name,
            model_version=answer.message.model_version,
            mu=answer.tensor("mu"),
            logvar=answer.tensor("logvar"),
            z=answer.optional_tensor("z"),
            seed=answer.message.seed,
        )


@dataclass(frozen=True)
class DecodeResult:
    model_name: str
    model_version: int
    x: np.ndarray  # (n, *sample_shape)
    seed: int

    @classmethod
    def from_answer(cls, answer: Answer) -> DecodeResult:
        return cls(
            model_name=answer.message.model_name,
            model_version=answer.message.model_version,
            x=answer.tensor("x"),
            seed=answer.message.seed,
        )


@dataclass(frozen=True)
class ScoreResult:
    """Per input, in nats, float64 (n,) each; ``seed`` reproduces the draws."""

    model_name: str
    model_version: int
    seed: int
    k: int
    elbo: np.ndarray  # mean over the k draws of log p(x|z), less kl
    log_px: np.ndarray  # the k-sample importance-weighted bound on log p(x)
    log_likelihood: np.ndarray  # mean over the k draws of log p(x|z)
    kl: np.ndarray  # KL(q(z|x) || p(z[|y])), closed form

    @classmethod
    def from_answer(cls, answer: Answer) -> ScoreResult:
        resp = answer.message  # no tensors: the scores are repeated doubles
        return cls(
            model_name=resp.model_name,
            model_version=resp.model_version,
            seed=resp.seed,
            k=resp.k,
            elbo=np.array(resp.elbo, dtype=np.float64),
            log_px=np.array(resp.log_px, dtype=np.float64),
            log_likelihood=np.array(resp.log_likelihood, dtype=np.float64),
            kl=np.array(resp.kl, dtype=np.float64),
        )
