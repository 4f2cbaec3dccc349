"""The in-process engine: the served answers without a server, and the server's checks.

A real server (client_fixtures.serve) and an Engine open the same tiny repository; every
answer must be the same bytes, which is the sampling contract across the two front ends.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from client_fixtures import CVAE, VAE, serve

from vaeserve.client import VaeClient
from vaeserve.engine import Engine
from vaeserve.errors import InvalidRequest, ModelNotFound


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    yield from serve(tmp_path_factory)


@pytest.fixture(scope="module")
def client(served):
    with VaeClient(served.address) as c:
        yield c


@pytest.fixture(scope="module")
def cvae(served) -> Engine:
    return Engine.open(served.repository, CVAE)


@pytest.fixture(scope="module")
def vae(served) -> Engine:
    return Engine.open(served.repository, VAE)


@pytest.mark.parametrize("draw", [False, True], ids=["mean", "draw"])
def test_samples_are_the_served_bytes(cvae, client, draw):
    output = "draw" if draw else "mean"
    served = client.sample(CVAE, 37, label=4, seed=11, start_index=5, output=output,
                           return_latents=True)  # fmt: skip
    local = cvae.sample(37, label=4, seed=11, start=5, draw=draw)
    assert local.x.tobytes() == served.samples.tobytes()
    assert local.z.tobytes() == served.latents.tobytes()
    assert local.seed == 11


def test_a_sample_larger_than_one_run_is_the_concatenation_of_its_parts(vae):
    whole = vae.sample(5000, seed=3)  # more rows than one engine run (4096)
    head, tail = vae.sample(4096, seed=3), vae.sample(904, seed=3, start=4096)
    assert whole.x.tobytes() == np.concatenate([head.x, tail.x]).tobytes()


def test_encode_decode_reconstruct_are_the_served_answers(cvae, client):
    x = (np.arange(6 * 64).reshape(6, 1, 8, 8) % 2).astype(np.float32)
    labels = [0, 1, 2, 3, 4, 5]
    served = client.encode(CVAE, x, labels=labels, num_draws=3, seed=9)
    local = cvae.encode(x, labels=labels, num_draws=3, seed=9)
    for name in ("mu", "logvar", "z"):
        assert getattr(local, name).tobytes() == getattr(served, name).tobytes(), name
    z = served.mu
    assert (
        cvae.decode(z, labels=labels, draw=True, seed=2).tobytes()
        == client.decode(CVAE, z, labels=labels, output="draw", seed=2).x.tobytes()
    )
    assert (
        cvae.reconstruct(x, labels=labels).tobytes()
        == client.reconstruct(CVAE, x, labels=labels).tobytes()
    )


def test_an_unseeded_sample_returns_the_seed_it_used(vae):
    first = vae.sample(4)
    assert vae.sample(4, seed=first.seed).x.tobytes() == first.x.tobytes()


def test_it_runs_inside_a_running_event_loop(vae):
    async def in_loop():  # a notebook or an async job calls it from inside its loop
        return vae.sample(3, seed=1).x

    assert asyncio.run(in_loop()).tobytes() == vae.sample(3, seed=1).x.tobytes()


@pytest.mark.parametrize(
    ("call", "message"),
    [
        pytest.param(lambda e: e.sample(2, seed=1), "give exactly one of label and labels",
                     id="cvae-without-label"),
        pytest.param(lambda e: e.sample(2, label=10, seed=1), "label holds class 10",
                     id="label-range"),
        pytest.param(lambda e: e.sample(2, labels=[1], seed=1), "labels holds 1 classes",
                     id="labels-count"),
        pytest.param(lambda e: e.sample(0, label=1), "n is 0", id="no-samples"),
        pytest.param(lambda e: e.sample(2, label=1, seed=-1), "seed is -1", id="seed"),
        pytest.param(lambda e: e.sample(2, label=1, temperature=float("nan")), "temperature",
                     id="temperature"),
        pytest.param(lambda e: e.decode(np.zeros((2, 3)), labels=[0, 0]), "expected [n, 2]",
                     id="z-shape"),
        pytest.param(lambda e: e.decode(np.full((1, 2), np.inf), labels=[0]), "NaN or Inf",
                     id="z-finite"),
        pytest.param(lambda e: e.encode(np.full((1, 1, 8, 8), 2.0), labels=[0]),
                     "value_range", id="x-range"),
        pytest.param(lambda e: e.encode(np.zeros((1, 1, 8, 8))), "labels are missing",
                     id="x-labels"),
    ],
)  # fmt: skip
def test_bad_arguments_are_refused_naming_the_argument(cvae, call, message):
    with pytest.raises(InvalidRequest, match=message.replace("[", r"\[")):
        call(cvae)


def test_unknown_models_and_versions_are_model_not_found(served):
    with pytest.raises(ModelNotFound, match="no model 'nope'"):
        Engine.open(served.repository, "nope")
    with pytest.raises(ModelNotFound, match="published: \\[1\\]"):
        Engine.open(served.repository, VAE, version=7)
