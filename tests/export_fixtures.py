"""Tiny checkpoints for the exporter's tests: random weights saved through training.checkpoint.

Imported by test_export_parity.py and test_export_cli.py (not a test module itself).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from vaeserve.training.checkpoint import save_checkpoint
from vaeserve.training.config import ModelConfig
from vaeserve.training.data import load_dataset
from vaeserve.training.model import build_model

_DIGITS_INFO: dict[str, Any] = {}


def digits_info() -> dict[str, Any]:
    """The checkpoint's data_info for the bundled digits data set (binarized like vae-train)."""
    if not _DIGITS_INFO:
        _DIGITS_INFO.update(load_dataset("digits", binarize="dynamic").info())
    return dict(_DIGITS_INFO)


def tiny_config(**overrides: Any) -> ModelConfig:
    """Latent 2, hidden 16, digits-shaped; a CVAE gets the data set's 10 classes."""
    fields: dict[str, Any] = {"data_shape": (1, 8, 8), "latent_dim": 2, "hidden_dims": (16,)}
    fields.update(overrides)
    if fields.get("kind") == "cvae":
        fields.setdefault("num_classes", 10)
    return ModelConfig(**fields)


def save_tiny_checkpoint(path: Path, config: ModelConfig, seed: int = 0) -> Path:
    """Random weights (torch's default initialisation; prior means ~ N(0, 4)) for ``config``."""
    torch.manual_seed(seed)
    model = build_model(config)
    if config.conditioning == "prior":
        with torch.no_grad():
            model.prior_means.normal_(0.0, 2.0)  # zeros would not show that the means travel
    return save_checkpoint(
        path,
        model_config=config,
        state_dict=model.state_dict(),
        train_config={"seed": seed},
        data_info=digits_info(),
        metrics={"test_elbo_nats": -31.5, "test_nll_iwae_nats": 30.25},
        epoch=1,
    )
