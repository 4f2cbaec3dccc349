"""What VaeClient returns: the server's answers as frozen dataclasses holding numpy arrays."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
from vaeserve.client.tensors import Answer, dtype_name

from vaeserve.proto.v1 import vaeserve_pb2 as pb

__all__ = ["ModelInfo", "SampleResult", "EncodeResult", "DecodeResult"]


@dataclass(frozen=True)
class ModelInfo:
    """What the server says about one model version (its manifest) and about itself."""

    name: str
    version: int
    kind: str  # "vae" | "cvae"
    conditioning: str | None  # "concat" | "prior" | None
    latent_dim: int
    num_classes: int  # 0 for a vae
    class_names: tuple[str, ...]
    sample_shape: tuple[int, ...]
    sample_dtype: str
    value_range: tuple[float, float]
    likelihood: str
    available_versions: tuple[int, ...]
    manifest: dict[str, Any]  # manifest.json of this version, parsed
    provider: str
    max_batch_size: int
    max_samples_per_request: int
    max_stream_chunk_size: int
    default_stream_chunk_size: int
    max_stream_samples: int

    @classmethod
    def from_proto(cls, resp: pb.GetModelInfoResponse) -> ModelInfo:
        m, limits = resp.model, resp.limits
        return cls(
            name=m.name,
            version=m.version,
            kind=m.kind,
            conditioning=m.conditioning or None,
            latent_dim=m.latent_dim,
            num_classes=m.num_classes,
            class_names=tuple(m.class_names),
            sample_shape=tuple(m.sample_shape),
            sample_dtype=dtype_name(m.sample_dtype),
            value_range=(m.value_low, m.value_high),
            likelihood=m.likelihood,
            available_versions=tuple(m.available_versions),
            manifest=json.loads(m.manifest_json) if m.manifest_json else {},
            provider=resp.provider,
            max_batch_size=limits.max_batch_size,
            max_samples_per_request=limits.max_samples_per_request,
            max_stream_chunk_size=limits.max_stream_chunk_size,
            default_stream_chunk_size=limits.default_stream_chunk_size,
            max_stream_samples=limits.max_stream_samples,
        )


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


@dataclass(frozen=True)
class DecodeResult:
    model_name: str
    model_version: int
    x: np.ndarray  # (n, *sample_shape)
    seed: int
