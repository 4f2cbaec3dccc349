"""The Open Inference Protocol's gRPC transport (``inference.GRPCInferenceService``).

Thin: each method hands its request to ``InferenceProtocol`` (server/inference_protocol.py),
which resolves, checks and answers for every transport; this module adds the call's deadline,
encodes ModelInfer's outputs as raw contents without copying them into the message, and maps
errors to status codes (``map_errors``).
"""

from __future__ import annotations

import time

import grpc

from vaeserve.proto.inference import grpc_service_pb2 as pb
from vaeserve.proto.inference import grpc_service_pb2_grpc as pb_grpc
from vaeserve.server import oip_convert as convert
from vaeserve.server.inference_protocol import InferenceProtocol
from vaeserve.server.status import map_errors

__all__ = ["SERVICE_NAME", "OipServicer"]

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name


def _deadline(context: grpc.aio.ServicerContext) -> float | None:
    """The call's deadline on the batchers' clock (time.monotonic)."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


class OipServicer(pb_grpc.GRPCInferenceServiceServicer):
    """The protocol over gRPC, answered by ``protocol``."""

    def __init__(self, protocol: InferenceProtocol):
        self._protocol = protocol

    @map_errors
    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    @map_errors
    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self._protocol.server_ready())

    @map_errors
    async def ModelReady(self, request, context):
        ready = self._protocol.model_ready(request.name, request.version)
        return pb.ModelReadyResponse(ready=ready)

    @map_errors
    async def ServerMetadata(self, request, context):
        return self._protocol.server_metadata()

    @map_errors
    async def ModelMetadata(self, request, context):
        return self._protocol.model_metadata(request.name, request.version)

    @map_errors
    async def ModelConfig(self, request, context):
        config = self._protocol.model_config(request.name, request.version)
        return pb.ModelConfigResponse(config=config)

    @map_errors
    async def ModelInfer(self, request, context):
        inference = await self._protocol.infer(request, _deadline(context))
        names = list(inference.arrays)
        return convert.encode_outputs(inference.response, inference.arrays, names, inference.specs)

    @map_errors
    async def ModelStatistics(self, request, context):
        return self._protocol.statistics(request.name, request.version)

    @map_errors
    async def RepositoryIndex(self, request, context):
        return await self._protocol.repository_index(request)

    @map_errors
    async def RepositoryModelLoad(self, request, context):
        return await self._protocol.repository_model_load(request)

    @map_errors
    async def RepositoryModelUnload(self, request, context):
        return await self._protocol.repository_model_unload(request)
