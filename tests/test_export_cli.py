"""vae-export as a command: versions, atomic publication, and a clear error for bad input."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from export_fixtures import save_tiny_checkpoint, tiny_config
from os_faults import read_only_folder

from vaeserve.export import onnx_export, publish
from vaeserve.export.publish import resolve_version
from vaeserve.manifest import (
    MANIFEST_FILE,
    ManifestError,
    check_graph_io,
    list_versions,
    load_version_manifest,
    sha256_of_file,
)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny concat CVAE: both graphs take a label."""
    config = tiny_config(kind="cvae", conditioning="concat")
    return save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "checkpoint.pt", config)


@pytest.fixture(scope="module")
def published(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A published version of ``checkpoint``: repository/tiny/1."""
    repository = tmp_path_factory.mktemp("published")
    assert onnx_export.main(_args(checkpoint, repository, "--quiet")) == 0
    return repository / "tiny" / "1"


def _args(checkpoint: Path, repository: Path, *extra: str, name: str = "tiny") -> list[str]:
    return [
        "--checkpoint",
        str(checkpoint),
        "--repository",
        str(repository),
        "--name",
        name,
        *extra,
    ]


def _visible(model_dir: Path) -> list[str]:
    """What the server's scanner sees in a model folder: everything not starting with '.'."""
    return sorted(p.name for p in model_dir.iterdir() if not p.name.startswith("."))


def _check_against_graphs(version_dir: Path) -> None:
    """The server's load-time check: manifest, files, and each graph's real inputs/outputs."""
    manifest = load_version_manifest(version_dir)
    for spec in (manifest.encoder, manifest.decoder):
        session = ort.InferenceSession(
            str(version_dir / spec.file), providers=["CPUExecutionProvider"]
        )
        check_graph_io(
            spec,
            [(i.name, i.type, i.shape) for i in session.get_inputs()],
            [(o.name, o.type, o.shape) for o in session.get_outputs()],
            source=str(version_dir / spec.file),
        )


def test_versions_are_numbered_refused_and_forced(
    checkpoint: Path, published: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model_dir = tmp_path / "tiny"
    shutil.copytree(published, model_dir / "1")
    assert onnx_export.main(_args(checkpoint, tmp_path, "--quiet")) == 0
    assert capsys.readouterr().out.strip() == str(model_dir / "2")  # the next free version
    assert list_versions(model_dir) == [1, 2]
    _check_against_graphs(model_dir / "2")
    before = sha256_of_file(model_dir / "1" / MANIFEST_FILE)
    inode = (model_dir / "1").stat().st_ino

    assert onnx_export.main(_args(checkpoint, tmp_path, "--version", "1")) == 2
    err = capsys.readouterr().err
    assert "tiny/1 exists already; pass --force" in err and "nothing was published" in err
    assert sha256_of_file(model_dir / "1" / MANIFEST_FILE) == before

    assert (
        onnx_export.main(_args(checkpoint, tmp_path, "--version", "1", "--force", "--quiet")) == 0
    )
    assert (model_dir / "1").stat().st_ino != inode  # a new folder, renamed into place
    assert sorted(os.listdir(model_dir)) == ["1", "2"]  # the old one is gone, nothing hidden
    _check_against_graphs(model_dir / "1")


def test_crash_while_publishing_leaves_no_version(
    checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def crash(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(onnx_export, "write_manifest", crash)
    with pytest.raises(RuntimeError, match="disk on fire"):
        onnx_export.export_checkpoint(checkpoint, tmp_path, "tiny")
    assert os.listdir(tmp_path / "tiny") == []  # not even the staging folder


def test_killed_exporter_leaves_only_a_hidden_folder(checkpoint: Path, tmp_path: Path) -> None:
    # os._exit skips every cleanup handler: as close to `kill -9` mid-write as a test gets.
    code = (
        "import os, sys\n"
        "import vaeserve.export.onnx_export as e\n"
        "e.write_manifest = lambda *a, **k: os._exit(9)\n"
        f"sys.exit(e.main({_args(checkpoint, tmp_path)!r}))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 9, done.stderr
    model_dir = tmp_path / "tiny"
    (leftover,) = os.listdir(model_dir)
    assert leftover.startswith(".staging-")
    assert sorted(os.listdir(model_dir / leftover)) == ["decoder.onnx", "encoder.onnx"]
    assert _visible(model_dir) == [] and list_versions(model_dir) == []
    assert resolve_version(model_dir, None, force=False) == 1


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
def test_force_swaps_a_version_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, exchange: bool
) -> None:
    folder = tmp_path / "tiny"
    (folder / "1").mkdir(parents=True)
    (folder / "1" / "old.onnx").write_text("old")
    if not exchange:
        monkeypatch.setattr(publish, "_exchange", lambda a, b: False)
    with publish.staging_folder(folder) as staging:
        (staging / "new.onnx").write_text("new")
        assert publish.publish_version(staging, folder, 1, force=True) == folder / "1"
    assert os.listdir(folder) == ["1"] and os.listdir(folder / "1") == ["new.onnx"]
    assert stat.S_IMODE((folder / "1").stat().st_mode) == 0o755
    assert stat.S_IMODE((folder / "1" / "new.onnx").stat().st_mode) == 0o644


def test_gate_failure_publishes_nothing(
    checkpoint: Path,
    published: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    shutil.copytree(published, tmp_path / "tiny" / "1")
    before = sha256_of_file(tmp_path / "tiny" / "1" / MANIFEST_FILE)
    real_export_graph = onnx_export.export_graph

    def export_then_tamper(module: Any, example: Any, path: Path, opset: int) -> None:
        real_export_graph(module, example, path, opset)
        if path.name == "decoder.onnx":  # a broken graph: every bias off by 0.05
            proto = onnx.load(str(path))
            for tensor in proto.graph.initializer:
                if tensor.name.endswith("bias"):
                    values = onnx.numpy_helper.to_array(tensor) + np.float32(0.05)
                    tensor.CopyFrom(onnx.numpy_helper.from_array(values, tensor.name))
            onnx.save(proto, str(path))

    monkeypatch.setattr(onnx_export, "export_graph", export_then_tamper)
    assert onnx_export.main(_args(checkpoint, tmp_path, "--version", "1", "--force")) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    assert "parity gate failed: decoder output 'probs' at batch" in err
    assert "x the bound" in err and "nothing was published" in err
    assert os.listdir(tmp_path / "tiny") == ["1"]  # the old version, untouched; no leftovers
    assert sha256_of_file(tmp_path / "tiny" / "1" / MANIFEST_FILE) == before


def _edit_manifest(version_dir: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    path = version_dir / MANIFEST_FILE
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _declare_latent_3(data: dict[str, Any]) -> None:
    data["latent_dim"] = 3
    for graph, tensors in (("encoder", "outputs"), ("decoder", "inputs")):
        for spec in data[graph][tensors].values():
            if spec["shape"] == [-1, 2]:
                spec["shape"] = [-1, 3]


def _swap_graphs(data: dict[str, Any]) -> None:
    for graph, other in (("encoder", "decoder.onnx"), ("decoder", "encoder.onnx")):
        data[graph]["file"] = other
    data["encoder"]["sha256"], data["decoder"]["sha256"] = (
        data["decoder"]["sha256"],
        data["encoder"]["sha256"],
    )


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        pytest.param(
            _declare_latent_3, r"output 'mu' is float32\[-1, 2\] in the graph", id="latent"
        ),
        pytest.param(_swap_graphs, "graph inputs are", id="swapped-files"),
    ],
)
def test_manifest_disagreeing_with_its_graphs_is_rejected(
    published: Path, tmp_path: Path, edit: Callable[[dict[str, Any]], None], expected: str
) -> None:
    version_dir = tmp_path / "tiny" / "1"
    shutil.copytree(published, version_dir)
    _check_against_graphs(version_dir)
    _edit_manifest(version_dir, edit)
    with pytest.raises(ManifestError, match=expected) as info:
        _check_against_graphs(version_dir)
    assert str(version_dir) in str(info.value)


def _write_bytes(data: bytes) -> Callable[[Path, Path], Path]:
    def make(tmp_path: Path, good: Path) -> Path:
        (tmp_path / "bad.pt").write_bytes(data)
        return tmp_path / "bad.pt"

    return make


def _truncated(tmp_path: Path, good: Path) -> Path:
    raw = good.read_bytes()
    (tmp_path / "bad.pt").write_bytes(raw[: len(raw) // 2])
    return tmp_path / "bad.pt"


def _torch_saved(payload: Any) -> Callable[[Path, Path], Path]:
    def make(tmp_path: Path, good: Path) -> Path:
        torch.save(payload, tmp_path / "bad.pt")
        return tmp_path / "bad.pt"

    return make


def _future_version(tmp_path: Path, good: Path) -> Path:
    raw = torch.load(good, weights_only=True)
    raw["format_version"] = 99
    torch.save(raw, tmp_path / "bad.pt")
    return tmp_path / "bad.pt"


def _mismatched_weights(tmp_path: Path, good: Path) -> Path:
    raw = torch.load(good, weights_only=True)
    raw["model_config"]["latent_dim"] = 3
    torch.save(raw, tmp_path / "bad.pt")
    return tmp_path / "bad.pt"


def _good(tmp_path: Path, good: Path) -> Path:
    return good


def _missing(tmp_path: Path, good: Path) -> Path:
    return tmp_path / "run" / "checkpoint.pt"


BAD_INPUTS = [
    pytest.param(_missing, [], 1, "checkpoint not found", id="missing-checkpoint"),
    pytest.param(
        _write_bytes(b"\x00garbage" * 50), [], 2, "not a readable checkpoint", id="corrupt"
    ),
    pytest.param(_truncated, [], 2, "not a readable checkpoint", id="truncated"),
    pytest.param(_torch_saved([1, 2, 3]), [], 2, "not a checkpoint", id="not-a-dict"),
    pytest.param(_future_version, [], 2, "format version 99", id="incompatible-version"),
    pytest.param(_mismatched_weights, [], 2, "weights do not match", id="weights-mismatch"),
    pytest.param(
        _good, ["--name", "../evil"], 2, "model name '../evil' is invalid", id="name-path"
    ),
    pytest.param(_good, ["--name", ".hidden"], 2, "model name '.hidden' is invalid", id="name-dot"),
    pytest.param(_good, ["--opset", "11"], 2, "opset: expected an integer from 18", id="opset"),
    pytest.param(_good, ["--version", "0"], 2, "version: expected an integer >= 1", id="version"),
]


@pytest.mark.parametrize(("make", "extra", "code", "message"), BAD_INPUTS)
def test_bad_input_is_one_clear_line(
    checkpoint: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    make: Callable[[Path, Path], Path],
    extra: list[str],
    code: int,
    message: str,
) -> None:
    repository = tmp_path / "repo"
    assert onnx_export.main(_args(make(tmp_path, checkpoint), repository) + extra) == code
    err = capsys.readouterr().err.strip()
    assert err.startswith("vae-export: error: ") and "\n" not in err, err
    assert message in err
    assert not repository.exists() or list_versions(repository / "tiny") == []


def _repository_is_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "repo").write_text("not a folder")
    return tmp_path / "repo"


def _model_folder_is_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "repo").mkdir()
    (tmp_path / "repo" / "tiny").write_text("not a folder")
    return tmp_path / "repo"


def _read_only_repository(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder of mode 0555. Root writes into it anyway (CI runs as root), so there the
    kernel's answer is injected at the OS boundary: creating, opening for writing or renaming
    anything inside it raises EACCES, as it would for any other user."""
    repository = tmp_path / "repo"
    repository.mkdir(mode=0o555)
    if os.geteuid() == 0:
        read_only_folder(monkeypatch, repository)
    return repository


@pytest.mark.parametrize(
    ("make", "message"),
    [
        pytest.param(_repository_is_a_file, "is not a folder", id="repository-is-a-file"),
        pytest.param(_model_folder_is_a_file, "exists and is not a folder", id="model-is-a-file"),
        pytest.param(_read_only_repository, "Permission denied", id="read-only"),
    ],
)
def test_unwritable_repository(
    checkpoint: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    make: Callable[[Path, pytest.MonkeyPatch], Path],
    message: str,
) -> None:
    repository = make(tmp_path, monkeypatch)
    assert onnx_export.main(_args(checkpoint, repository)) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("vae-export: error: ") and message in err and "\n" not in err


def test_usage_errors_exit_2(checkpoint: Path) -> None:
    for argv in (["--checkpoint", str(checkpoint)], _args(checkpoint, Path("r"), "--version", "x")):
        with pytest.raises(SystemExit) as info:
            onnx_export.main(argv)
        assert info.value.code == 2


def test_console_script(tmp_path: Path) -> None:
    script = Path(sys.executable).with_name("vae-export")
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    done = subprocess.run(
        [str(script), *_args(tmp_path / "bad.pt", tmp_path / "repo")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("vae-export: error: ") and "Traceback" not in done.stderr
    assert done.stdout == ""


def test_missing_data_set_falls_back_to_synthetic_inputs(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    checkpoint = save_tiny_checkpoint(tmp_path / "checkpoint.pt", tiny_config())
    raw = torch.load(checkpoint, weights_only=True)
    raw["data_info"]["spec"] = f"npz:{tmp_path / 'moved-away.npz'}"
    torch.save(raw, checkpoint)
    with caplog.at_level("WARNING", logger="export"):
        result = onnx_export.export_checkpoint(checkpoint, tmp_path / "repo", "tiny")
    assert "the parity gate uses synthetic images" in caplog.text
    assert result.manifest.parity["inputs"].startswith("x, y: synthetic uniform images")
    assert result.manifest.source["dataset"].endswith("moved-away.npz")
