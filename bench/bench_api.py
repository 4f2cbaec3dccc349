"""Typed Encode and Sample, served, against onnxruntime in-process, for an MLP and a conv model.

Run: python bench/bench_api.py [--window-s 0.5] [--models mlp,conv] [--full]

Reuses bench_serving's helpers (export, in-process decoder rates, the server subprocess, the
Sample driver). For each random-weight reference model (exported with the real exporter):
  mlp:  the reference model's 32 -> 512 -> 512 -> 784 MLP (encoder 784 -> 512 -> 512 -> 2x32);
  conv: training's conv arch, stride-2 convolutions of 32 and 64 channels, 1x28x28;
it measures
  1. the decoder and the encoder in-process (the server's OnnxRunner; the better of one
     multi-threaded run at a time and one single-threaded run per core) at n = 1/64/1024/4096;
  2. vae-serve (default settings): Sample (fp32) at n = 1/64/1024/4096 with 1, 4 and 32
     concurrent clients; then Encode (fp32 x, num_draws 0) at the same n and clients;
  3. the MLP's Sample n = 1 x 32 clients with batching on (defaults) and off
     (--max-batch-size 1 --max-queue-delay-ms 0); --batching-only runs just this.
The conv model's n >= 1024 with 32 clients is skipped unless --full (one round of 32 x 4096
conv rows takes many seconds on 2 cores). Each figure: best of bench_serving.WINDOWS windows
of --window-s after a 0.5 s warm-up; latencies pooled. Ratio: served rate ÷ in-process rate.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_serving import (  # noqa: E402
    MAX_MESSAGE,
    SIZES,
    WINDOWS,
    Row,
    ServerProcess,
    export_reference_model,
    in_process_graph_rates,
    in_process_rates,
    process_cpu_s,
    serve_and_drive,
    wait_ready,
)

from vaeserve.client.tensors import (
    AnswerStub,  # noqa: E402
    Outgoing,  # noqa: E402
)
from vaeserve.proto.v1 import vaeserve_pb2 as pb  # noqa: E402
from vaeserve.server.memory import keep_freed_memory  # noqa: E402

CLIENTS = (1, 4, 32)


def inputs(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 1, 28, 28), dtype=np.float32)


def in_process_encoder(encoder: Path, window_s: float) -> dict[int, Row]:
    return in_process_graph_rates(encoder, lambda n: {"x": inputs(n)}, window_s, "encoder")


async def drive_encode(stub, model: str, n: int, clients: int, window_s: float, pid: int) -> Row:
    """Closed-loop Encode callers; the same protocol as bench_serving.drive. Each call sends x
    as VaeClient.encode does (``Outgoing``: serialized per call, the array appended)."""
    request = Outgoing(pb.EncodeRequest(model=pb.ModelRef(name=model)), {"x": inputs(n, 1)})
    latencies: list[float] = []

    async def client(until: float, record: bool) -> int:
        calls = 0
        while time.perf_counter() < until:
            start = time.perf_counter()
            answer = await stub.Encode(request, timeout=120)
            answer.tensor("mu")  # the arrays a user gets (views of the received bytes)
            answer.tensor("logvar")
            if record:
                latencies.append(time.perf_counter() - start)
            calls += 1
        return calls

    await asyncio.gather(*(client(time.perf_counter() + 0.5, False) for _ in range(clients)))
    cpu = (process_cpu_s(pid), time.process_time())
    best = 0.0
    for _ in range(WINDOWS):
        start = time.perf_counter()
        counts = await asyncio.gather(*(client(start + window_s, True) for _ in range(clients)))
        best = max(best, sum(counts) * n / (time.perf_counter() - start))
    q = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else latencies * 99
    row = Row("Encode fp32", n, clients, best, q[49] * 1e3, q[98] * 1e3)
    row.server_cpu_us = (process_cpu_s(pid) - cpu[0]) / len(latencies) * 1e6
    row.client_cpu_us = (time.process_time() - cpu[1]) / len(latencies) * 1e6
    return row


async def encode_rows(server: ServerProcess, model: str, cases, window_s: float) -> list[Row]:
    options = [
        ("grpc.max_receive_message_length", MAX_MESSAGE),
        ("grpc.max_send_message_length", MAX_MESSAGE),
    ]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}", options=options) as ch:
        stub = AnswerStub(ch)
        await wait_ready(stub, model)
        return [
            await drive_encode(stub, model, n, c, window_s, server.process.pid) for n, c in cases
        ]


def measure(arch: str, root: Path, args) -> list[Row]:
    from vaeserve.manifest import load_version_manifest

    repository, model = export_reference_model(root, arch=arch, name=f"ref_{arch}")
    version = repository / model / "1"
    manifest = load_version_manifest(version)
    decoder, encoder = version / manifest.decoder.file, version / manifest.encoder.file
    dec = in_process_rates(decoder, manifest.latent_dim, args.window_s)
    enc = in_process_encoder(encoder, args.window_s)
    cases = [
        (n, c)
        for n in SIZES
        for c in CLIENTS
        if args.full or arch == "mlp" or not (n >= 1024 and c == 32)
    ]
    log = root / f"{model}.log"
    fp32 = pb.SAMPLE_ENCODING_FLOAT32
    sample = serve_and_drive(
        repository, model, log, [], [("Sample fp32", n, c, fp32) for n, c in cases], args.window_s
    )
    server = ServerProcess(repository, model, log)
    try:
        encode = asyncio.run(encode_rows(server, model, cases, args.window_s))
    finally:
        server.stop()
    rows = []
    for base, served in ((dec, sample), (enc, encode)):
        for n in SIZES:
            rows.append(Row(f"{arch}: {base[n].label}", n, 1, base[n].rate))
        for row in served:
            row.label = f"{arch}: {row.label}"
            row.ratio = row.rate / base[row.n].rate
            rows.append(row)
    return rows


def batching_rows(root: Path, args) -> list[Row]:
    """The MLP's Sample n = 1 x 32 clients with batching on (defaults) and off."""
    repository, model = export_reference_model(root, name="ref_batching")
    log, fp32 = root / "batching.log", pb.SAMPLE_ENCODING_FLOAT32
    off = ["--max-batch-size", "1", "--max-queue-delay-ms", "0"]
    rows = []
    for label, flags in (("batching on", []), ("batching off", off)):
        case = [(f"mlp: Sample, {label}", 1, 32, fp32)]
        rows += serve_and_drive(repository, model, log, flags, case, args.window_s)
    return rows


def print_table(rows: list[Row]) -> None:
    head = ("", "n", "clients", "samples/s", "p50 ms", "p99 ms", "÷ in-proc", "srv µs/req")
    print(f"{head[0]:60}" + "".join(f"{h:>11}" for h in head[1:]))
    for r in rows:
        cells = [f"{r.n}", f"{r.clients}", f"{r.rate:,.0f}"]
        for value, form in (
            (r.p50_ms, ".2f"),
            (r.p99_ms, ".2f"),
            (r.ratio, ".2f"),
            (r.server_cpu_us, ",.0f"),
        ):
            cells.append("" if value is None else format(value, form))
        print(f"{r.label:60}" + "".join(f"{c:>11}" for c in cells))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--window-s", type=float, default=0.5)
    parser.add_argument("--models", default="mlp,conv", help="comma-separated: mlp, conv")
    parser.add_argument("--full", action="store_true", help="conv n >= 1024 with 32 clients too")
    parser.add_argument(
        "--batching-only", action="store_true", help="only batching on/off, n = 1 x 32 clients"
    )
    args = parser.parse_args(argv)
    print(f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} at start")
    keep_freed_memory()
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="vaeserve-bench-api-") as tmp:
        for arch in [] if args.batching_only else args.models.split(","):
            rows += measure(arch, Path(tmp), args)
        on, off = batching_rows(Path(tmp), args)
    print_table([*rows, on, off])
    print(f"batch-1, 32 clients: batching on / off = {on.rate / off.rate:.2f}x")
    print(f"load average {os.getloadavg()[0]:.2f} at the end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
