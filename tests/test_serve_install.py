"""The serve image's install, without Docker: `pip install .[serve]` into a fresh venv.

What the `serve` stage of the Dockerfile installs (the same build context, the same pins) must
import and run the server without torch. The venv then serves a tiny exported model the way
the container does: configured only by VAESERVE_* variables, probed by `vae-healthcheck` with
no arguments, asked about every health check named under deploy/, and stopped by SIGTERM.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from build_context import build_context
from export_fixtures import save_tiny_checkpoint, tiny_config
from test_deployment import deploy_health_checks

from vaeserve.export import onnx_export

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
_PIP_TIMEOUT_S = 240


@pytest.fixture(scope="module")
def serve_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv holding `.[serve]` under the image's pins; its bin/ folder."""
    tmp = tmp_path_factory.mktemp("serve-install")
    context = build_context(tmp / "context")
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    # pip's cache is shared with the developer's: a warm run installs in seconds.
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet"]
    constraints = ROOT / "deploy" / "constraints-serve.txt"
    proc = subprocess.run(
        [*pip, f"{context}[serve]", "-c", str(constraints)],
        capture_output=True, text=True, env=env, timeout=_PIP_TIMEOUT_S,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return venv / "bin"


def test_serve_extra_installs_no_torch(serve_venv: Path) -> None:
    proc = subprocess.run(
        [str(serve_venv / "python"), "-m", "pip", "list", "--format=json"],
        capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    installed = {p["name"].lower() for p in json.loads(proc.stdout)}
    assert {"onnxruntime", "grpcio", "grpcio-health-checking", "vaeserve"} <= installed
    heavy = sorted(n for n in installed if n in {"torch", "onnx", "triton"} or "nvidia" in n)
    assert not heavy, f"the serve extra pulled in {heavy}"


def test_server_imports_without_torch(serve_venv: Path, tmp_path: Path) -> None:
    code = (
        "import sys, vaeserve.server.app, vaeserve.server.healthcheck; "
        "sys.exit('torch' in sys.modules)"
    )
    # From an empty folder, so that the installed package is imported, not this checkout.
    proc = subprocess.run(
        [str(serve_venv / "python"), "-c", code],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr or "importing the server imported torch"


@pytest.mark.parametrize("script", ["vae-serve", "vae-healthcheck"])
def test_console_scripts_run(serve_venv: Path, script: str, tmp_path: Path) -> None:
    proc = subprocess.run(
        [str(serve_venv / script), "--help"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model repository holding one tiny CVAE, exported with this checkout's exporter."""
    tmp = tmp_path_factory.mktemp("repository")
    checkpoint = save_tiny_checkpoint(
        tmp / "checkpoint.pt", tiny_config(kind="cvae", conditioning="concat")
    )
    repo = tmp / "models"
    args = ["--checkpoint", str(checkpoint), "--repository", str(repo), "--name", "digits"]
    assert onnx_export.main([*args, "--quiet"]) == 0
    return repo


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _healthcheck(bin_dir: Path, env: dict[str, str], *args: str) -> int:
    return subprocess.run(
        [str(bin_dir / "vae-healthcheck"), "--timeout", "2", *args],
        env=env, capture_output=True, timeout=30,
    ).returncode  # fmt: skip


def test_serves_like_the_container(serve_venv: Path, repository: Path, tmp_path: Path) -> None:
    # The image's ENV, but on loopback: a test opens no port to the network.
    port = _free_port()
    env = {
        **os.environ,
        "VAESERVE_REPOSITORY": str(repository),
        "VAESERVE_HOST": "127.0.0.1",
        "VAESERVE_PORT": str(port),
    }
    server = subprocess.Popen(
        [str(serve_venv / "vae-serve"), "--http-port", "off"], env=env, cwd=tmp_path,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while _healthcheck(serve_venv, env) != 0:
            assert server.poll() is None, f"vae-serve exited:\n{server.communicate()[0]}"
            assert time.monotonic() < deadline, "vae-serve never reported SERVING"
            time.sleep(0.2)
        for where, deploy_port, service in deploy_health_checks():
            address = f"127.0.0.1:{port}"  # deploy_port is the default, checked elsewhere
            rc = _healthcheck(serve_venv, env, "--address", address, "--service", service)
            assert rc == 0, f"{where} (port {deploy_port}) asks for {service!r}: not SERVING"
        server.send_signal(signal.SIGTERM)
        output, _ = server.communicate(timeout=30)
        assert server.returncode == 0, output
        assert _healthcheck(serve_venv, env) == 1
    finally:
        if server.poll() is None:
            server.kill()
            server.communicate()
