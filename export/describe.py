"""The manifest of an exported version, described from the model, its checkpoint and graphs."""

from __future__ import annotations

import datetime
import importlib.metadata
import math
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import onnxscript
import torch

from vaeserve.manifest import GraphSpec, ModelManifest, TensorSpec, sha256_of_file

__all__ = ["build_manifest", "prior_means_of"]


def prior_means_of(model: torch.nn.Module) -> np.ndarray | None:
    if model.config.conditioning != "prior":
        return None
    return model.prior_means.detach().cpu().numpy().astype(np.float32)  # (num_classes, d)


def _graph_specs(config: Any, graphs: dict[str, Any]) -> dict[str, GraphSpec]:
    """What each exported graph takes and returns; checked against the contract when read."""
    sample = TensorSpec("float32", (-1, *config.data_shape))  # x, and every decoder output
    latent = TensorSpec("float32", (-1, config.latent_dim))
    label = TensorSpec("int64", (-1,))
    shapes = {"x": sample, "y": label, "z": latent, "mu": latent, "logvar": latent}
    return {
        graph: GraphSpec(
            file=path.name,
            sha256=sha256_of_file(path),
            inputs={n: shapes[n] for n in module.input_names},
            outputs={n: shapes.get(n, sample) for n in module.output_names},
        )
        for graph, (path, module) in graphs.items()
    }


def build_manifest(
    model: torch.nn.Module,
    ckpt: Any,
    checkpoint: Path,
    name: str,
    version: int,
    opset: int,
    graphs: dict[str, Any],
    parity: dict[str, Any],
    precision: str,
) -> ModelManifest:
    config, info = model.config, ckpt.data_info
    specs = _graph_specs(config, graphs)
    num_classes = config.num_classes
    class_names = [str(c) for c in info.get("class_names") or []]
    if num_classes and len(class_names) != num_classes:
        class_names = [str(i) for i in range(num_classes)]
    prior = prior_means_of(model)
    return ModelManifest(
        name=name,
        version=version,
        kind=config.kind,
        conditioning=config.conditioning,
        latent_dim=config.latent_dim,
        num_classes=num_classes,
        class_names=tuple(class_names) if num_classes else (),
        sample_shape=tuple(config.data_shape),
        sample_dtype="float32",
        value_range=tuple(float(v) for v in info.get("value_range", (0.0, 1.0))),
        likelihood=config.likelihood,
        gaussian_sigma=config.gaussian_sigma if config.likelihood == "gaussian" else None,
        prior_means=None if prior is None else tuple(tuple(map(float, r)) for r in prior),
        opset=opset,
        encoder=specs["encoder"],
        decoder=specs["decoder"],
        producers=_producers(),
        training_metrics=_plain(ckpt.metrics),
        parity=parity,
        created_at=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        source={
            "checkpoint": str(checkpoint.resolve()),
            "checkpoint_sha256": sha256_of_file(checkpoint),
            "epoch": ckpt.epoch,
            "dataset": info.get("spec"),
            "binarize": info.get("binarize"),
            "split_seed": info.get("split_seed"),
            "precision": precision,
        },
    )


def _producers() -> dict[str, str]:
    versions = {
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": ort.__version__,
        "onnxscript": onnxscript.__version__,
    }
    try:
        versions["vaeserve"] = importlib.metadata.version("vaeserve")
    except importlib.metadata.PackageNotFoundError:
        pass
    return versions


def _plain(value: Any) -> Any:
    """JSON-safe copy of checkpoint metrics: tensors and numpy scalars become numbers,
    non-finite numbers None (JSON has no NaN)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, torch.Tensor | np.ndarray | np.generic):
        value = value.tolist()
        return _plain(value) if isinstance(value, list) else _plain_number(value)
    if isinstance(value, bool | str) or value is None:
        return value
    if isinstance(value, int | float):
        return _plain_number(value)
    return str(value)


def _plain_number(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
