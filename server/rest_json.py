"""JSON of the REST transport: bounded parsing, parameters, and protobuf answers as JSON.

Pure. ``load_json`` parses with the standard library after a vectorized scan has bounded the
text's nesting depth and its count of arrays and objects (the Python objects that cost the
most per byte of text): a nesting bomb or a body of ``[],[],...`` is refused before
``json.loads`` sees it. ``message_json`` writes protobuf answers (model configuration,
statistics, repository index) the way Triton's REST front does.
"""

from __future__ import annotations

import base64
import binascii
import json
import reprlib
from dataclasses import dataclass
from typing import Any

import numpy as np
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from vaeserve.errors import InvalidRequest
from vaeserve.proto.inference import grpc_service_pb2 as pb

__all__ = [
    "JsonBounds",
    "compact_json",
    "load_json",
    "json_object",
    "json_list",
    "json_string",
    "is_int",
    "short",
    "INT64_RANGE",
    "infer_parameters",
    "repository_parameters",
    "model_metadata_json",
    "message_json",
]

INT64_RANGE = (-(2**63), 2**63 - 1)
_UINT64_MAX = 2**64 - 1
_SCAN_CHUNK = 1 << 20  # bytes of JSON text scanned at once: the scan's masks stay small
_OPEN = np.zeros(256, np.int8)
_OPEN[[ord("["), ord("{")]] = 1
_CLOSE = np.zeros(256, np.int8)
_CLOSE[[ord("]"), ord("}")]] = 1
_TRIM = 60  # characters of a client's value quoted back in an error


@dataclass(frozen=True)
class JsonBounds:
    """What one JSON text may hold: nesting depth, and arrays plus objects in all."""

    max_depth: int = 32
    max_containers: int = 1 << 18


def compact_json(value: Any) -> str:
    """JSON text without spaces (answers are read by programs)."""
    return json.dumps(value, separators=(",", ":"))


def short(value: Any) -> str:
    # reprlib stops early: a client's huge value is never rendered whole.
    text = reprlib.repr(value)
    return text if len(text) <= _TRIM else text[: _TRIM - 3] + "..."


def _check_structure(text: bytes | bytearray | memoryview, bounds: JsonBounds) -> None:
    """Refuse JSON nested deeper than ``bounds.max_depth`` or with more arrays and objects
    than ``bounds.max_containers``, reading the text in vectorized chunks.

    Brackets inside strings count too: the scan can only over-estimate a real request (such
    strings are names and parameters, a few characters), and ``json.loads``'s own recursion
    guard still stands behind it.
    """
    data = np.frombuffer(text, np.uint8)
    opened = closed = depth = 0
    for start in range(0, len(data), _SCAN_CHUNK):
        chunk = data[start : start + _SCAN_CHUNK]
        opens, closes = _OPEN[chunk], _CLOSE[chunk]
        steps = opens[(opens | closes).astype(bool)] * 2 - 1  # +1 per opening, -1 per closing
        if steps.size:
            levels = depth + np.cumsum(steps, dtype=np.int64)
            if int(levels.max()) > bounds.max_depth:
                raise InvalidRequest(
                    f"the JSON is nested more than {bounds.max_depth} levels deep, over the "
                    "server's limit"
                )
            depth = int(levels[-1])
        opened += int(np.count_nonzero(opens))
        closed += int(np.count_nonzero(closes))
        if max(opened, closed) > bounds.max_containers:
            raise InvalidRequest(
                f"the JSON holds more than {bounds.max_containers} arrays and objects, over the "
                "server's limit: send tensor data flat (row-major) or as binary data"
            )


def load_json(text: bytes | bytearray | memoryview, what: str, bounds: JsonBounds) -> Any:
    """Parse ``text`` (``what`` names it in errors) within ``bounds``.

    Raises:
        InvalidRequest: text that is not JSON (UTF-8), or over ``bounds``.
    """
    _check_structure(text, bounds)
    try:
        return json.loads(text if isinstance(text, bytes | bytearray) else bytes(text))
    except RecursionError:
        raise InvalidRequest(f"{what} is nested too deeply") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidRequest(f"{what} is not valid JSON ({exc})") from None


def json_object(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InvalidRequest(f"{what} is {short(value)}, expected a JSON object")
    return value


def json_list(value: Any, what: str) -> list[Any]:
    if not isinstance(value, list):
        raise InvalidRequest(f"{what} is {short(value)}, expected a JSON array")
    return value


def json_string(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise InvalidRequest(f"{what} is {short(value)}, expected a string")
    return value


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def infer_parameters(values: Any, what: str, target: Any, skip: tuple[str, ...] = ()) -> None:
    """Copy a JSON ``parameters`` object into a protobuf map of ``InferParameter``.

    Integers become int64_param (uint64_param past int64), as Triton's REST front does.

    Raises:
        InvalidRequest: not an object, or a value that is not a bool, number or string.
    """
    for key, value in json_object(values, what).items():
        if key in skip:
            continue
        parameter = target[key]
        if isinstance(value, bool):
            parameter.bool_param = value
        elif is_int(value) and INT64_RANGE[0] <= value <= INT64_RANGE[1]:
            parameter.int64_param = value
        elif is_int(value) and 0 <= value <= _UINT64_MAX:
            parameter.uint64_param = value
        elif isinstance(value, float):
            parameter.double_param = value
        elif isinstance(value, str):
            parameter.string_param = value
        else:
            raise InvalidRequest(
                f"{what}.{key} is {short(value)}, expected a bool, a 64-bit integer, a number "
                "or a string"
            )


def repository_parameters(values: Any, target: Any) -> None:
    """Copy a load or unload body's ``parameters`` into ``ModelRepositoryParameter``s.

    Triton's clients send a model's files as ``"file:<path>": <base64 text>``; those become
    bytes_param, decoded.

    Raises:
        InvalidRequest: not an object, a value of another type, or a file that is not base64.
    """
    for key, value in json_object(values, "parameters").items():
        parameter = target[key]
        if isinstance(value, bool):
            parameter.bool_param = value
        elif is_int(value) and INT64_RANGE[0] <= value <= INT64_RANGE[1]:
            parameter.int64_param = value
        elif isinstance(value, str) and key.startswith("file:"):
            try:
                parameter.bytes_param = base64.b64decode(value, validate=True)
            except binascii.Error:
                raise InvalidRequest(f"parameters.{key} is not base64 text") from None
        elif isinstance(value, str):
            parameter.string_param = value
        else:
            raise InvalidRequest(
                f"parameters.{key} is {short(value)}, expected a bool, a 64-bit integer or a string"
            )


def model_metadata_json(metadata: pb.ModelMetadataResponse) -> dict[str, Any]:
    """ModelMetadata as KServe's REST answer (shapes as JSON integers)."""

    def tensors(items: Any) -> list[dict[str, Any]]:
        return [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in items]

    return {
        "name": metadata.name,
        "versions": list(metadata.versions),
        "platform": metadata.platform,
        "inputs": tensors(metadata.inputs),
        "outputs": tensors(metadata.outputs),
    }


def message_json(message: Message) -> dict[str, Any]:
    """A protobuf message as Triton's REST front writes it: field names as in the .proto,
    64-bit integers as JSON numbers (not proto3 JSON's strings), enums by name, scalars and
    lists even when empty; sub-messages and oneof members only when set."""
    out: dict[str, Any] = {}
    for f in message.DESCRIPTOR.fields:
        value = getattr(message, f.name)
        if f.containing_oneof is not None and not message.HasField(f.name):
            continue
        if f.message_type is not None and f.message_type.GetOptions().map_entry:
            inner = f.message_type.fields_by_name["value"]
            out[f.name] = {k: _field_value(inner, v) for k, v in value.items()}
        elif f.is_repeated:
            out[f.name] = [_field_value(f, v) for v in value]
        elif f.message_type is None or message.HasField(f.name):
            out[f.name] = _field_value(f, value)
    return out


def _field_value(f: FieldDescriptor, value: Any) -> Any:
    if f.message_type is not None:
        return message_json(value)
    if f.enum_type is not None:
        number = f.enum_type.values_by_number.get(value)
        return value if number is None else number.name
    if f.type == FieldDescriptor.TYPE_BYTES:
        return base64.b64encode(value).decode("ascii")
    return value
