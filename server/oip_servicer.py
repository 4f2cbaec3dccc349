"""The Open Inference Protocol (KServe v2, ``inference.GRPCInferenceService``) over the registry.

Each model version is served as three protocol models: ``NAME-encoder`` and ``NAME-decoder``,
whose tensors are exactly the graphs' inputs and outputs in the manifest, and ``NAME-scorer``,
the typed API's ``Score`` (x and, for a CVAE, y in; k, seed and start_index as request
parameters; elbo, log_px, log_likelihood and kl out, FP64), checked by ``validate_score`` and
run by ``pipeline.score`` as ``Score`` is. Inference goes through the same batchers as the
typed API. Also answers Triton's ``ModelConfig`` (its tools call it before inferring) and
``ModelStatistics``, read from the server's metrics. Methods are thin: resolve the graph,
convert (server/oip_convert.py), run, convert back.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from importlib import metadata

import grpc
import numpy as np

from vaeserve.engine import pipeline
from vaeserve.errors import InvalidRequest, ModelNotFound, NotServing
from vaeserve.manifest import TensorSpec
from vaeserve.proto.inference import grpc_service_pb2 as pb
from vaeserve.proto.inference import grpc_service_pb2_grpc as pb_grpc
from vaeserve.proto.inference import model_config_pb2 as config_pb
from vaeserve.server import oip_convert as convert
from vaeserve.server.batcher import DynamicBatcher
from vaeserve.server.metrics import GraphKey, ServerMetrics
from vaeserve.server.repository import LoadedModel, ModelRegistry
from vaeserve.server.settings import ServerSettings
from vaeserve.server.status import map_errors
from vaeserve.server.validation import validate_score

__all__ = ["SERVICE_NAME", "GRAPHS", "EXTENSIONS", "PLATFORM", "OipServicer", "split_name"]

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
# The protocol models' suffixes: two graphs and the scorer (app.py labels metrics by them).
GRAPHS = ("encoder", "decoder", "scorer")
SCORER = "scorer"
EXTENSIONS = ("model_configuration", "statistics")
PLATFORM = "onnxruntime_onnx"  # Triton's name for what serves these graphs
SCORER_PLATFORM = "vaeserve"  # NAME-scorer is computed by the server around both graphs
_TensorMetadata = pb.ModelMetadataResponse.TensorMetadata


@dataclass(frozen=True)
class _Graph:
    """One protocol model of a loaded version: a graph, or the scorer."""

    model: LoadedModel
    name: str  # "encoder" | "decoder" | "scorer"

    @property
    def inputs(self) -> dict[str, TensorSpec]:
        if self.name == SCORER:
            return convert.scorer_inputs(self.model.manifest)
        return getattr(self.model.manifest, self.name).inputs

    @property
    def outputs(self) -> dict[str, TensorSpec]:
        if self.name == SCORER:
            return convert.scorer_outputs()
        return getattr(self.model.manifest, self.name).outputs

    @property
    def batcher(self) -> DynamicBatcher:
        """The graph's batcher; the scorer's steps go through the decoder's."""
        return getattr(self.model, "decoder" if self.name == SCORER else self.name)

    @property
    def key(self) -> GraphKey:
        return GraphKey(self.model.manifest.name, self.model.manifest.version, self.name)


def split_name(name: str) -> tuple[str, str]:
    """``"digits-decoder"`` -> ``("digits", "decoder")``.

    Raises:
        ModelNotFound: the name does not end in ``-encoder``, ``-decoder`` or ``-scorer``.
    """
    model, _, graph = name.rpartition("-")
    if not model or graph not in GRAPHS:
        raise ModelNotFound(
            f"model name {name!r} is not served here: expected NAME-scorer, NAME-encoder or "
            "NAME-decoder"
        )
    return model, graph


def _version(text: str) -> int:
    if text == "":
        return 0
    # isascii: str.isdigit() also accepts digits int() cannot parse, such as "²".
    if not (text.isascii() and text.isdigit()) or int(text) < 1:
        raise InvalidRequest(f"model version {text!r} is invalid, expected '1', '2', ... or ''")
    return int(text)


def _deadline(context: grpc.aio.ServicerContext) -> float | None:
    """The call's deadline on the batchers' clock (time.monotonic)."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


def _tensors(specs: dict) -> list[_TensorMetadata]:
    return [
        _TensorMetadata(name=n, datatype=convert.DATATYPES[s.dtype], shape=s.shape)
        for n, s in specs.items()
    ]


class OipServicer(pb_grpc.GRPCInferenceServiceServicer):
    """Serves every model of ``registry`` as NAME-encoder / NAME-decoder / NAME-scorer."""

    def __init__(self, registry: ModelRegistry, settings: ServerSettings, metrics: ServerMetrics):
        self._registry = registry
        self._settings = settings
        self._metrics = metrics
        try:
            self._server_version = metadata.version("vaeserve")
        except metadata.PackageNotFoundError:
            self._server_version = "0+unknown"

    def _graph(self, name: str, version: str) -> _Graph:
        model, graph = split_name(name)
        number = _version(version)
        try:
            return _Graph(self._registry.get(model, number), graph)
        except ModelNotFound:
            # The registry speaks of the typed API's fields; say it in protocol names.
            loaded = self._registry.versions(model)
            if loaded:
                raise ModelNotFound(
                    f"model {name!r} has no loaded version {version!r}; loaded versions: "
                    f"{[str(v) for v in loaded]}"
                ) from None
            served = [f"{m}-{g}" for m in self._model_names() for g in GRAPHS]
            raise ModelNotFound(
                f"model {name!r} is not served here; served models: {served}"
            ) from None

    def _model_names(self) -> list[str]:
        return sorted({m.manifest.name for m in self._registry.models()})

    @map_errors
    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    @map_errors
    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self._registry.ready)

    @map_errors
    async def ModelReady(self, request, context):
        try:
            self._graph(request.name, request.version)
        except (ModelNotFound, NotServing):
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=True)

    @map_errors
    async def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(
            name="vaeserve", version=self._server_version, extensions=EXTENSIONS
        )

    @map_errors
    async def ModelMetadata(self, request, context):
        graph = self._graph(request.name, request.version)
        return pb.ModelMetadataResponse(
            name=request.name,
            versions=[str(v) for v in self._registry.versions(graph.key.model)],
            platform=SCORER_PLATFORM if graph.name == SCORER else PLATFORM,
            inputs=_tensors(graph.inputs),
            outputs=_tensors(graph.outputs),
        )

    @map_errors
    async def ModelConfig(self, request, context):
        graph = self._graph(request.name, request.version)
        return pb.ModelConfigResponse(config=self._config(request.name, graph))

    @map_errors
    async def ModelInfer(self, request, context):
        graph = self._graph(request.model_name, request.model_version)
        if graph.name == SCORER:
            return await self._score(request, graph, context)
        limit = self._settings.max_samples_per_request
        arrays = convert.decode_inputs(request, graph.inputs, limit)
        convert.check_values(graph.model.manifest, arrays)
        names = convert.requested_outputs(request, graph.outputs)
        rows = len(next(iter(arrays.values())))
        convert.check_answer_fits(rows, names, graph.outputs, self._settings.max_message_bytes)
        # use(): shutdown and unloading wait for this call to finish on this version.
        with self._registry.use(graph.key.model, graph.key.version):
            outputs = await graph.batcher.run(arrays, _deadline(context))
        response = pb.ModelInferResponse(
            model_name=request.model_name, model_version=str(graph.key.version), id=request.id
        )
        return convert.encode_outputs(response, outputs, names, graph.outputs)

    async def _score(
        self, request: pb.ModelInferRequest, graph: _Graph, context: grpc.aio.ServicerContext
    ) -> bytes:
        """NAME-scorer: the typed Score's checks and pipeline; the seed used is answered as the
        response parameter ``seed`` (uint64_param)."""
        m, settings = graph.model.manifest, self._settings
        typed = convert.score_request(request, m, settings.max_samples_per_request)
        job = validate_score(typed, m, settings)  # type: ignore[arg-type]
        specs = graph.outputs
        names = convert.requested_outputs(request, specs)
        convert.check_answer_fits(len(job.x), names, specs, settings.max_message_bytes)
        with self._registry.use(graph.key.model, graph.key.version):
            scores = await pipeline.score(graph.model, job, _deadline(context), asyncio.to_thread)
        response = pb.ModelInferResponse(
            model_name=request.model_name, model_version=str(graph.key.version), id=request.id
        )
        response.parameters["seed"].uint64_param = job.seed
        arrays: dict[str, np.ndarray] = {name: getattr(scores, name) for name in names}
        return convert.encode_outputs(response, arrays, names, specs)

    @map_errors
    async def ModelStatistics(self, request, context):
        stats = [self._statistics(graph) for graph in self._graphs(request.name, request.version)]
        return pb.ModelStatisticsResponse(model_stats=stats)

    def _graphs(self, name: str, version: str) -> list[_Graph]:
        """Protocol models a statistics request covers: one, every version of one, or all."""
        if not name:
            return [_Graph(m, g) for m in self._registry.models() for g in GRAPHS]
        if version or not self._registry.versions(split_name(name)[0]):
            return [self._graph(name, version)]  # one version, or NOT_FOUND naming the model
        model, graph = split_name(name)
        return [_Graph(self._registry.get(model, v), graph) for v in self._registry.versions(model)]

    def _statistics(self, graph: _Graph) -> pb.ModelStatistics:
        s = self._metrics.graph_statistics(graph.key)
        compute = pb.StatisticDuration(count=s.compute_count, ns=s.compute_ns)
        return pb.ModelStatistics(
            name=f"{graph.key.model}-{graph.name}",
            version=str(graph.key.version),
            last_inference=s.last_inference_ms,
            inference_count=s.inference_count,
            execution_count=s.execution_count,
            inference_stats=pb.InferStatistics(
                success=pb.StatisticDuration(count=s.success_count, ns=s.success_ns),
                fail=pb.StatisticDuration(count=s.fail_count, ns=s.fail_ns),
                queue=pb.StatisticDuration(count=s.queue_count, ns=s.queue_ns),
                compute_input=pb.StatisticDuration(count=s.compute_count),
                compute_infer=compute,
                compute_output=pb.StatisticDuration(count=s.compute_count),
            ),
        )

    def _config(self, name: str, graph: _Graph) -> config_pb.ModelConfig:
        batching = self._settings.batching
        # Triton's max_batch_size bounds the batch axis of one request: ours is the request
        # row limit. Larger runs are never formed; the batcher merges and splits up to
        # batching.max_batch_size rows per run.
        limit = min(self._settings.max_samples_per_request, 2**31 - 1)
        group = config_pb.ModelInstanceGroup
        kind = group.KIND_GPU if graph.model.provider.startswith("CUDA") else group.KIND_CPU
        types = convert.CONFIG_TYPES
        scorer = graph.name == SCORER
        return config_pb.ModelConfig(
            name=name,
            platform=SCORER_PLATFORM if scorer else PLATFORM,
            backend=SCORER_PLATFORM if scorer else "onnxruntime",
            max_batch_size=limit,
            input=[
                config_pb.ModelInput(name=n, data_type=types[s.dtype], dims=s.shape[1:])
                for n, s in graph.inputs.items()
            ],
            output=[
                config_pb.ModelOutput(name=n, data_type=types[s.dtype], dims=s.shape[1:])
                for n, s in graph.outputs.items()
            ],
            dynamic_batching=config_pb.ModelDynamicBatching(
                preferred_batch_size=[min(batching.max_batch_size, limit)],
                max_queue_delay_microseconds=int(batching.max_queue_delay_ms * 1000),
            ),
            instance_group=[group(kind=kind, count=graph.batcher.instances)],
        )
