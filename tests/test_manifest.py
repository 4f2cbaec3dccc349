"""The manifest reader/writer: round trips, and a clear error for each kind of corruption.

Torch-free on purpose, like vaeserve.manifest itself: the graph files here are stand-in bytes;
test_export_cli.py checks manifests against real graphs.
"""

from __future__ import annotations

import copy
import json
import os
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from vaeserve.manifest import (
    MANIFEST_FILE,
    ManifestError,
    ModelManifest,
    check_graph_io,
    is_version_name,
    list_versions,
    load_version_manifest,
    read_manifest,
    sha256_of_file,
    validate_model_name,
    verify_files,
    write_manifest,
)

_GRAPH_BYTES = {"encoder.onnx": b"stand-in encoder graph", "decoder.onnx": b"stand-in decoder"}


def _tensor(dtype: str, *dims: int) -> dict[str, Any]:
    return {"dtype": dtype, "shape": [-1, *dims]}


def _manifest_dict(
    kind: str = "cvae", conditioning: str | None = "concat", likelihood: str = "bernoulli"
) -> dict[str, Any]:
    """A valid manifest for a latent-2 model of (1, 8, 8) images with 3 classes."""
    cvae = kind == "cvae"
    label = {"y": _tensor("int64")} if conditioning == "concat" else {}
    mean = "probs" if likelihood == "bernoulli" else "mean"
    outputs = {mean: _tensor("float32", 1, 8, 8)}
    if likelihood == "gaussian-learned":
        outputs["log_sigma"] = _tensor("float32", 1, 8, 8)
    sha = {f: __import__("hashlib").sha256(b).hexdigest() for f, b in _GRAPH_BYTES.items()}
    return {
        "format_version": 1,
        "name": "tiny",
        "version": 1,
        "kind": kind,
        "conditioning": conditioning if cvae else None,
        "latent_dim": 2,
        "num_classes": 3 if cvae else None,
        "class_names": ["a", "b", "c"] if cvae else [],
        "sample_shape": [1, 8, 8],
        "sample_dtype": "float32",
        "value_range": [0.0, 1.0],
        "likelihood": likelihood,
        "gaussian_sigma": 0.1 if likelihood == "gaussian" else None,
        "prior_means": [[0.5, -1.0], [0.0, 2.0], [1.5, 0.25]] if conditioning == "prior" else None,
        "opset": 20,
        "encoder": {
            "file": "encoder.onnx",
            "sha256": sha["encoder.onnx"],
            "inputs": {"x": _tensor("float32", 1, 8, 8), **label},
            "outputs": {"mu": _tensor("float32", 2), "logvar": _tensor("float32", 2)},
        },
        "decoder": {
            "file": "decoder.onnx",
            "sha256": sha["decoder.onnx"],
            "inputs": {"z": _tensor("float32", 2), **label},
            "outputs": outputs,
        },
        "producers": {"torch": "2.13.0", "onnx": "1.23.2"},
        "training_metrics": {"test_elbo_nats": -31.5},
        "parity": {"max_abs": 1e-6, "max_rel": 1e-5},
        "created_at": "2025-01-01T00:00:00+00:00",
        "source": {"precision": "fp32"},
    }


def _write_version(root: Path, data: dict[str, Any]) -> Path:
    """Lay out root/<name>/<version>/ with the stand-in graphs and ``data`` as manifest.json."""
    version_dir = root / str(data.get("name")) / str(data.get("version"))
    version_dir.mkdir(parents=True)
    for file, content in _GRAPH_BYTES.items():
        (version_dir / file).write_bytes(content)
    (version_dir / MANIFEST_FILE).write_text(json.dumps(data), encoding="utf-8")
    return version_dir


VARIANTS = [
    pytest.param(("vae", None, "bernoulli"), id="vae-bernoulli"),
    pytest.param(("vae", None, "gaussian"), id="vae-gaussian"),
    pytest.param(("cvae", "concat", "gaussian-learned"), id="concat-gaussian-learned"),
    pytest.param(("cvae", "prior", "bernoulli"), id="prior-bernoulli"),
]


@pytest.mark.parametrize("variant", VARIANTS)
def test_round_trip(tmp_path: Path, variant: tuple[str, str | None, str]) -> None:
    data = _manifest_dict(*variant)
    manifest = ModelManifest.from_dict(data)
    assert manifest.to_dict() == data
    version_dir = _write_version(tmp_path, data)
    write_manifest(manifest, version_dir / MANIFEST_FILE)
    assert load_version_manifest(version_dir) == manifest
    assert manifest.decoder_takes_label == (variant[1] == "concat")
    assert (manifest.prior_means is not None) == (variant[1] == "prior")


def test_write_is_atomic_readable_and_strict_json(tmp_path: Path) -> None:
    manifest = ModelManifest.from_dict(_manifest_dict())
    path = tmp_path / MANIFEST_FILE
    write_manifest(manifest, path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644  # the server may run as another user
    assert sorted(p.name for p in tmp_path.iterdir()) == [MANIFEST_FILE]
    nan = ModelManifest.from_dict({**_manifest_dict(), "parity": {"max_abs": float("nan")}})
    with pytest.raises(ValueError, match="not JSON compliant"):
        write_manifest(nan, path)
    assert read_manifest(path) == manifest  # the failed write left the old file whole
    assert sorted(p.name for p in tmp_path.iterdir()) == [MANIFEST_FILE]


def _set(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    """A mutation that sets a dotted key ("encoder.inputs.x") to value (None deletes it)."""

    def mutate(data: dict[str, Any]) -> None:
        *parents, last = key.split(".")
        target = data
        for part in parents:
            target = target[part]
        if value is None:
            del target[last]
        else:
            target[last] = value

    return mutate


# (mutation, the field the error must name); every case starts from a valid concat CVAE.
CORRUPTIONS = [
    pytest.param(_set("format_version", 2), "format_version", id="format-version"),
    pytest.param(_set("name", None), "'name'", id="name-missing"),
    pytest.param(_set("name", "../escape"), "'name'", id="name-invalid"),
    pytest.param(_set("version", 0), "'version'", id="version-zero"),
    pytest.param(_set("version", "1"), "'version'", id="version-string"),
    pytest.param(_set("kind", "gan"), "'kind'", id="kind-unknown"),
    pytest.param(_set("conditioning", "film"), "'conditioning'", id="conditioning-unknown"),
    pytest.param(_set("num_classes", None), "'num_classes'", id="num-classes-missing"),
    pytest.param(_set("class_names", ["a"]), "'class_names'", id="class-names-count"),
    pytest.param(_set("latent_dim", 2.5), "'latent_dim'", id="latent-dim-float"),
    pytest.param(_set("sample_shape", [1, 0, 8]), "'sample_shape'", id="sample-shape-zero"),
    pytest.param(_set("sample_dtype", "uint8"), "'sample_dtype'", id="sample-dtype"),
    pytest.param(_set("value_range", [1.0, 0.0]), "'value_range'", id="value-range-reversed"),
    pytest.param(_set("likelihood", "poisson"), "'likelihood'", id="likelihood-unknown"),
    pytest.param(_set("likelihood", "gaussian"), "'gaussian_sigma'", id="gaussian-no-sigma"),
    pytest.param(
        _set("prior_means", [[0.0, 0.0]] * 3), "'prior_means'", id="prior-means-on-concat"
    ),
    pytest.param(_set("opset", 6), "'opset'", id="opset-too-old"),
    pytest.param(_set("encoder", None), "'encoder'", id="encoder-missing"),
    pytest.param(_set("encoder.file", "../encoder.onnx"), "encoder'.file", id="file-path"),
    pytest.param(_set("decoder.sha256", "ABC"), "decoder'.sha256", id="sha256-malformed"),
    pytest.param(_set("encoder.inputs", {}), "encoder'.inputs", id="inputs-empty"),
    pytest.param(
        _set("encoder.inputs.x.dtype", "float64"), "encoder'.inputs.x.dtype", id="dtype-unknown"
    ),
    pytest.param(
        _set("encoder.inputs.x.shape", [1, 1, 8, 8]), "encoder'.inputs.x.shape", id="static-batch"
    ),
    pytest.param(_set("decoder.inputs.y", None), "'decoder.inputs'", id="concat-label-missing"),
    pytest.param(
        _set("decoder.outputs.image", _tensor("float32", 1, 8, 8)),
        "'decoder.outputs'",
        id="extra-output",
    ),
    pytest.param(
        _set("decoder.inputs.z.shape", [-1, 3]), "'decoder.inputs.z'", id="latent-mismatch"
    ),
    pytest.param(
        _set("encoder.outputs.mu.dtype", "float16"), "'encoder.outputs.mu'", id="fp16-output"
    ),
    pytest.param(_set("training_metrics", [1, 2]), "'training_metrics'", id="metrics-not-object"),
    pytest.param(_set("source", "a checkpoint"), "'source'", id="source-not-object"),
]


@pytest.mark.parametrize(("mutate", "field"), CORRUPTIONS)
def test_reader_rejects_corruption(
    tmp_path: Path, mutate: Callable[[dict[str, Any]], None], field: str
) -> None:
    data = _manifest_dict()
    mutate(data)
    version_dir = _write_version(tmp_path, _manifest_dict())
    (version_dir / MANIFEST_FILE).write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(ManifestError) as info:
        load_version_manifest(version_dir)
    message = str(info.value)
    assert str(version_dir / MANIFEST_FILE) in message
    assert field in message, message


@pytest.mark.parametrize(
    ("variant", "mutate", "field"),
    [
        pytest.param(
            VARIANTS[0].values[0],
            _set("conditioning", "concat"),
            "'conditioning'",
            id="vae-conditioned",
        ),
        pytest.param(
            VARIANTS[0].values[0], _set("num_classes", 3), "'num_classes'", id="vae-with-classes"
        ),
        pytest.param(
            VARIANTS[3].values[0],
            _set("prior_means", None),
            "'prior_means'",
            id="prior-means-missing",
        ),
        pytest.param(
            VARIANTS[3].values[0],
            _set("prior_means", [[0.0, 1.0]] * 2),
            "'prior_means'",
            id="prior-means-rows",
        ),
        pytest.param(
            VARIANTS[3].values[0],
            _set("prior_means", [[0.0, float("nan")]] * 3),
            "'prior_means'",
            id="prior-means-nan",
        ),
        pytest.param(
            VARIANTS[3].values[0],
            _set("encoder.inputs.y", _tensor("int64")),
            "'encoder.inputs'",
            id="prior-label-input",
        ),
        pytest.param(
            VARIANTS[2].values[0],
            _set("decoder.outputs.log_sigma", None),
            "'decoder.outputs'",
            id="log-sigma-missing",
        ),
    ],
)
def test_reader_rejects_variant_corruption(
    tmp_path: Path, variant: tuple[str, str | None, str], mutate: Callable[..., None], field: str
) -> None:
    data = _manifest_dict(*variant)
    mutate(data)
    path = tmp_path / MANIFEST_FILE
    path.write_text(json.dumps(data), encoding="utf-8")  # NaN is written as the token NaN
    with pytest.raises(ManifestError, match=field):
        read_manifest(path)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("{", "not valid JSON", id="truncated"),
        pytest.param("[1, 2]", "JSON object", id="not-an-object"),
        pytest.param("\udcff", "not valid JSON", id="not-utf8"),
    ],
)
def test_reader_rejects_non_manifests(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / MANIFEST_FILE
    path.write_bytes(text.encode("utf-8", "surrogateescape"))
    with pytest.raises(ManifestError, match=expected):
        read_manifest(path)


def test_missing_manifest(tmp_path: Path) -> None:
    (tmp_path / "tiny" / "1").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no manifest"):
        load_version_manifest(tmp_path / "tiny" / "1")
    with pytest.raises(FileNotFoundError, match="no such version folder"):
        load_version_manifest(tmp_path / "tiny" / "2")


def test_missing_graph_file(tmp_path: Path) -> None:
    version_dir = _write_version(tmp_path, _manifest_dict())
    (version_dir / "decoder.onnx").unlink()
    with pytest.raises(ManifestError, match=r"decoder\.onnx: decoder graph file is missing"):
        load_version_manifest(version_dir)


def test_sha256_mismatch(tmp_path: Path) -> None:
    version_dir = _write_version(tmp_path, _manifest_dict())
    (version_dir / "encoder.onnx").write_bytes(b"a graph that someone edited")
    with pytest.raises(ManifestError, match=r"encoder\.onnx: sha256 is .*'encoder\.sha256'"):
        load_version_manifest(version_dir)


@pytest.mark.parametrize(
    ("rename", "field"),
    [
        pytest.param(lambda d: d.parent / "2", "'version'", id="version-folder"),
        pytest.param(lambda d: d.parent.parent / "other" / "1", "'name'", id="model-folder"),
    ],
)
def test_folder_must_match_manifest(
    tmp_path: Path, rename: Callable[[Path], Path], field: str
) -> None:
    version_dir = _write_version(tmp_path, _manifest_dict())
    moved = rename(version_dir)
    moved.parent.mkdir(parents=True, exist_ok=True)
    version_dir.rename(moved)
    with pytest.raises(ManifestError, match=field):
        load_version_manifest(moved)


def test_verify_files_accepts_the_real_bytes(tmp_path: Path) -> None:
    version_dir = _write_version(tmp_path, _manifest_dict())
    verify_files(read_manifest(version_dir / MANIFEST_FILE), version_dir)
    assert sha256_of_file(version_dir / "encoder.onnx") == _manifest_dict()["encoder"]["sha256"]


_ACTUAL_INPUTS = [("x", "tensor(float)", ["batch", 1, 8, 8]), ("y", "tensor(int64)", ["batch"])]
_ACTUAL_OUTPUTS = [("mu", "tensor(float)", ["batch", 2]), ("logvar", "tensor(float)", [None, 2])]


@pytest.mark.parametrize(
    ("inputs", "outputs", "expected"),
    [
        pytest.param(_ACTUAL_INPUTS, _ACTUAL_OUTPUTS, None, id="matches"),
        pytest.param(_ACTUAL_INPUTS[:1], _ACTUAL_OUTPUTS, "graph inputs are", id="input-missing"),
        pytest.param(
            [("x", "tensor(float16)", ["b", 1, 8, 8]), _ACTUAL_INPUTS[1]],
            _ACTUAL_OUTPUTS,
            "input 'x' is float16",
            id="dtype",
        ),
        pytest.param(
            _ACTUAL_INPUTS,
            [("mu", "tensor(float)", [1, 2]), _ACTUAL_OUTPUTS[1]],
            r"output 'mu' is float32\[1, 2\]",
            id="static-batch",
        ),
    ],
)
def test_check_graph_io(inputs: list[Any], outputs: list[Any], expected: str | None) -> None:
    graph = ModelManifest.from_dict(_manifest_dict()).encoder
    if expected is None:
        check_graph_io(graph, inputs, outputs, source="encoder.onnx")
        return
    with pytest.raises(ManifestError, match=expected) as info:
        check_graph_io(graph, inputs, outputs, source="encoder.onnx")
    assert str(info.value).startswith("encoder.onnx: ")


def test_list_versions_sees_only_published_folders(tmp_path: Path) -> None:
    assert list_versions(tmp_path / "absent") == []
    for name in ("1", "10", "2", ".staging-x7", ".replaced-3-abc", "01", "latest", "0"):
        (tmp_path / name).mkdir()
    (tmp_path / "3").write_text("a file, not a version")
    assert list_versions(tmp_path) == [1, 2, 10]
    assert [is_version_name(n) for n in ("1", "42", "0", "007", "-1", "1.0", "")] == [
        True,
        True,
        False,
        False,
        False,
        False,
        False,
    ]
    with pytest.raises(NotADirectoryError):
        list_versions(tmp_path / "3")


@pytest.mark.parametrize("name", ["digits", "digits-cvae_v2.1", "A", "9" * 64])
def test_valid_model_names(name: str) -> None:
    assert validate_model_name(name) == name


@pytest.mark.parametrize(
    "name", ["", ".", "..", ".hidden", "a/b", "a\\b", "-x", "é", "9" * 65, "a b"]
)
def test_invalid_model_names(name: str) -> None:
    with pytest.raises(ValueError, match="model name"):
        validate_model_name(name)


def test_manifest_module_imports_no_torch_or_onnx() -> None:
    code = (
        "import sys, vaeserve.manifest; "
        "bad = sorted({'torch', 'onnx', 'onnxruntime'} & set(sys.modules)); "
        "assert not bad, bad"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=60)


def test_from_dict_does_not_mutate_its_input() -> None:
    data = _manifest_dict("cvae", "prior", "gaussian")
    before = copy.deepcopy(data)
    ModelManifest.from_dict(data)
    assert data == before
