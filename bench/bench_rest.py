"""What a REST call of the Open Inference Protocol costs against the same call over gRPC.

Run: python bench/bench_rest.py [--repository DIR --model NAME] [--window-s 1]

Without --repository it exports bench_serving's random-weight reference model (MLP decoder
32 -> 512 -> 512 -> 784, 1x28x28), which needs the train extra (torch) in this process only.
Then one ``vae-serve`` subprocess (CPU, gRPC and REST on free ports) answers NAME-decoder at
batch 1 and 1024, one call at a time from one client in this process, over:
  - gRPC ModelInfer with raw_input_contents (our stubs, one channel);
  - REST with Triton's binary tensor data in and out (http.client, one keep-alive connection);
  - REST with JSON ``data`` in and out (flat, row-major), the answer parsed into numpy.
Each figure is the best of 3 windows. It prints calls/s, p50 latency, and the server's and
this client's CPU time per call (Linux /proc), each path as a ratio to gRPC's.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from bench_serving import (  # noqa: E402
    MAX_MESSAGE,
    START_TIMEOUT_S,
    ServerProcess,
    export_reference_model,
    process_cpu_s,
)

from vaeserve.proto.inference import grpc_service_pb2 as pb  # noqa: E402
from vaeserve.proto.inference import grpc_service_pb2_grpc as pb_grpc  # noqa: E402

SIZES = (1, 1024)
WINDOWS = 3
PATHS = ("gRPC ModelInfer", "REST binary", "REST JSON")


@dataclass
class Row:
    path: str
    n: int
    rate: float  # calls/s
    p50_ms: float
    server_cpu_us: float  # server process CPU per call
    client_cpu_us: float  # this process's CPU per call


def _rest_port(server: ServerProcess) -> int:
    return server.logged_port(r"REST listening on http://\S+:(\d+)")


def _wait_ready(connection: http.client.HTTPConnection) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        connection.request("GET", "/v2/health/ready")
        answer = connection.getresponse()
        answer.read()
        if answer.status == 200:
            return
        time.sleep(0.1)
    raise RuntimeError("vae-serve did not get ready")


def grpc_call(stub, model: str, z: np.ndarray) -> Callable[[], np.ndarray]:
    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name="z", datatype="FP32", shape=z.shape)
    request.raw_input_contents.append(z.tobytes())

    def run() -> np.ndarray:
        response = stub.ModelInfer(request, timeout=60)
        output = response.outputs[0]
        return np.frombuffer(response.raw_output_contents[0], "<f4").reshape(output.shape)

    return run


def rest_call(connection: http.client.HTTPConnection, model: str, z: np.ndarray,
              binary: bool) -> Callable[[], np.ndarray]:  # fmt: skip
    path = f"/v2/models/{model}/infer"
    if binary:
        header = json.dumps({
            "inputs": [{"name": "z", "datatype": "FP32", "shape": list(z.shape),
                        "parameters": {"binary_data_size": z.nbytes}}],
            "parameters": {"binary_data_output": True},
        }).encode()  # fmt: skip
        body = header + z.tobytes()
        headers = {"Inference-Header-Content-Length": str(len(header))}
    else:
        document = {"inputs": [{"name": "z", "datatype": "FP32", "shape": list(z.shape),
                                "data": z.ravel().tolist()}]}  # fmt: skip
        body, headers = json.dumps(document).encode(), {}

    def run() -> np.ndarray:
        connection.request("POST", path, body, headers)
        answer = connection.getresponse()
        data = answer.read()
        assert answer.status == 200, data[:300]
        length = answer.headers.get("Inference-Header-Content-Length")
        if length is None:
            output = json.loads(data)["outputs"][0]
            return np.asarray(output["data"], np.float32).reshape(output["shape"])
        output = json.loads(data[: int(length)])["outputs"][0]
        return np.frombuffer(data, "<f4", offset=int(length)).reshape(output["shape"])

    return run


def measure(run: Callable[[], np.ndarray], pid: int, window_s: float) -> tuple[float, ...]:
    """(calls/s, p50 ms, server CPU us/call, client CPU us/call) of one window."""
    for _ in range(3):
        run()
    latencies = []
    server0, client0 = process_cpu_s(pid), time.process_time()
    start = time.perf_counter()
    while time.perf_counter() - start < window_s or len(latencies) < 3:
        t = time.perf_counter()
        run()
        latencies.append(time.perf_counter() - t)
    elapsed = time.perf_counter() - start
    calls = len(latencies)
    return (calls / elapsed, statistics.median(latencies) * 1e3,
            (process_cpu_s(pid) - server0) / calls * 1e6,
            (time.process_time() - client0) / calls * 1e6)  # fmt: skip


def run_bench(repository: Path, model: str, window_s: float, tmp: Path) -> list[Row]:
    server = ServerProcess(repository, model, tmp / "server.log", "--http-port", "0")
    try:
        port = _rest_port(server)
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        _wait_ready(connection)
        options = [("grpc.max_receive_message_length", MAX_MESSAGE),
                   ("grpc.max_send_message_length", MAX_MESSAGE)]  # fmt: skip
        rows = []
        with grpc.insecure_channel(f"127.0.0.1:{server.port}", options=options) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            decoder = f"{model}-decoder"
            for n in SIZES:
                z = np.random.default_rng(n).standard_normal((n, 32)).astype(np.float32)
                calls = {
                    "gRPC ModelInfer": grpc_call(stub, decoder, z),
                    "REST binary": rest_call(connection, decoder, z, binary=True),
                    "REST JSON": rest_call(connection, decoder, z, binary=False),
                }
                answers = {path: run() for path, run in calls.items()}
                for path in PATHS[1:]:  # the three paths answer the same bytes
                    assert answers[path].tobytes() == answers[PATHS[0]].tobytes(), path
                for path in PATHS:
                    best = max((measure(calls[path], server.process.pid, window_s)
                                for _ in range(WINDOWS)), key=lambda m: m[0])  # fmt: skip
                    rows.append(Row(path, n, *best))
        connection.close()
        return rows
    finally:
        server.stop()


def print_table(rows: list[Row]) -> None:
    base = {r.n: r for r in rows if r.path == PATHS[0]}
    print()
    print("| path | batch | calls/s | p50 ms | server CPU us/call | client CPU us/call "
          "| p50 / gRPC | server CPU / gRPC |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        b = base[r.n]
        print(f"| {r.path} | {r.n} | {r.rate:,.0f} | {r.p50_ms:.2f} | {r.server_cpu_us:,.0f} "
              f"| {r.client_cpu_us:,.0f} | {r.p50_ms / b.p50_ms:.2f} "
              f"| {r.server_cpu_us / b.server_cpu_us:.2f} |")  # fmt: skip


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repository", type=Path, help="an existing model repository")
    parser.add_argument("--model", help="the model to serve from --repository (latent 32)")
    parser.add_argument(
        "--window-s", type=float, default=1.0, help=f"seconds per window ({WINDOWS} per figure)"
    )
    args = parser.parse_args(argv)
    if (args.repository is None) != (args.model is None):
        parser.error("--repository and --model go together")
    with tempfile.TemporaryDirectory(prefix="vaeserve-bench-rest-") as tmp:
        if args.repository is None:
            repository, model = export_reference_model(Path(tmp))
        else:
            repository, model = args.repository, args.model
        print(f"model {model}; {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}")
        rows = run_bench(repository, model, args.window_s, Path(tmp))
    print_table(rows)
    print(f"load average {os.getloadavg()[0]:.1f} at the end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
