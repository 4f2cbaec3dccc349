"""REST infer bodies of the Open Inference Protocol (KServe v2) <-> its protobuf request and
the answer's arrays.

Pure: no I/O, no server state. An infer body is JSON, or (Triton's binary tensor data
extension) a JSON header of ``Inference-Header-Content-Length`` bytes followed by the inputs'
bytes in the order of the inputs that carry ``parameters.binary_data_size``. ``infer_request``
turns it into the ``ModelInferRequest`` the gRPC transport would have received: every input as
raw contents (binary inputs as views of the body, JSON ``data`` converted once to the declared
datatype), so ``InferenceProtocol`` checks and words its errors exactly as over gRPC.
``infer_response`` writes the answer back: ``data`` as a flat row-major list, or the outputs'
bytes after the JSON header where the request asked for binary data.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from vaeserve.errors import InvalidRequest
from vaeserve.proto.inference import grpc_service_pb2 as pb
from vaeserve.server.handlers import DetachedRequest
from vaeserve.server.inference_protocol import Inference
from vaeserve.server.oip_convert import DATATYPES, parameter_value
from vaeserve.server.rest_json import (
    INT64_RANGE,
    JsonBounds,
    compact_json,
    infer_parameters,
    is_int,
    json_list,
    json_object,
    json_string,
    load_json,
    short,
)

__all__ = ["NUMPY_DATATYPES", "RestInfer", "infer_request", "infer_response"]

# The protocol's numeric datatypes as numpy dtypes, explicitly little-endian (the binary
# extension's byte order, and raw_input_contents').
NUMPY_DATATYPES = {
    "BOOL": np.dtype("?"),
    "UINT8": np.dtype("<u1"), "UINT16": np.dtype("<u2"), "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"), "INT8": np.dtype("<i1"), "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"), "INT64": np.dtype("<i8"), "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"), "FP64": np.dtype("<f8"),
}  # fmt: skip


@dataclass
class RestInfer:
    """An infer body as the protocol's request, plus what only the REST transport reads."""

    request: DetachedRequest  # a pb.ModelInferRequest with raw_input_contents detached
    binary_outputs: bool = False  # the request-level binary_data_output
    binary_by_output: dict[str, bool] = field(default_factory=dict)  # output-level binary_data
    timeout_us: int | None = None  # Triton's request parameter "timeout", in microseconds


def _shape(value: Any, what: str) -> list[int]:
    shape = json_list(value, what)
    if not all(is_int(d) and INT64_RANGE[0] <= d <= INT64_RANGE[1] for d in shape):
        raise InvalidRequest(f"{what} is {short(shape)}, expected a list of 64-bit integers")
    return shape


def _array(name: str, datatype: str, shape: list[int], data: Any) -> np.ndarray:
    """JSON ``data`` (flat, or nested as ``shape``) as a contiguous array of ``datatype``."""
    dtype = NUMPY_DATATYPES.get(datatype)
    if dtype is None:  # BYTES or unknown: no input takes it; the protocol names the datatype
        return np.empty(0, np.uint8)
    json_list(data, f"input '{name}' data")
    try:
        values = np.asarray(data)
    except (ValueError, TypeError, OverflowError):
        values = None
    kinds = "b" if datatype == "BOOL" else "iu" if dtype.kind in "iu" else "iuf"
    if values is None or (values.size and values.dtype.kind not in kinds):
        expected = {"b": "true or false", "iu": "integers", "iuf": "numbers"}[kinds]
        raise InvalidRequest(
            f"input '{name}' data is not a flat or evenly nested list of {expected} ({datatype})"
        )
    if values.ndim > 1 and list(values.shape) != shape:
        raise InvalidRequest(
            f"input '{name}' data is nested as {list(values.shape)}, expected {shape} or flat"
        )
    if min(shape, default=0) >= 0 and values.size != math.prod(shape):
        raise InvalidRequest(
            f"input '{name}' has {values.size} values in data, expected {math.prod(shape)} for "
            f"shape {shape}"
        )
    if values.size and dtype.kind in "iu" and values.dtype != dtype:
        info = np.iinfo(dtype)
        if values.min() < info.min or values.max() > info.max:
            raise InvalidRequest(
                f"input '{name}' data holds values outside {datatype}'s {info.min}..{info.max}"
            )
    return np.ascontiguousarray(values.reshape(-1), dtype=dtype)


def infer_request(
    body: bytes | bytearray,
    header_length: int | None,
    model_name: str,
    model_version: str,
    bounds: JsonBounds,
) -> RestInfer:
    """Turn an infer body into the protocol's request.

    Args:
        body: the whole body; binary inputs stay in it (the request holds views of it).
        header_length: ``Inference-Header-Content-Length``; None: the whole body is JSON.

    Raises:
        InvalidRequest: naming the field and what was expected.
    """
    if header_length is not None and not 0 <= header_length <= len(body):
        raise InvalidRequest(
            f"Inference-Header-Content-Length is {header_length}, expected 0 to the body's "
            f"{len(body)} bytes"
        )
    view = memoryview(body)
    end = len(body) if header_length is None else header_length
    document = json_object(load_json(view[:end] if end < len(body) else body, "the request body",
                                 bounds), "the request body")  # fmt: skip
    request = pb.ModelInferRequest(model_name=model_name, model_version=model_version)
    if "id" in document:
        request.id = json_string(document["id"], "id")
    parameters = document.get("parameters", {})
    infer_parameters(parameters, "parameters", request.parameters, skip=("binary_data_output",))
    answer = RestInfer(DetachedRequest(request, {}))
    binary = parameters.get("binary_data_output", False)
    if not isinstance(binary, bool):
        raise InvalidRequest(
            f"parameters.binary_data_output is {short(binary)}, expected true or false"
        )
    answer.binary_outputs = binary
    timeout = parameters.get("timeout")
    if timeout is not None:
        if not is_int(timeout) or timeout < 0:
            raise InvalidRequest(
                f"parameters.timeout is {short(timeout)}, expected microseconds >= 0"
            )
        answer.timeout_us = timeout
    raw: list[memoryview] = []
    offset = end
    for i, tensor in enumerate(json_list(document.get("inputs", []), "inputs")):
        tensor = json_object(tensor, f"inputs[{i}]")
        name = json_string(tensor.get("name"), f"inputs[{i}].name")
        datatype = json_string(tensor.get("datatype"), f"input '{name}' datatype")
        shape = _shape(tensor.get("shape"), f"input '{name}' shape")
        entry = request.inputs.add(name=name, datatype=datatype, shape=shape)
        tensor_parameters = tensor.get("parameters", {})
        what = f"input '{name}' parameters"
        infer_parameters(tensor_parameters, what, entry.parameters, skip=("binary_data_size",))
        size = tensor_parameters.get("binary_data_size")
        if size is None:
            if "data" not in tensor:
                raise InvalidRequest(
                    f"input '{name}' has neither data nor parameters.binary_data_size"
                )
            raw.append(memoryview(_array(name, datatype, shape, tensor["data"])).cast("B"))
            continue
        if "data" in tensor:
            raise InvalidRequest(
                f"input '{name}' has both data and parameters.binary_data_size: send one"
            )
        if not is_int(size) or size < 0:
            raise InvalidRequest(
                f"input '{name}' parameters.binary_data_size is {short(size)}, expected bytes >= 0"
            )
        if offset + size > len(body):
            left = len(body) - offset
            raise InvalidRequest(
                f"input '{name}' has binary_data_size {size}, but only {left} bytes of binary "
                "data are left in the body"
            )
        raw.append(view[offset : offset + size])
        offset += size
    if offset != len(body):
        raise InvalidRequest(
            f"the body has {len(body) - offset} bytes of binary data after the inputs' "
            "binary_data_size, expected none"
        )
    for i, tensor in enumerate(json_list(document.get("outputs", []), "outputs")):
        tensor = json_object(tensor, f"outputs[{i}]")
        name = json_string(tensor.get("name"), f"outputs[{i}].name")
        entry = request.outputs.add(name=name)
        output_parameters = tensor.get("parameters", {})
        what = f"output '{name}' parameters"
        infer_parameters(output_parameters, what, entry.parameters, skip=("binary_data",))
        if "binary_data" in output_parameters:
            flag = output_parameters["binary_data"]
            if not isinstance(flag, bool):
                raise InvalidRequest(
                    f"output '{name}' parameters.binary_data is {short(flag)}, expected true "
                    "or false"
                )
            answer.binary_by_output[name] = flag
    answer.request.detached["raw_input_contents"] = raw
    return answer


def infer_response(
    inference: Inference, binary: bool, binary_by_output: Mapping[str, bool]
) -> tuple[bytes, list[memoryview]]:
    """The answer as a JSON header and the binary outputs' bytes to send after it, in order.

    Args:
        binary: the request-level binary_data_output; ``binary_by_output`` overrides it.

    Returns:
        (JSON header, buffers): with no buffers, the header is the whole body.
    """
    response = inference.response
    outputs: list[str] = []
    buffers: list[memoryview] = []
    for name, array in inference.arrays.items():
        spec = inference.specs[name]
        datatype = DATATYPES[spec.dtype]
        values = np.ascontiguousarray(array, dtype=NUMPY_DATATYPES[datatype])
        entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(values.shape)}
        if binary_by_output.get(name, binary):
            data = memoryview(values).cast("B")
            entry["parameters"] = {"binary_data_size": data.nbytes}
            buffers.append(data)
            outputs.append(compact_json(entry))
        else:
            outputs.append(f'{compact_json(entry)[:-1]},"data":{_data_json(values)}}}')
    header: dict[str, Any] = {
        "model_name": response.model_name,
        "model_version": response.model_version,
    }
    if response.id:
        header["id"] = response.id
    if response.parameters:
        header["parameters"] = {k: parameter_value(v) for k, v in response.parameters.items()}
    text = f'{compact_json(header)[:-1]},"outputs":[{",".join(outputs)}]}}'
    return text.encode(), buffers


def _data_json(values: np.ndarray) -> str:
    """``values`` as a flat JSON array.

    float32 is written with 9 significant digits, which bring every float32 back exactly
    (parsed as float64 and cast, or as float32); at a third of the time of repr's up to 17
    digits, and shorter. Other types go through ``json``, and so do arrays holding NaN or Inf
    (which JSON cannot spell) or -0.0 (which "%g" writes "-0", an integer that parsers read
    as 0).
    """
    flat = values.reshape(-1)
    exact = flat.dtype == np.float32 and np.isfinite(flat).all()
    if exact and not np.signbit(flat[flat == 0]).any():
        return "[" + ",".join(["%.9g"] * flat.size) % tuple(flat.tolist()) + "]"
    return compact_json(flat.tolist())
