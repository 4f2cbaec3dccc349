"""The two ONNX graphs of a model: wrappers around ``encode``/``decode``, export, and checks.

Graph I/O is float32 (int64 labels) whatever the compute precision: an fp16 graph casts its
inputs to half precision and its outputs back, so the server and clients never see fp16.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import nn

from vaeserve.errors import VaeServeError

__all__ = [
    "DEFAULT_OPSET",
    "GRAPH_FILES",
    "MIN_OPSET",
    "RANDOM_OPS",
    "DecoderGraph",
    "EncoderGraph",
    "ExportError",
    "check_graph",
    "example_inputs",
    "export_graph",
    "graph_modules",
    "validate_opset",
]

DEFAULT_OPSET = 20
# The lowest opset torch's dynamo exporter implements; lower ones go through a converter.
MIN_OPSET = 18
GRAPH_FILES = {"encoder": "encoder.onnx", "decoder": "decoder.onnx"}
# Ops whose output changes from run to run: the server draws all noise itself
# (the sampling contract, docs/architecture.md).
RANDOM_OPS = frozenset(
    {
        "RandomNormal",
        "RandomNormalLike",
        "RandomUniform",
        "RandomUniformLike",
        "Multinomial",
        "Bernoulli",
        "Dropout",
    }
)
# torch.export specialises example sizes 0 and 1 to constants; 3 keeps the batch axis symbolic.
_EXAMPLE_BATCH = 3


class ExportError(VaeServeError, RuntimeError):
    """A graph failed a structural check (checker, shape inference, opset, random ops, files)."""


class EncoderGraph(nn.Module):
    """``encode`` as a graph: x (B, C, H, W) [, y (B,)] -> mu, logvar (B, latent_dim)."""

    def __init__(self, model: nn.Module, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.model = model
        self.dtype = dtype
        self.input_names = ["x", "y"] if model.encoder_takes_label else ["x"]
        self.output_names = ["mu", "logvar"]

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        mu, logvar = self.model.encode(x.to(self.dtype), y)  # (B, latent_dim) each
        return mu.float(), logvar.float()


class DecoderGraph(nn.Module):
    """``decode`` as a graph: z (B, latent_dim) [, y (B,)] -> the parameters of p(x|z)."""

    def __init__(self, model: nn.Module, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.model = model
        self.dtype = dtype
        self.input_names = ["z", "y"] if model.decoder_takes_label else ["z"]
        self.output_names = list(model.config.decoder_output_names)

    def forward(self, z: torch.Tensor, y: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        params = self.model.decode(z.to(self.dtype), y)  # each (B, C, H, W)
        return tuple(params[name].float() for name in self.output_names)


def graph_modules(model: nn.Module, fp16: bool) -> dict[str, nn.Module]:
    """The modules to export, by graph; an fp16 export wraps a half-precision copy."""
    if fp16:
        model, dtype = copy.deepcopy(model).half(), torch.float16
    else:
        dtype = torch.float32
    return {
        "encoder": EncoderGraph(model, dtype).eval(),
        "decoder": DecoderGraph(model, dtype).eval(),
    }


def validate_opset(opset: Any) -> int:
    """Return ``opset`` if the exporter and this onnx can write it.

    Raises:
        ValueError: naming the supported range.
    """
    newest = onnx.defs.onnx_opset_version()
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= newest:
        raise ValueError(f"opset: expected an integer from {MIN_OPSET} to {newest}, got {opset!r}")
    return opset


def export_graph(
    module: nn.Module, example: dict[str, torch.Tensor], path: Path, opset: int
) -> None:
    """Export ``module`` to one self-contained ONNX file with a dynamic batch axis, and check it.

    Args:
        module: an ``EncoderGraph`` or ``DecoderGraph`` in eval mode.
        example: one example tensor per input name (any batch size but 0 and 1).
        path: the .onnx file to write (weights inside it: no external-data side file).
        opset: the ONNX opset of the default domain.

    Raises:
        ExportError: the exported graph fails ``check_graph``.
    """
    batch = torch.export.Dim("batch")
    args = tuple(example[name] for name in module.input_names)
    with warnings.catch_warnings():
        # Known harmless, from torch 2.13's exporter internals: a deprecation inside
        # torch.export's pytree code, and a note that x and y share the one "batch" axis.
        warnings.filterwarnings(
            "ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=FutureWarning
        )
        warnings.filterwarnings(
            "ignore", message=r"# The axis name: batch will not be used", category=UserWarning
        )
        program = torch.onnx.export(
            module,
            args,
            input_names=module.input_names,
            output_names=module.output_names,
            dynamic_shapes=tuple({0: batch} for _ in args),
            opset_version=opset,
            dynamo=True,
            external_data=False,
            verbose=False,
        )
    proto = program.model_proto
    check_graph(proto, opset, path.name)
    onnx.save_model(proto, path)


def example_inputs(config: Any) -> dict[str, torch.Tensor]:
    """Example tensors for tracing, by input name."""
    gen = torch.Generator().manual_seed(0)
    example = {
        "x": torch.rand((_EXAMPLE_BATCH, *config.data_shape), generator=gen),
        "z": torch.randn((_EXAMPLE_BATCH, config.latent_dim), generator=gen),
    }
    if config.num_classes:
        example["y"] = torch.arange(_EXAMPLE_BATCH, dtype=torch.int64) % config.num_classes
    return example


def check_graph(proto: onnx.ModelProto, opset: int, name: str) -> None:
    """onnx.checker (with strict shape inference), the opset, no random ops, no external data.

    Raises:
        ExportError: naming the graph and what is wrong.
    """
    try:
        onnx.checker.check_model(proto, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise ExportError(f"{name}: onnx.checker rejects the graph: {exc}") from None
    versions = {imp.domain or "ai.onnx": imp.version for imp in proto.opset_import}
    if versions.get("ai.onnx") != opset:
        raise ExportError(f"{name}: opset is {versions.get('ai.onnx')}, expected {opset}")
    ops = _op_types(proto.graph) | {n.op_type for f in proto.functions for n in f.node}
    if ops & RANDOM_OPS:
        raise ExportError(f"{name}: random op(s) {sorted(ops & RANDOM_OPS)} in the graph")
    external = [
        t.name for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL
    ]
    if external:
        raise ExportError(f"{name}: weights {external[:3]} are stored outside the file")


def _op_types(graph: onnx.GraphProto) -> set[str]:
    ops = set()
    for node in graph.node:
        ops.add(node.op_type)
        for attr in node.attribute:
            for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
                ops |= _op_types(sub)
    return ops
