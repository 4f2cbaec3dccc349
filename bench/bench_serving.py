"""Served Sample throughput and latency against onnxruntime in-process, on this machine.

Run: python bench/bench_serving.py [--repository DIR --model NAME] [--window-s 1] [--workers 2]

Without --repository it exports a random-weight copy of the reference model of
docs/architecture.md (MLP decoder 32 -> 512 -> 512 -> 784, Bernoulli, 1x28x28; weights do not
change the speed) through
vae-export's Python API, so it needs the train extra (torch) in this process only. Then:
  1. the decoder in-process (the server's own OnnxRunner): samples/s at batch 1/64/1024/4096,
     the better of one multi-threaded run at a time and one single-threaded run per core;
  2. vae-serve in a subprocess, driven by grpc.aio clients in this process: Sample at
     n = 1/64/1024/4096 with 1 and 16 concurrent clients (fp32, and uint8 for large n);
  3. the same server with batching off (--max-batch-size 1): n = 1 with 16 clients;
  4. batch-1 x 16 clients and n = 4096 x 1 client, each client on a channel (connection) of
     its own, against one server process and against --workers N: SO_REUSEPORT spreads
     connections, not calls, so one shared channel would reach one worker only.
It prints one table: samples/s, p50/p99 latency, and each rate as a ratio to in-process.
The load generator shares the machine's cores with the server, as a local client would, and
reads each answer's samples into a numpy array as VaeClient does (the client's AnswerStub).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np

from vaeserve.client.tensors import AnswerStub
from vaeserve.engine.runner import CPU_PROVIDER, OnnxRunner
from vaeserve.proto.v1 import vaeserve_pb2 as pb
from vaeserve.proto.v1 import vaeserve_pb2_grpc as pb_grpc
from vaeserve.server.memory import keep_freed_memory
from vaeserve.server.settings import usable_cores

SIZES = (1, 64, 1024, 4096)
WINDOWS = 3  # measurement windows per figure; the best one counts
CLIENTS = (1, 16)
MAX_MESSAGE = 64 << 20
START_TIMEOUT_S = 120.0
_SERVE = "import sys; from vaeserve.server.cli import main; sys.exit(main())"


@dataclass
class Row:
    label: str
    n: int
    clients: int
    rate: float  # samples/s
    p50_ms: float | None = None
    p99_ms: float | None = None
    ratio: float | None = None
    cpu_ratio: float | None = None  # in-process CPU per sample ÷ (server + client) CPU per sample
    server_cpu_us: float | None = None  # server process CPU time per request
    client_cpu_us: float | None = None  # this process's CPU time per request


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process and its children (Linux /proc), all threads
    included: with --workers the server is a supervisor and its worker processes."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    total = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    for children in Path(f"/proc/{pid}/task").glob("*/children"):
        total += sum(process_cpu_s(int(child)) for child in children.read_text().split())
    return total


def export_reference_model(
    root: Path, arch: str = "mlp", name: str = "reference"
) -> tuple[Path, str]:
    """A random-weight reference model, exported as <root>/models/<name>/1.

    arch "mlp": the reference model's 32 -> 512 -> 512 -> 784 decoder; "conv": training's
    default conv channels (stride-2 convolutions 32, 64), also to 1x28x28.
    """
    import torch

    from vaeserve.export.onnx_export import export_checkpoint
    from vaeserve.training.checkpoint import save_checkpoint
    from vaeserve.training.config import ModelConfig
    from vaeserve.training.model import build_model

    hidden = (512, 512) if arch == "mlp" else (32, 64)
    config = ModelConfig(data_shape=(1, 28, 28), latent_dim=32, hidden_dims=hidden, arch=arch)
    torch.manual_seed(0)
    model = build_model(config)
    data_info = {  # no data set on disk: the exporter's parity gate uses synthetic images
        "spec": f"npz:{root / 'absent.npz'}",
        "shape": [1, 28, 28],
        "value_range": [0.0, 1.0],
        "binarize": "none",
        "num_classes": None,
        "class_names": [],
        "split_seed": 0,
    }
    checkpoint = save_checkpoint(
        root / f"{name}.pt",
        model_config=config,
        state_dict=model.state_dict(),
        train_config={},
        data_info=data_info,
    )
    export_checkpoint(checkpoint, root / "models", name, version=1)
    return root / "models", name


def in_process_rates(decoder: Path, latent_dim: int, window_s: float) -> dict[int, Row]:
    """Decoder samples/s at each batch size, in-process (see ``in_process_graph_rates``)."""

    def latents(n: int) -> dict[str, np.ndarray]:
        return {"z": np.random.default_rng(0).standard_normal((n, latent_dim), np.float32)}

    return in_process_graph_rates(decoder, latents, window_s, "decoder")


def in_process_graph_rates(
    graph: Path, make_inputs: Callable[[int], dict[str, np.ndarray]], window_s: float, what: str
) -> dict[int, Row]:
    """A graph's samples/s at each batch size in this process, the better of two ways to use
    the cores: one run at a time on all of them (the server's multi-threaded session), or one
    single-threaded run per core at once (its instances). Which is faster depends on the graph:
    2 threads run the MLP's GEMMs well and the small conv graph hardly faster than one.
    Best window of each; the row's label names the winner and gives the other's rate.
    """
    runner = OnnxRunner(graph, [CPU_PROVIDER])
    cores = usable_cores()
    rows = {}
    for n in SIZES:
        inputs = make_inputs(n)
        for _ in range(3):
            runner.run(inputs)
            runner.run_small(inputs)
        one, cpu_per_run = _rate([runner.run], inputs, n, window_s)
        per_core, _ = _rate([runner.run_small] * cores, inputs, n, window_s)
        if one >= per_core:
            label = f"in-process {what}, 1 run x {cores} threads ({cores} x 1: {per_core:,.0f})"
        else:
            label = f"in-process {what}, {cores} runs x 1 thread (1 x {cores}: {one:,.0f})"
        rows[n] = Row(label, n, 1, max(one, per_core))
        rows[n].server_cpu_us = cpu_per_run * 1e6
    return rows


def _rate(runs: list[Callable], inputs: dict, n: int, window_s: float) -> tuple[float, float]:
    """(best samples/s over WINDOWS windows with each of ``runs`` looping on its own thread,
    process CPU seconds per run)."""

    def loop(run: Callable, until: float) -> int:
        count = 0
        while time.perf_counter() < until:
            run(inputs)
            count += 1
        return count

    best, total, cpu = 0.0, 0, time.process_time()
    with ThreadPoolExecutor(len(runs)) as pool:
        for _ in range(WINDOWS):
            start = time.perf_counter()
            counts = list(pool.map(loop, runs, [start + window_s] * len(runs)))
            best = max(best, sum(counts) * n / (time.perf_counter() - start))
            total += sum(counts)
    return best, (time.process_time() - cpu) / total


class ServerProcess:
    """vae-serve in a child process; its port is read from its log (kept in a file)."""

    def __init__(self, repository: Path, model: str, log: Path, *flags: str):
        command = [
            sys.executable,
            "-c",
            _SERVE,
            "--repository",
            str(repository),
            "--models",
            model,
            "--port",
            "0",
            "--http-port",
            "off",
            "--device",
            "cpu",
            *flags,
        ]
        self.log = log
        with open(log, "w") as f:
            self.process = subprocess.Popen(command, stderr=f)
        self.port = self.logged_port(r"listening on \S+:(\d+)")

    def logged_port(self, pattern: str) -> int:
        """The port the server's log names (``pattern``'s group 1), once it has."""
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            text = self.log.read_text()
            match = re.search(pattern, text)
            if match:
                return int(match.group(1))
            if self.process.poll() is not None:
                raise RuntimeError(f"vae-serve exited: {text}")
            time.sleep(0.05)
        raise RuntimeError(f"vae-serve logged no {pattern!r} within {START_TIMEOUT_S} s")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(START_TIMEOUT_S)


async def wait_ready(stub: pb_grpc.VaeServiceStub, model: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        try:
            await stub.GetModelInfo(pb.GetModelInfoRequest(model=pb.ModelRef(name=model)))
            return
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


async def drive(
    stubs, model: str, n: int, clients: int, window_s: float, encoding: int, server_pid: int
) -> Row:
    """``clients`` closed-loop callers of Sample(n): a warm-up, then WINDOWS windows.

    The rate is the best window's: on shared cores a window loses whatever else ran in it.
    Client i calls through ``stubs[i % len(stubs)]``. Latencies are pooled over all windows.
    CPU time per request (server processes, and this process as the load generator) moves much
    less with other load, so it is reported too.
    """
    latencies: list[float] = []

    async def client(i: int, until: float, record: bool) -> int:
        seed, calls, stub = 1 + 1_000_003 * (i + 1), 0, stubs[i % len(stubs)]
        while time.perf_counter() < until:
            request = pb.SampleRequest(
                model=pb.ModelRef(name=model), num_samples=n, seed=seed + calls, encoding=encoding
            )
            start = time.perf_counter()
            answer = await stub.Sample(request, timeout=60)
            answer.tensor("samples")  # the array a user gets (a view of the received bytes)
            if record:
                latencies.append(time.perf_counter() - start)
            calls += 1
        return calls

    await asyncio.gather(*(client(i, time.perf_counter() + 0.5, False) for i in range(clients)))
    cpu = (process_cpu_s(server_pid), time.process_time())
    best = 0.0
    for _ in range(WINDOWS):
        start = time.perf_counter()
        counts = await asyncio.gather(*(client(i, start + window_s, True) for i in range(clients)))
        best = max(best, sum(counts) * n / (time.perf_counter() - start))
    calls = len(latencies)
    q = statistics.quantiles(latencies, n=100) if calls > 1 else latencies * 99
    row = Row("", n, clients, best, q[49] * 1e3, q[98] * 1e3)
    row.server_cpu_us = (process_cpu_s(server_pid) - cpu[0]) / calls * 1e6
    row.client_cpu_us = (time.process_time() - cpu[1]) / calls * 1e6
    return row


async def served_rows(
    server: ServerProcess, model: str, cases, window_s: float, channels: int = 1
) -> list[Row]:
    # Each channel its own connection: a process-wide subchannel pool would share one.
    options = [("grpc.max_receive_message_length", MAX_MESSAGE)]
    options += [("grpc.use_local_subchannel_pool", 1)] if channels > 1 else []
    address = f"127.0.0.1:{server.port}"
    opened = [grpc.aio.insecure_channel(address, options=options) for _ in range(channels)]
    try:
        stubs = [AnswerStub(channel) for channel in opened]
        for stub in stubs:  # each connection may reach a different worker
            await wait_ready(stub, model)
        rows = []
        for label, n, clients, encoding in cases:
            row = await drive(stubs, model, n, clients, window_s, encoding, server.process.pid)
            row.label = label
            rows.append(row)
        return rows
    finally:
        for channel in opened:
            await channel.close()


def serve_and_drive(repository, model, log, flags, cases, window_s, channels=1) -> list[Row]:
    server = ServerProcess(repository, model, log, *flags)
    try:
        return asyncio.run(served_rows(server, model, cases, window_s, channels))
    finally:
        server.stop()


def print_table(rows: list[Row], batching_gain: float, workers_gain: float | None) -> None:
    head = (
        "",
        "n",
        "clients",
        "samples/s",
        "p50 ms",
        "p99 ms",
        "÷ in-proc",
        "CPU ratio",
        "srv µs/req",
        "cli µs/req",
    )
    print(f"{head[0]:62}" + "".join(f"{h:>11}" for h in head[1:]))
    for r in rows:
        cells = [f"{r.n}", f"{r.clients}", f"{r.rate:,.0f}"]
        for value, form in (
            (r.p50_ms, ".2f"),
            (r.p99_ms, ".2f"),
            (r.ratio, ".2f"),
            (r.cpu_ratio, ".2f"),
            (r.server_cpu_us, ",.0f"),
            (r.client_cpu_us, ",.0f"),
        ):
            cells.append("" if value is None else format(value, form))
        print(f"{r.label:62}" + "".join(f"{c:>11}" for c in cells))
    print(f"\nbatch-1, 16 clients: batching on / batching off = {batching_gain:.2f}x")
    if workers_gain is not None:
        print(f"batch-1, 16 clients, a channel each: workers / one process = {workers_gain:.2f}x")
    print(
        "CPU ratio: the in-process decoder's CPU time per sample over the server's and the "
        "load generator's together;\nwhat the rate ratio would be on otherwise idle cores "
        "that both sides keep busy. srv µs/req: the in-process run's CPU per batch."
    )


def measure(repository: Path, model: str, args: argparse.Namespace, tmp: Path) -> None:
    """Every figure of the table, printed."""
    from vaeserve.manifest import list_versions, load_version_manifest

    version_dir = repository / model / str(max(list_versions(repository / model)))
    manifest = load_version_manifest(version_dir)
    decoder = version_dir / manifest.decoder.file
    print(
        f"model {model}: {decoder}; {os.cpu_count()} cores, "
        f"load average {os.getloadavg()[0]:.1f} at start"
    )
    keep_freed_memory()  # the load generator receives large answers too
    inproc = in_process_rates(decoder, manifest.latent_dim, args.window_s)
    fp32, u8 = pb.SAMPLE_ENCODING_FLOAT32, pb.SAMPLE_ENCODING_UINT8
    cases = [("Sample fp32", n, c, fp32) for n in SIZES for c in CLIENTS]
    cases += [("Sample uint8", n, c, u8) for n in SIZES[2:] for c in CLIENTS]
    flags = shlex.split(args.serve_args)
    log = tmp / "server.log"
    served = serve_and_drive(repository, model, log, flags, cases, args.window_s)
    off = [*flags, "--max-batch-size", "1", "--max-queue-delay-ms", "0"]
    unbatched = serve_and_drive(
        repository, model, log, off, [("Sample fp32, batching off", 1, 16, fp32)], args.window_s
    )
    workers_rows: list[Row] = []
    if args.workers > 1:
        both = [(1, 16), (4096, 1)]
        for label, extra in (
            ("fp32, 1 process, channel each", []),
            (f"fp32, {args.workers} workers, channel each", ["--workers", str(args.workers)]),
        ):
            cases = [(f"Sample {label}", n, c, fp32) for n, c in both]
            workers_rows += serve_and_drive(
                repository, model, log, [*flags, *extra], cases, args.window_s, channels=16
            )
    again = in_process_rates(decoder, manifest.latent_dim, args.window_s)
    inproc = {n: max(inproc[n], again[n], key=lambda r: r.rate) for n in SIZES}
    rows = [inproc[n] for n in SIZES]
    for row in served + unbatched + workers_rows:
        base = inproc[row.n]
        row.ratio = row.rate / base.rate
        row.cpu_ratio = base.server_cpu_us / (row.server_cpu_us + row.client_cpu_us)
        rows.append(row)
    batched = next(r for r in served if (r.n, r.clients, r.label) == (1, 16, "Sample fp32"))
    one = [r for r in workers_rows if (r.n, r.clients) == (1, 16)]
    print_table(rows, batched.rate / unbatched[0].rate, one[1].rate / one[0].rate if one else None)
    print(f"load average {os.getloadavg()[0]:.1f} at the end")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repository", type=Path, help="an existing model repository")
    parser.add_argument("--model", help="the model to serve from --repository")
    parser.add_argument(
        "--window-s", type=float, default=1.0, help=f"seconds per window ({WINDOWS} per figure)"
    )
    parser.add_argument(
        "--serve-args", default="", help='extra vae-serve flags, e.g. "--max-queue-delay-ms 2"'
    )
    parser.add_argument(
        "--workers", type=int, default=2, help="vae-serve --workers for the last rows (<2: skip)"
    )
    args = parser.parse_args(argv)
    if (args.repository is None) != (args.model is None):
        parser.error("--repository and --model go together")
    with tempfile.TemporaryDirectory(prefix="vaeserve-bench-") as tmp:
        if args.repository is None:
            repository, model = export_reference_model(Path(tmp))
        else:
            repository, model = args.repository, args.model
        measure(repository, model, args, Path(tmp))
    return 0


if __name__ == "__main__":
    sys.exit(main())
