"""What a training run keeps to be resumed: its progress, the resume state in the checkpoint,
and the rule for which settings a resumed run may change."""

from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vaeserve.training.checkpoint import CHECKPOINT_NAME, Checkpoint, load_checkpoint
from vaeserve.training.config import TrainConfig
from vaeserve.training.model import VAE

__all__ = ["RESUMABLE", "Progress", "stored_run", "copy_state", "resume_state", "restore",
           "resume_config"]  # fmt: skip

RESUMABLE = ("epochs", "device", "num_threads", "eval_k", "save_interval_s")


@dataclass
class Progress:
    """What a resumed run needs besides weights and optimizer state."""

    epoch: int = 0  # epochs finished
    best_val_bound: float = -math.inf  # validation value of the training objective, β = 1
    best_epoch: int = 0
    best_state: dict[str, torch.Tensor] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)
    train_seconds: float = 0.0
    # --ema-decay: the exponential moving average of the weights, updated every step; it is
    # what is validated and kept. Empty when off.
    ema: dict[str, torch.Tensor] = field(default_factory=dict)


def stored_run(config: TrainConfig, ckpt_path: Path) -> Checkpoint:
    stored = load_checkpoint(ckpt_path)
    if stored.resume is None:
        raise ValueError(f"{ckpt_path}: holds no resume state")
    before = TrainConfig.from_dict(stored.train_config).to_dict()
    changed = [
        name
        for name, value in config.to_dict().items()
        if name not in RESUMABLE and before[name] != value
    ]
    if changed:
        raise ValueError(f"resume: settings differ from the stored run: {', '.join(changed)}")
    return stored


def copy_state(model: VAE) -> dict[str, torch.Tensor]:
    return clone_state(model.state_dict())


def clone_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A copy of a state dict that later training steps leave alone."""
    return {k: v.detach().clone() for k, v in state.items()}


def resume_state(
    state: Progress, model: VAE, optimizer: torch.optim.Optimizer, device: torch.device
) -> dict[str, Any]:
    rng = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(device)
    return {
        "model": copy_state(model),
        "optimizer": copy.deepcopy(optimizer.state_dict()),
        "rng": rng,
        "best_val_bound": state.best_val_bound,
        "best_epoch": state.best_epoch,
        "history": state.history,
        "train_seconds": state.train_seconds,
        "epoch": state.epoch,
        "ema": clone_state(state.ema),
    }


def restore(
    resume: dict[str, Any],
    model: VAE,
    optimizer: torch.optim.Optimizer,
    best_state: dict[str, torch.Tensor],
    device: torch.device,
) -> Progress:
    model.load_state_dict(resume["model"])
    optimizer.load_state_dict(resume["optimizer"])
    torch.set_rng_state(resume["rng"]["cpu"])
    if device.type == "cuda" and "cuda" in resume["rng"]:
        torch.cuda.set_rng_state(resume["rng"]["cuda"], device)
    return Progress(
        epoch=resume["epoch"],
        best_val_bound=resume["best_val_bound"],
        best_epoch=resume["best_epoch"],
        best_state={k: v.to(device) for k, v in best_state.items()},
        history=list(resume["history"]),
        train_seconds=resume["train_seconds"],
        ema={k: v.to(device) for k, v in resume.get("ema", {}).items()},
    )


def resume_config(out_dir: str | os.PathLike, **changes: Any) -> TrainConfig:
    """Returns the stored TrainConfig of the run in `out_dir` with `changes` applied.

    Raises:
        FileNotFoundError: no checkpoint in `out_dir`.
        ValueError: a change to a setting outside RESUMABLE, or a bad checkpoint.
    """
    fixed = sorted(set(changes) - set(RESUMABLE))
    if fixed:
        raise ValueError(
            "resume: continues the stored settings; cannot change "
            + ", ".join(fixed)
            + f" (only {', '.join(RESUMABLE)})"
        )
    stored = load_checkpoint(Path(out_dir) / CHECKPOINT_NAME)
    return TrainConfig.from_dict(stored.train_config).replace(**changes)
