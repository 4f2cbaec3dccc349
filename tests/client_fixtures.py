"""A real server for the client's tests: a tiny exported model repository and vae-serve.

Imported by test_client.py and test_generate.py (not a test module itself). The repository
is exported once per test session; each module starts its own server on 127.0.0.1, port 0
(in-process through serving_fixtures.ServerThread, or as a child process it can kill).
"""

from __future__ import annotations

import queue
import re
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

CVAE = "tiny-cvae"
VAE = "tiny-vae"
START_TIMEOUT_S = 60.0
_REPOSITORY: list[Path] = []
_SERVE = "import sys; from vaeserve.server.cli import main; sys.exit(main())"  # vae-serve


def tiny_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model repository holding a concat CVAE and a VAE (latent 2, hidden 16, 1x8x8)."""
    if not _REPOSITORY:
        from export_fixtures import save_tiny_checkpoint, tiny_config

        from vaeserve.export.onnx_export import export_checkpoint

        root = tmp_path_factory.mktemp("client-repo")
        for name, config in (
            (CVAE, tiny_config(kind="cvae", conditioning="concat")),
            (VAE, tiny_config()),
        ):
            checkpoint = save_tiny_checkpoint(root / f"{name}.pt", config)
            export_checkpoint(checkpoint, root / "models", name)
        _REPOSITORY.append(root / "models")
    return _REPOSITORY[0]


class OutputLines:
    """A child process's stderr, line by line, read on a thread so waits can time out."""

    def __init__(self, process: subprocess.Popen):
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._thread = threading.Thread(target=self._read, args=(process.stderr,), daemon=True)
        self._thread.start()

    def _read(self, stream) -> None:
        with stream:
            for line in stream:
                self._queue.put(line)
        self._queue.put(None)

    def wait_for(self, pattern: str, timeout_s: float = START_TIMEOUT_S) -> re.Match:
        """The first new line matching ``pattern``; fails the test at EOF or after timeout_s."""
        regex = re.compile(pattern)
        while True:
            try:
                line = self._queue.get(timeout=timeout_s)
            except queue.Empty:
                pytest.fail(f"no line matching {pattern!r} within {timeout_s} s: {self.text()}")
            if line is None:
                pytest.fail(f"output ended without a line matching {pattern!r}: {self.text()}")
            self.lines.append(line)
            match = regex.search(line)
            if match:
                return match

    def text(self) -> str:
        self._thread.join(timeout=5)
        while not self._queue.empty():
            line = self._queue.get()
            if line is not None:
                self.lines.append(line)
        return "".join(self.lines)


class ServerProcess:
    """``vae-serve`` in a child process, which a test can SIGKILL and start again."""

    def __init__(self, repository: Path, port: int = 0, flags: Sequence[str] = ()):
        command = [sys.executable, "-c", _SERVE, "--repository", str(repository)]
        # REST off unless flags turn it on (the last --http-port wins): not Triton's 8000.
        command += ["--port", str(port), "--http-port", "off", "--device", "cpu"]
        command += ["--intra-op-threads", "1", *flags]
        self.process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
        self.output = OutputLines(self.process)
        self.port = int(self.output.wait_for(r"listening on .*:(\d+)").group(1))
        self.output.wait_for("health is SERVING")

    def kill(self) -> None:
        self.process.kill()
        self.process.wait(timeout=START_TIMEOUT_S)
        self.output.text()  # waits for the reader to reach EOF and close the pipe


@dataclass(frozen=True)
class Served:
    repository: Path
    port: int
    cvae: str = CVAE
    vae: str = VAE

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


def serve(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """Body of a module-scoped ``served`` fixture: a server on 127.0.0.1, port 0."""
    from serving_fixtures import ServerThread

    from vaeserve.server.settings import ServerSettings

    repository = tiny_repository(tmp_path_factory)
    settings = ServerSettings(repository=repository, port=0, device="cpu", intra_op_threads=1)
    server = ServerThread(settings)
    try:
        yield Served(repository, server.port)
    finally:
        server.stop(grace_s=1.0)


def free_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Hangup:
    """A TCP listener that accepts connections and closes them at once, counting them: an
    address that is dialled but never serves."""

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.1)
        self.port = self._listener.getsockname()[1]
        self.address = f"127.0.0.1:{self.port}"
        self.accepted = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                connection, _ = self._listener.accept()
            except TimeoutError:
                continue
            self.accepted += 1
            connection.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._listener.close()
