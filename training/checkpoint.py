"""One-file checkpoints: weights, ModelConfig, training config, data facts, metrics, resume state.

The file holds plain values and tensors only, so `torch.load(path, weights_only=True)` reads
it; `load_checkpoint` adds the checks. Everything downstream (export, eval) rebuilds the model
from the stored ModelConfig and never repeats a hyperparameter.
"""

from __future__ import annotations

import os
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vaeserve.atomic import write_atomically
from vaeserve.training.config import ModelConfig
from vaeserve.training.model import VAE, build_model

__all__ = [
    "CHECKPOINT_FORMAT_VERSION",
    "CHECKPOINT_NAME",
    "Checkpoint",
    "load_checkpoint",
    "load_model",
    "save_checkpoint",
]

CHECKPOINT_FORMAT_VERSION = 1
CHECKPOINT_NAME = "checkpoint.pt"  # its name inside a run directory
_REQUIRED_KEYS = (
    "format_version",
    "model_config",
    "train_config",
    "data_info",
    "metrics",
    "state_dict",
    "epoch",
)


@dataclass
class Checkpoint:
    """A loaded checkpoint.

    `state_dict` holds the weights of the best validation epoch (what export and eval use);
    `resume` holds the state after the last finished epoch (weights, optimizer, RNG, history)
    that `vae-train --resume` continues from, or None.
    """

    model_config: ModelConfig
    train_config: dict[str, Any]
    data_info: dict[str, Any]
    metrics: dict[str, Any]
    state_dict: dict[str, torch.Tensor]
    epoch: int  # epochs finished when it was written
    resume: dict[str, Any] | None = None
    format_version: int = CHECKPOINT_FORMAT_VERSION


def save_checkpoint(
    path: str | os.PathLike,
    *,
    model_config: ModelConfig,
    state_dict: dict[str, torch.Tensor],
    train_config: dict[str, Any],
    data_info: dict[str, Any],
    metrics: dict[str, Any] | None = None,
    epoch: int = 0,
    resume: dict[str, Any] | None = None,
) -> Path:
    """Writes a checkpoint atomically (temp file in the same folder, then os.replace).

    Tensors are moved to the CPU so a checkpoint written on a GPU loads anywhere.

    Returns:
        The path written.
    """
    path = Path(path)
    payload = {
        "format_version": CHECKPOINT_FORMAT_VERSION,
        "model_config": model_config.to_dict(),
        "train_config": train_config,
        "data_info": data_info,
        "metrics": metrics or {},
        "state_dict": _to_cpu(state_dict),
        "epoch": int(epoch),
        "resume": _to_cpu(resume),
    }
    return write_atomically(path, lambda f: torch.save(payload, f))


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Reads and checks a checkpoint with `torch.load(weights_only=True)`.

    Raises:
        FileNotFoundError: `path` does not exist.
        ValueError: the file is corrupt, of another format version, or lacks a key; the
            message names the path and the problem.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as exc:
        raise ValueError(f"{path}: not a readable checkpoint ({_reason(exc)})") from exc
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: not a checkpoint (holds a {type(raw).__name__}, not a dict)")
    version = raw.get("format_version")
    if version != CHECKPOINT_FORMAT_VERSION:
        raise ValueError(
            f"{path}: checkpoint format version {version!r}, this code reads "
            f"version {CHECKPOINT_FORMAT_VERSION}"
        )
    missing = [k for k in _REQUIRED_KEYS if k not in raw]
    if missing:
        raise ValueError(f"{path}: checkpoint lacks key(s) {', '.join(missing)}")
    try:
        model_config = ModelConfig.from_dict(raw["model_config"])
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{path}: bad model_config: {exc}") from exc
    state_dict = raw["state_dict"]
    stored_config = raw["model_config"]
    dropout = isinstance(stored_config, dict) and stored_config.get("dropout")
    if dropout and model_config.arch == "mlp":  # the removed --dropout's layer numbering
        state_dict = _without_dropout_layers(state_dict)
    return Checkpoint(
        model_config=model_config,
        train_config=raw["train_config"],
        data_info=raw["data_info"],
        metrics=raw["metrics"],
        state_dict=state_dict,
        epoch=raw["epoch"],
        resume=raw.get("resume"),
        format_version=version,
    )


def load_model(path: str | os.PathLike, device: str = "cpu") -> tuple[VAE, Checkpoint]:
    """Loads a checkpoint and rebuilds its model with the best weights, in eval mode.

    Raises:
        FileNotFoundError: `path` does not exist.
        ValueError: see `load_checkpoint`; also weights that do not fit the ModelConfig.
    """
    ckpt = load_checkpoint(path)
    _check_finite(path, ckpt.state_dict)
    model = build_model(ckpt.model_config)
    try:
        model.load_state_dict(ckpt.state_dict)
    except RuntimeError as exc:
        raise ValueError(f"{path}: weights do not match the model config ({exc})") from exc
    return model.to(device).eval(), ckpt


# An MLP trained with the removed --dropout held (Linear, ReLU, Dropout) per hidden layer:
# its Linear layers are at indices 0, 3, 6, … of encoder.net and decoder.net.0, where the
# MLP without dropout has them at 0, 2, 4, ….
_DROPOUT_MLP_KEY = re.compile(r"^(encoder\.net|decoder\.net\.0)\.(\d+)\.(.+)$")


def _without_dropout_layers(state_dict: dict[str, Any]) -> dict[str, Any]:
    """The weights of an MLP trained with dropout, named as the MLP without it."""
    renamed = {}
    for name, value in state_dict.items():
        match = _DROPOUT_MLP_KEY.match(name)
        if match and int(match[2]) % 3 == 0:
            name = f"{match[1]}.{int(match[2]) // 3 * 2}.{match[3]}"
        renamed[name] = value
    return renamed


def _check_finite(path: str | os.PathLike, state_dict: dict[str, Any]) -> None:
    # A NaN/Inf weight makes every output NaN; the exporter's gate compares NaN with NaN as
    # equal, so it would publish a model that answers NaN for any input.
    for name, value in state_dict.items():
        if torch.is_tensor(value) and value.is_floating_point() and not torch.isfinite(value).all():
            raise ValueError(f"{path}: weight '{name}' holds NaN or Inf values")


def _reason(exc: Exception) -> str:
    # torch's weights_only failure is a paragraph that advises weights_only=False (unsafe for
    # a file of unknown origin); keep only its one line of substance.
    text = str(exc)
    marker = "WeightsUnpickler error:"
    if marker in text:
        text = text.split(marker, 1)[1].split("Check the documentation", 1)[0]
    line = " ".join(text.split())[:200]
    return f"{type(exc).__name__}: {line}" if line else type(exc).__name__


def _to_cpu(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_to_cpu(v) for v in value)
    return value
