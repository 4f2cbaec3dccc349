"""The ELBO's pieces against direct computations: KL, reparameterization, likelihoods, IWAE."""

import math

import numpy as np
import pytest
import torch
from torch.distributions import Bernoulli, Normal

from vaeserve.training.config import ModelConfig
from vaeserve.training.evaluate import independent_bernoulli_nll
from vaeserve.training.losses import (
    bernoulli_log_prob,
    elbo_terms,
    evaluate_bounds,
    gaussian_log_prob,
    iwae_bound,
    kl_normal,
    log_likelihood,
    log_normal_diag,
    training_loss,
)
from vaeserve.training.model import build_model, reparameterize

pytestmark = pytest.mark.usefixtures("torch_single_thread")

TINY = {"data_shape": (1, 4, 4), "latent_dim": 2, "hidden_dims": (16,)}


@pytest.mark.parametrize("with_prior_mean", [False, True], ids=["standard-normal", "learned-mean"])
def test_closed_form_kl_matches_monte_carlo(with_prior_mean):
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(3, 4, generator=g, dtype=torch.float64)
    logvar = torch.randn(3, 4, generator=g, dtype=torch.float64)
    prior_mu = torch.randn(3, 4, generator=g, dtype=torch.float64) if with_prior_mean else None
    z = reparameterize(mu.expand(200_000, -1, -1), logvar.expand(200_000, -1, -1), g)
    p_mu = torch.zeros_like(mu) if prior_mu is None else prior_mu
    mc = (log_normal_diag(z, mu, logvar) - log_normal_diag(z, p_mu, torch.zeros_like(mu))).mean(0)
    torch.testing.assert_close(kl_normal(mu, logvar, prior_mu), mc, atol=0.03, rtol=0.01)


def test_kl_is_zero_at_the_prior():
    mu, logvar = torch.full((2, 3), 0.5), torch.zeros(2, 3)
    torch.testing.assert_close(kl_normal(mu, logvar, mu), torch.zeros(2))


def test_reparameterized_samples_have_the_posterior_mean_and_variance():
    mu = torch.tensor([1.0, -2.0, 0.0], dtype=torch.float64)
    logvar = torch.log(torch.tensor([0.25, 4.0, 1.0], dtype=torch.float64))
    g = torch.Generator().manual_seed(1)
    z = reparameterize(mu.expand(400_000, -1), logvar.expand(400_000, -1), g)
    # Uniform noise (the seed's rand_like) would put the mean at μ + σ/2 and the variance
    # at σ²/12; both checks fail for it.
    torch.testing.assert_close(z.mean(0), mu, atol=0.01, rtol=0)
    torch.testing.assert_close(z.var(0), logvar.exp(), atol=0, rtol=0.01)


def test_reparameterized_samples_carry_gradients():
    mu = torch.zeros(4, 2, requires_grad=True)
    logvar = torch.zeros(4, 2, requires_grad=True)
    g = torch.Generator().manual_seed(2)
    z = reparameterize(mu, logvar, g)
    z.sum().backward()
    eps = torch.randn(4, 2, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(mu.grad, torch.ones(4, 2))
    torch.testing.assert_close(logvar.grad, 0.5 * eps)  # dz/dlogvar = ½σε with σ = 1


def test_reparameterize_uses_the_global_generator_by_default():
    torch.manual_seed(3)
    a = reparameterize(torch.zeros(5), torch.zeros(5))
    torch.manual_seed(3)
    torch.testing.assert_close(a, torch.randn(5))


def test_bernoulli_nll_matches_direct_computation():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(5, 1, 4, 4, generator=g, dtype=torch.float64) * 3
    x = torch.bernoulli(torch.full((5, 1, 4, 4), 0.4, dtype=torch.float64), generator=g)
    p = torch.sigmoid(logits)
    direct = (x * torch.log(p) + (1 - x) * torch.log(1 - p)).flatten(1).sum(1)
    torch.testing.assert_close(bernoulli_log_prob(x, logits), direct)
    torch.testing.assert_close(
        bernoulli_log_prob(x, logits), Bernoulli(logits=logits).log_prob(x).flatten(1).sum(1)
    )


def test_bernoulli_nll_is_stable_for_saturated_logits():
    logits = torch.tensor([[200.0, -200.0, 200.0, -200.0]])
    x = torch.tensor([[1.0, 0.0, 0.0, 1.0]])
    got = bernoulli_log_prob(x, logits)
    torch.testing.assert_close(got, torch.tensor([-400.0]))


@pytest.mark.parametrize("likelihood", ["gaussian", "gaussian-learned"])
def test_gaussian_nll_matches_direct_computation(likelihood):
    model = build_model(ModelConfig(likelihood=likelihood, gaussian_sigma=0.3, **TINY))
    g = torch.Generator().manual_seed(5)
    x = torch.rand(3, 1, 4, 4, generator=g)
    mean = torch.rand(3, 1, 4, 4, generator=g)
    params = {"mean": mean}
    sigma = torch.full_like(mean, 0.3)
    if likelihood == "gaussian-learned":
        params["log_sigma"] = torch.randn(3, 1, 4, 4, generator=g) * 0.5
        sigma = params["log_sigma"].exp()
    direct = Normal(mean, sigma).log_prob(x).flatten(1).sum(1)
    torch.testing.assert_close(log_likelihood(model, x, params), direct)
    # The seed's eq. 13 written out: ½‖(x−μ)/σ‖² + D/2·log 2π + Σ log σ.
    d = x[0].numel()
    by_hand = -(
        0.5 * ((x - mean) / sigma).pow(2).flatten(1).sum(1)
        + d / 2 * math.log(2 * math.pi)
        + sigma.log().flatten(1).sum(1)
    )
    torch.testing.assert_close(gaussian_log_prob(x, mean, sigma.log()), by_hand)


def _mismatched_model(seed):
    # A narrow posterior and a z-sensitive decoder: q(z|x) far from p(z|x), so the bounds
    # differ by much more than their Monte-Carlo noise.
    torch.manual_seed(seed)
    model = build_model(ModelConfig(**TINY)).eval()
    with torch.no_grad():
        model.to_logvar.bias.fill_(-3.0)
        for p in model.decoder.parameters():
            p.mul_(4.0)
    return model


def test_iwae_bound_is_at_least_the_elbo_and_grows_with_k():
    model = _mismatched_model(6)
    x = torch.bernoulli(torch.full((64, 1, 4, 4), 0.3))
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        elbo, _, _ = evaluate_bounds(model, x, k=2000, generator=g)
        bounds = [iwae_bound(model, x, k=k, generator=g).mean().item() for k in (1, 10, 100, 1000)]
    assert elbo.mean().item() <= bounds[1]
    assert bounds == sorted(bounds)
    assert min(np.diff(bounds)) > 0.05


def test_iwae_with_one_sample_estimates_the_elbo():
    torch.manual_seed(8)
    model = build_model(ModelConfig(**TINY)).eval()
    x = torch.bernoulli(torch.full((8, 1, 4, 4), 0.5))
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        elbo, _, _ = evaluate_bounds(model, x, k=4000, generator=g)
        copies = x.repeat(4000, 1, 1, 1)  # 4000 independent one-sample bounds per image
        iwae1 = iwae_bound(model, copies, k=1, generator=g).view(4000, 8).mean(0)
    torch.testing.assert_close(iwae1, elbo, atol=0.1, rtol=0)


def test_prior_cvae_kl_is_against_the_class_mean():
    config = ModelConfig(kind="cvae", conditioning="prior", num_classes=3, **TINY)
    model = build_model(config)
    with torch.no_grad():
        model.prior_means.copy_(torch.tensor([[0.0, 0.0], [5.0, 5.0], [-5.0, 1.0]]))
    x, y = torch.rand(4, 1, 4, 4), torch.tensor([0, 1, 2, 1])
    terms = elbo_terms(model, x, y)
    mu, logvar = model.encode(x)
    torch.testing.assert_close(terms.kl, kl_normal(mu, logvar, model.prior_means[y]))


def test_cvae_bound_without_labels_is_an_error():
    model = build_model(ModelConfig(kind="cvae", conditioning="prior", num_classes=2, **TINY))
    with pytest.raises(ValueError, match="y:"):
        elbo_terms(model, torch.rand(2, 1, 4, 4))


def test_training_loss_with_beta_and_iwae():
    """The loss is −mean(log p(x|z) − β·KL) for k = 1 and −mean(IWAE bound) for k > 1, at the
    same draws (the global generator reseeded before each)."""
    torch.manual_seed(10)
    model = build_model(ModelConfig(**TINY))
    x = torch.bernoulli(torch.full((6, 1, 4, 4), 0.5))

    def seeded(function, *args, **kwargs):
        torch.manual_seed(11)
        return function(model, x, *args, **kwargs)

    terms = seeded(elbo_terms)
    for beta in (0.5, 1.0, 2.0):
        loss, elbo = seeded(training_loss, beta=beta)
        torch.testing.assert_close(loss, -(terms.log_likelihood - beta * terms.kl).mean())
        torch.testing.assert_close(elbo, terms.elbo.detach())  # the report ignores β
        assert loss.requires_grad and not elbo.requires_grad and elbo.shape == (6,)
    assert terms.kl.mean() > 0.01  # so that a β that was ignored would show
    for beta in (0.5, 1.0):
        expected = seeded(iwae_bound, None, 5, beta)
        loss_k, bound = seeded(training_loss, k=5, beta=beta)
        torch.testing.assert_close(loss_k, -expected.mean())
        torch.testing.assert_close(bound, expected.detach())
    loss_k.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_independent_bernoulli_baseline_matches_direct_computation():
    train = np.array([[[[1.0, 0.0]]], [[[1.0, 1.0]]]], dtype=np.float32)  # (2, 1, 1, 2)
    test = np.array([[[[1.0, 0.0]]]], dtype=np.float32)
    p = np.array([(2 + 1) / 4, (1 + 1) / 4])  # Laplace-smoothed pixel means
    expected = -(np.log(p[0]) + np.log(1 - p[1]))
    assert independent_bernoulli_nll(train, test) == pytest.approx(expected)
