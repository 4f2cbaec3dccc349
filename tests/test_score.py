"""The Score RPC: served ELBO / importance-weighted bound / KL against training.losses.

One tiny model per likelihood and per CVAE conditioning is exported and served in-process;
PyTorch is fed the very noise the server draws (``pipeline.score_noise``, the scoring
stream), so the served numbers must equal training's to float32 rounding.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from export_fixtures import digits_info, save_tiny_checkpoint, tiny_config
from serving_fixtures import ServerThread

from vaeserve.client import VaeClient
from vaeserve.engine import Engine, sampling
from vaeserve.engine.pipeline import score_noise
from vaeserve.errors import InvalidRequest
from vaeserve.export.parity import reference_data
from vaeserve.proto.v1 import vaeserve_pb2 as pb
from vaeserve.proto.v1 import vaeserve_pb2_grpc as pb_grpc
from vaeserve.server.settings import BatchingSettings, ServerSettings
from vaeserve.tensors import from_array
from vaeserve.training import losses
from vaeserve.training.checkpoint import load_model

MODELS = {
    "vae-bernoulli": {},
    "vae-gaussian": {"likelihood": "gaussian", "gaussian_sigma": 0.2},
    "vae-gaussian-learned": {"likelihood": "gaussian-learned"},
    "concat-bernoulli": {"kind": "cvae", "conditioning": "concat"},
    "prior-gaussian-learned": {
        "kind": "cvae",
        "conditioning": "prior",
        "likelihood": "gaussian-learned",
    },
    # The VampPrior: log p(z) of the exported mixture and the KL's Monte Carlo estimate.
    "vae-vamp": {"prior": "vamp", "prior_components": 7},
}
MAX_K = 64
MAX_ROWS = 2000
# Small batches, so that k draws of an input span several decoder steps (the running
# logsumexp) and several inputs share one step.
BATCH = 16
TOLERANCE_NATS = 1e-4
T = 30.0


@dataclass(frozen=True)
class Served:
    address: str
    repository: Path
    checkpoints: dict[str, Path]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    from vaeserve.export.onnx_export import export_checkpoint

    root = tmp_path_factory.mktemp("score-repo")
    checkpoints = {}
    for name, overrides in MODELS.items():
        checkpoints[name] = save_tiny_checkpoint(root / f"{name}.pt", tiny_config(**overrides))
        export_checkpoint(checkpoints[name], root / "models", name)
    settings = ServerSettings(
        repository=root / "models",
        port=0,
        device="cpu",
        intra_op_threads=1,
        max_score_samples=MAX_K,
        max_score_rows=MAX_ROWS,
        batching=BatchingSettings(max_batch_size=BATCH),
    )
    server = ServerThread(settings)
    try:
        yield Served(server.address, root / "models", checkpoints)
    finally:
        server.stop(grace_s=1.0)


@pytest.fixture(scope="module")
def stub(served: Served) -> Iterator[pb_grpc.VaeServiceStub]:
    with grpc.insecure_channel(served.address) as channel:
        yield pb_grpc.VaeServiceStub(channel)


def _data(n: int) -> tuple[np.ndarray, np.ndarray]:
    x, y, _ = reference_data(digits_info())
    return x[:n].astype(np.float32), y[:n].astype(np.int64)


def _request(name: str, x: np.ndarray, labels, k: int, seed=None, start: int = 0):
    return pb.ScoreRequest(
        model=pb.ModelRef(name=name),
        x=from_array(x),
        labels=[] if labels is None else list(labels),
        k=k,
        seed=seed,
        start_index=start,
    )


def _torch_scores(checkpoint: Path, x, y, eps: np.ndarray):
    """(elbo, bound, log p(x|z) mean, kl) of training.losses, fed the noise eps (n, k, d)."""
    model, _ = load_model(checkpoint)
    model.eval()
    k = eps.shape[1]
    with torch.no_grad():
        log_w, log_px, kl = losses._log_weights(
            model,
            torch.from_numpy(x),
            None if y is None else torch.from_numpy(y),
            k,
            1.0,
            None,
            torch.from_numpy(np.ascontiguousarray(eps.transpose(1, 0, 2))),
        )
        bound = torch.logsumexp(log_w.double(), dim=0) - math.log(k)
        rec = log_px.double().mean(0)
    return (rec - kl.double()).numpy(), bound.numpy(), rec.numpy(), kl.double().numpy()


@pytest.mark.parametrize("k", [1, 37])
@pytest.mark.parametrize("name", list(MODELS))
def test_served_scores_equal_training_losses(served, stub, name: str, k: int, figure) -> None:
    n, seed, start = 5, 1234, 3
    x, y = _data(n)
    labels = y if name.startswith(("concat", "prior")) else None
    answer = stub.Score(_request(name, x, labels, k, seed, start), timeout=T)
    assert (answer.seed, answer.k, answer.model_version, answer.model_name) == (seed, k, 1, name)
    eps = score_noise(seed, start, n, k, 2)
    elbo, bound, rec, kl = _torch_scores(served.checkpoints[name], x, labels, eps)
    worst = max(
        float(np.abs(np.array(getattr(answer, field)) - expected).max())
        for field, expected in (("kl", kl), ("log_likelihood", rec), ("elbo", elbo),
                                ("log_px", bound))
    )  # fmt: skip
    figure("max_abs_difference_nats", worst)
    np.testing.assert_allclose(answer.kl, kl, rtol=0, atol=TOLERANCE_NATS)
    np.testing.assert_allclose(answer.log_likelihood, rec, rtol=0, atol=TOLERANCE_NATS)
    np.testing.assert_allclose(answer.elbo, elbo, rtol=0, atol=TOLERANCE_NATS)
    np.testing.assert_allclose(answer.log_px, bound, rtol=0, atol=TOLERANCE_NATS)
    # The in-process engine computes the same numbers (it may step differently: 1e-9).
    engine = Engine.open(served.repository, name)
    local = engine.score(x, labels=labels, k=k, seed=seed, start=start)
    np.testing.assert_allclose(local.log_px, answer.log_px, rtol=0, atol=1e-9)
    np.testing.assert_allclose(local.elbo, answer.elbo, rtol=0, atol=1e-9)


def test_a_split_request_gives_the_same_bytes(stub) -> None:
    x, y = _data(9)
    k, seed = 7, 99
    whole = stub.Score(_request("concat-bernoulli", x, y, k, seed), timeout=T)
    head = stub.Score(_request("concat-bernoulli", x[:4], y[:4], k, seed, 0), timeout=T)
    tail = stub.Score(_request("concat-bernoulli", x[4:], y[4:], k, seed, 4), timeout=T)
    for field in ("elbo", "log_px", "log_likelihood", "kl"):
        joined = np.array([*getattr(head, field), *getattr(tail, field)])
        assert np.array_equal(np.array(getattr(whole, field)), joined), field
    again = stub.Score(_request("concat-bernoulli", x, y, k, seed), timeout=T)
    assert again.SerializeToString() == whole.SerializeToString()
    other = stub.Score(_request("concat-bernoulli", x, y, k, seed + 1), timeout=T)
    assert list(other.log_px) != list(whole.log_px)


def test_the_server_chooses_and_returns_a_seed(stub) -> None:
    x, _ = _data(3)
    answer = stub.Score(_request("vae-bernoulli", x, None, 4), timeout=T)
    assert 0 <= answer.seed < 2**63
    again = stub.Score(_request("vae-bernoulli", x, None, 4, answer.seed), timeout=T)
    assert list(again.log_px) == list(answer.log_px)


def test_more_samples_tighten_the_bound_on_average(stub) -> None:
    x, _ = _data(20)
    one = stub.Score(_request("vae-gaussian", x, None, 1, 5), timeout=T)
    many = stub.Score(_request("vae-gaussian", x, None, MAX_K, 5), timeout=T)
    assert np.mean(many.log_px) > np.mean(one.log_px)
    assert np.all(np.array(many.log_px) >= np.array(many.elbo) - 1e-9)  # Jensen, per input


@pytest.mark.parametrize(
    "name, rows, labels, k, message",
    [
        ("vae-bernoulli", 2, None, 0, f"k is 0, expected 1..{MAX_K}"),
        ("vae-bernoulli", 2, None, MAX_K + 1, f"k is {MAX_K + 1}, expected 1..{MAX_K}"),
        ("vae-bernoulli", 40, None, 60, f"= 2400, expected at most {MAX_ROWS}"),
        ("concat-bernoulli", 2, None, 1, "labels holds 0 classes, expected 2"),
        ("prior-gaussian-learned", 2, None, 1, "labels holds 0 classes, expected 2"),
        ("concat-bernoulli", 2, [0, 10], 1, "labels holds class 10, expected classes 0..9"),
        ("vae-bernoulli", 2, [1, 2], 1, "labels holds 2 classes, but vae-bernoulli"),
    ],
)
def test_bad_requests_are_invalid_argument(stub, name, rows, labels, k, message) -> None:
    x, _ = _data(rows)
    with pytest.raises(grpc.RpcError) as info:
        stub.Score(_request(name, x, labels, k, 1), timeout=T)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in info.value.details(), info.value.details()


def test_a_wrong_x_shape_and_start_index_are_invalid_argument(stub) -> None:
    bad = np.zeros((2, 1, 4, 4), dtype=np.float32)
    with pytest.raises(grpc.RpcError) as info:
        stub.Score(_request("vae-bernoulli", bad, None, 1, 1), timeout=T)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "x.shape is [2, 1, 4, 4], expected [n, 1, 8, 8]" in info.value.details()
    x, _ = _data(2)
    start = sampling.MAX_ROW_INDEX
    with pytest.raises(grpc.RpcError) as info:
        stub.Score(_request("vae-bernoulli", x, None, 1, 1, start), timeout=T)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"start_index is {start}, expected 0.." in info.value.details()


def test_model_info_reports_the_score_limits(stub) -> None:
    info = stub.GetModelInfo(pb.GetModelInfoRequest(model=pb.ModelRef(name="vae-bernoulli")))
    assert (info.limits.max_score_samples, info.limits.max_score_rows) == (MAX_K, MAX_ROWS)


def test_client_score(served) -> None:
    x, y = _data(4)
    with VaeClient(served.address) as client:
        result = client.score("prior-gaussian-learned", x, labels=y, k=8, seed=3)
        assert result.k == 8 and result.seed == 3 and result.model_version == 1
        for field in ("elbo", "log_px", "log_likelihood", "kl"):
            values = getattr(result, field)
            assert values.dtype == np.float64 and values.shape == (4,), field
        np.testing.assert_allclose(result.elbo, result.log_likelihood - result.kl, atol=1e-9)
        eps = score_noise(3, 0, 4, 8, 2)
        _, bound, _, _ = _torch_scores(served.checkpoints["prior-gaussian-learned"], x, y, eps)
        np.testing.assert_allclose(result.log_px, bound, rtol=0, atol=TOLERANCE_NATS)
        with pytest.raises(InvalidRequest, match="k is 0, expected 1"):
            client.score("prior-gaussian-learned", x, labels=y, k=0)


def test_served_scores_agree_with_vae_eval_within_monte_carlo_error(served: Served, figure):
    """vae-eval's test NLL (training.evaluate.evaluate_model, torch's own noise) and the mean
    −log_px of the same test split scored through the server (the server's noise) estimate
    one number. The error is bounded from the server's own spread: 6 seeds give 6 estimates
    of the split's mean; torch's single estimate and their mean differ by
    N(0, σ²·(1 + 1/6)) if both are right, so |Δ| must stay under 4·σ·sqrt(7/6)."""
    from vaeserve.training.data import load_dataset
    from vaeserve.training.evaluate import evaluate_model

    k, name = 5, "vae-bernoulli"
    splits = load_dataset("digits", binarize="static")
    x = np.ascontiguousarray(splits.test.x[np.arange(len(splits.test))], np.float32)
    assert len(x) * k <= MAX_ROWS
    model, _ = load_model(served.checkpoints[name])
    torch_nll = evaluate_model(model, splits, k=k, seed=0)["test_nll_nats"]
    with VaeClient(served.address) as client:
        served_nll = np.array(
            [-client.score(name, x, k=k, seed=seed).log_px.mean() for seed in range(1, 7)]
        )
    sigma = served_nll.std(ddof=1)
    difference = abs(torch_nll - served_nll.mean())
    figure("nll_torch_served_sigma", (torch_nll, served_nll.mean(), sigma))
    assert sigma > 0  # six seeds, six estimates: the noise is real
    assert difference < 4 * sigma * math.sqrt(7 / 6), (torch_nll, served_nll, sigma)
