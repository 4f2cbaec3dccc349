"""The VampPrior in training: its density, its Monte Carlo KL, and the numpy copy the server uses.

Export, serving and the manifest's side of the learned prior: test_prior_export.py.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import distributions as D

from vaeserve.engine.sampling import MixturePrior
from vaeserve.training import losses
from vaeserve.training.config import ModelConfig, TrainConfig
from vaeserve.training.model import build_model, log_normal_mixture


def _vamp(components: int = 7, latent: int = 3, seed: int = 0):
    torch.manual_seed(seed)
    config = ModelConfig(
        data_shape=(1, 8, 8),
        latent_dim=latent,
        hidden_dims=(16,),
        prior="vamp",
        prior_components=components,
    )
    return build_model(config).eval()


def _torch_mixture(means, logvars, log_weights) -> D.Distribution:
    components = D.Independent(D.Normal(means, torch.exp(0.5 * logvars)), 1)
    return D.MixtureSameFamily(D.Categorical(logits=log_weights), components)


def test_monte_carlo_kl_averages_to_the_closed_form_for_a_standard_normal_prior():
    torch.manual_seed(1)
    model = build_model(ModelConfig(data_shape=(1, 8, 8), latent_dim=4, hidden_dims=(8,)))
    mu = torch.tensor([[0.0, 0.0, 0.0, 0.0], [1.5, -2.0, 0.3, 0.0]])
    logvar = torch.tensor([[0.0, 0.0, 0.0, 0.0], [-1.0, 0.5, -3.0, 1.0]])
    draws = 200_000
    z = mu + torch.randn(draws, *mu.shape) * torch.exp(0.5 * logvar)  # (draws, 2, 4)
    estimates = losses.kl_monte_carlo(model, z, mu, logvar).double()  # (draws, 2)
    closed = losses.kl_normal(mu, logvar).double()
    standard_error = estimates.std(0) / math.sqrt(draws)
    # The first posterior is the prior itself: every draw's estimate is exactly 0.
    assert closed[0] == 0 and torch.all(estimates[:, 0].abs() < 1e-5)
    assert abs(estimates[:, 1].mean() - closed[1]) < 4 * standard_error[1]


def test_vamp_log_prior_is_the_mixture_of_the_pseudo_inputs_posteriors():
    model = _vamp()
    with torch.no_grad():
        mu, logvar = model.encode(torch.sigmoid(model.pseudo_logits))  # (K, D) each
        means, logvars, log_weights = model.prior_components()
        z = torch.randn(50, 2, 3) * 2.0
        got = model.log_prior(z)
    torch.testing.assert_close(means, mu)
    torch.testing.assert_close(logvars, logvar)
    torch.testing.assert_close(log_weights.exp().sum(), torch.tensor(1.0))
    expected = _torch_mixture(mu, logvar, torch.zeros(len(mu))).log_prob(z)
    assert got.shape == (50, 2)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_log_normal_mixture_is_exact_far_from_narrow_components():
    # The expanded quadratic form cancels large terms (|z|²/σ² ~ 1e6 here): float64 keeps it.
    means = torch.tensor([[30.0, -30.0], [0.0, 0.0]])
    logvars = torch.tensor([[-10.0, -10.0], [0.0, 0.0]])
    log_weights = torch.log(torch.tensor([0.5, 0.5]))
    z = torch.tensor([[30.001, -29.999], [0.5, -0.5], [40.0, 40.0]])
    expected = _torch_mixture(means.double(), logvars.double(), log_weights.double()).log_prob(
        z.double()
    )
    got = log_normal_mixture(z, means, logvars, log_weights)
    torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=1e-4)


def test_the_numpy_mixture_density_equals_training_s():
    model = _vamp(components=9, latent=5)
    with torch.no_grad():
        means, logvars, log_weights = model.prior_components()
        z = model.sample_latent(200, generator=torch.Generator().manual_seed(3))
        wide = torch.randn(100, 5) * 3.0
        expected = model.log_prior(torch.cat([z, wide]).double()).numpy()
    weights = np.exp(log_weights.double().numpy())
    mixture = MixturePrior(means.numpy(), logvars.numpy(), weights)
    got = mixture.log_prob(torch.cat([z, wide]).numpy())
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-9)


def test_vamp_elbo_and_bounds_use_the_monte_carlo_kl():
    model = _vamp()
    x = (torch.rand(6, 1, 8, 8, generator=torch.Generator().manual_seed(0)) > 0.5).float()
    eps = torch.randn(4, 6, 3, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        terms = losses.elbo_terms(model, x, eps=eps[0])
        mu, logvar = model.encode(x)
        z = mu + eps[0] * torch.exp(0.5 * logvar)
        expected_kl = losses.log_normal_diag(z, mu, logvar) - model.log_prior(z)
        log_w, log_px, kl = losses._log_weights(model, x, None, 4, 1.0, None, eps)
    torch.testing.assert_close(terms.kl, expected_kl)
    # With β = 1, log w = log p(x|z) − (log q − log p): the KL is the mean of the difference.
    torch.testing.assert_close(kl, (log_px - log_w).mean(0), rtol=1e-5, atol=1e-4)


def test_vamp_samples_follow_its_mixture():
    model = _vamp(components=4, latent=2)
    with torch.no_grad():
        means, logvars, log_weights = model.prior_components()
        z = model.sample_latent(20_000, generator=torch.Generator().manual_seed(0))
    expected = _torch_mixture(means, logvars, log_weights)
    torch.testing.assert_close(z.mean(0), expected.mean, atol=0.05, rtol=0)
    torch.testing.assert_close(z.var(0), expected.variance, atol=0.08, rtol=0.05)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"kind": "cvae", "conditioning": "concat", "num_classes": 3, "prior": "vamp"}, "prior"),
        ({"prior": "vamp"}, "prior_components"),
        ({"prior": "vamp", "prior_components": 0}, "prior_components"),
        ({"prior_components": 5}, "prior_components"),
        ({"prior": "flow"}, "prior"),
    ],
)
def test_model_config_rejects_bad_priors(fields, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**fields)


def test_train_config_passes_the_prior_on_and_refuses_it_for_a_cvae():
    config = TrainConfig(prior="vamp", prior_components=12).model_config((1, 8, 8), None)
    assert (config.prior, config.prior_components) == ("vamp", 12)
    plain = TrainConfig(prior="normal").model_config((1, 8, 8), None)
    assert (plain.prior, plain.prior_components) == ("normal", None)
    # The default: the VampPrior for a VAE, the Gaussian (conditional) prior for a CVAE.
    assert (TrainConfig().prior, TrainConfig(model="cvae").prior) == ("vamp", "normal")
    with pytest.raises(ValueError, match="prior"):
        TrainConfig(model="cvae", prior="vamp")
    # A checkpoint written before the fields existed reads as the standard normal prior.
    old = ModelConfig().to_dict()
    del old["prior"], old["prior_components"]
    assert ModelConfig.from_dict(old).prior == "normal"
    stored = TrainConfig().to_dict()
    for name in ("prior", "prior_components", "pseudo_init", "prior_mean_scale"):
        del stored[name]
    assert TrainConfig.from_dict(stored).prior == "normal"
    assert TrainConfig.from_dict(stored).prior_mean_scale == 0.0


def test_pseudo_inputs_can_start_at_training_images():
    from vaeserve.training.data import load_dataset
    from vaeserve.training.train import _pseudo_inputs_from_data

    splits = load_dataset("digits", binarize="static")
    model = _vamp(components=5)
    _pseudo_inputs_from_data(model, splits, seed=0)
    images = torch.sigmoid(model.pseudo_logits.detach()).flatten(1)
    train = torch.from_numpy(splits.train.x).flatten(1).clamp(0.1, 0.9)
    # Each pseudo-input is one training image, pulled to 0.1 / 0.9 so its logits can move.
    distances = torch.cdist(images, train).min(1).values
    assert torch.all(distances < 1e-5)
    again = _vamp(components=5)
    _pseudo_inputs_from_data(again, splits, seed=0)
    torch.testing.assert_close(again.pseudo_logits, model.pseudo_logits)  # the seed's draw
