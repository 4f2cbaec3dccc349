"""NAME-sampler (the Open Inference Protocol) against the typed Sample, per call, served.

Run: python bench/bench_sampler.py [--window-s 1] [--sizes 1,1024]

Exports bench_serving's random-weight reference model (MLP decoder 32 -> 512 -> 512 -> 784,
Bernoulli, 1x28x28), starts vae-serve (defaults, CPU) in a subprocess, and for each n times
one closed-loop caller (a raw gRPC stub each, so no client library is measured) doing:
  1. typed: ``VaeService.Sample(seed, start_index=0, num_samples=n)``, samples only;
  2. sampler: ``ModelInfer`` on reference-sampler, ``index`` = 0..n-1 (one run), output
     ``samples`` only: the same rows, the same bytes;
  3. scattered: the same with n distinct indices drawn at random from 0..2**40-1 (n runs of
     one sample each; rows of the sequence no typed call can ask for at once).
Every figure: 0.3 s warm-up, then the best of bench_serving.WINDOWS windows of --window-s;
p50 over all windows. Per n, the three take turns window by window; the ratio is each row's
per-call time over the typed call's.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench_serving import MAX_MESSAGE, WINDOWS, ServerProcess, export_reference_model  # noqa: E402

from vaeserve.proto.inference import grpc_service_pb2 as oip_pb  # noqa: E402
from vaeserve.proto.inference import grpc_service_pb2_grpc as oip_grpc  # noqa: E402
from vaeserve.proto.v1 import vaeserve_pb2 as pb  # noqa: E402
from vaeserve.proto.v1 import vaeserve_pb2_grpc as pb_grpc  # noqa: E402

SEED = 12345


def timed(
    cases: dict[str, Callable[[], object]], window_s: float
) -> dict[str, tuple[float, float]]:
    """Per case, (best window's mean ms per call, p50 ms) of one closed-loop caller; the cases
    take turns window by window, so a drift in a shared machine's load reaches them alike."""
    latencies: dict[str, list[float]] = {label: [] for label in cases}
    best = dict.fromkeys(cases, float("inf"))
    for call in cases.values():
        warm = time.perf_counter() + 0.3
        while time.perf_counter() < warm:
            call()
    for _ in range(WINDOWS):
        for label, call in cases.items():
            start = until = time.perf_counter()
            until += window_s
            count = 0
            while time.perf_counter() < until:
                t = time.perf_counter()
                call()
                latencies[label].append(time.perf_counter() - t)
                count += 1
            best[label] = min(best[label], (time.perf_counter() - start) / count)
    return {
        label: (best[label] * 1e3, statistics.median(latencies[label]) * 1e3) for label in cases
    }


def sampler_request(model: str, index: np.ndarray) -> oip_pb.ModelInferRequest:
    request = oip_pb.ModelInferRequest(model_name=f"{model}-sampler")
    request.inputs.add(name="index", datatype="INT64", shape=[len(index)])
    request.raw_input_contents.append(index.astype("<i8").tobytes())
    request.outputs.add(name="samples")
    request.parameters["seed"].uint64_param = SEED
    return request


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--window-s", type=float, default=1.0)
    parser.add_argument("--sizes", default="1,1024", help="samples per call, comma-separated")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    print(f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} at start")
    rows = []
    with tempfile.TemporaryDirectory(prefix="vaeserve-bench-sampler-") as tmp:
        repository, model = export_reference_model(Path(tmp), name="ref_sampler")
        server = ServerProcess(repository, model, Path(tmp) / "server.log")
        options = [("grpc.max_receive_message_length", MAX_MESSAGE)]
        channel = grpc.insecure_channel(f"127.0.0.1:{server.port}", options=options)
        typed, oip = pb_grpc.VaeServiceStub(channel), oip_grpc.GRPCInferenceServiceStub(channel)
        try:
            deadline = time.monotonic() + 120
            while not oip.ServerReady(oip_pb.ServerReadyRequest(), timeout=10).ready:
                if time.monotonic() > deadline:
                    raise RuntimeError("vae-serve did not load the model within 120 s")
                time.sleep(0.05)
            rng = np.random.default_rng(0)
            for n in sizes:
                ref = pb.ModelRef(name=model)
                sample = pb.SampleRequest(model=ref, num_samples=n, seed=SEED)
                contiguous = sampler_request(model, np.arange(n))
                scattered = sampler_request(model, rng.choice(2**40, n, replace=False))
                # The two protocols answer the same bytes: checked once, not timed.
                want = typed.Sample(sample, timeout=120).samples.data
                assert oip.ModelInfer(contiguous, timeout=120).raw_output_contents[0] == want
                cases = {
                    "typed Sample": lambda s=sample: typed.Sample(s, timeout=120),
                    "sampler 0..n-1": lambda r=contiguous: oip.ModelInfer(r, timeout=120),
                    "sampler scattered": lambda r=scattered: oip.ModelInfer(r, timeout=120),
                }
                figures = timed(cases, args.window_s)
                base = figures["typed Sample"][0]
                rows += [(label, n, ms, p50, ms / base) for label, (ms, p50) in figures.items()]
        finally:
            channel.close()
            server.stop()
    print(f"{'':20}{'n':>6}{'ms/call':>10}{'p50 ms':>10}{'÷ typed':>10}")
    for label, n, ms, p50, ratio in rows:
        print(f"{label:20}{n:>6}{ms:>10.3f}{p50:>10.3f}{ratio:>10.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
