"""AsyncVaeClient against a real server on 127.0.0.1: the answers of VaeClient byte for byte,
its typed errors, retries, deadlines and stream resumption; and the gRPC targets (ipv4:,
dns:///) that both clients hand to one round_robin channel."""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Coroutine
from typing import Any

import grpc
import numpy as np
import pytest
from client_fixtures import Hangup, ServerProcess, free_port, serve
from serving_fixtures import ServerThread

from vaeserve.client import AsyncVaeClient, RetryPolicy, VaeClient
from vaeserve.client.arguments import UsageError, check_server
from vaeserve.client.channels import ROUND_ROBIN, channel_options, targets
from vaeserve.errors import DeadlineExceeded, InvalidRequest, ModelNotFound, NotServing
from vaeserve.server.settings import BatchingSettings, ServerSettings

FAST = RetryPolicy(initial_backoff_s=0.001, max_backoff_s=0.002, deadline_s=5.0)
WAIT_S = 60.0  # bound of every asyncio.run here; never reached when the tests pass
RETRY_LOG = "vaeserve.client.retry"


def run(coroutine: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run(asyncio.wait_for(coroutine, WAIT_S))


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    yield from serve(tmp_path_factory)


def _server(served, **kwargs) -> ServerThread:
    settings = ServerSettings(
        repository=served.repository, device="cpu", intra_op_threads=1, **{"port": 0, **kwargs}
    )
    return ServerThread(settings)


def _rows(server: ServerThread, model: str) -> int:
    """Rows the server's decoder of ``model`` has computed: which server got the calls."""
    return server.server.registry.get(model).decoder.stats.rows


# --- the same answers as VaeClient --------------------------------------------------------


def test_every_method_answers_as_the_sync_client_does(served):
    cvae, vae = served.cvae, served.vae
    with VaeClient(served.address, retry=FAST) as sync:
        x = sync.sample(cvae, 6, labels=range(6), seed=1).samples
        calls = {
            "list_models": lambda c: c.list_models(),
            "model_info": lambda c: c.model_info(cvae),
            "sample": lambda c: c.sample(
                cvae, 10, labels=range(10), seed=7, return_latents=True, temperature=0.8
            ),
            "sample_draw_uint8": lambda c: c.sample(
                vae, 5, seed=3, output="draw", encoding="uint8"
            ),
            "encode": lambda c: c.encode(cvae, x, labels=range(6), num_draws=3, seed=2),
            "decode": lambda c: c.decode(
                cvae, np.ones((4, 2), np.float32), labels=range(4), output="draw", seed=4
            ),
            "reconstruct": lambda c: c.reconstruct(cvae, x, labels=range(6), encoding="float16"),
            "interpolate": lambda c: c.interpolate(cvae, x[0], x[1], 5, labels=2, path="spherical"),
            "score": lambda c: c.score(vae, x, k=4, seed=5),
        }
        expected = {name: call(sync) for name, call in calls.items()}
        expected_chunks = list(sync.sample_stream(cvae, 10, labels=range(10), seed=7, chunk_size=3))

    async def main():
        async with AsyncVaeClient(served.address, retry=FAST) as client:
            got = {name: await call(client) for name, call in calls.items()}
            chunks = [
                c
                async for c in client.sample_stream(
                    cvae, 10, labels=range(10), seed=7, chunk_size=3
                )
            ]
            return got, chunks

    got, chunks = run(main())
    for name in calls:
        assert type(got[name]) is type(expected[name]), name
        assert _arrays(got[name]) == _arrays(expected[name]), name
    assert [c.start_index for c in chunks] == [0, 3, 6, 9]
    assert [_arrays(c) for c in chunks] == [_arrays(c) for c in expected_chunks]
    assert got["sample"].samples.shape == (10, 1, 8, 8) and got["sample"].latents.shape == (10, 2)
    assert got["interpolate"].images.shape == (5, 1, 8, 8)


def test_the_async_client_has_every_method_with_the_same_arguments():
    methods = [n for n in vars(VaeClient) if not n.startswith("_") and n != "close"]
    assert len(methods) == 9, methods
    for name in methods:
        sync, coroutine = getattr(VaeClient, name), getattr(AsyncVaeClient, name)
        assert inspect.signature(sync).parameters == inspect.signature(coroutine).parameters
        wanted = (
            inspect.isasyncgenfunction if name == "sample_stream" else inspect.iscoroutinefunction
        )
        assert wanted(coroutine), name
    assert inspect.signature(VaeClient) == inspect.signature(AsyncVaeClient)
    assert inspect.iscoroutinefunction(AsyncVaeClient.close)


def _arrays(result: Any) -> Any:
    """A result with every array as (dtype, shape, bytes), so == compares bit for bit."""
    if isinstance(result, np.ndarray):
        return (result.dtype.str, result.shape, result.tobytes())
    if isinstance(result, list):
        return [_arrays(item) for item in result]
    if hasattr(result, "__dataclass_fields__"):
        return {k: _arrays(getattr(result, k)) for k in result.__dataclass_fields__}
    return result


def test_many_calls_at_once_share_one_client(served):
    """64 coroutines on one client at once, against a server whose batches wait 0.5 s for
    company: they ride in about one batch (awaited one by one they would take 32 s), and each
    gets its own seed's samples."""
    holding = BatchingSettings(max_queue_delay_ms=500, queue_delay_policy="always")
    seeds = range(100, 164)
    with VaeClient(served.address, retry=FAST) as sync:
        expected = [sync.sample(served.vae, 3, seed=s).samples.tobytes() for s in seeds]
    server = _server(served, batching=holding)

    async def main():
        async with AsyncVaeClient(server.address, retry=FAST) as client:
            start = time.perf_counter()
            results = await asyncio.gather(*(client.sample(served.vae, 3, seed=s) for s in seeds))
            return results, time.perf_counter() - start

    try:
        results, took = run(main())
    finally:
        server.stop()
    assert [r.samples.tobytes() for r in results] == expected
    assert [r.seed for r in results] == list(seeds)
    assert took < 8.0, f"64 calls took {took:.1f} s: they did not run at once"


# --- typed errors, retries, deadlines ------------------------------------------------------


def test_typed_errors_fail_fast_without_retries(served, caplog):
    async def main():
        async with AsyncVaeClient(served.address, retry=FAST) as client:
            with pytest.raises(ModelNotFound) as missing:
                await client.model_info("no-such-model")
            with pytest.raises(InvalidRequest) as invalid:
                await client.sample(served.cvae, 2, label=99, seed=1)
            with pytest.raises(ValueError, match="encoding"):
                await client.sample(served.cvae, 1, label=0, encoding="int8")
            return missing.value, invalid.value

    with caplog.at_level(logging.WARNING, logger=RETRY_LOG):
        missing, invalid = run(main())
    assert missing.code == grpc.StatusCode.NOT_FOUND and "no-such-model" in str(missing)
    assert invalid.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "label holds class 99, expected classes 0..9" in str(invalid)
    assert not caplog.records, "errors that waiting cannot mend are not retried"


def test_unreachable_server_is_retried_then_reported(caplog):
    policy = RetryPolicy(max_attempts=None, initial_backoff_s=0.02, deadline_s=0.5)

    async def main():
        async with AsyncVaeClient(f"127.0.0.1:{free_port()}", retry=policy) as client:
            start = time.perf_counter()
            with pytest.raises(NotServing) as info:
                await client.model_info("anything")
            return info.value, time.perf_counter() - start

    with caplog.at_level(logging.WARNING, logger=RETRY_LOG):
        error, took = run(main())
    assert error.code == grpc.StatusCode.UNAVAILABLE
    assert len(caplog.records) >= 2, "UNAVAILABLE is retried"
    assert took < 5.0, "the overall deadline ends the retries"


def test_a_call_waits_out_a_server_that_starts_late(served, caplog):
    """The first attempts meet a closed port; the server comes up while the call retries."""
    port = free_port()
    policy = RetryPolicy(max_attempts=None, max_backoff_s=0.2, deadline_s=30.0)
    servers = []

    async def main():
        async with AsyncVaeClient(f"127.0.0.1:{port}", retry=policy) as client:
            call = asyncio.create_task(client.sample(served.vae, 4, seed=9))
            for _ in range(100):  # until the first attempt has failed: at most 10 s
                if caplog.records or call.done():
                    break
                await asyncio.sleep(0.1)
            servers.append(await asyncio.to_thread(_server, served, port=port))
            return await call

    try:
        with caplog.at_level(logging.WARNING, logger=RETRY_LOG):
            result = run(main())
    finally:
        for server in servers:
            server.stop()
    with VaeClient(served.address) as sync:
        assert result.samples.tobytes() == sync.sample(served.vae, 4, seed=9).samples.tobytes()
    assert any("Sample failed with UNAVAILABLE" in r.message for r in caplog.records)


def test_round_robin_tries_a_dead_address_and_skips_it(served, caplog):
    dead = Hangup()

    async def main():
        async with AsyncVaeClient([dead.address, served.address], retry=FAST) as client:
            return [
                (await client.sample(served.cvae, 2, label=1, seed=5)).samples for _ in range(4)
            ]

    try:
        with caplog.at_level(logging.WARNING, logger=RETRY_LOG):
            results = run(main())
    finally:
        dead.close()
    assert all(r.tobytes() == results[0].tobytes() for r in results)
    assert dead.accepted >= 1, "the dead address was never dialled"
    assert caplog.records, "calls that met the dead address were retried on the live one"


def test_per_call_deadline_reaches_the_server(served):
    """On a server whose batches wait 3 s for company, a 0.5 s deadline ends the call at the
    server (its queue drops the request uncomputed), neither later nor inside the client."""
    holding = BatchingSettings(max_queue_delay_ms=3_000, queue_delay_policy="always")
    server = _server(served, batching=holding)

    async def main():
        async with AsyncVaeClient(server.address, retry=RetryPolicy(max_attempts=1)) as client:
            start = time.perf_counter()
            with pytest.raises(DeadlineExceeded) as info:
                await client.sample(served.vae, 4, seed=5, timeout_s=0.5)
            return info.value, time.perf_counter() - start

    try:
        error, took = run(main())
        rows_computed = _rows(server, served.vae)
    finally:
        server.stop()
    assert error.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert 0.5 <= took < 5.0
    assert rows_computed == 0


def test_a_stream_broken_by_a_server_crash_resumes_where_it_stopped(served, caplog):
    with VaeClient(served.address) as sync:
        expected = np.concatenate(
            [r.samples for r in sync.sample_stream(served.vae, 16_384, seed=3, chunk_size=4096)]
        )
    servers = [ServerProcess(served.repository)]
    policy = RetryPolicy(max_attempts=None, max_backoff_s=0.5, deadline_s=60.0)

    async def main():
        port = servers[0].port
        async with AsyncVaeClient(f"127.0.0.1:{port}", retry=policy) as client:
            # Chunks of 16 samples: far more bytes than the connection buffers, so the server
            # dies with most of the stream unsent.
            stream = client.sample_stream(served.vae, 16_384, seed=3, chunk_size=16)
            chunks = [await anext(stream) for _ in range(4)]
            servers[0].kill()
            servers.append(await asyncio.to_thread(ServerProcess, served.repository, port))
            with caplog.at_level(logging.WARNING, logger=RETRY_LOG):
                chunks += [chunk async for chunk in stream]
            return chunks

    try:
        chunks = run(main())
    finally:
        for server in servers:
            server.kill()
    assert any("SampleStream failed with UNAVAILABLE" in r.message for r in caplog.records)
    assert [c.start_index for c in chunks] == list(range(0, 16_384, 16))
    assert np.concatenate([c.samples for c in chunks]).tobytes() == expected.tobytes()


# --- gRPC targets: one channel, gRPC's round_robin over every address ----------------------


@pytest.mark.parametrize(
    "addresses, expected",
    [
        ("h:1", ["h:1"]),
        (" a:1 , b:2 ,", ["a:1", "b:2"]),
        (["a:1", "[::1]:2"], ["a:1", "[::1]:2"]),
        ("dns:///vaeserve-headless.ns.svc.cluster.local:8001", None),
        ("dns://10.0.0.2:53/name:8001", None),
        ("ipv4:10.0.0.1:8001,10.0.0.2:8001", None),  # one target: its commas are its own
        ("ipv6:[::1]:8001", None),
        ("unix:/run/vaeserve.sock", None),
    ],
)
def test_addresses_are_host_ports_or_one_grpc_target(addresses, expected):
    assert targets(addresses) == (expected or [addresses])
    for target in targets(addresses):
        uri = expected is None
        assert (("grpc.service_config", ROUND_ROBIN) in channel_options(target)) == uri


@pytest.mark.parametrize(
    "addresses, error, match",
    [
        (" , ", ValueError, "got none"),
        ("localhost", ValueError, "got 'localhost'"),
        ("h:0", ValueError, r"port 1\.\.65535"),
        ("h:http", ValueError, "got 'h:http'"),
        ("::1:8001", ValueError, "got '::1:8001'"),
        ("http://h:80", ValueError, "got 'http://h:80'"),
        ("dns:///", ValueError, "names no address"),
        (["a:1,b:2"], ValueError, "got 'a:1,b:2'"),
        ("a b:1", ValueError, "holds a space"),
        (8001, TypeError, "got type int"),
        ([b"h:1"], TypeError, "item of type bytes"),
    ],
)
def test_bad_addresses_are_refused_naming_the_argument(addresses, error, match):
    with pytest.raises(error, match=match) as info:
        VaeClient(addresses)
    assert str(info.value).startswith("addresses: expected host:port")
    assert "dns:///name:port" in str(info.value)

    async def make():
        AsyncVaeClient(addresses)

    with pytest.raises(error, match=match):
        run(make())


def test_the_jobs_check_server_as_the_clients_take_it():
    check_server("dns:///vaeserve-headless.ns.svc.cluster.local:8001")
    check_server("a:1,b:2")
    with pytest.raises(UsageError, match=r"^--server: expected host:port .* got 'localhost'$"):
        check_server("localhost")


@pytest.fixture
def two_servers(served):
    first = _server(served)
    try:
        second = _server(served)
    except BaseException:
        first.stop()
        raise
    yield first, second
    first.stop()
    second.stop()


def _spread(servers, model, calls) -> list[int]:
    """Rows each server computed while ``calls()`` ran (no other calls reach these servers)."""
    before = [_rows(s, model) for s in servers]
    calls()
    return [_rows(s, model) - b for s, b in zip(servers, before, strict=True)]


def _ipv4(servers) -> str:
    return "ipv4:" + ",".join(f"127.0.0.1:{s.port}" for s in servers)


# Round robin sends every ready address its turn; the first calls may all go to whichever
# address connected first, so each test warms up for up to WARM_UP calls first.
WARM_UP, CALLS, ROWS = 50, 20, 2


def test_an_ipv4_target_spreads_the_sync_clients_calls_over_every_address(served, two_servers):
    with VaeClient(_ipv4(two_servers), retry=FAST) as client:
        assert len(client._channels) == 1, "one channel; gRPC balances inside it"

        def warm_up():
            for _ in range(WARM_UP):
                client.sample(served.vae, ROWS, seed=1)
                if all(_rows(s, served.vae) for s in two_servers):
                    break

        def calls():
            for i in range(CALLS):
                client.sample(served.vae, ROWS, seed=i)

        _spread(two_servers, served.vae, warm_up)
        spread = _spread(two_servers, served.vae, calls)
    assert sum(spread) == CALLS * ROWS
    assert min(spread) >= CALLS * ROWS // 4, f"calls went {spread}: not round robin"


def test_an_ipv4_target_spreads_the_async_clients_calls_over_every_address(served, two_servers):
    async def main():
        async with AsyncVaeClient(_ipv4(two_servers), retry=FAST) as client:
            assert len(client._channels) == 1
            for _ in range(WARM_UP):
                await client.sample(served.vae, ROWS, seed=1)
                if all(_rows(s, served.vae) for s in two_servers):
                    break
            before = [_rows(s, served.vae) for s in two_servers]
            for i in range(CALLS):
                await client.sample(served.vae, ROWS, seed=i)
            return [_rows(s, served.vae) - b for s, b in zip(two_servers, before, strict=True)]

    spread = run(main())
    assert sum(spread) == CALLS * ROWS
    assert min(spread) >= CALLS * ROWS // 4, f"calls went {spread}: not round robin"


def test_a_dns_target_works_for_both_clients(served):
    target = f"dns:///localhost:{served.port}"
    with VaeClient(target, retry=FAST) as client:
        expected = client.sample(served.vae, 3, seed=11).samples.tobytes()

    async def main():
        async with AsyncVaeClient(target, retry=FAST) as client:
            return (await client.sample(served.vae, 3, seed=11)).samples.tobytes()

    assert run(main()) == expected
