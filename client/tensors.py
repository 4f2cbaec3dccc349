"""numpy arrays ↔ ``vaeserve.v1.Tensor`` (dtype + shape + raw little-endian C-order bytes).

Answers are parsed by ``answer_parser``: the tensors' bytes stay where gRPC received them
(``protowire.detach``) and protobuf parses only the small rest, so a 12.8 MB answer costs no
copy after gRPC's own. Requests holding tensors go out as ``Outgoing``: the small fields
through protobuf, each tensor's bytes appended straight from its array (``protowire.serialize``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

from vaeserve import protowire
from vaeserve.proto.v1 import vaeserve_pb2 as pb

__all__ = [
    "ENCODINGS",
    "OUTPUTS",
    "DTYPE_NAMES",
    "Answer",
    "answer_parser",
    "Outgoing",
    "request_serializer",
    "to_tensor",
    "from_tensor",
    "dtype_name",
]

# Wire dtype → numpy dtype, always little-endian whatever the host.
_NUMPY = {
    pb.FLOAT32: np.dtype("<f4"),
    pb.FLOAT16: np.dtype("<f2"),
    pb.INT64: np.dtype("<i8"),
    pb.UINT8: np.dtype("u1"),
}
_WIRE = {dt.newbyteorder("="): code for code, dt in _NUMPY.items()}
DTYPE_NAMES = {
    pb.FLOAT32: "float32",
    pb.FLOAT16: "float16",
    pb.INT64: "int64",
    pb.UINT8: "uint8",
}
# Request options by the names the CLI and the Python API use.
ENCODINGS = {
    "float32": pb.SAMPLE_ENCODING_FLOAT32,
    "float16": pb.SAMPLE_ENCODING_FLOAT16,
    "uint8": pb.SAMPLE_ENCODING_UINT8,
}
OUTPUTS = {"mean": pb.OUTPUT_KIND_MEAN, "draw": pb.OUTPUT_KIND_DRAW}


def dtype_name(code: int) -> str:
    """The numpy name of a wire dtype, e.g. ``"float32"``."""
    try:
        return DTYPE_NAMES[code]
    except KeyError:
        raise ValueError(f"dtype: unknown wire data type {code}") from None


def to_tensor(array: np.ndarray) -> pb.Tensor:
    """The wire form of ``array`` (float32, float16, int64 or uint8).

    Raises:
        ValueError: another dtype.
    """
    tensor = pb.Tensor()
    tensor.data = _describe(array, tensor).tobytes()
    return tensor


def _describe(array: np.ndarray, out: pb.Tensor) -> np.ndarray:
    """Set ``out``'s dtype and shape; return the array as its bytes go on the wire."""
    array = np.asarray(array)
    code = _WIRE.get(array.dtype.newbyteorder("="))
    if code is None:
        raise ValueError(
            f"tensor dtype {array.dtype} is not supported: expected float32, float16, int64 or "
            "uint8"
        )
    out.dtype = code
    out.shape.extend(array.shape)
    return np.ascontiguousarray(array, dtype=_NUMPY[code])


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
        self.tensors = {name: _describe(a, getattr(message, name)) for name, a in tensors.items()}


def request_serializer(message_class: type) -> Callable[[Any], bytes]:
    """A gRPC request serializer taking a ``message_class`` message or an ``Outgoing``."""
    paths = protowire.fields_of_type(message_class, pb.Tensor.DESCRIPTOR.full_name, "data")

    def serialize(request: Any) -> bytes:
        if not isinstance(request, Outgoing):
            return request.SerializeToString()
        fields = [(paths[name], [array]) for name, array in request.tensors.items()]
        return protowire.serialize(request.message, fields)

    return serialize


def from_tensor(tensor: pb.Tensor, data: memoryview | None = None) -> np.ndarray:
    """The array a wire tensor holds; a read-only view of the received bytes (no copy).

    Args:
        data: the tensor's bytes when ``answer_parser`` took them out of the message
            (None: ``tensor.data``).

    Raises:
        ValueError: an unknown dtype, or data whose length disagrees with the shape.
    """
    dtype = _NUMPY.get(tensor.dtype)
    if dtype is None:
        raise ValueError(f"tensor dtype {tensor.dtype} is unknown")
    raw = tensor.data if data is None else data
    shape = tuple(tensor.shape)
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) != expected:
        raise ValueError(
            f"tensor of shape {list(shape)} and dtype {dtype.name} holds {len(raw)} "
            f"bytes, expected {expected}"
        )
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


class Answer(NamedTuple):
    """An answer whose tensors' bytes were left in the received buffer."""

    message: Any  # the answer without its tensors' data
    data: dict[str, memoryview]  # tensor field name -> its data bytes (absent: none sent)

    def tensor(self, field: str) -> np.ndarray:
        """The array of tensor ``field`` (see ``from_tensor``)."""
        return from_tensor(getattr(self.message, field), self.data.get(field))

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
