"""OnnxRunner: the one owner of onnxruntime, one InferenceSession per graph file.

Provider choice (docs/architecture.md, "Providers"): ``cpu``; ``cuda``, which fails at start
when CUDA is not available (never a silent fallback); ``auto``, CUDA when available, else CPU,
logged.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping

import numpy as np
import onnxruntime as ort

from vaeserve.errors import ProviderUnavailable

__all__ = [
    "CPU_PROVIDER",
    "CUDA_PROVIDER",
    "ProviderUnavailable",
    "OnnxRunner",
    "select_providers",
    "runner_factory",
]

logger = logging.getLogger(__name__)

CPU_PROVIDER = "CPUExecutionProvider"
CUDA_PROVIDER = "CUDAExecutionProvider"


def select_providers(device: str) -> list[str]:
    """The onnxruntime providers for ``device``, most preferred first.

    Args:
        device: "auto", "cpu" or "cuda".

    Raises:
        ProviderUnavailable: ``device`` is "cuda" and this onnxruntime build has no CUDA
            provider (e.g. the CPU wheel is installed, not onnxruntime-gpu).
        ValueError: an unknown device name.
    """
    available = ort.get_available_providers()
    if device == "cpu":
        return [CPU_PROVIDER]
    if device == "cuda":
        if CUDA_PROVIDER not in available:
            raise ProviderUnavailable(
                f"device 'cuda' was asked for, but onnxruntime {ort.__version__} offers only "
                f"{available}; install onnxruntime-gpu with a matching CUDA, or use --device cpu"
            )
        return [CUDA_PROVIDER, CPU_PROVIDER]
    if device == "auto":
        chosen = [CUDA_PROVIDER, CPU_PROVIDER] if CUDA_PROVIDER in available else [CPU_PROVIDER]
        logger.info("device auto: using %s (available: %s)", chosen[0], available)
        return chosen
    raise ValueError(f"device: expected one of 'auto', 'cpu', 'cuda', got {device!r}")


def _session_options(intra_op_threads: int, inter_op_threads: int) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = inter_op_threads
    # Spinning worker threads burn the cores that the gRPC event loop needs between runs;
    # measured in docs/performance.md.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3  # onnxruntime's own warnings go to its stderr otherwise
    return options


class OnnxRunner:
    """One onnxruntime session: ``run({name: array}) -> {name: array}``.

    Safe to call from one thread at a time per runner (the batcher's worker); onnxruntime
    releases the GIL while it computes.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        providers: list[str],
        intra_op_threads: int = 0,
        inter_op_threads: int = 0,
        allow_fallback: bool = False,
    ):
        """Open the graph at ``path``.

        Args:
            allow_fallback: accept (and log) a session on a later provider when the first
                cannot be initialised — ``--device auto``, where onnxruntime-gpu offers CUDA
                on a host whose GPU or driver is missing.

        Raises:
            ProviderUnavailable: the first provider asked for could not be initialised and
                ``allow_fallback`` is false (onnxruntime would otherwise fall back silently).
        """
        self.path = str(path)
        self._session = ort.InferenceSession(
            self.path,
            _session_options(intra_op_threads, inter_op_threads),
            providers=providers,
        )
        self.provider = self._session.get_providers()[0]
        if self.provider != providers[0] and allow_fallback:
            logger.warning(
                "%s: %s failed to initialise; device auto uses %s",
                self.path,
                providers[0],
                self.provider,
            )
        elif self.provider != providers[0]:
            raise ProviderUnavailable(
                f"{self.path}: {providers[0]} failed to initialise (onnxruntime fell back to "
                f"{self.provider}); check the CUDA/cuDNN installation"
            )
        self.output_names = [o.name for o in self._session.get_outputs()]
        # Small batches gain nothing from onnxruntime's thread pool but pay for waking it:
        # ~0.1 ms of CPU per run on 2 cores, a fifth of a served batch-1 call
        # (docs/performance.md). A second, single-threaded session runs them. On CUDA the
        # thread count does not matter and a second session would hold the weights twice.
        self._serial_session = self._session
        if self.provider == CPU_PROVIDER and intra_op_threads != 1:
            self._serial_session = ort.InferenceSession(
                self.path, _session_options(1, 1), providers=[CPU_PROVIDER]
            )

    def signature(self) -> tuple[list[tuple[str, str, list]], list[tuple[str, str, list]]]:
        """The graph's (inputs, outputs) as (name, type, shape), for ``check_graph_io``."""
        inputs = [(i.name, i.type, list(i.shape)) for i in self._session.get_inputs()]
        outputs = [(o.name, o.type, list(o.shape)) for o in self._session.get_outputs()]
        return inputs, outputs

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the graph once on a batch; every output keeps the batch axis first."""
        outputs = self._session.run(self.output_names, dict(inputs))
        return dict(zip(self.output_names, outputs, strict=True))

    def run_small(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``run`` for a batch too small to share out: on the calling thread alone."""
        outputs = self._serial_session.run(self.output_names, dict(inputs))
        return dict(zip(self.output_names, outputs, strict=True))


def runner_factory(
    device: str, intra_op_threads: int = 0, inter_op_threads: int = 0
) -> Callable[[str | os.PathLike[str]], OnnxRunner]:
    """Choose the providers for ``device`` once; the result opens each graph with them.

    Raises:
        ProviderUnavailable / ValueError: as ``select_providers``.
    """
    providers = select_providers(device)

    def open_graph(path: str | os.PathLike[str]) -> OnnxRunner:
        return OnnxRunner(
            path,
            providers,
            intra_op_threads,
            inter_op_threads,
            allow_fallback=device == "auto",
        )

    return open_graph
