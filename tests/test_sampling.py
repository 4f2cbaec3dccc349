"""The counter-based noise behind the sampling contract: row i depends on (seed, stream, i) only."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vaeserve.engine import sampling

SEEDS = st.integers(0, sampling.MAX_SEED)


@settings(max_examples=50, deadline=None)
@given(
    seed=SEEDS,
    stream=st.sampled_from([sampling.LATENT_STREAM, sampling.OUTPUT_STREAM]),
    start=st.integers(0, 10**9),
    count=st.integers(1, 40),
    cut=st.integers(0, 40),
    width=st.integers(1, 17),
)
def test_rows_do_not_depend_on_how_a_range_is_cut(seed, stream, start, count, cut, width):
    cut = min(cut, count)
    for draw in (sampling.normal_rows, sampling.uniform_rows):
        whole = draw(seed, stream, start, count, width)
        head = draw(seed, stream, start, cut, width)
        tail = draw(seed, stream, start + cut, count - cut, width)
        np.testing.assert_array_equal(whole, np.concatenate([head, tail]))
        assert whole.shape == (count, width) and whole.dtype == np.float32


def test_known_values_do_not_change_between_releases():
    # Saved jobs and resumed batch runs rely on these exact numbers (on one numpy build and
    # CPU family: float32 trigonometry may differ by an ulp elsewhere); change them only
    # with a new contract version.
    np.testing.assert_array_equal(
        sampling.normal_rows(2024, sampling.LATENT_STREAM, 7, 1, 3),
        np.array([[-1.2603499, 0.21482071, 0.026855187]], dtype=np.float32),
    )
    np.testing.assert_array_equal(
        sampling.uniform_rows(2024, sampling.OUTPUT_STREAM, 7, 1, 3),
        np.array([[0.60661715, 0.57530266, 0.90539867]], dtype=np.float32),
    )


def test_seeds_and_streams_are_independent():
    a = sampling.normal_rows(1, sampling.LATENT_STREAM, 0, 100, 8)
    assert not np.array_equal(a, sampling.normal_rows(2, sampling.LATENT_STREAM, 0, 100, 8))
    assert not np.array_equal(a, sampling.normal_rows(1, sampling.ENCODE_STREAM, 0, 100, 8))
    # Row i of one stream is not row i+1 of the same stream: rows don't overlap.
    assert not np.array_equal(a[1:], sampling.normal_rows(1, sampling.LATENT_STREAM, 0, 99, 8))


def test_noise_has_the_right_distribution():
    z = sampling.normal_rows(5, sampling.LATENT_STREAM, 0, 50_000, 8).ravel()
    assert abs(z.mean()) < 0.01 and abs(z.std() - 1) < 0.01
    assert abs(np.mean(np.abs(z) < 1.0) - 0.6827) < 0.005  # the normal's one-sigma mass
    u = sampling.uniform_rows(5, sampling.OUTPUT_STREAM, 0, 10_000, 40).ravel()
    assert 0 < u.min() and u.max() < 1 and abs(u.mean() - 0.5) < 0.005


def test_prior_latents_scale_noise_by_temperature_around_class_means():
    means = np.array([[10.0, 0.0], [0.0, -10.0]], dtype=np.float32)
    labels = np.array([0, 1, 1])
    eps = sampling.normal_rows(3, sampling.LATENT_STREAM, 4, 3, 2)
    z = sampling.prior_latents(2, 3, 4, 3, 0.5, labels=labels, prior_means=means)
    np.testing.assert_allclose(z, means[labels] + 0.5 * eps, rtol=1e-6)
    np.testing.assert_array_equal(
        sampling.prior_latents(2, 3, 4, 3, 0.0, labels, means), means[labels]
    )
    np.testing.assert_array_equal(sampling.prior_latents(2, 3, 4, 3), eps)


def test_bernoulli_draws_are_binary_with_the_given_probabilities():
    probs = np.full((2000, 1, 4, 4), 0.3, dtype=np.float32)
    x = sampling.draw_from_likelihood("bernoulli", {"probs": probs}, seed=9, start=0)
    assert set(np.unique(x)) <= {0.0, 1.0} and abs(x.mean() - 0.3) < 0.01
    assert x.shape == probs.shape and x.dtype == np.float32


@pytest.mark.parametrize("likelihood", ["gaussian", "gaussian-learned"])
def test_gaussian_draws_add_sigma_times_output_stream_noise(likelihood):
    mean = np.linspace(0, 1, 2 * 6, dtype=np.float32).reshape(2, 1, 2, 3)
    params = {"mean": mean, "log_sigma": np.full_like(mean, np.log(0.2))}
    x = sampling.draw_from_likelihood(likelihood, params, seed=4, start=10, gaussian_sigma=0.2)
    eps = sampling.normal_rows(4, sampling.OUTPUT_STREAM, 10, 2, 6).reshape(mean.shape)
    np.testing.assert_allclose(x, mean + 0.2 * eps, rtol=1e-5, atol=1e-6)


def test_out_of_range_seeds_and_rows_are_refused():
    with pytest.raises(ValueError, match="seed"):
        sampling.normal_rows(-1, 0, 0, 1, 2)
    with pytest.raises(ValueError, match="seed"):
        sampling.normal_rows(sampling.MAX_SEED + 1, 0, 0, 1, 2)
    with pytest.raises(ValueError, match="start"):
        sampling.normal_rows(1, 0, -1, 1, 2)
    with pytest.raises(ValueError, match="start"):
        sampling.uniform_rows(1, 0, sampling.MAX_ROW_INDEX, 1, 2)
    assert sampling.normal_rows(sampling.MAX_SEED, 0, sampling.MAX_ROW_INDEX - 1, 1, 784).shape == (
        1,
        784,
    )


def test_new_seeds_fit_in_a_signed_64_bit_integer():
    seeds = {sampling.new_seed() for _ in range(100)}
    assert len(seeds) == 100 and all(0 <= s < 2**63 for s in seeds)
