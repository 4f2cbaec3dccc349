"""vae-healthcheck against a real grpc.aio server that runs only the standard health service."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import pytest
from client_fixtures import free_port
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from vaeserve.server import healthcheck

SERVICE = "vaeserve.v1.VaeService"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@asynccontextmanager
async def _health_server(
    credentials: grpc.ServerCredentials | None = None,
) -> AsyncIterator[tuple[health.aio.HealthServicer, int]]:
    server = grpc.aio.server()
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    if credentials is None:
        port = server.add_insecure_port("127.0.0.1:0")
    else:
        port = server.add_secure_port("127.0.0.1:0", credentials)
    await server.start()
    try:
        yield servicer, port
    finally:
        await server.stop(None)


async def _probe_main(*argv: str) -> int:
    # The probe is blocking; run it off the loop that serves it.
    return await asyncio.to_thread(healthcheck.main, list(argv))


@pytest.mark.parametrize(
    ("service", "status", "expected"),
    [
        pytest.param("", SERVING, 0, id="server-serving"),
        pytest.param("", NOT_SERVING, 1, id="server-not-serving"),
        pytest.param(SERVICE, SERVING, 0, id="service-serving"),
        pytest.param(SERVICE, NOT_SERVING, 1, id="service-not-serving"),
    ],
)
def test_exit_code_follows_serving_status(service: str, status: int, expected: int) -> None:
    async def scenario() -> int:
        async with _health_server() as (servicer, port):
            await servicer.set(service, status)
            return await _probe_main("--address", f"127.0.0.1:{port}", "--service", service)

    assert asyncio.run(scenario()) == expected


def test_unknown_service_is_unhealthy() -> None:
    async def scenario() -> healthcheck.ProbeResult:
        async with _health_server() as (_, port):
            return await asyncio.to_thread(
                healthcheck.probe, f"127.0.0.1:{port}", "no.such.Service"
            )

    result = asyncio.run(scenario())
    assert isinstance(result, healthcheck.ProbeResult)
    assert (result.status, result.serving) == ("NOT_FOUND", False)


def test_graceful_shutdown_turns_unhealthy() -> None:
    async def scenario() -> tuple[int, int]:
        async with _health_server() as (servicer, port):
            address = f"127.0.0.1:{port}"
            await servicer.set(SERVICE, SERVING)
            before = await _probe_main("--address", address)
            await servicer.enter_graceful_shutdown()
            return before, await _probe_main("--address", address)

    assert asyncio.run(scenario()) == (0, 1)


def test_nothing_listening_is_unhealthy_within_the_timeout() -> None:
    with socket.socket() as sock:  # a port that was free a moment ago, now closed
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    result = healthcheck.probe(f"127.0.0.1:{port}", timeout_s=2.0)
    assert result.status in {"UNAVAILABLE", "DEADLINE_EXCEEDED"}
    assert not result.serving


def test_default_address_follows_vaeserve_port() -> None:
    assert healthcheck.default_address({}) == "127.0.0.1:8001"
    assert healthcheck.default_address({"VAESERVE_PORT": "9001"}) == "127.0.0.1:9001"


def test_unreadable_ca_file_is_unhealthy(tmp_path: Path) -> None:
    missing = tmp_path / "missing-ca.pem"
    assert healthcheck.main(["--address", "127.0.0.1:1", "--tls-ca", str(missing)]) == 1


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_tls_with_ca_bundle(tmp_path: Path) -> None:
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    credentials = grpc.ssl_server_credentials([(key.read_bytes(), cert.read_bytes())])

    async def scenario() -> tuple[int, int]:
        async with _health_server(credentials) as (_, port):
            address = f"127.0.0.1:{port}"
            with_ca = await _probe_main("--address", address, "--tls-ca", str(cert))
            plaintext = await _probe_main("--address", address, "--timeout", "2")
            return with_ca, plaintext

    assert asyncio.run(scenario()) == (0, 1)


def test_console_script_exit_code_and_no_torch() -> None:
    """What Docker runs: the installed ``vae-healthcheck`` script, in a fresh process that must
    not load torch (``-X importtime`` lists every module it imports)."""
    script = Path(sys.executable).with_name("vae-healthcheck")
    assert script.is_file(), f"{script}: the console script is not installed"

    def probe(port: int) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "VAESERVE_PORT": str(port)}
        return subprocess.run(
            [sys.executable, "-X", "importtime", str(script), "--timeout", "2"],
            env=env, capture_output=True, text=True, timeout=30,
        )  # fmt: skip

    async def scenario() -> tuple[subprocess.CompletedProcess[str], str]:
        async with _health_server() as (_, port):
            return await asyncio.to_thread(probe, port), f"127.0.0.1:{port}"

    proc, address = asyncio.run(scenario())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert address in proc.stdout and "SERVING" in proc.stdout
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines()}
    assert "vaeserve.server.healthcheck" in imported  # the script ran our entry point
    assert not {name for name in imported if name.split(".")[0] == "torch"}
    assert probe(free_port()).returncode == 1  # nothing listens: not SERVING
