"""What ``NAME-<kind>`` means in the Open Inference Protocol: one class per kind of protocol model.

Each loaded model version appears as several protocol models. ``NAME-encoder`` and
``NAME-decoder`` are the graphs, their tensors exactly the manifest's; ``NAME-sampler`` is the
typed API's ``Sample`` by sample index (server/oip_sampler.py); ``NAME-scorer`` is the typed
API's ``Score`` (x and, for a CVAE, y in; k, seed and start_index as request parameters;
elbo, log_px, log_likelihood and kl out, FP64), checked by ``validate_score`` and run by
``pipeline.score`` as ``Score`` is. A kind knows its tensors, its platform, the batcher whose
queue it shares, and how to answer one request; it knows nothing of the transport, so gRPC
(server/oip_servicer.py) and REST (server/rest.py) answer with the same checks and messages.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from vaeserve.engine import pipeline
from vaeserve.manifest import TensorSpec
from vaeserve.proto.inference import grpc_service_pb2 as pb
from vaeserve.server import oip_convert as convert
from vaeserve.server.batcher import DynamicBatcher
from vaeserve.server.repository import LoadedModel
from vaeserve.server.settings import ServerSettings
from vaeserve.server.validation import validate_score

__all__ = ["PLATFORM", "Answer", "ProtocolModelKind", "batcher_of", "GraphKind", "ScorerKind"]

PLATFORM = "onnxruntime_onnx"  # Triton's name for what serves these graphs
SERVER_PLATFORM = "vaeserve"  # a kind the server computes around both graphs


@dataclass(frozen=True)
class Answer:
    """One request's answer, before a transport encodes it."""

    arrays: Mapping[str, np.ndarray]  # the requested outputs, in answer order
    parameters: Mapping[str, int] = field(default_factory=dict)  # uint64 response parameters


class ProtocolModelKind(Protocol):
    """One kind of protocol model, named by its suffix."""

    @property
    def suffix(self) -> str: ...

    @property
    def platform(self) -> str: ...

    @property
    def backend(self) -> str: ...

    @property
    def graph(self) -> str:
        """The graph whose batcher runs this kind's rows ("encoder" or "decoder"): its queue,
        instances and statistics are this kind's."""
        ...

    @property
    def implicit_batch_axis(self) -> bool:
        """Whether every tensor has a shape per row, as Triton's max_batch_size > 0 needs."""
        ...

    def inputs(self, model: LoadedModel) -> dict[str, TensorSpec]: ...

    def outputs(self, model: LoadedModel) -> dict[str, TensorSpec]: ...

    async def infer(
        self,
        model: LoadedModel,
        request: pb.ModelInferRequest,
        settings: ServerSettings,
        deadline: float | None,
    ) -> Answer:
        """Check ``request`` against this kind and answer it.

        Raises:
            InvalidRequest: naming the tensor or parameter and what was expected.
        """
        ...


def batcher_of(kind: ProtocolModelKind, model: LoadedModel) -> DynamicBatcher:
    """The batcher that runs ``kind``'s rows for ``model``: its queue, instances, statistics."""
    return getattr(model, kind.graph)


@dataclass(frozen=True)
class GraphKind:
    """NAME-encoder / NAME-decoder: one graph, through its batcher."""

    suffix: str  # "encoder" | "decoder"
    platform: str = PLATFORM
    backend: str = "onnxruntime"
    implicit_batch_axis: bool = True

    @property
    def graph(self) -> str:
        return self.suffix

    def inputs(self, model: LoadedModel) -> dict[str, TensorSpec]:
        return getattr(model.manifest, self.suffix).inputs

    def outputs(self, model: LoadedModel) -> dict[str, TensorSpec]:
        return getattr(model.manifest, self.suffix).outputs

    async def infer(
        self,
        model: LoadedModel,
        request: pb.ModelInferRequest,
        settings: ServerSettings,
        deadline: float | None,
    ) -> Answer:
        arrays = convert.decode_inputs(
            request, self.inputs(model), settings.max_samples_per_request
        )
        convert.check_values(model.manifest, arrays)
        specs = self.outputs(model)
        names = convert.requested_outputs(request, specs)
        rows = len(next(iter(arrays.values())))
        convert.check_answer_fits(rows, names, specs, settings.max_message_bytes)
        outputs = await batcher_of(self, model).run(arrays, deadline)
        return Answer({name: outputs[name] for name in names})


@dataclass(frozen=True)
class ScorerKind:
    """NAME-scorer: the typed ``Score``; the seed used is answered as parameter ``seed``."""

    suffix: str = "scorer"
    platform: str = SERVER_PLATFORM
    backend: str = SERVER_PLATFORM
    graph: str = "decoder"  # the scorer's steps are decoder rows
    implicit_batch_axis: bool = True

    def inputs(self, model: LoadedModel) -> dict[str, TensorSpec]:
        return convert.scorer_inputs(model.manifest)

    def outputs(self, model: LoadedModel) -> dict[str, TensorSpec]:
        return convert.scorer_outputs()

    async def infer(
        self,
        model: LoadedModel,
        request: pb.ModelInferRequest,
        settings: ServerSettings,
        deadline: float | None,
    ) -> Answer:
        m = model.manifest
        typed = convert.score_request(request, m, settings.max_samples_per_request)
        job = validate_score(typed, m, settings)  # type: ignore[arg-type]
        specs = self.outputs(model)
        names = convert.requested_outputs(request, specs)
        convert.check_answer_fits(len(job.x), names, specs, settings.max_message_bytes)
        scores = await pipeline.score(model, job, deadline, asyncio.to_thread)
        return Answer({name: getattr(scores, name) for name in names}, {"seed": job.seed})
