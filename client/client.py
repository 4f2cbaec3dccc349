"""VaeClient: a typed Python client of the ``vaeserve.v1`` gRPC API, returning numpy arrays.

with VaeClient("localhost:8500") as client:
    info = client.model_info("digits")
    result = client.sample("digits", 16, label=3, seed=7)
    result.samples  # (16, *info.sample_shape)
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import TypeVar

import grpc
import numpy as np

from vaeserve.client.channels import ClientBase
from vaeserve.client.interpolation import InterpolationResult, interpolate
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
from vaeserve.client.retry import Retrier, call_with_retry
from vaeserve.client.tensors import AnswerStub
from vaeserve.proto.v1 import vaeserve_pb2 as pb

T = TypeVar("T")

__all__ = ["VaeClient", "AnswerStub"]

log = logging.getLogger(__name__)


class VaeClient(ClientBase):
    """A client of one or more vaeserve servers: blocking calls (``AsyncVaeClient``: asyncio).

    Calls that fail with UNAVAILABLE or RESOURCE_EXHAUSTED are retried, on the next address,
    with backoff and jitter until ``retry`` runs out; every other error is raised at once. Errors
    are the ``vaeserve.errors`` class of the call's status (``ModelNotFound`` for NOT_FOUND,
    ``InvalidRequest`` for INVALID_ARGUMENT, ...; all ``VaeServeError``), with the gRPC status
    code in ``code`` and the server's message as their text. A ``sample_stream`` that breaks
    off resumes where it stopped: by the sampling contract the continuation holds the same
    samples the broken stream would have.

    Calls to several "host:port" addresses go round robin, one channel each; a gRPC target
    such as "dns:///name:port" (one DNS name for several servers: a headless Kubernetes
    Service) is one channel on which gRPC spreads calls over every resolved address with its
    round_robin policy and follows the addresses as they change (``vaeserve.client.channels``).

    Args:
        addresses: "host:port", a comma-separated list of them, or a sequence; or one gRPC
            target: "dns:///name:port", "ipv4:a:port,b:port", "ipv6:...", "unix:path".
        tls: use TLS (with the system's roots unless ``root_certificates`` is given).
        root_certificates / private_key / certificate_chain: PEM bytes for TLS (the latter two
            for client authentication).
        token: a bearer token, sent as ``authorization: Bearer <token>`` on every call.
        timeout_s: default deadline of each attempt, in seconds (None: no deadline).
        retry: the retry policy.
        options: extra gRPC channel options.

    Raises (on construction):
        TypeError / ValueError: ``addresses`` in none of these forms (the message says which
            item, and what is expected).
    """

    _api = grpc

    def close(self) -> None:
        for channel in self._channels:
            channel.close()

    def __enter__(self) -> VaeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, call: Call[T], timeout_s: float | None) -> T:
        def attempt(deadline: float) -> object:
            rpc = getattr(self._next_stub(), call.method)
            return rpc(call.request, timeout=deadline, metadata=self._metadata)

        answer = call_with_retry(attempt, self.retry, self._timeout(timeout_s), what=call.method)
        return call.result(answer)

    def list_models(self, timeout_s: float | None = None) -> list[pb.ModelVersionStatus]:
        """Every model version the server knows, with its load state."""
        return self._call(list_models_call(), timeout_s)

    def model_info(self, model: str, version: int = 0, timeout_s: float | None = None) -> ModelInfo:
        """The manifest of ``model`` (version 0: the highest loaded) and the server's limits.

        Raises:
            ModelNotFound: an unknown model or version.
        """
        return self._call(model_info_call(model, version), timeout_s)

    def sample(
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
        """Samples start_index..start_index+num_samples-1 of ``seed``, in one answer.

        Args:
            model: the model name.
            num_samples: how many samples (at most the server's ``max_samples_per_request``).
            version: 0 for the highest loaded version.
            label: CVAE: the class of every sample; or
            labels: CVAE: one class per sample.
            seed: None: the server picks one and returns it in the result.
            temperature: scale of the prior's standard deviation (None: 1.0).
            output: "mean" (E[x|z]) or "draw" (one draw from p(x|z)).
            encoding: "float32" (exact), "float16" or "uint8" (value range onto 0..255).
            return_latents: also return z.
            start_index: index of the first sample in the seed's sequence.
            timeout_s: deadline of each attempt (None: the client's default).

        Raises:
            ValueError: an unknown ``output`` or ``encoding``.
            VaeServeError: InvalidRequest, ModelNotFound, ... or a retryable status once the
                retry policy is spent.
        """
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
        return self._call(sample_call(request), timeout_s)

    def sample_stream(
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
    ) -> Iterator[SampleResult]:
        """The samples of ``sample``, as chunks of at most ``chunk_size`` (0: server default).

        If the stream breaks with a retryable status, it is resumed after the last chunk
        received, with the seed and model version of the first chunk, so the chunks together
        are always the samples asked for. ``timeout_s`` bounds each attempt of the stream.

        Raises:
            VaeServeError: as ``sample``.
        """
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
                for answer in call:
                    chunk = stream.take(answer)
                    retrier.progress()
                    yield chunk
            except grpc.RpcError as exc:
                retrier.wait_or_raise(exc)
                continue
            finally:
                call.cancel()
            stream.check_ended()

    def encode(
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
        """x (n, *sample_shape) → mu, logvar (n, latent_dim) of q(z|x[,y]), and draws of z."""
        call = encode_call(model, x, version=version, labels=labels, num_draws=num_draws, seed=seed)
        return self._call(call, timeout_s)

    def decode(
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
        """z (n, latent_dim) → x (n, *sample_shape): the mean, or a draw from p(x|z[,y])."""
        call = decode_call(
            model, z, version=version, labels=labels, output=output, seed=seed, encoding=encoding
        )
        return self._call(call, timeout_s)

    def reconstruct(
        self,
        model: str,
        x: np.ndarray,
        *,
        version: int = 0,
        labels: Sequence[int] | np.ndarray | None = None,
        encoding: str = "float32",
        timeout_s: float | None = None,
    ) -> np.ndarray:
        """x → decode(mu(x)), (n, *sample_shape)."""
        call = reconstruct_call(model, x, version=version, labels=labels, encoding=encoding)
        return self._call(call, timeout_s)

    def interpolate(
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
        """Decoded points of a latent path between the posterior means of two inputs: see
        ``vaeserve.client.interpolation.interpolate`` (its arguments, errors) and
        docs/interpolation.md."""
        return interpolate(
            self, model, x_a, x_b, steps, labels=labels, path=path, version=version,
            timeout_s=timeout_s,
        )  # fmt: skip

    def score(
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
        """x (n, *sample_shape) → per input, in nats (float64 (n,) each): the ELBO, the
        k-sample importance-weighted bound ``log_px``, E[log p(x|z)] and the closed-form KL.

        Args:
            labels: CVAE (concat or prior): one class per row.
            k: importance samples per input (at most the server's ``max_score_samples``, and
                n * k at most its ``max_score_rows``); with 1, ``log_px`` is the one-draw ELBO
                estimate.
            seed: None: the server picks one and returns it in the result.
            start_index: index of the first input in the seed's scoring sequence.
        """
        call = score_call(
            model, x, version=version, labels=labels, k=k, seed=seed, start_index=start_index
        )
        return self._call(call, timeout_s)
