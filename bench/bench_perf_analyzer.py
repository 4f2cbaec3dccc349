"""Open Inference Protocol ModelInfer on the decoder, driven by Triton's perf_analyzer.

Setup (once; a throwaway venv, not the project's):
    python3.11 -m venv /tmp/pa
    /tmp/pa/bin/pip install 'tritonclient[all]==2.41.0' nvidia-cuda-runtime-cu12
    apt-get install -y libb64-0d          # perf_analyzer links libb64.so.0d
perf_analyzer is then /tmp/pa/bin/perf_analyzer; it links libcudart.so.12 even for a remote
CPU server, found under the nvidia-cuda-runtime-cu12 wheel (this script puts that directory on
LD_LIBRARY_PATH).

Run (project venv): python bench/bench_perf_analyzer.py [--pa-venv /tmp/pa] [--interval-ms 2000]
    [--stability-percentage 25] [--serve-args "--max-queue-delay-ms 0"]
    [--cases 1x1,1x8,1x32,64x4,1024x2]

It exports bench_serving's random-weight reference MLP (32 -> 512 -> 512 -> 784), starts
vae-serve on 127.0.0.1 and a free port (default settings, CPU), and runs
    perf_analyzer -i grpc -u 127.0.0.1:PORT -m reference-decoder -b B --concurrency-range C
for B x C = 1x1, 1x8, 1x32, 64x4, 1024x2 (time windows of --interval-ms, perf_analyzer's
stability rule with --stability-percentage, at most 8 trials). Samples/s is
perf_analyzer's inferences/s (requests x batch); p50/p99 are its client-side latencies.
Beside each: the decoder in-process at that batch (the server's OnnxRunner,
bench_serving.in_process_rates) and the ratio.
"""

from __future__ import annotations

import argparse
import csv
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_footprint import Server  # noqa: E402
from bench_serving import export_reference_model, in_process_rates  # noqa: E402

CASES = ((1, 1), (1, 8), (1, 32), (64, 4), (1024, 2))  # (batch, concurrency)


def perf_analyzer(pa: Path, port: int, model: str, batch: int, conc: int, args, out: Path):
    cudart = next((args.pa_venv / "lib").glob("python3*/site-packages/nvidia/cuda_runtime/lib"))
    env = dict(os.environ, LD_LIBRARY_PATH=f"{cudart}:{os.environ.get('LD_LIBRARY_PATH', '')}")
    command = [str(pa), "-i", "grpc", "-u", f"127.0.0.1:{port}", "-m", model]
    command += ["-b", str(batch), "--concurrency-range", str(conc)]
    command += ["--measurement-mode", "time_windows", "-p", str(args.interval_ms)]
    command += ["--max-trials", "8", "--stability-percentage", str(args.stability_percentage)]
    command += ["-f", str(out)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    if done.returncode != 0 or not out.exists():
        raise RuntimeError(f"perf_analyzer failed ({done.returncode}):\n{done.stdout}{done.stderr}")
    with open(out) as f:
        row = next(csv.DictReader(f))
    return float(row["Inferences/Second"]), float(row["p50 latency"]), float(row["p99 latency"])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pa-venv", type=Path, default=Path("/tmp/pa"))
    parser.add_argument("--interval-ms", type=int, default=2000)
    parser.add_argument(
        "--stability-percentage",
        type=int,
        default=25,
        help="perf_analyzer's allowed spread between windows (its default 10 rarely settles "
        "on shared cores)",
    )
    parser.add_argument("--serve-args", default="", help="extra vae-serve flags")
    parser.add_argument(
        "--cases", default=",".join(f"{b}x{c}" for b, c in CASES), help="batchxconcurrency,..."
    )
    args = parser.parse_args(argv)
    cases = [tuple(int(v) for v in case.split("x")) for case in args.cases.split(",")]
    pa = args.pa_venv / "bin" / "perf_analyzer"
    from vaeserve.manifest import load_version_manifest

    print(f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} at start")
    with tempfile.TemporaryDirectory(prefix="vaeserve-pa-") as tmp:
        tmp = Path(tmp)
        repository, model = export_reference_model(tmp)
        version = repository / model / "1"
        manifest = load_version_manifest(version)
        inproc = in_process_rates(version / manifest.decoder.file, manifest.latent_dim, 1.0)
        flags = shlex.split(args.serve_args)
        server = Server(repository, model, tmp / "server.log", *flags)
        results = []
        try:
            for batch, conc in cases:
                csv_out = tmp / f"pa_{batch}x{conc}.csv"
                rate, p50, p99 = perf_analyzer(
                    pa, server.port, f"{model}-decoder", batch, conc, args, csv_out
                )
                results.append((batch, conc, rate, p50 / 1e3, p99 / 1e3, os.getloadavg()[0]))
        finally:
            server.stop()
    head = ("batch", "conc", "samples/s", "p50 ms", "p99 ms", "in-proc/s", "ratio", "load1")
    print("".join(f"{h:>11}" for h in head))
    for batch, conc, rate, p50, p99, load in results:
        base = inproc[batch].rate
        cells = (batch, conc, f"{rate:,.0f}", f"{p50:.2f}", f"{p99:.2f}", f"{base:,.0f}")
        cells += (f"{rate / base:.2f}", f"{load:.2f}")
        print("".join(f"{c:>11}" for c in cells))
    print(f"load average {os.getloadavg()[0]:.2f} at the end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
