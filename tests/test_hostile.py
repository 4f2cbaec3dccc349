"""Hostile traffic against a ``vae-serve`` subprocess, each attack measured by a bystander.

Every test runs one attack as a real client (its own connection) while a bystander, on another
connection, checks health and asks for a small Sample every 50 ms. Each asserts the attacker's
status, how long the attack held the attacker, the bystander's worst latencies, and the server's
resident memory after the attack. The figures go to the test report (``figure``); the table in
docs/reliability.md was taken from them.

The server runs with the token check on and with a few bounds scaled down so that the module
stays short (a 2 s stream stall instead of 30 s, 3 s of idle connection instead of 300 s); the
bounds under attack are otherwise the defaults.
"""

from __future__ import annotations

import json
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import pytest
from client_fixtures import VAE, ServerProcess, tiny_repository
from grpc_health.v1 import health_pb2, health_pb2_grpc
from serving_fixtures import ServerThread

from vaeserve.proto.v1 import vaeserve_pb2 as pb
from vaeserve.proto.v1 import vaeserve_pb2_grpc as pb_grpc
from vaeserve.server.memory import KEPT_FREE_BYTES
from vaeserve.server.settings import ServerSettings

TOKEN = "hostile-traffic-test-token"
AUTH = (("authorization", f"Bearer {TOKEN}"),)
MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"
SAMPLE = "/vaeserve.v1.VaeService/Sample"
STALL_S = 2.0
IDLE_S = 3.0
MIB = 1 << 20

# What every attack must leave the others: health and a small Sample answered within this.
BYSTANDER_WORST_S = 1.0
# A request refused on its size, fields or token ends within this (the bound).
REFUSED_WITHIN_S = 1.0
# The server's RSS after any attack, over its RSS when the module started: glibc keeps up to
# KEPT_FREE_BYTES of freed buffers for reuse (the server asks it to), plus slack for what
# gRPC and Python keep of their own.
RSS_CEILING_BYTES = KEPT_FREE_BYTES + 64 * MIB
# How much RSS may still move over the last 4 of 8 repeats of one attack: allocator noise is
# up to ~10 MiB; a refused 32 MiB request that left its body behind would add 96 MiB.
RSS_REPEAT_BYTES = 48 * MIB


@dataclass(frozen=True)
class Target:
    process: ServerProcess
    rss_at_start: int  # after the models ran once

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.process.port}"

    def rss(self) -> int:
        return rss_bytes(self.process.process.pid)


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[Target]:
    token_file = tmp_path_factory.mktemp("token") / "token"
    token_file.write_text(TOKEN)
    token_file.chmod(0o600)
    flags = ["--auth-token-file", str(token_file), "--stream-stall-timeout-s", str(STALL_S)]
    flags += ["--max-connection-idle-s", str(IDLE_S)]
    process = ServerProcess(tiny_repository(tmp_path_factory), flags=flags)
    try:
        with Bystander(f"127.0.0.1:{process.port}"):  # its first round runs the models once
            pass
        yield Target(process, rss_bytes(process.process.pid))
    finally:
        process.kill()


def _own_channel(address: str, **options: int) -> grpc.Channel:
    """A channel on a connection of its own: Python channels share subchannels by default."""
    settings = {"grpc.use_local_subchannel_pool": 1, "grpc.max_receive_message_length": -1}
    return grpc.insecure_channel(address, options=list({**settings, **options}.items()))


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for process {pid}")


@dataclass
class Bystander:
    """Health and a 4-sample Sample every 50 ms on a connection of its own; the worst of each."""

    address: str
    worst_health_s: float = 0.0
    worst_sample_s: float = 0.0
    calls: int = 0
    failures: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._round_done = threading.Event()
        self._channel = _own_channel(self.address)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self._vae = pb_grpc.VaeServiceStub(self._channel)
        self._round()  # connected and warm before the attack starts
        self.worst_health_s = self.worst_sample_s = 0.0
        self.calls = 0
        self._thread = threading.Thread(target=self._run, name="bystander", daemon=True)

    def __enter__(self) -> Bystander:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        # At least one round that began while the attack was on (or as it ended) is measured.
        self._round_done.wait(timeout=30)
        self._stop.set()
        self._thread.join(timeout=30)
        self._channel.close()

    def _round(self) -> None:
        start = time.perf_counter()
        answer = self._health.Check(health_pb2.HealthCheckRequest(), timeout=10)
        took = time.perf_counter() - start
        assert answer.status == health_pb2.HealthCheckResponse.SERVING, answer
        self.worst_health_s = max(self.worst_health_s, took)
        start = time.perf_counter()
        request = pb.SampleRequest(model=pb.ModelRef(name=VAE), num_samples=4, seed=self.calls)
        self._vae.Sample(request, metadata=AUTH, timeout=10)
        self.worst_sample_s = max(self.worst_sample_s, time.perf_counter() - start)
        self.calls += 1

    def _run(self) -> None:
        while True:
            try:
                self._round()
            except grpc.RpcError as exc:
                self.failures.append(f"{exc.code()}: {exc.details()}")
            self._round_done.set()
            if self._stop.wait(0.05):
                return

    def check(self, figure: Callable[[str, object], None]) -> None:
        figure("bystander_worst_health_ms", round(self.worst_health_s * 1000, 1))
        figure("bystander_worst_sample_ms", round(self.worst_sample_s * 1000, 1))
        assert not self.failures, self.failures
        assert self.calls >= 1, "the bystander made no call"
        assert self.worst_health_s < BYSTANDER_WORST_S
        assert self.worst_sample_s < BYSTANDER_WORST_S


@pytest.fixture
def bystander(server) -> Bystander:
    return Bystander(server.address)


@pytest.fixture
def memory(server, figure) -> Iterator[Callable[[], int]]:
    """Records the server's RSS before and after the test; asserts it stays under the ceiling."""
    before = server.rss()
    yield server.rss
    time.sleep(0.2)  # lets the server finish dropping what the attack's calls held
    after = server.rss()
    figure("rss_before_mb", round(before / MIB))
    figure("rss_after_mb", round(after / MIB))
    assert server.process.process.poll() is None, "the server died"
    assert after - server.rss_at_start < RSS_CEILING_BYTES, (server.rss_at_start, after)


# --- Bodies that cost a naive server dearly ------------------------------------------------


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def two_byte_fields(size: int) -> bytes:
    """``size`` bytes of field 15 (unknown to ModelInferRequest) = 0: protobuf keeps each one."""
    return b"\x78\x00" * (size // 2)


def random_bytes(size: int) -> bytes:
    return np.random.default_rng(14).bytes(size)


def nested_groups(depth: int) -> bytes:
    """Groups in groups (field 1, wire types 3 and 4): parsers that recurse into unknown groups
    go ``depth`` deep. Our messages hold no recursive type, so this is the deepest nesting."""
    return b"\x0b" * depth + b"\x0c" * depth


def endless_varint(size: int) -> bytes:
    return b"\x08" + b"\xff" * (size - 1)


def huge_declared_length() -> bytes:
    return b"\x0a" + _varint(1 << 62) + b"model"  # model_name claiming 4 EiB


@dataclass(frozen=True)
class Attack:
    body: Callable[[], bytes]
    method: str = MODEL_INFER
    token: bool = True
    gzip: bool = False
    expected: grpc.StatusCode = grpc.StatusCode.INVALID_ARGUMENT
    within_s: float = REFUSED_WITHIN_S


ATTACKS = {
    "32 MiB of 2-byte fields, no token": Attack(
        lambda: two_byte_fields(32 * MIB), token=False, expected=grpc.StatusCode.UNAUTHENTICATED
    ),
    "32 MiB of 2-byte fields, no token, gzip": Attack(
        lambda: two_byte_fields(32 * MIB),
        token=False,
        gzip=True,
        expected=grpc.StatusCode.UNAUTHENTICATED,
    ),
    "32 MiB of 2-byte fields": Attack(lambda: two_byte_fields(32 * MIB)),
    "32 MiB of 2-byte fields, gzip": Attack(lambda: two_byte_fields(32 * MIB), gzip=True),
    "32 MiB of random bytes": Attack(lambda: random_bytes(32 * MIB)),
    "groups nested 1 million deep": Attack(lambda: nested_groups(1_000_000)),
    "a 32 MiB varint": Attack(lambda: endless_varint(32 * MIB)),
    "a field declaring 4 EiB": Attack(huge_declared_length),
    "gzip bomb: 96 MiB of zeros": Attack(
        lambda: bytes(96 * MIB),
        gzip=True,
        expected=grpc.StatusCode.RESOURCE_EXHAUSTED,
        within_s=3.0,  # most of it the attacker compressing 96 MiB
    ),
    "8 MiB to Sample, a method without tensors": Attack(
        lambda: two_byte_fields(8 * MIB),
        method=SAMPLE,
        expected=grpc.StatusCode.RESOURCE_EXHAUSTED,
    ),
}


@pytest.mark.parametrize("name", list(ATTACKS))
def test_a_hostile_request_is_refused_at_once_and_the_others_are_served(
    name, server, bystander, memory, figure
):
    attack = ATTACKS[name]
    body = attack.body()
    with _own_channel(server.address) as attacker:
        call = attacker.unary_unary(attack.method)  # bytes in, bytes out
        with bystander:
            start = time.perf_counter()
            with pytest.raises(grpc.RpcError) as refused:
                call(
                    body,
                    metadata=AUTH if attack.token else None,
                    compression=grpc.Compression.Gzip if attack.gzip else None,
                    timeout=30,
                )
            took = time.perf_counter() - start
    figure("attacker_status", refused.value.code().name)
    figure("attacker_refused_after_ms", round(took * 1000, 1))
    assert refused.value.code() == attack.expected, refused.value.details()
    assert took < attack.within_s
    bystander.check(figure)


def test_a_repeated_attack_adds_no_memory(server, memory, figure):
    """Eight times the 32 MiB request of 2-byte fields: RSS levels off (the allocator reuses
    what the first ones freed); a refused request that left anything behind would add its
    32 MiB each time."""
    body = two_byte_fields(32 * MIB)
    sizes = []
    with _own_channel(server.address) as attacker:
        for _ in range(8):
            with pytest.raises(grpc.RpcError) as refused:
                attacker.unary_unary(MODEL_INFER)(body, metadata=AUTH, timeout=30)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            sizes.append(memory())
    figure("rss_after_each_mb", [round(size / MIB) for size in sizes])
    assert max(sizes[-4:]) - min(sizes[-4:]) < RSS_REPEAT_BYTES, sizes


def test_streams_never_read_are_cut_off_and_hold_bounded_memory(server, bystander, memory, figure):
    """32 clients each open a 10-million-sample SampleStream and read nothing."""
    request = pb.SampleStreamRequest(
        request=pb.SampleRequest(model=pb.ModelRef(name=VAE), num_samples=10_000_000, seed=1)
    )
    with ExitStack() as stack, bystander:
        calls = []
        for _ in range(32):
            channel = stack.enter_context(_own_channel(server.address))
            stub = pb_grpc.VaeServiceStub(channel)
            calls.append(stub.SampleStream(request, metadata=AUTH, timeout=STALL_S + 30))
        time.sleep(1.0)  # the server writes until flow control stops every stream
        during = memory()
        time.sleep(STALL_S)  # past the stall bound of every stream
        codes = set()
        for call in calls:
            with pytest.raises(grpc.RpcError) as ended:
                for _ in call:  # what gRPC buffered before the stall, then the status
                    pass
            codes.add(ended.value.code())
            assert "stream_stall_timeout_s" in ended.value.details()
    figure("attacker_status", sorted(code.name for code in codes))
    figure("rss_during_mb", round(during / MIB))
    assert codes == {grpc.StatusCode.RESOURCE_EXHAUSTED}
    assert during - server.rss_at_start < RSS_CEILING_BYTES
    bystander.check(figure)


# --- Raw HTTP/2: connections and pings no gRPC client would send ----------------------------

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
SETTINGS, PING, GOAWAY = 0x4, 0x6, 0x7
ENHANCE_YOUR_CALM = 0xB


def frame(kind: int, payload: bytes = b"", flags: int = 0, stream: int = 0) -> bytes:
    header = len(payload).to_bytes(3, "big") + bytes([kind, flags]) + stream.to_bytes(4, "big")
    return header + payload


def read_frames(sock: socket.socket, until: float) -> Iterator[tuple[int, bytes]]:
    """(type, payload) of each frame the server sends, until EOF or the time ``until``."""
    buffer = b""
    while time.monotonic() < until:
        sock.settimeout(max(until - time.monotonic(), 0.01))
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            return
        if not chunk:
            return
        buffer += chunk
        while len(buffer) >= 9:
            length = int.from_bytes(buffer[:3], "big")
            if len(buffer) < 9 + length:
                break
            yield buffer[3], buffer[9 : 9 + length]
            buffer = buffer[9 + length :]


def http2_connection(address: str) -> socket.socket:
    host, port = address.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=10)
    sock.sendall(PREFACE + frame(SETTINGS))
    return sock


def test_a_thousand_idle_connections_do_not_slow_the_others_and_are_closed(
    server, bystander, memory, figure
):
    address = server.address
    sockets = []
    try:
        with bystander:
            for _ in range(1000):
                sockets.append(http2_connection(address))
            opened = time.monotonic()
            figure("rss_during_mb", round(memory() / MIB))
            time.sleep(1.0)  # the bystander keeps calling while all are open
        # Each one is closed by the idle bound: GOAWAY, then EOF.
        deadline = opened + IDLE_S + 10
        closed = sum(
            any(kind == GOAWAY for kind, _ in read_frames(sock, deadline)) for sock in sockets
        )
        figure("closed_by_idle_bound", closed)
        assert closed == len(sockets)
    finally:
        for sock in sockets:
            sock.close()
    bystander.check(figure)


def test_a_ping_flood_is_answered_with_goaway(server, bystander, memory, figure):
    with bystander, http2_connection(server.address) as sock:
        start = time.monotonic()
        pings = 0
        try:
            while time.monotonic() - start < 2.0 and pings < 10_000:
                sock.sendall(frame(PING, struct.pack(">Q", pings)))
                pings += 1
        except OSError:
            pass  # the server closed the connection: what the flood should get
        goaways = [
            payload for kind, payload in read_frames(sock, time.monotonic() + 5) if kind == GOAWAY
        ]
    figure("pings_sent", pings)
    assert goaways, "the server never sent GOAWAY"
    error_code = int.from_bytes(goaways[-1][4:8], "big")
    figure("goaway_error", hex(error_code))
    assert error_code == ENHANCE_YOUR_CALM
    bystander.check(figure)


def test_a_flood_of_tiny_calls_waits_in_its_own_client_and_the_others_are_served(
    server, bystander, memory, figure
):
    """8000 Sample calls at once from one client (another process) on 2 connections. The server
    takes at most max_concurrent_streams (256) calls per connection; the client holds the rest,
    so gRPC's backlog of calls not yet taken up (max_waiting_calls, 1024) never fills, and
    nothing is shed from others. (Streams a client opens past the limit before it has read the
    server's SETTINGS are refused: UNAVAILABLE, which clients retry.)"""
    flood = [sys.executable, str(Path(__file__).with_name("call_flood.py")), server.address]
    flood += [TOKEN, VAE, "8000", "2", "1"]
    with bystander:
        done = subprocess.run(flood, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    counts = json.loads(done.stdout)
    figure("attacker_status", counts)
    assert set(counts) <= {"OK", "UNAVAILABLE"}, counts
    assert counts.get("OK", 0) >= 1000, counts  # served, not only refused
    bystander.check(figure)


def test_answers_that_streams_hold_unread_are_bounded_in_all(tmp_path_factory):
    """With --max-pending-answer-bytes at 1 MiB (an answer here is 256 KiB), 8 streams whose
    clients read nothing: the streams past the bound are refused, the others complete."""
    settings = ServerSettings(
        repository=tiny_repository(tmp_path_factory),
        port=0,
        device="cpu",
        intra_op_threads=1,
        max_pending_answer_bytes=MIB,
    )
    request = pb.SampleStreamRequest(
        request=pb.SampleRequest(model=pb.ModelRef(name=VAE), num_samples=100_000, seed=2),
        chunk_size=1024,
    )
    server = ServerThread(settings)
    try:
        with ExitStack() as stack:
            calls = []
            for _ in range(8):
                channel = stack.enter_context(_own_channel(server.address))
                stub = pb_grpc.VaeServiceStub(channel)
                calls.append(stub.SampleStream(request, timeout=60))
            time.sleep(1.0)  # every stream has written until its client's window is full
            outcomes = []
            for call in calls:
                try:
                    samples = sum(1 for _ in call) * request.chunk_size
                    outcomes.append(("OK", samples))
                except grpc.RpcError as exc:
                    outcomes.append((exc.code().name, exc.details()))
    finally:
        server.stop(grace_s=1.0)
    refused = [details for code, details in outcomes if code == "RESOURCE_EXHAUSTED"]
    completed = [samples for code, samples in outcomes if code == "OK"]
    assert len(refused) + len(completed) == len(calls), outcomes
    assert refused and all("max_pending_answer_bytes" in details for details in refused)
    assert completed and all(samples >= 100_000 for samples in completed)
