"""Score, served, against the engine in-process, for the reference MLP.

Run: python bench/bench_score.py [--window-s 1] [--sizes 64,1024] [--ks 1,64]

Exports bench_serving's random-weight reference model with the real exporter (MLP decoder
32 -> 512 -> 512 -> 784, encoder 784 -> 512 -> 512 -> 2x32, Bernoulli, 1x28x28), then for each
n (inputs per call) and k (importance samples per input) it measures inputs scored per second:
  1. in-process: ``vaeserve.engine.Engine.score`` on the same repository (Engine.open, CPU,
     onnxruntime's own thread count), 1 caller and 4 caller threads;
  2. served: vae-serve (defaults, CPU) in a subprocess (bench_serving.ServerProcess), driven by
     ``VaeClient.score`` from 1 and 4 threads of this process (a client each).
Every figure: 0.5 s warm-up, then the best of bench_serving.WINDOWS windows of --window-s;
latencies pooled over the windows. One call costs one encoder pass over n rows and n*k decoder
rows, so "dec rows/s" (n*k per call) is printed beside the inputs/s. Ratio: served ÷ the better
in-process figure (1 or 4 callers) of the same (n, k). The two are measured one after the other
per (n, k), the server idle during the in-process figures, so a drift in a shared machine's load
moves both sides of a ratio alike. Note the step sizes differ: the server sends the n*k draws
to the decoder in steps of --max-batch-size (1024) rows, Engine.score in steps of 4096.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench_serving import WINDOWS, ServerProcess, export_reference_model  # noqa: E402

from client.client import VaeClient  # noqa: E402
from vaeserve.engine import Engine  # noqa: E402
from vaeserve.server.memory import keep_freed_memory  # noqa: E402

CALLERS = (1, 4)
SEED = 12345


@dataclass
class Row:
    label: str
    n: int
    k: int
    callers: int
    rate: float  # inputs scored per second
    p50_ms: float
    ratio: float | None = None


def inputs(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 1, 28, 28), dtype=np.float32)


def measure(label: str, calls: list[Callable[[], object]], n: int, k: int, window_s: float) -> Row:
    """``len(calls)`` closed-loop callers, each on its own thread running its own ``call``:
    a 0.5 s warm-up, then WINDOWS windows; the best window's inputs/s counts."""
    latencies: list[float] = []

    def loop(call: Callable[[], object], until: float, record: bool) -> int:
        count = 0
        while time.perf_counter() < until:
            start = time.perf_counter()
            call()
            if record:
                latencies.append(time.perf_counter() - start)
            count += 1
        return count

    best = 0.0
    with ThreadPoolExecutor(len(calls)) as pool:
        warm = time.perf_counter() + 0.5
        list(pool.map(loop, calls, [warm] * len(calls), [False] * len(calls)))
        for _ in range(WINDOWS):
            start = time.perf_counter()
            until = [start + window_s] * len(calls)
            counts = list(pool.map(loop, calls, until, [True] * len(calls)))
            best = max(best, sum(counts) * n / (time.perf_counter() - start))
    p50 = statistics.median(latencies) * 1e3
    return Row(label, n, k, len(calls), best, p50)


def print_table(rows: list[Row]) -> None:
    head = ("", "n", "k", "callers", "inputs/s", "dec rows/s", "p50 ms", "÷ in-proc")
    print(f"{head[0]:12}" + "".join(f"{h:>12}" for h in head[1:]))
    for r in rows:
        cells = [f"{r.n}", f"{r.k}", f"{r.callers}", f"{r.rate:,.0f}", f"{r.rate * r.k:,.0f}"]
        cells += [f"{r.p50_ms:.2f}", "" if r.ratio is None else f"{r.ratio:.2f}"]
        print(f"{r.label:12}" + "".join(f"{c:>12}" for c in cells))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--window-s", type=float, default=1.0)
    parser.add_argument("--sizes", default="64,1024", help="inputs per call, comma-separated")
    parser.add_argument("--ks", default="1,64", help="importance samples, comma-separated")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    ks = [int(s) for s in args.ks.split(",")]
    print(f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} at start")
    keep_freed_memory()
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="vaeserve-bench-score-") as tmp:
        repository, model = export_reference_model(Path(tmp), name="ref_score")
        engine = Engine.open(repository, model, device="cpu")
        server = ServerProcess(repository, model, Path(tmp) / "server.log")
        address = f"127.0.0.1:{server.port}"
        clients = [VaeClient(address, timeout_s=120) for _ in range(max(CALLERS))]
        cases = [(n, k) for n in sizes for k in ks]
        inproc: dict[tuple[int, int], list[Row]] = {}
        served: list[Row] = []
        try:
            clients[0].score(model, inputs(1), k=1, seed=SEED)  # waits until the model is loaded
            # Per (n, k): in-process (the server idle), then served: a drift in the load of the
            # shared machine then moves both sides of a ratio alike.
            for n, k in cases:
                x = inputs(n)
                local = [lambda x=x, k=k: engine.score(x, k=k, seed=SEED)] * max(CALLERS)
                remote = [lambda c=c, x=x, k=k: c.score(model, x, k=k, seed=SEED) for c in clients]
                inproc[n, k] = [
                    measure("in-process", local[:c], n, k, args.window_s) for c in CALLERS
                ]
                served += [measure("served", remote[:c], n, k, args.window_s) for c in CALLERS]
        finally:
            for c in clients:
                c.close()
            server.stop()
    for n, k in cases:
        base = max(r.rate for r in inproc[n, k])
        rows += inproc[n, k]
        for r in served:
            if (r.n, r.k) == (n, k):
                r.ratio = r.rate / base
                rows.append(r)
    print_table(rows)
    print(f"load average {os.getloadavg()[0]:.2f} at the end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
