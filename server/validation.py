"""Request validation, once, at the gRPC boundary, against the model's manifest.

One function per request type turns a proto request into a job for server/pipeline.py or
raises ``InvalidRequest`` naming the field and what was expected. Past this point the
batchers and runners trust what they get: right dtype, shape, label range, finite values.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from vaeserve.engine import sampling
from vaeserve.engine.checks import (
    check_answer_size,
    check_finite,
    check_in_range,
    check_labels,
    check_value_range,
)
from vaeserve.engine.pipeline import DecodeJob, EncodeJob, ReconstructJob, SampleJob, ScoreJob
from vaeserve.errors import InvalidRequest
from vaeserve.manifest import ModelManifest
from vaeserve.proto.v1 import vaeserve_pb2 as pb
from vaeserve.server.handlers import detached_bytes
from vaeserve.server.settings import ServerSettings
from vaeserve.tensors import dtype_name, to_array

__all__ = [
    "MAX_TEMPERATURE",
    "check_model_ref",
    "validate_sample",
    "validate_chunk_size",
    "validate_encode",
    "validate_decode",
    "validate_reconstruct",
    "validate_score",
]

_SAMPLE_ITEMSIZE = {
    pb.SAMPLE_ENCODING_FLOAT32: 4,
    pb.SAMPLE_ENCODING_FLOAT16: 2,
    pb.SAMPLE_ENCODING_UINT8: 1,
}
_OUTPUT_KINDS = (pb.OUTPUT_KIND_MEAN, pb.OUTPUT_KIND_DRAW)
_FLOAT_WIRE = (pb.FLOAT32, pb.FLOAT16)
# Far past any useful scale of the prior; far below where latents (|eps| < 7.6) or a
# decoder's first layer could overflow float32.
MAX_TEMPERATURE = 1e6


def check_model_ref(ref: pb.ModelRef) -> tuple[str, int]:
    """(name, version) of a request's model field; version 0 means the latest."""
    if not ref.name:
        raise InvalidRequest("model.name is empty, expected the name of a served model")
    if ref.version < 0:
        raise InvalidRequest(f"model.version is {ref.version}, expected >= 0 (0: the latest)")
    return ref.name, ref.version


def validate_sample(
    request: pb.SampleRequest, m: ModelManifest, settings: ServerSettings, stream: bool = False
) -> SampleJob:
    """A SampleRequest (alone, or inside a SampleStreamRequest when ``stream``)."""
    field = "request." if stream else ""
    n = request.num_samples
    limit = settings.max_stream_samples if stream else settings.max_samples_per_request
    check_in_range(f"{field}num_samples", n, 1, limit)
    check_in_range(f"{field}start_index", request.start_index, 0, sampling.MAX_ROW_INDEX - n)
    temperature = request.temperature if request.HasField("temperature") else 1.0
    if not 0 <= temperature <= MAX_TEMPERATURE:  # NaN fails too
        raise InvalidRequest(
            f"{field}temperature is {temperature}, expected a number in 0..{MAX_TEMPERATURE:g}"
        )
    _enum(f"{field}output", request.output, _OUTPUT_KINDS, pb.OutputKind)
    _enum(f"{field}encoding", request.encoding, tuple(_SAMPLE_ITEMSIZE), pb.SampleEncoding)
    if not stream:
        _fits_message("num_samples", n, _sample_bytes(request, m), settings)
    return SampleJob(
        count=n,
        start=request.start_index,
        seed=_seed(request, f"{field}seed"),
        temperature=float(temperature),
        labels=_sample_labels(request, m, field),
        draw=request.output == pb.OUTPUT_KIND_DRAW,
    )


def validate_chunk_size(
    request: pb.SampleStreamRequest, m: ModelManifest, settings: ServerSettings
) -> int:
    """Samples per streamed answer: the request's, or the server's default for 0."""
    size = request.chunk_size or settings.default_stream_chunk_size
    check_in_range("chunk_size", size, 1, settings.max_stream_chunk_size)
    _fits_message("chunk_size", size, _sample_bytes(request.request, m), settings)
    return size


def validate_encode(
    request: pb.EncodeRequest, m: ModelManifest, settings: ServerSettings
) -> EncodeJob:
    x = _samples_tensor(request, "x", m, settings)
    n = len(x)
    check_in_range("num_draws", request.num_draws, 0, settings.max_samples_per_request)
    # The answer holds mu and logvar besides the draws: (n, d) float32 each.
    _fits_message("num_draws", n, 4 * m.latent_dim * (2 + request.num_draws), settings)
    labels = _row_labels(request.labels, n, m, m.encoder_takes_label)
    return EncodeJob(x=x, labels=labels, num_draws=request.num_draws, seed=_seed(request, "seed"))


def validate_decode(
    request: pb.DecodeRequest, m: ModelManifest, settings: ServerSettings
) -> DecodeJob:
    z = _float_tensor(request, "z", (m.latent_dim,), settings)
    check_finite("z", z)
    _enum("output", request.output, _OUTPUT_KINDS, pb.OutputKind)
    _enum("encoding", request.encoding, tuple(_SAMPLE_ITEMSIZE), pb.SampleEncoding)
    _fits_message("z", len(z), _pixels(m) * _SAMPLE_ITEMSIZE[request.encoding], settings)
    return DecodeJob(
        z=z.astype(np.float32, copy=False),
        labels=_row_labels(request.labels, len(z), m, m.decoder_takes_label),
        draw=request.output == pb.OUTPUT_KIND_DRAW,
        seed=_seed(request, "seed"),
    )


def validate_reconstruct(
    request: pb.ReconstructRequest, m: ModelManifest, settings: ServerSettings
) -> ReconstructJob:
    x = _samples_tensor(request, "x", m, settings)
    _enum("encoding", request.encoding, tuple(_SAMPLE_ITEMSIZE), pb.SampleEncoding)
    _fits_message("x", len(x), _pixels(m) * _SAMPLE_ITEMSIZE[request.encoding], settings)
    labels = _row_labels(request.labels, len(x), m, m.encoder_takes_label)
    return ReconstructJob(x=x, labels=labels)


def validate_score(
    request: pb.ScoreRequest, m: ModelManifest, settings: ServerSettings
) -> ScoreJob:
    """A ScoreRequest: k within max_score_samples, n * k within max_score_rows, labels for
    every CVAE (a concat CVAE's graphs take them; a prior CVAE's prior mean needs them)."""
    k = request.k
    if not 1 <= k <= settings.max_score_samples:
        raise InvalidRequest(
            f"k is {k}, expected 1..{settings.max_score_samples} importance samples per input "
            "(the server's max_score_samples)"
        )
    x = _samples_tensor(request, "x", m, settings)
    n = len(x)
    if n * k > settings.max_score_rows:
        raise InvalidRequest(
            f"x.shape[0] * k is {n} * {k} = {n * k}, expected at most {settings.max_score_rows} "
            f"(the server's max_score_rows): send at most {settings.max_score_rows // k} rows "
            f"per call at this k"
        )
    start = request.start_index
    check_in_range("start_index", start, 0, sampling.MAX_ROW_INDEX // k - n)
    if m.kind == "cvae":
        if len(request.labels) != n:
            raise InvalidRequest(
                f"labels holds {len(request.labels)} classes, expected {n} (one per row): "
                f"{m.name} is a {m.conditioning} cvae with {m.num_classes} classes"
            )
        labels = np.array(request.labels, dtype=np.int64)
        check_labels("labels", labels, m)
    else:
        labels = _row_labels(request.labels, n, m, False)
    return ScoreJob(
        x=x,
        labels=labels,
        k=k,
        seed=_seed(request, "seed"),
        start=start,
        chunk_rows=settings.batching.max_batch_size,
    )


# --- fields ---


def _enum(field: str, value: int, allowed: tuple[int, ...], enum: object) -> None:
    if value not in allowed:
        names = ", ".join(enum.Name(v) for v in allowed)  # type: ignore[attr-defined]
        raise InvalidRequest(f"{field} is {value}, expected one of {names}")


def _seed(request: object, field: str) -> int:
    if not request.HasField("seed"):  # type: ignore[attr-defined]
        return sampling.new_seed()
    seed = request.seed  # type: ignore[attr-defined]
    check_in_range(field, seed, 0, sampling.MAX_SEED)
    return seed


def _pixels(m: ModelManifest) -> int:
    return math.prod(m.sample_shape)


def _sample_bytes(request: pb.SampleRequest, m: ModelManifest) -> int:
    size = _pixels(m) * _SAMPLE_ITEMSIZE.get(request.encoding, 4) + 8  # + its int64 label
    return size + (4 * m.latent_dim if request.return_latents else 0)


def _fits_message(field: str, rows: int, bytes_per_row: int, settings: ServerSettings) -> None:
    advice = ", a compact encoding, or use SampleStream"
    check_answer_size(field, rows, bytes_per_row, settings.max_message_bytes, advice)


def _sample_labels(request: pb.SampleRequest, m: ModelManifest, field: str) -> np.ndarray | None:
    has_label, n = request.HasField("label"), request.num_samples
    if m.kind != "cvae":
        if has_label or len(request.labels):
            raise InvalidRequest(
                f"{field}label/labels are set, but {m.name} is a vae: expected no labels"
            )
        return None
    if has_label and len(request.labels):
        raise InvalidRequest(f"{field}label and {field}labels are both set, expected one of them")
    if has_label:
        labels = np.full(n, request.label, dtype=np.int64)
    elif len(request.labels) == n:
        labels = np.array(request.labels, dtype=np.int64)
    else:
        raise InvalidRequest(
            f"{field}labels holds {len(request.labels)} classes, expected {n} (one per sample) "
            f"or a single {field}label: {m.name} is a cvae with {m.num_classes} classes"
        )
    check_labels(f"{field}label" if has_label else f"{field}labels", labels, m)
    return labels


def _row_labels(values: object, n: int, m: ModelManifest, required: bool) -> np.ndarray | None:
    count = len(values)  # type: ignore[arg-type]
    if not required:
        if count:
            raise InvalidRequest(
                f"labels holds {count} classes, but {m.name}'s graphs take no label "
                f"({m.kind}{', ' + m.conditioning if m.conditioning else ''}): expected none"
            )
        return None
    if count != n:
        raise InvalidRequest(
            f"labels holds {count} classes, expected {n} (one per row) for a concat cvae"
        )
    labels = np.array(values, dtype=np.int64)
    check_labels("labels", labels, m)
    return labels


# --- tensors ---


def _float_tensor(
    request: Any, field: str, row_shape: tuple[int, ...], settings: ServerSettings
) -> np.ndarray:
    """The request's Tensor field ``field``, checked; its bytes may have been detached."""
    tensor: pb.Tensor = getattr(request, field)
    if tensor.dtype not in _FLOAT_WIRE:
        raise InvalidRequest(
            f"{field}.dtype is {dtype_name(tensor.dtype)}, expected FLOAT32 or FLOAT16"
        )
    shape = tuple(tensor.shape)
    if len(shape) != 1 + len(row_shape) or shape[1:] != row_shape:
        expected = "[n, " + ", ".join(map(str, row_shape)) + "]"
        raise InvalidRequest(f"{field}.shape is {list(shape)}, expected {expected}")
    check_in_range(f"{field}.shape[0]", shape[0], 1, settings.max_samples_per_request)
    detached = detached_bytes(request, field)
    # A singular field's last occurrence counts, as protobuf itself would read it.
    return to_array(tensor, field, detached[-1] if detached else None)


def _samples_tensor(
    request: Any, field: str, m: ModelManifest, settings: ServerSettings
) -> np.ndarray:
    x = _float_tensor(request, field, m.sample_shape, settings)
    check_value_range(field, x, m)
    return x.astype(m.sample_dtype, copy=False)
