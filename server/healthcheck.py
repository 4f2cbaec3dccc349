"""The container health probe: ask a server's grpc.health.v1 service whether it is SERVING.

Run as ``vae-healthcheck [--address HOST:PORT] [--service NAME] [--timeout S] [--tls-ca FILE]``;
it exits 0 if and only if the answer is SERVING, 1 otherwise (NOT_SERVING, unknown service,
unreachable, timed out), which is what Docker's HEALTHCHECK expects. It imports only grpcio and
grpcio-health-checking, so the serving image needs no downloaded probe binary and no torch.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

__all__ = ["DEFAULT_PORT", "ProbeResult", "probe", "default_address", "main"]

logger = logging.getLogger(__name__)

# The server's default gRPC port: 8001 is where Triton's tools look for gRPC.
DEFAULT_PORT = 8001


@dataclass(frozen=True)
class ProbeResult:
    """What one health check saw: the serving status name, or why there was none."""

    status: str  # "SERVING", "NOT_SERVING", ... or a gRPC code name: "UNAVAILABLE", "NOT_FOUND"
    detail: str = ""

    @property
    def serving(self) -> bool:
        return self.status == "SERVING"

    def __str__(self) -> str:
        return f"{self.status}: {self.detail}" if self.detail else self.status


def probe(
    address: str,
    service: str = "",
    timeout_s: float = 3.0,
    root_certificates: bytes | None = None,
) -> ProbeResult:
    """Call ``grpc.health.v1.Health/Check`` once.

    Args:
        address: ``host:port`` of the server.
        service: the service name to ask about; ``""`` means the server as a whole.
        timeout_s: deadline of the call, connection included.
        root_certificates: PEM CA bundle; when given, the channel uses TLS.

    Returns:
        The serving status, or the gRPC status code name when the call failed.
    """
    if root_certificates is None:
        channel = grpc.insecure_channel(address)
    else:
        creds = grpc.ssl_channel_credentials(root_certificates=root_certificates)
        channel = grpc.secure_channel(address, creds)
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
        except grpc.RpcError as exc:
            # What a failed unary call raises is also a grpc.Call, which has the status.
            if isinstance(exc, grpc.Call):
                return ProbeResult(exc.code().name, exc.details() or "")
            return ProbeResult("UNKNOWN", str(exc))
    return ProbeResult(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


def default_address(environ: Mapping[str, str]) -> str:
    """The loopback address of a server in the same container.

    It follows ``VAESERVE_PORT`` (the variable ``vae-serve`` reads), so that a HEALTHCHECK
    written once keeps probing the right port when a deployment moves the server.
    """
    return f"127.0.0.1:{environ.get('VAESERVE_PORT') or DEFAULT_PORT}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="vae-healthcheck",
        description="Exit 0 iff the vaeserve server's gRPC health service answers SERVING.",
    )
    parser.add_argument(
        "--address",
        default=None,
        help="host:port of the server (default: 127.0.0.1:$VAESERVE_PORT, else 127.0.0.1:8001)",
    )
    parser.add_argument(
        "--service",
        default="",
        help='service name to check (default: "", the server as a whole)',
    )
    parser.add_argument(
        "--timeout", type=float, default=3.0, help="deadline in seconds (default: 3)"
    )
    parser.add_argument("--tls-ca", type=Path, default=None, help="PEM CA bundle; enables TLS")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)

    address = args.address or default_address(os.environ)
    root_certificates = None
    if args.tls_ca is not None:
        try:
            root_certificates = args.tls_ca.read_bytes()
        except OSError as exc:
            logger.error("cannot read --tls-ca %s: %s", args.tls_ca, exc)
            return 1
    result = probe(address, args.service, args.timeout, root_certificates)
    # One line: Docker keeps it in `docker inspect`'s health log.
    logger.info("%s service=%r: %s", address, args.service, result)
    return 0 if result.serving else 1


if __name__ == "__main__":
    sys.exit(main())
