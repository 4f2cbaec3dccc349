"""The typed API (``vaeserve.v1.VaeService``): proto ↔ validated jobs ↔ server/pipeline.py.

Each method is a few lines: find the model, validate once, run the shared pipeline, build
the answer. Errors are mapped to status codes by ``map_errors`` alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import grpc
import numpy as np

from vaeserve import protowire
from vaeserve.engine import pipeline
from vaeserve.info import model_info, to_proto
from vaeserve.proto.v1 import vaeserve_pb2 as pb
from vaeserve.proto.v1 import vaeserve_pb2_grpc as pb_grpc
from vaeserve.server.handlers import TENSOR_TYPE
from vaeserve.server.repository import LoadedModel, ModelRegistry
from vaeserve.server.settings import ServerSettings
from vaeserve.server.status import map_errors
from vaeserve.server.validation import (
    check_model_ref,
    validate_chunk_size,
    validate_decode,
    validate_encode,
    validate_reconstruct,
    validate_sample,
    validate_score,
)
from vaeserve.tensors import describe, wire_samples

__all__ = ["SERVICE_NAME", "VaeServicer"]

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["VaeService"].full_name
# Where each answer's tensor bytes go on the wire (protowire.serialize appends them).
_DATA = {
    (answer, name): path
    for answer in (pb.SampleResponse, pb.EncodeResponse, pb.DecodeResponse, pb.ReconstructResponse)
    for name, path in protowire.fields_of_type(answer, TENSOR_TYPE, "data").items()
}
_STATES = {
    "loading": pb.MODEL_STATE_LOADING,
    "ready": pb.MODEL_STATE_READY,
    "failed": pb.MODEL_STATE_FAILED,
    "unloading": pb.MODEL_STATE_UNLOADING,
}


def _deadline(context: grpc.aio.ServicerContext) -> float | None:
    """The call's deadline on the batchers' clock (time.monotonic)."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


class VaeServicer(pb_grpc.VaeServiceServicer):
    """Serves every model of ``registry`` under the limits of ``settings``."""

    def __init__(self, registry: ModelRegistry, settings: ServerSettings):
        self._registry = registry
        self._settings = settings

    def _use(self, ref: pb.ModelRef) -> contextlib.AbstractContextManager[LoadedModel]:
        return self._registry.use(*check_model_ref(ref))

    @map_errors
    async def ListModels(self, request, context):
        statuses = [
            pb.ModelVersionStatus(
                name=s.name, version=s.version, state=_STATES[s.state], reason=s.reason
            )
            for s in self._registry.statuses()
        ]
        return pb.ListModelsResponse(models=statuses)

    @map_errors
    async def GetModelInfo(self, request, context):
        model = self._registry.get(*check_model_ref(request.model))
        m, text = model.manifest, model.manifest_json
        versions = self._registry.versions(m.name)
        info = model_info(m, text, model.provider, versions, self._settings.limits())
        return to_proto(info, m, text)

    @map_errors
    async def Sample(self, request, context):
        with self._use(request.model) as model:
            job = validate_sample(request, model.manifest, self._settings)
            samples = await pipeline.sample(model, job, _deadline(context))
            return _sample_response(model, job, request, samples)

    @map_errors
    async def SampleStream(self, request, context) -> AsyncIterator[bytes]:
        with self._use(request.request.model) as model:
            job = validate_sample(request.request, model.manifest, self._settings, stream=True)
            size = validate_chunk_size(request, model.manifest, self._settings)
            chunks = _sample_chunks(model, job, size, _deadline(context))
            async for part, samples in chunks:
                yield _sample_response(model, part, request.request, samples)

    @map_errors
    async def Encode(self, request, context):
        with self._use(request.model) as model:
            job = validate_encode(request, model.manifest, self._settings)
            result = await pipeline.encode(model, job, _deadline(context))
            answer = pb.EncodeResponse(
                model_name=model.manifest.name, model_version=model.manifest.version, seed=job.seed
            )
            tensors = {"mu": result.mu, "logvar": result.logvar}
            if result.z is not None:
                tensors["z"] = result.z
            return _serialize(answer, tensors)

    @map_errors
    async def Decode(self, request, context):
        with self._use(request.model) as model:
            job = validate_decode(request, model.manifest, self._settings)
            x = await pipeline.decode(model, job, _deadline(context))
            answer = pb.DecodeResponse(
                model_name=model.manifest.name, model_version=model.manifest.version, seed=job.seed
            )
            x = wire_samples(x, request.encoding, model.manifest.value_range)
            return _serialize(answer, {"x": x})

    @map_errors
    async def Reconstruct(self, request, context):
        with self._use(request.model) as model:
            job = validate_reconstruct(request, model.manifest, self._settings)
            x = await pipeline.reconstruct(model, job, _deadline(context))
            answer = pb.ReconstructResponse(
                model_name=model.manifest.name, model_version=model.manifest.version
            )
            x = wire_samples(x, request.encoding, model.manifest.value_range)
            return _serialize(answer, {"x": x})

    @map_errors
    async def Score(self, request, context):
        with self._use(request.model) as model:
            job = validate_score(request, model.manifest, self._settings)
            scores = await pipeline.score(model, job, _deadline(context), asyncio.to_thread)
            return pb.ScoreResponse(
                model_name=model.manifest.name,
                model_version=model.manifest.version,
                seed=job.seed,
                k=job.k,
                elbo=scores.elbo.tolist(),
                log_px=scores.log_px.tolist(),
                log_likelihood=scores.log_likelihood.tolist(),
                kl=scores.kl.tolist(),
            )


def _sample_response(
    model: LoadedModel,
    job: pipeline.SampleJob,
    request: pb.SampleRequest,
    samples: pipeline.Samples,
) -> bytes:
    """A serialized ``SampleResponse``."""
    m = model.manifest
    answer = pb.SampleResponse(
        model_name=m.name, model_version=m.version, seed=job.seed, start_index=job.start
    )
    tensors = {"samples": wire_samples(samples.x, request.encoding, m.value_range)}
    if job.labels is not None:
        tensors["labels"] = job.labels
    if request.return_latents:
        tensors["latents"] = samples.z
    return _serialize(answer, tensors)


def _serialize(answer, tensors: dict[str, np.ndarray]) -> bytes:
    """``answer`` with each tensor field set to its array, serialized with one copy of the
    arrays' bytes in all (protobuf would make three: tobytes, assignment, serialization)."""
    fields = []
    for name, array in tensors.items():
        wire = describe(array, out=getattr(answer, name))
        fields.append((_DATA[type(answer), name], [wire]))
    return protowire.serialize(answer, fields)


async def _sample_chunks(
    model: LoadedModel, job: pipeline.SampleJob, size: int, deadline: float | None
) -> AsyncIterator[tuple[pipeline.SampleJob, pipeline.Samples]]:
    """The job in parts of ``size`` samples; part k+1 computes while part k is being sent."""

    def start(offset: int) -> tuple[pipeline.SampleJob, asyncio.Task[pipeline.Samples]] | None:
        if offset >= job.count:
            return None
        part = job.rows(offset, min(size, job.count - offset))
        return part, asyncio.ensure_future(pipeline.sample(model, part, deadline))

    pending = start(0)
    try:
        for offset in range(size, job.count + size, size):
            assert pending is not None
            part, task = pending
            samples = await task
            pending = start(offset)
            yield part, samples
    finally:
        if pending is not None:
            _discard(pending[1])


def _discard(task: asyncio.Task) -> None:
    """Cancel a prefetched chunk nobody will read, and consume its outcome."""
    if not task.done():
        task.cancel()
    else:
        task.cancelled() or task.exception()
