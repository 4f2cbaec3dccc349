"""Transport security and bearer-token auth for the gRPC port.

TLS: ``server_credentials`` builds the port's credentials from PEM files; with a client CA the
server asks for, and verifies, a client certificate (mutual TLS).

Auth: with a token file, ``BearerTokenInterceptor`` lets a call through only when its
``authorization`` metadata is ``Bearer <token>``; everything else ends UNAUTHENTICATED before
any servicer code runs. Health checks stay open so that probes and load balancers need no
secret. The token is compared in constant time and never logged.
"""

from __future__ import annotations

import hmac
import logging
import os
import stat
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

import grpc

from vaeserve.server.handlers import rewrapped
from vaeserve.server.settings import ServerSettings

__all__ = [
    "bearer_credential",
    "settings_credentials",
    "UNAUTHENTICATED_MESSAGE",
    "OPEN_METHOD_PREFIXES",
    "server_credentials",
    "read_token",
    "BearerTokenInterceptor",
]

logger = logging.getLogger(__name__)

UNAUTHENTICATED_MESSAGE = "missing or invalid bearer token in 'authorization' metadata"
# Liveness/readiness only: they tell nothing about the models. ModelReady and reflection name
# models, so they need the token like everything else.
OPEN_METHOD_PREFIXES = (
    "/grpc.health.v1.Health/",
    "/inference.GRPCInferenceService/ServerLive",
    "/inference.GRPCInferenceService/ServerReady",
)
_MAX_TOKEN_BYTES = 4096


def _read_pem(path: str | os.PathLike[str], what: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"{what} {path}: cannot be read ({exc.strerror})") from None
    if b"-----BEGIN " not in data:
        raise ValueError(f"{what} {path}: expected a PEM file (-----BEGIN ...)")
    return data


def server_credentials(
    cert_file: str | os.PathLike[str],
    key_file: str | os.PathLike[str],
    client_ca_file: str | os.PathLike[str] | None = None,
) -> grpc.ServerCredentials:
    """TLS credentials for the server's port.

    Args:
        cert_file: PEM certificate chain of the server (its SAN must name the address clients
            dial, e.g. ``localhost`` or the service's DNS name).
        key_file: PEM private key of that certificate.
        client_ca_file: PEM CA bundle; when given, every client must present a certificate
            signed by it (the handshake fails otherwise).

    Raises:
        ValueError: a file that is missing, unreadable or not PEM, naming it.
    """
    pair = (_read_pem(key_file, "TLS key"), _read_pem(cert_file, "TLS certificate"))
    client_ca = None if client_ca_file is None else _read_pem(client_ca_file, "TLS client CA")
    return grpc.ssl_server_credentials(
        [pair], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


def read_token(path: str | os.PathLike[str]) -> str:
    """The bearer token held in ``path`` (surrounding whitespace removed).

    Warns, without printing the token, when the file is readable by other users.

    Raises:
        ValueError: the file cannot be read, is empty, too long, or has characters that do
            not fit in gRPC metadata.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
        mode = path.stat().st_mode
    except OSError as exc:
        raise ValueError(f"auth token file {path}: cannot be read ({exc.strerror})") from None
    token = data.strip()
    if not token or len(token) > _MAX_TOKEN_BYTES:
        raise ValueError(f"auth token file {path}: expected 1 to {_MAX_TOKEN_BYTES} bytes of token")
    if not all(0x21 <= b <= 0x7E for b in token):
        raise ValueError(
            f"auth token file {path}: expected printable ASCII without spaces (gRPC metadata)"
        )
    if mode & (stat.S_IRGRP | stat.S_IROTH):
        logger.warning("auth token file %s is readable by other users; chmod 600 it", path)
    return token.decode("ascii")


def bearer_credential(authorization: str) -> bytes:
    """The token of an ``Authorization: Bearer <token>`` value (b"": another scheme or none),
    as bytes for ``hmac.compare_digest``; gRPC metadata and REST headers alike."""
    scheme, _, credential = authorization.partition(" ")
    if scheme.lower() == "bearer":
        return credential.strip().encode("latin-1", "replace")
    return b""


def _bearer(metadata: Iterable[tuple[str, Any]] | None) -> bytes:
    for key, value in metadata or ():
        if key == "authorization":
            text = value.decode("latin-1") if isinstance(value, bytes) else str(value)
            return bearer_credential(text)
    return b""


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Ends every call without the right ``authorization: Bearer <token>`` UNAUTHENTICATED."""

    def __init__(self, token: str, open_prefixes: Iterable[str] = OPEN_METHOD_PREFIXES):
        self._token = token.encode("ascii")
        self._open = tuple(open_prefixes)

    def __repr__(self) -> str:
        return "BearerTokenInterceptor(token=<redacted>)"

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = handler_call_details.method or ""
        if method.startswith(self._open):
            return await continuation(handler_call_details)
        # compare_digest takes the same time wherever the first differing byte is.
        if hmac.compare_digest(_bearer(handler_call_details.invocation_metadata), self._token):
            return await continuation(handler_call_details)
        # The request observer, outside this interceptor, logs and counts the rejection.
        return _rejecting(await continuation(handler_call_details))


def _unread(data: bytes) -> None:
    return None


def _rejecting(handler: grpc.RpcMethodHandler | None) -> grpc.RpcMethodHandler:
    """A handler of the same kind as ``handler`` that ends the call UNAUTHENTICATED."""

    async def reject(request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_MESSAGE)

    async def reject_stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_MESSAGE)
        yield  # pragma: no cover - abort raises; the yield makes this an async generator

    if handler is None:  # an unknown method: still say UNAUTHENTICATED, not what exists
        return grpc.unary_unary_rpc_method_handler(reject, request_deserializer=_unread)
    # The body of a call without the token is never parsed: it costs the server nothing.
    return rewrapped(handler, lambda _: reject, lambda _: reject_stream, _unread)


def settings_credentials(settings: ServerSettings) -> grpc.ServerCredentials | None:
    """The TLS credentials ``settings.tls_*`` ask for; None: an insecure port.

    Raises:
        ValueError: a certificate without its key (or the reverse), or a client CA alone.
    """
    if settings.tls_cert is None and settings.tls_key is None:
        if settings.tls_client_ca is not None:
            raise ValueError("--tls-client-ca needs --tls-cert and --tls-key")
        return None
    if settings.tls_cert is None or settings.tls_key is None:
        raise ValueError("--tls-cert and --tls-key go together: give both or neither")
    return server_credentials(settings.tls_cert, settings.tls_key, settings.tls_client_ca)
