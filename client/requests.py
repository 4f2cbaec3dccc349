"""The typed API's calls as both clients make them, with no I/O: each method's request and the
rule that turns its answer into the method's result (``Call``), the sample request, and the
resumption of a broken SampleStream (``StreamResume``).

``VaeClient`` and ``AsyncVaeClient`` differ only in how they wait for an answer; what they
send and what they make of the answer is written here, once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import numpy as np

from vaeserve.client.results import (
    DecodeResult,
    EncodeResult,
    ModelInfo,
    SampleResult,
    ScoreResult,
)
from vaeserve.client.tensors import ENCODINGS, OUTPUTS, Answer, Outgoing
from vaeserve.errors import ServerError
from vaeserve.proto.v1 import vaeserve_pb2 as pb

__all__ = [
    "Call",
    "StreamResume",
    "choice",
    "decode_call",
    "encode_call",
    "label_list",
    "list_models_call",
    "model_info_call",
    "reconstruct_call",
    "remaining",
    "sample_call",
    "sample_request",
    "score_call",
]

T = TypeVar("T")


@dataclass(frozen=True)
class Call(Generic[T]):
    """One unary call: the ``AnswerStub`` method, its request, and its answer → the result."""

    method: str
    request: Any
    result: Callable[[Any], T]


def list_models_call() -> Call[list[pb.ModelVersionStatus]]:
    return Call("ListModels", pb.ListModelsRequest(), _models)


def model_info_call(model: str, version: int) -> Call[ModelInfo]:
    request = pb.GetModelInfoRequest(model=pb.ModelRef(name=model, version=version))
    return Call("GetModelInfo", request, ModelInfo.from_proto)


def sample_call(request: pb.SampleRequest) -> Call[SampleResult]:
    return Call("Sample", request, SampleResult.from_answer)


def encode_call(
    model: str,
    x: np.ndarray,
    *,
    version: int,
    labels: Sequence[int] | np.ndarray | None,
    num_draws: int,
    seed: int | None,
) -> Call[EncodeResult]:
    request = pb.EncodeRequest(
        model=pb.ModelRef(name=model, version=version),
        labels=label_list(labels),
        num_draws=num_draws,
        seed=seed,
    )
    return Call("Encode", Outgoing(request, {"x": x}), EncodeResult.from_answer)


def decode_call(
    model: str,
    z: np.ndarray,
    *,
    version: int,
    labels: Sequence[int] | np.ndarray | None,
    output: str,
    seed: int | None,
    encoding: str,
) -> Call[DecodeResult]:
    request = pb.DecodeRequest(
        model=pb.ModelRef(name=model, version=version),
        labels=label_list(labels),
        output=choice("output", output, OUTPUTS),
        seed=seed,
        encoding=choice("encoding", encoding, ENCODINGS),
    )
    z = np.asarray(z, dtype=np.float32)
    return Call("Decode", Outgoing(request, {"z": z}), DecodeResult.from_answer)


def reconstruct_call(
    model: str,
    x: np.ndarray,
    *,
    version: int,
    labels: Sequence[int] | np.ndarray | None,
    encoding: str,
) -> Call[np.ndarray]:
    request = pb.ReconstructRequest(
        model=pb.ModelRef(name=model, version=version),
        labels=label_list(labels),
        encoding=choice("encoding", encoding, ENCODINGS),
    )
    return Call("Reconstruct", Outgoing(request, {"x": x}), _x)


def score_call(
    model: str,
    x: np.ndarray,
    *,
    version: int,
    labels: Sequence[int] | np.ndarray | None,
    k: int,
    seed: int | None,
    start_index: int,
) -> Call[ScoreResult]:
    request = pb.ScoreRequest(
        model=pb.ModelRef(name=model, version=version),
        labels=label_list(labels),
        k=k,
        seed=seed,
        start_index=start_index,
    )
    return Call("Score", Outgoing(request, {"x": x}), ScoreResult.from_answer)


def _models(answer: pb.ListModelsResponse) -> list[pb.ModelVersionStatus]:
    return list(answer.models)


def _x(answer: Answer) -> np.ndarray:
    return answer.tensor("x")


def sample_request(
    model: str,
    num_samples: int,
    *,
    version: int,
    label: int | None,
    labels: Sequence[int] | np.ndarray | None,
    seed: int | None,
    temperature: float | None,
    output: str,
    encoding: str,
    return_latents: bool,
    start_index: int,
) -> pb.SampleRequest:
    return pb.SampleRequest(
        model=pb.ModelRef(name=model, version=version),
        num_samples=num_samples,
        label=label,
        labels=label_list(labels),
        seed=seed,
        temperature=temperature,
        output=choice("output", output, OUTPUTS),
        return_latents=return_latents,
        encoding=choice("encoding", encoding, ENCODINGS),
        start_index=start_index,
    )


class StreamResume:
    """A SampleStream across its attempts: what to ask for next, and each chunk received.

    The first chunk pins the seed and the model version (the server may have picked either),
    so that by the sampling contract a stream resumed after the last chunk received holds
    the very samples the broken one would have.
    """

    def __init__(self, request: pb.SampleRequest, chunk_size: int):
        self.request = request
        self.chunk_size = chunk_size
        self.received = 0

    @property
    def done(self) -> bool:
        return self.received >= self.request.num_samples

    def next_request(self) -> pb.SampleStreamRequest:
        """The stream of the samples not received yet."""
        rest = remaining(self.request, self.received)
        return pb.SampleStreamRequest(request=rest, chunk_size=self.chunk_size)

    def take(self, answer: Answer) -> SampleResult:
        """One chunk of the answer, counted."""
        chunk = SampleResult.from_answer(answer)
        self.request.seed = chunk.seed
        self.request.model.version = chunk.model_version
        self.received += len(chunk.samples)
        return chunk

    def check_ended(self) -> None:
        """After a stream that ended without an error.

        Raises:
            ServerError: it ended short of the samples asked for.
        """
        if not self.done:
            raise ServerError(
                f"SampleStream ended after {self.received} of {self.request.num_samples} samples"
            )


def remaining(request: pb.SampleRequest, received: int) -> pb.SampleRequest:
    """``request`` less its first ``received`` samples."""
    rest = pb.SampleRequest()
    rest.CopyFrom(request)
    rest.num_samples -= received
    rest.start_index += received
    del rest.labels[:received]
    return rest


def label_list(labels: Sequence[int] | np.ndarray | None) -> list[int] | None:
    return None if labels is None else np.asarray(labels, dtype=np.int64).tolist()


def choice(name: str, value: str, options: dict[str, int]) -> int:
    try:
        return options[value]
    except KeyError:
        raise ValueError(f"{name}: expected one of {', '.join(options)}, got {value!r}") from None
