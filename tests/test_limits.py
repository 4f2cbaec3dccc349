"""RequestLimits' in-flight counts with one wrapped handler per method: each call's request
bytes are its own (carried from its parser to its behavior in the call's context), however
many calls of different sizes run at once, and every count returns to zero."""

from __future__ import annotations

import asyncio

import grpc

from vaeserve.server.limits import RequestLimits
from vaeserve.server.settings import ServerSettings

SIZES = [3, 1000, 17, 4096, 0, 250, 9, 60000]


def test_concurrent_calls_count_their_own_request_bytes_and_release_them():
    limits = RequestLimits(ServerSettings(repository="unused"))
    seen: list[tuple[int, int, int]] = []  # (own size, calls in flight, bytes in flight)
    release = asyncio.Event()
    handlers: list[object] = []

    async def behave(request: bytes, context) -> bytes:
        seen.append((len(request), limits.inflight_calls, limits.inflight_request_bytes))
        await release.wait()
        return b""

    inner = grpc.unary_unary_rpc_method_handler(behave)

    class Recorder(grpc.aio.ServerInterceptor):
        async def intercept_service(self, continuation, details):
            handler = await continuation(details)
            handlers.append(handler)
            return handler

    async def main() -> None:
        server = grpc.aio.server(interceptors=[Recorder(), limits])
        generic = grpc.method_handlers_generic_handler("t.Limits", {"Call": inner})
        server.add_generic_rpc_handlers((generic,))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                call = channel.unary_unary("/t.Limits/Call")
                calls = [asyncio.ensure_future(call(b"x" * n, timeout=30)) for n in SIZES]
                while len(seen) < len(SIZES):
                    await asyncio.sleep(0.01)
                assert limits.inflight_calls == len(SIZES)
                assert limits.inflight_request_bytes == sum(SIZES)
                release.set()
                await asyncio.gather(*calls)
        finally:
            await server.stop(None)

    asyncio.run(main())
    # Each call entered with its own size: the bytes in flight grew by exactly that.
    previous = 0
    for entered, (size, calls, in_flight) in enumerate(seen, start=1):
        assert (calls, in_flight) == (entered, previous + size)
        previous = in_flight
    assert limits.inflight_calls == 0 and limits.inflight_request_bytes == 0
    assert len({id(h) for h in handlers}) == 1, "one wrapped handler serves every call"
