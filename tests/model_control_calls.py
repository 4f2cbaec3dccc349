"""Make Triton's repository calls with its own gRPC client and print what each gave, as JSON.

Run by test_model_control.py in a process of its own: tritonclient ships its own generated
``inference`` protos, which cannot share a process with ours (docs/architecture.md, "A trap").

    python tests/model_control_calls.py '[{"address": "127.0.0.1:8001", "call": "load",
                                           "model": "digits", "config": "{...}"}, ...]'

Calls: index, load (optional ``config``), unload, model_ready, infer (the
decoder of a concat CVAE, one row) and server_ready; ``token`` sends a bearer token. Each
result is {"ok": value} or {"status": ..., "message": ...}. Only tritonclient's public API is
used, the way Triton's users call it.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

TIMEOUT_S = 30.0


def _infer(client: grpcclient.InferenceServerClient, model: str, headers) -> str:
    inputs = [grpcclient.InferInput("z", [1, 2], "FP32"), grpcclient.InferInput("y", [1], "INT64")]
    inputs[0].set_data_from_numpy(np.zeros((1, 2), dtype=np.float32))
    inputs[1].set_data_from_numpy(np.array([3], dtype=np.int64))
    result = client.infer(model, inputs, headers=headers, client_timeout=TIMEOUT_S)
    return result.get_response(as_json=True)["model_version"]


def _call(client: grpcclient.InferenceServerClient, step: dict[str, Any]) -> Any:
    token = step.get("token")
    headers = {"authorization": f"Bearer {token}"} if token else None
    call, model = step["call"], step.get("model", "")
    if call == "index":
        index = client.get_model_repository_index(headers=headers, as_json=True)
        return index.get("models", [])
    if call == "load":
        return client.load_model(model, headers=headers, config=step.get("config"),
                                 client_timeout=TIMEOUT_S)  # fmt: skip
    if call == "unload":
        return client.unload_model(model, headers=headers, unload_dependents=True,
                                   client_timeout=TIMEOUT_S)  # fmt: skip
    if call == "model_ready":
        return client.is_model_ready(model, headers=headers, client_timeout=TIMEOUT_S)
    if call == "server_ready":
        return client.is_server_ready(headers=headers, client_timeout=TIMEOUT_S)
    if call == "infer":
        return _infer(client, model, headers)
    raise ValueError(f"unknown call {call!r}")


def main(steps: list[dict[str, Any]]) -> list[dict[str, Any]]:
    clients: dict[str, grpcclient.InferenceServerClient] = {}
    results = []
    try:
        for step in steps:
            address = step["address"]
            if address not in clients:
                clients[address] = grpcclient.InferenceServerClient(url=address)
            try:
                results.append({"ok": _call(clients[address], step)})
            except InferenceServerException as exc:
                results.append({"status": str(exc.status()), "message": exc.message()})
    finally:
        for client in clients.values():
            client.close()
    return results


if __name__ == "__main__":
    json.dump(main(json.loads(sys.argv[1])), sys.stdout)
