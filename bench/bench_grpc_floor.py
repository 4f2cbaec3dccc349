"""The floor under any Python gRPC server on this machine: a no-op server, measured like ours.

Run: python bench/bench_grpc_floor.py [--seconds 2] [--clients 1,16,32]

A server process answers one unary method by echoing its 40-byte request (no parsing, no
model), once as grpc.aio (what vae-serve is built on) and once as the thread-pool grpc server.
Closed-loop grpc.aio clients in this process (the same load generator as bench_serving's) call
it; the table gives calls/s, p50/p99 latency and the CPU both sides spend per call. Whatever
vae-serve adds comes on top of these figures, so they bound what batch-1 targets can reach
with a Python load generator on the same cores.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import time
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_serving import process_cpu_s  # noqa: E402

_SERVER = """
import asyncio, sys
from concurrent.futures import ThreadPoolExecutor
import grpc
kind = sys.argv[1]
def echo(request, context):
    return request
async def echo_async(request, context):
    return request
def handlers(fn):
    return (grpc.method_handlers_generic_handler(
        "floor.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(fn)}),)
if kind == "aio":
    async def main():
        server = grpc.aio.server()
        server.add_generic_rpc_handlers(handlers(echo_async))
        print(server.add_insecure_port("127.0.0.1:0"), flush=True)
        await server.start()
        await server.wait_for_termination()
    asyncio.run(main())
else:
    server = grpc.server(ThreadPoolExecutor(64), maximum_concurrent_rpcs=None)
    server.add_generic_rpc_handlers(handlers(echo))
    print(server.add_insecure_port("127.0.0.1:0"), flush=True)
    server.start()
    server.wait_for_termination()
"""
PAYLOAD = b"x" * 40


async def drive(port: int, clients: int, seconds: float, pid: int) -> tuple:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        echo = channel.unary_unary("/floor.Echo/Echo")
        for _ in range(200):  # connection set-up and warm-up
            await echo(PAYLOAD)
        latencies: list[float] = []

        async def client() -> None:
            until = time.perf_counter() + seconds
            while time.perf_counter() < until:
                start = time.perf_counter()
                await echo(PAYLOAD)
                latencies.append(time.perf_counter() - start)

        server_cpu, own_cpu, start = process_cpu_s(pid), time.process_time(), time.perf_counter()
        await asyncio.gather(*(client() for _ in range(clients)))
        elapsed = time.perf_counter() - start
        calls = len(latencies)
        q = statistics.quantiles(latencies, n=100)
        server_us = (process_cpu_s(pid) - server_cpu) / calls * 1e6
        client_us = (time.process_time() - own_cpu) / calls * 1e6
        return calls / elapsed, q[49] * 1e3, q[98] * 1e3, server_us, client_us


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="per figure")
    parser.add_argument("--clients", default="1,16,32", help="comma-separated client counts")
    args = parser.parse_args(argv)
    head = ("server", "clients", "calls/s", "p50 ms", "p99 ms", "srv µs/call", "cli µs/call")
    print(f"{head[0]:>10}" + "".join(f"{h:>13}" for h in head[1:]))
    for kind in ("aio", "threads"):
        server = subprocess.Popen(
            [sys.executable, "-c", _SERVER, kind], stdout=subprocess.PIPE, text=True
        )
        try:
            port = int(server.stdout.readline())
            for clients in (int(c) for c in args.clients.split(",")):
                rate, p50, p99, srv, cli = asyncio.run(
                    drive(port, clients, args.seconds, server.pid)
                )
                cells = (clients, f"{rate:,.0f}", f"{p50:.3f}", f"{p99:.2f}", f"{srv:,.0f}")
                print(f"{kind:>10}" + "".join(f"{c:>13}" for c in (*cells, f"{cli:,.0f}")))
        finally:
            server.terminate()
            server.wait(10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
