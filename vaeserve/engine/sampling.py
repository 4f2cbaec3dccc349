"""Counter-based noise: the sampling contract (docs/architecture.md), in numpy (no torch).

Row ``i`` of the noise for ``(seed, stream)`` is a pure function of ``(seed, stream, i, width)``:
it is cut from a Philox stream keyed by ``(seed, stream)`` at a fixed offset, so a request for
rows [a, b) gives the same bytes as rows a..b-1 of any larger request, whatever the batching.
The server and the in-process batch job (``vae-generate --local``) both draw from here.
"""

from __future__ import annotations

import math
import secrets
import threading
from dataclasses import dataclass

import numpy as np

from vaeserve.manifest import mean_output_name

__all__ = [
    "LATENT_STREAM",
    "OUTPUT_STREAM",
    "ENCODE_STREAM",
    "SCORE_STREAM",
    "COMPONENT_STREAM",
    "MAX_SEED",
    "MixturePrior",
    "MAX_ROW_INDEX",
    "new_seed",
    "uniform_rows",
    "normal_rows",
    "prior_latents",
    "draw_from_likelihood",
]

# Independent streams of one seed: latents of Sample, draws from p(x|z), draws from q(z|x)
# for Encode, the importance samples of Score (row (start + i) * k + j: draw j of input i),
# and the mixture component of Sample's row i under a mixture prior (one uniform a row).
LATENT_STREAM = 0
OUTPUT_STREAM = 1
ENCODE_STREAM = 2
SCORE_STREAM = 3
COMPONENT_STREAM = 4

MAX_SEED = 2**64 - 1
_WORDS_PER_BLOCK = 4  # Philox4x64 yields four 64-bit words per counter step.
_TWO_PI = 2.0 * np.pi
_LOW_24 = (1 << 24) - 1
_THREAD = threading.local()
# Rows past this index are refused: the Philox counter of a row (index x blocks per row)
# must fit in 64 bits for every width a model can have.
MAX_ROW_INDEX = 2**40


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
    if start < 0 or count < 0 or start + count > MAX_ROW_INDEX:
        raise ValueError(
            f"rows [{start}, {start + count}) are out of range: expected 0 <= start and "
            f"start + count <= {MAX_ROW_INDEX}"
        )
    bit_generator = _philox()
    bit_generator.state = {
        "bit_generator": "Philox",
        "state": {
            "counter": np.array([start * (words // _WORDS_PER_BLOCK), 0, 0, 0], dtype=np.uint64),
            "key": np.array([seed, stream], dtype=np.uint64),
        },
        "buffer": np.zeros(_WORDS_PER_BLOCK, dtype=np.uint64),
        "buffer_pos": _WORDS_PER_BLOCK,  # empty: the next word comes from the counter
        "has_uint32": 0,
        "uinteger": 0,
    }
    return bit_generator.random_raw(count * words).reshape(count, words)


def _philox() -> np.random.Philox:
    # Re-keying one generator per thread costs a fifth of constructing one, which also draws
    # OS entropy for a seed that the key then replaces; per-request cost at batch 1.
    bit_generator = getattr(_THREAD, "philox", None)
    if bit_generator is None:
        bit_generator = _THREAD.philox = np.random.Philox(key=np.zeros(2, dtype=np.uint64))
    return bit_generator


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

    Box-Muller, one 64-bit word per pair of normals: exact in count (unlike numpy's ziggurat,
    which consumes a variable number of words), so the offset of every row is known in
    advance. The radius takes the top 40 bits (in float64, so tails reach 7.5 sigma), the
    angle the low 24 bits (in float32, which is all a float32 result can resolve); the float32
    trigonometry is what makes a 4096x32 latent draw cost well under a millisecond.
    """
    pairs = -(-width // 2)
    raw = _raw_rows(seed, stream, start, count, _words_per_row(pairs))[:, :pairs]
    u = ((raw >> np.uint64(24)).astype(np.float64) + 0.5) * 2.0**-40  # (count, pairs) in (0, 1)
    radius = np.sqrt(-2.0 * np.log(u)).astype(np.float32)
    angle = (raw & np.uint64(_LOW_24)).astype(np.float32)
    angle *= np.float32(_TWO_PI * 2.0**-24)
    normals = np.empty((count, pairs, 2), dtype=np.float32)
    np.cos(angle, out=normals[..., 0])
    np.sin(angle, out=normals[..., 1])
    normals *= radius[..., None]
    return normals.reshape(count, 2 * pairs)[:, :width]


@dataclass(frozen=True, eq=False)
class MixturePrior:
    """p(z) = Σ_k w_k N(z; m_k, diag exp(logvar_k)): a VampPrior as the exporter wrote it.

    Row i of a seed picks its component from its own uniform, row i of COMPONENT_STREAM
    (the first k with u < w_1 + ... + w_k), and its noise from row i of LATENT_STREAM, so
    z_i is a pure function of (seed, i) as for the standard normal prior.
    """

    means: np.ndarray  # (K, d) float32
    logvars: np.ndarray  # (K, d) float32
    weights: np.ndarray  # (K,) float64, summing to 1

    def __post_init__(self) -> None:
        # float32 σ = exp(½ logvar), as torch's reparameterize computes it.
        object.__setattr__(self, "_stds", np.exp(np.float32(0.5) * self.logvars))
        cumulative = np.cumsum(self.weights.astype(np.float64))
        object.__setattr__(self, "_cumulative", cumulative / cumulative[-1])
        lv = self.logvars.astype(np.float64)
        m = self.means.astype(np.float64)
        var_inv = np.exp(-lv)
        object.__setattr__(self, "_var_inv", var_inv)
        object.__setattr__(self, "_mean_var_inv", m * var_inv)
        with np.errstate(divide="ignore"):  # a zero weight is a component never drawn
            log_w = np.log(self.weights.astype(np.float64))
        const = log_w - 0.5 * (m.shape[1] * math.log(2.0 * math.pi) + lv.sum(1))
        object.__setattr__(self, "_const", const - 0.5 * (m * m * var_inv).sum(1))

    @property
    def components(self) -> int:
        return len(self.weights)

    def choose(self, seed: int, start: int, count: int) -> np.ndarray:
        """(count,) int64: the component of rows start..start+count-1 of ``seed``."""
        u = uniform_rows(seed, COMPONENT_STREAM, start, count, 1)[:, 0].astype(np.float64)
        picked = np.searchsorted(self._cumulative, u, side="right")
        return np.minimum(picked, self.components - 1)

    def log_prob(self, z: np.ndarray) -> np.ndarray:
        """log p(z) in float64, (...,) for z (..., d): the sums training.model's
        log_normal_mixture computes (the quadratic form expanded into matrix products)."""
        z = np.asarray(z, dtype=np.float64)
        quad = (z * z) @ self._var_inv.T - 2.0 * z @ self._mean_var_inv.T  # (..., K)
        log_comp = self._const - 0.5 * quad
        top = log_comp.max(-1, keepdims=True)
        return (top + np.log(np.exp(log_comp - top).sum(-1, keepdims=True)))[..., 0]


def prior_latents(
    latent_dim: int,
    seed: int,
    start: int,
    count: int,
    temperature: float = 1.0,
    labels: np.ndarray | None = None,
    prior_means: np.ndarray | None = None,
    mixture: MixturePrior | None = None,
) -> np.ndarray:
    """z for samples start..start+count-1, (count, latent_dim): mu_prior + temperature * eps,
    or under a mixture prior m_c + temperature * sigma_c * eps with c row i's component.

    Args:
        prior_means: (num_classes, latent_dim) class means of a ``prior`` CVAE, or None for
            the standard normal prior.
        labels: (count,) int64 classes; required with ``prior_means``.
        mixture: a VAE's learned mixture prior, or None.
    """
    eps = normal_rows(seed, LATENT_STREAM, start, count, latent_dim)  # (count, d)
    if mixture is not None:
        c = mixture.choose(seed, start, count)
        return mixture.means[c] + (mixture._stds[c] * np.float32(temperature)) * eps
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
    mean = params[mean_output_name(likelihood)]
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
