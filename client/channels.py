"""Where a client's calls go: its address argument, checked, and the channels it opens.

Two kinds of address, each given one channel:

- ``host:port`` (a comma-separated list of them, or a sequence): one channel per address; the
  client sends successive calls round robin over the channels and retries a failed call on
  the next one.
- a gRPC target URI (``dns:///name:port``, ``ipv4:a:p,b:p``, ``ipv6:...``, ``unix:path``):
  gRPC itself resolves every address behind it and balances calls over them with its
  ``round_robin`` policy. This is what a headless Kubernetes Service needs: its one DNS name
  has an A record per ready pod, and gRPC re-resolves it when connections fail, so pods that
  come and go are followed without a restart (docs/scale.md).

``ClientBase`` holds what ``VaeClient`` and ``AsyncVaeClient`` share: their constructor
arguments, channels and stubs; only how they wait for an answer differs.
"""

from __future__ import annotations

import itertools
import json
import threading
from collections.abc import Sequence
from types import ModuleType
from typing import Any, ClassVar

import grpc

from vaeserve.client.retry import RetryPolicy
from vaeserve.client.tensors import AnswerStub

__all__ = ["URI_SCHEMES", "ROUND_ROBIN", "ClientBase", "channel_options", "is_uri", "targets"]

# gRPC's own resolvers. Only these make a target a URI: gRPC reads "localhost:8001" as the
# unknown scheme "localhost", and so falls back to host:port, and so does this module.
URI_SCHEMES = ("dns", "ipv4", "ipv6", "unix", "unix-abstract")

# Without it a channel uses pick_first: one connection, to the first address that answers,
# and every call on it; a headless Service's pods past the first would get none.
ROUND_ROBIN = json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})

# The channel's own reconnect backoff grows to 120 s by default: after a server restart the
# channel could sit out our whole retry budget before it tries to connect again.
_CHANNEL_OPTIONS = (
    ("grpc.max_receive_message_length", -1),
    ("grpc.max_send_message_length", -1),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
)

_EXPECTED = (
    "expected host:port (port 1..65535), a comma-separated list or a sequence of them, or one "
    f"gRPC target ({', '.join(s + ':' for s in URI_SCHEMES)} e.g. dns:///name:port)"
)


def is_uri(target: str) -> bool:
    """True for a target in one of gRPC's resolver schemes (``URI_SCHEMES``)."""
    scheme, colon, _ = target.partition(":")
    return bool(colon) and scheme.lower() in URI_SCHEMES


def targets(addresses: str | Sequence[str]) -> list[str]:
    """The channel targets of a client's ``addresses`` argument, checked.

    A string that starts with a URI scheme is one target whole: the commas of ``ipv4:`` and
    ``ipv6:`` targets separate that target's addresses. Any other string is a comma-separated
    list of host:port; empty items are skipped.

    Raises:
        TypeError: ``addresses`` is neither a string nor a sequence of strings.
        ValueError: no address, or one that is neither host:port nor a gRPC target (the
            message names ``addresses`` and the item).
    """
    if isinstance(addresses, str):
        text = addresses.strip()
        items = [text] if is_uri(text) else text.split(",")
    elif isinstance(addresses, Sequence) and not isinstance(addresses, bytes):
        items = list(addresses)
    else:
        raise TypeError(f"addresses: {_EXPECTED}; got type {type(addresses).__name__}")
    found = []
    for item in items:
        if not isinstance(item, str):
            raise TypeError(f"addresses: {_EXPECTED}; got an item of type {type(item).__name__}")
        if item.strip():
            found.append(_checked(item.strip()))
    if not found:
        raise ValueError(f"addresses: {_EXPECTED}; got none in {addresses!r}")
    return found


def _checked(target: str) -> str:
    if any(c.isspace() for c in target):
        raise ValueError(f"addresses: {_EXPECTED}; got {target!r}, which holds a space")
    if is_uri(target):
        _, _, rest = target.partition(":")
        if rest.startswith("//"):  # scheme://authority/endpoint: the endpoint is what names
            rest = rest[2:].partition("/")[2]
        if not rest.strip(","):
            raise ValueError(f"addresses: {_EXPECTED}; got {target!r}, which names no address")
        return target
    host, colon, port = target.rpartition(":")
    bracketed = host.startswith("[") and host.endswith("]") and len(host) > 2  # IPv6
    if (
        not colon
        or not host
        or (":" in host and not bracketed)
        or not (port.isdigit() and 0 < int(port) < 65536)
    ):
        raise ValueError(f"addresses: {_EXPECTED}; got {target!r}")
    return target


def channel_options(target: str, options: Sequence[tuple[str, Any]] = ()) -> list[tuple[str, Any]]:
    """The options of ``target``'s channel: ours, round_robin for a URI, then ``options``."""
    balancing = [("grpc.service_config", ROUND_ROBIN)] if is_uri(target) else []
    return [*_CHANNEL_OPTIONS, *balancing, *options]


class ClientBase:
    """The constructor and channels of ``VaeClient`` and ``AsyncVaeClient`` (see
    ``VaeClient`` for the arguments); ``_api`` is the module whose channels a subclass uses,
    ``grpc`` or ``grpc.aio``, which take the same arguments."""

    _api: ClassVar[ModuleType]

    def __init__(
        self,
        addresses: str | Sequence[str],
        *,
        tls: bool = False,
        root_certificates: bytes | None = None,
        private_key: bytes | None = None,
        certificate_chain: bytes | None = None,
        token: str | None = None,
        timeout_s: float | None = 30.0,
        retry: RetryPolicy | None = None,
        options: Sequence[tuple[str, Any]] = (),
    ):
        self.addresses = targets(addresses)
        if tls or root_certificates is not None:
            creds = grpc.ssl_channel_credentials(root_certificates, private_key, certificate_chain)
            self._channels = [
                self._api.secure_channel(t, creds, options=channel_options(t, options))
                for t in self.addresses
            ]
        else:
            self._channels = [
                self._api.insecure_channel(t, options=channel_options(t, options))
                for t in self.addresses
            ]
        self._stubs = [AnswerStub(c) for c in self._channels]
        self._metadata = (("authorization", f"Bearer {token}"),) if token else None
        self.timeout_s = timeout_s
        self.retry = retry or RetryPolicy()
        self._turn = itertools.count()
        self._lock = threading.Lock()

    def _next_stub(self) -> AnswerStub:
        with self._lock:
            return self._stubs[next(self._turn) % len(self._stubs)]

    def _timeout(self, timeout_s: float | None) -> float | None:
        """A call's per-attempt deadline: its own, else the client's default."""
        return self.timeout_s if timeout_s is None else timeout_s
