from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DataType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DATA_TYPE_UNSPECIFIED: _ClassVar[DataType]
    FLOAT32: _ClassVar[DataType]
    FLOAT16: _ClassVar[DataType]
    INT64: _ClassVar[DataType]
    UINT8: _ClassVar[DataType]

class SampleEncoding(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SAMPLE_ENCODING_FLOAT32: _ClassVar[SampleEncoding]
    SAMPLE_ENCODING_FLOAT16: _ClassVar[SampleEncoding]
    SAMPLE_ENCODING_UINT8: _ClassVar[SampleEncoding]

class OutputKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    OUTPUT_KIND_MEAN: _ClassVar[OutputKind]
    OUTPUT_KIND_DRAW: _ClassVar[OutputKind]

class ModelState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MODEL_STATE_UNSPECIFIED: _ClassVar[ModelState]
    MODEL_STATE_LOADING: _ClassVar[ModelState]
    MODEL_STATE_READY: _ClassVar[ModelState]
    MODEL_STATE_FAILED: _ClassVar[ModelState]
    MODEL_STATE_UNLOADING: _ClassVar[ModelState]
DATA_TYPE_UNSPECIFIED: DataType
FLOAT32: DataType
FLOAT16: DataType
INT64: DataType
UINT8: DataType
SAMPLE_ENCODING_FLOAT32: SampleEncoding
SAMPLE_ENCODING_FLOAT16: SampleEncoding
SAMPLE_ENCODING_UINT8: SampleEncoding
OUTPUT_KIND_MEAN: OutputKind
OUTPUT_KIND_DRAW: OutputKind
MODEL_STATE_UNSPECIFIED: ModelState
MODEL_STATE_LOADING: ModelState
MODEL_STATE_READY: ModelState
MODEL_STATE_FAILED: ModelState
MODEL_STATE_UNLOADING: ModelState

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: DataType
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[_Union[DataType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class ModelRef(_message.Message):
    __slots__ = ("name", "version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelVersionStatus(_message.Message):
    __slots__ = ("name", "version", "state", "reason")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    state: ModelState
    reason: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ..., state: _Optional[_Union[ModelState, str]] = ..., reason: _Optional[str] = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelVersionStatus]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelVersionStatus, _Mapping]]] = ...) -> None: ...

class GetModelInfoRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: ModelRef
    def __init__(self, model: _Optional[_Union[ModelRef, _Mapping]] = ...) -> None: ...

class TensorInfo(_message.Message):
    __slots__ = ("name", "dtype", "shape")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: DataType
    shape: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[_Union[DataType, str]] = ..., shape: _Optional[_Iterable[int]] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "version", "kind", "conditioning", "latent_dim", "num_classes", "class_names", "sample_shape", "sample_dtype", "value_low", "value_high", "likelihood", "encoder_inputs", "encoder_outputs", "decoder_inputs", "decoder_outputs", "available_versions", "manifest_json")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    CONDITIONING_FIELD_NUMBER: _ClassVar[int]
    LATENT_DIM_FIELD_NUMBER: _ClassVar[int]
    NUM_CLASSES_FIELD_NUMBER: _ClassVar[int]
    CLASS_NAMES_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_SHAPE_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_DTYPE_FIELD_NUMBER: _ClassVar[int]
    VALUE_LOW_FIELD_NUMBER: _ClassVar[int]
    VALUE_HIGH_FIELD_NUMBER: _ClassVar[int]
    LIKELIHOOD_FIELD_NUMBER: _ClassVar[int]
    ENCODER_INPUTS_FIELD_NUMBER: _ClassVar[int]
    ENCODER_OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    DECODER_INPUTS_FIELD_NUMBER: _ClassVar[int]
    DECODER_OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    AVAILABLE_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_JSON_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    kind: str
    conditioning: str
    latent_dim: int
    num_classes: int
    class_names: _containers.RepeatedScalarFieldContainer[str]
    sample_shape: _containers.RepeatedScalarFieldContainer[int]
    sample_dtype: DataType
    value_low: float
    value_high: float
    likelihood: str
    encoder_inputs: _containers.RepeatedCompositeFieldContainer[TensorInfo]
    encoder_outputs: _containers.RepeatedCompositeFieldContainer[TensorInfo]
    decoder_inputs: _containers.RepeatedCompositeFieldContainer[TensorInfo]
    decoder_outputs: _containers.RepeatedCompositeFieldContainer[TensorInfo]
    available_versions: _containers.RepeatedScalarFieldContainer[int]
    manifest_json: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ..., kind: _Optional[str] = ..., conditioning: _Optional[str] = ..., latent_dim: _Optional[int] = ..., num_classes: _Optional[int] = ..., class_names: _Optional[_Iterable[str]] = ..., sample_shape: _Optional[_Iterable[int]] = ..., sample_dtype: _Optional[_Union[DataType, str]] = ..., value_low: _Optional[float] = ..., value_high: _Optional[float] = ..., likelihood: _Optional[str] = ..., encoder_inputs: _Optional[_Iterable[_Union[TensorInfo, _Mapping]]] = ..., encoder_outputs: _Optional[_Iterable[_Union[TensorInfo, _Mapping]]] = ..., decoder_inputs: _Optional[_Iterable[_Union[TensorInfo, _Mapping]]] = ..., decoder_outputs: _Optional[_Iterable[_Union[TensorInfo, _Mapping]]] = ..., available_versions: _Optional[_Iterable[int]] = ..., manifest_json: _Optional[str] = ...) -> None: ...

class ServerLimits(_message.Message):
    __slots__ = ("max_batch_size", "max_samples_per_request", "max_message_bytes", "max_stream_chunk_size", "default_stream_chunk_size", "max_stream_samples", "max_score_samples", "max_score_rows")
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_SAMPLES_PER_REQUEST_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_STREAM_CHUNK_SIZE_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_STREAM_CHUNK_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_STREAM_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    MAX_SCORE_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    MAX_SCORE_ROWS_FIELD_NUMBER: _ClassVar[int]
    max_batch_size: int
    max_samples_per_request: int
    max_message_bytes: int
    max_stream_chunk_size: int
    default_stream_chunk_size: int
    max_stream_samples: int
    max_score_samples: int
    max_score_rows: int
    def __init__(self, max_batch_size: _Optional[int] = ..., max_samples_per_request: _Optional[int] = ..., max_message_bytes: _Optional[int] = ..., max_stream_chunk_size: _Optional[int] = ..., default_stream_chunk_size: _Optional[int] = ..., max_stream_samples: _Optional[int] = ..., max_score_samples: _Optional[int] = ..., max_score_rows: _Optional[int] = ...) -> None: ...

class GetModelInfoResponse(_message.Message):
    __slots__ = ("model", "provider", "limits")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PROVIDER_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    model: ModelInfo
    provider: str
    limits: ServerLimits
    def __init__(self, model: _Optional[_Union[ModelInfo, _Mapping]] = ..., provider: _Optional[str] = ..., limits: _Optional[_Union[ServerLimits, _Mapping]] = ...) -> None: ...

class SampleRequest(_message.Message):
    __slots__ = ("model", "num_samples", "label", "labels", "seed", "temperature", "output", "return_latents", "encoding", "start_index")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    NUM_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    RETURN_LATENTS_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    START_INDEX_FIELD_NUMBER: _ClassVar[int]
    model: ModelRef
    num_samples: int
    label: int
    labels: _containers.RepeatedScalarFieldContainer[int]
    seed: int
    temperature: float
    output: OutputKind
    return_latents: bool
    encoding: SampleEncoding
    start_index: int
    def __init__(self, model: _Optional[_Union[ModelRef, _Mapping]] = ..., num_samples: _Optional[int] = ..., label: _Optional[int] = ..., labels: _Optional[_Iterable[int]] = ..., seed: _Optional[int] = ..., temperature: _Optional[float] = ..., output: _Optional[_Union[OutputKind, str]] = ..., return_latents: _Optional[bool] = ..., encoding: _Optional[_Union[SampleEncoding, str]] = ..., start_index: _Optional[int] = ...) -> None: ...

class SampleResponse(_message.Message):
    __slots__ = ("model_name", "model_version", "seed", "start_index", "samples", "labels", "latents")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    START_INDEX_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    LATENTS_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    model_version: int
    seed: int
    start_index: int
    samples: Tensor
    labels: Tensor
    latents: Tensor
    def __init__(self, model_name: _Optional[str] = ..., model_version: _Optional[int] = ..., seed: _Optional[int] = ..., start_index: _Optional[int] = ..., samples: _Optional[_Union[Tensor, _Mapping]] = ..., labels: _Optional[_Union[Tensor, _Mapping]] = ..., latents: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class SampleStreamRequest(_message.Message):
    __slots__ = ("request", "chunk_size")
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    CHUNK_SIZE_FIELD_NUMBER: _ClassVar[int]
    request: SampleRequest
    chunk_size: int
    def __init__(self, request: _Optional[_Union[SampleRequest, _Mapping]] = ..., chunk_size: _Optional[int] = ...) -> None: ...

class EncodeRequest(_message.Message):
    __slots__ = ("model", "x", "labels", "num_draws", "seed")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    X_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    NUM_DRAWS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    model: ModelRef
    x: Tensor
    labels: _containers.RepeatedScalarFieldContainer[int]
    num_draws: int
    seed: int
    def __init__(self, model: _Optional[_Union[ModelRef, _Mapping]] = ..., x: _Optional[_Union[Tensor, _Mapping]] = ..., labels: _Optional[_Iterable[int]] = ..., num_draws: _Optional[int] = ..., seed: _Optional[int] = ...) -> None: ...

class EncodeResponse(_message.Message):
    __slots__ = ("model_name", "model_version", "mu", "logvar", "z", "seed")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    MU_FIELD_NUMBER: _ClassVar[int]
    LOGVAR_FIELD_NUMBER: _ClassVar[int]
    Z_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    model_version: int
    mu: Tensor
    logvar: Tensor
    z: Tensor
    seed: int
    def __init__(self, model_name: _Optional[str] = ..., model_version: _Optional[int] = ..., mu: _Optional[_Union[Tensor, _Mapping]] = ..., logvar: _Optional[_Union[Tensor, _Mapping]] = ..., z: _Optional[_Union[Tensor, _Mapping]] = ..., seed: _Optional[int] = ...) -> None: ...

class DecodeRequest(_message.Message):
    __slots__ = ("model", "z", "labels", "output", "seed", "encoding")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    Z_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    model: ModelRef
    z: Tensor
    labels: _containers.RepeatedScalarFieldContainer[int]
    output: OutputKind
    seed: int
    encoding: SampleEncoding
    def __init__(self, model: _Optional[_Union[ModelRef, _Mapping]] = ..., z: _Optional[_Union[Tensor, _Mapping]] = ..., labels: _Optional[_Iterable[int]] = ..., output: _Optional[_Union[OutputKind, str]] = ..., seed: _Optional[int] = ..., encoding: _Optional[_Union[SampleEncoding, str]] = ...) -> None: ...

class DecodeResponse(_message.Message):
    __slots__ = ("model_name", "model_version", "x", "seed")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    X_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    model_version: int
    x: Tensor
    seed: int
    def __init__(self, model_name: _Optional[str] = ..., model_version: _Optional[int] = ..., x: _Optional[_Union[Tensor, _Mapping]] = ..., seed: _Optional[int] = ...) -> None: ...

class ReconstructRequest(_message.Message):
    __slots__ = ("model", "x", "labels", "encoding")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    X_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    model: ModelRef
    x: Tensor
    labels: _containers.RepeatedScalarFieldContainer[int]
    encoding: SampleEncoding
    def __init__(self, model: _Optional[_Union[ModelRef, _Mapping]] = ..., x: _Optional[_Union[Tensor, _Mapping]] = ..., labels: _Optional[_Iterable[int]] = ..., encoding: _Optional[_Union[SampleEncoding, str]] = ...) -> None: ...

class ReconstructResponse(_message.Message):
    __slots__ = ("model_name", "model_version", "x")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    X_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    model_version: int
    x: Tensor
    def __init__(self, model_name: _Optional[str] = ..., model_version: _Optional[int] = ..., x: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class ScoreRequest(_message.Message):
    __slots__ = ("model", "x", "labels", "k", "seed", "start_index")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    X_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    START_INDEX_FIELD_NUMBER: _ClassVar[int]
    model: ModelRef
    x: Tensor
    labels: _containers.RepeatedScalarFieldContainer[int]
    k: int
    seed: int
    start_index: int
    def __init__(self, model: _Optional[_Union[ModelRef, _Mapping]] = ..., x: _Optional[_Union[Tensor, _Mapping]] = ..., labels: _Optional[_Iterable[int]] = ..., k: _Optional[int] = ..., seed: _Optional[int] = ..., start_index: _Optional[int] = ...) -> None: ...

class ScoreResponse(_message.Message):
    __slots__ = ("model_name", "model_version", "seed", "k", "elbo", "log_px", "log_likelihood", "kl")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    ELBO_FIELD_NUMBER: _ClassVar[int]
    LOG_PX_FIELD_NUMBER: _ClassVar[int]
    LOG_LIKELIHOOD_FIELD_NUMBER: _ClassVar[int]
    KL_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    model_version: int
    seed: int
    k: int
    elbo: _containers.RepeatedScalarFieldContainer[float]
    log_px: _containers.RepeatedScalarFieldContainer[float]
    log_likelihood: _containers.RepeatedScalarFieldContainer[float]
    kl: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, model_name: _Optional[str] = ..., model_version: _Optional[int] = ..., seed: _Optional[int] = ..., k: _Optional[int] = ..., elbo: _Optional[_Iterable[float]] = ..., log_px: _Optional[_Iterable[float]] = ..., log_likelihood: _Optional[_Iterable[float]] = ..., kl: _Optional[_Iterable[float]] = ...) -> None: ...
