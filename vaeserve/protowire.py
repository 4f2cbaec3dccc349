"""Large bytes fields of protobuf messages, written and read without copying them.

A 4096x784 float32 answer is 12.8 MB. Through the protobuf API it is copied three times
before gRPC sees it (``tobytes``, the field assignment, ``SerializeToString``) and twice after
gRPC hands it over (parsing, then reading the field); each copy costs ~1-2 ms per 12.8 MB on
the reference machine, next to ~7 ms of decoder time per 1024 rows (docs/performance.md).

The protobuf wire format makes both directions cheap without leaving the format:

- Writing: serialize the message without its large fields, then append each one as a
  length-delimited field (tag, length, bytes). Every parser merges repeated occurrences of a
  singular sub-message field and appends to repeated fields, so ``head + appended`` parses to
  the full message; the only copy is the final ``b"".join``.
- Reading: walk the serialized bytes, take the large fields out as ``memoryview`` slices of
  the received buffer, and let protobuf parse the small rest.

Field paths are tuples of field numbers from the top-level message down to the bytes field,
e.g. ``(SampleResponse.samples, Tensor.data)``; every step but the last names a message field.

Reading is bounded (a request is hostile until checked): the walk visits every field of every
sub-message, guided by the message's ``Layout``, and stops at ``max_fields`` fields or
``MAX_DEPTH`` levels. Its cost is linear in the fields it visits, so a message of millions of
2-byte fields costs a few milliseconds before it is refused, and protobuf's own parser, which
holds the GIL and allocates an object per sub-message, is only ever given a message whose
field count is bounded.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any

from vaeserve.errors import MalformedMessage

__all__ = [
    "MAX_DEPTH",
    "Layout",
    "MalformedMessage",
    "TooManyFields",
    "check",
    "layout_of",
    "depth_of",
    "varint",
    "bytes_field",
    "serialize",
    "detach",
    "field_path",
    "fields_of_type",
]

_VARINT, _FIXED64, _LENGTH, _FIXED32 = 0, 1, 2, 5
_FIXED_SIZES = {_FIXED64: 8, _FIXED32: 4}
Path = tuple[int, ...]
Buffer = Any  # anything with the buffer protocol: bytes, memoryview, a C-contiguous array
# Sub-messages nested deeper than this are refused; our messages nest at most 4 levels.
MAX_DEPTH = 16
# A message's layout for the walk: the numbers of its message fields (maps included), each
# with the layout of its type; other fields are scalars, strings, bytes or packed arrays.
Layout = dict[int, "Layout"]


_ONE_BYTE = [bytes((value,)) for value in range(0x80)]


class TooManyFields(MalformedMessage):
    """The message holds more fields than the reader's bound."""


def layout_of(descriptor: Any, _done: dict[str, Layout] | None = None) -> Layout:
    """The walk's layout of a message type, from its descriptor (recursive types share dicts)."""
    done = {} if _done is None else _done
    if descriptor.full_name in done:
        return done[descriptor.full_name]
    layout: Layout = {}
    done[descriptor.full_name] = layout
    for field in descriptor.fields:
        if field.message_type is not None:
            layout[field.number] = layout_of(field.message_type, done)
    return layout


def depth_of(layout: Layout) -> int | None:
    """How many levels of sub-messages a layout holds (0: none); None for a recursive type."""

    def depth(node: Layout, path: tuple[int, ...]) -> int | None:
        if id(node) in path:
            return None
        deepest = 0
        for child in node.values():
            below = depth(child, (*path, id(node)))
            if below is None:
                return None
            deepest = max(deepest, below + 1)
        return deepest

    return depth(layout, ())


class _Budget:
    __slots__ = ("left", "limit")

    def __init__(self, limit: int):
        self.left = self.limit = limit

    def spend(self) -> None:
        self.left -= 1
        if self.left < 0:
            raise TooManyFields(
                f"the message holds more than {self.limit} fields, this server's bound: send "
                "tensors as bytes or packed repeated fields, not one field per value"
            )


def field_path(message_class: type, *names: str) -> Path:
    """The field numbers of ``names``, each a field of the message the previous one holds.

    ``field_path(pb.SampleResponse, "samples", "data")`` -> ``(1, 3)`` (say).
    """
    descriptor = message_class.DESCRIPTOR
    numbers = []
    for i, name in enumerate(names):
        field = descriptor.fields_by_name[name]
        numbers.append(field.number)
        if i < len(names) - 1:
            descriptor = field.message_type
            if descriptor is None:
                raise ValueError(f"{name} is not a message field, so it cannot lead to {names}")
    return tuple(numbers)


def fields_of_type(message_class: type, type_name: str, inner: str) -> dict[str, Path]:
    """Each top-level field of ``message_class`` whose message type is ``type_name``, by name,
    with the path to that type's field ``inner``: e.g. every Tensor field's ``data``."""
    return {
        field.name: (field.number, field.message_type.fields_by_name[inner].number)
        for field in message_class.DESCRIPTOR.fields
        if field.message_type is not None and field.message_type.full_name == type_name
    }


def varint(value: int) -> bytes:
    """``value`` (>= 0) as a protobuf base-128 varint."""
    if 0 <= value < 0x80:  # every tag and most lengths of a small answer: no loop, no copy
        return _ONE_BYTE[value]
    if value < 0:
        raise ValueError(f"varint: expected a value >= 0, got {value}")
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def bytes_field(path: Path, chunks: Sequence[Buffer]) -> list[Buffer]:
    """The wire pieces of one bytes field at ``path`` holding the chunks' concatenation.

    Appended to a serialized message (``b"".join([head, *pieces])``), the result parses as
    that message with the field set (merged into the message fields along the path).
    The chunks are returned as they are (no copies): C-contiguous buffers, e.g. numpy arrays.
    """
    if not path:
        raise ValueError("bytes_field: the path is empty, expected at least one field number")
    views = [_bytes_view(chunk) for chunk in chunks]
    length = sum(view.nbytes for view in views)
    prefixes = []
    for number in reversed(path):
        prefix = varint(number << 3 | _LENGTH) + varint(length)
        prefixes.append(prefix)
        length += len(prefix)
    return [b"".join(reversed(prefixes)), *views]


def serialize(message: Any, fields: Sequence[tuple[Path, Sequence[Buffer]]]) -> bytes:
    """``message``'s wire bytes with each bytes field of ``fields`` (path, chunks) appended,
    in one copy of the chunks.

    ``message`` must not set those fields itself: they would be sent twice (a repeated field)
    or the appended value would replace the set one (a singular field).
    """
    pieces: list[Buffer] = [message.SerializeToString()]
    for path, chunks in fields:
        pieces += bytes_field(path, chunks)
    return b"".join(pieces)


def _bytes_view(chunk: Buffer) -> memoryview:
    view = memoryview(chunk)
    # memoryview refuses to cast a view with a zero in its shape, e.g. a (0, 784) array.
    return view.cast("B") if view.nbytes else memoryview(b"")


def detach(
    raw: Buffer, paths: Collection[Path], layout: Layout | None = None, max_fields: int = 1 << 62
) -> tuple[bytes, dict[Path, list[memoryview]]]:
    """``raw`` without the bytes fields at ``paths``, and those fields as views of ``raw``.

    Args:
        layout: the message type's ``layout_of``: sub-messages are walked and counted too
            (without it only the levels along ``paths`` are).
        max_fields: the most fields the walk visits, in all, before it refuses the message.

    Returns:
        (rest, fields): ``rest`` is a well-formed message of the same type holding everything
        else (parse it with protobuf); ``fields[path]`` lists the field's occurrences in wire
        order. For a singular field the last one counts (protobuf's rule); a path that does not
        occur is absent. The views keep ``raw`` alive.

    Raises:
        MalformedMessage: truncated data, a length past the end, a group/unknown wire type,
            or nesting deeper than ``MAX_DEPTH``.
        TooManyFields: more than ``max_fields`` fields.
    """
    view = memoryview(raw).cast("B")
    found: dict[Path, list[memoryview]] = {}
    rest = _detach(view, tuple(paths), (), found, layout or {}, _Budget(max_fields))
    return bytes(rest), found


def check(raw: Buffer, layout: Layout, max_fields: int) -> None:
    """Walk ``raw`` as ``detach`` does, taking nothing out: its structure and field count.

    Raises:
        MalformedMessage, TooManyFields: as ``detach``.
    """
    _walk(memoryview(raw).cast("B"), layout, _Budget(max_fields), 0)


def _detach(
    view: memoryview,
    paths: tuple[Path, ...],
    prefix: Path,
    found: dict[Path, list[memoryview]],
    layout: Layout,
    budget: _Budget,
) -> bytearray:
    depth = len(prefix)
    if depth > MAX_DEPTH:
        raise MalformedMessage(f"sub-messages nest more than {MAX_DEPTH} levels deep")
    # Field numbers to take out here, and those to descend into (with the deeper paths).
    leaves = {p[depth] for p in paths if len(p) == depth + 1}
    inner = {p[depth] for p in paths if len(p) > depth + 1}
    rest = bytearray()
    pos, end = 0, len(view)
    while pos < end:
        budget.spend()
        start = pos
        number, wire_type, body, pos = _read_field(view, pos, end)
        if wire_type == _LENGTH:
            if number in leaves:
                found.setdefault((*prefix, number), []).append(view[body:pos])
                continue
            if number in inner:
                deeper = tuple(p for p in paths if len(p) > depth + 1 and p[depth] == number)
                child = layout.get(number, {})
                content = _detach(view[body:pos], deeper, (*prefix, number), found, child, budget)
                rest += varint(number << 3 | _LENGTH)
                rest += varint(len(content))
                rest += content
                continue
            if number in layout:
                _walk(view[body:pos], layout[number], budget, depth + 1)
        rest += view[start:pos]
    return rest


def _walk(view: memoryview, layout: Layout, budget: _Budget, depth: int) -> None:
    if depth > MAX_DEPTH:
        raise MalformedMessage(f"sub-messages nest more than {MAX_DEPTH} levels deep")
    pos, end = 0, len(view)
    while pos < end:
        budget.spend()
        number, wire_type, body, pos = _read_field(view, pos, end)
        if wire_type == _LENGTH and number in layout:
            _walk(view[body:pos], layout[number], budget, depth + 1)


def _read_field(view: memoryview, pos: int, end: int) -> tuple[int, int, int, int]:
    """(field number, wire type, start of a length-delimited body, end of the field)."""
    key, pos = _read_varint(view, pos)
    number, wire_type = key >> 3, key & 7
    body = pos
    if wire_type == _VARINT:
        _, pos = _read_varint(view, pos)
    elif wire_type in _FIXED_SIZES:
        pos += _FIXED_SIZES[wire_type]
    elif wire_type == _LENGTH:
        length, body = _read_varint(view, pos)
        pos = body + length
        if pos > end:
            raise MalformedMessage(
                f"field {number} is {length} bytes long, past the end of the message"
            )
    else:
        raise MalformedMessage(f"field {number} has wire type {wire_type}, which is not read")
    if pos > end:
        raise MalformedMessage(f"field {number} runs past the end of the message")
    return number, wire_type, body, pos


def _read_varint(view: memoryview, pos: int) -> tuple[int, int]:
    result, shift = 0, 0
    while pos < len(view):
        byte = view[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7
        if shift >= 64:
            break
    raise MalformedMessage("a varint is truncated or longer than 10 bytes")
