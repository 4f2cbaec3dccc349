"""``vae-generate --local``: the server's own sampling pipeline, in-process, without gRPC.

Nothing here computes a sample: the model repository is loaded by the server's
``ModelRegistry`` (manifest and checksum checks, onnxruntime sessions, dynamic batchers),
samples come from ``server.pipeline.sample`` (counter-based noise, decoder, draws) and are
encoded by ``server.tensors.encode_samples``, exactly as the server answers ``Sample``. So a
local job writes the same bytes as a served one. Imports onnxruntime: used only by --local.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from vaeserve.client.results import ModelInfo
from vaeserve.client.shards import JobSpec
from vaeserve.client.sources import shard_arrays
from vaeserve.client.tensors import ENCODINGS, OUTPUTS, from_tensor

__all__ = ["LocalSource"]

log = logging.getLogger(__name__)

T = TypeVar("T")


class LocalSource:
    """Samples a model of a local repository on onnxruntime, as a server would.

    Args:
        repository: the model repository folder.
        device: onnxruntime device, "auto", "cpu" or "cuda".
    """

    def __init__(self, repository: Path, device: str = "cpu"):
        self.repository = Path(repository)
        self.device = device
        self._registry: Any = None
        # The registry's batchers live on an event loop; fetch() is called from job threads.
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="vae-generate-local", daemon=True
        )
        self._thread.start()

    def _call(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    def model_info(self, model: str, version: int) -> ModelInfo:
        from vaeserve.server.repository import ModelRegistry, RepositoryError
        from vaeserve.server.runner import runner_factory
        from vaeserve.server.settings import ServerSettings

        from vaeserve.errors import ModelNotFound

        settings = ServerSettings(repository=self.repository, models=(model,), device=self.device)
        open_graph = runner_factory(
            settings.device, settings.intra_op_threads, settings.inter_op_threads
        )
        self._registry = ModelRegistry(settings, open_graph)
        try:
            self._call(self._registry.load())
            loaded = self._registry.get(model, version)
        except RepositoryError:
            names = sorted(p.name for p in self.repository.iterdir() if p.is_dir())
            raise LookupError(
                f"no model {model!r} in repository {self.repository}; it has: {names}"
            ) from None
        except ModelNotFound as exc:
            raise LookupError(str(exc)) from None
        self._settings = settings
        self._model = loaded
        return _model_info(loaded, settings)

    def fetch(self, spec: JobSpec, start: int, stop: int) -> dict[str, np.ndarray]:
        from vaeserve.server import pipeline
        from vaeserve.server.tensors import encode_samples

        assert self._model.manifest.version == spec.model_version, "model_info() pins the model"
        labels = spec.labels_for(start, stop)
        job = pipeline.SampleJob(
            count=stop - start,
            start=start,
            seed=spec.seed,
            # The wire carries temperature as float32: the local job must scale by the same.
            temperature=float(np.float32(spec.temperature)),
            labels=labels,
            draw=OUTPUTS[spec.output] == OUTPUTS["draw"],
        )
        samples = self._call(pipeline.sample(self._model, job))
        encoded = encode_samples(
            samples.x, ENCODINGS[spec.encoding], self._model.manifest.value_range
        )
        return shard_arrays(from_tensor(encoded), labels, samples.z if spec.latents else None)

    def close(self) -> None:
        if self._registry is not None:
            self._call(self._registry.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()


def _model_info(model: Any, settings: Any) -> ModelInfo:
    m = model.manifest
    return ModelInfo(
        name=m.name,
        version=m.version,
        kind=m.kind,
        conditioning=m.conditioning,
        latent_dim=m.latent_dim,
        num_classes=m.num_classes or 0,
        class_names=tuple(m.class_names),
        sample_shape=tuple(m.sample_shape),
        sample_dtype=m.sample_dtype,
        value_range=tuple(m.value_range),
        likelihood=m.likelihood,
        available_versions=(m.version,),
        manifest=m.to_dict(),
        provider=model.provider,
        max_batch_size=settings.batching.max_batch_size,
        max_samples_per_request=settings.max_samples_per_request,
        max_stream_chunk_size=settings.max_stream_chunk_size,
        default_stream_chunk_size=settings.default_stream_chunk_size,
        max_stream_samples=settings.max_stream_samples,
    )
