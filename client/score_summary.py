"""vae-score's summary: mean, spread and quantiles of the scores, and the AUROC of a class as
anomaly, computed with numpy alone (the client installs no scikit-learn)."""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["QUANTILES", "SCORES", "auroc", "average_ranks", "summarize"]

SCORES = ("elbo", "log_px", "log_likelihood", "kl")
QUANTILES = (1, 5, 25, 50, 75, 95, 99)


def average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks of ``values``, ties given the mean of the ranks they span."""
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    return ((ends - counts + 1 + ends) / 2.0)[inverse.reshape(-1)]


def auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` for ``positive`` (bool), by the rank formula
    (Mann-Whitney U / (n₊ n₋), ties counting one half).

    Raises:
        ValueError: no positives or no negatives.
    """
    scores, positive = np.asarray(scores, dtype=np.float64), np.asarray(positive, dtype=bool)
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"AUROC needs positives and negatives, got {n_pos} and {n_neg}")
    rank_sum = float(average_ranks(scores)[positive].sum())
    return (rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)


def _stats(values: np.ndarray) -> dict[str, Any]:
    q = np.quantile(values, [p / 100.0 for p in QUANTILES])
    return {
        "mean": float(values.mean()),
        "std": float(values.std()),
        "quantiles": {f"{p}%": float(v) for p, v in zip(QUANTILES, q, strict=True)},
    }


def summarize(
    job: dict[str, Any], columns: dict[str, np.ndarray], anomaly_class: int | None
) -> dict[str, Any]:
    """summary.json: count, mean/std/quantiles of log_px and elbo, and the AUROC if asked."""
    summary: dict[str, Any] = {
        "model": job["model"],
        "model_version": job["model_version"],
        "data_sha256": job["data_sha256"],
        "split": job["split"],
        "k": job["k"],
        "seed": job["seed"],
        "count": int(len(columns["log_px"])),
        "log_px": _stats(columns["log_px"]),
        "elbo": _stats(columns["elbo"]),
    }
    if anomaly_class is not None:
        positive = columns["y"] == anomaly_class
        summary["anomaly"] = {
            "class": anomaly_class,
            "score": "-log_px",
            "positives": int(positive.sum()),
            "negatives": int((~positive).sum()),
            "auroc": auroc(-columns["log_px"], positive),
        }
    return summary
