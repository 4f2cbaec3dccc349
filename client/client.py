"""VaeClient: a typed Python client of the ``vaeserve.v1`` gRPC API, returning numpy arrays.

with VaeClient("localhost:8500") as client:
    info = client.model_info("digits")
    result = client.sample("digits", 16, label=3, seed=7)
    result.samples  # (16, *info.sample_shape)
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import grpc
import numpy as np

from vaeserve.client.interpolation import InterpolationResult, interpolate
from vaeserve.client.requests import choice, label_list, remaining, sample_request
from vaeserve.client.results import (
    DecodeResult,
    EncodeResult,
    ModelInfo,
    SampleResult,
    ScoreResult,
)
from vaeserve.client.retry import Retrier, RetryPolicy, call_with_retry
from vaeserve.client.tensors import ENCODINGS, OUTPUTS, AnswerStub, Outgoing
from vaeserve.errors import ServerError
from vaeserve.proto.v1 import vaeserve_pb2 as pb

__all__ = ["VaeClient", "AnswerStub"]

log = logging.getLogger(__name__)

# The channel's own reconnect backoff grows to 120 s by default: after a server restart the
# channel could sit out our whole retry budget before it tries to connect again.
_CHANNEL_OPTIONS = (
    ("grpc.max_receive_message_length", -1),
    ("grpc.max_send_message_length", -1),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
)


class VaeClient:
    """A client of one or more vaeserve servers (client-side round robin, one channel each).

    Calls that fail with UNAVAILABLE or RESOURCE_EXHAUSTED are retried, on the next address,
    with backoff and jitter until ``retry`` runs out; every other error is raised at once. Errors
    are the ``vaeserve.errors`` class of the call's status (``ModelNotFound`` for NOT_FOUND,
    ``InvalidRequest`` for INVALID_ARGUMENT, ...; all ``VaeServeError``), with the gRPC status
    code in ``code`` and the server's message as their text. A ``sample_stream`` that breaks
    off resumes where it stopped: by the sampling contract the continuation holds the same
    samples the broken stream would have.

    Args:
        addresses: "host:port", a comma-separated list of them, or a sequence.
        tls: use TLS (with the system's roots unless ``root_certificates`` is given).
        root_certificates / private_key / certificate_chain: PEM bytes for TLS (the latter two
            for client authentication).
        token: a bearer token, sent as ``authorization: Bearer <token>`` on every call.
        timeout_s: default deadline of each attempt, in seconds (None: no deadline).
        retry: the retry policy.
        options: extra gRPC channel options.
    """

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
        if isinstance(addresses, str):
            addresses = [a.strip() for a in addresses.split(",")]
        self.addresses = [a for a in addresses if a]
        if not self.addresses:
            raise ValueError("addresses: expected at least one host:port")
        channel_options = [*_CHANNEL_OPTIONS, *options]
        if tls or root_certificates is not None:
            creds = grpc.ssl_channel_credentials(root_certificates, private_key, certificate_chain)
            self._channels = [
                grpc.secure_channel(a, creds, options=channel_options) for a in self.addresses
            ]
        else:
            self._channels = [
                grpc.insecure_channel(a, options=channel_options) for a in self.addresses
            ]
        self._stubs = [AnswerStub(c) for c in self._channels]
        self._metadata = (("authorization", f"Bearer {token}"),) if token else None
        self.timeout_s = timeout_s
        self.retry = retry or RetryPolicy()
        self._turn = itertools.count()
        self._lock = threading.Lock()

    def close(self) -> None:
        for channel in self._channels:
            channel.close()

    def __enter__(self) -> VaeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _next_stub(self) -> AnswerStub:
        with self._lock:
            return self._stubs[next(self._turn) % len(self._stubs)]

    def _unary(self, method: str, request: Any, timeout_s: float | None) -> Any:
        def attempt(deadline: float) -> Any:
            rpc = getattr(self._next_stub(), method)
            return rpc(request, timeout=deadline, metadata=self._metadata)

        timeout = self.timeout_s if timeout_s is None else timeout_s
        return call_with_retry(attempt, self.retry, timeout, what=method)

    def list_models(self, timeout_s: float | None = None) -> list[pb.ModelVersionStatus]:
        """Every model version the server knows, with its load state."""
        return list(self._unary("ListModels", pb.ListModelsRequest(), timeout_s).models)

    def model_info(self, model: str, version: int = 0, timeout_s: float | None = None) -> ModelInfo:
        """The manifest of ``model`` (version 0: the highest loaded) and the server's limits.

        Raises:
            ModelNotFound: an unknown model or version.
        """
        request = pb.GetModelInfoRequest(model=pb.ModelRef(name=model, version=version))
        return ModelInfo.from_proto(self._unary("GetModelInfo", request, timeout_s))

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
        return SampleResult.from_answer(self._unary("Sample", request, timeout_s))

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
        received = 0
        retrier = Retrier(self.retry, "SampleStream")
        timeout = self.timeout_s if timeout_s is None else timeout_s
        while received < num_samples:
            call = self._next_stub().SampleStream(
                pb.SampleStreamRequest(request=remaining(request, received), chunk_size=chunk_size),
                timeout=retrier.attempt_timeout(timeout),
                metadata=self._metadata,
            )
            try:
                for answer in call:
                    chunk = SampleResult.from_answer(answer)
                    # Pinned so that a resumed stream continues the same sequence and model.
                    request.seed = chunk.seed
                    request.model.version = chunk.model_version
                    received += len(chunk.samples)
                    retrier.progress()
                    yield chunk
            except grpc.RpcError as exc:
                retrier.wait_or_raise(exc)
                continue
            finally:
                call.cancel()
            if received < num_samples:
                raise ServerError(f"SampleStream ended after {received} of {num_samples} samples")

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
        request = Outgoing(
            pb.EncodeRequest(
                model=pb.ModelRef(name=model, version=version),
                labels=label_list(labels),
                num_draws=num_draws,
                seed=seed,
            ),
            {"x": x},
        )
        answer = self._unary("Encode", request, timeout_s)
        return EncodeResult(
            model_name=answer.message.model_name,
            model_version=answer.message.model_version,
            mu=answer.tensor("mu"),
            logvar=answer.tensor("logvar"),
            z=answer.optional_tensor("z"),
            seed=answer.message.seed,
        )

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
        request = Outgoing(
            pb.DecodeRequest(
                model=pb.ModelRef(name=model, version=version),
                labels=label_list(labels),
                output=choice("output", output, OUTPUTS),
                seed=seed,
                encoding=choice("encoding", encoding, ENCODINGS),
            ),
            {"z": np.asarray(z, dtype=np.float32)},
        )
        answer = self._unary("Decode", request, timeout_s)
        return DecodeResult(
            model_name=answer.message.model_name,
            model_version=answer.message.model_version,
            x=answer.tensor("x"),
            seed=answer.message.seed,
        )

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
        request = Outgoing(
            pb.ReconstructRequest(
                model=pb.ModelRef(name=model, version=version),
                labels=label_list(labels),
                encoding=choice("encoding", encoding, ENCODINGS),
            ),
            {"x": x},
        )
        return self._unary("Reconstruct", request, timeout_s).tensor("x")

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
        request = Outgoing(
            pb.ScoreRequest(
                model=pb.ModelRef(name=model, version=version),
                labels=label_list(labels),
                k=k,
                seed=seed,
                start_index=start_index,
            ),
            {"x": x},
        )
        resp = self._unary("Score", request, timeout_s).message
        return ScoreResult(
            model_name=resp.model_name,
            model_version=resp.model_version,
            seed=resp.seed,
            k=resp.k,
            elbo=np.array(resp.elbo, dtype=np.float64),
            log_px=np.array(resp.log_px, dtype=np.float64),
            log_likelihood=np.array(resp.log_likelihood, dtype=np.float64),
            kl=np.array(resp.kl, dtype=np.float64),
        )
