"""The training loop: data → model → best-validation checkpoint, metrics.json and PNG grids.

The command line, `vae-train`, is training/cli.py.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from vaeserve.atomic import write_atomically
from vaeserve.training import distributed
from vaeserve.training.checkpoint import (
    CHECKPOINT_NAME,
    Checkpoint,
    save_checkpoint,
)
from vaeserve.training.config import TrainConfig
from vaeserve.training.data import DatasetSplits, load_dataset
from vaeserve.training.distributed import Ranks, StepLoss, local_positions, seeded_generator
from vaeserve.training.evaluate import evaluate_model, finite_metrics, resolve_device, write_grids
from vaeserve.training.image_rows import Split, iter_batches
from vaeserve.training.losses import elbo_terms, iwae_bound
from vaeserve.training.model import VAE, build_model
from vaeserve.training.run_state import (
    RESUMABLE,
    Progress,
    copy_state,
    restore,
    resume_config,
    resume_state,
    stored_run,
)

__all__ = ["RESUMABLE", "resume_config", "train"]

logger = logging.getLogger(__name__)

METRICS_NAME = "metrics.json"
_VAL_SEED = 12345  # the same ε every epoch, so validation ELBOs differ by the model alone
_VAL_BATCH = 1024
# Purposes of the generators derived from the run's seed (distributed.seeded_generator): each
# epoch's order and binarization, each step's noise. Every rank derives the same ones.
_ORDER, _BINARIZE, _NOISE, _PSEUDO = 1, 2, 3, 4
# A VampPrior's pseudo-inputs start as training images pulled this far towards grey (logits
# of ±2.2): saturated logits would barely move.
_PSEUDO_MARGIN = 0.1
# Settings that a resumed run may change; every other one is the stored run's.


def train(
    config: TrainConfig, out_dir: str | os.PathLike, *, resume: bool = False, progress: bool = True
) -> dict[str, Any]:
    """Trains a model, keeps the best validation checkpoint and writes the run directory.

    Args:
        config: the run's settings; with `resume`, they may differ from the stored ones only
            in the fields named in RESUMABLE (see `resume_config`).
        out_dir: run directory: checkpoint.pt, metrics.json, samples.png, reconstructions.png.
        resume: continue the run stored in `out_dir` up to `config.epochs` epochs.
        progress: show a progress bar.

    Returns:
        The metrics written to metrics.json.

    Raises:
        FileNotFoundError: missing data, or no checkpoint to resume.
        ValueError: bad settings or data; `out_dir` already holds a run and resume is False.
        RuntimeError: the loss became NaN or infinite.
    """
    out_dir = Path(out_dir)
    ckpt_path = out_dir / CHECKPOINT_NAME
    stored = stored_run(config, ckpt_path) if resume else None
    try:  # before any work: an unusable --out must not surface after a whole training run
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"--out: {out_dir} is not a usable folder ({exc.strerror})") from exc
    if stored is None and ckpt_path.exists():
        raise ValueError(
            f"--out: {out_dir} already holds {CHECKPOINT_NAME}; pass --resume to continue it "
            "or choose another --out"
        )
    if config.num_threads is not None:
        torch.set_num_threads(config.num_threads)
    ranks, device = distributed.start(resolve_device(config.device))
    try:
        return _train(config, out_dir, stored, ranks, device, progress)
    finally:
        ranks.stop()


def _train(
    config: TrainConfig,
    out_dir: Path,
    stored: Checkpoint | None,
    ranks: Ranks,
    device: torch.device,
    progress: bool,
) -> dict[str, Any]:
    ckpt_path = out_dir / CHECKPOINT_NAME
    # Memory-mapped where the file allows: each step reads and moves only its own rows.
    splits = load_dataset(
        config.dataset, binarize=config.binarize, mmap=True, val_fraction=config.val_fraction
    )
    if config.model == "cvae" and splits.num_classes is None:
        raise ValueError(f"model: a CVAE needs labels; dataset {config.dataset} has none")
    model_config = config.model_config(splits.shape, splits.num_classes)
    torch.manual_seed(config.seed)
    model = build_model(model_config).to(device)
    if config.prior == "vamp" and config.pseudo_init == "data":
        _pseudo_inputs_from_data(model, splits, config.seed)
    optimizer = _optimizer(model, config)
    state = Progress(best_state=copy_state(model))
    if config.ema_decay > 0:
        state.ema = copy_state(model)
    if stored is not None:
        state = restore(stored.resume, model, optimizer, stored.state_dict, device)
    if ranks.main:
        logger.info(
            "device %s, %s, data %s, %d process(es)",
            device, model_config, splits.info()["sizes"], ranks.world_size,
        )  # fmt: skip

    def save(metrics: dict[str, Any] | None = None, resume: dict[str, Any] | None = None) -> None:
        save_checkpoint(
            ckpt_path,
            model_config=model_config,
            state_dict=state.best_state,
            train_config=config.to_dict(),
            data_info=splits.info(),
            metrics=metrics or {},
            epoch=state.epoch,
            resume=resume or resume_state(state, model, optimizer, device),
        )

    _fit(model, optimizer, splits, config, state, device, save, progress, ranks)
    if not ranks.main:  # rank 0 evaluates and writes the run; the others are done
        ranks.barrier()
        return {}
    last = resume_state(state, model, optimizer, device)  # before the best weights replace it
    model.load_state_dict(state.best_state)
    metrics = _final_metrics(model, splits, config, state, device)
    save(metrics, last)
    _write_json(out_dir / METRICS_NAME, metrics)
    write_grids(model, splits, out_dir, seed=config.seed, device=device)
    logger.info("metrics: %s", json.dumps(metrics))
    ranks.barrier()
    return metrics


@torch.no_grad()
def _pseudo_inputs_from_data(model: VAE, splits: DatasetSplits, seed: int) -> None:
    """Starts the pseudo-inputs at random training images (drawn by the run's seed)."""
    count = model.config.prior_components
    generator = seeded_generator("cpu", seed, _PSEUDO, 0)
    picks = torch.randint(len(splits.train), (count,), generator=generator).numpy()
    x = torch.from_numpy(np.asarray(splits.train.x[np.sort(picks)], dtype=np.float32))
    x = x.clamp(_PSEUDO_MARGIN, 1 - _PSEUDO_MARGIN).to(model.pseudo_logits.device)
    model.pseudo_logits.copy_(torch.logit(x))


def _optimizer(model: VAE, config: TrainConfig) -> torch.optim.Optimizer:
    """Adam, or AdamW (decoupled weight decay) when config.weight_decay > 0."""
    if config.weight_decay > 0:
        return torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.Adam(model.parameters(), lr=config.lr)


def _learning_rate(config: TrainConfig, step: int, total_steps: int) -> float:
    """The lr of global step `step` (from 0): a function of the step alone, so a resumed or
    distributed run sets the same one."""
    if config.lr_schedule == "constant":
        return config.lr
    return config.lr * 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / total_steps))


def _final_metrics(
    model: VAE, splits: DatasetSplits, config: TrainConfig, state: Progress, device: torch.device
) -> dict[str, Any]:
    metrics = evaluate_model(model, splits, k=config.eval_k, seed=config.seed, device=device)
    metrics.update(
        epochs=state.epoch,
        best_epoch=state.best_epoch,
        best_val_bound_nats=state.best_val_bound,
        train_seconds=round(state.train_seconds, 3),
        parameters=sum(p.numel() for p in model.parameters()),
        device=str(device),
        torch_threads=torch.get_num_threads(),
    )
    return finite_metrics(metrics)


def _fit(
    model: VAE,
    optimizer: torch.optim.Optimizer,
    splits: DatasetSplits,
    config: TrainConfig,
    state: Progress,
    device: torch.device,
    save: Callable[[], None],
    progress: bool,
    ranks: Ranks,
) -> None:
    steps_per_epoch = math.ceil(len(splits.train) / config.batch_size)
    bound_name = "val_elbo" if config.train_k == 1 else f"val_iwae{config.train_k}"
    step_loss: nn.Module = StepLoss(model)
    if ranks.distributed:  # averages the gradients of the ranks' parts of each global batch
        step_loss = DistributedDataParallel(
            step_loss, device_ids=[device] if device.type == "cuda" else None
        )
    last_save = time.monotonic()
    bar = tqdm(
        range(state.epoch, config.epochs),
        initial=state.epoch,
        total=config.epochs,
        desc="train",
        unit="epoch",
        disable=not progress or not ranks.main,
    )
    for epoch in bar:
        start_time = time.perf_counter()
        loss = _train_epoch(
            step_loss,
            model,
            optimizer,
            splits,
            config,
            epoch,
            steps_per_epoch,
            ranks,
            device,
            state.ema,
        )
        # With --ema-decay the averaged weights are the ones validated and kept.
        weights = state.ema or None
        training_weights = copy_state(model) if weights else None
        if weights:
            model.load_state_dict(weights)
        # Every rank computes the same bound from the same weights: no message needed. With
        # no val split (--val-fraction 0) there is nothing to choose by: the last epoch is kept.
        has_val = len(splits.val) > 0
        val_bound = _val_bound(model, splits.val, config.train_k, device) if has_val else math.nan
        state.train_seconds += time.perf_counter() - start_time
        state.epoch = epoch + 1
        state.history.append({"epoch": epoch + 1, "loss": loss, "val_bound_nats": val_bound})
        if not has_val or val_bound > state.best_val_bound:
            state.best_val_bound, state.best_epoch = val_bound, epoch + 1
            state.best_state = copy_state(model)
        if training_weights is not None:
            model.load_state_dict(training_weights)
        bar.set_postfix({"loss": f"{loss:.2f}", bound_name: f"{val_bound:.2f}"})
        if ranks.main and (
            time.monotonic() - last_save >= config.save_interval_s or state.epoch == config.epochs
        ):
            save()
            last_save = time.monotonic()
    bar.close()


def _train_epoch(
    step_loss: nn.Module,
    model: VAE,
    optimizer: torch.optim.Optimizer,
    splits: DatasetSplits,
    config: TrainConfig,
    epoch: int,
    steps_per_epoch: int,
    ranks: Ranks,
    device: torch.device,
    ema: dict[str, torch.Tensor],
) -> float:
    """One epoch over global batches of ``config.batch_size``; returns the mean loss per
    image over all ranks. ``ema`` (the weights' moving average, or empty) is updated after
    every step."""
    model.train()
    split = splits.train
    order = torch.randperm(
        len(split), generator=seeded_generator("cpu", config.seed, _ORDER, epoch)
    )
    warmup_steps = config.kl_warmup_epochs * steps_per_epoch
    total_steps = config.epochs * steps_per_epoch
    latent = model.config.latent_dim
    total, seen = 0.0, 0
    for i, begin in enumerate(range(0, len(split), config.batch_size)):
        batch = order[begin : begin + config.batch_size]
        step = epoch * steps_per_epoch + i
        beta = config.beta * min(1.0, (step + 1) / warmup_steps) if warmup_steps else config.beta
        part = local_positions(len(batch), ranks)
        idx = batch[part].numpy()
        x = torch.from_numpy(np.ascontiguousarray(split.x[idx])).to(device)
        y = None if split.y is None else torch.from_numpy(split.y[idx]).to(device)
        # The step's randomness is drawn for the whole global batch, the same on every rank,
        # and each rank takes its part: one process and N draw alike.
        noise = seeded_generator(device, config.seed, _NOISE, step)
        eps = torch.randn((config.train_k, len(batch), latent), generator=noise, device=device)
        if splits.binarize == "dynamic":  # a fresh Bernoulli draw of the grey images
            draw = seeded_generator(device, config.seed, _BINARIZE, step)
            u = torch.rand((len(batch), *x.shape[1:]), generator=draw, device=device)
            x = (u[part] < x).to(x.dtype)
        weight = len(idx) / len(batch) * ranks.world_size
        for group in optimizer.param_groups:
            group["lr"] = _learning_rate(config, step, total_steps)
        loss = step_loss(x, y, beta, config.train_k, eps[:, part], weight)
        if not torch.isfinite(loss):
            raise RuntimeError(f"training diverged (loss {loss.item()}); try a lower --lr")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if ema:
            _update_ema(ema, model, config.ema_decay)
        if len(idx):
            total += loss.item() / weight * len(idx)
            seen += len(idx)
    if ranks.distributed:  # the epoch's loss over every rank's images, as one process has it
        sums = torch.tensor([total, float(seen)], dtype=torch.float64, device=device)
        dist.all_reduce(sums)
        total, seen = sums.tolist()
    return total / max(seen, 1)


@torch.no_grad()
def _val_bound(model: VAE, split: Split, k: int, device: torch.device) -> float:
    """Validation value of the training objective at β = 1: the ELBO, or the k-sample IWAE
    bound, whose best epoch comes long after the ELBO's (the ELBO falls as IWAE trains)."""
    model.eval()
    generator = torch.Generator(device=device).manual_seed(_VAL_SEED)
    total = 0.0
    for xb, yb in iter_batches(split, _VAL_BATCH, device):
        if k == 1:
            total += elbo_terms(model, xb, yb, generator).elbo.sum().item()
        else:
            total += iwae_bound(model, xb, yb, k, generator=generator).sum().item()
    return total / len(split)


@torch.no_grad()
def _update_ema(ema: dict[str, torch.Tensor], model: VAE, decay: float) -> None:
    """ema ← decay · ema + (1 − decay) · weights, for every floating-point tensor."""
    for name, value in model.state_dict().items():
        if value.is_floating_point():
            ema[name].lerp_(value, 1.0 - decay)
        else:
            ema[name].copy_(value)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    text = json.dumps(data, indent=2) + "\n"
    write_atomically(path, lambda f: f.write(text.encode()))
