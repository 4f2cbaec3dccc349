"""The sampling contract (docs/architecture.md) against an independent reference.

tests/sampling_oracle.py is written from the documented contract with numpy's raw Philox
words and a hand-written Box-Muller; nothing here takes expected noise from
vaeserve.engine.sampling. Checked: the engine's public noise functions and the latents a
real server returns from Sample (return_latents).

Comparisons (which the contract allows):
- uniforms: exact; every value ((half >> 9) + 0.5) * 2**-23 is a float32.
- normals against the float64 evaluation of the contract: within 8 float32 half-ulps of the
  radius, since the contract fixes u (float64) and the angle (float32) but not the precision
  of cos/sin or of r * cos t.
- normals and served z against the float32 pipeline that docs/performance.md adds (radius
  rounded to float32, float32 cos/sin and products): exact, as the contract's reproducibility
  promise ("the same bytes") requires on one numpy build and CPU family.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import sampling_oracle as oracle
from serving_fixtures import array, channel

from vaeserve.engine import sampling
from vaeserve.proto.v1 import vaeserve_pb2 as pb
from vaeserve.proto.v1 import vaeserve_pb2_grpc as pb_grpc

T = 30.0  # timeout of one call; never reached when tests pass
TOP = 2**64 - 1
# (seed, stream, start, count, width): large seeds, starts that are not multiples of 4,
# widths whose rows need 1, 2 or 3 counter blocks, ranges crossing block boundaries, and a
# start near the last allowed row (the counter of a row then needs more than 32 bits).
CASES = [
    (0, 0, 0, 1, 1),
    (2024, 0, 7, 3, 3),
    (TOP, 0, 5, 9, 2),
    (TOP, 1, 13, 11, 17),
    (TOP - 1, 2, 3, 6, 9),
    (2**63, 0, 1, 7, 8),
    (2**63 - 1, 1, 6, 5, 16),
    (123456789, 0, 2**40 - 5, 5, 17),
    (98765, 2, 10**9 + 3, 4, 784),
]
IDS = [f"seed{s}-stream{k}-start{a}-n{n}-w{w}" for s, k, a, n, w in CASES]


def test_numpy_philox_counter_means_the_next_cipher_block():
    # Pins what "row i starts at counter i * B" means for the cipher: numpy's Philox at state
    # counter c yields the blocks of counters c + 1, c + 2, ... (it steps before each block).
    for seed, stream, row, words in [(TOP, 0, 5, 1), (2**63 + 11, 2, 2**40 - 1, 9), (3, 1, 0, 4)]:
        blocks = oracle.blocks_per_row(words)
        expected = []
        for b in range(blocks):
            expected += oracle.philox4x64_block((seed, stream), row * blocks + 1 + b)
        assert [int(w) for w in oracle.row_words(seed, stream, row, words)] == expected


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_normal_rows_follow_the_contract(case):
    got = sampling.normal_rows(*case)
    assert got.shape == case[3:] and got.dtype == np.float32
    error = np.abs(got.astype(np.float64) - oracle.normals(*case))
    bound = oracle.normal_tolerance(*case)
    assert np.all(error <= bound), f"worst error / bound: {np.max(error / bound):.3g}"
    np.testing.assert_array_equal(got, oracle.normals_float32(*case))


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_uniform_rows_follow_the_contract(case):
    got = sampling.uniform_rows(*case)
    assert got.shape == case[3:] and got.dtype == np.float32
    np.testing.assert_array_equal(got, oracle.uniforms(*case))


@pytest.mark.parametrize(
    ("seed", "start", "count", "dim", "temperature"),
    [(TOP, 3, 10, 2, 1.0), (2**63 + 5, 1, 6, 9, 0.7), (42, 2**40 - 4, 4, 5, 1.3)],
)
def test_prior_latents_follow_the_contract(seed, start, count, dim, temperature):
    t = float(np.float32(temperature))  # the value a request's protobuf float carries
    means = np.linspace(-3.0, 3.0, 4 * dim, dtype=np.float32).reshape(4, dim)
    labels = np.arange(count) % 4
    np.testing.assert_array_equal(
        sampling.prior_latents(dim, seed, start, count, t),
        oracle.latents(seed, start, count, dim, t),
    )
    np.testing.assert_array_equal(
        sampling.prior_latents(dim, seed, start, count, t, labels=labels, prior_means=means),
        oracle.latents(seed, start, count, dim, t, labels=labels, prior_means=means),
    )


@pytest.mark.parametrize(
    ("seed", "start", "count", "temperature"),
    [(TOP, 3, 40, 1.0), (2**63 + 5, 1, 25, 0.7), (42, 2**40 - 30, 30, 1.3)],
)
def test_mixture_prior_latents_follow_the_contract(seed, start, count, temperature):
    t = float(np.float32(temperature))
    rng = np.random.default_rng(7)
    means = rng.normal(0.0, 3.0, (6, 5)).astype(np.float32)
    logvars = rng.normal(-1.0, 0.5, (6, 5)).astype(np.float32)
    weights = np.array([0.05, 0.3, 0.0, 0.25, 0.15, 0.25])  # a zero weight is never drawn
    mixture = sampling.MixturePrior(means, logvars, weights)
    components, expected = oracle.mixture_latents(seed, start, count, means, logvars, weights, t)
    np.testing.assert_array_equal(mixture.choose(seed, start, count), components)
    assert 2 not in components
    np.testing.assert_array_equal(
        sampling.prior_latents(5, seed, start, count, t, mixture=mixture), expected
    )


# --- the latents a real server returns ---------------------------------------------------

# name -> tiny_config overrides: the standard-normal prior (latent 2: one counter block a
# row), a prior CVAE with a wider latent (9: two blocks a row; z = class mean + t * eps) and a
# VampPrior VAE. Three exports only: each costs seconds, and the module must stay under 20 s.
MODELS = {
    "vae": {},
    "prior": {"kind": "cvae", "conditioning": "prior", "latent_dim": 9},
    # A VampPrior VAE: z = m_c + t * sigma_c * eps, c drawn from the component stream.
    "vamp": {"prior": "vamp", "prior_components": 5, "latent_dim": 3},
}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from export_fixtures import save_tiny_checkpoint, tiny_config
    from serving_fixtures import ServerThread

    from vaeserve.export.onnx_export import export_checkpoint
    from vaeserve.server.settings import ServerSettings

    work = tmp_path_factory.mktemp("contract-repo")
    for name, overrides in MODELS.items():
        checkpoint = save_tiny_checkpoint(work / f"{name}.pt", tiny_config(**overrides))
        export_checkpoint(checkpoint, work / "models", name, version=1)
    settings = ServerSettings(repository=work / "models", port=0, device="cpu", intra_op_threads=1)
    server = ServerThread(settings)
    try:
        with channel(server.address) as ch:
            yield pb_grpc.VaeServiceStub(ch), work / "models"
    finally:
        server.stop(grace_s=1.0)


def _manifest(repository: Path, name: str) -> dict:
    return json.loads((repository / name / "1" / "manifest.json").read_text())


def _sample(stub, name: str, **fields) -> pb.SampleResponse:
    request = pb.SampleRequest(model=pb.ModelRef(name=name), return_latents=True, **fields)
    return stub.Sample(request, timeout=T)


@pytest.mark.parametrize(
    ("name", "seed", "start", "count", "temperature"),
    [
        ("vae", TOP, 0, 7, None),
        ("vae", TOP - 2, 5, 13, 0.5),
        ("vae", 2**63 + 1, 2**40 - 3, 3, 2.0),
    ],
)
def test_served_latents_are_temperature_times_contract_noise(
    served, name, seed, start, count, temperature
):
    stub, repository = served
    fields = {} if temperature is None else {"temperature": temperature}
    answer = _sample(stub, name, num_samples=count, seed=seed, start_index=start, **fields)
    assert (answer.seed, answer.start_index) == (seed, start)
    dim = _manifest(repository, name)["latent_dim"]
    t = 1.0 if temperature is None else float(np.float32(temperature))
    # Exact: the noise (see the module docstring) and one float32 product per value.
    np.testing.assert_array_equal(array(answer.latents), oracle.latents(seed, start, count, dim, t))


def test_served_prior_cvae_latents_are_class_means_plus_scaled_noise(served):
    stub, repository = served
    manifest = _manifest(repository, "prior")
    means = np.array(manifest["prior_means"], dtype=np.float32)
    dim = manifest["latent_dim"]
    labels = [3, 0, 9, 9, 1, 5, 7]
    for seed, start, t in [(TOP - 7, 2**33 + 1, 0.75), (TOP, 3, None), (2**63, 1001, 0.25)]:
        fields = {} if t is None else {"temperature": t}
        answer = _sample(
            stub,
            "prior",
            num_samples=len(labels),
            seed=seed,
            start_index=start,
            labels=labels,
            **fields,
        )
        t32 = 1.0 if t is None else float(np.float32(t))
        expected = oracle.latents(seed, start, len(labels), dim, t32, labels, means)
        # Exact: the noise (see the module docstring), a float32 product and a float32 sum.
        np.testing.assert_array_equal(array(answer.latents), expected)
    # One label for every sample (SampleRequest.label) gives the same as repeating it.
    answer = _sample(stub, "prior", num_samples=5, seed=11, start_index=6, label=4)
    expected = oracle.latents(11, 6, 5, dim, 1.0, [4] * 5, means)
    np.testing.assert_array_equal(array(answer.latents), expected)


def test_served_mixture_prior_latents_follow_the_contract(served):
    stub, repository = served
    manifest = _manifest(repository, "vamp")
    assert manifest["format_version"] == 2 and manifest["prior"]["components"] == 5
    with np.load(repository / "vamp" / "1" / manifest["prior"]["file"]) as prior:
        means, logvars, weights = prior["means"], prior["logvars"], prior["weights"]
    for seed, start, count, t in [(TOP, 0, 9, None), (2**63 + 3, 2**35 + 1, 12, 0.5)]:
        fields = {} if t is None else {"temperature": t}
        answer = _sample(stub, "vamp", num_samples=count, seed=seed, start_index=start, **fields)
        t32 = 1.0 if t is None else float(np.float32(t))
        _, expected = oracle.mixture_latents(seed, start, count, means, logvars, weights, t32)
        np.testing.assert_array_equal(array(answer.latents), expected)
    # Row i of a seed is the same whichever request holds it.
    whole = array(_sample(stub, "vamp", num_samples=10, seed=5, start_index=0).latents)
    tail = array(_sample(stub, "vamp", num_samples=4, seed=5, start_index=6).latents)
    np.testing.assert_array_equal(whole[6:], tail)
