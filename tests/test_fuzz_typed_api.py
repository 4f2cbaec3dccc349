"""Property-based tests of every typed-API RPC against a real in-process server.

Each case is a valid request drawn at random, with at most one fault applied to it: a wrong
dtype, shape or byte length, NaN/Inf, a huge or negative count, a label out of range, an
unknown model or version, an answer or a message over the size limit. A valid request must be
answered exactly as onnxruntime answers it directly (serving_fixtures.Reference); a faulty one
must get the status code of its fault with a message naming the field. A last property sends
requests with every field arbitrary. After every case the server must still answer a fixed
request with the same bytes as before.
"""

from __future__ import annotations

import functools
import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
import pytest
from client_fixtures import CVAE, VAE, tiny_repository
from google.protobuf import message_factory
from google.protobuf.descriptor import FieldDescriptor
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from serving_fixtures import Reference, ServerThread, array, channel

from vaeserve.engine import sampling
from vaeserve.proto.v1 import vaeserve_pb2 as pb
from vaeserve.proto.v1 import vaeserve_pb2_grpc as pb_grpc
from vaeserve.server.settings import ServerSettings
from vaeserve.server.status import INTERNAL_MESSAGE
from vaeserve.server.validation import MAX_TEMPERATURE

T = 30.0
PRIOR = "tiny-prior"
NAMES = {"vae": VAE, "concat": CVAE, "prior": PRIOR}
MAX_MESSAGE = 1 << 20  # the server's limit: oversized messages and answers are cheap to build
ANSWER_LIMIT = MAX_MESSAGE - 64 * 1024  # what an answer may hold (validation's headroom)
MAX_ROWS = 4096  # max_samples_per_request
MAX_CHUNK = 4096
MAX_STREAM = 1 << 24
SAMPLE_SHAPE = (1, 8, 8)
PIXELS = math.prod(SAMPLE_SHAPE)
LATENT = 2
CLASSES = 10
INT64 = (-(2**63), 2**63 - 1)
INT32 = (-(2**31), 2**31 - 1)
ITEMSIZE = {
    pb.SAMPLE_ENCODING_FLOAT32: 4,
    pb.SAMPLE_ENCODING_FLOAT16: 2,
    pb.SAMPLE_ENCODING_UINT8: 1,
}
INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
OK = grpc.StatusCode.OK
FUZZ = settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """tiny-vae, tiny-cvae (concat) and a prior CVAE, on a server with 1 MiB messages."""
    from export_fixtures import save_tiny_checkpoint, tiny_config

    from vaeserve.export.onnx_export import export_checkpoint

    models = tiny_repository(tmp_path_factory)
    repository = tmp_path_factory.mktemp("fuzz") / "models"
    for name in (VAE, CVAE):
        shutil.copytree(models / name, repository / name)
    config = tiny_config(kind="cvae", conditioning="prior")
    checkpoint = save_tiny_checkpoint(repository.parent / "prior.pt", config)
    export_checkpoint(checkpoint, repository, PRIOR, version=1)
    settings_ = ServerSettings(
        repository=repository,
        port=0,
        device="cpu",
        intra_op_threads=1,
        max_message_bytes=MAX_MESSAGE,
    )
    server = ServerThread(settings_)
    refs = {key: Reference(repository / name / "1") for key, name in NAMES.items()}
    try:
        with channel(server.address) as ch:
            yield Served(ch, pb_grpc.VaeServiceStub(ch), refs)
    finally:
        server.stop()


@dataclass(frozen=True)
class Served:
    channel: grpc.Channel
    stub: pb_grpc.VaeServiceStub
    refs: dict[str, Reference]


@dataclass
class Case:
    """A request, the status it must get, and what its answer or message must hold."""

    request: Any
    code: grpc.StatusCode = OK
    field: str = ""  # named by the error message
    check: Callable[[Any, dict[str, Reference]], None] | None = None  # of a valid answer


def _outside(low: int, high: int, bounds: tuple[int, int] = INT64) -> st.SearchStrategy[int]:
    """Integers of the field's type outside [low, high]."""
    below = [st.integers(bounds[0], low - 1)] if low > bounds[0] else []
    above = [st.integers(high + 1, bounds[1])] if high < bounds[1] else []
    return st.one_of(*below, *above)


# --- model references -------------------------------------------------------------------

REF_FAULTS = ["name-unknown", "name-empty", "version-absent", "version-negative"]


def _ref_case(draw, name: str, fault: str | None) -> tuple[pb.ModelRef, Case | None]:
    """The model field, and the Case its fault decides (None: no fault of the model field)."""
    if fault == "name-unknown":
        unknown = draw(st.text(min_size=1, max_size=30).filter(lambda s: s not in NAMES.values()))
        return pb.ModelRef(name=unknown), Case(None, NOT_FOUND, "model.name")
    if fault == "name-empty":
        return pb.ModelRef(name=""), Case(None, INVALID, "model.name")
    if fault == "version-absent":
        return pb.ModelRef(name=name, version=draw(st.integers(2, INT64[1]))), Case(
            None, NOT_FOUND, "model.version"
        )
    if fault == "version-negative":
        return pb.ModelRef(name=name, version=draw(st.integers(INT64[0], -1))), Case(
            None, INVALID, "model.version"
        )
    return pb.ModelRef(name=name, version=draw(st.sampled_from([0, 1]))), None


def _with_request(case: Case | None, request: Any, fallback: Case) -> Case:
    chosen = case or fallback
    chosen.request = request
    return chosen


# --- checks of valid answers ----------------------------------------------------------


def _check_encoded(x: np.ndarray, tensor: pb.Tensor, encoding: int) -> None:
    got = array(tensor)
    if encoding == pb.SAMPLE_ENCODING_FLOAT16:
        np.testing.assert_array_equal(got, x.astype(np.float16))
    elif encoding == pb.SAMPLE_ENCODING_UINT8:
        assert got.dtype == np.uint8 and got.shape == x.shape
        np.testing.assert_allclose(got / 255.0, np.clip(x, 0, 1), atol=0.5 / 255 + 1e-6)
    else:
        np.testing.assert_array_equal(got, x)


# --- Sample and SampleStream ------------------------------------------------------------

SAMPLE_FAULTS = [
    *REF_FAULTS,
    "num-samples",
    "start-negative",
    "start-past-the-end",
    "temperature",
    "output",
    "encoding",
    "labels",
]
LABEL_FAULTS = ["label-range", "labels-range", "labels-count", "label-and-labels"]


UNARY_SAMPLE_FAULTS = [*SAMPLE_FAULTS, "too-big"]
STREAM_FAULTS = [*SAMPLE_FAULTS, "chunk", "chunk-too-big"]


@st.composite
def sample_cases(draw, stream: bool, fault: str | None) -> Case:
    key = draw(st.sampled_from(sorted(NAMES)))
    prefix = "request." if stream else ""
    encoding = draw(st.sampled_from(sorted(ITEMSIZE)))
    latents = draw(st.booleans())
    per_row = PIXELS * ITEMSIZE[encoding] + 8 + (4 * LATENT if latents else 0)
    fits = ANSWER_LIMIT // per_row
    n = draw(st.integers(1, 3000 if stream else min(3000, fits)))
    model, ref_case = _ref_case(draw, NAMES[key], fault)
    fields: dict[str, Any] = dict(
        model=model,
        num_samples=n,
        start_index=draw(st.integers(0, sampling.MAX_ROW_INDEX - n)),
        encoding=encoding,
        return_latents=latents,
        output=draw(st.sampled_from([pb.OUTPUT_KIND_MEAN, pb.OUTPUT_KIND_DRAW])),
    )
    seed = draw(st.none() | st.integers(0, sampling.MAX_SEED))
    if seed is not None:
        fields["seed"] = seed
    temperature = draw(st.none() | st.floats(0, MAX_TEMPERATURE, width=32))
    if temperature is not None:
        fields["temperature"] = temperature
    labels = None
    if key != "vae":
        if draw(st.booleans()):
            fields["label"] = draw(st.integers(0, CLASSES - 1))
            labels = [fields["label"]] * n
        else:
            labels = draw(st.lists(st.integers(0, CLASSES - 1), min_size=n, max_size=n))
            fields["labels"] = labels
    chunk = 0
    if stream:
        chunk = draw(st.just(0) | st.integers(max(1, n // 40), min(MAX_CHUNK, fits)))
    expected = Case(None)
    limit = MAX_STREAM if stream else MAX_ROWS
    if fault == "num-samples":
        fields["num_samples"] = draw(_outside(1, limit))
        expected = Case(None, INVALID, f"{prefix}num_samples")
    elif fault == "start-negative":
        fields["start_index"] = draw(st.integers(INT64[0], -1))
        expected = Case(None, INVALID, f"{prefix}start_index")
    elif fault == "start-past-the-end":
        fields["start_index"] = draw(st.integers(sampling.MAX_ROW_INDEX - n + 1, INT64[1]))
        expected = Case(None, INVALID, f"{prefix}start_index")
    elif fault == "temperature":
        fields["temperature"] = draw(
            st.sampled_from([math.nan, math.inf, -math.inf])
            | st.floats(max_value=-(2.0**-100), width=32, allow_infinity=False)
            # Past the bound, latents could overflow float32: samples would be NaN.
            | st.floats(min_value=MAX_TEMPERATURE, exclude_min=True, width=32)
        )
        expected = Case(None, INVALID, f"{prefix}temperature")
    elif fault == "output":
        fields["output"] = draw(_outside(0, 1, INT32))
        expected = Case(None, INVALID, f"{prefix}output")
    elif fault == "encoding":
        fields["encoding"] = draw(_outside(0, 2, INT32))
        expected = Case(None, INVALID, f"{prefix}encoding")
    elif fault == "too-big":
        fields["encoding"], fields["return_latents"] = pb.SAMPLE_ENCODING_FLOAT32, True
        big = draw(st.integers(ANSWER_LIMIT // (PIXELS * 4 + 8 + 4 * LATENT) + 1, MAX_ROWS))
        fields["num_samples"] = big
        fields["start_index"] = min(fields["start_index"], sampling.MAX_ROW_INDEX - big)
        expected = Case(None, INVALID, "max_message_bytes")
    elif fault == "chunk":
        chunk = draw(_outside(0, MAX_CHUNK))
        expected = Case(None, INVALID, "chunk_size")
    elif fault == "chunk-too-big":
        fields["encoding"], fields["return_latents"] = pb.SAMPLE_ENCODING_FLOAT32, True
        chunk = draw(st.integers(ANSWER_LIMIT // (PIXELS * 4 + 8 + 4 * LATENT) + 1, MAX_CHUNK))
        expected = Case(None, INVALID, "chunk_size")
    elif fault == "labels":
        expected = _label_fault(draw, key, n, fields, prefix)
    request = pb.SampleRequest(**fields)
    if stream:
        request = pb.SampleStreamRequest(request=request, chunk_size=chunk)
    if ref_case is not None or expected.code != OK:
        return _with_request(ref_case, request, expected)
    expected.request = request
    expected.check = _sample_check(key, fields, labels, chunk, stream)
    return expected


def _label_fault(draw, key: str, n: int, fields: dict, prefix: str) -> Case:
    fields.pop("label", None)
    fields.pop("labels", None)
    if key == "vae":
        if draw(st.booleans()):
            fields["label"] = draw(st.integers(*INT64))
        else:
            fields["labels"] = draw(st.lists(st.integers(*INT64), min_size=1, max_size=5))
        return Case(None, INVALID, f"{prefix}label")
    fault = draw(st.sampled_from(LABEL_FAULTS))
    if fault == "label-range":
        fields["label"] = draw(_outside(0, CLASSES - 1))
        return Case(None, INVALID, f"{prefix}label")
    if fault == "labels-range":
        labels = draw(st.lists(st.integers(0, CLASSES - 1), min_size=n, max_size=n))
        labels[draw(st.integers(0, n - 1))] = draw(_outside(0, CLASSES - 1))
        fields["labels"] = labels
    elif fault == "labels-count":
        count = draw(st.integers(0, n + 3).filter(lambda c: c != n))
        fields["labels"] = draw(st.lists(st.integers(0, 9), min_size=count, max_size=count))
    else:
        fields["label"] = draw(st.integers(0, CLASSES - 1))
        fields["labels"] = draw(st.lists(st.integers(0, 9), min_size=n, max_size=n))
    return Case(None, INVALID, f"{prefix}label")


def _sample_check(key: str, fields: dict, labels, chunk: int, stream: bool):
    n, start = fields["num_samples"], fields["start_index"]

    def check_part(part: pb.SampleResponse, refs, offset: int, count: int) -> None:
        seed = fields.get("seed", part.seed)
        assert part.seed == seed and part.start_index == start + offset
        classes = None if labels is None else np.asarray(labels[offset : offset + count])
        x, z = refs[key].sample(
            seed,
            start + offset,
            count,
            classes,
            fields.get("temperature", 1.0),
            draw=fields["output"] == pb.OUTPUT_KIND_DRAW,
        )
        _check_encoded(x, part.samples, fields["encoding"])
        if fields["return_latents"]:
            np.testing.assert_array_equal(array(part.latents), z)
        if classes is not None:
            np.testing.assert_array_equal(array(part.labels), classes)

    def check(answer, refs: dict[str, Reference]) -> None:
        if not stream:
            check_part(answer, refs, 0, n)
            return
        assert [c.start_index for c in answer] == list(range(start, start + n, chunk or 1024))
        assert len({c.seed for c in answer}) == 1
        for part in answer:
            check_part(part, refs, part.start_index - start, part.samples.shape[0])

    return check


# --- Encode, Decode, Reconstruct -------------------------------------------------------

TENSOR_FAULTS = ["dtype", "rank", "dims", "rows", "bytes", "non-finite"]


def _values(dtype, shape, low: float, high: float):
    width = 16 if dtype == np.float16 else 32
    return arrays(dtype, shape, elements=st.floats(low, high, width=width))


@st.composite
def float_tensor(draw, row_shape: tuple[int, ...], n: int, low: float, high: float):
    """(array, wire tensor) of n rows of row_shape, float32 or float16, values in [low, high]."""
    dtype = draw(st.sampled_from([np.float32, np.float16]))
    values = draw(_values(dtype, (n, *row_shape), low, high))
    wire = pb.FLOAT32 if dtype == np.float32 else pb.FLOAT16
    return values, pb.Tensor(dtype=wire, shape=values.shape, data=values.tobytes())


def _tensor_fault(draw, fault: str, tensor: pb.Tensor, values: np.ndarray, field: str) -> Case:
    rank = len(tensor.shape)
    if fault == "dtype":
        tensor.dtype = draw(_outside(pb.FLOAT32, pb.FLOAT16, INT32))
        return Case(None, INVALID, f"{field}.dtype")
    if fault == "rank":
        shape = draw(st.lists(st.integers(*INT64), max_size=6).filter(lambda s: len(s) != rank))
        tensor.ClearField("shape")
        tensor.shape.extend(shape)
        return Case(None, INVALID, f"{field}.shape")
    if fault == "dims":
        row = list(tensor.shape[1:])
        dims = draw(st.lists(st.integers(*INT64), min_size=rank - 1, max_size=rank - 1))
        if dims == row:
            dims[0] += 1 if dims[0] < INT64[1] else -1
        del tensor.shape[1:]
        tensor.shape.extend(dims)
        return Case(None, INVALID, f"{field}.shape")
    if fault == "rows":
        tensor.shape[0] = draw(_outside(1, MAX_ROWS))
        return Case(None, INVALID, f"{field}.shape[0]")
    if fault == "bytes":
        size = len(tensor.data)
        tensor.data = bytes(draw(st.integers(0, size + 64).filter(lambda b: b != size)))
        return Case(None, INVALID, f"{field}.data")
    assert fault == "non-finite"
    bad = values.copy()
    bad.flat[draw(st.integers(0, bad.size - 1))] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
    tensor.data = bad.tobytes()
    return Case(None, INVALID, "NaN or Inf")


def _takes_label(key: str) -> bool:
    return key == "concat"  # a prior CVAE's graphs take no label


def _row_labels_fault(draw, key: str, n: int) -> list[int]:
    if not _takes_label(key):
        return draw(st.lists(st.integers(*INT64), min_size=1, max_size=5))
    if draw(st.booleans()):
        count = draw(st.integers(0, n + 3).filter(lambda c: c != n))
        return draw(st.lists(st.integers(0, CLASSES - 1), min_size=count, max_size=count))
    labels = draw(st.lists(st.integers(0, CLASSES - 1), min_size=n, max_size=n))
    labels[draw(st.integers(0, n - 1))] = draw(_outside(0, CLASSES - 1))
    return labels


def _oversized(draw, request: Any, field: str) -> Case:
    """The same request with a tensor too large for the server's 1 MiB message limit."""
    tensor = getattr(request, field)
    tensor.data = bytes(draw(st.integers(MAX_MESSAGE, MAX_MESSAGE + 1024)))
    return Case(request, grpc.StatusCode.RESOURCE_EXHAUSTED, "larger than max")


ENCODE_FAULTS = [
    *REF_FAULTS,
    *TENSOR_FAULTS,
    "range",
    "labels",
    "draws",
    "draws-too-big",
    "oversized",
]


@st.composite
def encode_cases(draw, fault: str | None) -> Case:
    key = draw(st.sampled_from(sorted(NAMES)))
    n = draw(st.integers(1, 64))
    model, ref_case = _ref_case(draw, NAMES[key], fault)
    values, x = draw(float_tensor(SAMPLE_SHAPE, n, 0.0, 1.0))
    labels = draw(st.lists(st.integers(0, 9), min_size=n, max_size=n)) if _takes_label(key) else []
    draws = draw(st.integers(0, 16))
    request = pb.EncodeRequest(model=model, x=x, labels=labels, num_draws=draws)
    if draw(st.booleans()):
        request.seed = draw(st.integers(0, sampling.MAX_SEED))
    if ref_case is not None:
        return _with_request(ref_case, request, ref_case)
    if fault in TENSOR_FAULTS:
        return _with_request(None, request, _tensor_fault(draw, fault, request.x, values, "x"))
    if fault == "range":
        bad = values.copy()
        bad.flat[draw(st.integers(0, bad.size - 1))] = draw(
            st.floats(1.01, 100) | st.floats(-100, -0.01)
        )
        request.x.data = bad.tobytes()
        return Case(request, INVALID, "value_range")
    if fault == "labels":
        request.ClearField("labels")
        request.labels.extend(_row_labels_fault(draw, key, n))
        return Case(request, INVALID, "labels")
    if fault == "draws":
        request.num_draws = draw(_outside(0, MAX_ROWS))
        return Case(request, INVALID, "num_draws")
    if fault == "draws-too-big":
        # The answer holds mu, logvar and the draws; past max_samples_per_request for small n.
        fewest = ANSWER_LIMIT // (n * 4 * LATENT) - 1
        request.num_draws = draw(
            st.sampled_from([fewest, fewest + 1]) | st.integers(fewest, max(fewest, MAX_ROWS))
        )
        return Case(request, INVALID, "num_draws")
    if fault == "oversized":
        return _oversized(draw, request, "x")

    def check(answer: pb.EncodeResponse, refs: dict[str, Reference]) -> None:
        x32 = values.astype(np.float32)
        expected = refs[key].encode(x32, labels or None)
        np.testing.assert_array_equal(array(answer.mu), expected["mu"])
        np.testing.assert_array_equal(array(answer.logvar), expected["logvar"])
        if draws:
            seed = request.seed if request.HasField("seed") else answer.seed
            eps = sampling.normal_rows(seed, sampling.ENCODE_STREAM, 0, n * draws, LATENT)
            z = expected["mu"][:, None] + np.exp(0.5 * expected["logvar"])[:, None] * eps.reshape(
                n, draws, LATENT
            )
            np.testing.assert_allclose(array(answer.z), z, rtol=1e-6, atol=1e-6)
        else:
            assert not answer.HasField("z")

    return Case(request, check=check)


DECODE_FAULTS = [*REF_FAULTS, *TENSOR_FAULTS, "labels", "output", "encoding", "too-big"]


@st.composite
def decode_cases(draw, fault: str | None) -> Case:
    key = draw(st.sampled_from(sorted(NAMES)))
    encoding = draw(st.sampled_from(sorted(ITEMSIZE)))
    n = draw(st.integers(1, min(MAX_ROWS, ANSWER_LIMIT // (PIXELS * ITEMSIZE[encoding]))))
    model, ref_case = _ref_case(draw, NAMES[key], fault)
    values, z = draw(float_tensor((LATENT,), n, -1e4, 1e4))
    labels = draw(st.lists(st.integers(0, 9), min_size=n, max_size=n)) if _takes_label(key) else []
    output = draw(st.sampled_from([pb.OUTPUT_KIND_MEAN, pb.OUTPUT_KIND_DRAW]))
    request = pb.DecodeRequest(model=model, z=z, labels=labels, output=output, encoding=encoding)
    if draw(st.booleans()):
        request.seed = draw(st.integers(0, sampling.MAX_SEED))
    if ref_case is not None:
        return _with_request(ref_case, request, ref_case)
    if fault in TENSOR_FAULTS:
        return _with_request(None, request, _tensor_fault(draw, fault, request.z, values, "z"))
    if fault == "labels":
        request.ClearField("labels")
        request.labels.extend(_row_labels_fault(draw, key, n))
        return Case(request, INVALID, "labels")
    if fault == "output":
        request.output = draw(_outside(0, 1, INT32))
        return Case(request, INVALID, "output")
    if fault == "encoding":
        request.encoding = draw(_outside(0, 2, INT32))
        return Case(request, INVALID, "encoding")
    if fault == "too-big":
        big = draw(st.integers(ANSWER_LIMIT // (PIXELS * 4) + 1, MAX_ROWS))
        zeros = np.zeros((big, LATENT), np.float32)
        request.z.CopyFrom(pb.Tensor(dtype=pb.FLOAT32, shape=zeros.shape, data=zeros.tobytes()))
        request.encoding = pb.SAMPLE_ENCODING_FLOAT32
        return Case(request, INVALID, "max_message_bytes")

    def check(answer: pb.DecodeResponse, refs: dict[str, Reference]) -> None:
        seed = request.seed if request.HasField("seed") else answer.seed
        draw_ = output == pb.OUTPUT_KIND_DRAW
        x = refs[key].decode(values.astype(np.float32), labels or None, draw_, seed)
        _check_encoded(x, answer.x, encoding)

    return Case(request, check=check)


RECONSTRUCT_FAULTS = [
    *REF_FAULTS,
    *TENSOR_FAULTS,
    "range",
    "labels",
    "encoding",
    "too-big",
    "oversized",
]


@st.composite
def reconstruct_cases(draw, fault: str | None) -> Case:
    key = draw(st.sampled_from(sorted(NAMES)))
    encoding = draw(st.sampled_from(sorted(ITEMSIZE)))
    n = draw(st.integers(1, 64))
    model, ref_case = _ref_case(draw, NAMES[key], fault)
    values, x = draw(float_tensor(SAMPLE_SHAPE, n, 0.0, 1.0))
    labels = draw(st.lists(st.integers(0, 9), min_size=n, max_size=n)) if _takes_label(key) else []
    request = pb.ReconstructRequest(model=model, x=x, labels=labels, encoding=encoding)
    if ref_case is not None:
        return _with_request(ref_case, request, ref_case)
    if fault in TENSOR_FAULTS:
        return _with_request(None, request, _tensor_fault(draw, fault, request.x, values, "x"))
    if fault == "range":
        bad = values.copy()
        bad.flat[draw(st.integers(0, bad.size - 1))] = draw(st.floats(1.01, 1000))
        request.x.data = bad.tobytes()
        return Case(request, INVALID, "value_range")
    if fault == "labels":
        request.ClearField("labels")
        request.labels.extend(_row_labels_fault(draw, key, n))
        return Case(request, INVALID, "labels")
    if fault == "encoding":
        request.encoding = draw(_outside(0, 2, INT32))
        return Case(request, INVALID, "encoding")
    if fault == "too-big":
        # Up to 4000 rows: the request itself stays under the message limit.
        big = draw(st.integers(ANSWER_LIMIT // (PIXELS * 4) + 1, 4000))
        zeros = np.zeros((big, *SAMPLE_SHAPE), np.float32)
        request.x.CopyFrom(pb.Tensor(dtype=pb.FLOAT32, shape=zeros.shape, data=zeros.tobytes()))
        request.encoding = pb.SAMPLE_ENCODING_FLOAT32
        request.ClearField("labels")
        request.labels.extend([0] * big if _takes_label(key) else [])
        return Case(request, INVALID, "max_message_bytes")
    if fault == "oversized":
        return _oversized(draw, request, "x")

    def check(answer: pb.ReconstructResponse, refs: dict[str, Reference]) -> None:
        ref = refs[key]
        mu = ref.encode(values.astype(np.float32), labels or None)["mu"]
        _check_encoded(ref.decode(mu, labels or None), answer.x, encoding)

    return Case(request, check=check)


@st.composite
def model_info_cases(draw, fault: str | None) -> Case:
    key = draw(st.sampled_from(sorted(NAMES)))
    model, ref_case = _ref_case(draw, NAMES[key], fault)
    request = pb.GetModelInfoRequest(model=model)
    if ref_case is not None:
        return _with_request(ref_case, request, ref_case)

    def check(answer: pb.GetModelInfoResponse, refs) -> None:
        info = answer.model
        assert (info.name, info.version, info.latent_dim) == (NAMES[key], 1, LATENT)
        assert tuple(info.sample_shape) == SAMPLE_SHAPE
        assert info.num_classes == (0 if key == "vae" else CLASSES)
        assert answer.limits.max_message_bytes == MAX_MESSAGE

    return Case(request, check=check)


# --- running a case ---------------------------------------------------------------------


def _call(stub, rpc: str, request: Any) -> Any:
    if rpc == "SampleStream":
        return list(getattr(stub, rpc)(request, timeout=T))
    return getattr(stub, rpc)(request, timeout=T)


_CANARY = pb.SampleRequest(model=pb.ModelRef(name=CVAE), num_samples=3, seed=5, labels=[1, 2, 3])


def _still_serving(stub, refs) -> None:
    """The server answers a fixed request exactly as onnxruntime does."""
    x, _ = refs["concat"].sample(5, 0, 3, np.array([1, 2, 3]))
    np.testing.assert_array_equal(array(stub.Sample(_CANARY, timeout=T).samples), x)


def _run(served: Served, rpc: str, case: Case) -> None:
    stub, refs = served.stub, served.refs
    event(f"{case.code.name} {case.field}".strip())
    try:
        answer = _call(stub, rpc, case.request)
        code, details = OK, ""
    except grpc.RpcError as exc:
        code, details = exc.code(), exc.details() or ""
    assert code == case.code, (code, details, case.field)
    if code == OK:
        assert case.check is not None
        case.check(answer, refs)
    else:
        assert case.field.lower() in details.lower(), (details, case.field)
        assert details != INTERNAL_MESSAGE
    _still_serving(stub, refs)


VALID_EXAMPLES = 40  # valid requests per RPC, each checked against onnxruntime
FAULT_EXAMPLES = 8  # requests per fault and RPC
TARGETED = [
    ("Sample", functools.partial(sample_cases, False), UNARY_SAMPLE_FAULTS),
    ("SampleStream", functools.partial(sample_cases, True), STREAM_FAULTS),
    ("Encode", encode_cases, ENCODE_FAULTS),
    ("Decode", decode_cases, DECODE_FAULTS),
    ("Reconstruct", reconstruct_cases, RECONSTRUCT_FAULTS),
    ("GetModelInfo", model_info_cases, REF_FAULTS),
]


@pytest.mark.parametrize(
    ("rpc", "cases", "fault"),
    [
        pytest.param(rpc, cases, fault, id=f"{rpc}-{fault or 'valid'}")
        for rpc, cases, faults in TARGETED
        for fault in (None, *faults)
    ],
)
def test_each_request_gets_its_answer_or_its_fault_s_status(served, rpc, cases, fault):
    @settings(FUZZ, max_examples=VALID_EXAMPLES if fault is None else FAULT_EXAMPLES)
    @given(case=cases(fault))
    def check(case: Case) -> None:
        _run(served, rpc, case)

    check()


# --- every field arbitrary --------------------------------------------------------------

_SCALARS = {
    FieldDescriptor.TYPE_INT64: st.integers(*INT64),
    FieldDescriptor.TYPE_UINT64: st.integers(0, 2**64 - 1),
    FieldDescriptor.TYPE_INT32: st.integers(*INT32),
    FieldDescriptor.TYPE_BOOL: st.booleans(),
    FieldDescriptor.TYPE_FLOAT: st.floats(width=32),
    FieldDescriptor.TYPE_ENUM: st.integers(*INT32),
    FieldDescriptor.TYPE_BYTES: st.binary(max_size=2048),
}


def _field_values(field: FieldDescriptor, depth: int) -> st.SearchStrategy:
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        return messages(message_factory.GetMessageClass(field.message_type), depth + 1)
    if field.type == FieldDescriptor.TYPE_STRING:
        # Mostly served names, so that arbitrary requests get past the model lookup.
        return st.sampled_from(sorted(NAMES.values())) | st.text(max_size=20)
    return _SCALARS[field.type]


def messages(cls: type, depth: int = 0) -> st.SearchStrategy:
    """Instances of ``cls`` with any subset of fields set to arbitrary values of their type."""
    fields = {}
    for field in cls.DESCRIPTOR.fields:
        values = _field_values(field, depth)
        if field.is_repeated:
            fields[field.name] = st.lists(values, max_size=8)
        else:
            fields[field.name] = values
    return st.fixed_dictionaries({}, optional=fields).map(lambda kw: cls(**kw))


RPCS = {
    "Sample": pb.SampleRequest,
    "SampleStream": pb.SampleStreamRequest,
    "Encode": pb.EncodeRequest,
    "Decode": pb.DecodeRequest,
    "Reconstruct": pb.ReconstructRequest,
    "Score": pb.ScoreRequest,
    "GetModelInfo": pb.GetModelInfoRequest,
    "ListModels": pb.ListModelsRequest,
}
_ANSWERED = {OK, INVALID, NOT_FOUND}


@pytest.mark.parametrize("rpc", sorted(RPCS))
def test_arbitrary_requests_get_a_client_error_or_an_answer(served, rpc):
    stub, refs = served.stub, served.refs

    @settings(FUZZ, max_examples=60)
    @given(request=messages(RPCS[rpc]))
    def check(request):
        try:
            if rpc == "SampleStream":
                # Arbitrary streams may be long: read a few answers, then hang up.
                call = stub.SampleStream(request, timeout=T)
                for _, _answer in zip(range(3), call, strict=False):
                    pass
                call.cancel()
            else:
                getattr(stub, rpc)(request, timeout=T)
            code, details = OK, ""
        except grpc.RpcError as exc:
            code, details = exc.code(), exc.details() or ""
        assert code in _ANSWERED, (code, details)
        if code == INVALID:
            assert "expected" in details, details
        if code == NOT_FOUND:
            assert "not served" in details or "not loaded" in details, details
        _still_serving(stub, refs)

    check()


@pytest.mark.parametrize("rpc", sorted(RPCS))
def test_bytes_that_are_not_a_message_are_invalid_argument(served, rpc):
    stub, refs, ch = served.stub, served.refs, served.channel
    method = f"/vaeserve.v1.VaeService/{rpc}"
    call = (ch.unary_stream if rpc == "SampleStream" else ch.unary_unary)(method)
    codes = []
    for payload in (b"\xff\xff\xff", b"\x0a\x05ab", b"\x12\x02\x08"):
        try:
            answer = call(payload, timeout=T)
            if rpc == "SampleStream":
                list(answer)  # the status of a stream comes with its answers
            codes.append((OK, ""))
        except grpc.RpcError as exc:
            codes.append((exc.code(), exc.details()))
    _still_serving(stub, refs)
    assert {code for code, _ in codes} == {INVALID}, codes
    assert all("is not a valid" in details for _, details in codes), codes
