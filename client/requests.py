"""Typed-API requests as VaeClient builds them: the sample request, what is left of it after a
broken stream, and the checks of its enum-like arguments."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from vaeserve.client.tensors import ENCODINGS, OUTPUTS
from vaeserve.proto.v1 import vaeserve_pb2 as pb

__all__ = ["choice", "label_list", "remaining", "sample_request"]


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
