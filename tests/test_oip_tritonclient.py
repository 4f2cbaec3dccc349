"""Triton's own gRPC client (``tritonclient``), which nobody here wrote, against vae-serve.

Neither runs in the test process: tritonclient's generated ``inference`` protos and ours cannot
share a process (docs/architecture.md, "A trap"). ``vae-serve`` runs as a child process on
127.0.0.1 and tests/tritonclient_calls.py drives it from another, printing what it saw as JSON.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from client_fixtures import CVAE, ServerProcess, tiny_repository
from missing import missing
from serving_fixtures import Reference


@pytest.fixture(autouse=True, scope="module")
def tritonclient_installed() -> None:
    if importlib.util.find_spec("tritonclient") is None:
        missing("tritonclient is not installed (the dev extra installs it)")


CALLS = Path(__file__).with_name("tritonclient_calls.py")
CALLS_TIMEOUT_S = 120.0


@pytest.fixture(scope="module")
def seen(tmp_path_factory):
    """What tritonclient saw, and the onnxruntime reference of the same requests."""
    repository = tiny_repository(tmp_path_factory)
    rng = np.random.default_rng(3)
    data = {
        "z": rng.standard_normal((4, 2)).astype(np.float32),
        "y": np.array([0, 3, 7, 9], dtype=np.int64),
        "x": rng.uniform(0, 1, (4, 1, 8, 8)).astype(np.float32),
    }
    path = tmp_path_factory.mktemp("tritonclient") / "inputs.npz"
    np.savez(path, **data)
    server = ServerProcess(repository)
    try:
        done = subprocess.run(
            [sys.executable, str(CALLS), f"127.0.0.1:{server.port}", CVAE, str(path)],
            capture_output=True, text=True, timeout=CALLS_TIMEOUT_S,
        )  # fmt: skip
    finally:
        server.kill()
    assert done.returncode == 0, done.stderr
    reference = Reference(repository / CVAE / "1")
    return json.loads(done.stdout), data, reference


def test_readiness(seen):
    answers, _, _ = seen
    assert answers["live"] and answers["ready"] and answers["model_ready"]
    assert answers["unknown_model_ready"] is False


def test_server_metadata(seen):
    meta = seen[0]["server_metadata"]
    assert meta["name"] == "vaeserve"
    assert {"model_configuration", "statistics"} <= set(meta["extensions"])


def test_model_metadata(seen):
    meta = seen[0]["metadata"]
    assert meta["name"] == f"{CVAE}-decoder" and meta["versions"] == ["1"]
    inputs = {t["name"]: (t["datatype"], t["shape"]) for t in meta["inputs"]}
    # proto3 JSON spells int64 as strings
    assert inputs == {"z": ("FP32", ["-1", "2"]), "y": ("INT64", ["-1"])}
    assert [(t["name"], t["datatype"]) for t in meta["outputs"]] == [("probs", "FP32")]


def test_model_config(seen):
    answers = seen[0]
    config = answers["config"]["config"]
    assert config["name"] == f"{CVAE}-decoder" and int(config["max_batch_size"]) > 0
    assert "dynamic_batching" in config
    for absent in ("sequence_batching", "ensemble_scheduling", "model_transaction_policy"):
        assert absent not in config
    assert config.get("platform") != "ensemble"
    names = {t["name"] for t in answers["metadata"]["inputs"]}
    assert {i["name"] for i in config["input"]} == names


def test_decoder_infer(seen):
    answers, data, reference = seen
    decoder = answers["decoder"]
    np.testing.assert_allclose(
        np.array(decoder["probs"], np.float32), reference.decode(data["z"], data["y"]),
        rtol=1e-6, atol=1e-7,
    )  # fmt: skip
    response = decoder["response"]
    assert response["id"] == "req-42" and response["model_version"] == "1"
    assert [o["name"] for o in response["outputs"]] == ["probs"]


def test_encoder_infer(seen):
    answers, data, reference = seen
    encoder = answers["encoder"]
    expected = reference.encode(data["x"], data["y"])
    assert encoder["output_names"] == ["mu", "logvar"] and encoder["model_version"] == "1"
    for name in ("mu", "logvar"):
        np.testing.assert_allclose(np.array(encoder[name], np.float32), expected[name],
                                   rtol=1e-6, atol=1e-6)  # fmt: skip


def test_errors(seen):
    answers = seen[0]
    assert answers["bad_shape"]["status"] == "StatusCode.INVALID_ARGUMENT"
    assert "expected [-1, 2]" in answers["bad_shape"]["message"]
    assert answers["unknown_model"]["status"] == "StatusCode.NOT_FOUND"


def test_statistics(seen):
    (stats,) = seen[0]["statistics"]["model_stats"]
    assert stats["name"] == f"{CVAE}-decoder" and stats["version"] == "1"
    # the one successful decoder inference of 4 rows (the bad-shape call never reached it)
    assert int(stats["inference_stats"]["success"]["count"]) == 1
    assert int(stats["inference_count"]) == 4
