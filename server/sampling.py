"""Counter-based noise: the sampling contract of DESIGN.md, in numpy (no torch).

Row ``i`` of the noise for ``(seed, stream)`` is a pure function of ``(seed, stream, i, width)``:
it is cut from a Philox stream keyed by ``(seed, stream)`` at a fixed offset, so a request for
rows [a, b) gives the same bytes as rows a..b-1 of any larger request, whatever the batching.
The server and the in-process batch job (``vae-generate --local``) both draw from here.
"""

from __future__ import annotations

import secrets

import numpy as np

__all__ = [
    "LATENT_STREAM",
    "OUTPUT_STREAM",
    "ENCODE_STREAM",
    "MAX_SEED",
    "new_seed",
    "uniform_rows",
    "normal_rows",
    "prior_latents",
    "draw_from_likelihood",
]

# Independent streams of one seed: latents of Sample, draws from p(x|z), draws from q(z|x).
LATENT_STREAM = 0
OUTPUT_STREAM = 1
ENCODE_STREAM = 2

MAX_SEED = 2**64 - 1
_WORDS_PER_BLOCK = 4  # Philox4x64 yields four 64-bit words per counter step.
_TWO_PI = 2.0 * np.pi


def new_seed() -> int:
    """A seed for a request that came without one (63 bits: safe in every JSON/int64 client)."""
    return secrets.randbits(63)


def _words_per_row(values_per_row: int) -> int:
    # Whole counter blocks per row, so that row i starts at a counter step of its own.
    return -(-values_per_row // _WORDS_PER_BLOCK) * _WORDS_PER_BLOCK


def _raw_rows(seed: int, stream: int, start: int, count: int, words: int) -> np.ndarray:
    """(count, words) uint64: rows start..start+count-1 of the (seed, stream) sequence."""
    if not 0 <= seed <= MAX_SEED:
        raise ValueError(f"seed {seed} is out of range: expected 0..2**64-1")
    if start < 0 or count < 0:
        raise ValueError(f"rows [{start}, {start + count}) are out of range: expected start >= 0")
    key = np.array([seed, stream], dtype=np.uint64)
    counter = np.array([start * (words // _WORDS_PER_BLOCK), 0, 0, 0], dtype=np.uint64)
    bit_generator = np.random.Philox(key=key, counter=counter)
    return bit_generator.random_raw(count * words).reshape(count, words)


def _to_open_unit(words: np.ndarray) -> np.ndarray:
    # The top 53 bits, centred in their interval: uniform on (0, 1), never 0 (log(0) below).
    return ((words >> np.uint64(11)).astype(np.float64) + 0.5) * (1.0 / 2**53)


def uniform_rows(seed: int, stream: int, start: int, count: int, width: int) -> np.ndarray:
    """(count, width) float32 uniform on (0, 1); row i depends only on (seed, stream, i, width).

    Each 64-bit word gives two 23-bit uniforms: pixel-wide rows (a Bernoulli draw of a
    4096x784 answer) cost a quarter of the float64 path.
    """
    words = _words_per_row(-(-width // 2))
    raw = _raw_rows(seed, stream, start, count, words).view(np.uint32)  # (count, 2 * words)
    u = (raw[:, :width] >> np.uint32(9)).astype(np.float32)
    u += np.float32(0.5)
    u *= np.float32(2.0**-23)
    return u


def normal_rows(seed: int, stream: int, start: int, count: int, width: int) -> np.ndarray:
    """(count, width) float32 standard normal; row i depends only on (seed, stream, i, width).

    Box-Muller on pairs of uniforms: exact in count (unlike numpy's ziggurat, which consumes
    a variable number of words), so the offset of every row is known in advance.
    """
    pairs = -(-width // 2)
    raw = _raw_rows(seed, stream, start, count, _words_per_row(2 * pairs))
    u = _to_open_unit(raw[:, : 2 * pairs]).reshape(count, pairs, 2)  # (count, pairs, 2)
    radius = np.sqrt(-2.0 * np.log(u[..., 0]))
    angle = _TWO_PI * u[..., 1]
    normals = np.stack((radius * np.cos(angle), radius * np.sin(angle)), axis=-1)
    return normals.reshape(count, 2 * pairs)[:, :width].astype(np.float32)


def prior_latents(
    latent_dim: int,
    seed: int,
    start: int,
    count: int,
    temperature: float = 1.0,
    labels: np.ndarray | None = None,
    prior_means: np.ndarray | None = None,
) -> np.ndarray:
    """z for samples start..start+count-1: mu_prior + temperature * eps, (count, latent_dim).

    Args:
        prior_means: (num_classes, latent_dim) class means of a ``prior`` CVAE, or None for
            the standard normal prior.
        labels: (count,) int64 classes; required with ``prior_means``.
    """
    eps = normal_rows(seed, LATENT_STREAM, start, count, latent_dim)  # (count, d)
    z = eps * np.float32(temperature)
    if prior_means is not None:
        assert labels is not None, "a class-mean prior needs labels"
        z += prior_means[labels].astype(np.float32, copy=False)
    return z


def draw_from_likelihood(
    likelihood: str,
    params: dict[str, np.ndarray],
    seed: int,
    start: int,
    gaussian_sigma: float | None = None,
) -> np.ndarray:
    """One draw from p(x|z) per row, given the decoder's outputs for rows start.. of a seed.

    Args:
        likelihood: "bernoulli", "gaussian" or "gaussian-learned".
        params: the decoder's outputs by name ("probs" / "mean", "log_sigma").
        gaussian_sigma: the fixed sigma of a "gaussian" likelihood.

    Returns:
        float32 array of the shape of the mean.
    """
    mean = params["probs"] if likelihood == "bernoulli" else params["mean"]
    count = mean.shape[0]
    width = int(np.prod(mean.shape[1:]))
    if likelihood == "bernoulli":
        u = uniform_rows(seed, OUTPUT_STREAM, start, count, width).reshape(mean.shape)
        return (u < mean).astype(np.float32)
    eps = normal_rows(seed, OUTPUT_STREAM, start, count, width).reshape(mean.shape)
    if likelihood == "gaussian-learned":
        sigma = np.exp(params["log_sigma"], dtype=np.float32)
    else:
        assert gaussian_sigma is not None, "a fixed-sigma Gaussian needs gaussian_sigma"
        sigma = np.float32(gaussian_sigma)
    return (mean + sigma * eps).astype(np.float32, copy=False)
