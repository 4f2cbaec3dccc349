"""vae-train: train a VAE or CVAE from the command line; --resume continues a run.

Run: vae-train --dataset digits --model vae --out runs/vae
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

from vaeserve.training.checkpoint import CHECKPOINT_NAME
from vaeserve.training.config import (
    ARCHS,
    BINARIZE_MODES,
    CONDITIONINGS,
    DEFAULT_HIDDEN_DIMS,
    DEVICES,
    KINDS,
    LIKELIHOODS,
    LR_SCHEDULES,
    PRIORS,
    PSEUDO_INITS,
    TrainConfig,
)
from vaeserve.training.train import RESUMABLE, resume_config, train

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    d = TrainConfig()
    # Options left out stay unset (SUPPRESS), so that --resume can tell what was asked for.
    p = argparse.ArgumentParser(
        prog="vae-train",
        description="Train a VAE or CVAE.",
        argument_default=argparse.SUPPRESS,
    )
    p.add_argument(
        "--dataset", help=f"digits | mnist:DIR | fashion-mnist:DIR | npz:PATH ({d.dataset})"
    )
    p.add_argument("--model", choices=KINDS, help=f"({d.model})")
    p.add_argument("--conditioning", choices=CONDITIONINGS, help="CVAE only (concat)")
    p.add_argument("--likelihood", choices=LIKELIHOODS, help=f"({d.likelihood})")
    p.add_argument("--binarize", choices=BINARIZE_MODES, help="(static for bernoulli, else none)")
    p.add_argument("--arch", choices=ARCHS, help=f"({d.arch})")
    p.add_argument("--latent-dim", type=int, help=f"({d.latent_dim})")
    p.add_argument(
        "--hidden-dims",
        type=int,
        nargs="+",
        help="MLP widths or conv channels "
        f"({' '.join(map(str, DEFAULT_HIDDEN_DIMS['mlp']))} for mlp, "
        f"{' '.join(map(str, DEFAULT_HIDDEN_DIMS['conv']))} for conv)",
    )
    p.add_argument(
        "--gaussian-sigma", type=float, help=f"σ of --likelihood gaussian ({d.gaussian_sigma})"
    )
    p.add_argument("--epochs", type=int, help=f"({d.epochs})")
    p.add_argument("--batch-size", type=int, help=f"({d.batch_size})")
    p.add_argument("--lr", type=float, help=f"Adam (AdamW) learning rate ({d.lr})")
    p.add_argument(
        "--lr-schedule",
        choices=LR_SCHEDULES,
        help=f"constant, or cosine decay to 0 over --epochs, set every step ({d.lr_schedule})",
    )
    p.add_argument(
        "--weight-decay",
        type=float,
        metavar="W",
        help=f"decoupled weight decay (AdamW) when > 0 ({d.weight_decay})",
    )
    p.add_argument("--beta", type=float, help=f"KL weight, 1 is the ELBO ({d.beta})")
    p.add_argument("--kl-warmup-epochs", type=int, help=f"({d.kl_warmup_epochs})")
    p.add_argument(
        "--iwae-k",
        type=int,
        dest="train_k",
        metavar="K",
        help=f"samples of the IWAE objective; 1 is the ELBO ({d.train_k})",
    )
    p.add_argument(
        "--prior",
        choices=PRIORS,
        help="p(z): N(0, I) (a prior CVAE: N(mu_y, I)) or, for a vae, the VampPrior, a "
        "mixture of the posteriors of learned pseudo-inputs (vamp for a vae, normal for a cvae)",
    )
    p.add_argument(
        "--prior-components",
        type=int,
        metavar="K",
        help=f"pseudo-inputs of --prior vamp ({d.prior_components})",
    )
    p.add_argument(
        "--pseudo-init",
        choices=PSEUDO_INITS,
        help=f"--prior vamp: pseudo-inputs start near grey or at training images ({d.pseudo_init})",
    )
    p.add_argument(
        "--prior-mean-scale",
        type=float,
        metavar="S",
        help="--conditioning prior: the class means start S from 0, each on its own axis "
        f"({d.prior_mean_scale})",
    )
    p.add_argument(
        "--ema-decay",
        type=float,
        metavar="D",
        help="validate and keep the moving average of the weights, decay D per step; "
        f"0 is off ({d.ema_decay})",
    )
    p.add_argument(
        "--val-fraction",
        type=float,
        metavar="F",
        help="share of the training images held out to choose the checkpoint (the best "
        "validation epoch); 0 trains on all of them and keeps the last epoch "
        f"({d.val_fraction})",
    )
    p.add_argument("--eval-k", type=int, help=f"importance samples of the test NLL ({d.eval_k})")
    p.add_argument("--seed", type=int, help=f"({d.seed})")
    p.add_argument("--device", choices=DEVICES, help=f"({d.device})")
    p.add_argument("--num-threads", type=int, help="torch threads (torch's default)")
    p.add_argument(
        "--save-interval-s",
        type=float,
        help=f"resumable checkpoint at most every S seconds, and at the end ({d.save_interval_s})",
    )
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument(
        "--resume",
        action="store_true",
        default=False,
        help="continue the run in --out; only "
        + ", ".join("--" + n.replace("_", "-") for n in RESUMABLE)
        + " may be given with it",
    )
    p.add_argument(
        "--resume-if-present",
        action="store_true",
        default=False,
        help="continue the run in --out if it holds one, whose settings must equal these, "
        "else start it: for jobs that restart (a Kubernetes Job's retries, torchrun "
        "--max-restarts)",
    )
    p.add_argument(
        "--no-progress", action="store_true", default=False, help="hide the progress bar"
    )
    p.add_argument("--log-level", default="INFO", help="(INFO)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of `vae-train`."""
    parser = _parser()
    args = vars(parser.parse_args(argv))
    out, resume = args.pop("out"), args.pop("resume")
    if_present = args.pop("resume_if_present")
    progress, log_level = not args.pop("no_progress"), args.pop("log_level")
    if os.environ.get("RANK", "0") not in ("", "0"):  # under torchrun, rank 0 reports
        log_level = "WARNING"
    logging.basicConfig(level=log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    if "hidden_dims" in args:
        args["hidden_dims"] = tuple(args["hidden_dims"])
    try:
        if resume and if_present:
            raise ValueError("--resume and --resume-if-present: give one of them")
        config = resume_config(out, **args) if resume else TrainConfig(**args)
        if if_present:  # the stored settings must be these (train() compares them)
            resume = (Path(out) / CHECKPOINT_NAME).exists()
        metrics = train(config, out, resume=resume, progress=progress)
    except (ValueError, FileNotFoundError) as exc:
        parser.exit(2, f"vae-train: error: {exc}\n")
    if metrics:  # under torchrun, only rank 0 evaluates
        print(json.dumps(metrics, indent=2))
    return 0
