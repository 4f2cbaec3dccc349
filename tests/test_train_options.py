"""vae-train's --val-fraction, --lr-schedule and --weight-decay (issue 19's last measurements)."""

import json
import math

import numpy as np
import pytest
import torch

from vaeserve.training import cli, evaluate, train
from vaeserve.training.checkpoint import load_checkpoint
from vaeserve.training.config import TrainConfig
from vaeserve.training.data import load_dataset

pytestmark = pytest.mark.usefixtures("torch_single_thread")

TINY = {"latent_dim": 2, "hidden_dims": (16,), "eval_k": 10}


def _weights(state):
    return torch.cat([v.flatten().double() for v in state.values()])


def test_val_fraction_zero_keeps_every_training_image_and_the_same_test_split():
    held = load_dataset("digits", binarize="static")
    whole = load_dataset("digits", binarize="static", val_fraction=0.0)
    assert len(whole.val) == 0
    assert len(whole.train) == len(held.train) + len(held.val)
    np.testing.assert_array_equal(whole.test.x, held.test.x)  # the test split does not move
    # train is exactly train + val of the held-out split, no image twice
    rows = {r.tobytes() for r in np.concatenate([held.train.x, held.val.x])}
    assert {r.tobytes() for r in whole.train.x} <= rows
    assert whole.info()["val_fraction"] == 0.0
    assert whole.info()["sizes"] == {"train": 1438, "val": 0, "test": 359}
    wider = load_dataset("digits", binarize="static", val_fraction=0.2)
    assert len(wider.val) == 360 and len(wider.train) == 1078  # 20 % of all 1797, from train
    for bad in (-0.1, 0.6, True, "0.1"):
        with pytest.raises(ValueError, match="val_fraction"):
            load_dataset("digits", val_fraction=bad)
    for bad in (-0.1, 0.6, math.nan):
        with pytest.raises(ValueError, match="val_fraction"):
            TrainConfig(val_fraction=bad)


def test_val_fraction_zero_trains_on_all_images_and_keeps_the_last_epoch(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["--dataset", "digits", "--model", "vae", "--epochs", "3", "--val-fraction", "0"]
    args += ["--ema-decay", "0"]  # the weights themselves (the average: test_ema_...)
    tiny = ["--latent-dim", "2", "--hidden-dims", "16", "--eval-k", "10", "--no-progress"]
    assert cli.main(["--out", str(out), *tiny, *args, "--log-level", "WARNING"]) == 0
    capsys.readouterr()
    ckpt = load_checkpoint(out / "checkpoint.pt")
    assert ckpt.data_info["sizes"]["train"] == 1438 and ckpt.data_info["sizes"]["val"] == 0
    assert ckpt.metrics["best_epoch"] == 3 and ckpt.metrics["best_val_bound_nats"] is None
    # The weights kept are the last epoch's.
    torch.testing.assert_close(_weights(ckpt.state_dict), _weights(ckpt.resume["model"]))
    assert all(math.isnan(h["val_bound_nats"]) for h in ckpt.resume["history"])
    # vae-eval rebuilds the run's train split (the baseline's data) from data_info.
    stored = json.loads((out / "metrics.json").read_text())
    again = evaluate.evaluate_run(out, k=10)
    for key in ("test_nll_nats", "baseline_independent_bernoulli_nll_nats"):
        assert again[key] == stored[key]
    held = train.train(
        TrainConfig(epochs=3, ema_decay=0.0, **TINY), tmp_path / "held", progress=False
    )
    assert (
        held["baseline_independent_bernoulli_nll_nats"]
        != stored["baseline_independent_bernoulli_nll_nats"]
    )


def test_a_run_from_before_val_fraction_evaluates_on_its_own_train_split(tmp_path):
    out = tmp_path / "run"
    metrics = train.train(TrainConfig(epochs=1, **TINY), out, progress=False)
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    del ckpt["data_info"]["val_fraction"]  # what an older run stored
    torch.save(ckpt, out / "checkpoint.pt")
    again = evaluate.evaluate_run(out, k=10)
    key = "baseline_independent_bernoulli_nll_nats"
    assert again[key] == metrics[key]


def test_cosine_schedule_sets_each_steps_lr_from_the_step_alone():
    config = TrainConfig(lr=2e-3, lr_schedule="cosine")
    assert train._learning_rate(config, 0, 100) == pytest.approx(2e-3)
    assert train._learning_rate(config, 50, 100) == pytest.approx(1e-3)
    assert train._learning_rate(config, 100, 100) == pytest.approx(0.0, abs=1e-12)
    assert train._learning_rate(config.replace(lr_schedule="constant"), 99, 100) == 2e-3
    with pytest.raises(ValueError, match="lr_schedule"):
        TrainConfig(lr_schedule="step")


def test_cosine_run_ends_at_a_small_lr(tmp_path):
    config = TrainConfig(epochs=4, batch_size=256, lr_schedule="cosine", **TINY)
    full = train.train(config, tmp_path / "full", progress=False)
    last = load_checkpoint(tmp_path / "full" / "checkpoint.pt").resume
    steps = 4 * math.ceil(1258 / 256)
    lr = last["optimizer"]["param_groups"][0]["lr"]
    assert lr == pytest.approx(train._learning_rate(config, steps - 1, steps))
    assert lr < 0.01 * config.lr
    constant = train.train(config.replace(lr_schedule="constant"), tmp_path / "c", progress=False)
    assert constant["test_nll_nats"] != full["test_nll_nats"]
    # A function of the step alone: the same run again (or one resumed after a kill with the
    # same --epochs) sets the same lr at every step and ends with the same weights.
    train.train(config, tmp_path / "again", progress=False)
    again = load_checkpoint(tmp_path / "again" / "checkpoint.pt").resume["model"]
    torch.testing.assert_close(_weights(again), _weights(last["model"]), rtol=0, atol=0)


def test_weight_decay_uses_adamw_and_changes_the_run(tmp_path):
    from vaeserve.training.model import build_model

    model = build_model(TrainConfig(**TINY).model_config((1, 8, 8), None))
    assert type(train._optimizer(model, TrainConfig(**TINY))) is torch.optim.Adam
    decayed = train._optimizer(model, TrainConfig(weight_decay=0.1, **TINY))
    assert type(decayed) is torch.optim.AdamW
    assert decayed.param_groups[0]["weight_decay"] == 0.1
    plain = train.train(TrainConfig(epochs=2, **TINY), tmp_path / "plain", progress=False)
    heavy = TrainConfig(epochs=2, weight_decay=0.5, **TINY)
    run = train.train(heavy, tmp_path / "wd", progress=False)
    a = _weights(load_checkpoint(tmp_path / "plain" / "checkpoint.pt").resume["model"])
    b = _weights(load_checkpoint(tmp_path / "wd" / "checkpoint.pt").resume["model"])
    assert b.norm() < a.norm()  # decay shrinks the weights
    assert run["test_nll_nats"] != plain["test_nll_nats"]
    with pytest.raises(ValueError, match="weight_decay"):
        TrainConfig(weight_decay=-1.0)


def test_stored_runs_from_before_the_options_keep_their_meaning():
    stored = TrainConfig().to_dict()
    for name in ("val_fraction", "lr_schedule", "weight_decay", "ema_decay"):
        del stored[name]
    old = TrainConfig.from_dict(stored)
    assert (old.val_fraction, old.lr_schedule, old.weight_decay, old.ema_decay) == (
        0.1,
        "constant",
        0.0,
        0.0,
    )


def test_help_names_the_options(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    text = capsys.readouterr().out
    for flag in ("--val-fraction", "--lr-schedule", "--weight-decay", "--ema-decay"):
        assert flag in text


def test_ema_keeps_the_moving_average_of_the_weights(tmp_path):
    from vaeserve.training.model import build_model

    model = build_model(TrainConfig(**TINY).model_config((1, 8, 8), None))
    ema = {k: torch.zeros_like(v) for k, v in model.state_dict().items()}
    train._update_ema(ema, model, 0.9)
    for name, value in model.state_dict().items():
        torch.testing.assert_close(ema[name], 0.1 * value)
    # With no val split the kept weights are the last epoch's average, not its weights.
    config = TrainConfig(epochs=3, val_fraction=0.0, ema_decay=0.9, **TINY)
    metrics = train.train(config, tmp_path / "ema", progress=False)
    ckpt = load_checkpoint(tmp_path / "ema" / "checkpoint.pt")
    torch.testing.assert_close(_weights(ckpt.state_dict), _weights(ckpt.resume["ema"]))
    assert not torch.equal(_weights(ckpt.state_dict), _weights(ckpt.resume["model"]))
    plain = train.train(config.replace(ema_decay=0.0), tmp_path / "plain", progress=False)
    assert metrics["test_nll_nats"] != plain["test_nll_nats"]
    with pytest.raises(ValueError, match="ema_decay"):
        TrainConfig(ema_decay=1.0)


def test_ema_run_resumes_exactly(tmp_path):
    config = TrainConfig(epochs=4, lr=1.0, batch_size=64, ema_decay=0.9, **TINY)
    full = train.train(config, tmp_path / "full", progress=False)
    train.train(config.replace(epochs=3), tmp_path / "split", progress=False)
    resumed_config = train.resume_config(tmp_path / "split", epochs=4)
    resumed = train.train(resumed_config, tmp_path / "split", resume=True, progress=False)
    a = load_checkpoint(tmp_path / "full" / "checkpoint.pt")
    b = load_checkpoint(tmp_path / "split" / "checkpoint.pt")
    for key in ("ema", "model"):
        torch.testing.assert_close(_weights(a.resume[key]), _weights(b.resume[key]), rtol=0, atol=0)
    torch.testing.assert_close(_weights(a.state_dict), _weights(b.state_dict), rtol=0, atol=0)
    assert resumed["test_nll_nats"] == full["test_nll_nats"]
