"""``vae-serve --workers N``: a supervisor and N server processes sharing one port.

The server runs as a real child process (tiny exported model, 127.0.0.1, port 0); which
worker answered is read from each worker's own metrics endpoint.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import grpc
import pytest
from client_fixtures import VAE, OutputLines, tiny_repository
from serving_fixtures import _copy_version, channel

from vaeserve.proto.v1 import vaeserve_pb2 as pb
from vaeserve.proto.v1 import vaeserve_pb2_grpc as pb_grpc
from vaeserve.server.settings import BatchingSettings, ServerSettings
from vaeserve.server.workers import decode_settings, encode_settings, worker_settings

_SERVE = "import sys; from vaeserve.server.cli import main; sys.exit(main())"  # vae-serve
GRACE_S = 5.0
EXIT_S = GRACE_S + 15.0  # the supervisor's own bound (grace + 10 s), plus slack for load
T = 30.0  # per-call timeout: a hung server fails the test instead of hanging it
CHANNELS = 24  # fresh connections; all landing on one of 2 workers has odds 2**-23


@pytest.fixture(scope="module")
def repository(tmp_path_factory) -> Path:
    return tiny_repository(tmp_path_factory)


class Supervisor:
    """``vae-serve --workers N`` as a child process, with its (and its workers') stderr."""

    def __init__(self, repository: Path, *flags: str, workers: int = 2):
        command = [sys.executable, "-c", _SERVE, "--repository", str(repository)]
        command += ["--port", "0", "--http-port", "off", "--device", "cpu"]
        command += ["--workers", str(workers)]
        command += ["--grace-period-s", str(GRACE_S), *flags]
        self.process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
        self.output = OutputLines(self.process)
        self.pids = [
            int(self.output.wait_for(rf"worker {i}: pid (\d+)").group(1)) for i in range(workers)
        ]
        line = self.output.wait_for(r"supervising \d+ workers on [^,]*:(\d+)(?:, REST port (\d+))?")
        self.port = int(line.group(1))
        self.rest_port = None if line.group(2) is None else int(line.group(2))

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(T)
        for pid in self.pids:  # never leave a worker behind a failed test
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        self.output.text()


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not count: it has exited, only unreaped)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def list_models_calls(metrics_port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=T) as r:
        text = r.read().decode()
    lines = [ln for ln in text.splitlines() if ln.startswith("vaeserve_requests_total{")]
    return sum(float(ln.rsplit(" ", 1)[1]) for ln in lines if "ListModels" in ln)


def fresh_channel(address: str) -> grpc.Channel:
    # A process-wide subchannel pool would put every channel on one shared connection.
    return grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])


def test_two_workers_share_the_port_answer_and_stop_with_exit_0(repository, tmp_path):
    repository = Path(shutil.copytree(repository, tmp_path / "models"))  # SIGHUP adds to it
    server = Supervisor(repository, "--metrics-port", "0")
    try:
        out = server.output
        metrics = {int(out.wait_for(r"metrics at http://\S+:(\d+)/").group(1)) for _ in range(2)}
        out.wait_for("ready: all 2 workers are SERVING")
        assert len(metrics) == 2 and len(set(server.pids)) == 2
        address = f"127.0.0.1:{server.port}"
        for _ in range(CHANNELS):
            with fresh_channel(address) as ch:
                models = pb_grpc.VaeServiceStub(ch).ListModels(pb.ListModelsRequest(), timeout=T)
                assert VAE in [m.name for m in models.models]
        with channel(address) as ch:
            request = pb.SampleRequest(model=pb.ModelRef(name=VAE), num_samples=3, seed=7)
            answer = pb_grpc.VaeServiceStub(ch).Sample(request, timeout=T)
            assert list(answer.samples.shape) == [3, 1, 8, 8]
        counts = [list_models_calls(port) for port in sorted(metrics)]
        assert sum(counts) == CHANNELS and all(c > 0 for c in counts), counts

        _copy_version(repository, VAE, 2)
        server.process.send_signal(signal.SIGHUP)  # forwarded: every worker rescans
        for _ in range(2):
            out.wait_for(r"rescan: 1 version\(s\) loaded or tried")

        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(EXIT_S) == 0, out.text()
        assert not any(alive(pid) for pid in server.pids)
        text = out.text()
        # Idle workers drained at once and exited by themselves: their logs and the
        # supervisor's say so, rather than a clock compared with the grace period.
        assert "did not finish within the grace period" not in text, text
        assert "did not exit; killing it" not in text, text
        assert len(re.findall(r"vaeserve\.server\.app: stopped$", text, re.M)) == 2, text
        assert re.search(r"vaeserve\.server\.workers: stopped$", text, re.M), text
    finally:
        server.close()


def test_a_killed_worker_stops_the_rest_and_fails_the_supervisor(repository):
    server = Supervisor(repository, "--intra-op-threads", "1")
    try:
        server.output.wait_for("ready: all 2 workers are SERVING")
        os.kill(server.pids[1], signal.SIGKILL)
        assert server.process.wait(EXIT_S) == 1
        text = server.output.text()
        assert re.search(r"worker 1 \(pid \d+\) exited with code -9; stopping the others", text)
        assert not any(alive(pid) for pid in server.pids)
    finally:
        server.close()


def test_a_worker_that_cannot_load_fails_the_supervisor(repository):
    server = Supervisor(repository, "--models", "absent", "--intra-op-threads", "1")
    try:
        assert server.process.wait(EXIT_S) == 1
        assert "cannot serve: models ['absent'] have no folder" in server.output.text()
        assert not any(alive(pid) for pid in server.pids)
    finally:
        server.close()


def test_a_port_taken_by_another_program_is_refused(repository):
    with socket.socket() as taken:  # no SO_REUSEPORT: the port is not ours to share
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        command = [sys.executable, "-c", _SERVE, "--repository", str(repository)]
        command += ["--port", str(port), "--http-port", "off", "--workers", "2"]
        done = subprocess.run(command, capture_output=True, text=True, timeout=T)
    assert done.returncode == 2
    assert f"could not bind 127.0.0.1:{port}" in done.stderr


def test_each_worker_gets_a_share_of_the_cores_and_a_metrics_port_of_its_own():
    base = ServerSettings(repository=Path("m"), workers=2, metrics_port=9100)
    cores = len(os.sched_getaffinity(0))
    first, second = (worker_settings(base, 8123, i) for i in range(2))
    assert (first.port, first.workers, first.metrics_port) == (8123, 1, 9100)
    assert second.metrics_port == 9101
    assert first.intra_op_threads == second.intra_op_threads == max(1, cores // 2)
    many = ServerSettings(repository=Path("m"), workers=64)
    assert worker_settings(many, 1, 5).intra_op_threads == 1
    chosen = ServerSettings(repository=Path("m"), workers=2, intra_op_threads=3)
    assert worker_settings(chosen, 1, 1).intra_op_threads == 3
    for off in (None, 0):  # off stays off; "any free port" stays that, per worker
        s = ServerSettings(repository=Path("m"), workers=2, metrics_port=off)
        assert worker_settings(s, 1, 1).metrics_port == off


def test_settings_reach_a_worker_unchanged():
    settings = ServerSettings(
        repository=Path("/srv/models"),
        models=("a", "b"),
        tls_cert="/etc/tls/cert.pem",
        tls_key="/etc/tls/key.pem",
        metrics_port=9100,
        workers=3,
        batching=BatchingSettings(max_batch_size=7, max_queue_delay_ms=0.5),
    )
    assert decode_settings(encode_settings(settings)) == settings


def _requests_of(metrics_port: int, rpc: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=T) as r:
        text = r.read().decode()
    lines = [ln for ln in text.splitlines() if ln.startswith("vaeserve_requests_total{")]
    return sum(float(ln.rsplit(" ", 1)[1]) for ln in lines if f'rpc="{rpc}"' in ln)


def test_workers_share_one_rest_port_picked_by_the_supervisor(repository):
    # --http-port 0 with each worker binding 0 itself would give every worker its own port.
    server = Supervisor(repository, "--http-port", "0", "--metrics-port", "0")
    try:
        out = server.output
        rest_port = server.rest_port
        metrics = {int(out.wait_for(r"metrics at http://\S+:(\d+)/").group(1)) for _ in range(2)}
        out.wait_for("ready: all 2 workers are SERVING")
        assert rest_port is not None and rest_port not in (0, server.port)
        for _ in range(CHANNELS):  # urllib opens a new connection per request
            url = f"http://127.0.0.1:{rest_port}/v2/models/{VAE}-decoder"
            with urllib.request.urlopen(url, timeout=T) as answer:
                assert answer.status == 200
        counts = [_requests_of(port, "ModelMetadata") for port in sorted(metrics)]
        assert sum(counts) == CHANNELS and all(c > 0 for c in counts), counts
    finally:
        server.close()
