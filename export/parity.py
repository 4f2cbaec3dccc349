"""The parity gate: each ONNX graph in onnxruntime against the PyTorch model, on the same inputs.

Inputs are real images (and labels) from the checkpoint's data set and random latents, at
``BATCH_SIZES``; outputs must agree elementwise within ``TOLERANCES`` (numpy's ``allclose``
rule, |ort - torch| <= atol + rtol * |torch|). The tolerances are written here and nowhere else.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

from vaeserve.errors import VaeServeError

__all__ = [
    "BATCH_SIZES",
    "REL_FLOOR",
    "TOLERANCES",
    "ParityCase",
    "ParityError",
    "Tolerance",
    "build_cases",
    "check_parity",
    "check_prior_parity",
    "compare",
    "parity_providers",
    "reference_data",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Tolerance:
    """Elementwise bound |ort - torch| <= atol + rtol * |torch|."""

    atol: float
    rtol: float

    def to_dict(self) -> dict[str, float]:
        return {"atol": self.atol, "rtol": self.rtol}


# Measured on the default digits models (docs/export.md): a correct fp32 export differs from
# torch by float reordering only, max |Δ| <= 2.1e-6, so atol 1e-4 leaves a ~50x margin and still
# fails a bias changed by 0.01 (tests/test_export_parity.py). An fp16 graph computes in half
# precision (10-bit mantissa) and is compared with the fp32 model: max |Δ| <= 2.8e-3, so
# atol 3e-2 leaves a ~10x margin.
TOLERANCES = {
    "fp32": Tolerance(atol=1e-4, rtol=1e-3),
    "fp16": Tolerance(atol=3e-2, rtol=3e-2),
}
BATCH_SIZES = (1, 7, 256)
# Relative errors are reported against max(|torch|, REL_FLOOR): near-zero outputs (the black
# background's probabilities) would otherwise turn a negligible absolute error into a huge one.
REL_FLOOR = 1e-2
_PARITY_SEED = 0


class ParityError(VaeServeError, RuntimeError):
    """onnxruntime and PyTorch disagree beyond the tolerance; nothing may be published."""


@dataclass(frozen=True)
class ParityCase:
    """One graph run: its inputs and PyTorch's outputs, by ONNX tensor name."""

    graph: str  # "encoder" | "decoder"
    batch_size: int
    feeds: dict[str, np.ndarray]
    expected: dict[str, np.ndarray]


def reference_data(data_info: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray | None, str]:
    """The test split of the checkpoint's data set: (x, y or None, description).

    Raises:
        FileNotFoundError / ValueError: the data set named by the checkpoint cannot be loaded.
    """
    from vaeserve.training.data import load_dataset

    spec = data_info.get("spec")
    binarize = data_info.get("binarize", "none")
    split_seed = data_info.get("split_seed", 0)
    test = load_dataset(spec, binarize=binarize, split_seed=split_seed).test
    return test.x, test.y, f"test split of {spec!r} (binarize {binarize}, split seed {split_seed})"


def build_cases(
    encoder: Callable[..., tuple[torch.Tensor, ...]],
    decoder: Callable[..., tuple[torch.Tensor, ...]],
    io: Mapping[str, tuple[Sequence[str], Sequence[str]]],
    data: tuple[np.ndarray, np.ndarray | None],
    latent_dim: int,
    prior_means: np.ndarray | None,
    batch_sizes: Sequence[int] = BATCH_SIZES,
    mixture: Any = None,
) -> list[ParityCase]:
    """PyTorch's answers for each graph at each batch size.

    Args:
        encoder / decoder: the fp32 modules that were exported (positional inputs in the
            order of ``io[graph][0]``, outputs in the order of ``io[graph][1]``).
        io: graph -> (input names, output names).
        data: images (N, C, H, W) and labels (N,) or None; rows repeat when N < batch size.
        latent_dim: width of z.
        prior_means: (num_classes, latent_dim) for a prior CVAE: z is drawn around μ_y.
        mixture: the exported mixture prior (``sampling.MixturePrior``) of a VampPrior VAE:
            z is drawn from it, where the decoder will be asked to work.
    """
    x_all, y_all = data
    rng = np.random.default_rng(_PARITY_SEED)
    cases = []
    for b in batch_sizes:
        rows = np.arange(b) % len(x_all)
        x = np.ascontiguousarray(x_all[rows], dtype=np.float32)  # (b, C, H, W)
        y = None if y_all is None else np.ascontiguousarray(y_all[rows], dtype=np.int64)  # (b,)
        z = rng.standard_normal((b, latent_dim)).astype(np.float32)  # (b, latent_dim)
        if mixture is not None:
            c = rng.choice(mixture.components, size=b, p=mixture.weights)
            z = mixture.means[c] + np.exp(0.5 * mixture.logvars[c]) * z
        if prior_means is not None and y is not None:
            z = z + prior_means[y].astype(np.float32)  # z ~ N(μ_y, I)
        for graph, module, first in (("encoder", encoder, x), ("decoder", decoder, z)):
            inputs, outputs = io[graph]
            feeds = {inputs[0]: first}
            if "y" in inputs:
                assert y is not None, "a graph with a label input needs labelled data"
                feeds["y"] = y
            with torch.no_grad():
                got = module(*(torch.from_numpy(feeds[n]) for n in inputs))
            expected = {n: t.numpy() for n, t in zip(outputs, got, strict=True)}
            cases.append(ParityCase(graph, b, feeds, expected))
    return cases


def check_prior_parity(model: torch.nn.Module, mixture: Any, rows: int = 256) -> dict[str, float]:
    """log p(z) of the exported mixture (numpy, as the server computes it) against the torch
    model's ``log_prior``, at draws from the model's own prior and at N(0, I) draws (the far
    side of the mixture); |Δ| within the fp32 tolerance. Returns max_abs and max_rel.

    Raises:
        ParityError: the exported prior's density differs from the model's.
    """
    generator = torch.Generator().manual_seed(_PARITY_SEED)
    with torch.no_grad():
        own = model.sample_latent(rows, generator=generator)
        wide = torch.randn(rows, own.shape[1], generator=generator)
        z = torch.cat([own, wide]).float()
        expected = model.log_prior(z).double().numpy()
    c = compare(mixture.log_prob(z.numpy()), expected, TOLERANCES["fp32"])
    if not c["ok"]:
        raise ParityError(f"parity gate failed: the exported prior's log p(z): {c['detail']}")
    return {"max_abs": c["max_abs"], "max_rel": c["max_rel"]}


def parity_providers() -> list[str]:
    """CPU always; CUDA too where this onnxruntime build offers it."""
    available = ort.get_available_providers()
    return ["CPUExecutionProvider"] + [p for p in ("CUDAExecutionProvider",) if p in available]


def compare(actual: np.ndarray, expected: np.ndarray, tol: Tolerance) -> dict[str, Any]:
    """Errors of one output: max_abs, max_rel, and the worst element relative to the bound."""
    if actual.shape != expected.shape:
        detail = f"shape {list(actual.shape)}, PyTorch's is {list(expected.shape)}"
        return {"ok": False, "ratio": np.inf, "detail": detail}
    a = actual.astype(np.float64)
    e = expected.astype(np.float64)
    diff = np.abs(a - e)
    diff[np.isnan(a) != np.isnan(e)] = np.inf  # NaN on one side only is a failure
    diff[np.isnan(a) & np.isnan(e)] = 0.0
    bound = tol.atol + tol.rtol * np.abs(np.nan_to_num(e))
    ratio = diff / bound
    worst = np.unravel_index(int(np.argmax(ratio)), ratio.shape) if ratio.size else ()
    return {
        "ok": bool(ratio.size == 0 or ratio[worst] <= 1.0),
        "ratio": float(ratio[worst]) if ratio.size else 0.0,
        "max_abs": float(diff.max(initial=0.0)),
        "max_rel": float((diff / np.maximum(np.abs(e), REL_FLOOR)).max(initial=0.0)),
        "detail": ""
        if not ratio.size
        else (
            f"|Δ| {diff[worst]:.3g} at index {[int(i) for i in worst]} (torch {e[worst]:.6g}, "
            f"onnxruntime {a[worst]:.6g}) against a bound of {bound[worst]:.3g} "
            f"(atol {tol.atol:g} + rtol {tol.rtol:g}·|torch|), {ratio[worst]:.3g}x the bound"
        ),
    }


def check_parity(
    graphs: Mapping[str, Path], cases: Sequence[ParityCase], tol: Tolerance
) -> dict[str, Any]:
    """Run every case on every provider and compare with PyTorch.

    Returns:
        {provider: {graph: {output: {"max_abs", "max_rel"}}}}, maxima over batch sizes.

    Raises:
        ParityError: naming the provider, graph, output and batch size of each output over
            tolerance, and by how much.
    """
    results: dict[str, Any] = {}
    failures = []
    for provider in parity_providers():
        sessions = {g: _session(path, provider) for g, path in graphs.items()}
        if any(s is None for s in sessions.values()):
            continue
        table: dict[str, dict[str, dict[str, float]]] = {}
        for case in cases:
            try:
                got = sessions[case.graph].run(list(case.expected), case.feeds)
            except Exception as exc:  # see _session
                raise ParityError(
                    f"{case.graph} failed at batch {case.batch_size} on {provider}: {exc}"
                ) from None
            for name, actual in zip(case.expected, got, strict=True):
                c = compare(actual, case.expected[name], tol)
                if not c["ok"]:
                    where = f"{case.graph} output '{name}' at batch {case.batch_size} on {provider}"
                    failures.append((c["ratio"], f"{where}: {c['detail']}"))
                    continue
                row = table.setdefault(case.graph, {}).setdefault(
                    name, {"max_abs": 0.0, "max_rel": 0.0}
                )
                row["max_abs"] = max(row["max_abs"], c["max_abs"])
                row["max_rel"] = max(row["max_rel"], c["max_rel"])
        results[provider] = table
    if failures:
        failures.sort(key=lambda f: -f[0])
        more = f" ({len(failures) - 1} more output(s) over tolerance)" if len(failures) > 1 else ""
        raise ParityError(f"parity gate failed: {failures[0][1]}{more}")
    return results


def _session(path: Path, provider: str) -> ort.InferenceSession | None:
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: the gate reports what matters itself
    if provider == "CUDAExecutionProvider":
        # TF32 would round fp32 matmuls to a 10-bit mantissa: compare true fp32 on GPUs too.
        chosen: list[Any] = [(provider, {"use_tf32": 0}), "CPUExecutionProvider"]
    else:
        chosen = [provider]
    try:
        session = ort.InferenceSession(str(path), options, providers=chosen)
    except Exception as exc:  # onnxruntime's own exception types carry no common base
        raise ParityError(f"onnxruntime cannot load {path.name} on {provider}: {exc}") from None
    if session.get_providers()[0] != provider:
        logger.warning("%s is listed but could not be used; parity checked on CPU only", provider)
        return None
    return session
