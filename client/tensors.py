"""numpy arrays ↔ ``vaeserve.v1.Tensor`` (dtype + shape + raw little-endian C-order bytes)."""

from __future__ import annotations

import numpy as np

from vaeserve_proto.v1 import vaeserve_pb2 as pb

__all__ = [
    "ENCODINGS",
    "OUTPUTS",
    "DTYPE_NAMES",
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
    array = np.asarray(array)
    code = _WIRE.get(array.dtype.newbyteorder("="))
    if code is None:
        raise ValueError(
            f"tensor dtype {array.dtype} is not supported: expected float32, float16, int64 or "
            "uint8"
        )
    data = np.ascontiguousarray(array, dtype=_NUMPY[code]).tobytes()
    return pb.Tensor(dtype=code, shape=array.shape, data=data)


def from_tensor(tensor: pb.Tensor) -> np.ndarray:
    """The array a wire tensor holds; a read-only view of the message's bytes (no copy).

    Raises:
        ValueError: an unknown dtype, or data whose length disagrees with the shape.
    """
    dtype = _NUMPY.get(tensor.dtype)
    if dtype is None:
        raise ValueError(f"tensor dtype {tensor.dtype} is unknown")
    shape = tuple(tensor.shape)
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(tensor.data) != expected:
        raise ValueError(
            f"tensor of shape {list(shape)} and dtype {dtype.name} holds {len(tensor.data)} "
            f"bytes, expected {expected}"
        )
    return np.frombuffer(tensor.data, dtype=dtype).reshape(shape)
