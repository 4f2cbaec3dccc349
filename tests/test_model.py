"""The model's interface (shapes, output names, labels, clamps) and its configuration."""

import itertools
import json

import pytest
import torch

from vaeserve.training.config import ModelConfig, TrainConfig
from vaeserve.training.losses import training_loss
from vaeserve.training.model import build_model

pytestmark = pytest.mark.usefixtures("torch_single_thread")

KINDS = [("vae", None), ("cvae", "concat"), ("cvae", "prior")]
LIKELIHOOD_OUTPUTS = {
    "bernoulli": ["probs"],
    "gaussian": ["mean"],
    "gaussian-learned": ["mean", "log_sigma"],
}


def _config(kind="vae", conditioning=None, **overrides):
    values = {
        "kind": kind,
        "conditioning": conditioning,
        "data_shape": (1, 8, 8),
        "latent_dim": 2,
        "hidden_dims": (16,),
        "num_classes": 3 if kind == "cvae" else None,
    }
    values.update(overrides)
    return ModelConfig(**values)


@pytest.mark.parametrize(
    ("kind", "arch", "likelihood", "shape"),
    [
        (k, a, lik, shape)
        for k, a, lik in itertools.product(KINDS, ["mlp", "conv"], LIKELIHOOD_OUTPUTS)
        for shape in [(1, 8, 8)]
    ]
    + [(KINDS[1], "conv", "bernoulli", (1, 7, 5)), (KINDS[0], "conv", "gaussian", (3, 12, 9))],
)
def test_encode_decode_shapes_and_output_names(kind, arch, likelihood, shape):
    config = _config(*kind, arch=arch, likelihood=likelihood, data_shape=shape)
    model = build_model(config).eval()
    x, y = torch.rand(5, *shape), torch.tensor([0, 1, 2, 0, 1])
    mu, logvar = model.encode(x, y)
    assert mu.shape == logvar.shape == (5, 2)
    out = model.decode(mu, y)
    assert list(out) == LIKELIHOOD_OUTPUTS[likelihood] == list(config.decoder_output_names)
    for tensor in out.values():
        assert tensor.shape == (5, *shape) and tensor.dtype == torch.float32
    first = next(iter(out.values()))
    assert 0.0 <= first.min() and first.max() <= 1.0
    if likelihood == "gaussian-learned":
        assert config.log_sigma_min <= out["log_sigma"].min()
        assert out["log_sigma"].max() <= config.log_sigma_max


def test_logvar_is_clamped():
    config = _config(logvar_min=-3.0, logvar_max=2.0)
    model = build_model(config)
    with torch.no_grad():
        model.to_logvar.weight.mul_(1000.0)
        model.to_logvar.bias.fill_(0.0)
    _, logvar = model.encode(torch.rand(64, 1, 8, 8))
    assert logvar.min() == -3.0 or logvar.max() == 2.0
    assert -3.0 <= logvar.min() and logvar.max() <= 2.0


@pytest.mark.parametrize(
    ("kind", "takes_label"), list(zip(KINDS, [False, True, False], strict=True))
)
def test_label_flags_and_prior_means(kind, takes_label):
    model = build_model(_config(*kind))
    assert model.encoder_takes_label is takes_label
    assert model.decoder_takes_label is takes_label
    if kind[1] == "prior":
        assert isinstance(model.prior_means, torch.nn.Parameter)
        assert model.prior_means.shape == (3, 2)
        assert "prior_means" in model.state_dict()
    else:
        assert not hasattr(model, "prior_means")
    assert "_label_eye" not in model.state_dict()  # the one-hot table is not a weight


def test_concat_cvae_requires_labels():
    model = build_model(_config("cvae", "concat"))
    with pytest.raises(ValueError, match="y:"):
        model.encode(torch.rand(2, 1, 8, 8))
    with pytest.raises(ValueError, match="y:"):
        model.decode(torch.randn(2, 2))


def test_label_free_graphs_ignore_y():
    model = build_model(_config("cvae", "prior")).eval()
    x, z = torch.rand(2, 1, 8, 8), torch.randn(2, 2)
    torch.testing.assert_close(model.encode(x), model.encode(x, torch.tensor([0, 2])))
    torch.testing.assert_close(model.decode(z), model.decode(z, torch.tensor([1, 1])))


def test_decode_has_no_randomness():
    model = build_model(_config("cvae", "concat", likelihood="gaussian-learned")).eval()
    z, y = torch.randn(4, 2), torch.tensor([0, 1, 2, 0])
    torch.testing.assert_close(model.decode(z, y), model.decode(z, y))


@pytest.mark.parametrize("conditioning", ["concat", "prior"])
def test_cvae_generates_the_class_it_is_asked_for(conditioning):
    # Two classes that only a label can tell apart: blank and fully inked 4×4 images.
    torch.manual_seed(0)
    config = _config("cvae", conditioning, data_shape=(1, 4, 4), num_classes=2)
    model = build_model(config)
    y = torch.arange(64) % 2
    x = y.float()[:, None, None, None].expand(64, 1, 4, 4).contiguous()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(200):
        loss, _ = training_loss(model, x, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    g = torch.Generator().manual_seed(1)
    labels = torch.tensor([0] * 50 + [1] * 50)
    probs = model.eval().sample(100, labels, g)["probs"].mean(dim=(1, 2, 3))
    # Unit-variance prior draws of a prior CVAE overlap a little: judge the class averages.
    assert probs[:50].mean() < 0.2 and probs[50:].mean() > 0.8
    if conditioning == "prior":
        gap = (model.prior_means[0] - model.prior_means[1]).norm()
        assert gap > 1.0  # the classes moved apart in latent space


def test_sample_needs_labels_for_a_cvae():
    model = build_model(_config("cvae", "prior"))
    with pytest.raises(ValueError, match="y:"):
        model.sample(3)


def test_same_seed_builds_the_same_model():
    torch.manual_seed(5)
    a = build_model(_config())
    torch.manual_seed(5)
    b = build_model(_config())
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        torch.testing.assert_close(p, q, msg=name)


def test_model_config_round_trips_through_plain_values():
    config = _config("cvae", "prior", arch="conv", likelihood="gaussian-learned")
    d = config.to_dict()
    assert json.loads(json.dumps(d)) == d
    assert ModelConfig.from_dict(d) == config
    assert ModelConfig.from_dict(json.loads(json.dumps(d))) == config


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"kind": "gan"}, "kind"),
        ({"conditioning": "concat"}, "conditioning"),
        ({"num_classes": 10}, "num_classes"),
        ({"kind": "cvae", "conditioning": "both", "num_classes": 3}, "conditioning"),
        ({"kind": "cvae", "conditioning": "prior", "num_classes": None}, "num_classes"),
        ({"arch": "transformer"}, "arch"),
        ({"likelihood": "poisson"}, "likelihood"),
        ({"data_shape": [8, 8]}, "data_shape"),
        ({"data_shape": [1, 0, 8]}, "data_shape"),
        ({"latent_dim": 0}, "latent_dim"),
        ({"latent_dim": 2.5}, "latent_dim"),
        ({"hidden_dims": []}, "hidden_dims"),
        ({"hidden_dims": [16, -1]}, "hidden_dims"),
        ({"gaussian_sigma": 0.0}, "gaussian_sigma"),
        ({"gaussian_sigma": float("nan")}, "gaussian_sigma"),
        ({"logvar_min": 5.0, "logvar_max": 1.0}, "logvar_max"),
        ({"colour": "red"}, "colour"),
    ],
)
def test_model_config_from_dict_names_the_bad_field(changes, field):
    d = _config().to_dict()
    d.update(changes)
    with pytest.raises(ValueError, match=field):
        ModelConfig.from_dict(d)


def test_train_config_defaults_and_validation():
    assert TrainConfig().binarize == "static"
    assert TrainConfig(likelihood="gaussian").binarize == "none"
    assert TrainConfig(model="cvae").conditioning == "concat"
    assert TrainConfig(arch="conv").hidden_dims == (32, 64)
    config = TrainConfig(model="cvae", conditioning="prior", hidden_dims=(8, 4))
    assert TrainConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    for bad in ({"epochs": 0}, {"lr": -1.0}, {"binarize": "otsu"}, {"device": "tpu"}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            TrainConfig(**bad)


def test_prior_mean_scale_starts_the_class_means_apart():
    # Zeros (the old start) unless asked; then each class on an axis of its own, or on a
    # random unit direction when there are more classes than latent axes.
    assert torch.equal(build_model(_config("cvae", "prior")).prior_means, torch.zeros(3, 2))
    model = build_model(_config("cvae", "prior", latent_dim=4, prior_mean_scale=5.0))
    torch.testing.assert_close(model.prior_means.detach(), 5.0 * torch.eye(3, 4))
    crowded = build_model(_config("cvae", "prior", num_classes=3, prior_mean_scale=2.0))
    torch.testing.assert_close(crowded.prior_means.detach().norm(dim=1), torch.full((3,), 2.0))
    assert TrainConfig(model="cvae", conditioning="prior").prior_mean_scale > 0
    config = TrainConfig(model="cvae", conditioning="concat").model_config((1, 8, 8), 10)
    assert config.prior_mean_scale == 0.0  # only the class-mean prior has class means
    with pytest.raises(ValueError, match="prior_mean_scale"):
        _config("cvae", "prior", prior_mean_scale=-1.0)


def test_checkpoints_from_the_removed_dropout_option_still_load(tmp_path):
    import re

    from vaeserve.training.checkpoint import load_model, save_checkpoint

    # Checkpoints name the MLP's layers net.0, net.2, ... (Linear, ReLU per hidden layer).
    model = build_model(_config(hidden_dims=(16, 8))).eval()
    assert "encoder.net.2.weight" in model.state_dict()
    with pytest.raises(ValueError, match="unknown field"):
        ModelConfig.from_dict({**model.config.to_dict(), "drop_out": 0.1})
    # A run trained with --dropout P stored "dropout" in its config and, for P > 0, held
    # (Linear, ReLU, Dropout) per hidden layer: Linear layers at net.0, net.3, ...
    x = torch.rand(4, 1, 8, 8)
    for dropout in (0.0, 0.2):
        state = model.state_dict()
        if dropout:
            state = {
                re.sub(
                    r"^(encoder\.net|decoder\.net\.0)\.(\d+)\.",
                    lambda m: f"{m[1]}.{int(m[2]) // 2 * 3}.",
                    name,
                ): value
                for name, value in state.items()
            }
            assert "encoder.net.3.weight" in state
        path = tmp_path / f"dropout{dropout}.pt"
        save_checkpoint(
            path, model_config=model.config, state_dict=state, train_config={}, data_info={}
        )
        raw = torch.load(path, weights_only=True)
        raw["model_config"]["dropout"] = dropout
        torch.save(raw, path)
        loaded, _ = load_model(path)
        torch.testing.assert_close(loaded.encode(x), model.encode(x))
        torch.testing.assert_close(
            loaded.decode(x.new_zeros(4, 2)), model.decode(x.new_zeros(4, 2))
        )
    # Such a run cannot be resumed: it would go on without the dropout it was trained with.
    stored = {**TrainConfig().to_dict(), "dropout": 0.2}
    with pytest.raises(ValueError, match="dropout"):
        TrainConfig.from_dict(stored)
    assert TrainConfig.from_dict({**TrainConfig().to_dict(), "dropout": 0.0}) == TrainConfig()
    with pytest.raises(TypeError):
        TrainConfig(dropout=0.1)
