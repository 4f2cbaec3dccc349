"""Where a served request's CPU time goes: perf samples of vae-serve under a steady load, or
(--stages) the time of each stage of one batch-1 ModelInfer and one batch-1 Sample.

Run: python bench/profile_server.py [--n 1] [--clients 32] [--seconds 4]
    [--repository DIR --model M] [--serve-args "..."]
     python bench/profile_server.py --stages [--calls 3000] [--serve-args "..."]

It starts vae-serve (default settings, CPU, 127.0.0.1, a free port) on bench_serving's
random-weight reference MLP (or an existing repository), drives closed-loop Sample(n) calls
from ``--clients`` grpc.aio clients in a child process, and records the server with
``perf record -F 2000 -p PID`` (Linux perf; run as root or with perf_event_paranoid <= 1).
It prints the server's CPU per request (from /proc) and two breakdowns of the samples: by
thread (the event loop is the main thread; gRPC's event engine threads are named) and by
shared object (the interpreter, onnxruntime, the kernel, gRPC, numpy, libc's memmove, ...).
Python 3.11 frames are invisible to perf: "libpython" is all interpreted Python, ours and
asyncio's and grpc.aio's Python layer alike.

--stages starts vae-serve with its stage functions wrapped in time.perf_counter_ns timers
(the wrapping lives in the bench; the server has no timing code), then makes ``--calls``
sequential batch-1 ModelInfer calls and as many batch-1 Sample calls from one client, with a
bearer token so the auth check runs. It prints each stage's mean per call, exclusive of the
stages nested in it, next to the server's CPU per call; the garbage collector's pauses (they
fall inside the stages); the share of calls that took the batcher's lone-request fast
path; and, for comparison, the same ModelInfer calls against perf_peers/noop_server.py (the
grpc.aio floor: wall and server CPU per call). --gc-freeze: the server calls gc.freeze()
after the warm-up, to see what that saves.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_serving  # noqa: E402
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


# Runs in the server process before vae-serve's main: wraps each stage's function (module and
# class attributes, looked up at call time) in a timer; SIGUSR1 writes the timings to
# $STAGES_OUT and clears them.
_STAGED_SERVER = r"""
import collections, functools, gc, inspect, json, os, signal, sys, time
from vaeserve.engine import pipeline, runner
from vaeserve.server import (batcher, handlers, inference_protocol, limits, metrics, observer,
                             oip_convert, security, servicer)
T = collections.defaultdict(list)
ns = time.perf_counter_ns
def timed(stage, fn):
    if inspect.iscoroutinefunction(fn):
        async def wrapper(*a, **k):
            t = ns()
            try:
                return await fn(*a, **k)
            finally:
                T[stage].append(ns() - t)
    else:
        def wrapper(*a, **k):
            t = ns()
            try:
                return fn(*a, **k)
            finally:
                T[stage].append(ns() - t)
    return functools.wraps(fn)(wrapper)
def timed_factory(stage, factory):  # a function that returns the function to time
    return functools.wraps(factory)(lambda *a, **k: timed(stage, factory(*a, **k)))
def wrap(owner, name, stage, factory=False):
    fn = getattr(owner, name)
    setattr(owner, name, (timed_factory if factory else timed)(stage, fn))
wrap(handlers, "_tolerant_parser", "parse", factory=True)
wrap(handlers, "_serializer", "serialize", factory=True)
wrap(limits.RequestLimits, "_admitting", "limits: admit + parse", factory=True)
wrap(observer.RequestObserver, "intercept_service", "interceptor chain")
wrap(security.BearerTokenInterceptor, "intercept_service", "auth + limits interceptors")
wrap(limits.RequestLimits, "intercept_service", "limits interceptor")
wrap(observer.RequestObserver, "_unary", "handler (observer's span)", factory=True)
wrap(observer.RequestObserver, "_record", "observer: status, labels, log")
wrap(metrics.ServerMetrics, "observe_request", "metrics: observe_request")
for hook in ("on_dequeue", "on_batch", "on_request"):
    wrap(metrics.GraphObserver, hook, "metrics: batcher hooks")
wrap(inference_protocol.InferenceProtocol, "_served", "checks: resolve name")
for name in ("decode_inputs", "check_values", "requested_outputs", "check_answer_fits"):
    wrap(oip_convert, name, "checks: tensors")
wrap(servicer, "validate_sample", "checks: validate_sample")
wrap(inference_protocol.InferenceProtocol, "infer", "infer (protocol)")
wrap(oip_convert, "encode_outputs", "answer: encode")
wrap(servicer, "_sample_response", "answer: encode")
wrap(pipeline, "sample", "pipeline.sample (latents + batcher)")
wrap(batcher.DynamicBatcher, "run", "batcher.run (queue + run)")
if hasattr(batcher.DynamicBatcher, "_run_alone"):  # the lone-request fast path, if any
    wrap(batcher.DynamicBatcher, "_run_alone", "fast path")
wrap(runner.OnnxRunner, "run", "onnxruntime run")
wrap(runner.OnnxRunner, "run_small", "onnxruntime run")
gc_started = []
def gc_timer(phase, info):  # the collector's pauses, whichever stage they fall in
    if phase == "start":
        gc_started.append(ns())
    elif gc_started:
        T[f"gc gen{info['generation']}"].append(ns() - gc_started.pop())
gc.callbacks.append(gc_timer)
def dump(*_):
    if os.environ.get("STAGES_GC_FREEZE"):  # after the warm-up: what gc.freeze() would save
        gc.collect()
        gc.freeze()
    with open(os.environ["STAGES_OUT"] + ".tmp", "w") as f:
        json.dump(T, f)
    os.replace(os.environ["STAGES_OUT"] + ".tmp", os.environ["STAGES_OUT"])
    T.clear()
signal.signal(signal.SIGUSR1, dump)
from vaeserve.server.cli import main
sys.exit(main())
"""
# Exclusive stages: (label, the stage's total, the nested stages to subtract).
_STAGE_ROWS = (
    ("parse (request bytes -> message)", "parse", ()),
    ("limits: size and in-flight checks", "limits: admit + parse", ("parse",)),
    ("interceptors: observer's wrap", "interceptor chain", ("auth + limits interceptors",)),
    ("auth (bearer token)", "auth + limits interceptors", ("limits interceptor",)),
    ("interceptors: limits' wrap", "limits interceptor", ()),
    ("checks: resolve model", "checks: resolve name", ()),
    ("checks: tensors / validate", "checks: tensors", ()),
    ("checks: tensors / validate", "checks: validate_sample", ()),
    ("latents (Sample)", "pipeline.sample (latents + batcher)", ("batcher.run (queue + run)",)),
    ("queue: batcher machinery", "batcher.run (queue + run)",
     ("onnxruntime run", "metrics: batcher hooks")),
    ("run: onnxruntime", "onnxruntime run", ()),
    ("answer: build and encode", "answer: encode", ()),
    ("answer: serialize", "serialize", ()),
    ("metrics: requests (observe_request)", "metrics: observe_request", ()),
    ("metrics: batcher hooks", "metrics: batcher hooks", ()),
    ("observer: status, labels, logging", "observer: status, labels, log",
     ("metrics: observe_request",)),
    ("handler span (observer's, all above inside)", "handler (observer's span)", ()),
)  # fmt: skip


def _stage_table(timings: dict[str, list[int]], calls: int) -> list[tuple[str, float]]:
    """(label, mean µs per call), exclusive of the nested stages; absent stages are skipped."""
    rows: dict[str, float] = {}
    for label, total, nested in _STAGE_ROWS:
        if total not in timings:
            continue
        us = (sum(timings[total]) - sum(sum(timings.get(n, ())) for n in nested)) / calls / 1e3
        rows[label] = rows.get(label, 0.0) + us
    return list(rows.items())


def stage_profile(args) -> int:
    import grpc
    import numpy as np

    from vaeserve.proto.inference import grpc_service_pb2 as oip
    from vaeserve.proto.inference import grpc_service_pb2_grpc as oip_grpc
    from vaeserve.proto.v1 import vaeserve_pb2 as pb
    from vaeserve.proto.v1 import vaeserve_pb2_grpc as pb_grpc

    with tempfile.TemporaryDirectory(prefix="vaeserve-stages-") as tmp:
        tmp = Path(tmp)
        repository, model = args.repository, args.model
        if repository is None:
            repository, model = export_reference_model(tmp)
        (tmp / "token").write_text("profile-token")
        out = tmp / "stages.json"
        os.environ["STAGES_OUT"] = str(out)
        if args.gc_freeze:
            os.environ["STAGES_GC_FREEZE"] = "1"
        flags = ["--auth-token-file", str(tmp / "token"), *args.serve_args.split()]
        bench_serving._SERVE = _STAGED_SERVER  # ServerProcess runs this instead of the CLI
        server = ServerProcess(repository, model, tmp / "server.log", *flags)
        try:
            time.sleep(1.0)
            pid = server.process.pid
            meta = (("authorization", "Bearer profile-token"),)
            channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
            z = np.zeros((1, 32), np.float32).tobytes()
            infer = oip.ModelInferRequest(model_name=f"{model}-decoder", raw_input_contents=[z])
            infer.inputs.add(name="z", datatype="FP32", shape=[1, 32])
            oip_stub, typed_stub = (
                oip_grpc.GRPCInferenceServiceStub(channel),
                pb_grpc.VaeServiceStub(channel),
            )
            calls = {
                "ModelInfer 1x1": lambda i: oip_stub.ModelInfer(infer, metadata=meta),
                "Sample n=1": lambda i: typed_stub.Sample(
                    pb.SampleRequest(model=pb.ModelRef(name=model), num_samples=1, seed=i),
                    metadata=meta,
                ),
            }
            results = {}
            for rpc, call in calls.items():
                for i in range(300):  # warm-up, then the timings so far are thrown away
                    call(i)
                timings = _collect(pid, out)
                cpu, wall = _timed_calls(pid, call, args.calls)
                timings = _collect(pid, out)
                results[rpc] = (_stage_table(timings, args.calls), cpu, wall, timings)
            channel.close()
        finally:
            server.stop()
        noop = _noop_baseline(repository, model, infer, meta, args.calls, tmp)
    print(f"\nno-op server (perf_peers/noop_server.py), the same ModelInfer 1x1 calls: "
          f"{noop[1] / args.calls * 1e3:.3f} ms each (client included), server CPU "
          f"{noop[0] / args.calls * 1e6:,.0f} µs per call")  # fmt: skip
    for rpc, (rows, cpu, wall, timings) in results.items():
        per_call = cpu / args.calls * 1e6
        print(f"\n{rpc}: {args.calls} sequential calls, {wall / args.calls * 1e3:.3f} ms each "
              f"(client included), server CPU {per_call:,.0f} µs per call")  # fmt: skip
        print(f"{'stage':<46}{'µs/call':>9}{'share of CPU':>14}")
        for label, us in rows:
            print(f"{label:<46}{us:>9.1f}{us / per_call:>14.1%}")
        for gen in range(3):
            pauses = timings.get(f"gc gen{gen}", ())
            if pauses:
                print(f"{f'  (in the stages above: GC of generation {gen}, {len(pauses)}x)':<46}"
                      f"{sum(pauses) / args.calls / 1e3:>9.1f}")  # fmt: skip
        fast = len(timings.get("fast path", ()))
        print(f"(batcher: {fast / args.calls:.0%} of the calls took the lone-request fast path)")
        inside = sum(us for label, us in rows if not label.startswith("handler span"))
        print(f"{'the rest: gRPC core, grpc.aio, asyncio, kernel':<46}{per_call - inside:>9.1f}"
              f"{(per_call - inside) / per_call:>14.1%}")  # fmt: skip
    return 0


def _timed_calls(pid: int, call, calls: int) -> tuple[float, float]:
    """(server CPU seconds, wall seconds) of ``calls`` sequential calls."""
    cpu = process_cpu_s(pid)
    start = time.perf_counter()
    for i in range(calls):
        call(i)
    return process_cpu_s(pid) - cpu, time.perf_counter() - start


def _noop_baseline(repository: Path, model: str, infer, meta, calls: int, tmp: Path):
    """The grpc.aio floor under the same calls: (server CPU s, wall s) of the no-op peer."""
    import grpc
    from bench_perf_analyzer import Peer

    from vaeserve.manifest import load_version_manifest
    from vaeserve.proto.inference import grpc_service_pb2_grpc as oip_grpc

    version = repository / model / "1"
    decoder = version / load_version_manifest(version).decoder.file
    peer = Peer("noop_server.py", decoder, f"{model}-decoder", tmp / "noop.log")
    try:
        with grpc.insecure_channel(f"127.0.0.1:{peer.port}") as channel:
            stub = oip_grpc.GRPCInferenceServiceStub(channel)
            for _ in range(300):
                stub.ModelInfer(infer, metadata=meta)
            return _timed_calls(
                peer.process.pid, lambda i: stub.ModelInfer(infer, metadata=meta), calls
            )
    finally:
        peer.stop()


def _collect(pid: int, out: Path) -> dict[str, list[int]]:
    out.unlink(missing_ok=True)
    os.kill(pid, signal.SIGUSR1)
    for _ in range(500):
        if out.exists():
            return json.loads(out.read_text())
        time.sleep(0.01)
    raise RuntimeError("the server did not write its stage timings")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=1, help="samples per request")
    parser.add_argument("--clients", type=int, default=32, help="closed-loop clients")
    parser.add_argument("--seconds", type=float, default=4.0, help="length of the recording")
    parser.add_argument("--repository", type=Path, help="an existing model repository")
    parser.add_argument("--model", help="the model to serve from --repository")
    parser.add_argument("--serve-args", default="", help="extra vae-serve flags")
    parser.add_argument("--stages", action="store_true", help="the per-stage timing table")
    parser.add_argument("--calls", type=int, default=3000, help="--stages: calls per RPC")
    parser.add_argument(
        "--gc-freeze", action="store_true", help="--stages: gc.freeze() the server after warm-up"
    )
    args = parser.parse_args(argv)
    if args.stages:
        return stage_profile(args)
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
