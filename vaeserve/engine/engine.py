"""The in-process engine: one model version of a repository, run directly on onnxruntime.

The same pipeline, checks and counter-based noise as the server, without gRPC, batchers or
an event loop of its own: sample i of seed s here is byte for byte sample i of seed s from
any server serving that version. Torch-free, like everything under ``vaeserve.engine``.

    engine = Engine.open("models", "digits")
    samples = engine.sample(16, label=3, seed=7)  # samples.x: (16, 1, 8, 8) float32
"""

from __future__ import annotations

import os
from collections.abc import Coroutine, Mapping
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from vaeserve.engine import pipeline, sampling
from vaeserve.engine.checks import check_finite, check_in_range, check_labels, check_value_range
from vaeserve.engine.runner import OnnxRunner, runner_factory
from vaeserve.engine.version import OpenVersion, open_version, prior_means
from vaeserve.errors import InvalidRequest, ModelNotFound
from vaeserve.manifest import ModelManifest, list_versions

__all__ = ["Engine"]

T = TypeVar("T")
# Rows per graph run: bounds the memory of one call, whatever its size.
_RUN_ROWS = 4096


class Engine:
    """Sample, encode, decode, reconstruct and score with one opened model version.

    Each method checks its arguments as the server does (``InvalidRequest`` naming the
    argument) and returns float32 arrays. Thread-safe: onnxruntime sessions may be run from
    several threads at once.
    """

    def __init__(self, version: OpenVersion):
        self._version = version
        self._encoder = _DirectGraph(version.encoder)
        self._decoder = _DirectGraph(version.decoder)
        self._prior_means = prior_means(version.manifest)
        self._prior_mixture = version.prior

    @classmethod
    def open(
        cls,
        repository: str | os.PathLike[str],
        name: str,
        version: int = 0,
        device: str = "cpu",
        threads: int = 0,
    ) -> Engine:
        """Open ``<repository>/<name>/<version>`` (0: the highest published version).

        Args:
            device: "cpu", "cuda" or "auto", as ``vae-serve --device``.
            threads: onnxruntime intra-op threads; 0 lets onnxruntime choose.

        Raises:
            ModelNotFound: no such model or version in the repository.
            ManifestError: the version's files are not a valid model version.
            ProviderUnavailable: ``device`` cannot run here.
        """
        model_dir = Path(repository) / name
        versions = list_versions(model_dir)
        if not versions:
            found = sorted(p.name for p in Path(repository).iterdir() if p.is_dir())
            raise ModelNotFound(f"no model {name!r} in repository {repository}; it has: {found}")
        chosen = version or versions[-1]
        if chosen not in versions:
            raise ModelNotFound(
                f"version {version} of {name!r} is not published; published: {versions}"
            )
        open_graph = runner_factory(device, threads)
        return cls(open_version(model_dir / str(chosen), open_graph))

    # --- what a model version is ---

    @property
    def manifest(self) -> ModelManifest:
        return self._version.manifest

    @property
    def encoder(self) -> _DirectGraph:
        return self._encoder

    @property
    def decoder(self) -> _DirectGraph:
        return self._decoder

    @property
    def prior_means(self) -> np.ndarray | None:
        return self._prior_means

    @property
    def prior_mixture(self) -> sampling.MixturePrior | None:
        return self._prior_mixture

    @property
    def provider(self) -> str:
        """The onnxruntime execution provider the graphs run on."""
        return self._version.decoder.provider

    @property
    def manifest_json(self) -> str:
        return self._version.manifest_json

    # --- calls ---

    def sample(
        self,
        n: int,
        *,
        label: int | None = None,
        labels: np.ndarray | None = None,
        seed: int | None = None,
        start: int = 0,
        temperature: float = 1.0,
        draw: bool = False,
    ) -> pipeline.Samples:
        """Samples ``start .. start+n-1`` of ``seed``'s sequence.

        Args:
            label / labels: a CVAE's class, one for all samples or one per sample.
            seed: None draws a fresh one; it is returned in the answer.
            temperature: scales the prior's noise (0: the prior's mean).
            draw: a draw from p(x|z) instead of E[x|z].
        """
        check_in_range("n", n, 1, sampling.MAX_ROW_INDEX)
        check_in_range("start", start, 0, sampling.MAX_ROW_INDEX - n)
        if not 0 <= temperature < float("inf"):
            raise InvalidRequest(f"temperature is {temperature}, expected a finite number >= 0")
        job = pipeline.SampleJob(
            count=n,
            start=start,
            seed=self._seed(seed),
            temperature=float(temperature),
            labels=self._sample_labels(n, label, labels),
            draw=draw,
        )
        return self.run_sample_job(job)

    def run_sample_job(self, job: pipeline.SampleJob) -> pipeline.Samples:
        """A checked ``SampleJob``, in runs of at most a few thousand rows."""
        parts = [
            _complete(pipeline.sample(self, job.rows(offset, min(_RUN_ROWS, job.count - offset))))
            for offset in range(0, job.count, _RUN_ROWS)
        ]
        x = np.concatenate([p.x for p in parts])
        z = np.concatenate([p.z for p in parts])
        return pipeline.Samples(x=x, z=z, seed=job.seed)

    def encode(
        self,
        x: np.ndarray,
        *,
        labels: np.ndarray | None = None,
        num_draws: int = 0,
        seed: int | None = None,
    ) -> pipeline.Encoding:
        """q(z|x[,y]): its mean and log-variance, and ``num_draws`` draws per input."""
        x = self._inputs(x)
        check_in_range("num_draws", num_draws, 0, sampling.MAX_ROW_INDEX // len(x))
        job = pipeline.EncodeJob(
            x=x,
            labels=self._row_labels(labels, len(x), self.manifest.encoder_takes_label),
            num_draws=num_draws,
            seed=self._seed(seed),
        )
        return _complete(pipeline.encode(self, job))

    def decode(
        self,
        z: np.ndarray,
        *,
        labels: np.ndarray | None = None,
        draw: bool = False,
        seed: int | None = None,
    ) -> np.ndarray:
        """E[x|z], or a draw from p(x|z), for latents z of shape (n, latent_dim)."""
        z = np.asarray(z, dtype=np.float32)
        d = self.manifest.latent_dim
        if z.ndim != 2 or z.shape[1] != d or not len(z):
            raise InvalidRequest(f"z has shape {list(z.shape)}, expected [n, {d}] with n >= 1")
        check_finite("z", z)
        labels = self._row_labels(labels, len(z), self.manifest.decoder_takes_label)
        job = pipeline.DecodeJob(z=z, labels=labels, draw=draw, seed=self._seed(seed))
        return _complete(pipeline.decode(self, job))

    def reconstruct(self, x: np.ndarray, *, labels: np.ndarray | None = None) -> np.ndarray:
        """decode(mu(x)): the decoder's mean at the posterior mean."""
        x = self._inputs(x)
        labels = self._row_labels(labels, len(x), self.manifest.encoder_takes_label)
        job = pipeline.ReconstructJob(x=x, labels=labels)
        return _complete(pipeline.reconstruct(self, job))

    def score(
        self,
        x: np.ndarray,
        *,
        labels: np.ndarray | None = None,
        k: int = 1,
        seed: int | None = None,
        start: int = 0,
    ) -> pipeline.Scores:
        """Per input, in nats: the ELBO, the k-sample importance-weighted bound on log p(x),
        E[log p(x|z)] and the closed-form KL, exactly as the server's Score computes them.

        Args:
            labels: one class per row for a CVAE (concat and prior alike).
            k: importance samples per input (1: the bound is the one-sample ELBO).
            seed: None draws a fresh one (not returned: pass one to reproduce a score).
            start: index of the first input in the seed's scoring sequence.
        """
        x = self._inputs(x)
        check_in_range("k", k, 1, sampling.MAX_ROW_INDEX // len(x))
        check_in_range("start", start, 0, sampling.MAX_ROW_INDEX // k - len(x))
        job = pipeline.ScoreJob(
            x=x,
            labels=self._row_labels(labels, len(x), self.manifest.kind == "cvae"),
            k=k,
            seed=self._seed(seed),
            start=start,
            chunk_rows=_RUN_ROWS,
        )
        return _complete(pipeline.score(self, job))

    # --- argument checks ---

    def _seed(self, seed: int | None) -> int:
        if seed is None:
            return sampling.new_seed()
        check_in_range("seed", seed, 0, sampling.MAX_SEED)
        return seed

    def _inputs(self, x: np.ndarray) -> np.ndarray:
        m = self.manifest
        x = np.asarray(x)
        if x.ndim != 1 + len(m.sample_shape) or x.shape[1:] != m.sample_shape or not len(x):
            expected = [-1, *m.sample_shape]
            raise InvalidRequest(f"x has shape {list(x.shape)}, expected {expected} (-1: n >= 1)")
        x = x.astype(m.sample_dtype, copy=False)
        check_value_range("x", x, m)
        return x

    def _sample_labels(
        self, n: int, label: int | None, labels: np.ndarray | None
    ) -> np.ndarray | None:
        m = self.manifest
        if m.kind != "cvae":
            if label is not None or labels is not None:
                raise InvalidRequest(f"label/labels are set, but {m.name} is a vae")
            return None
        if (label is None) == (labels is None):
            raise InvalidRequest(f"{m.name} is a cvae: give exactly one of label and labels")
        if label is not None:
            values = np.full(n, label, dtype=np.int64)
        else:
            values = np.asarray(labels, dtype=np.int64).reshape(-1)
            if len(values) != n:
                raise InvalidRequest(f"labels holds {len(values)} classes, expected {n}")
        check_labels("label" if label is not None else "labels", values, m)
        return values

    def _row_labels(self, labels: Any, n: int, required: bool) -> np.ndarray | None:
        if not required:
            if labels is not None:
                raise InvalidRequest(f"labels are set, but {self.manifest.name}'s graphs take none")
            return None
        if labels is None:
            raise InvalidRequest(
                f"labels are missing: {self.manifest.name} is a {self.manifest.conditioning} cvae"
            )
        values = np.asarray(labels, dtype=np.int64).reshape(-1)
        if len(values) != n:
            raise InvalidRequest(f"labels holds {len(values)} classes, expected {n}")
        check_labels("labels", values, self.manifest)
        return values


class _DirectGraph:
    """A graph run on the calling thread: the pipeline's ``Graph`` without a batcher."""

    def __init__(self, runner: OnnxRunner):
        self._runner = runner

    async def run(
        self, inputs: Mapping[str, np.ndarray], deadline: float | None = None
    ) -> dict[str, np.ndarray]:
        return self._runner.run(inputs)


def _complete(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run a pipeline coroutine whose graphs never suspend, without an event loop.

    The pipeline is written once, as coroutines, for the server's batchers; here every await
    finishes at once, so one step runs it to the end. No event loop means the engine works
    inside a caller's running loop too (a notebook, an async job).
    """
    try:
        coroutine.send(None)
    except StopIteration as done:
        return done.value
    coroutine.close()
    raise RuntimeError("an engine graph suspended: only direct graphs may run here")
