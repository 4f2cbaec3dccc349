"""Latent paths for ``VaeClient.interpolate``: pure numpy, no torch, no gRPC.

Two paths from latent vector ``a`` to ``b``, evaluated at ``steps`` evenly spaced
t = 0, 1/(steps-1), ..., 1 (both ends included, exactly ``a`` and ``b``):

- ``linear``: (1 - t) a + t b.
- ``spherical`` (slerp): sin((1 - t) w) / sin(w) a + sin(t w) / sin(w) b, with w the angle
  between a and b. For endpoints of equal norm every point keeps that norm (it walks the great
  circle); for unequal norms the norm moves smoothly between them. Where sin(w) is ~0 (a and b
  point the same way, or exactly opposite ways, or one of them is the zero vector) slerp is
  undefined or ill-conditioned and the linear path is used instead; see ``SLERP_MIN_SIN``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "PATHS",
    "MAX_STEPS",
    "SLERP_MIN_SIN",
    "InterpolationResult",
    "check_steps",
    "interpolation_times",
    "latent_path",
    "linear_path",
    "spherical_path",
]

PATHS = ("linear", "spherical")
MAX_STEPS = 256
# slerp falls back to linear where sin(angle) is below this (angle within ~1e-6 rad of 0 or pi).
SLERP_MIN_SIN = 1e-6


@dataclass(frozen=True)
class InterpolationResult:
    """What ``VaeClient.interpolate`` returns."""

    model_name: str
    model_version: int
    path: str  # "linear" | "spherical"
    label: int | None  # the CVAE class used for both ends and the whole path; None for a VAE
    t: np.ndarray  # (steps,) float64, 0 .. 1
    latents: np.ndarray  # (steps, latent_dim) float32; latents[0], latents[-1]: the two means
    images: np.ndarray  # (steps, *sample_shape) float32: decoded means of p(x|z[,y])


def check_steps(steps: object) -> int:
    """``steps`` as an int in 2..MAX_STEPS, else ValueError naming ``steps``."""
    if isinstance(steps, bool) or not isinstance(steps, int | np.integer):
        raise ValueError(f"steps: expected an integer in 2..{MAX_STEPS}, got {steps!r}")
    if not 2 <= steps <= MAX_STEPS:
        raise ValueError(f"steps: expected an integer in 2..{MAX_STEPS}, got {steps}")
    return int(steps)


def interpolation_times(steps: int) -> np.ndarray:
    """(steps,) float64: 0, 1/(steps-1), ..., 1."""
    return np.linspace(0.0, 1.0, check_steps(steps))


def _endpoints(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.ndim != 1 or a.size == 0:
        raise ValueError(f"a: expected a non-empty 1-d latent vector, got shape {a.shape}")
    if b.shape != a.shape:
        raise ValueError(f"b: expected shape {a.shape} (that of a), got {b.shape}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("a, b: latent vectors must be finite")
    return a, b


def linear_path(a: np.ndarray, b: np.ndarray, t: np.ndarray) -> np.ndarray:
    """(len(t), d) float64: (1 - t) a + t b, with exactly a at t = 0 and b at t = 1."""
    a, b = _endpoints(a, b)
    t = np.asarray(t, dtype=np.float64)[:, None]
    return (1.0 - t) * a + t * b


def spherical_path(a: np.ndarray, b: np.ndarray, t: np.ndarray) -> np.ndarray:
    """(len(t), d) float64: slerp from a to b; the linear path where sin(angle) < SLERP_MIN_SIN."""
    a, b = _endpoints(a, b)
    norm_a, norm_b = np.linalg.norm(a), np.linalg.norm(b)
    if norm_a == 0.0 or norm_b == 0.0:
        return linear_path(a, b, t)
    cos = float(np.clip(np.dot(a / norm_a, b / norm_b), -1.0, 1.0))
    omega = float(np.arccos(cos))
    sin = float(np.sin(omega))
    if sin < SLERP_MIN_SIN:
        return linear_path(a, b, t)
    t = np.asarray(t, dtype=np.float64)[:, None]
    points = (np.sin((1.0 - t) * omega) * a + np.sin(t * omega) * b) / sin
    # The ends exactly, not to rounding: decoding them must give decode(a) and decode(b).
    points[t[:, 0] == 0.0] = a
    points[t[:, 0] == 1.0] = b
    return points


def latent_path(a: np.ndarray, b: np.ndarray, steps: int, path: str = "linear") -> np.ndarray:
    """(steps, d) float64: ``path`` ("linear" or "spherical") from a to b, ends included."""
    if path not in PATHS:
        raise ValueError(f"path: expected one of {', '.join(PATHS)}, got {path!r}")
    t = interpolation_times(steps)
    return linear_path(a, b, t) if path == "linear" else spherical_path(a, b, t)
