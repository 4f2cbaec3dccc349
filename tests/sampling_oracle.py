"""An independent reference of the sampling contract (docs/architecture.md).

Written from the documented statement alone, not from vaeserve/engine/sampling.py, and
importing no vaeserve code: the test of the contract (test_sampling_contract.py) compares the
server's noise with this. Imported by that test (not a test module itself).

The contract, as documented:

- numpy's Philox4x64 keyed by ``(seed, stream)``; streams 0 (latents of Sample), 1 (draws
  from p(x|z)), 2 (draws from q(z|x)).
- Row i of a noise of width w starts at counter ``i * B``, B = the whole 4-word counter blocks
  one row needs; its words are the next ``4 * B`` raw 64-bit words. "Counter" is numpy's
  Philox state counter (``Philox(key=..., counter=...)``); ``philox4x64_block`` below pins
  what that means for the cipher itself.
- Normals, Box-Muller, one word per pair: ``u = ((word >> 24) + 0.5) * 2**-40`` (float64),
  radius ``sqrt(-2 ln u)``, angle ``(word & (2**24 - 1)) * 2 pi * 2**-24`` (float32), the
  pair ``(r cos t, r sin t)``; a row takes the first w values.
- Uniforms: each word gives two 32-bit halves, ``u = ((half >> 9) + 0.5) * 2**-23``.
- Latents: ``z = mu_y + temperature * eps`` (mu_y = 0 but for a prior CVAE's class means).
- Under a mixture prior (weights w, means m, log-variances lv): row i's component is the
  first k with ``u_i < (w_1 + ... + w_k) / (w_1 + ... + w_K)`` (float64 sums), u_i the one
  uniform of row i of stream 4; ``z = m_c + (temperature * sigma_c) * eps`` in float32, with
  ``sigma_c = exp(0.5 * lv_c)`` in float32 and eps row i of stream 0.
"""

from __future__ import annotations

import math

import numpy as np

LATENT_STREAM, OUTPUT_STREAM, ENCODE_STREAM, COMPONENT_STREAM = 0, 1, 2, 4
WORDS_PER_BLOCK = 4
MASK64 = (1 << 64) - 1

# Philox4x64-10 (Salmon et al. 2011, Random123): multipliers and Weyl key increments.
_M0, _M1 = 0xD2E7470EE14C6C93, 0xCA5A826395121157
_W0, _W1 = 0x9E3779B97F4A7C15, 0xBB67AE8584CAA73B


def philox4x64_block(key: tuple[int, int], counter: int) -> list[int]:
    """The four words of the Philox4x64-10 cipher at a 256-bit counter, in plain Python ints."""
    c = [(counter >> (64 * j)) & MASK64 for j in range(4)]
    k0, k1 = key
    for round_ in range(10):
        if round_:
            k0, k1 = (k0 + _W0) & MASK64, (k1 + _W1) & MASK64
        p0, p1 = _M0 * c[0], _M1 * c[2]
        c = [(p1 >> 64) ^ c[1] ^ k0, p1 & MASK64, (p0 >> 64) ^ c[3] ^ k1, p0 & MASK64]
    return c


def blocks_per_row(words_per_row: int) -> int:
    """B: whole 4-word counter blocks that hold ``words_per_row`` words."""
    return -(-words_per_row // WORDS_PER_BLOCK)


def row_words(seed: int, stream: int, row: int, words_per_row: int) -> np.ndarray:
    """The 4B raw uint64 words of one row: a fresh generator at counter row * B."""
    blocks = blocks_per_row(words_per_row)
    generator = np.random.Philox(
        key=np.array([seed, stream], dtype=np.uint64),
        counter=np.array([row * blocks, 0, 0, 0], dtype=np.uint64),
    )
    return generator.random_raw(WORDS_PER_BLOCK * blocks)


def _pairs(width: int) -> int:
    return -(-width // 2)


def normals(seed: int, stream: int, start: int, count: int, width: int) -> np.ndarray:
    """(count, width) float64: the contract's normals, trigonometry and products in float64.

    Only the contract's stated roundings are applied (u in float64, the angle rounded to
    float32); the rest is exact up to float64, so the implementation's float32 result may
    differ from this by a few float32 ulps of the radius (see ``normal_tolerance``).
    """
    out = np.empty((count, width), dtype=np.float64)
    for i in range(count):
        words = row_words(seed, stream, start + i, _pairs(width))
        row: list[float] = []
        for word in (int(w) for w in words[: _pairs(width)]):
            radius = math.sqrt(-2.0 * math.log(((word >> 24) + 0.5) * 2.0**-40))
            theta = float(_angle32(word & ((1 << 24) - 1)))
            row += [radius * math.cos(theta), radius * math.sin(theta)]
        out[i] = row[:width]
    return out


def radii(seed: int, stream: int, start: int, count: int, width: int) -> np.ndarray:
    """(count, width) float64: the Box-Muller radius behind each normal (for tolerances)."""
    out = np.empty((count, width), dtype=np.float64)
    for i in range(count):
        words = row_words(seed, stream, start + i, _pairs(width))[: _pairs(width)]
        u = ((words >> np.uint64(24)).astype(np.float64) + 0.5) * 2.0**-40
        out[i] = np.repeat(np.sqrt(-2.0 * np.log(u)), 2)[:width]
    return out


def normals_float32(seed: int, stream: int, start: int, count: int, width: int) -> np.ndarray:
    """(count, width) float32: the contract with the float32 pipeline of docs/performance.md.

    performance.md ("Latent noise in float32 trigonometry") adds what the contract leaves
    open: the radius is computed in float64 and rounded to float32, cos/sin are numpy's
    float32 ufuncs, and r * cos t is a float32 product. With those roundings the result is
    determined bit for bit (on one numpy build and CPU family).
    """
    out = np.empty((count, width), dtype=np.float32)
    for i in range(count):
        words = row_words(seed, stream, start + i, _pairs(width))[: _pairs(width)]
        u = ((words >> np.uint64(24)).astype(np.float64) + 0.5) * 2.0**-40
        radius = np.sqrt(-2.0 * np.log(u)).astype(np.float32)
        theta = _angle32(words & np.uint64((1 << 24) - 1))
        cos = np.cos(np.ascontiguousarray(theta))
        sin = np.sin(np.ascontiguousarray(theta))
        pairs = np.stack([radius * cos, radius * sin], axis=-1)  # float32 products
        out[i] = pairs.reshape(-1)[:width]
    return out


def _angle32(low24):
    """``low24 * 2 pi * 2**-24`` in float32: an exact float32 integer times float32(2 pi 2**-24)."""
    return np.float32(np.asarray(low24, dtype=np.float64)) * np.float32(2.0 * np.pi * 2.0**-24)


def normal_tolerance(seed: int, stream: int, start: int, count: int, width: int) -> np.ndarray:
    """Per-value bound on |float32 implementation - ``normals``|: 8 float32 half-ulps of r.

    Rounding r to float32 (0.5 ulp), float32 cos/sin (numpy: under 4 ulps of a value <= 1),
    the float32 product (0.5 ulp of the result <= r): well inside 8 * 2**-24 * r.
    """
    return radii(seed, stream, start, count, width) * 8 * 2.0**-24


def uniforms(seed: int, stream: int, start: int, count: int, width: int) -> np.ndarray:
    """(count, width) float32 uniforms on (0, 1); exact (every value is a float32).

    The contract does not say which 32-bit half of a word comes first; this takes the low half
    first (numpy's ``.view(np.uint32)`` order on a little-endian machine).
    """
    out = np.empty((count, width), dtype=np.float32)
    for i in range(count):
        halves: list[int] = []
        for word in (int(w) for w in row_words(seed, stream, start + i, _pairs(width))):
            halves += [word & 0xFFFFFFFF, word >> 32]
        out[i] = [((h >> 9) + 0.5) * 2.0**-23 for h in halves[:width]]
    return out


def latents(
    seed: int,
    start: int,
    count: int,
    latent_dim: int,
    temperature: float = 1.0,
    labels=None,
    prior_means=None,
) -> np.ndarray:
    """(count, latent_dim) float32 z = mu_y + temperature * eps (float32 arithmetic).

    ``temperature`` arrives as a protobuf float, so it is a float32; ``prior_means`` is the
    manifest's (num_classes, latent_dim) table, used in float32.
    """
    eps = normals_float32(seed, LATENT_STREAM, start, count, latent_dim)
    z = eps * np.float32(temperature)
    if prior_means is not None:
        z = z + np.asarray(prior_means, dtype=np.float32)[np.asarray(labels, dtype=np.int64)]
    return z.astype(np.float32)


def mixture_latents(
    seed: int,
    start: int,
    count: int,
    means,
    logvars,
    weights,
    temperature: float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """(components (count,), z (count, latent_dim) float32) under a mixture prior."""
    means = np.asarray(means, dtype=np.float32)
    sigmas = np.exp(np.float32(0.5) * np.asarray(logvars, dtype=np.float32))
    cumulative = [0.0]
    for w in np.asarray(weights, dtype=np.float64):
        cumulative.append(cumulative[-1] + float(w))
    total = cumulative[-1]
    u = uniforms(seed, COMPONENT_STREAM, start, count, 1)[:, 0]
    components = np.empty(count, dtype=np.int64)
    for i in range(count):
        k = 0
        while k < len(means) - 1 and not float(u[i]) < cumulative[k + 1] / total:
            k += 1
        components[i] = k
    eps = normals_float32(seed, LATENT_STREAM, start, count, means.shape[1])
    z = means[components] + (sigmas[components] * np.float32(temperature)) * eps
    return components, z.astype(np.float32)
