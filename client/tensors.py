"""numpy arrays ↔ ``vaeserve.v1.Tensor`` (dtype + shape + raw little-endian C-order bytes).

Answers are parsed by ``answer_parser``: the tensors' bytes stay where gRPC received them
(``protowire.detach``) and protobuf parses only the small rest, so a 12.8 MB answer costs no
copy after gRPC's own. Requests holding tensors go out as ``Outgoing``: the small fields
through protobuf, each tensor's bytes appended straight from its array (``protowire.serialize``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import grpc
import numpy as np
from google.protobuf import message_factory

from vaeserve import protowire
from vaeserve.proto.v1 import vaeserve_pb2 as pb
from vaeserve.proto.v1 import vaeserve_pb2_grpc as pb_grpc
from vaeserve.tensors import describe, to_array

__all__ = [
    "ENCODINGS",
    "OUTPUTS",
    "Answer",
    "answer_parser",
    "Outgoing",
    "request_serializer",
    "AnswerStub",
]

# Request options by the names the CLI and the Python API use.
ENCODINGS = {
    "float32": pb.SAMPLE_ENCODING_FLOAT32,
    "float16": pb.SAMPLE_ENCODING_FLOAT16,
    "uint8": pb.SAMPLE_ENCODING_UINT8,
}
OUTPUTS = {"mean": pb.OUTPUT_KIND_MEAN, "draw": pb.OUTPUT_KIND_DRAW}


class Outgoing:
    """A request and the arrays of its tensor fields, serialized by ``request_serializer``
    without copying the arrays into the message.

    Raises (on construction):
        ValueError: an array of a dtype the wire does not carry.
    """

    __slots__ = ("message", "tensors")

    def __init__(self, message: Any, tensors: dict[str, np.ndarray]):
        self.message = message
        # dtype and shape go into the message now; the bytes at serialization, per attempt.
        self.tensors = {name: describe(a, getattr(message, name)) for name, a in tensors.items()}


def request_serializer(message_class: type) -> Callable[[Any], bytes]:
    """A gRPC request serializer taking a ``message_class`` message or an ``Outgoing``."""
    paths = protowire.fields_of_type(message_class, pb.Tensor.DESCRIPTOR.full_name, "data")

    def serialize(request: Any) -> bytes:
        if not isinstance(request, Outgoing):
            return request.SerializeToString()
        fields = [(paths[name], [array]) for name, array in request.tensors.items()]
        return protowire.serialize(request.message, fields)

    return serialize


class Answer(NamedTuple):
    """An answer whose tensors' bytes were left in the received buffer."""

    message: Any  # the answer without its tensors' data
    data: dict[str, memoryview]  # tensor field name -> its data bytes (absent: none sent)

    def tensor(self, field: str) -> np.ndarray:
        """The array of tensor ``field``: a read-only view of the received bytes."""
        return to_array(getattr(self.message, field), field, self.data.get(field))

    def optional_tensor(self, field: str) -> np.ndarray | None:
        """As ``tensor``, or None for a tensor the server did not set or left empty."""
        if not self.message.HasField(field) or not getattr(self.message, field).shape:
            return None
        return self.tensor(field)


def answer_parser(message_class: type, *tensor_fields: str) -> Callable[[bytes], Answer]:
    """A gRPC response deserializer: wire bytes -> ``Answer`` of ``message_class``.

    Raises (from the parser):
        protowire.MalformedMessage / google.protobuf.message.DecodeError: not a well-formed
            answer; gRPC reports it as an INTERNAL error of the call.
    """
    paths = {protowire.field_path(message_class, name, "data"): name for name in tensor_fields}
    parse = message_class.FromString

    def parse_answer(raw: bytes) -> Answer:
        rest, found = protowire.detach(raw, paths)
        # A singular field's last occurrence wins, as protobuf itself would read it.
        return Answer(parse(rest), {paths[path]: views[-1] for path, views in found.items()})

    return parse_answer


# Answers holding tensors, and the tensor fields of each: parsed into ``Answer``s.
_TENSOR_ANSWERS = {
    "Sample": ("samples", "labels", "latents"),
    "SampleStream": ("samples", "labels", "latents"),
    "Encode": ("mu", "logvar", "z"),
    "Decode": ("x",),
    "Reconstruct": ("x",),
    "Score": (),  # no tensors in the answer, but its request carries x (``Outgoing``)
}


class AnswerStub(pb_grpc.VaeServiceStub):
    """The generated stub, except that answers holding tensors come as ``Answer``s whose
    tensor bytes stay in gRPC's buffer (``answer_parser``) instead of being copied out by
    protobuf, and those calls also take ``Outgoing`` requests (``request_serializer``).
    Works on ``grpc`` and ``grpc.aio`` channels alike."""

    def __init__(self, channel: grpc.Channel | grpc.aio.Channel):
        super().__init__(channel)
        service = pb.DESCRIPTOR.services_by_name["VaeService"]
        for name, fields in _TENSOR_ANSWERS.items():
            method = service.methods_by_name[name]
            make = channel.unary_stream if method.server_streaming else channel.unary_unary
            request_class = message_factory.GetMessageClass(method.input_type)
            answer_class = message_factory.GetMessageClass(method.output_type)
            callable_ = make(
                f"/{service.full_name}/{name}",
                request_serializer=request_serializer(request_class),
                response_deserializer=answer_parser(answer_class, *fields),
            )
            setattr(self, name, callable_)
