"""Where a batch job's samples come from: a vaeserve server, or the same pipeline in-process.

Both answer ``fetch(spec, start, stop)`` with the same bytes for the same job: the served one
through ``SampleStream`` with ``start_index``, the local one (``vae-generate --local``) by
running the server's own sampling code on onnxruntime without a server.
"""

from __future__ import annotations

import logging
from typing import Protocol

import numpy as np

from vaeserve.client.client import VaeClient
from vaeserve.client.results import ModelInfo
from vaeserve.client.shards import JobSpec
from vaeserve.errors import ServerError

__all__ = ["SampleSource", "ServedSource", "shard_arrays"]

log = logging.getLogger(__name__)


class SampleSource(Protocol):
    """A model to sample from, by name and version."""

    def model_info(self, model: str, version: int) -> ModelInfo:
        """What the manifest of ``model`` (version 0: the highest) says.

        Raises:
            ModelNotFound: no such model or version.
        """
        ...

    def fetch(self, spec: JobSpec, start: int, stop: int) -> dict[str, np.ndarray]:
        """Samples [start, stop) of the job: "samples", and "labels" / "latents" as the job has."""
        ...

    def close(self) -> None: ...


class ServedSource:
    """Samples from vaeserve servers through a VaeClient (retries, round robin, resumed streams)."""

    def __init__(self, client: VaeClient):
        self.client = client

    def model_info(self, model: str, version: int) -> ModelInfo:
        return self.client.model_info(model, version)

    def fetch(self, spec: JobSpec, start: int, stop: int) -> dict[str, np.ndarray]:
        labels = spec.labels_for(start, stop)
        single = spec.label_pattern is not None and len(spec.label_pattern) == 1
        chunks = list(
            self.client.sample_stream(
                spec.model,
                stop - start,
                version=spec.model_version,
                label=spec.label_pattern[0] if single else None,
                labels=None if single else labels,
                seed=spec.seed,
                temperature=spec.temperature,
                output=spec.output,
                encoding=spec.encoding,
                return_latents=spec.latents,
                start_index=start,
            )
        )
        if any(c.model_version != spec.model_version for c in chunks):
            raise ServerError(
                f"the server answered with another version of {spec.model!r} than the pinned "
                f"{spec.model_version}"
            )
        samples = np.concatenate([c.samples for c in chunks])
        latents = np.concatenate([c.latents for c in chunks]) if spec.latents else None
        return shard_arrays(samples, labels, latents)

    def close(self) -> None:
        self.client.close()


def shard_arrays(
    samples: np.ndarray, labels: np.ndarray | None, latents: np.ndarray | None
) -> dict[str, np.ndarray]:
    """The arrays of a piece of a shard, by the names its files use."""
    arrays = {"samples": samples}
    if labels is not None:
        arrays["labels"] = labels.astype(np.int64, copy=False)
    if latents is not None:
        arrays["latents"] = latents
    return arrays
