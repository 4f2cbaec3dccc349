"""``vae-generate --local``: the engine in-process, without a server.

Nothing here computes a sample: ``vaeserve.engine.Engine`` opens the version (manifest and
checksum checks, onnxruntime sessions) and runs the same pipeline and counter-based noise as
the server, and the samples are encoded by the same ``wire_samples`` as a ``Sample`` answer.
So a local job writes the same bytes as a served one. Imports onnxruntime: used only by
--local.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from vaeserve.client.shards import JobSpec
from vaeserve.client.sources import shard_arrays
from vaeserve.client.tensors import ENCODINGS
from vaeserve.engine import Engine, pipeline, sampling
from vaeserve.info import Limits, ModelInfo, model_info
from vaeserve.manifest import list_versions
from vaeserve.tensors import wire_samples

__all__ = ["LocalSource"]

log = logging.getLogger(__name__)

# A local job has no server limits; the job sizes its requests on its own.
_NO_SERVER_LIMITS = Limits(
    max_batch_size=sampling.MAX_ROW_INDEX,
    max_samples_per_request=sampling.MAX_ROW_INDEX,
    max_message_bytes=2**63 - 1,
    max_stream_chunk_size=sampling.MAX_ROW_INDEX,
    default_stream_chunk_size=sampling.MAX_ROW_INDEX,
    max_stream_samples=sampling.MAX_ROW_INDEX,
    max_score_samples=sampling.MAX_ROW_INDEX,
    max_score_rows=sampling.MAX_ROW_INDEX,
)


class LocalSource:
    """Samples a model of a local repository on onnxruntime, as a server would.

    Args:
        repository: the model repository folder.
        device: onnxruntime device, "auto", "cpu" or "cuda".
    """

    def __init__(self, repository: Path, device: str = "cpu"):
        self.repository = Path(repository)
        self.device = device
        self._engine: Engine | None = None  # opened by model_info(), run by fetch() threads

    def model_info(self, model: str, version: int) -> ModelInfo:
        """Open ``model`` (version 0: the highest published).

        Raises:
            ModelNotFound: no such model or version in the repository.
        """
        e = self._engine = Engine.open(self.repository, model, version, self.device)
        versions = list_versions(self.repository / model)
        return model_info(e.manifest, e.manifest_json, e.provider, versions, _NO_SERVER_LIMITS)

    def fetch(self, spec: JobSpec, start: int, stop: int) -> dict[str, np.ndarray]:
        engine = self._engine
        assert engine is not None and engine.manifest.version == spec.model_version, (
            "model_info() pins the model"
        )
        labels = spec.labels_for(start, stop)
        job = pipeline.SampleJob(
            count=stop - start,
            start=start,
            seed=spec.seed,
            # The wire carries temperature as float32: the local job must scale by the same.
            temperature=float(np.float32(spec.temperature)),
            labels=labels,
            draw=spec.output == "draw",
        )
        samples = engine.run_sample_job(job)
        x = wire_samples(samples.x, ENCODINGS[spec.encoding], engine.manifest.value_range)
        return shard_arrays(x, labels, samples.z if spec.latents else None)

    def close(self) -> None:
        """Nothing to release: the sessions go with the engine."""
