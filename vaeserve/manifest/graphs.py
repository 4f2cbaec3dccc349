"""How a manifest declares one ONNX graph: its file, checksum and tensors, and their JSON form.

The model-level rules (which tensors a VAE or CVAE graph must have) are the schema's
(``schema.py``); this module reads and writes one graph's declaration.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from vaeserve.errors import ManifestError
from vaeserve.manifest.fields import FieldReader, file_reference, is_dims

__all__ = ["DTYPES", "ORT_TYPES", "TensorSpec", "GraphSpec", "read_graph"]

# Tensor dtypes a manifest may declare, by numpy name, keyed by how onnxruntime reports them
# ("tensor(<onnx name>)").
ORT_TYPES = MappingProxyType(
    {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int64)": "int64"}
)
DTYPES = tuple(sorted(ORT_TYPES.values()))


@dataclass(frozen=True)
class TensorSpec:
    """dtype (numpy name) and shape, -1 for the dynamic batch axis."""

    dtype: str
    shape: tuple[int, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"dtype": self.dtype, "shape": list(self.shape)}


@dataclass(frozen=True)
class GraphSpec:
    """One ONNX graph of a version: its file, checksum and declared inputs/outputs."""

    file: str
    sha256: str
    inputs: dict[str, TensorSpec]
    outputs: dict[str, TensorSpec]

    def to_dict(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "sha256": self.sha256,
            "inputs": {k: v.to_dict() for k, v in self.inputs.items()},
            "outputs": {k: v.to_dict() for k, v in self.outputs.items()},
        }


def read_graph(r: FieldReader, key: str) -> GraphSpec:
    """The graph declared in field ``key`` of the manifest ``r`` reads.

    Raises:
        ManifestError: naming the field (and the tensor) that is malformed.
    """
    value = r.get(key, optional=False)
    where = f"{r.source}: field '{key}'"
    if not isinstance(value, Mapping):
        raise ManifestError(f"{where} is not a JSON object")
    file, sha = file_reference(value, where)
    return GraphSpec(
        file=file,
        sha256=sha,
        inputs=_tensor_specs(value.get("inputs"), f"{where}.inputs"),
        outputs=_tensor_specs(value.get("outputs"), f"{where}.outputs"),
    )


def _tensor_specs(value: Any, where: str) -> dict[str, TensorSpec]:
    if not isinstance(value, Mapping) or not value:
        raise ManifestError(f"{where} is {value!r}, expected a non-empty object of tensors")
    specs = {}
    for name, spec in value.items():
        if not isinstance(spec, Mapping):
            raise ManifestError(f"{where}.{name} is not an object with dtype and shape")
        dtype, shape = spec.get("dtype"), spec.get("shape")
        if dtype not in DTYPES:
            raise ManifestError(
                f"{where}.{name}.dtype is {dtype!r}, expected one of {list(DTYPES)}"
            )
        if not is_dims(shape, allow_batch=True) or not shape or shape[0] != -1:
            raise ManifestError(
                f"{where}.{name}.shape is {shape!r}, expected [-1, positive dims...] "
                "(-1 is the batch axis)"
            )
        specs[str(name)] = TensorSpec(dtype=dtype, shape=tuple(shape))
    return specs
