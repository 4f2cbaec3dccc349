"""AsyncVaeClient: ``VaeClient`` for asyncio code, on ``grpc.aio`` channels.

async with AsyncVaeClient("dns:///vaeserve-headless.default.svc.cluster.local:8001") as client:
    info = await client.model_info("digits")
    result = await client.sample("digits", 16, label=3, seed=7)
    async for chunk in client.sample_stream("digits", 100_000, seed=7):
        ...

The same constructor arguments, methods, results, retries, typed errors and stream resumption
as ``VaeClient``: both build their requests and read their answers through
``vaeserve.client.requests`` and retry by ``vaeserve.client.retry``; only the waiting is
asyncio's. A grpc.aio channel belongs to the event loop it was made on: make the client in a
coroutine on the loop that uses it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from typing import TypeVar

import grpc
import grpc.aio
import numpy as np

from vaeserve.client.channels import ClientBase
from vaeserve.client.interpolation import InterpolationResult, interpolate_async
from vaeserve.client.requests import (
    Call,
    StreamResume,
    decode_call,
    encode_call,
    list_models_call,
    model_info_call,
    reconstruct_call,
    sample_call,
    sample_request,
    score_call,
)
from vaeserve.client.results import (
    DecodeResult,
    EncodeResult,
    ModelInfo,
    SampleResult,
    ScoreResult,
)
from vaeserve.client.retry import Retrier, call_with_retry_async
from vaeserve.proto.v1 import vaeserve_pb2 as pb

__all__ = ["AsyncVaeClient"]

T = TypeVar("T")


class AsyncVaeClient(ClientBase):
    """``VaeClient`` with coroutine methods (``sample_stream``: an async iterator): the same
    arguments, addresses (host:port lists round robin; one ``dns:///`` target balanced by
    gRPC), retries, ``vaeserve.errors`` classes and stream resumption; see ``VaeClient``.

    Many calls may run at once on one client (``asyncio.gather``); they share its channels.
    Cancelling a task cancels its call, and the wait between retries.
    """

    _api = grpc.aio

    async def close(self) -> None:
        """Close the channels; calls still under way end with CANCELLED."""
        await asyncio.gather(*(channel.close() for channel in self._channels))

    async def __aenter__(self) -> AsyncVaeClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _call(self, call: Call[T], timeout_s: float | None) -> T:
        async def attempt(deadline: float) -> object:
            rpc = getattr(self._next_stub(), call.method)
            return await rpc(call.request, timeout=deadline, metadata=self._metadata)

        timeout = self._timeout(timeout_s)
        answer = await call_with_retry_async(attempt, self.retry, timeout, what=call.method)
        return call.result(answer)

    async def list_models(self, timeout_s: float | None = None) -> list[pb.ModelVersionStatus]:
        """As ``VaeClient.list_models``."""
        return await self._call(list_models_call(), timeout_s)

    async def model_info(
        self, model: str, version: int = 0, timeout_s: float | None = None
    ) -> ModelInfo:
        """As ``VaeClient.model_info``."""
        return await self._call(model_info_call(model, version), timeout_s)

    async def sample(
        self,
        model: str,
        num_samples: int,
        *,
        version: int = 0,
        label: int | None = None,
        labels: Sequence[int] | np.ndarray | None = None,
        seed: int | None = None,
        temperature: float | None = None,
        output: str = "mean",
        encoding: str = "float32",
        return_latents: bool = False,
        start_index: int = 0,
        timeout_s: float | None = None,
    ) -> SampleResult:
        """As ``VaeClient.sample``."""
        request = sample_request(
            model,
            num_samples,
            version=version,
            label=label,
            labels=labels,
            seed=seed,
            temperature=temperature,
            output=output,
            encoding=encoding,
            return_latents=return_latents,
            start_index=start_index,
        )
        return await self._call(sample_call(request), timeout_s)

    async def sample_stream(
        self,
        model: str,
        num_samples: int,
        *,
        version: int = 0,
        label: int | None = None,
        labels: Sequence[int] | np.ndarray | None = None,
        seed: int | None = None,
        temperature: float | None = None,
        output: str = "mean",
        encoding: str = "float32",
        return_latents: bool = False,
        start_index: int = 0,
        chunk_size: int = 0,
        timeout_s: float | None = None,
    ) -> AsyncIterator[SampleResult]:
        """As ``VaeClient.sample_stream``, for ``async for``: a stream broken with a retryable
        status resumes after the last chunk received, with the same samples."""
        request = sample_request(
            model,
            num_samples,
            version=version,
            label=label,
            labels=labels,
            seed=seed,
            temperature=temperature,
            output=output,
            encoding=encoding,
            return_latents=return_latents,
            start_index=start_index,
        )
        stream = StreamResume(request, chunk_size)
        retrier = Retrier(self.retry, "SampleStream")
        timeout = self._timeout(timeout_s)
        while not stream.done:
            call = self._next_stub().SampleStream(
                stream.next_request(),
                timeout=retrier.attempt_timeout(timeout),
                metadata=self._metadata,
            )
            try:
                async for answer in call:
                    chunk = stream.take(answer)
                    retrier.progress()
                    yield chunk
            except grpc.RpcError as exc:
                await retrier.wait_or_raise_async(exc)
                continue
            finally:
                call.cancel()
            stream.check_ended()

    async def encode(
        self,
        model: str,
        x: np.ndarray,
        *,
        version: int = 0,
        labels: Sequence[int] | np.ndarray | None = None,
        num_draws: int = 0,
        seed: int | None = None,
        timeout_s: float | None = None,
    ) -> EncodeResult:
        """As ``VaeClient.encode``."""
        call = encode_call(model, x, version=version, labels=labels, num_draws=num_draws, seed=seed)
        return await self._call(call, timeout_s)

    async def decode(
        self,
        model: str,
        z: np.ndarray,
        *,
        version: int = 0,
        labels: Sequence[int] | np.ndarray | None = None,
        output: str = "mean",
        seed: int | None = None,
        encoding: str = "float32",
        timeout_s: float | None = None,
    ) -> DecodeResult:
        """As ``VaeClient.decode``."""
        call = decode_call(
            model, z, version=version, labels=labels, output=output, seed=seed, encoding=encoding
        )
        return await self._call(call, timeout_s)

    async def reconstruct(
        self,
        model: str,
        x: np.ndarray,
        *,
        version: int = 0,
        labels: Sequence[int] | np.ndarray | None = None,
        encoding: str = "float32",
        timeout_s: float | None = None,
    ) -> np.ndarray:
        """As ``VaeClient.reconstruct``."""
        call = reconstruct_call(model, x, version=version, labels=labels, encoding=encoding)
        return await self._call(call, timeout_s)

    async def interpolate(
        self,
        model: str,
        x_a: np.ndarray,
        x_b: np.ndarray,
        steps: int,
        *,
        labels: int | Sequence[int] | np.ndarray | None = None,
        path: str = "linear",
        version: int = 0,
        timeout_s: float | None = None,
    ) -> InterpolationResult:
        """As ``VaeClient.interpolate``."""
        return await interpolate_async(
            self, model, x_a, x_b, steps, labels=labels, path=path, version=version,
            timeout_s=timeout_s,
        )  # fmt: skip

    async def score(
        self,
        model: str,
        x: np.ndarray,
        *,
        version: int = 0,
        labels: Sequence[int] | np.ndarray | None = None,
        k: int = 1,
        seed: int | None = None,
        start_index: int = 0,
        timeout_s: float | None = None,
    ) -> ScoreResult:
        """As ``VaeClient.score``."""
        call = score_call(
            model, x, version=version, labels=labels, k=k, seed=seed, start_index=start_index
        )
        return await self._call(call, timeout_s)
