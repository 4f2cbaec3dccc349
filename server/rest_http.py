"""The HTTP plumbing of the REST transport: its listening socket, slow-client bounds, bodies.

aiohttp bounds header sizes and closes idle keep-alive connections, but it waits forever for
request headers that trickle in, and reads bodies as slowly as clients send them. Here:

- ``bind`` binds the port when the server is created (a port in use is an error then, as for
  gRPC), with SO_REUSEPORT for ``--workers``;
- ``GuardedSite`` serves it through ``_Guard``, a wrapper of each connection's aiohttp protocol
  that closes a connection whose request headers are not complete within ``header_timeout_s``
  of their first byte (or of the connection's start), and a connection idle past
  ``idle_timeout_s``; TLS handshakes get ``header_timeout_s`` too;
- ``read_body`` reads a body within a byte cap checked before reading (Content-Length) and
  while reading (chunked), within a time bound, into one buffer;
- ``send_answer`` writes an answer within a time bound, cutting off a client that does not
  read it;
- ``Admission`` holds one call's share of the in-flight bounds it shares with gRPC's
  ``RequestLimits`` (calls and request bytes), refusing past them with gRPC's text.

``Refusal`` is an answer decided by the transport itself, with its HTTP status and the gRPC
code name that metrics count it under.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from vaeserve.errors import InvalidRequest
from vaeserve.server import rest_json
from vaeserve.server.limits import RequestLimits
from vaeserve.server.settings import ServerSettings

__all__ = [
    "HTTP_STATUS", "Refusal", "Admission", "bind", "server_ssl_context", "GuardedSite",
    "read_body", "json_response", "readiness_response", "model_and_version",
    "BINARY_HEADER", "binary_header_length", "send_answer",
]  # fmt: skip

# Triton's binary tensor data extension: the length of the JSON part of a body or an answer.
BINARY_HEADER = "Inference-Header-Content-Length"

logger = logging.getLogger(__name__)


class Refusal(Exception):
    """A request the transport answers itself: ``status`` (HTTP), ``code`` (for metrics)."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status = status
        self.code = code


class Admission:
    """One call's share of the in-flight bounds shared with gRPC (``RequestLimits``)."""

    def __init__(self, limits: RequestLimits):
        self._limits = limits
        self.bytes = 0
        self.entered = False

    def enter(self) -> None:
        refusal = self._limits.calls_refusal()
        if refusal is not None:
            raise Refusal(429, "RESOURCE_EXHAUSTED", refusal)
        self._limits.inflight_calls += 1
        self.entered = True

    def reserve(self, size: int) -> None:
        """Hold ``size`` bytes in all (replacing what this call held)."""
        limits = self._limits
        refusal = limits.bytes_refusal(size - self.bytes)
        if refusal is not None:
            raise Refusal(429, "RESOURCE_EXHAUSTED", refusal)
        limits.inflight_request_bytes += size - self.bytes
        self.bytes = size

    def leave(self) -> None:
        if self.entered:
            self._limits.inflight_calls -= 1
        self._limits.inflight_request_bytes -= self.bytes
        self.bytes = 0
        self.entered = False


def server_ssl_context(settings: ServerSettings) -> ssl.SSLContext | None:
    """The REST port's TLS context from ``--tls-cert/--tls-key[/--tls-client-ca]``."""
    if settings.tls_cert is None or settings.tls_key is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(Path(settings.tls_cert), Path(settings.tls_key))
        if settings.tls_client_ca is not None:
            context.load_verify_locations(cafile=str(settings.tls_client_ca))
            context.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"TLS files for the REST port cannot be used: {exc}") from None
    return context


def bind(host: str, port: int, reuse_port: bool) -> socket.socket:
    """A TCP socket bound to host:port (not yet listening).

    Raises:
        RuntimeError: the address cannot be bound.
    """
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise RuntimeError(f"could not bind the REST port {host}:{port}: {exc}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:  # our own workers share the port; otherwise a port in use is an error
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise RuntimeError(f"could not bind the REST port {host}:{port}: {exc}") from None
    return sock


class _Guard(asyncio.Protocol):
    """One connection's aiohttp protocol, behind a clock for the time its client may take.

    Idle between requests: ``idle_s``. From the first byte of a request (or the connection's
    start) to its complete headers: ``header_s``. While the request is handled: no bound here
    (bodies have read_body's).
    """

    def __init__(self, inner: Any, guards: dict[Any, _Guard], header_s: float, idle_s: float):
        self._inner = inner
        self._guards = guards
        self._header_s = header_s
        self._idle_s = idle_s
        self._busy = False
        self._timer: asyncio.TimerHandle | None = None
        self._transport: asyncio.BaseTransport | None = None

    def _arm(self, seconds: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = asyncio.get_running_loop().call_later(seconds, self._expired, seconds)

    def _expired(self, seconds: float) -> None:
        self._timer = None
        if self._busy or self._transport is None:
            return
        logger.info(
            "closing a REST connection: no complete request within %g s (slow or idle client)",
            seconds,
        )
        self._transport.abort()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport
        self._guards[self._inner] = self
        self._arm(self._header_s)
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        # The first byte of a request after an idle spell starts its header clock.
        if not self._busy and (
            self._timer is None
            or self._timer.when() > asyncio.get_running_loop().time() + self._header_s
        ):
            self._arm(self._header_s)
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._transport = None
        self._guards.pop(self._inner, None)
        self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()

    def request_started(self) -> None:
        self._busy = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def request_ended(self) -> None:
        self._busy = False
        self._arm(self._idle_s)


class GuardedSite(web.BaseSite):
    """An aiohttp site on a socket ``bind`` made, every connection behind a ``_Guard``."""

    def __init__(
        self,
        runner: web.BaseRunner,
        sock: socket.socket,
        header_timeout_s: float,
        idle_timeout_s: float,
        ssl_context: ssl.SSLContext | None = None,
        backlog: int = 1024,
    ):
        super().__init__(runner, ssl_context=ssl_context, backlog=backlog)
        self._sock = sock
        self._header_s = header_timeout_s
        self._idle_s = idle_timeout_s
        self.guards: dict[Any, _Guard] = {}  # aiohttp's protocol -> its guard

    @property
    def name(self) -> str:
        host, port = self._sock.getsockname()[:2]
        scheme = "https" if self._ssl_context else "http"
        return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"

    def guard_of(self, protocol: Any) -> _Guard | None:
        return self.guards.get(protocol)

    async def start(self) -> None:
        await super().start()
        server: Callable[[], Any] | None = self._runner.server
        assert server is not None

        def factory() -> _Guard:
            return _Guard(server(), self.guards, self._header_s, self._idle_s)

        self._server = await asyncio.get_running_loop().create_server(
            factory,
            sock=self._sock,
            ssl=self._ssl_context,
            backlog=self._backlog,
            ssl_handshake_timeout=self._header_s if self._ssl_context else None,
        )


async def read_body(
    request: web.Request, cap: int, timeout_s: float, admit: Callable[[int], None]
) -> bytearray:
    """The request's body, read into one buffer.

    Args:
        cap: most bytes the body may have; checked on Content-Length before reading, and on
            the bytes read for a chunked body.
        timeout_s: the whole body must arrive within this.
        admit: called with the body's size as it becomes known (its Content-Length, or the
            bytes of a chunked body read so far: each call replaces the last); raises to
            refuse it.

    Raises:
        Refusal: 415 (a Content-Encoding), 413 (over ``cap``), 408 (too slow).
        InvalidRequest: the body ended before its Content-Length.
    """
    encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        # Decompressing would bound the body only after inflating it; clients send identity.
        raise Refusal(
            415, "INVALID_ARGUMENT", f"Content-Encoding {encoding!r} is not supported, expected "
            "identity",
        )  # fmt: skip
    length = request.content_length
    if length is not None and length > cap:
        raise Refusal(
            413, "RESOURCE_EXHAUSTED",
            f"the request is {length} bytes, over this method's limit of {cap} bytes",
        )  # fmt: skip
    if length is not None:
        admit(length)
    body = bytearray(length or 0)
    try:
        async with asyncio.timeout(timeout_s):
            if length is not None:
                with memoryview(body) as view:
                    done = 0
                    while done < length:
                        chunk = await request.content.readany()
                        if not chunk:
                            raise InvalidRequest(
                                f"the request body ended after {done} of its {length} bytes"
                            )
                        view[done : done + len(chunk)] = chunk
                        done += len(chunk)
                return body
            while chunk := await request.content.readany():
                body += chunk
                if len(body) > cap:
                    raise Refusal(
                        413, "RESOURCE_EXHAUSTED",
                        f"the request is over {cap} bytes, this method's limit",
                    )  # fmt: skip
                admit(len(body))
            return body
    except TimeoutError:
        raise Refusal(
            408, "DEADLINE_EXCEEDED",
            f"the request body did not arrive within {timeout_s:g} s; send it faster",
        ) from None  # fmt: skip


# gRPC code -> HTTP status: Triton's HTTP front's mapping where it has the code (400, 404,
# 500, 501, 503), HTTP's meaning for the others. RESOURCE_EXHAUSTED (a full queue, a server
# bound): 429 Too Many Requests, which clients and proxies retry with backoff; Triton, which
# has no such code, answers its full queues UNAVAILABLE (503).
HTTP_STATUS = {
    "INVALID_ARGUMENT": 400, "FAILED_PRECONDITION": 400, "OUT_OF_RANGE": 400,
    "UNAUTHENTICATED": 401, "PERMISSION_DENIED": 403, "NOT_FOUND": 404, "ALREADY_EXISTS": 409,
    "RESOURCE_EXHAUSTED": 429, "INTERNAL": 500, "UNKNOWN": 500, "DATA_LOSS": 500,
    "UNIMPLEMENTED": 501, "UNAVAILABLE": 503, "DEADLINE_EXCEEDED": 504,
}  # fmt: skip


def json_response(value: Any, status: int = 200) -> web.Response:
    return web.json_response(value, status=status, dumps=rest_json.compact_json)


def readiness_response(ok: bool) -> web.Response:
    # KServe: readiness is the status code, 200 or 4xx; 400 as Triton answers.
    return web.Response(status=200 if ok else 400)


def model_and_version(request: web.Request) -> tuple[str, str]:
    return request.match_info.get("name", ""), request.match_info.get("version", "")


def binary_header_length(request: web.Request) -> int | None:
    """The request's ``Inference-Header-Content-Length`` (None: the whole body is JSON)."""
    text = request.headers.get(BINARY_HEADER)
    if text is None:
        return None
    if not (text.isascii() and text.strip().isdigit()):
        raise InvalidRequest(f"{BINARY_HEADER} is {text[:40]!r}, expected a byte count")
    return int(text)


async def send_answer(
    request: web.Request, chunks: list[bytes | memoryview], content_type: str, limit_s: float
) -> web.StreamResponse:
    """Write an answer (the first chunk its JSON part, the binary tensors after it), cutting
    off a client that has not taken it within ``limit_s`` (``stream_stall_timeout_s``: one
    that reads nothing would hold the answer, and its call's share of the bounds, for good)."""
    headers = {"Content-Type": content_type}
    if len(chunks) > 1:
        headers[BINARY_HEADER] = str(len(chunks[0]))
    response = web.StreamResponse(headers=headers)
    response.content_length = sum(memoryview(c).nbytes for c in chunks)
    try:
        async with asyncio.timeout(limit_s):
            await response.prepare(request)
            for chunk in chunks:
                await response.write(chunk)
            await response.write_eof()
    except TimeoutError:
        if request.transport is not None:
            request.transport.abort()
        raise Refusal(
            408, "RESOURCE_EXHAUSTED",
            f"the client did not read its {response.content_length}-byte answer within "
            f"{limit_s:g} s (stream_stall_timeout_s); read faster or ask for fewer rows",
        ) from None  # fmt: skip
    return response
