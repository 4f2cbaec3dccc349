"""Property-based tests of the Open Inference Protocol (KServe v2) against a real server.

As in test_fuzz_typed_api.py: a valid ModelInfer drawn at random must be answered exactly as
onnxruntime answers it directly; the same request with one fault (wrong datatype, shape, byte
or value count, raw and typed contents mixed, NaN/Inf, a label or pixel out of range, an
unknown model, version or output, an answer or message over the size limit) must get the
status of its fault with a message naming it. The metadata calls get arbitrary names and
versions. After every case the server must still answer a fixed request as before.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
import pytest
from client_fixtures import CVAE, VAE, tiny_repository
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from serving_fixtures import Reference, ServerThread, channel

from vaeserve.proto.inference import grpc_service_pb2 as pb
from vaeserve.proto.inference import grpc_service_pb2_grpc as pb_grpc
from vaeserve.server.settings import ServerSettings
from vaeserve.server.status import INTERNAL_MESSAGE

T = 30.0
PRIOR = "tiny-prior"
NAMES = {"vae": VAE, "concat": CVAE, "prior": PRIOR}
MAX_MESSAGE = 1 << 20
ANSWER_LIMIT = MAX_MESSAGE - 64 * 1024
MAX_ROWS = 4096
SAMPLE_SHAPE = (1, 8, 8)
LATENT = 2
CLASSES = 10
INT64 = (-(2**63), 2**63 - 1)
INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
OK = grpc.StatusCode.OK
FUZZ = settings(
    deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)
VALID_EXAMPLES = 40
FAULT_EXAMPLES = 8
_ASCII = st.characters(max_codepoint=127)  # version strings; other digits have a test of their own
# Inputs and outputs of each graph, as the manifest declares them (checked by a test below).
_OUTPUTS = {"encoder": ["mu", "logvar"], "decoder": ["probs"]}


@dataclass(frozen=True)
class Served:
    channel: grpc.Channel
    stub: pb_grpc.GRPCInferenceServiceStub
    refs: dict[str, Reference]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """tiny-vae, tiny-cvae (concat) and a prior CVAE, on a server with 1 MiB messages."""
    from export_fixtures import save_tiny_checkpoint, tiny_config

    from vaeserve.export.onnx_export import export_checkpoint

    models = tiny_repository(tmp_path_factory)
    repository = tmp_path_factory.mktemp("fuzz-oip") / "models"
    for name in (VAE, CVAE):
        shutil.copytree(models / name, repository / name)
    checkpoint = save_tiny_checkpoint(
        repository.parent / "prior.pt", tiny_config(kind="cvae", conditioning="prior")
    )
    export_checkpoint(checkpoint, repository, PRIOR, version=1)
    server = ServerThread(
        ServerSettings(
            repository=repository,
            port=0,
            device="cpu",
            intra_op_threads=1,
            max_message_bytes=MAX_MESSAGE,
        )
    )
    refs = {key: Reference(repository / name / "1") for key, name in NAMES.items()}
    try:
        with channel(server.address) as ch:
            stub = pb_grpc.GRPCInferenceServiceStub(ch)
            try:
                stub.ServerLive(pb.ServerLiveRequest(), timeout=T)
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.UNIMPLEMENTED:
                    raise
                pytest.fail("the server does not offer the Open Inference Protocol")
            yield Served(ch, stub, refs)
    finally:
        server.stop()


@dataclass
class Case:
    request: Any
    code: grpc.StatusCode = OK
    field: str = ""  # named by the error message
    check: Callable[[Any, dict[str, Reference]], None] | None = None


def _outside(low: int, high: int) -> st.SearchStrategy[int]:
    return st.integers(INT64[0], low - 1) | st.integers(high + 1, INT64[1])


def _inputs(key: str, graph: str) -> list[str]:
    takes_label = key == "concat"
    first = "x" if graph == "encoder" else "z"
    return [first, "y"] if takes_label else [first]


def _request(name: str, arrays_: dict[str, np.ndarray], raw: bool) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=name)
    for input_name, value in arrays_.items():
        datatype = "INT64" if value.dtype == np.int64 else "FP32"
        tensor = request.inputs.add(name=input_name, datatype=datatype, shape=value.shape)
        if raw:
            request.raw_input_contents.append(value.tobytes())
        elif datatype == "INT64":
            tensor.contents.int64_contents.extend(value.ravel().tolist())
        else:
            tensor.contents.fp32_contents.extend(value.ravel().tolist())
    return request


INFER_FAULTS = [
    "name-unknown",
    "graph-unknown",
    "version-bad",
    "version-absent",
    "input-missing",
    "input-unknown",
    "input-twice",
    "datatype",
    "shape",
    "rows",
    "batch-mismatch",
    "raw-bytes",
    "raw-count",
    "typed-count",
    "raw-and-typed",
    "non-finite",
    "x-range",
    "y-range",
    "output-unknown",
    "output-twice",
    "too-big",
    "oversized",
]


@st.composite
def infer_cases(draw, fault: str | None) -> Case:
    key = draw(st.sampled_from(sorted(NAMES)))
    graph = draw(st.sampled_from(["encoder", "decoder"]))
    if fault in ("x-range",):
        graph = "encoder"
    if fault == "y-range":
        key = "concat"
    n = draw(st.integers(1, 64))
    values: dict[str, np.ndarray] = {}
    for name in _inputs(key, graph):
        if name == "x":
            values[name] = draw(
                arrays(np.float32, (n, *SAMPLE_SHAPE), elements=st.floats(0, 1, width=32))
            )
        elif name == "z":
            values[name] = draw(
                arrays(np.float32, (n, LATENT), elements=st.floats(-1e4, 1e4, width=32))
            )
        else:
            values[name] = np.array(
                draw(st.lists(st.integers(0, CLASSES - 1), min_size=n, max_size=n)), np.int64
            )
    raw = draw(st.booleans())
    outputs = draw(st.none() | st.permutations(_OUTPUTS[graph]))
    version = draw(st.sampled_from(["", "1"]))
    model = f"{NAMES[key]}-{graph}"
    request = _request(model, values, raw)
    request.model_version = version
    if outputs is not None:
        for name in outputs:
            request.outputs.add(name=name)
    if draw(st.booleans()):
        request.id = draw(st.text(max_size=20))
    expected = _fault(draw, fault, request, values, key, graph, raw)
    if expected is not None:
        return expected

    def check(answer: pb.ModelInferResponse, refs: dict[str, Reference]) -> None:
        ref = refs[key]
        labels = values.get("y")
        wanted = (
            ref.encode(values["x"], labels)
            if graph == "encoder"
            else ref.decode_params(values["z"], labels)
        )
        names = outputs if outputs is not None else list(wanted)
        assert [o.name for o in answer.outputs] == list(names)
        assert answer.model_name == model and answer.model_version == "1"
        assert answer.id == request.id
        for out, data in zip(answer.outputs, answer.raw_output_contents, strict=True):
            got = np.frombuffer(data, "<f4").reshape(tuple(out.shape))
            np.testing.assert_array_equal(got, wanted[out.name])

    return Case(request, check=check)


def _fault(draw, fault, request, values, key, graph, raw) -> Case | None:
    n = len(next(iter(values.values())))
    first = request.inputs[0]
    if fault is None:
        return None
    if fault == "name-unknown":
        request.model_name = draw(
            st.text(max_size=30).filter(lambda s: s.rpartition("-")[0] not in NAMES.values())
        )
        return Case(request, NOT_FOUND, "")
    if fault == "graph-unknown":
        graph_name = draw(st.text(max_size=10).filter(lambda s: s not in ("encoder", "decoder")))
        request.model_name = f"{NAMES[key]}-{graph_name}"
        return Case(request, NOT_FOUND, "")
    if fault == "version-bad":
        request.model_version = draw(
            st.text(_ASCII, min_size=1, max_size=10).filter(lambda s: not _version_ok(s))
        )
        return Case(request, INVALID, "version")
    if fault == "version-absent":
        request.model_version = str(draw(st.integers(2, 10**30)))
        return Case(request, NOT_FOUND, "version")
    if fault == "input-missing":
        del request.inputs[0]
        if raw:
            del request.raw_input_contents[0]
        return Case(request, INVALID, "inputs are")
    if fault == "input-unknown":
        first.name = draw(st.text(max_size=10).filter(lambda s: s not in ("x", "y", "z")))
        return Case(request, INVALID, "inputs are")
    if fault == "input-twice":
        request.inputs.add().CopyFrom(first)
        if raw:
            request.raw_input_contents.append(request.raw_input_contents[0])
        return Case(request, INVALID, "inputs are")
    if fault == "datatype":
        first.datatype = draw(
            st.sampled_from(["FP16", "FP64", "INT64", "INT32", "BYTES", "UINT8", "BOOL", ""])
            | st.text(max_size=6)
        )
        if first.datatype == "FP32":
            first.datatype = "FP64"
        return Case(request, INVALID, "datatype")
    if fault == "shape":
        rank = len(first.shape)
        shape = draw(
            st.lists(st.integers(*INT64), max_size=6).filter(
                lambda s: len(s) != rank or list(s[1:]) != list(first.shape[1:])
            )
        )
        first.ClearField("shape")
        first.shape.extend(shape)
        return Case(request, INVALID, "shape")
    if fault == "rows":
        first.shape[0] = draw(_outside(1, MAX_ROWS))
        return Case(request, INVALID, "rows")
    if fault == "batch-mismatch":
        if len(request.inputs) < 2:
            return _fault(draw, "rows", request, values, key, graph, raw)
        rows = draw(st.integers(1, 64).filter(lambda r: r != n))
        y = np.zeros(rows, np.int64)
        request.inputs[1].shape[0] = rows
        if raw:
            request.raw_input_contents[1] = y.tobytes()
        else:
            request.inputs[1].contents.ClearField("int64_contents")
            request.inputs[1].contents.int64_contents.extend(y.tolist())
        return Case(request, INVALID, "different batch sizes")
    if fault == "raw-bytes":
        if not raw:
            return _fault(draw, "typed-count", request, values, key, graph, raw)
        size = len(request.raw_input_contents[0])
        request.raw_input_contents[0] = bytes(
            draw(st.integers(0, size + 64).filter(lambda s: s != size))
        )
        return Case(request, INVALID, "raw bytes")
    if fault == "raw-count":
        if not raw:
            request.raw_input_contents.append(b"")
            return Case(request, INVALID, "raw_input_contents")
        request.raw_input_contents.append(draw(st.binary(max_size=16)))
        return Case(request, INVALID, "raw_input_contents")
    if fault == "typed-count":
        if raw:
            return _fault(draw, "raw-bytes", request, values, key, graph, raw)
        contents = first.contents.fp32_contents
        if draw(st.booleans()) or len(contents) == 0:
            contents.append(0.5)
        else:
            del contents[-1]
        return Case(request, INVALID, "values in contents")
    if fault == "raw-and-typed":
        if not raw:
            request.raw_input_contents.extend(v.tobytes() for v in values.values())
        else:
            first.contents.fp32_contents.append(0.5)
        return Case(request, INVALID, "one way")
    if fault == "non-finite":
        name = "x" if graph == "encoder" else "z"
        bad = values[name].copy()
        bad.flat[draw(st.integers(0, bad.size - 1))] = draw(
            st.sampled_from([np.nan, np.inf, -np.inf])
        )
        _replace(request, name, bad, raw)
        return Case(request, INVALID, "NaN or Inf")
    if fault == "x-range":
        bad = values["x"].copy()
        bad.flat[draw(st.integers(0, bad.size - 1))] = draw(
            st.floats(1.01, 1e6) | st.floats(-1e6, -0.01)
        )
        _replace(request, "x", bad, raw)
        return Case(request, INVALID, "value_range")
    if fault == "y-range":
        bad = values["y"].copy()
        bad[draw(st.integers(0, n - 1))] = draw(_outside(0, CLASSES - 1))
        _replace(request, "y", bad, raw)
        return Case(request, INVALID, "'y'")
    if fault == "output-unknown":
        request.outputs.add(
            name=draw(st.text(max_size=10).filter(lambda s: s not in _OUTPUTS[graph]))
        )
        return Case(request, INVALID, "requested output")
    if fault == "output-twice":
        request.ClearField("outputs")
        name = _OUTPUTS[graph][0]
        request.outputs.add(name=name)
        request.outputs.add(name=name)
        return Case(request, INVALID, "repeat")
    if fault == "too-big":
        # A decoder answer of more than ANSWER_LIMIT bytes, from a request well under the limit.
        rows = draw(st.integers(ANSWER_LIMIT // (4 * 64) + 1, MAX_ROWS))
        big = {"z": np.zeros((rows, LATENT), np.float32)}
        if key == "concat":
            big["y"] = np.zeros(rows, np.int64)
        request.CopyFrom(_request(f"{NAMES[key]}-decoder", big, raw=True))
        return Case(request, INVALID, "max_message_bytes")
    assert fault == "oversized"
    request.raw_input_contents.append(bytes(draw(st.integers(MAX_MESSAGE, MAX_MESSAGE + 1024))))
    return Case(request, grpc.StatusCode.RESOURCE_EXHAUSTED, "larger than max")


def _replace(request: pb.ModelInferRequest, name: str, value: np.ndarray, raw: bool) -> None:
    index = [t.name for t in request.inputs].index(name)
    if raw:
        request.raw_input_contents[index] = value.tobytes()
        return
    contents = request.inputs[index].contents
    field = "int64_contents" if value.dtype == np.int64 else "fp32_contents"
    contents.ClearField(field)
    getattr(contents, field).extend(value.ravel().tolist())


# --- the metadata calls -----------------------------------------------------------------

_NAMES_TO_TRY = st.sampled_from(
    [f"{n}-{g}" for n in NAMES.values() for g in ("encoder", "decoder")]
) | st.text(max_size=30)
# Non-ASCII digits ("²") are left to test_a_version_in_other_digits_is_invalid_argument.
_VERSIONS_TO_TRY = st.sampled_from(["", "1", "2", "0", "-1", "01", "x"]) | st.text(
    _ASCII, max_size=8
)


def _version_ok(version: str) -> bool:
    return version == "" or (version.isascii() and version.isdigit() and int(version) >= 1)


def _metadata_codes(rpc: str, name: str, version: str) -> set[grpc.StatusCode]:
    """The statuses a metadata call may end with; both faults present: either one."""
    if rpc == "ModelStatistics" and name == "":
        return {OK}  # statistics of every graph
    model, _, graph = name.rpartition("-")
    bad_name = not model or graph not in _OUTPUTS
    loaded = version == "" or (_version_ok(version) and int(version) == 1)
    unknown = bad_name or model not in NAMES.values() or not loaded
    codes = set()
    if not _version_ok(version):
        codes.add(INVALID)
    if unknown and _version_ok(version) or bad_name:
        codes.add(OK if rpc == "ModelReady" else NOT_FOUND)  # "not ready" is an answer
    return codes or {OK}


METADATA_RPCS = {
    "ModelMetadata": pb.ModelMetadataRequest,
    "ModelConfig": pb.ModelConfigRequest,
    "ModelStatistics": pb.ModelStatisticsRequest,
    "ModelReady": pb.ModelReadyRequest,
}


@pytest.mark.parametrize("rpc", sorted(METADATA_RPCS))
def test_metadata_calls_with_any_name_and_version(served, rpc):
    @settings(FUZZ, max_examples=60)
    @given(name=_NAMES_TO_TRY, version=_VERSIONS_TO_TRY)
    def check(name: str, version: str) -> None:
        request = METADATA_RPCS[rpc](name=name, version=version)
        expected = _metadata_codes(rpc, name, version)
        event(" or ".join(sorted(c.name for c in expected)))
        try:
            answer = getattr(served.stub, rpc)(request, timeout=T)
            code, details = OK, ""
        except grpc.RpcError as exc:
            code, details = exc.code(), exc.details() or ""
        assert code in expected, (code, details)
        if code != OK:
            assert details and details != INTERNAL_MESSAGE
        elif rpc == "ModelReady":
            assert answer.ready == (_metadata_codes("ModelMetadata", name, version) == {OK})
        elif rpc == "ModelMetadata":
            assert answer.name == name and answer.platform == "onnxruntime_onnx"
        _still_serving(served)

    check()


# --- running a case ---------------------------------------------------------------------

_CANARY_Z = np.array([[0.5, -1.0], [2.0, 0.0]], np.float32)


def _still_serving(served: Served) -> None:
    request = _request(f"{VAE}-decoder", {"z": _CANARY_Z}, raw=True)
    answer = served.stub.ModelInfer(request, timeout=T)
    got = np.frombuffer(answer.raw_output_contents[0], "<f4").reshape(2, *SAMPLE_SHAPE)
    np.testing.assert_array_equal(got, served.refs["vae"].decode_params(_CANARY_Z)["probs"])


def _run(served: Served, case: Case) -> None:
    event(f"{case.code.name} {case.field}".strip())
    try:
        answer = served.stub.ModelInfer(case.request, timeout=T)
        code, details = OK, ""
    except grpc.RpcError as exc:
        code, details = exc.code(), exc.details() or ""
    assert code == case.code, (code, details, case.field)
    if code == OK:
        assert case.check is not None
        case.check(answer, served.refs)
    else:
        assert case.field.lower() in details.lower(), (details, case.field)
        assert details and details != INTERNAL_MESSAGE
    _still_serving(served)


@pytest.mark.parametrize("fault", [None, *INFER_FAULTS], ids=lambda f: f or "valid")
def test_model_infer_gets_its_answer_or_its_fault_s_status(served, fault):
    @settings(FUZZ, max_examples=VALID_EXAMPLES if fault is None else FAULT_EXAMPLES)
    @given(case=infer_cases(fault))
    def check(case: Case) -> None:
        _run(served, case)

    check()


def test_the_graphs_declare_the_outputs_this_module_assumes(served):
    for name in NAMES.values():
        for graph, outputs in _OUTPUTS.items():
            answer = served.stub.ModelMetadata(
                pb.ModelMetadataRequest(name=f"{name}-{graph}"), timeout=T
            )
            assert [o.name for o in answer.outputs] == outputs


@pytest.mark.parametrize("rpc", ["ModelInfer", "ModelMetadata", "ServerLive"])
def test_bytes_that_are_not_a_message_are_invalid_argument(served, rpc):
    method = f"/inference.GRPCInferenceService/{rpc}"
    codes = []
    for payload in (b"\xff\xff\xff", b"\x0a\x05ab", b"\x12\x02\x08"):
        try:
            served.channel.unary_unary(method)(payload, timeout=T)
            codes.append((OK, ""))
        except grpc.RpcError as exc:
            codes.append((exc.code(), exc.details()))
    _still_serving(served)
    assert {code for code, _ in codes} == {INVALID}, codes
    assert all("is not a valid" in details for _, details in codes), codes


def test_statistics_of_an_unknown_model_are_not_found(served):
    request = pb.ModelStatisticsRequest(name="nope-decoder")
    with pytest.raises(grpc.RpcError) as caught:
        served.stub.ModelStatistics(request, timeout=T)
    assert caught.value.code() == NOT_FOUND, caught.value.details()


@pytest.mark.parametrize("rpc", [*sorted(METADATA_RPCS), "ModelInfer"])
def test_a_version_in_other_digits_is_invalid_argument(served, rpc):
    if rpc == "ModelInfer":
        request = _request(f"{VAE}-decoder", {"z": _CANARY_Z}, raw=True)
        request.model_version = "²"
    else:
        request = METADATA_RPCS[rpc](name=f"{VAE}-decoder", version="²")
    with pytest.raises(grpc.RpcError) as caught:
        getattr(served.stub, rpc)(request, timeout=T)
    _still_serving(served)
    assert caught.value.code() == INVALID, caught.value.details()
    assert "version" in caught.value.details()
