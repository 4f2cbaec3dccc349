"""The server's exceptions and the one place that turns them into gRPC status codes.

Everything the server rejects on purpose raises a ``VaeServeError`` subclass whose message
names the field and what was expected. ``map_errors`` wraps every servicer method (unary and
server-streaming alike): it aborts with the class's status code and the message; any other
exception is logged with its traceback and becomes INTERNAL with a generic message, so no
stack text ever reaches a client. Servicer methods never call ``context.abort`` themselves.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable
from typing import Any

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import DecodeError

import protowire

__all__ = [
    "VaeServeError",
    "InvalidRequest",
    "ModelNotFound",
    "QueueFull",
    "NotServing",
    "DeadlineExceeded",
    "INTERNAL_MESSAGE",
    "status_of",
    "map_errors",
    "MalformedRequest",
    "DetachedRequest",
    "TENSOR_TYPE",
    "detached_bytes",
    "add_service",
]

logger = logging.getLogger(__name__)

TENSOR_TYPE = "vaeserve.v1.Tensor"  # the typed API's wire tensor, by full name

INTERNAL_MESSAGE = "internal error; the server logged the details"


class VaeServeError(Exception):
    """Base of everything the server raises on purpose; ``code`` is its gRPC status."""

    code = grpc.StatusCode.INTERNAL


class InvalidRequest(VaeServeError):
    """A malformed request: wrong dtype, shape, byte length, label, count or option."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class ModelNotFound(VaeServeError):
    """An unknown model name or version."""

    code = grpc.StatusCode.NOT_FOUND


class QueueFull(VaeServeError):
    """A batcher's queue is at capacity; the client may retry with backoff."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class NotServing(VaeServeError):
    """The server is still loading models or is shutting down."""

    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(VaeServeError):
    """The request's deadline passed while it waited in a queue; it was not computed."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and client-facing message for ``exc``.

    ``VaeServeError``s keep their message; anything else is a bug or an environment fault
    whose text may hold paths or internals, so the client gets a generic message.
    """
    if isinstance(exc, VaeServeError):
        return exc.code, str(exc)
    return grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE


class MalformedRequest:
    """Stands in for a request whose bytes are not a valid message of its type.

    gRPC's own deserializers would end such a call UNKNOWN with the parser's exception text;
    ours hand this to the servicer method, where ``map_errors`` makes it INVALID_ARGUMENT.
    """

    def __init__(self, type_name: str, error: Exception):
        self.message = f"the request is not a valid {type_name} message ({error})"


class DetachedRequest:
    """A request whose large bytes fields stayed in the received buffer (``protowire``).

    Reads like the message (attributes and methods pass through to ``message``, in which those
    fields are empty); ``detached`` maps each such field to its occurrences as views. Read
    them with ``detached_bytes``.
    """

    __slots__ = ("message", "detached")

    def __init__(self, message: Any, detached: dict[str, list[memoryview]]):
        self.message = message
        self.detached = detached

    def __getattr__(self, name: str) -> Any:
        return getattr(self.message, name)


def detached_bytes(request: Any, field: str) -> list[Any]:
    """The occurrences of a bytes field that a request parser detached, in wire order (a
    request parsed the plain way has none: []). A Tensor field's ``data`` is keyed by the
    Tensor field's name."""
    detached = request.detached if isinstance(request, DetachedRequest) else {}
    return detached.get(field, [])


def _large_fields(cls: Any) -> dict[protowire.Path, str]:
    """Where a request type carries bulk bytes: each top-level Tensor's ``data``, and each
    top-level repeated bytes field (the Open Inference Protocol's ``raw_input_contents``)."""
    tensors = protowire.fields_of_type(cls, TENSOR_TYPE, "data")
    paths = {path: name for name, path in tensors.items()}
    for field in cls.DESCRIPTOR.fields:
        if field.type == field.TYPE_BYTES and field.is_repeated:
            paths[(field.number,)] = field.name
    return paths


def _tolerant_parser(cls: Any) -> Callable[[bytes], Any]:
    type_name = cls.DESCRIPTOR.full_name
    paths = _large_fields(cls)

    def parse(data: bytes) -> Any:
        try:
            if not paths:
                return cls.FromString(data)
            rest, found = protowire.detach(data, paths)
            return DetachedRequest(
                cls.FromString(rest), {paths[path]: views for path, views in found.items()}
            )
        except (DecodeError, protowire.MalformedMessage) as exc:
            return MalformedRequest(type_name, exc)

    return parse


def add_service(server: grpc.aio.Server, service: ServiceDescriptor, servicer: Any) -> str:
    """Register ``servicer``'s methods for ``service`` (what the generated ``add_*_to_server``
    does), with request parsing that turns undecodable bytes into INVALID_ARGUMENT and leaves
    large bytes fields in gRPC's buffer (``DetachedRequest``).

    Returns:
        The service's full name.
    """
    handlers = {}
    for method in service.methods:
        assert not method.client_streaming, "no client-streaming RPCs are served"
        make = (
            grpc.unary_stream_rpc_method_handler
            if method.server_streaming
            else grpc.unary_unary_rpc_method_handler
        )
        handlers[method.name] = make(
            getattr(servicer, method.name),
            request_deserializer=_tolerant_parser(
                message_factory.GetMessageClass(method.input_type)
            ),
            response_serializer=_serializer(message_factory.GetMessageClass(method.output_type)),
        )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service.full_name, handlers),)
    )
    server.add_registered_method_handlers(service.full_name, handlers)
    return service.full_name


def _serializer(message_class: type) -> Callable[[Any], bytes]:
    """The answer's wire bytes; a servicer may return them already serialized (``bytes``),
    e.g. built by ``protowire.serialize`` to spare copies of large tensors."""
    serialize = message_class.SerializeToString

    def serialized(answer: Any) -> bytes:
        return answer if type(answer) is bytes else serialize(answer)

    return serialized


def _check_parsed(request: Any) -> None:
    if isinstance(request, MalformedRequest):
        raise InvalidRequest(request.message)


def _log_unexpected(method: Callable[..., Any], exc: BaseException) -> None:
    if not isinstance(exc, VaeServeError):
        logger.error("unexpected error in %s", method.__qualname__, exc_info=exc)


def map_errors(method: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate an async servicer method ``(self, request, context)`` with the status mapping.

    Works for coroutine methods (unary answers) and async generators (server streams).
    Cancellation is not an error: it propagates so that gRPC sees the call end.
    """
    if inspect.isasyncgenfunction(method):

        @functools.wraps(method)
        async def stream_wrapper(self: Any, request: Any, context: Any) -> Any:
            try:
                _check_parsed(request)
                async for answer in method(self, request, context):
                    yield answer
                return
            except Exception as exc:  # noqa: BLE001 - the one place errors are mapped
                _log_unexpected(method, exc)
                code, message = status_of(exc)
            await context.abort(code, message)

        return stream_wrapper

    @functools.wraps(method)
    async def unary_wrapper(self: Any, request: Any, context: Any) -> Any:
        try:
            _check_parsed(request)
            return await method(self, request, context)
        except Exception as exc:  # noqa: BLE001 - the one place errors are mapped
            _log_unexpected(method, exc)
            code, message = status_of(exc)
        await context.abort(code, message)

    return unary_wrapper
