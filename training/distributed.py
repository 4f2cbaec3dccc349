"""Training on several processes: the process group torchrun sets up, and how a global batch
is shared between ranks.

Without torchrun (no WORLD_SIZE in the environment, or WORLD_SIZE=1) nothing here starts a
process group, and training runs as one process.

Under ``torchrun --nproc-per-node N -m vaeserve.training ...`` every rank runs the same
script; torchrun's variables (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) say
where it stands. gloo on CPU, NCCL on CUDA (one device per rank: ``cuda:LOCAL_RANK``).

``--batch-size`` stays the *global* batch whatever N: every rank draws the same permutation
of the training set for an epoch and the same noise for a step (generators seeded by the run's
seed and the epoch or step), takes its contiguous part of each global batch, and scales its
loss by its share of the batch, so that the gradients DistributedDataParallel averages are the
gradient of the global batch's mean loss — the single-process step, up to float summation
order.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from vaeserve.training.losses import training_loss
from vaeserve.training.model import VAE

__all__ = ["Ranks", "StepLoss", "derived_seed", "local_positions", "seeded_generator", "start"]

# How long a rank waits for the others at a collective before the job fails (a dead peer
# that torchrun did not notice, a hung NCCL call): an error, not a hang.
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=10)


@dataclass(frozen=True)
class Ranks:
    """Where this process stands: rank ``rank`` of ``world_size``."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        """The rank that writes the run's files and logs progress."""
        return self.rank == 0

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def stop(self) -> None:
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(
            f"{name}: expected an integer (as torchrun sets it), got {value!r}"
        ) from None


def start(device: torch.device) -> tuple[Ranks, torch.device]:
    """Join the process group torchrun describes, if any; the device this rank trains on.

    Raises:
        ValueError: torchrun's variables are inconsistent, or more CUDA ranks on this node
            than devices.
    """
    ranks = Ranks(
        rank=_env_int("RANK", 0),
        world_size=_env_int("WORLD_SIZE", 1),
        local_rank=_env_int("LOCAL_RANK", 0),
    )
    if not 0 <= ranks.rank < ranks.world_size:
        raise ValueError(f"RANK: expected 0..{ranks.world_size - 1}, got {ranks.rank}")
    if not ranks.distributed:
        return ranks, device
    if device.type == "cuda":
        if ranks.local_rank >= torch.cuda.device_count():
            raise ValueError(
                f"LOCAL_RANK: {ranks.local_rank}, but this node has "
                f"{torch.cuda.device_count()} CUDA devices (one per process)"
            )
        device = torch.device("cuda", ranks.local_rank)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend, timeout=COLLECTIVE_TIMEOUT)
    return ranks, device


def local_positions(batch: int, ranks: Ranks) -> slice:
    """This rank's contiguous part of a global batch of ``batch`` rows (sizes differ by at
    most one; a part may be empty when the batch has fewer rows than ranks)."""
    share, extra = divmod(batch, ranks.world_size)
    begin = ranks.rank * share + min(ranks.rank, extra)
    return slice(begin, begin + share + (ranks.rank < extra))


class StepLoss(nn.Module):
    """One rank's loss for its part of a global batch, as a module that
    DistributedDataParallel can wrap: the batch's mean loss times ``weight`` (the share that
    makes the averaged gradients those of the global batch)."""

    def __init__(self, model: VAE):
        super().__init__()
        self.model = model

    def forward(
        self,
        x: torch.Tensor,
        y: torch.Tensor | None,
        beta: float,
        k: int,
        eps: torch.Tensor,
        weight: float,
    ) -> torch.Tensor:
        if len(x) == 0:  # fewer rows than ranks: take part in the gradient exchange with 0
            return sum(p.sum() for p in self.model.parameters()) * 0.0
        loss, _ = training_loss(self.model, x, y, beta, k, eps)
        return loss * weight


def derived_seed(seed: int, purpose: int, index: int) -> int:
    """A seed for one purpose and epoch or step, well mixed from the run's seed."""
    return int(np.random.SeedSequence([seed, purpose, index]).generate_state(1, np.uint64)[0])


def seeded_generator(device: torch.device | str, seed: int, purpose: int, index: int):
    return torch.Generator(device=device).manual_seed(derived_seed(seed, purpose, index))
