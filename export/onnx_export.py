"""Checkpoint -> encoder.onnx + decoder.onnx + manifest.json, published as one repository version.

Run: vae-export --checkpoint runs/cvae/checkpoint.pt --repository models --name digits-cvae

Steps: load the checkpoint and rebuild its model in eval mode; export both graphs into a hidden
staging folder beside the version; check them (onnx.checker, opset, no random ops); for a
VampPrior, write its mixture (the posteriors of the pseudo-inputs) to prior.npz; run the
parity gate (export/parity.py); write and re-read the manifest, checking it against the files
and the graphs' real inputs/outputs; rename the folder into place (export/publish.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

from vaeserve.engine.sampling import MixturePrior
from vaeserve.export.describe import build_manifest, prior_means_of
from vaeserve.export.graphs import (
    DEFAULT_OPSET,
    GRAPH_FILES,
    ExportError,
    example_inputs,
    export_graph,
    graph_modules,
    validate_opset,
)
from vaeserve.export.parity import (
    BATCH_SIZES,
    TOLERANCES,
    ParityError,
    build_cases,
    check_parity,
    check_prior_parity,
    reference_data,
)
from vaeserve.export.prior import write_prior
from vaeserve.export.publish import (
    VersionExistsError,
    model_folder,
    publish_version,
    resolve_version,
    staging_folder,
)
from vaeserve.manifest import (
    MANIFEST_FILE,
    ManifestError,
    ModelManifest,
    PriorSpec,
    check_graph_io,
    read_manifest,
    validate_model_name,
    verify_files,
    write_manifest,
)

__all__ = ["ExportResult", "export_checkpoint", "main"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExportResult:
    """A published version: its folder, its manifest, and the seconds the export took."""

    version_dir: Path
    manifest: ModelManifest
    seconds: float


def export_checkpoint(
    checkpoint: str | Path,
    repository: str | Path,
    name: str,
    *,
    version: int | None = None,
    opset: int = DEFAULT_OPSET,
    fp16: bool = False,
    force: bool = False,
) -> ExportResult:
    """Export a checkpoint and publish it as ``<repository>/<name>/<version>``.

    Args:
        checkpoint: the ``checkpoint.pt`` written by vae-train (nothing else is read, except
            the test split of the data set it names, for the parity gate).
        repository: the model repository folder (created if missing).
        name: the model name (a folder name).
        version: the version to publish; None takes the next free one.
        opset: the ONNX opset of both graphs.
        fp16: compute in half precision inside the graphs (I/O stays float32).
        force: replace an existing version.

    Raises:
        ValueError: bad name, version, opset or checkpoint content.
        VersionExistsError: the version exists and ``force`` is false.
        FileNotFoundError / OSError: missing checkpoint, unwritable repository.
        ExportError / ParityError / ManifestError: the graphs failed a check; nothing is published.
    """
    from vaeserve.training.checkpoint import load_model

    start = time.perf_counter()
    validate_model_name(name)
    validate_opset(opset)
    model, ckpt = load_model(checkpoint)
    folder = model_folder(repository, name)
    version = resolve_version(folder, version, force)
    precision = "fp16" if fp16 else "fp32"
    with staging_folder(folder) as staging:
        graphs = _export_graphs(model, staging, opset, fp16)
        prior = write_prior(model, staging)
        parity = _run_gate(model, ckpt.data_info, graphs, precision, prior)
        manifest = build_manifest(
            model, ckpt, Path(checkpoint), name, version, opset, graphs, parity, precision
        )
        if prior is not None:
            manifest = dataclasses.replace(manifest, prior=prior[0])
        write_manifest(manifest, staging / MANIFEST_FILE)
        _verify_staged(staging, manifest)
        version_dir = publish_version(staging, folder, version, force)
    seconds = time.perf_counter() - start
    logger.info("published %s (%s, opset %d) in %.1f s", version_dir, precision, opset, seconds)
    return ExportResult(version_dir, manifest, seconds)


def _export_graphs(model: torch.nn.Module, staging: Path, opset: int, fp16: bool) -> dict[str, Any]:
    """Export both graphs into ``staging``; returns graph -> (path, fp32 reference module)."""
    example = example_inputs(model.config)
    exported = graph_modules(model, fp16)
    reference = graph_modules(model, fp16=False)
    graphs = {}
    for graph, module in exported.items():
        path = staging / GRAPH_FILES[graph]
        export_graph(module, example, path, opset)
        graphs[graph] = (path, reference[graph])
    files = sorted(p.name for p in staging.iterdir())
    if files != sorted(GRAPH_FILES.values()):  # e.g. an external-data side file
        raise ExportError(f"{staging}: expected only the two graphs, found {files}")
    return graphs


def _run_gate(
    model: torch.nn.Module,
    data_info: dict[str, Any],
    graphs: dict[str, Any],
    precision: str,
    prior: tuple[PriorSpec, MixturePrior] | None = None,
) -> dict[str, Any]:
    """Parity of both graphs (and of a mixture prior's file) against the fp32 model; the
    manifest's ``parity`` record."""
    config = model.config
    try:
        x, y, described = reference_data(data_info)
    except FileNotFoundError as exc:
        logger.warning("data set not found (%s); the parity gate uses synthetic images", exc)
        x, y, described = _synthetic_data(config, data_info)
    if tuple(x.shape[1:]) != tuple(config.data_shape):
        raise ValueError(
            f"data_info: the data set's images are {list(x.shape[1:])}, the model's "
            f"data_shape is {list(config.data_shape)}"
        )
    prior_means = prior_means_of(model)
    mixture = None if prior is None else prior[1]
    io = {g: (m.input_names, m.output_names) for g, (_, m) in graphs.items()}
    cases = build_cases(
        graphs["encoder"][1],
        graphs["decoder"][1],
        io,
        (x, y),
        config.latent_dim,
        prior_means,
        mixture=mixture,
    )
    tol = TOLERANCES[precision]
    results = check_parity({g: p for g, (p, _) in graphs.items()}, cases, tol)
    prior_record = {} if mixture is None else {"prior": check_prior_parity(model, mixture)}
    rows = [r for table in results.values() for outs in table.values() for r in outs.values()]
    max_abs, max_rel = max(r["max_abs"] for r in rows), max(r["max_rel"] for r in rows)
    logger.info(
        "parity gate passed on %s: max |Δ| %.2g, max rel %.2g (%s tolerance atol %g, rtol %g)",
        ", ".join(results),
        max_abs,
        max_rel,
        precision,
        tol.atol,
        tol.rtol,
    )
    return {
        "precision": precision,
        "tolerance": tol.to_dict(),
        "batch_sizes": list(BATCH_SIZES),
        "providers": list(results),
        "inputs": f"x, y: {described}; z: "
        + ("the exported mixture prior" if mixture is not None else "N(0, I)")
        + (" + mu_y" if prior_means is not None else ""),
        "max_abs": max_abs,
        "max_rel": max_rel,
        "results": results,
        **prior_record,
    }


def _synthetic_data(config: Any, data_info: dict[str, Any]) -> tuple[Any, Any, str]:
    rng = np.random.default_rng(0)
    x = rng.random((max(BATCH_SIZES), *config.data_shape), dtype=np.float32)
    if data_info.get("binarize", "none") != "none":
        x = (x >= 0.5).astype(np.float32)
    y = None if config.num_classes is None else rng.integers(0, config.num_classes, len(x))
    return x, y, "synthetic uniform images (the data set was not found)"


def _verify_staged(staging: Path, expected: ModelManifest) -> None:
    """Read the staged manifest back as the server will, and check it against the graphs."""
    manifest = read_manifest(staging / MANIFEST_FILE)
    assert manifest == expected, "the manifest does not survive a write/read round trip"
    verify_files(manifest, staging)
    for spec in (manifest.encoder, manifest.decoder):
        path = staging / spec.file
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        check_graph_io(
            spec,
            [(i.name, i.type, i.shape) for i in session.get_inputs()],
            [(o.name, o.type, o.shape) for o in session.get_outputs()],
            source=str(path),
        )


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="vae-export",
        description="Export a vae-train checkpoint to ONNX and publish it as one model version.",
        epilog="Exit codes: 0 published; 1 the export failed (parity gate, graph check, I/O, "
        "missing checkpoint); 2 bad arguments or input (name, version, opset, corrupt or "
        "incompatible checkpoint, existing version without --force).",
    )
    parser.add_argument("--checkpoint", required=True, type=Path, help="RUN_DIR/checkpoint.pt")
    parser.add_argument("--repository", required=True, type=Path, help="model repository folder")
    parser.add_argument("--name", required=True, help="model name (folder name)")
    parser.add_argument("--version", type=int, help="version number (default: next free)")
    parser.add_argument(
        "--opset", type=int, default=DEFAULT_OPSET, help="ONNX opset (default %(default)s)"
    )
    parser.add_argument("--fp16", action="store_true", help="half-precision compute, float32 I/O")
    parser.add_argument("--force", action="store_true", help="replace an existing version")
    parser.add_argument("--quiet", action="store_true", help="log warnings and errors only")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """vae-export: prints the published version folder; errors are one line on stderr."""
    args = _parse_args(argv)
    # Our own progress at INFO; other libraries (onnxscript's optimizer is chatty) at WARNING.
    logging.basicConfig(level=logging.WARNING, format="vae-export: %(message)s")
    logging.getLogger("export").setLevel(logging.WARNING if args.quiet else logging.INFO)
    # torch's exporter warns on every run that torchvision (an optional extra) is missing.
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    try:
        result = export_checkpoint(
            args.checkpoint,
            args.repository,
            args.name,
            version=args.version,
            opset=args.opset,
            fp16=args.fp16,
            force=args.force,
        )
    except (
        VersionExistsError,
        ManifestError,
        ExportError,
        ParityError,
        OSError,
        ValueError,
    ) as exc:
        usage = isinstance(exc, VersionExistsError) or (
            isinstance(exc, ValueError) and not isinstance(exc, ManifestError)
        )
        message = " ".join(str(exc).split())  # one line, whatever the exception's text
        print(f"vae-export: error: {message}; nothing was published", file=sys.stderr)
        return 2 if usage else 1
    print(result.version_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
