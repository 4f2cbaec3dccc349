"""The bench's reference servers (bench/perf_peers) answer ModelInfer as the bench assumes:
the no-op server with zeros of the right shape, the others with the decoder's own outputs, and
the checked thread pool with vae-serve's checks. perf_analyzer itself is not needed here."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from client_fixtures import VAE, tiny_repository

from vaeserve.manifest import load_version_manifest
from vaeserve.proto.inference import grpc_service_pb2 as oip
from vaeserve.proto.inference import grpc_service_pb2_grpc as oip_grpc

PEERS = Path(__file__).resolve().parents[1] / "bench" / "perf_peers"
NAME = f"{VAE}-decoder"
START_S = 60.0


@pytest.fixture(scope="module")
def decoder(tmp_path_factory) -> Path:
    version = tiny_repository(tmp_path_factory) / VAE / "1"
    return version / load_version_manifest(version).decoder.file


@contextmanager
def peer(script: str, decoder: Path) -> Iterator[oip_grpc.GRPCInferenceServiceStub]:
    process = subprocess.Popen(
        [sys.executable, str(PEERS / script), "--onnx", str(decoder), "--name", NAME],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        port = process.stdout.readline().strip()  # the peer prints its port first
        assert port.isdigit(), process.stderr.read() if process.poll() is not None else port
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            grpc.channel_ready_future(channel).result(timeout=START_S)
            yield oip_grpc.GRPCInferenceServiceStub(channel)
    finally:
        process.kill()
        process.communicate(timeout=START_S)


def infer_request(z: np.ndarray) -> oip.ModelInferRequest:
    request = oip.ModelInferRequest(model_name=NAME, raw_input_contents=[z.tobytes()])
    request.inputs.add(name="z", datatype="FP32", shape=z.shape)
    return request


def outputs(response: oip.ModelInferResponse) -> dict[str, np.ndarray]:
    return {
        out.name: np.frombuffer(raw, "<f4").reshape(tuple(out.shape))
        for out, raw in zip(response.outputs, response.raw_output_contents, strict=True)
    }


def expected(decoder: Path, z: np.ndarray) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(str(decoder), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, {"z": z}), strict=True))


@pytest.mark.parametrize(
    "script", ["simple_batcher.py", "thread_pool_server.py", "thread_pool_checked.py"]
)
def test_computing_peers_answer_the_decoders_outputs(decoder, script):
    z = np.random.default_rng(0).standard_normal((3, 2)).astype(np.float32)
    with peer(script, decoder) as stub:
        answer = outputs(stub.ModelInfer(infer_request(z), timeout=30))
        config = stub.ModelConfig(oip.ModelConfigRequest(name=NAME), timeout=30).config
    want = expected(decoder, z)
    assert answer.keys() == want.keys()
    for name, array in want.items():
        np.testing.assert_allclose(answer[name], array, rtol=1e-5, atol=1e-6)
    assert config.name == NAME and [i.name for i in config.input] == ["z"]


def test_the_noop_peer_answers_zeros_of_the_right_shape(decoder):
    z = np.ones((4, 2), np.float32)
    with peer("noop_server.py", decoder) as stub:
        answer = outputs(stub.ModelInfer(infer_request(z), timeout=30))
    for name, array in expected(decoder, z).items():
        assert answer[name].shape == array.shape and not answer[name].any()


def test_the_checked_peer_refuses_what_vae_serve_refuses(decoder):
    z = np.array([[0.0, np.nan]], np.float32)
    with peer("thread_pool_checked.py", decoder) as stub:
        with pytest.raises(grpc.RpcError) as refused:
            stub.ModelInfer(infer_request(z), timeout=30)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "input 'z' holds NaN or Inf" in refused.value.details()
