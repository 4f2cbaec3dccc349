"""Where a served request's CPU time goes: perf samples of vae-serve under a steady load.

Run: python bench/profile_server.py [--n 1] [--clients 32] [--seconds 4]
    [--repository DIR --model M] [--serve-args "..."]

It starts vae-serve (default settings, CPU, 127.0.0.1, a free port) on bench_serving's
random-weight reference MLP (or an existing repository), drives closed-loop Sample(n) calls
from ``--clients`` grpc.aio clients in a child process, and records the server with
``perf record -F 2000 -p PID`` (Linux perf; run as root or with perf_event_paranoid <= 1).
It prints the server's CPU per request (from /proc) and two breakdowns of the samples: by
thread (the event loop is the main thread; gRPC's event engine threads are named) and by
shared object (the interpreter, onnxruntime, the kernel, gRPC, numpy, libc's memmove, ...).
Python 3.11 frames are invisible to perf: "libpython" is all interpreted Python, ours and
asyncio's and grpc.aio's Python layer alike.
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_serving import ServerProcess, export_reference_model, process_cpu_s  # noqa: E402

_LOAD = """
import asyncio, sys, time
import grpc
from vaeserve.client.tensors import AnswerStub
from vaeserve.proto.v1 import vaeserve_pb2 as pb
port, model, n, clients, seconds = sys.argv[1], sys.argv[2], *map(float, sys.argv[3:6])
async def main():
    options = [("grpc.max_receive_message_length", 64 << 20)]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
        stub, calls = AnswerStub(channel), 0
        async def client(i):
            nonlocal calls
            until = time.perf_counter() + seconds
            while time.perf_counter() < until:
                request = pb.SampleRequest(model=pb.ModelRef(name=model), num_samples=int(n),
                                           seed=i * 1_000_003 + calls)
                (await stub.Sample(request, timeout=60)).tensor("samples")
                calls += 1
        await asyncio.gather(*(client(i) for i in range(int(clients))))
        print(calls, flush=True)
asyncio.run(main())
"""


def perf_breakdown(data: Path) -> tuple[collections.Counter, collections.Counter, dict, dict]:
    """Samples by thread id, by shared object, and by both; each thread's name."""
    out = subprocess.run(
        ["perf", "script", "-i", str(data), "-F", "comm,tid,ip,dso"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    threads: collections.Counter = collections.Counter()
    objects: collections.Counter = collections.Counter()
    names = {}
    by_thread: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for line in out.splitlines():
        parts = line.split()  # comm (may hold spaces), tid, ip, (dso)
        if len(parts) < 4:
            continue
        comm, tid, dso = " ".join(parts[:-3]), parts[-3], parts[-1].strip("()")
        threads[tid] += 1
        names[tid] = comm
        objects[os.path.basename(dso)] += 1
        by_thread[tid][os.path.basename(dso)] += 1
    return threads, objects, names, by_thread


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=1, help="samples per request")
    parser.add_argument("--clients", type=int, default=32, help="closed-loop clients")
    parser.add_argument("--seconds", type=float, default=4.0, help="length of the recording")
    parser.add_argument("--repository", type=Path, help="an existing model repository")
    parser.add_argument("--model", help="the model to serve from --repository")
    parser.add_argument("--serve-args", default="", help="extra vae-serve flags")
    args = parser.parse_args(argv)
    if shutil.which("perf") is None:
        parser.error("Linux perf is not installed (Debian: apt-get install linux-perf)")
    with tempfile.TemporaryDirectory(prefix="vaeserve-profile-") as tmp:
        tmp = Path(tmp)
        repository, model = args.repository, args.model
        if repository is None:
            repository, model = export_reference_model(tmp)
        server = ServerProcess(repository, model, tmp / "server.log", *args.serve_args.split())
        try:
            time.sleep(1.0)  # warm-up runs finish before health reports SERVING
            pid = server.process.pid
            load_s = args.seconds + 2.0
            cpu_before = process_cpu_s(pid)
            load = subprocess.Popen(
                [sys.executable, "-c", _LOAD, str(server.port), model, str(args.n),
                 str(args.clients), str(load_s)],
                stdout=subprocess.PIPE, text=True,
            )  # fmt: skip
            time.sleep(1.0)  # past the clients' connection set-up
            data = tmp / "perf.data"
            subprocess.run(
                ["perf", "record", "-F", "2000", "-p", str(pid), "-o", str(data),
                 "--", "sleep", str(args.seconds)],
                capture_output=True, check=True,
            )  # fmt: skip
            calls = int(load.communicate(timeout=load_s + 60)[0].split()[-1])
            cpu_s = process_cpu_s(pid) - cpu_before
        finally:
            server.stop()
        threads, objects, names, by_thread = perf_breakdown(data)
    total = sum(threads.values())
    rate = calls / load_s
    print(f"Sample n={args.n} x {args.clients} clients: {rate:,.0f} calls/s over {load_s:.0f} s")
    print(f"server CPU {cpu_s / calls * 1e6:,.0f} µs per call (over the whole load)")
    print(f"\n{total} perf samples; by thread:")
    for tid, count in threads.most_common(8):
        what = "the event loop (main thread)" if tid == str(pid) else names[tid]
        top = ", ".join(f"{name} {n / count:.0%}" for name, n in by_thread[tid].most_common(3))
        print(f"  {count / total:6.1%}  {what} ({tid}): {top}")
    print("by shared object:")
    for name, count in objects.most_common(12):
        print(f"  {count / total:6.1%}  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
