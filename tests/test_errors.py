"""The one status mapping: each server error to its code and message, anything else to INTERNAL.

The servicer context is a small stand-in recording what ``abort`` was called with (grpc.aio's
``abort`` raises to end the call; so does this one).
"""

from __future__ import annotations

import asyncio
import logging

import grpc
import numpy as np
import pytest

from vaeserve.errors import DeadlineExceeded, InvalidRequest, ModelNotFound, NotServing, QueueFull
from vaeserve.proto.inference import grpc_service_pb2 as oip
from vaeserve.proto.v1 import vaeserve_pb2 as pb
from vaeserve.server.handlers import (
    DetachedRequest,
    MalformedRequest,
    _tolerant_parser,
    detached_bytes,
)
from vaeserve.server.settings import ServerSettings
from vaeserve.server.status import INTERNAL_MESSAGE, map_errors, status_of
from vaeserve.tensors import to_array

MAX_FIELDS = ServerSettings.max_request_fields  # the server's default bound


class Aborted(Exception):
    pass


class RecordingContext:
    def __init__(self):
        self.aborted: tuple[grpc.StatusCode, str] | None = None

    async def abort(self, code, details):
        self.aborted = (code, details)
        raise Aborted


class Servicer:
    def __init__(self, exc: BaseException | None):
        self.exc = exc

    @map_errors
    async def Unary(self, request, context):
        if self.exc is not None:
            raise self.exc
        return "answer"

    @map_errors
    async def Stream(self, request, context):
        yield "first"
        if self.exc is not None:
            raise self.exc
        yield "second"


def call_unary(exc, request=None):
    context = RecordingContext()

    async def main():
        try:
            return await Servicer(exc).Unary(request, context)
        except Aborted:
            return None

    return asyncio.run(main()), context.aborted


def call_stream(exc):
    context = RecordingContext()

    async def main():
        answers = []
        try:
            async for answer in Servicer(exc).Stream(None, context):
                answers.append(answer)
        except Aborted:
            pass
        return answers

    return asyncio.run(main()), context.aborted


@pytest.mark.parametrize(
    "exc, code",
    [
        pytest.param(
            InvalidRequest("num_samples is 0, expected 1..4096"),
            grpc.StatusCode.INVALID_ARGUMENT,
            id="invalid-argument",
        ),
        pytest.param(
            ModelNotFound("model.name 'x' is not served here"),
            grpc.StatusCode.NOT_FOUND,
            id="not-found",
        ),
        pytest.param(
            QueueFull("queue is full"), grpc.StatusCode.RESOURCE_EXHAUSTED, id="queue-full"
        ),
        pytest.param(NotServing("still loading"), grpc.StatusCode.UNAVAILABLE, id="unavailable"),
        pytest.param(
            DeadlineExceeded("deadline passed"),
            grpc.StatusCode.DEADLINE_EXCEEDED,
            id="deadline-exceeded",
        ),
    ],
)
def test_server_errors_keep_their_message_under_their_code(exc, code):
    assert status_of(exc) == (code, str(exc))
    assert call_unary(exc) == (None, (code, str(exc)))
    assert call_stream(exc) == (["first"], (code, str(exc)))


def test_unexpected_errors_become_internal_with_a_generic_message_and_a_logged_traceback(caplog):
    secret = "/srv/models/private/path.onnx: boom"
    with caplog.at_level(logging.ERROR, logger="vaeserve.server.status"):
        result, aborted = call_unary(ValueError(secret))
    assert result is None
    assert aborted == (grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE)
    assert secret not in INTERNAL_MESSAGE
    (record,) = caplog.records
    assert "Servicer.Unary" in record.getMessage()
    assert record.exc_info is not None and secret in str(record.exc_info[1])


def test_server_errors_are_not_logged_as_failures(caplog):
    with caplog.at_level(logging.ERROR, logger="vaeserve.server.status"):
        call_unary(InvalidRequest("labels holds 11, expected classes 0..9"))
    assert caplog.records == []


def test_successful_calls_pass_through_untouched():
    assert call_unary(None) == ("answer", None)
    assert call_stream(None) == (["first", "second"], None)


def test_cancellation_is_not_turned_into_a_status():
    context = RecordingContext()

    async def main():
        with pytest.raises(asyncio.CancelledError):
            await Servicer(asyncio.CancelledError()).Unary(None, context)

    asyncio.run(main())
    assert context.aborted is None


def test_requests_that_did_not_parse_are_invalid_argument():
    from google.protobuf.message import DecodeError

    malformed = MalformedRequest("vaeserve.v1.SampleRequest", DecodeError("truncated"))
    result, aborted = call_unary(None, request=malformed)
    assert result is None
    assert aborted == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "the request is not a valid vaeserve.v1.SampleRequest message (truncated)",
    )


# --- request parsing: large bytes fields stay in the received buffer ---


def test_tensor_requests_parse_with_their_data_detached_and_viewed():

    x = np.arange(12, dtype="<f4").reshape(3, 4)
    request = pb.EncodeRequest(
        model=pb.ModelRef(name="digits"),
        x=pb.Tensor(dtype=pb.FLOAT32, shape=[3, 4], data=x.tobytes()),
        labels=[1, 2, 3],
    )
    raw = request.SerializeToString()
    parsed = _tolerant_parser(pb.EncodeRequest, MAX_FIELDS)(raw)
    assert isinstance(parsed, DetachedRequest)
    assert parsed.model.name == "digits" and list(parsed.labels) == [1, 2, 3]
    assert parsed.x.data == b"" and list(parsed.x.shape) == [3, 4]  # the rest was parsed
    (view,) = detached_bytes(parsed, "x")
    array = to_array(parsed.x, "x", view)
    np.testing.assert_array_equal(array, x)
    assert np.shares_memory(array, np.frombuffer(raw, np.uint8))  # no copy of the data
    assert detached_bytes(request, "x") == []  # a plain message has nothing detached


def test_open_inference_raw_inputs_are_detached_in_order():

    big = bytes(range(256)) * 256  # 64 KiB: past the size protobuf parses natively
    contents = [b"abcd", b"", big, b"ef"]
    request = oip.ModelInferRequest(model_name="m", raw_input_contents=contents)
    raw = request.SerializeToString()
    parsed = _tolerant_parser(oip.ModelInferRequest, MAX_FIELDS)(raw)
    assert isinstance(parsed, DetachedRequest)
    assert parsed.model_name == "m" and len(parsed.raw_input_contents) == 0
    # protobuf writes the empty entry too: every occurrence is kept, in wire order
    views = detached_bytes(parsed, "raw_input_contents")
    assert [bytes(v) for v in views] == contents
    assert np.shares_memory(np.frombuffer(views[2], np.uint8), np.frombuffer(raw, np.uint8))


def test_short_open_inference_requests_parse_as_plain_messages_with_their_contents():
    """Below the native-parse size a ModelInfer request is protobuf's own message: its raw
    contents stay in it (a few hundred bytes), and readers find them there."""
    from vaeserve.server.oip_convert import _raw_contents

    request = oip.ModelInferRequest(model_name="m", raw_input_contents=[b"abcd", b"", b"ef"])
    request.inputs.add(name="a")
    request.inputs.add(name="b")
    request.inputs.add(name="c")
    parsed = _tolerant_parser(oip.ModelInferRequest, MAX_FIELDS)(request.SerializeToString())
    assert type(parsed) is oip.ModelInferRequest and parsed == request
    assert detached_bytes(parsed, "raw_input_contents") == []
    assert [bytes(v) for v in _raw_contents(parsed)] == [b"abcd", b"", b"ef"]


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(b"\x12\x05\x1a\x09abc", id="tensor-data-past-the-end"),
        pytest.param(b"\x12\xff", id="truncated-length"),
        pytest.param(b"\x0b", id="group-wire-type"),
    ],
)
def test_malformed_tensor_requests_become_malformed_request(raw):

    parsed = _tolerant_parser(pb.EncodeRequest, MAX_FIELDS)(raw)
    assert isinstance(parsed, MalformedRequest)
    assert parsed.message.startswith("the request is not a valid vaeserve.v1.EncodeRequest")


def test_requests_without_large_fields_parse_as_plain_messages():

    request = pb.SampleRequest(model=pb.ModelRef(name="m"), num_samples=3)
    parsed = _tolerant_parser(pb.SampleRequest, MAX_FIELDS)(request.SerializeToString())
    assert type(parsed) is pb.SampleRequest and parsed == request


def test_every_error_has_one_root_and_a_real_status_code():
    import inspect

    from vaeserve import errors

    classes = [
        c for _, c in inspect.getmembers(errors, inspect.isclass) if c.__module__ == errors.__name__
    ]
    assert len(classes) >= 12
    for cls in classes:
        assert issubclass(cls, errors.VaeServeError), cls
        grpc.StatusCode[cls.status]  # a KeyError names a status gRPC does not have
    for cls in (errors.InvalidRequest, errors.ModelNotFound, errors.QueueFull, errors.NotServing):
        received = errors.error_for_status(cls.status, "from the server")
        assert type(received) is cls and str(received) == "from the server"
    other = errors.error_for_status("UNIMPLEMENTED", "no such method")
    assert type(other) is errors.ServerError and other.status == "UNIMPLEMENTED"
    # A file or environment fault reaching a call is the server's: its text (paths) stays here.
    assert status_of(errors.ManifestError("/srv/x")) == (grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE)
