"""Latent paths for ``VaeClient.interpolate`` (and ``AsyncVaeClient``'s): pure numpy, no torch,
no gRPC; the calls go through whichever client is given.

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

from collections.abc import Generator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "PATHS",
    "MAX_STEPS",
    "SLERP_MIN_SIN",
    "InterpolationResult",
    "check_steps",
    "interpolate",
    "interpolate_async",
    "interpolation_flow",
    "interpolation_label",
    "one_input",
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


def interpolate(
    client: Any,  # a VaeClient: typed loosely, the client module imports this one
    model: str,
    x_a: np.ndarray,
    x_b: np.ndarray,
    steps: int,
    *,
    labels: int | Sequence[int] | np.ndarray | None = None,
    path: str = "linear",
    version: int = 0,
    timeout_s: float | None = None,
) -> InterpolationResult:
    """``VaeClient.interpolate``: decoded points of a latent path between the posterior
    means of two inputs, ``client`` making the calls.

    Encodes x_a and x_b (one Encode call; their means mu_a, mu_b), builds ``steps`` latents
    from mu_a to mu_b, both included (``path``: "linear", (1 - t) mu_a + t mu_b, or
    "spherical", slerp, which falls back to linear where the angle between the means is ~0
    or ~pi: see ``vaeserve.client.interpolation``), and decodes them (the means of
    p(x|z[,y]), float32). One model version serves all calls (version 0: the highest loaded
    when the call starts). docs/interpolation.md.

    Args:
        x_a, x_b: one input each, of shape sample_shape or (1, *sample_shape).
        steps: number of points, 2..256, ends included.
        labels: CVAE: the one class used for both ends and the whole path (an int, or a
            sequence of one int); must be None for a VAE.
        path: "linear" or "spherical".

    Raises:
        ValueError: a bad ``steps``, ``path``, ``labels``, ``x_a`` or ``x_b`` (the message
            names the argument).
        VaeServeError: as ``encode`` and ``decode``.
    """
    flow = interpolation_flow(model, x_a, x_b, steps, labels=labels, path=path, version=version)
    answer = None
    while True:
        try:
            method, kwargs = flow.send(answer)
        except StopIteration as done:
            return done.value
        answer = getattr(client, method)(**kwargs, timeout_s=timeout_s)


async def interpolate_async(
    client: Any,  # an AsyncVaeClient
    model: str,
    x_a: np.ndarray,
    x_b: np.ndarray,
    steps: int,
    *,
    labels: int | Sequence[int] | np.ndarray | None = None,
    path: str = "linear",
    version: int = 0,
    timeout_s: float | None = None,
) -> InterpolationResult:
    """``interpolate`` with an ``AsyncVaeClient``, whose calls are awaited."""
    flow = interpolation_flow(model, x_a, x_b, steps, labels=labels, path=path, version=version)
    answer = None
    while True:
        try:
            method, kwargs = flow.send(answer)
        except StopIteration as done:
            return done.value
        answer = await getattr(client, method)(**kwargs, timeout_s=timeout_s)


# A client method's name and its arguments, for the caller to call and send back the result.
ClientCall = tuple[str, dict[str, Any]]


def interpolation_flow(
    model: str,
    x_a: np.ndarray,
    x_b: np.ndarray,
    steps: int,
    *,
    labels: int | Sequence[int] | np.ndarray | None,
    path: str,
    version: int,
) -> Generator[ClientCall, Any, InterpolationResult]:
    """The steps of ``interpolate`` with no I/O: yields each client call it needs and is
    sent its result, so that the blocking and the asyncio client share every rule; returns
    the result. The arguments and errors are ``interpolate``'s."""
    steps = check_steps(steps)
    if path not in PATHS:
        raise ValueError(f"path: expected one of {', '.join(PATHS)}, got {path!r}")
    info = yield "model_info", {"model": model, "version": version}
    label = interpolation_label(labels, info.kind, info.num_classes)
    x = np.concatenate(
        [
            one_input("x_a", x_a, info.sample_shape),
            one_input("x_b", x_b, info.sample_shape),
        ]
    )
    ends_labels = None if label is None else [label, label]
    enc = yield "encode", {"model": model, "x": x, "version": info.version, "labels": ends_labels}
    latents = latent_path(enc.mu[0], enc.mu[1], steps, path).astype(np.float32)
    latents[0], latents[-1] = enc.mu[0], enc.mu[1]
    chunk = info.max_samples_per_request or steps
    images = []
    for start in range(0, steps, chunk):
        z = latents[start : start + chunk]
        path_labels = None if label is None else [label] * len(z)
        call = {"model": model, "z": z, "version": info.version, "labels": path_labels}
        dec = yield "decode", call
        images.append(dec.x)
    return InterpolationResult(
        model_name=enc.model_name,
        model_version=enc.model_version,
        path=path,
        label=label,
        t=interpolation_times(steps),
        latents=latents,
        images=np.concatenate(images),
    )


def interpolation_label(
    labels: int | Sequence[int] | np.ndarray | None, kind: str, num_classes: int
) -> int | None:
    """The one class of an interpolation: None for a VAE, required for a CVAE."""
    if kind != "cvae":
        if labels is not None:
            raise ValueError(f"labels: the model is a {kind} and takes no labels, got {labels!r}")
        return None
    if labels is None:
        raise ValueError("labels: the model is a cvae: give the one class of the interpolation")
    flat = np.asarray(labels).reshape(-1)
    if flat.size != 1 or not np.issubdtype(flat.dtype, np.integer):
        raise ValueError(
            f"labels: expected one integer class (used for both ends and the path), got {labels!r}"
        )
    label = int(flat[0])
    if not 0 <= label < num_classes:
        raise ValueError(f"labels: expected a class in 0..{num_classes - 1}, got {label}")
    return label


def one_input(name: str, x: np.ndarray, sample_shape: tuple[int, ...]) -> np.ndarray:
    """``x`` as (1, *sample_shape) float32, else ValueError naming ``name``."""
    array = np.asarray(x)
    if array.shape == tuple(sample_shape):
        array = array[None]
    if array.shape != (1, *sample_shape):
        raise ValueError(
            f"{name}: expected shape {tuple(sample_shape)} or (1, *that), got {array.shape}"
        )
    if not np.issubdtype(array.dtype, np.number) or np.issubdtype(array.dtype, np.complexfloating):
        raise ValueError(f"{name}: expected real numbers, got dtype {array.dtype}")
    array = array.astype(np.float32)
    if not np.isfinite(array).all():
        raise ValueError(f"{name}: expected finite values")
    return array
