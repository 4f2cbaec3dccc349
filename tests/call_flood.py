"""Many Sample calls at once, from a process of their own (so that the test's bystander does not
share an interpreter with them): ``python call_flood.py ADDRESS TOKEN MODEL CALLS CONNECTIONS
ROWS``. Prints a JSON object: how many calls ended with each status code."""

from __future__ import annotations

import asyncio
import json
import sys
from collections import Counter

import grpc

from vaeserve.proto.v1 import vaeserve_pb2 as pb
from vaeserve.proto.v1 import vaeserve_pb2_grpc as pb_grpc

CALL_TIMEOUT_S = 30


async def flood(address: str, token: str, model: str, calls: int, connections: int, rows: int):
    options = [("grpc.use_local_subchannel_pool", 1)]
    channels = [grpc.aio.insecure_channel(address, options=options) for _ in range(connections)]
    stubs = [pb_grpc.VaeServiceStub(channel) for channel in channels]
    request = pb.SampleRequest(model=pb.ModelRef(name=model), num_samples=rows, seed=3)
    metadata = (("authorization", f"Bearer {token}"),)

    async def one(i: int) -> str:
        try:
            stub = stubs[i % connections]
            await stub.Sample(request, metadata=metadata, timeout=CALL_TIMEOUT_S)
            return "OK"
        except grpc.aio.AioRpcError as exc:
            return exc.code().name

    try:
        return Counter(await asyncio.gather(*(one(i) for i in range(calls))))
    finally:
        for channel in channels:
            await channel.close()


if __name__ == "__main__":
    address, token, model = sys.argv[1:4]
    calls, connections, rows = (int(arg) for arg in sys.argv[4:7])
    print(json.dumps(asyncio.run(flood(address, token, model, calls, connections, rows))))
