"""Checkpoints: round trip, weights_only loading, atomic writes, and clear errors."""

import pytest
import torch

from vaeserve.training.checkpoint import (
    CHECKPOINT_FORMAT_VERSION,
    load_checkpoint,
    load_model,
    save_checkpoint,
)
from vaeserve.training.config import ModelConfig
from vaeserve.training.model import build_model

pytestmark = pytest.mark.usefixtures("torch_single_thread")

CONFIG = ModelConfig(
    kind="cvae",
    conditioning="prior",
    data_shape=(1, 8, 8),
    latent_dim=2,
    hidden_dims=(16,),
    num_classes=3,
)
DATA_INFO = {
    "spec": "digits",
    "shape": [1, 8, 8],
    "value_range": [0.0, 1.0],
    "binarize": "static",
    "num_classes": 3,
    "class_names": ["a", "b", "c"],
    "split_seed": 0,
}


class _Unsaveable:
    def __reduce__(self):
        raise RuntimeError("cannot be saved")


def _save(path, **overrides):
    torch.manual_seed(0)
    model = build_model(CONFIG)
    values = {
        "model_config": CONFIG,
        "state_dict": model.state_dict(),
        "train_config": {"lr": 0.001, "hidden_dims": [16]},
        "data_info": DATA_INFO,
        "metrics": {"test_nll_nats": 25.5, "k": 1000},
        "epoch": 7,
        "resume": {"rng": {"cpu": torch.get_rng_state()}, "history": [{"epoch": 1}]},
    }
    values.update(overrides)
    save_checkpoint(path, **values)
    return model


def test_round_trip(tmp_path):
    path = tmp_path / "checkpoint.pt"
    model = _save(path)
    ckpt = load_checkpoint(path)
    assert ckpt.model_config == CONFIG
    assert ckpt.data_info == DATA_INFO and ckpt.metrics["test_nll_nats"] == 25.5
    assert ckpt.epoch == 7 and ckpt.format_version == CHECKPOINT_FORMAT_VERSION
    assert ckpt.train_config["hidden_dims"] == [16]
    assert ckpt.resume["history"] == [{"epoch": 1}]
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(ckpt.state_dict[name], tensor)


def test_plain_torch_load_with_weights_only_reads_it(tmp_path):
    path = tmp_path / "checkpoint.pt"
    _save(path)
    raw = torch.load(path, weights_only=True)
    assert raw["format_version"] == CHECKPOINT_FORMAT_VERSION
    assert ModelConfig.from_dict(raw["model_config"]) == CONFIG


def test_load_model_rebuilds_in_eval_mode(tmp_path):
    path = tmp_path / "checkpoint.pt"
    original = _save(path).eval()
    model, ckpt = load_model(path)
    assert not model.training and ckpt.model_config == CONFIG
    x = torch.rand(4, 1, 8, 8)
    torch.testing.assert_close(model.encode(x), original.encode(x))
    torch.testing.assert_close(model.prior_means, original.prior_means)


def test_writes_are_atomic(tmp_path):
    path = tmp_path / "checkpoint.pt"
    _save(path)
    before = path.read_bytes()
    with pytest.raises(RuntimeError, match="cannot be saved"):
        _save(path, metrics={"bad": _Unsaveable()})
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.pt"):
        load_checkpoint(tmp_path / "nothing.pt")


@pytest.mark.parametrize("content", [b"", b"garbage" * 10], ids=["empty", "garbage"])
def test_corrupt_file(tmp_path, content):
    path = tmp_path / "broken.pt"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="broken.pt: not a readable checkpoint") as info:
        load_checkpoint(path)
    # torch's own paragraph advises weights_only=False, unsafe for a file of unknown origin.
    assert "weights_only" not in str(info.value) and "\n" not in str(info.value)


def test_truncated_file(tmp_path):
    path = tmp_path / "checkpoint.pt"
    _save(path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ValueError, match="checkpoint.pt"):
        load_checkpoint(path)


def test_other_format_version(tmp_path):
    path = tmp_path / "checkpoint.pt"
    _save(path)
    raw = torch.load(path, weights_only=True)
    raw["format_version"] = 2
    torch.save(raw, path)
    with pytest.raises(ValueError, match="format version 2"):
        load_checkpoint(path)


@pytest.mark.parametrize("key", ["state_dict", "model_config", "data_info", "epoch"])
def test_missing_key(tmp_path, key):
    path = tmp_path / "checkpoint.pt"
    _save(path)
    raw = torch.load(path, weights_only=True)
    del raw[key]
    torch.save(raw, path)
    with pytest.raises(ValueError, match=f"checkpoint.pt.*{key}"):
        load_checkpoint(path)


def test_not_a_dict(tmp_path):
    path = tmp_path / "checkpoint.pt"
    torch.save([1, 2, 3], path)
    with pytest.raises(ValueError, match="not a checkpoint"):
        load_checkpoint(path)


def test_bad_model_config_names_the_field(tmp_path):
    path = tmp_path / "checkpoint.pt"
    _save(path)
    raw = torch.load(path, weights_only=True)
    raw["model_config"]["latent_dim"] = -1
    torch.save(raw, path)
    with pytest.raises(ValueError, match="latent_dim"):
        load_checkpoint(path)


def test_weights_that_do_not_fit_the_config(tmp_path):
    path = tmp_path / "checkpoint.pt"
    _save(path)
    raw = torch.load(path, weights_only=True)
    raw["model_config"]["latent_dim"] = 3
    torch.save(raw, path)
    with pytest.raises(ValueError, match="weights do not match"):
        load_model(path)
