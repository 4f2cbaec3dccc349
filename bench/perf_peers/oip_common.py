"""What the reference servers of bench_perf_analyzer share: one decoder graph's Open Inference
Protocol description, and the protocol's non-inference methods that perf_analyzer calls before
it infers (ModelMetadata, ModelConfig) or while it measures (ModelStatistics).

Bench-only; it imports the project's generated protobuf modules and nothing else of vaeserve,
so a peer is what a small independent server would be.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort

from vaeserve.proto.inference import grpc_service_pb2 as pb
from vaeserve.proto.inference import grpc_service_pb2_grpc as pb_grpc
from vaeserve.proto.inference import model_config_pb2 as config_pb

__all__ = ["Graph", "InferenceBase", "arguments", "pb", "pb_grpc", "serve"]

# Triton's names for what an ONNX tensor holds; the decoder only has float32 tensors.
_KSERVE = {"tensor(float)": ("FP32", config_pb.TYPE_FP32, np.dtype("<f4"))}
_MAX_MESSAGE = 256 << 20


@dataclass(frozen=True)
class Tensor:
    name: str
    datatype: str
    config_type: int
    dtype: np.dtype
    dims: tuple[int, ...]  # without the batch axis


@dataclass(frozen=True)
class Graph:
    """The decoder's tensors, read from the ONNX file (the batch axis is the first)."""

    path: Path
    inputs: tuple[Tensor, ...]
    outputs: tuple[Tensor, ...]

    @classmethod
    def read(cls, path: Path) -> Graph:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

        def tensors(args) -> tuple[Tensor, ...]:
            return tuple(
                Tensor(a.name, *_KSERVE[a.type], tuple(int(d) for d in a.shape[1:])) for a in args
            )

        return cls(path, tensors(session.get_inputs()), tensors(session.get_outputs()))


class InferenceBase(pb_grpc.GRPCInferenceServiceServicer):
    """Everything but ModelInfer, for one model named ``name`` (version 1)."""

    def __init__(self, name: str, graph: Graph, max_batch: int):
        self.name, self.graph = name, graph
        meta = pb.ModelMetadataResponse.TensorMetadata
        self._metadata = pb.ModelMetadataResponse(
            name=name, versions=["1"], platform="onnxruntime_onnx",
            inputs=[meta(name=t.name, datatype=t.datatype, shape=[-1, *t.dims])
                    for t in graph.inputs],
            outputs=[meta(name=t.name, datatype=t.datatype, shape=[-1, *t.dims])
                     for t in graph.outputs],
        )  # fmt: skip
        self._config = pb.ModelConfigResponse(
            config=config_pb.ModelConfig(
                name=name, platform="onnxruntime_onnx", backend="onnxruntime",
                max_batch_size=max_batch,
                input=[config_pb.ModelInput(name=t.name, data_type=t.config_type, dims=t.dims)
                       for t in graph.inputs],
                output=[config_pb.ModelOutput(name=t.name, data_type=t.config_type, dims=t.dims)
                        for t in graph.outputs],
            )
        )  # fmt: skip

    def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=True)

    def ModelReady(self, request, context):
        return pb.ModelReadyResponse(ready=request.name == self.name)

    def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(name="peer", version="0", extensions=[])

    def ModelMetadata(self, request, context):
        return self._metadata

    def ModelConfig(self, request, context):
        return self._config

    def ModelStatistics(self, request, context):
        # perf_analyzer reads server-side statistics when offered; zeros say "none kept".
        return pb.ModelStatisticsResponse(
            model_stats=[pb.ModelStatistics(name=self.name, version="1")]
        )


def arguments(doc: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    parser.add_argument("--onnx", type=Path, required=True, help="the decoder graph")
    parser.add_argument("--name", default="reference-decoder", help="the protocol model name")
    parser.add_argument("--port", type=int, default=0, help="0: a free port (printed)")
    parser.add_argument("--max-batch", type=int, default=1024, help="rows per run at most")
    parser.add_argument("--threads", type=int, default=0, help="onnxruntime threads per run")
    parser.add_argument("--instances", type=int, default=0, help="runs at once; 0: cores")
    parser.add_argument("--workers", type=int, default=16, help="handler threads (thread pool)")
    return parser.parse_args()


def options() -> list[tuple[str, int]]:
    return [("grpc.max_receive_message_length", _MAX_MESSAGE),
            ("grpc.max_send_message_length", _MAX_MESSAGE)]  # fmt: skip


def bind(server, port: int) -> None:
    """Bind 127.0.0.1 and print the port on stdout: the bench reads it from there."""
    print(server.add_insecure_port(f"127.0.0.1:{port}"), flush=True)


def serve(servicer: InferenceBase, port: int, start=None) -> None:
    """Serve ``servicer`` on grpc.aio until killed; ``start``: a coroutine function to await
    on the loop first (e.g. to start batching tasks)."""
    import asyncio

    async def main() -> None:
        if start is not None:
            await start()
        server = grpc.aio.server(options=options())
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
        bind(server, port)
        await server.start()
        await server.wait_for_termination()

    asyncio.run(main())
