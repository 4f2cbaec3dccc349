"""Bad inputs of vae-train, vae-eval and vae-export that other modules leave out.

Already covered elsewhere: the data loaders' checks (test_data.py), corrupt, truncated and
mismatched checkpoints read by load_checkpoint (test_checkpoint.py) and by vae-export
(test_export_cli.py), a repository that is a file or read-only for vae-export
(test_export_cli.py), vae-eval on data of another shape (test_train.py). Here: the same bad
data files through the vae-train command, a damaged checkpoint under --resume and vae-eval,
an output path that is a file, and a checkpoint whose weights are not finite.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from export_fixtures import save_tiny_checkpoint, tiny_config

from vaeserve.export import onnx_export
from vaeserve.manifest import list_versions
from vaeserve.training import cli, evaluate

pytestmark = pytest.mark.usefixtures("torch_single_thread")

TINY = ["--latent-dim", "2", "--hidden-dims", "16", "--eval-k", "2", "--epochs", "1"]
TINY += ["--no-progress", "--log-level", "WARNING"]


def _exit_message(capsys, run) -> tuple[int, str]:
    """(exit code, stderr) of a command that ends in SystemExit or returns."""
    try:
        code = run()
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err


def _one_line(err: str, prefix: str) -> str:
    err = err.strip()
    assert err.startswith(prefix) and "\n" not in err and "Traceback" not in err, err
    return err


def _npz(path: Path, **arrays: np.ndarray) -> str:
    np.savez(path, **arrays)
    return f"npz:{path}"


def _with(value: float) -> np.ndarray:
    x = np.full((40, 8, 8), 0.5, np.float32)
    x[7, 3, 3] = value
    return x


BAD_DATA = [
    pytest.param({"x": _with(np.nan)}, "NaN or Inf", id="nan"),
    pytest.param({"x": _with(-np.inf)}, "NaN or Inf", id="inf"),
    pytest.param({"x": np.zeros((40, 10), np.float32)}, "expected shape", id="shape"),
    pytest.param({"x": _with(3.0)}, "values must lie in [0, 1]", id="range"),
    pytest.param(
        {"x": _with(0.5), "y": np.arange(40) % 12, "class_names": np.arange(10).astype(str)},
        "outside the class range",
        id="labels",
    ),
]


@pytest.mark.parametrize(("arrays", "message"), BAD_DATA)
def test_vae_train_on_a_bad_data_file_is_one_clear_line(tmp_path, capsys, arrays, message):
    data = _npz(tmp_path / "bad.npz", **arrays)
    out = tmp_path / "run"
    args = ["--dataset", data, "--model", "cvae" if "y" in arrays else "vae", "--out", str(out)]
    code, err = _exit_message(capsys, lambda: cli.main([*args, *TINY]))
    assert code == 2
    assert message in _one_line(err, "vae-train: error: ") and "bad.npz" in err
    assert not out.exists() or not any(out.iterdir())


def _damaged(path: Path, how: str) -> None:
    save_tiny_checkpoint(path, tiny_config())
    raw = path.read_bytes()
    path.write_bytes({"garbage": b"garbage" * 20, "truncated": raw[:3000], "empty": b""}[how])


CHECKPOINT_DAMAGE = ["garbage", "truncated", "empty"]


@pytest.mark.parametrize("how", CHECKPOINT_DAMAGE)
@pytest.mark.parametrize("command", ["vae-train --resume", "vae-eval"])
def test_a_damaged_checkpoint_is_one_clear_line(tmp_path, capsys, how, command):
    run = tmp_path / "run"
    run.mkdir()
    _damaged(run / "checkpoint.pt", how)
    if command == "vae-eval":
        code, err = _exit_message(capsys, lambda: evaluate.main([str(run)]))
        prefix = "vae-eval: error: "
    else:
        argv = ["--out", str(run), "--resume", "--epochs", "2", "--no-progress"]
        code, err = _exit_message(capsys, lambda: cli.main(argv))
        prefix = "vae-train: error: "
    assert code == 2
    assert "checkpoint.pt: not a readable checkpoint" in _one_line(err, prefix)
    assert "weights_only" not in err


@pytest.mark.parametrize("where", ["file", "under-a-file"])
def test_vae_train_refuses_an_output_path_that_is_not_a_folder(tmp_path, capsys, where):
    (tmp_path / "taken").write_text("mine")
    out = tmp_path / "taken" if where == "file" else tmp_path / "taken" / "run"
    argv = ["--dataset", "digits", "--out", str(out), *TINY]
    code, err = _exit_message(capsys, lambda: cli.main(argv))
    assert code == 2 and "--out" in _one_line(err, "vae-train: error: ")
    assert (tmp_path / "taken").read_text() == "mine"


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_vae_export_refuses_weights_that_are_not_finite(tmp_path, capsys, value):
    checkpoint = save_tiny_checkpoint(tmp_path / "checkpoint.pt", tiny_config())
    raw = torch.load(checkpoint, weights_only=True)
    first = next(name for name in raw["state_dict"] if name.endswith("weight"))
    raw["state_dict"][first][0, 0] = value
    torch.save(raw, checkpoint)
    repository = tmp_path / "repo"
    argv = ["--checkpoint", str(checkpoint), "--repository", str(repository), "--name", "tiny"]
    code = onnx_export.main(argv)
    err = capsys.readouterr().err
    assert code != 0 and first in _one_line(err, "vae-export: error: ")
    assert list_versions(repository / "tiny") == []
