"""The Open Inference Protocol (KServe v2) over the registry, for every transport.

``InferenceProtocol`` answers the protocol's requests as protobuf messages of
``inference.GRPCInferenceService`` and raises ``vaeserve.errors`` for what it refuses; the
gRPC servicer (server/oip_servicer.py) and the REST front end (server/rest.py) only translate
their wire formats and map errors to their status codes. So both transports resolve names,
check tensors and word their errors in one place.

Each model version is served as one protocol model per kind (server/protocol_models.py):
``NAME-encoder``, ``NAME-decoder``, ``NAME-scorer`` and ``NAME-sampler``. Inference goes
through the same batchers as the typed API. Also answers Triton's ``ModelConfig`` (its tools
call it before inferring), ``ModelStatistics``, read from the server's metrics, and its
repository API (index, load, unload) through ``ModelControl`` (server/model_control.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import metadata

from vaeserve.errors import InvalidRequest, ModelNotFound, NotServing
from vaeserve.manifest import TensorSpec
from vaeserve.proto.inference import grpc_service_pb2 as pb
from vaeserve.proto.inference import model_config_pb2 as config_pb
from vaeserve.server import oip_convert as convert
from vaeserve.server.metrics import GraphKey, ServerMetrics
from vaeserve.server.model_control import ModelControl
from vaeserve.server.oip_sampler import SamplerKind
from vaeserve.server.protocol_models import (
    Answer,
    GraphKind,
    ProtocolModelKind,
    ScorerKind,
    batcher_of,
)
from vaeserve.server.repository import LoadedModel, ModelRegistry
from vaeserve.server.settings import ServerSettings

__all__ = ["KINDS", "GRAPHS", "EXTENSIONS", "Inference", "InferenceProtocol", "split_name"]

KINDS: dict[str, ProtocolModelKind] = {
    kind.suffix: kind
    for kind in (GraphKind("encoder"), GraphKind("decoder"), ScorerKind(), SamplerKind())
}
# The protocol models' suffixes (app.py labels metrics by them).
GRAPHS = tuple(KINDS)
EXTENSIONS = ("model_configuration", "statistics", "model_repository", "binary_tensor_data")
_TensorMetadata = pb.ModelMetadataResponse.TensorMetadata


@dataclass(frozen=True)
class _Served:
    """One protocol model of a loaded version."""

    model: LoadedModel
    kind: ProtocolModelKind

    @property
    def key(self) -> GraphKey:
        """The graph whose batcher (and statistics) runs this protocol model's rows."""
        return GraphKey(self.model.manifest.name, self.model.manifest.version, self.kind.graph)


@dataclass(frozen=True)
class Inference:
    """A ModelInfer answer before encoding: the response header, outputs and their specs."""

    response: pb.ModelInferResponse  # names, version, id and parameters; no outputs yet
    arrays: dict[str, object]  # output name -> numpy array, in answer order
    specs: dict[str, TensorSpec]


def split_name(name: str) -> tuple[str, str]:
    """``"digits-decoder"`` -> ``("digits", "decoder")``.

    Raises:
        ModelNotFound: the name does not end in one of the kinds' suffixes.
    """
    model, _, kind = name.rpartition("-")
    if not model or kind not in KINDS:
        *most, last = [f"NAME-{suffix}" for suffix in KINDS]
        expected = f"{', '.join(most)} or {last}"
        raise ModelNotFound(f"model name {name!r} is not served here: expected {expected}")
    return model, kind


def _version(text: str) -> int:
    if text == "":
        return 0
    # isascii: str.isdigit() also accepts digits int() cannot parse, such as "²".
    if not (text.isascii() and text.isdigit()) or int(text) < 1:
        raise InvalidRequest(f"model version {text!r} is invalid, expected '1', '2', ... or ''")
    return int(text)


def _tensors(specs: dict[str, TensorSpec]) -> list[_TensorMetadata]:
    return [
        _TensorMetadata(name=n, datatype=convert.DATATYPES[s.dtype], shape=s.shape)
        for n, s in specs.items()
    ]


class InferenceProtocol:
    """Serves every model of ``registry`` as one protocol model per kind."""

    def __init__(self, registry: ModelRegistry, settings: ServerSettings, metrics: ServerMetrics):
        self.registry = registry
        self.control = ModelControl(registry, settings, suffixes=KINDS)  # the repository API
        self._settings = settings
        self._metrics = metrics
        try:
            self.server_version = metadata.version("vaeserve")
        except metadata.PackageNotFoundError:
            self.server_version = "0+unknown"

    def _served(self, name: str, version: str) -> _Served:
        model, kind = split_name(name)
        number = _version(version)
        try:
            return _Served(self.registry.get(model, number), KINDS[kind])
        except ModelNotFound:
            # The registry speaks of the typed API's fields; say it in protocol names.
            loaded = self.registry.versions(model)
            if loaded:
                raise ModelNotFound(
                    f"model {name!r} has no loaded version {version!r}; loaded versions: "
                    f"{[str(v) for v in loaded]}"
                ) from None
            served = [f"{m}-{k}" for m in self._model_names() for k in KINDS]
            raise ModelNotFound(
                f"model {name!r} is not served here; served models: {served}"
            ) from None

    def _model_names(self) -> list[str]:
        return sorted({m.manifest.name for m in self.registry.models()})

    def server_ready(self) -> bool:
        return self.registry.ready

    def model_ready(self, name: str, version: str) -> bool:
        """Whether the protocol model can answer now; a malformed version is an error."""
        try:
            self._served(name, version)
        except (ModelNotFound, NotServing):
            return False
        return True

    def server_metadata(self) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(
            name="vaeserve", version=self.server_version, extensions=EXTENSIONS
        )

    def model_metadata(self, name: str, version: str) -> pb.ModelMetadataResponse:
        served = self._served(name, version)
        return pb.ModelMetadataResponse(
            name=name,
            versions=[str(v) for v in self.registry.versions(served.key.model)],
            platform=served.kind.platform,
            inputs=_tensors(served.kind.inputs(served.model)),
            outputs=_tensors(served.kind.outputs(served.model)),
        )

    def model_config(self, name: str, version: str) -> config_pb.ModelConfig:
        served = self._served(name, version)
        kind, model = served.kind, served.model
        batching = self._settings.batching
        # Triton's max_batch_size bounds the batch axis of one request: ours is the request
        # row limit. Larger runs are never formed; the batcher merges and splits up to
        # batching.max_batch_size rows per run. A kind whose tensors have no per-row shape
        # declares full shapes and max_batch_size 0 instead (its rows still batch here).
        limit = min(self._settings.max_samples_per_request, 2**31 - 1)
        implicit = kind.implicit_batch_axis
        group = config_pb.ModelInstanceGroup
        instance_kind = group.KIND_GPU if model.provider.startswith("CUDA") else group.KIND_CPU
        types = convert.CONFIG_TYPES

        def dims(spec: TensorSpec) -> tuple[int, ...]:
            return spec.shape[1:] if implicit else spec.shape

        config = config_pb.ModelConfig(
            name=name,
            platform=kind.platform,
            backend=kind.backend,
            max_batch_size=limit if implicit else 0,
            input=[
                config_pb.ModelInput(name=n, data_type=types[s.dtype], dims=dims(s))
                for n, s in kind.inputs(model).items()
            ],
            output=[
                config_pb.ModelOutput(name=n, data_type=types[s.dtype], dims=dims(s))
                for n, s in kind.outputs(model).items()
            ],
            instance_group=[group(kind=instance_kind, count=batcher_of(kind, model).instances)],
        )
        if implicit:  # Triton allows dynamic batching only with an implicit batch axis
            config.dynamic_batching.CopyFrom(
                config_pb.ModelDynamicBatching(
                    preferred_batch_size=[min(batching.max_batch_size, limit)],
                    max_queue_delay_microseconds=int(batching.max_queue_delay_ms * 1000),
                )
            )
        return config

    async def infer(self, request: pb.ModelInferRequest, deadline: float | None) -> Inference:
        """Answer one ModelInfer request (the outputs still arrays, for the transport).

        Args:
            deadline: on time.monotonic's clock; None: none.
        """
        name = request.model_name
        served = self._served(name, request.model_version)
        model, kind = served.model, served.kind
        # hold(): shutdown and unloading wait for this call to finish on this version.
        with self.registry.hold(model):
            answer: Answer = await kind.infer(model, request, self._settings, deadline)
        response = pb.ModelInferResponse(
            model_name=name, model_version=str(model.manifest.version), id=request.id
        )
        for parameter, value in answer.parameters.items():
            response.parameters[parameter].uint64_param = value
        specs = kind.outputs(model)
        return Inference(response, dict(answer.arrays), {n: specs[n] for n in answer.arrays})

    def statistics(self, name: str, version: str) -> pb.ModelStatisticsResponse:
        return pb.ModelStatisticsResponse(
            model_stats=[self._statistics(s) for s in self._all_served(name, version)]
        )

    def _all_served(self, name: str, version: str) -> list[_Served]:
        """Protocol models a statistics request covers: one, every version of one, or all."""
        if not name:
            return [_Served(m, k) for m in self.registry.models() for k in KINDS.values()]
        if version or not self.registry.versions(split_name(name)[0]):
            return [self._served(name, version)]  # one version, or NOT_FOUND naming the model
        model, kind = split_name(name)
        return [
            _Served(self.registry.get(model, v), KINDS[kind]) for v in self.registry.versions(model)
        ]

    def _statistics(self, served: _Served) -> pb.ModelStatistics:
        # The batcher's numbers: NAME-scorer and NAME-sampler report the decoder's, whose
        # queue and runs their rows share (their own calls are counted by rpc and model).
        s = self._metrics.graph_statistics(served.key)
        compute = pb.StatisticDuration(count=s.compute_count, ns=s.compute_ns)
        return pb.ModelStatistics(
            name=f"{served.key.model}-{served.kind.suffix}",
            version=str(served.key.version),
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

    async def repository_index(
        self, request: pb.RepositoryIndexRequest
    ) -> pb.RepositoryIndexResponse:
        """Every model folder's versions, on disk or loaded, with Triton's state words."""
        _one_repository(request.repository_name)
        entries = await self.control.index(request.ready)
        index = pb.RepositoryIndexResponse.ModelIndex
        return pb.RepositoryIndexResponse(
            models=[
                index(name=e.name, version="" if e.version is None else str(e.version),
                      state=e.state, reason=e.reason)
                for e in entries
            ]
        )  # fmt: skip

    async def repository_model_load(
        self, request: pb.RepositoryModelLoadRequest
    ) -> pb.RepositoryModelLoadResponse:
        """Load (or reload) a model folder; returns once its versions serve."""
        _one_repository(request.repository_name)
        await self.control.load(request.model_name, _parameters(request.parameters))
        return pb.RepositoryModelLoadResponse()

    async def repository_model_unload(
        self, request: pb.RepositoryModelUnloadRequest
    ) -> pb.RepositoryModelUnloadResponse:
        """Unload every version of a model folder; returns once its calls in flight are done."""
        _one_repository(request.repository_name)
        await self.control.unload(request.model_name, _parameters(request.parameters))
        return pb.RepositoryModelUnloadResponse()


def _one_repository(name: str) -> None:
    if name:
        raise InvalidRequest(
            f"repository_name: expected '' (this server has one repository), got {name!r}"
        )


def _parameters(parameters) -> dict[str, object]:
    """A repository request's parameters as Python values (None: a parameter with no value)."""
    return {name: convert.parameter_value(p) for name, p in parameters.items()}
