import pyro
import pyro.distributions as dist
import pytest
import torch
from linear_gaussian import LinearGaussian, exact_encoder

from pyro_amortized import AutoAmortizedIAF, AutoAmortizedNormal
from pyro_amortized.diagnostics import active_units, log_marginal_likelihood


@pytest.fixture
def float64():
    torch.set_default_dtype(torch.float64)


def test_log_marginal_likelihood_is_exact_at_the_exact_posterior(float64):
    model = LinearGaussian()
    x = model.sample(7)
    guide = AutoAmortizedNormal(model, encoder=exact_encoder(model))
    guide(x)
    estimate = log_marginal_likelihood(
        model, guide, x, num_samples=7, particle_chunk=3, batch_size=2
    )
    assert estimate.shape == (7,)
    assert torch.allclose(estimate, model.log_evidence(x), atol=1e-9)


def test_log_marginal_likelihood_tightens_with_more_samples(float64):
    model = LinearGaussian()
    x = model.sample(50)
    guide = AutoAmortizedNormal(model, encoder=exact_encoder(model, perturb=0.5))
    guide(x)
    truth = model.log_evidence(x).mean()
    one = log_marginal_likelihood(model, guide, x, num_samples=1).mean()
    many = log_marginal_likelihood(model, guide, x, num_samples=2000, particle_chunk=400).mean()
    assert one < many
    # IWAE-2000 is a lower bound in expectation and nearly tight here (a few 1e-3 nats)
    assert truth - 0.05 < many < truth + 0.05


def test_log_marginal_likelihood_rejects_global_latents():
    def model(x, idx=None):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("data", x.shape[0], subsample=idx):
            z = pyro.sample("z", dist.Normal(mu, 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x if idx is None else x[idx])

    x = torch.randn(5)
    guide = AutoAmortizedNormal(model, hidden_dims=(4,))
    with pytest.raises(ValueError, match="global latent sites"):
        log_marginal_likelihood(model, guide, x, num_samples=2)
    with pytest.raises(ValueError, match="num_samples must be an int >= 1"):
        log_marginal_likelihood(model, guide, x, num_samples=0)


def test_active_units_find_an_unused_latent(float64):
    model = LinearGaussian(latent_dim=3)
    model.A[:, 1] = 0.0  # the second latent dimension no longer reaches the data
    x = model.sample(200)
    guide = AutoAmortizedNormal(model, encoder=exact_encoder(model))
    units = active_units(guide, x)
    assert units.count == 2
    assert units.activity[1] == 0.0
    W, _, _ = model.posterior()
    expected = (x @ W.T).var(0, unbiased=False)
    assert torch.allclose(units.activity, expected)


class _WithContext(torch.nn.Module):
    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder

    def forward(self, x):
        loc, scale = self.encoder(x)
        return loc, scale, loc.new_zeros(loc.shape[:-1] + (1,))


def test_active_units_of_a_flow_guide_average_draws(float64):
    model = LinearGaussian(latent_dim=3)
    model.A[:, 1] = 0.0
    x = model.sample(200)
    encoder = exact_encoder(model)
    guide = AutoAmortizedIAF(model, encoder=_WithContext(encoder), context_dim=1, num_transforms=0)
    units = active_units(guide, x, num_samples=400)
    assert units.count == 2
    # Unbiased for the exact activity A. With averages m_i = mu_i + e_i, e_i ~ N(0, v / S),
    # the estimate's error is 2 cov(mu, e) + (var(e) - v / S) (the noise estimate's own
    # error is smaller): a standard error of sqrt((4 A v / S + 2 (v / S)^2) / N).
    _, _, var = model.posterior()
    exact = active_units(AutoAmortizedNormal(model, encoder=encoder), x).activity
    noise = var / 400
    se = ((4 * exact * noise + 2 * noise**2) / 200).sqrt()
    assert ((units.activity - exact).abs() <= 5 * se).all(), (units.activity - exact) / se


def test_active_units_bad_inputs():
    model = LinearGaussian(latent_dim=2)
    x = model.sample(10)
    flow = AutoAmortizedIAF(model, hidden_dims=(4,), num_transforms=1)
    with pytest.raises(ValueError, match="num_samples must be an int >= 2, got 1"):
        active_units(flow, x, num_samples=1)
    with pytest.raises(ValueError, match="has neither encode\\(\\) nor get_posterior\\(\\)"):
        active_units(lambda x: None, x)
