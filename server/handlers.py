"""Service registration with our own request parsing: junk bytes become INVALID_ARGUMENT,
and large bytes fields stay in gRPC's receive buffer instead of being copied by protobuf.

``add_service`` does what the generated ``add_*_to_server`` functions do, with the parser of
``_tolerant_parser`` and a serializer that lets a servicer return bytes it built itself.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import DecodeError

from vaeserve import protowire
from vaeserve.errors import MalformedMessage

__all__ = [
    "TENSOR_TYPE",
    "rewrapped",
    "WrappedHandlers",
    "tensor_methods",
    "MalformedRequest",
    "DetachedRequest",
    "detached_bytes",
    "add_service",
]

TENSOR_TYPE = "vaeserve.v1.Tensor"  # the typed API's wire tensor, by full name


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
    them with ``detached_bytes``. (A ModelInfer request of at most ``SMALL_REQUEST_BYTES`` is
    not wrapped: protobuf parses it whole, raw contents included, because every attribute
    read through this wrapper first fails a normal lookup.)
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


# Requests up to this size are parsed by protobuf first (see _tolerant_parser); larger ones
# always take the walk, which leaves their bulk bytes in gRPC's buffer.
SMALL_REQUEST_BYTES = 32 << 10


def _tolerant_parser(cls: Any, max_fields: int) -> Callable[[bytes], Any]:
    type_name = cls.DESCRIPTOR.full_name
    paths = _large_fields(cls)
    layout = protowire.layout_of(cls.DESCRIPTOR)
    from_string = cls.FromString

    def walked(data: bytes) -> Any:
        # The bounded walk first: protobuf's parser holds the GIL for as long as it takes and
        # allocates per sub-message, so it only sees messages of a bounded field count.
        try:
            if not paths:
                protowire.check(data, layout, max_fields)
                return from_string(data)
            rest, found = protowire.detach(data, paths, layout, max_fields)
            return DetachedRequest(
                from_string(rest), {paths[path]: views for path, views in found.items()}
            )
        except (DecodeError, MalformedMessage) as exc:
            return MalformedRequest(type_name, exc)

    # The walk costs ~10x protobuf's native parse on a batch-1 request. On a short message
    # its bounds cannot trip: every field takes 2 bytes at least, so it holds at most
    # len/2 fields, and the type nests no deeper than MAX_DEPTH. Typed tensors (Tensor.data)
    # keep the walk at every size: their bytes are viewed, never copied.
    depth = protowire.depth_of(layout)
    native = depth is not None and depth <= protowire.MAX_DEPTH
    native = native and all(len(path) == 1 for path in paths)
    small = min(SMALL_REQUEST_BYTES, 2 * max_fields) if native else -1

    def parse(data: bytes) -> Any:
        if len(data) > small:
            return walked(data)
        try:
            message = from_string(data)
        except DecodeError:
            return walked(data)  # which words the error as it always did
        # Only a canonical message without unknown fields is taken as parsed: anything
        # protobuf dropped or kept aside (a group, which the walk refuses; a map entry's
        # extra fields) changes the size, and then the walk decides. Its bulk bytes fields
        # stay in it (readers fall back to them when nothing was detached).
        size = len(data)
        if message.ByteSize() != size:
            return walked(data)
        message.DiscardUnknownFields()
        if message.ByteSize() != size:
            return walked(data)
        return message

    return parse


def add_service(
    server: grpc.aio.Server, service: ServiceDescriptor, servicer: Any, max_fields: int
) -> str:
    """Register ``servicer``'s methods for ``service`` (what the generated ``add_*_to_server``
    does), with request parsing that turns undecodable bytes, or more than ``max_fields``
    fields, into INVALID_ARGUMENT and leaves large bytes fields in gRPC's buffer
    (``DetachedRequest``).

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
                message_factory.GetMessageClass(method.input_type), max_fields
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


_MAKERS = {
    "unary_unary": grpc.unary_unary_rpc_method_handler,
    "unary_stream": grpc.unary_stream_rpc_method_handler,
    "stream_unary": grpc.stream_unary_rpc_method_handler,
    "stream_stream": grpc.stream_stream_rpc_method_handler,
}
Wrapper = Callable[[Callable[..., Any]], Callable[..., Any]]


class WrappedHandlers:
    """An interceptor's wrapped handler per method, built once: a method maps to the handler
    it was built from and the wrapped one, rebuilt only when gRPC hands over a different
    handler. Only methods with a handler are kept, so this holds at most the server's
    methods."""

    def __init__(self, wrap: Callable[[grpc.RpcMethodHandler, str], grpc.RpcMethodHandler]):
        self._wrap = wrap
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    def get(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self._wrap(handler, method)
        self._wrapped[method] = (handler, wrapped)
        return wrapped


def rewrapped(
    handler: grpc.RpcMethodHandler,
    unary_answer: Wrapper,
    streamed_answer: Wrapper,
    request_deserializer: Callable[[bytes], Any] | None = None,
) -> grpc.RpcMethodHandler:
    """A handler of the same kind as ``handler`` (what interceptors return): its behavior
    wrapped by ``unary_answer`` where the call answers once, by ``streamed_answer`` where it
    streams its answers; its request parser replaced by ``request_deserializer`` if given."""
    for kind, make in _MAKERS.items():
        behavior = getattr(handler, kind)
        if behavior is not None:
            wrap = streamed_answer if handler.response_streaming else unary_answer
            return make(
                wrap(behavior),
                request_deserializer=request_deserializer or handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
    raise ValueError("a method handler without a behavior")


def tensor_methods(services: Iterable[ServiceDescriptor]) -> frozenset[str]:
    """The full names ("/service/Method") of the methods whose requests carry tensors."""
    return frozenset(
        f"/{service.full_name}/{method.name}"
        for service in services
        for method in service.methods
        if _large_fields(message_factory.GetMessageClass(method.input_type))
    )
