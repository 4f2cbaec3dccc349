"""VaeClient.interpolate and its latent paths (client/interpolation.py), against a real server."""

from __future__ import annotations

import numpy as np
import pytest
from client_fixtures import serve

from vaeserve.client import RetryPolicy, VaeClient
from vaeserve.client.interpolation import (
    MAX_STEPS,
    latent_path,
    linear_path,
    spherical_path,
)

FAST = RetryPolicy(initial_backoff_s=0.001, max_backoff_s=0.002, deadline_s=5.0)

# --- the paths, in numpy ------------------------------------------------------------------


def test_linear_path_ends_and_midpoint():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=5), rng.normal(size=5)
    points = latent_path(a, b, 5, "linear")
    assert points.shape == (5, 5)
    np.testing.assert_array_equal(points[0], a)
    np.testing.assert_array_equal(points[-1], b)
    np.testing.assert_allclose(points[2], (a + b) / 2, atol=1e-12)


def test_slerp_keeps_the_norm_of_equal_norm_endpoints():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=8), rng.normal(size=8)
    b *= np.linalg.norm(a) / np.linalg.norm(b)
    points = latent_path(a, b, 11, "spherical")
    np.testing.assert_allclose(np.linalg.norm(points, axis=1), np.linalg.norm(a), rtol=1e-12)
    np.testing.assert_array_equal(points[0], a)
    np.testing.assert_array_equal(points[-1], b)
    # Equal angular steps: consecutive points are equally far apart.
    gaps = np.linalg.norm(np.diff(points, axis=0), axis=1)
    np.testing.assert_allclose(gaps, gaps[0], rtol=1e-9)
    # and it is not the linear path, which dips inside the sphere.
    assert np.linalg.norm(latent_path(a, b, 11, "linear")[5]) < np.linalg.norm(a) - 1e-3


@pytest.mark.parametrize(
    "a, b",
    [
        ([1.0, 2.0, -1.0], [3.0, 6.0, -3.0]),  # same direction, different norms
        ([1.0, 2.0, -1.0], [1.0, 2.0, -1.0]),  # identical
        ([1.0, 2.0, -1.0], [-2.0, -4.0, 2.0]),  # opposite: slerp undefined
        ([0.0, 0.0, 0.0], [1.0, 0.0, 0.0]),  # a zero end: no direction
    ],
    ids=["same-direction", "identical", "opposite", "zero"],
)
def test_slerp_falls_back_to_linear_where_the_angle_is_degenerate(a, b):
    t = np.linspace(0, 1, 7)
    np.testing.assert_array_equal(spherical_path(a, b, t), linear_path(a, b, t))


def test_slerp_is_close_to_linear_for_a_tiny_angle():
    a = np.array([1.0, 0.0])
    b = np.array([1.0, 1e-9])
    np.testing.assert_allclose(
        latent_path(a, b, 5, "spherical"), latent_path(a, b, 5, "linear"), atol=1e-12
    )


@pytest.mark.parametrize(
    "args, argument",
    [
        (([1.0], [2.0], 1, "linear"), "steps"),
        (([1.0], [2.0], MAX_STEPS + 1, "linear"), "steps"),
        (([1.0], [2.0], 2.0, "linear"), "steps"),
        (([1.0], [2.0], True, "linear"), "steps"),
        (([1.0], [2.0], 3, "cubic"), "path"),
        (([1.0], [2.0, 3.0], 3, "linear"), "b"),
        (([[1.0]], [[2.0]], 3, "linear"), "a"),
        (([np.nan], [2.0], 3, "spherical"), "a, b"),
    ],
)
def test_path_arguments_are_checked(args, argument):
    with pytest.raises(ValueError, match=f"^{argument}:"):
        latent_path(*args)


# --- VaeClient.interpolate against a real server ------------------------------------------


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    yield from serve(tmp_path_factory)


@pytest.fixture
def client(served):
    with VaeClient(served.address, retry=FAST) as c:
        yield c


@pytest.fixture
def pair(client, served):
    """Two inputs of the tiny VAE: samples of it, so in its value range."""
    x = client.sample(served.vae, 2, seed=3).samples
    return x[0], x[1]


@pytest.mark.parametrize("path", ["linear", "spherical"])
def test_vae_interpolation_ends_decode_the_endpoint_means(client, served, pair, path):
    x_a, x_b = pair
    result = client.interpolate(served.vae, x_a, x_b, 7, path=path)
    assert result.images.shape == (7, 1, 8, 8) and result.images.dtype == np.float32
    assert result.latents.shape == (7, 2) and result.latents.dtype == np.float32
    assert (result.model_name, result.model_version, result.path) == (served.vae, 1, path)
    assert result.label is None
    np.testing.assert_allclose(result.t, np.linspace(0, 1, 7))
    mu = client.encode(served.vae, np.stack([x_a, x_b])).mu
    np.testing.assert_array_equal(result.latents[[0, -1]], mu)
    ends = client.decode(served.vae, mu).x
    np.testing.assert_allclose(result.images[[0, -1]], ends, atol=1e-6)
    # Every image is the decode of its latent.
    np.testing.assert_allclose(
        result.images, client.decode(served.vae, result.latents).x, atol=1e-6
    )


def test_linear_midpoint_is_the_mean_of_the_endpoint_latents(client, served, pair):
    result = client.interpolate(served.vae, *pair, 5, path="linear")
    np.testing.assert_allclose(
        result.latents[2], (result.latents[0] + result.latents[-1]) / 2, atol=1e-6
    )
    np.testing.assert_allclose(np.diff(result.latents, 2, axis=0), 0.0, atol=1e-6)


def test_inputs_may_carry_a_batch_axis_of_one(client, served, pair):
    x_a, x_b = pair
    plain = client.interpolate(served.vae, x_a, x_b, 3)
    batched = client.interpolate(served.vae, x_a[None], x_b[None], 3)
    np.testing.assert_array_equal(plain.images, batched.images)


def test_cvae_interpolation_uses_one_label_for_ends_and_path(client, served):
    x = client.sample(served.cvae, 2, labels=[4, 4], seed=5).samples
    result = client.interpolate(served.cvae, x[0], x[1], 4, labels=4, path="spherical")
    assert result.label == 4
    mu = client.encode(served.cvae, x, labels=[4, 4]).mu
    np.testing.assert_array_equal(result.latents[[0, -1]], mu)
    np.testing.assert_allclose(
        result.images, client.decode(served.cvae, result.latents, labels=[4] * 4).x, atol=1e-6
    )
    same = client.interpolate(served.cvae, x[0], x[1], 4, labels=[4], path="spherical")
    np.testing.assert_array_equal(same.images, result.images)


@pytest.mark.parametrize(
    "model, kwargs, argument",
    [
        ("cvae", {}, "labels"),
        ("cvae", {"labels": [1, 2]}, "labels"),
        ("cvae", {"labels": 10}, "labels"),
        ("cvae", {"labels": 1.5}, "labels"),
        ("vae", {"labels": 1}, "labels"),
        ("vae", {"steps": 1}, "steps"),
        ("vae", {"steps": MAX_STEPS + 1}, "steps"),
        ("vae", {"path": "geodesic"}, "path"),
        ("vae", {"x_a": np.zeros((8, 8))}, "x_a"),
        ("vae", {"x_b": np.zeros((2, 1, 8, 8))}, "x_b"),
        ("vae", {"x_a": np.full((1, 8, 8), np.inf)}, "x_a"),
    ],
)
def test_bad_arguments_raise_value_errors_naming_them(client, served, model, kwargs, argument):
    call = {"x_a": np.zeros((1, 8, 8)), "x_b": np.ones((1, 8, 8)), "steps": 3, **kwargs}
    name = served.cvae if model == "cvae" else served.vae
    with pytest.raises(ValueError, match=f"^{argument}:"):
        client.interpolate(name, call.pop("x_a"), call.pop("x_b"), call.pop("steps"), **call)
