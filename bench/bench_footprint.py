"""vae-serve's memory and start-up footprint, per model.

Run: python bench/bench_footprint.py [--demo-repository demo/models] [--load-s 3]

For the digits demo model (demo/models, model ``digits``; trained and exported into
/tmp/fp_run when absent) and for bench_serving's random-weight reference MLP model
(32 -> 512 -> 512 -> 784), it starts vae-serve (one process, CPU, 127.0.0.1, a free port) and
measures:
  - start-up: from just before the process is spawned to the first grpc.health.v1 answer
    SERVING (polled every 10 ms; includes the Python interpreter's imports and model loading);
  - RSS idle: the server's resident set (VmRSS, children included) 0.5 s after ready;
  - RSS under load: the highest VmRSS sampled every 20 ms while ``--clients`` closed-loop
    clients call Sample for ``--load-s`` seconds, once with n = 1 and once with n = 1024 (fp32);
    the server's batcher caps batches at 1024 rows by default.
Each figure is the worst of ``--repeats`` fresh server starts (start-up: the median).
It prints one table; the issue-8 target is RSS with the demo model loaded <= 250 MB.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_serving import _SERVE, MAX_MESSAGE, export_reference_model  # noqa: E402

from vaeserve.proto.v1 import vaeserve_pb2 as pb  # noqa: E402
from vaeserve.proto.v1 import vaeserve_pb2_grpc as pb_grpc  # noqa: E402

START_TIMEOUT_S = 120.0
TARGET_MB = 250.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    """VmRSS of a process and its descendants, MB (10^6 bytes)."""
    total = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            total = int(line.split()[1]) * 1024
    for children in Path(f"/proc/{pid}/task").glob("*/children"):
        for child in children.read_text().split():
            try:
                total += int(rss_mb(int(child)) * 1e6)
            except FileNotFoundError:
                pass
    return total / 1e6


class Server:
    def __init__(self, repository: Path, model: str, log: Path, *flags: str):
        self.port = free_port()
        command = [sys.executable, "-c", _SERVE, "--repository", str(repository)]
        command += ["--models", model, "--port", str(self.port), "--http-port", "off"]
        command += ["--device", "cpu", *flags]
        start = time.perf_counter()
        with open(log, "w") as f:
            self.process = subprocess.Popen(command, stderr=f)
        try:
            self._wait_serving(log)
        except BaseException:
            self.stop()
            raise
        self.startup_s = time.perf_counter() - start

    def _wait_serving(self, log: Path) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        with grpc.insecure_channel(f"127.0.0.1:{self.port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise RuntimeError(f"vae-serve exited: {log.read_text()}")
                try:
                    answer = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=0.5)
                    if answer.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.01)
        raise RuntimeError(f"vae-serve not SERVING within {START_TIMEOUT_S} s")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


async def load(port: int, model: str, n: int, clients: int, seconds: float, cvae: bool) -> int:
    options = [("grpc.max_receive_message_length", MAX_MESSAGE)]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
        stub = pb_grpc.VaeServiceStub(channel)
        until = time.perf_counter() + seconds

        async def client(i: int) -> int:
            calls = 0
            while time.perf_counter() < until:
                request = pb.SampleRequest(model=pb.ModelRef(name=model), num_samples=n, seed=i)
                if cvae:
                    request.label = i % 2
                await stub.Sample(request, timeout=60)
                calls += 1
            return calls

        return sum(await asyncio.gather(*(client(i) for i in range(clients))))


def rss_under_load(server: Server, model: str, n: int, args, cvae: bool) -> tuple[float, float]:
    """Peak RSS (MB) while loaded, and the rate (samples/s)."""
    peak, done = [rss_mb(server.process.pid)], threading.Event()

    def sampler() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss_mb(server.process.pid))
            time.sleep(0.02)

    thread = threading.Thread(target=sampler, daemon=True)
    thread.start()
    start = time.perf_counter()
    try:
        calls = asyncio.run(load(server.port, model, n, args.clients, args.load_s, cvae))
    finally:
        done.set()
        thread.join(5)
    return peak[0], calls * n / (time.perf_counter() - start)


def measure(label: str, repository: Path, model: str, args, tmp: Path) -> dict:
    from vaeserve.manifest import list_versions, load_version_manifest

    version = repository / model / str(max(list_versions(repository / model)))
    cvae = load_version_manifest(version).num_classes is not None
    sizes = sum(f.stat().st_size for f in version.glob("*.onnx")) / 1e6
    result = {"label": label, "onnx_mb": sizes}
    result |= {key: [] for key in ("startup", "idle", "load1", "load1k")}
    for _ in range(args.repeats):
        server = Server(repository, model, tmp / f"{model}.log")
        try:
            result["startup"].append(server.startup_s)
            time.sleep(0.5)
            result["idle"].append(rss_mb(server.process.pid))
            result["load1"].append(rss_under_load(server, model, 1, args, cvae)[0])
            result["load1k"].append(rss_under_load(server, model, 1024, args, cvae)[0])
        finally:
            server.stop()
    return result


def ensure_demo(repository: Path | None) -> tuple[Path, str]:
    if repository is not None and (repository / "digits").is_dir():
        return repository, "digits"
    run = Path("/tmp/fp_run")
    if not (run / "models" / "digits").is_dir():
        subprocess.run(
            ["vae-train", "--dataset", "digits", "--model", "cvae", "--out", str(run)]
            + ["--num-threads", "1"],
            check=True,
            timeout=1800,
        )
        checkpoints = sorted(run.rglob("*.pt"))
        subprocess.run(
            ["vae-export", str(checkpoints[-1]), "--repository", str(run / "models")]
            + ["--name", "digits"],
            check=True,
            timeout=600,
        )
    return run / "models", "digits"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    default_demo = Path(__file__).resolve().parent.parent / "demo" / "models"
    parser.add_argument("--demo-repository", type=Path, default=default_demo)
    parser.add_argument("--load-s", type=float, default=3.0, help="seconds of load per n")
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients under load")
    parser.add_argument("--repeats", type=int, default=2, help="fresh server starts per model")
    args = parser.parse_args(argv)
    print(f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} at start")
    with tempfile.TemporaryDirectory(prefix="vaeserve-footprint-") as tmp:
        tmp = Path(tmp)
        demo_repo, demo = ensure_demo(args.demo_repository)
        ref_repo, ref = export_reference_model(tmp)
        results = [
            measure("digits demo (cvae, 8x8)", demo_repo, demo, args, tmp),
            measure("reference MLP 32-512-512-784", ref_repo, ref, args, tmp),
        ]
    head = ("model", "onnx MB", "start-up s", "RSS idle MB", "RSS n=1 MB", "RSS n=1024 MB")
    print(f"{head[0]:32}" + "".join(f"{h:>15}" for h in head[1:]))
    for r in results:
        cells = [
            f"{r['onnx_mb']:.2f}",
            f"{statistics.median(r['startup']):.2f}",
            f"{max(r['idle']):.0f}",
            f"{max(r['load1']):.0f}",
            f"{max(r['load1k']):.0f}",
        ]
        print(f"{r['label']:32}" + "".join(f"{c:>15}" for c in cells))
    print(
        f"load: {args.clients} clients x {args.load_s:g} s per n; start-up: median of "
        f"{args.repeats}; RSS: worst of {args.repeats}; MB = 10^6 bytes"
    )
    demo_peak = max(max(results[0][k]) for k in ("idle", "load1", "load1k"))
    verdict = "met" if demo_peak <= TARGET_MB else "missed"
    print(f"target RSS with the demo model <= {TARGET_MB:.0f} MB: {verdict} ({demo_peak:.0f} MB)")
    print(f"load average {os.getloadavg()[0]:.2f} at the end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
