"""Open Inference Protocol ModelInfer on the decoder, driven by Triton's perf_analyzer, for
vae-serve and the reference servers of bench/perf_peers in one run.

perf_analyzer: --perf-analyzer PATH (or $PERF_ANALYZER); default <--pa-venv>/bin/perf_analyzer
if it exists, else the one beside this Python (the project venv's .venv/bin/perf_analyzer).
It links libcudart.so.12 even for a remote CPU server, and libb64.so.0d: --lib-dirs "A:B" (or
$PA_LIB_DIRS) go first on its LD_LIBRARY_PATH; default the nvidia-cuda-runtime-cu12 wheel's
directory under --pa-venv when present. A throwaway venv for it:
    python3.11 -m venv /tmp/pa
    /tmp/pa/bin/pip install 'tritonclient[all]==2.41.0' nvidia-cuda-runtime-cu12
    apt-get install -y libb64-0d

Run (project venv): python bench/bench_perf_analyzer.py [--interval-ms 2000]
    [--stability-percentage 25] [--serve-args "--max-queue-delay-ms 0"]
    [--cases 1x1,1x8,1x32,64x4,1024x2] [--servers vaeserve,noop,simple,threads]
    [--base-tree DIR] [--variants "i1=--instances 1;..."] [--rounds 1]

It exports bench_serving's random-weight reference MLP (32 -> 512 -> 512 -> 784) and starts,
each on 127.0.0.1 and a free port:
  vaeserve       vae-serve (default settings, CPU, plus --serve-args);
  vaeserve-base  the same from another source tree (--base-tree: a directory holding a
                 ``vaeserve`` package, first on PYTHONPATH and the server's working
                 directory), for before/after in one run;
  vaeserve[V]    vae-serve with variant V's extra flags (--variants "V=FLAGS;...");
  noop           perf_peers/noop_server.py: ModelInfer answers zeros, computes nothing;
  simple         perf_peers/simple_batcher.py: a ~100-line asyncio batcher on onnxruntime;
  threads        perf_peers/thread_pool_server.py: grpc's thread pool, one run per call;
  checked        perf_peers/thread_pool_checked.py: the same with vae-serve's own per-call
                 parse, checks, encoding and metrics (only with --servers ...,checked).
Then, case by case, every server in turn (so the noise of the shared cores falls on all
alike), --rounds times:
    perf_analyzer -i grpc -u 127.0.0.1:PORT -m reference-decoder -b B --concurrency-range C
(time windows of --interval-ms, perf_analyzer's stability rule with --stability-percentage,
at most 8 trials). Samples/s is perf_analyzer's inferences/s (requests x batch); p50/p99 are
its client-side latencies; with several rounds each is the median over rounds ("stability
%": the spread perf_analyzer was allowed when the case settled). Beside each
row: its ratio to the decoder in-process at that batch (the server's OnnxRunner), to the
no-op server, and to the better of the two peers (simple, threads).
"""

from __future__ import annotations

import argparse
import csv
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_footprint import Server  # noqa: E402
from bench_serving import export_reference_model, in_process_rates  # noqa: E402

CASES = ((1, 1), (1, 8), (1, 32), (64, 4), (1024, 2))  # (batch, concurrency)
PEERS = {
    "noop": "noop_server.py",
    "simple": "simple_batcher.py",
    "threads": "thread_pool_server.py",
    "checked": "thread_pool_checked.py",  # not a peer: vae-serve's checks on the thread pool
}
SERVERS = ("vaeserve", "noop", "simple", "threads")
_HERE = Path(__file__).resolve().parent


def perf_analyzer_path(args) -> Path:
    if args.perf_analyzer:
        return Path(args.perf_analyzer)
    beside = args.pa_venv / "bin" / "perf_analyzer"
    return beside if beside.exists() else Path(sys.prefix) / "bin" / "perf_analyzer"


def library_dirs(args) -> str:
    if args.lib_dirs is not None:
        return args.lib_dirs
    cudart = list((args.pa_venv / "lib").glob("python3*/site-packages/nvidia/cuda_runtime/lib"))
    return ":".join(str(d) for d in cudart[:1])


def perf_analyzer(port: int, model: str, batch: int, conc: int, args, out: Path):
    """(samples/s, p50 µs, p99 µs, the stability percentage that settled). On shared cores a
    case may not settle within 8 windows: it is retried with twice the allowed spread, twice,
    then given up (NaNs) rather than ending the whole run."""
    library_path = ":".join(p for p in (args.lib_dirs, os.environ.get("LD_LIBRARY_PATH")) if p)
    env = dict(os.environ, LD_LIBRARY_PATH=library_path)
    stability = args.stability_percentage
    for _ in range(3):
        command = [str(args.pa), "-i", "grpc", "-u", f"127.0.0.1:{port}", "-m", model]
        command += ["-b", str(batch), "--concurrency-range", str(conc)]
        command += ["--measurement-mode", "time_windows", "-p", str(args.interval_ms)]
        command += ["--max-trials", "8", "--stability-percentage", str(stability)]
        command += ["-f", str(out)]
        out.unlink(missing_ok=True)
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
        if done.returncode == 0 and out.exists():
            with open(out) as f:
                row = next(csv.DictReader(f))
            rate, p50, p99 = (float(row[k]) for k in ("Inferences/Second", "p50 latency",
                                                      "p99 latency"))  # fmt: skip
            return rate, p50, p99, stability
        if "stable measurement" not in done.stdout + done.stderr:
            raise RuntimeError(
                f"perf_analyzer failed ({done.returncode}):\n{done.stdout}{done.stderr}"
            )
        stability *= 2
    nan = float("nan")
    return nan, nan, nan, nan


class Peer:
    """A perf_peers server in a child process; it prints its port on its first line."""

    def __init__(self, script: str, decoder: Path, name: str, log: Path):
        command = [sys.executable, str(_HERE / "perf_peers" / script), "--onnx", str(decoder)]
        with open(log, "w") as f:
            self.process = subprocess.Popen(
                [*command, "--name", name], stdout=subprocess.PIPE, stderr=f, text=True
            )
        line = self.process.stdout.readline()
        if not line.strip().isdigit():
            self.stop()
            raise RuntimeError(f"{script} did not start: {log.read_text()}")
        self.port = int(line)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)


def start(kind: str, repository: Path, model: str, decoder: Path, tmp: Path, args):
    if kind in PEERS:
        return Peer(PEERS[kind], decoder, f"{model}-decoder", tmp / f"{kind}.log")
    flags = shlex.split(args.serve_args)
    if kind == "vaeserve":
        return Server(repository, model, tmp / f"{kind}.log", *flags)
    if kind.startswith("vaeserve["):
        name = kind[len("vaeserve[") : -1]
        variant = shlex.split(args.variants[name])
        return Server(repository, model, tmp / f"variant-{name}.log", *flags, *variant)
    if args.base_tree is None:
        raise SystemExit("vaeserve-base needs --base-tree")
    # The server runs `python -c`, whose sys.path starts with the working directory: started
    # from the project root it would import the project's own vaeserve, whatever PYTHONPATH.
    saved, cwd = os.environ.get("PYTHONPATH"), os.getcwd()
    os.environ["PYTHONPATH"] = ":".join(p for p in (str(args.base_tree), saved) if p)
    os.chdir(args.base_tree)
    try:
        return Server(repository, model, tmp / f"{kind}.log", *flags)
    finally:
        os.chdir(cwd)
        if saved is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = saved


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pa-venv", type=Path, default=Path("/tmp/pa"))
    parser.add_argument("--perf-analyzer", default=os.environ.get("PERF_ANALYZER"))
    parser.add_argument("--lib-dirs", default=os.environ.get("PA_LIB_DIRS"))
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
    parser.add_argument("--servers", default=",".join(SERVERS), help="which servers, in order")
    parser.add_argument("--base-tree", type=Path, help="source of the vaeserve-base server")
    parser.add_argument("--variants", default="", help='more vae-serve servers: "V=FLAGS;..."')
    parser.add_argument("--rounds", type=int, default=1, help="repeats; medians are printed")
    args = parser.parse_args(argv)
    args.variants = dict(v.split("=", 1) for v in args.variants.split(";") if v)
    args.pa, args.lib_dirs = perf_analyzer_path(args), library_dirs(args)
    cases = [tuple(int(v) for v in case.split("x")) for case in args.cases.split(",")]
    kinds = args.servers.split(",") + [f"vaeserve[{v}]" for v in args.variants]
    from vaeserve.manifest import load_version_manifest

    print(f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} at start")
    runs: dict[tuple, list] = {}
    with tempfile.TemporaryDirectory(prefix="vaeserve-pa-") as tmp:
        tmp = Path(tmp)
        repository, model = export_reference_model(tmp)
        version = repository / model / "1"
        manifest = load_version_manifest(version)
        decoder = version / manifest.decoder.file
        inproc = in_process_rates(decoder, manifest.latent_dim, 1.0)
        servers = {}
        try:
            for kind in kinds:
                servers[kind] = start(kind, repository, model, decoder, tmp, args)
            for _ in range(args.rounds):
                for batch, conc in cases:
                    for kind in kinds:
                        out = tmp / f"pa_{kind}_{batch}x{conc}.csv"
                        rate, p50, p99, settled = perf_analyzer(
                            servers[kind].port, f"{model}-decoder", batch, conc, args, out
                        )
                        row = (rate, p50 / 1e3, p99 / 1e3, settled, os.getloadavg()[0])
                        runs.setdefault((batch, conc, kind), []).append(row)
        finally:
            for server in servers.values():
                server.stop()
    report(cases, kinds, runs, inproc)
    print(f"load average {os.getloadavg()[0]:.2f} at the end")
    return 0


def report(cases, kinds, runs, inproc) -> None:
    head = ("batch", "conc", "server", "samples/s", "p50 ms", "p99 ms", "÷ in-proc", "÷ noop")
    head += ("÷ best peer", "stability %", "load1")
    print("".join(f"{h:>14}" for h in head))
    for batch, conc in cases:
        median = {
            kind: [statistics.median(v) for v in zip(*runs[(batch, conc, kind)], strict=True)]
            for kind in kinds
        }
        noop = median.get("noop", [None])[0]
        peers = [median[k][0] for k in ("simple", "threads") if k in median]
        best = max(peers) if peers else None
        for kind in kinds:
            rate, p50, p99, settled, load = median[kind]
            cells = (batch, conc, kind, f"{rate:,.0f}", f"{p50:.2f}", f"{p99:.2f}")
            cells += (f"{rate / inproc[batch].rate:.2f}",)
            cells += (f"{rate / noop:.2f}" if noop else "-", f"{rate / best:.2f}" if best else "-")
            print("".join(f"{c:>14}" for c in (*cells, f"{settled:.0f}", f"{load:.2f}")))


if __name__ == "__main__":
    sys.exit(main())
