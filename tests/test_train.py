"""vae-train and vae-eval end to end on tiny models: outputs, determinism, resume, errors."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from vaeserve.images import make_grid, save_grid
from vaeserve.training import cli, evaluate, train
from vaeserve.training.checkpoint import load_checkpoint
from vaeserve.training.config import TrainConfig

pytestmark = pytest.mark.usefixtures("torch_single_thread")

TINY_ARGS = ["--latent-dim", "2", "--hidden-dims", "16", "--eval-k", "10", "--no-progress"]
TINY = {"latent_dim": 2, "hidden_dims": (16,), "eval_k": 10}
METRIC_KEYS = {"test_elbo_nats", "test_nll_nats", "k", "epochs", "train_seconds"}


def _png_size(path):
    with Image.open(path) as image:
        return image.size


def _train_cli(out, *args):
    return cli.main(["--out", str(out), *TINY_ARGS, "--log-level", "WARNING", *args])


@pytest.fixture(scope="module")
def vae_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("vae-run")
    threads = torch.get_num_threads()  # module scope comes before torch_single_thread
    args = ["--dataset", "digits", "--model", "vae", "--epochs", "5", "--num-threads", "1"]
    try:
        assert _train_cli(out, *args) == 0
    finally:
        torch.set_num_threads(threads)
    return out


def test_run_directory_holds_checkpoint_metrics_and_grids(vae_run):
    names = sorted(p.name for p in vae_run.iterdir())
    assert names == ["checkpoint.pt", "metrics.json", "reconstructions.png", "samples.png"]
    metrics = json.loads((vae_run / "metrics.json").read_text())
    assert METRIC_KEYS <= set(metrics) and metrics["k"] == 10 and metrics["epochs"] == 5
    assert metrics["test_nll_nats"] <= -metrics["test_elbo_nats"] + 1e-6
    raw = torch.load(vae_run / "checkpoint.pt", weights_only=True)
    assert raw["metrics"] == metrics
    info = raw["data_info"]
    assert info["shape"] == [1, 8, 8] and info["binarize"] == "static"
    assert info["class_names"] == list("0123456789") and info["split_seed"] == 0
    assert raw["train_config"]["epochs"] == 5
    # 10×10 samples of 8×8 pixels, 1 pixel of padding, upscaled 4×.
    assert _png_size(vae_run / "samples.png") == (364, 364)
    assert _png_size(vae_run / "reconstructions.png") == (724, 76)


def test_short_training_lowers_the_loss(vae_run):
    history = load_checkpoint(vae_run / "checkpoint.pt").resume["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3, 4, 5]
    assert history[-1]["loss"] < history[0]["loss"] - 1.0
    assert history[-1]["val_bound_nats"] > history[0]["val_bound_nats"] + 1.0


def test_vae_eval_recomputes_the_stored_metrics(vae_run, capsys):
    assert evaluate.main([str(vae_run), "--k", "10"]) == 0
    printed = json.loads(capsys.readouterr().out)
    stored = json.loads((vae_run / "metrics.json").read_text())
    for key in ("test_elbo_nats", "test_nll_nats", "baseline_independent_bernoulli_nll_nats"):
        assert printed[key] == pytest.approx(stored[key], abs=1e-9)
    assert printed["epochs"] == 5


def test_vae_eval_on_another_dataset(vae_run, tmp_path, capsys):
    path = tmp_path / "other.npz"
    np.savez(path, x=np.random.default_rng(0).random((40, 8, 8)).astype(np.float32))
    assert evaluate.main([str(vae_run / "checkpoint.pt"), "--data", f"npz:{path}", "--k", "5"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["data"] == f"npz:{path}" and printed["test_images"] == 8


def test_vae_eval_rejects_data_of_another_shape(vae_run, tmp_path, capsys):
    path = tmp_path / "big.npz"
    np.savez(path, x=np.zeros((40, 6, 6), np.float32))
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main([str(vae_run), "--data", f"npz:{path}"])
    assert exit_info.value.code == 2
    assert "(1, 6, 6)" in capsys.readouterr().err


def test_vae_eval_missing_run(tmp_path, capsys):
    with pytest.raises(SystemExit):
        evaluate.main([str(tmp_path / "no-run")])
    assert "checkpoint not found" in capsys.readouterr().err


# Share of a CVAE's samples the classifier assigns to the label asked for (chance: 0.1), after
# 60 epochs at the default width (~6 s of training): measured 0.91 (concat) and 0.50 (class-
# mean prior); a model that ignored its labels would score about 0.1.
LEARNED_CONDITIONAL_ACCURACY = {"concat": 0.7, "prior": 0.3}


@pytest.mark.parametrize("conditioning", ["concat", "prior"])
def test_cvae_runs_report_conditional_accuracy(tmp_path, conditioning):
    args = ["--model", "cvae", "--conditioning", conditioning, "--epochs", "60"]
    args += ["--latent-dim", "16", "--hidden-dims", "512", "256"]  # the defaults, over TINY's
    assert _train_cli(tmp_path, *args) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["conditional_accuracy"] > LEARNED_CONDITIONAL_ACCURACY[conditioning]
    assert metrics["classifier_test_accuracy"] > 0.85
    assert _png_size(tmp_path / "samples.png") == (364, 364)  # one row per class
    assert load_checkpoint(tmp_path / "checkpoint.pt").model_config.conditioning == conditioning


def _final_weights(out):
    return load_checkpoint(out / "checkpoint.pt").resume["model"]


def test_same_seed_gives_the_same_run(tmp_path):
    config = TrainConfig(epochs=2, **TINY)
    for name in ("a", "b"):
        train.train(config, tmp_path / name, progress=False)
    a, b = _final_weights(tmp_path / "a"), _final_weights(tmp_path / "b")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0)


def test_resume_continues_exactly(tmp_path):
    # A learning rate this high makes epoch 4 worse than epoch 3, so the stored best weights
    # differ from the last ones that a resumed run must continue from (the plain weights: the
    # moving average would smooth the jump; its resume is tested in test_train_options.py).
    config = TrainConfig(epochs=5, lr=1.0, batch_size=32, ema_decay=0.0, **TINY)
    full = train.train(config, tmp_path / "full", progress=False)
    train.train(config.replace(epochs=4), tmp_path / "split", progress=False)
    assert load_checkpoint(tmp_path / "split" / "checkpoint.pt").metrics["best_epoch"] < 4
    resumed_config = train.resume_config(tmp_path / "split", epochs=5)
    resumed = train.train(resumed_config, tmp_path / "split", resume=True, progress=False)
    a, b = _final_weights(tmp_path / "full"), _final_weights(tmp_path / "split")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0)
    for key in ("test_nll_nats", "best_epoch", "best_val_bound_nats"):
        assert resumed[key] == full[key]
    assert resumed["epochs"] == 5


def test_resume_keeps_the_stored_settings(tmp_path, capsys):
    assert _train_cli(tmp_path, "--epochs", "1") == 0
    with pytest.raises(ValueError, match="cannot change lr"):
        train.resume_config(tmp_path, lr=0.1)
    with pytest.raises(SystemExit):
        _train_cli(tmp_path, "--epochs", "2")
    assert "already holds checkpoint.pt" in capsys.readouterr().err
    assert cli.main(["--out", str(tmp_path), "--resume", "--epochs", "2", "--no-progress"]) == 0
    assert json.loads((tmp_path / "metrics.json").read_text())["epochs"] == 2


@pytest.mark.parametrize("where", ["file", "under-a-file"])
def test_out_that_is_not_a_folder_is_refused_before_training(tmp_path, capsys, where):
    (tmp_path / "taken").write_text("mine")
    out = tmp_path / "taken" if where == "file" else tmp_path / "taken" / "run"
    with pytest.raises(SystemExit):
        _train_cli(out, "--epochs", "1000")  # would take minutes if it trained first
    assert "--out" in capsys.readouterr().err
    assert (tmp_path / "taken").read_text() == "mine"


def test_cuda_without_cuda_is_an_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # also on CUDA machines
    with pytest.raises(SystemExit):
        _train_cli(tmp_path, "--device", "cuda")
    assert "CUDA is not available" in capsys.readouterr().err


def test_other_likelihoods_archs_and_the_iwae_objective(tmp_path):
    for name, changes in {
        "gauss": {"likelihood": "gaussian-learned", "train_k": 3},
        "conv": {"arch": "conv", "hidden_dims": (4, 8), "kl_warmup_epochs": 2, "beta": 0.5},
    }.items():
        metrics = train.train(TrainConfig(**{**TINY, "epochs": 1, **changes}), tmp_path / name)
        assert np.isfinite(metrics["test_nll_nats"])
        # The independent-pixel baseline is a Bernoulli NLL: reported for binary data only.
        bernoulli = changes.get("likelihood", "bernoulli") == "bernoulli"
        assert ("baseline_independent_bernoulli_nll_nats" in metrics) == bernoulli, name


def test_cvae_on_unlabelled_data_is_an_error(tmp_path):
    path = tmp_path / "x.npz"
    np.savez(path, x=np.zeros((40, 4, 4), np.float32))
    with pytest.raises(ValueError, match="needs labels"):
        train.train(TrainConfig(dataset=f"npz:{path}", model="cvae", **TINY), tmp_path / "run")


def test_grid_writer_imports_no_torch():
    # Serving and client code may reuse vaeserve.images; a serving install has no torch.
    code = "import sys, vaeserve.images; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_save_grid_writes_a_png_atomically(tmp_path):
    images = np.linspace(0, 1, 6 * 3 * 4 * 5).reshape(6, 3, 4, 5)
    path = save_grid(images, tmp_path / "grid.png", nrow=4, scale=2)
    with Image.open(path) as image:
        assert image.mode == "RGB" and image.size == ((4 * 6 + 1) * 2, (2 * 5 + 1) * 2)
    assert [p.name for p in tmp_path.iterdir()] == ["grid.png"]
    grey = make_grid(np.ones((2, 1, 3, 3)), nrow=2, padding=0)
    assert grey.shape == (3, 6) and grey.dtype == np.uint8 and (grey == 255).all()


@pytest.mark.parametrize(
    ("images", "nrow", "message"),
    [
        (np.zeros((2, 2, 3, 3)), 1, "C 1 or 3"),
        (np.zeros((3, 3)), 1, "N, C, H, W"),
        (np.zeros((1, 1, 2, 2)), 0, "nrow"),
    ],
)
def test_save_grid_rejects_bad_input(tmp_path, images, nrow, message):
    with pytest.raises(ValueError, match=message):
        save_grid(images, tmp_path / "grid.png", nrow=nrow)


def test_resume_if_present_starts_then_continues_and_refuses_other_settings(tmp_path, capsys):
    """What a restarting job runs: the same command starts the run, then continues it."""
    assert _train_cli(tmp_path, "--epochs", "1", "--resume-if-present") == 0
    assert _train_cli(tmp_path, "--epochs", "2", "--resume-if-present") == 0
    assert load_checkpoint(tmp_path / "checkpoint.pt").epoch == 2
    with pytest.raises(SystemExit):
        _train_cli(tmp_path, "--epochs", "3", "--latent-dim", "3", "--resume-if-present")
    assert "settings differ from the stored run: latent_dim" in capsys.readouterr().err
    assert load_checkpoint(tmp_path / "checkpoint.pt").epoch == 2
