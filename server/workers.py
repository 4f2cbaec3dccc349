"""``vae-serve --workers N``: N server processes on one port, under a supervisor.

One grpc.aio process spends most of a batch-1 call's CPU in gRPC's per-call work on a single
event loop (docs/performance.md), so more calls per second need more processes. Each worker
is a full ``vae-serve`` (its own repository load, batchers and onnxruntime sessions) bound to
the same host:port with SO_REUSEPORT; the kernel spreads incoming *connections* over them, so
one client channel stays on one worker and the spread needs several connections.

The supervisor:
- picks a concrete port first when asked for port 0 (each worker binding port 0 would get a
  different one) and holds it, bound but not listening, until the workers have theirs; the
  same for the REST port (``--http-port``), which the workers share likewise;
- gives each worker ``max(1, cores // N)`` onnxruntime intra-op threads unless
  ``--intra-op-threads`` was set, so N workers do not each start a thread per core;
- gives worker i the metrics port ``metrics_port + i`` (an HTTP port cannot be shared: a
  scrape would see one worker's counters at random) and logs each; port 0 stays "any free";
- forwards SIGTERM/SIGINT/SIGHUP to every worker; after SIGTERM/SIGINT it exits 0 when every
  worker stopped cleanly (exit 0, or killed by that signal before it could serve), else 1;
- exits 1, after stopping the others, when a worker exits without being asked to (a crash, a
  failed start, a failed load): a partial server would answer some connections and not others.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence

from vaeserve.server.settings import BatchingSettings, ServerSettings, usable_cores

__all__ = ["decode_settings", "encode_settings", "supervise", "worker_main", "worker_settings"]

logger = logging.getLogger(__name__)

_POLL_S = 0.1  # how often the supervisor looks at its workers
# After the grace period, how long workers get to close their batchers and exit before SIGKILL.
_EXIT_MARGIN_S = 10.0
_FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
_WORKER = "import sys; from vaeserve.server.workers import worker_main; sys.exit(worker_main())"


def worker_settings(
    settings: ServerSettings, port: int, index: int, http_port: int | None = None
) -> ServerSettings:
    """The settings worker ``index`` of ``settings.workers`` serves with, on ``port`` (and the
    REST port ``http_port``; None: as ``settings`` says)."""
    threads = settings.intra_op_threads or max(1, usable_cores() // settings.workers)
    metrics = settings.metrics_port
    if metrics:  # 0 (any free port) stays 0: each worker then logs the one it got
        metrics += index
    rest = settings.http_port if http_port is None else http_port
    return dataclasses.replace(
        settings, port=port, http_port=rest, workers=1, intra_op_threads=threads,
        metrics_port=metrics,
    )  # fmt: skip


def encode_settings(settings: ServerSettings) -> str:
    """Settings as JSON text for a worker's command line (the server never unpickles)."""
    return json.dumps(dataclasses.asdict(settings), default=str)  # Paths as text


def decode_settings(text: str) -> ServerSettings:
    values = json.loads(text)
    batching = BatchingSettings(**values.pop("batching"))
    return ServerSettings(**values, batching=batching)


def _reserve_port(host: str, port: int) -> socket.socket:
    """A socket bound to host:port with SO_REUSEPORT, not listening: it keeps the port ours
    while the workers bind it, and receives no connections itself."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    return sock


class _Worker:
    def __init__(self, index: int, settings: ServerSettings):
        self.index = index
        self.ready = False
        self.asked_to_stop = False
        read, write = os.pipe()
        os.set_blocking(read, False)
        payload = encode_settings(settings)
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-c", _WORKER, payload, str(index), str(write)],
                pass_fds=(write,),
            )
        except BaseException:
            os.close(read)
            raise
        finally:
            os.close(write)
        self._ready_fd = read

    def poll_ready(self) -> bool:
        """Whether the worker has said it is SERVING (a byte on its pipe)."""
        if not self.ready:
            try:
                self.ready = bool(os.read(self._ready_fd, 1))
            except BlockingIOError:
                pass
        return self.ready

    def signal(self, sig: int) -> None:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        self.asked_to_stop |= sig != signal.SIGHUP

    def stop(self) -> None:
        """SIGTERM, once: a second one reaching a worker whose event loop has already closed
        (its handlers gone) would kill it instead of being ignored."""
        if not self.asked_to_stop:
            self.signal(signal.SIGTERM)

    def close(self) -> None:
        os.close(self._ready_fd)


def supervise(settings: ServerSettings) -> int:
    """Run ``settings.workers`` workers until a signal stops them; return the exit code."""
    n = settings.workers
    if settings.metrics_port and settings.metrics_port + n - 1 > 65535:
        logger.error("cannot start: --metrics-port %d + %d workers passes 65535",
                     settings.metrics_port, n)  # fmt: skip
        return 2
    reserved: list[socket.socket] = []
    try:
        for wanted in (settings.port, settings.http_port):
            if wanted is not None:
                reserved.append(_reserve_port(settings.host, wanted))
    except OSError as exc:
        for sock in reserved:
            sock.close()
        logger.error("cannot start: could not bind %s:%d: %s", settings.host, wanted, exc)
        return 2
    port = reserved[0].getsockname()[1]
    http_port = None if settings.http_port is None else reserved[1].getsockname()[1]
    stop_signal: list[int] = []
    workers: list[_Worker] = []

    def forward(sig: int, _frame: object) -> None:
        if sig != signal.SIGHUP:
            stop_signal.append(sig)
        for w in workers:
            w.signal(sig)

    previous = {sig: signal.signal(sig, forward) for sig in _FORWARDED}
    try:
        for i in range(n):
            if stop_signal:  # asked to stop while starting: start no more
                break
            s = worker_settings(settings, port, i, http_port)
            try:
                workers.append(_Worker(i, s))
            except OSError as exc:
                logger.error("cannot start worker %d: %s", i, exc)
                return 2
            metrics = "" if s.metrics_port is None else f", metrics port {s.metrics_port}"
            logger.info("worker %d: pid %d, %d intra-op threads%s",
                        i, workers[-1].process.pid, s.intra_op_threads, metrics)  # fmt: skip
        rest = "" if http_port is None else f", REST port {http_port}"
        logger.info("supervising %d workers on %s:%d%s", n, settings.host, port, rest)
        return _watch(workers, settings, stop_signal, reserved)
    finally:
        _stop_all(workers, settings.grace_period_s)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for w in workers:
            w.close()
        for sock in reserved:
            sock.close()


def _watch(
    workers: Sequence[_Worker],
    settings: ServerSettings,
    stop_signal: list[int],
    reserved: Sequence[socket.socket],
) -> int:
    """Wait for a stop signal or a worker's unexpected exit; return the exit code."""
    all_ready = False
    while not stop_signal:
        for w in workers:
            code = w.process.poll()
            if code is not None and not stop_signal:
                logger.error("worker %d (pid %d) exited with code %d; stopping the others",
                             w.index, w.process.pid, code)  # fmt: skip
                return 1
        if not all_ready and all(w.poll_ready() for w in workers):
            all_ready = True
            for sock in reserved:
                sock.close()  # every worker has bound the ports by now
            logger.info("ready: all %d workers are SERVING", len(workers))
        time.sleep(_POLL_S)
    logger.info("stopping %d workers (signal %d)", len(workers), stop_signal[0])
    codes = _stop_all(workers, settings.grace_period_s)
    # A worker still importing has no handler yet and dies of the signal itself; it had
    # nothing in flight, so that is a clean stop too.
    clean = {0, -signal.SIGTERM, -signal.SIGINT}
    if any(code not in clean for code in codes):
        logger.error("worker exit codes %s", codes)
        return 1
    logger.info("stopped")
    return 0


def _stop_all(workers: Sequence[_Worker], grace_s: float) -> list[int]:
    """SIGTERM the workers still running, wait out the grace period, SIGKILL what is left."""
    for w in workers:
        w.stop()
    deadline = time.monotonic() + grace_s + _EXIT_MARGIN_S
    codes = []
    for w in workers:
        try:
            codes.append(w.process.wait(max(0.0, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            logger.error("worker %d (pid %d) did not exit; killing it", w.index, w.process.pid)
            w.process.kill()
            codes.append(w.process.wait())
    return codes


def worker_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of one worker process: ``SETTINGS INDEX READY_FD`` from the supervisor."""
    from vaeserve.server.app import run
    from vaeserve.server.logs import configure_logging

    payload, index, ready_fd = sys.argv[1:] if argv is None else argv
    settings = decode_settings(payload)
    configure_logging(settings.log_level, settings.log_format)
    fd = int(ready_fd)

    def ready() -> None:
        os.write(fd, b"r")
        os.close(fd)

    logger.info("worker %s started (pid %d)", index, os.getpid())
    return run(settings, reuse_port=True, on_ready=ready)
