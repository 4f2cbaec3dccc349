"""``ModelInfo``: what a model version is and how it is served, built in one place.

``model_info`` builds it from a manifest (the server for ``GetModelInfo``, the in-process
engine for ``vae-generate --local``); ``to_proto`` and ``ModelInfo.from_proto`` are the two
directions of its wire form, written side by side so that they cannot drift apart.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from vaeserve.manifest import ModelManifest, TensorSpec
from vaeserve.proto.v1 import vaeserve_pb2 as pb
from vaeserve.tensors import NUMPY_DTYPES, WIRE_DTYPES

__all__ = ["Limits", "ModelInfo", "model_info", "to_proto"]


@dataclass(frozen=True)
class Limits:
    """The bounds a request to this model must keep (the server's settings)."""

    max_batch_size: int
    max_samples_per_request: int
    max_message_bytes: int
    max_stream_chunk_size: int
    default_stream_chunk_size: int
    max_stream_samples: int
    max_score_samples: int
    max_score_rows: int


@dataclass(frozen=True)
class ModelInfo:
    """One model version (its manifest) and the limits and provider it is served with."""

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
    max_message_bytes: int
    max_stream_chunk_size: int
    default_stream_chunk_size: int
    max_stream_samples: int
    max_score_samples: int
    max_score_rows: int

    @classmethod
    def from_proto(cls, resp: pb.GetModelInfoResponse) -> ModelInfo:
        """The inverse of ``to_proto``."""
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
            sample_dtype=NUMPY_DTYPES[m.sample_dtype].name,
            value_range=(m.value_low, m.value_high),
            likelihood=m.likelihood,
            available_versions=tuple(m.available_versions),
            manifest=json.loads(m.manifest_json) if m.manifest_json else {},
            provider=resp.provider,
            **{name: getattr(limits, name) for name in Limits.__dataclass_fields__},
        )


def model_info(
    manifest: ModelManifest,
    manifest_json: str,
    provider: str,
    versions: Sequence[int],
    limits: Limits,
) -> ModelInfo:
    """The ``ModelInfo`` of a version served on ``provider`` under ``limits``."""
    m = manifest
    return ModelInfo(
        name=m.name,
        version=m.version,
        kind=m.kind,
        conditioning=m.conditioning,
        latent_dim=m.latent_dim,
        num_classes=m.num_classes or 0,
        class_names=tuple(m.class_names),
        sample_shape=tuple(m.sample_shape),
        sample_dtype=m.sample_dtype,
        value_range=(m.value_range[0], m.value_range[1]),
        likelihood=m.likelihood,
        available_versions=tuple(versions),
        manifest=json.loads(manifest_json),
        provider=provider,
        **vars(limits),
    )


def to_proto(
    info: ModelInfo, manifest: ModelManifest, manifest_json: str
) -> pb.GetModelInfoResponse:
    """The ``GetModelInfo`` answer for ``info``; the manifest adds its graphs' tensors and
    ``manifest_json`` is sent verbatim."""
    model = pb.ModelInfo(
        name=info.name,
        version=info.version,
        kind=info.kind,
        conditioning=info.conditioning or "",
        latent_dim=info.latent_dim,
        num_classes=info.num_classes,
        class_names=info.class_names,
        sample_shape=info.sample_shape,
        sample_dtype=WIRE_DTYPES[info.sample_dtype],
        value_low=info.value_range[0],
        value_high=info.value_range[1],
        likelihood=info.likelihood,
        encoder_inputs=_tensor_infos(manifest.encoder.inputs),
        encoder_outputs=_tensor_infos(manifest.encoder.outputs),
        decoder_inputs=_tensor_infos(manifest.decoder.inputs),
        decoder_outputs=_tensor_infos(manifest.decoder.outputs),
        available_versions=info.available_versions,
        manifest_json=manifest_json,
    )
    limits = pb.ServerLimits(**{name: getattr(info, name) for name in Limits.__dataclass_fields__})
    return pb.GetModelInfoResponse(model=model, provider=info.provider, limits=limits)


def _tensor_infos(specs: Mapping[str, TensorSpec]) -> list[pb.TensorInfo]:
    return [
        pb.TensorInfo(name=name, dtype=WIRE_DTYPES[spec.dtype], shape=spec.shape)
        for name, spec in specs.items()
    ]
