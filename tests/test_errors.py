"""The one status mapping: each server error to its code and message, anything else to INTERNAL.

The servicer context is a small stand-in recording what ``abort`` was called with (grpc.aio's
``abort`` raises to end the call; so does this one).
"""

from __future__ import annotations

import asyncio
import logging

import grpc
import pytest

from server.errors import (
    INTERNAL_MESSAGE,
    DeadlineExceeded,
    InvalidRequest,
    MalformedRequest,
    ModelNotFound,
    NotServing,
    QueueFull,
    map_errors,
    status_of,
)


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
    with caplog.at_level(logging.ERROR, logger="server.errors"):
        result, aborted = call_unary(ValueError(secret))
    assert result is None
    assert aborted == (grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE)
    assert secret not in INTERNAL_MESSAGE
    (record,) = caplog.records
    assert "Servicer.Unary" in record.getMessage()
    assert record.exc_info is not None and secret in str(record.exc_info[1])


def test_server_errors_are_not_logged_as_failures(caplog):
    with caplog.at_level(logging.ERROR, logger="server.errors"):
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
