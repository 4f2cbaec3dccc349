"""Drive a running vae-serve with Triton's own gRPC client and print what it saw, as JSON.

Run by test_oip_tritonclient.py in a process of its own: tritonclient ships its own generated
``inference`` protos, which cannot share a process with ours (docs/architecture.md, "A trap").

    python tests/tritonclient_calls.py HOST:PORT MODEL REFERENCE.npz

MODEL is a concat CVAE served as MODEL-encoder / MODEL-decoder; REFERENCE.npz holds the
request tensors (z, y, x) the calls send. Only tritonclient's public API is used.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException


def _infer_decoder(client: grpcclient.InferenceServerClient, model: str, z, y) -> dict[str, Any]:
    inputs = [grpcclient.InferInput("z", list(z.shape), "FP32"),
              grpcclient.InferInput("y", list(y.shape), "INT64")]  # fmt: skip
    inputs[0].set_data_from_numpy(z)
    inputs[1].set_data_from_numpy(y)
    result = client.infer(
        f"{model}-decoder", inputs, outputs=[grpcclient.InferRequestedOutput("probs")],
        request_id="req-42", priority=1, timeout=10_000_000,
        parameters={"note": "ignored by the server"},
    )  # fmt: skip
    response = result.get_response(as_json=True)
    return {"probs": result.as_numpy("probs").tolist(), "response": response}


def _infer_encoder(client: grpcclient.InferenceServerClient, model: str, x, y) -> dict[str, Any]:
    inputs = [grpcclient.InferInput("x", list(x.shape), "FP32"),
              grpcclient.InferInput("y", list(y.shape), "INT64")]  # fmt: skip
    inputs[0].set_data_from_numpy(x)
    inputs[1].set_data_from_numpy(y)
    result = client.infer(f"{model}-encoder", inputs, model_version="1")  # all outputs
    response = result.get_response(as_json=True)
    return {
        "mu": result.as_numpy("mu").tolist(),
        "logvar": result.as_numpy("logvar").tolist(),
        "output_names": [o["name"] for o in response["outputs"]],
        "model_version": response["model_version"],
    }


def _error(call) -> dict[str, str]:
    try:
        call()
    except InferenceServerException as exc:
        return {"status": str(exc.status()), "message": exc.message()}
    return {"status": "OK", "message": ""}


def _bad_shape(client: grpcclient.InferenceServerClient, model: str) -> None:
    z = np.zeros((2, 3), dtype=np.float32)  # latent_dim is 2
    y = np.zeros(2, dtype=np.int64)
    inputs = [grpcclient.InferInput("z", [2, 3], "FP32"), grpcclient.InferInput("y", [2], "INT64")]
    inputs[0].set_data_from_numpy(z)
    inputs[1].set_data_from_numpy(y)
    client.infer(f"{model}-decoder", inputs)


def main(address: str, model: str, reference: str) -> dict[str, Any]:
    data = np.load(reference)
    client = grpcclient.InferenceServerClient(url=address)
    try:
        decoder = f"{model}-decoder"
        return {
            "live": client.is_server_live(),
            "ready": client.is_server_ready(),
            "model_ready": client.is_model_ready(decoder),
            "unknown_model_ready": client.is_model_ready("no-such-model-decoder"),
            "server_metadata": client.get_server_metadata(as_json=True),
            "metadata": client.get_model_metadata(decoder, as_json=True),
            "config": client.get_model_config(decoder, as_json=True),
            "decoder": _infer_decoder(client, model, data["z"], data["y"]),
            "encoder": _infer_encoder(client, model, data["x"], data["y"]),
            "bad_shape": _error(lambda: _bad_shape(client, model)),
            "unknown_model": _error(lambda: client.get_model_metadata("nope-decoder")),
            "statistics": client.get_inference_statistics(decoder, as_json=True),
        }
    finally:
        client.close()


if __name__ == "__main__":
    json.dump(main(*sys.argv[1:4]), sys.stdout)
