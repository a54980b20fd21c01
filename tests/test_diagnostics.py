import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from linear_gaussian import AffineEncoder, LinearGaussian, correlated_problem, exact_encoder

from pyro_amortized import AutoAmortizedIAF, AutoAmortizedNormal, AutoAmortizedRealNVP, Trace_IWELBO
from pyro_amortized.diagnostics import (
    InferenceGaps,
    active_units,
    elbo_surgery,
    gap_table,
    inference_gaps,
    log_marginal_likelihood,
    per_datapoint_elbo,
)
from pyro_amortized.objectives import ParticleVectorizationError


@pytest.mark.parametrize("chunk_size, batch_size", [(3, 2), (7, None), (100, 5)])
def test_log_marginal_likelihood_is_exact_at_the_exact_posterior(float64, chunk_size, batch_size):
    model = LinearGaussian()
    x = model.sample(7)
    guide = AutoAmortizedNormal(model, encoder=exact_encoder(model))
    guide(x)
    estimate = log_marginal_likelihood(
        model, guide, x, num_samples=7, chunk_size=chunk_size, batch_size=batch_size
    )
    assert estimate.shape == (7,)
    assert torch.allclose(estimate, model.log_evidence(x), atol=1e-9)


def test_per_datapoint_elbo_is_log_evidence_at_the_exact_posterior_and_below_iwae(float64):
    model = LinearGaussian()
    x = model.sample(7)
    exact = AutoAmortizedNormal(model, encoder=exact_encoder(model))
    elbo = per_datapoint_elbo(model, exact, x, num_samples=5, chunk_size=2, batch_size=3)
    assert torch.allclose(elbo, model.log_evidence(x), atol=1e-9)
    pyro.clear_param_store()  # or the new guide takes the exact one's networks by name
    wrong = AutoAmortizedNormal(model, encoder=exact_encoder(model, perturb=0.5))
    wrong(x)  # set up before the seed, so that both estimates see the same draws
    pyro.set_rng_seed(0)
    elbo = per_datapoint_elbo(model, wrong, x, num_samples=50, chunk_size=20)
    pyro.set_rng_seed(0)
    iwae = log_marginal_likelihood(model, wrong, x, num_samples=50, chunk_size=20, progress=False)
    assert (elbo < iwae).all()  # the mean of the same log-weights is below their log-mean-exp


def test_log_marginal_likelihood_does_not_depend_on_the_chunking(float64):
    # 8 datapoints x 2 latent dims: every chunk draws a multiple of 16 normals, for which
    # torch's generator gives the same stream however the draws are split; so every
    # chunking sees the same particles, and only float rounding may differ.
    model = LinearGaussian()
    x = model.sample(8)
    guide = AutoAmortizedNormal(model, encoder=exact_encoder(model, perturb=0.5))
    guide(x)
    estimates = []
    chunkings = [{"chunk_size": c} for c in (1, 5, 12)]
    # sized from the budget: 1 and 2 particles, then 3 (of 16 floats each) or 1 a chunk
    chunkings += [{}, {"memory_budget": 3 * 16 * 8}, {"memory_budget": 1}]
    for chunking in chunkings:
        pyro.set_rng_seed(11)
        estimates.append(log_marginal_likelihood(model, guide, x, num_samples=12, **chunking))
    for other in estimates[1:]:
        torch.testing.assert_close(other, estimates[0], rtol=0, atol=1e-12)
    pyro.set_rng_seed(12)  # while other draws do change it
    assert not torch.allclose(
        log_marginal_likelihood(model, guide, x, num_samples=12), estimates[0]
    )


class _Recorder(torch.nn.Module):
    """A network that records the leading dimension of each 3-d input: the particles of
    one vectorized chunk (an unbatched pass, a chunk of 1 or a set-up run, is 2-d)."""

    def __init__(self, net):
        super().__init__()
        self.net = net
        self.chunks = []

    def forward(self, z):
        if z.dim() == 3:
            self.chunks.append(z.shape[0])
        return self.net(z)


def _vae(decoder, pixels=3, latent=2):
    def model(x, idx=None):
        with pyro.plate("data", x.shape[0], subsample=idx) as ind:
            z = pyro.sample("z", dist.Normal(x.new_zeros(latent), 1.0).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=decoder(z)).to_event(1), obs=x[ind])

    return model


def test_log_marginal_likelihood_sizes_its_chunks_from_the_memory_budget(float64):
    decoder = _Recorder(torch.nn.Linear(2, 3))
    model = _vae(decoder)
    x = torch.bernoulli(torch.full((8, 3), 0.4))
    guide = AutoAmortizedNormal(model, hidden_dims=(4,))
    guide(x)
    # a particle's tensors at the sites: the latent (8 x 2 floats, the guide's sample and
    # the model's value) and the decoder's logits (8 x 3); the data and the encoder's
    # output do not grow with the particles
    particle = 8 * (2 + 3) * 8
    # the first two chunks, of 1 (unbatched, so not recorded) and 2 particles, measure
    # it; the other 17 particles come budget // particle at a time
    for budget, chunks in (
        (5 * particle, [2, 5, 5, 5, 2]),
        (6 * particle - 1, [2, 5, 5, 5, 2]),
        (9 * particle, [2, 9, 8]),
        (particle - 1, [2]),  # less than a particle: one at a time, unbatched
    ):
        decoder.chunks.clear()
        log_marginal_likelihood(model, guide, x, num_samples=20, memory_budget=budget)
        assert decoder.chunks == chunks, budget
    decoder.chunks.clear()
    log_marginal_likelihood(model, guide, x, num_samples=20, chunk_size=6)
    assert decoder.chunks == [6, 6, 6, 2]  # a given chunk_size is kept

    def prior_guide(x, idx=None):  # not an amortized guide: 500 a chunk, unless budgeted
        with pyro.plate("data", x.shape[0], subsample=idx):
            pyro.sample("z", dist.Normal(x.new_zeros(2), 1.0).to_event(1))

    # (the plate named, so that no probe run looks for it)
    options = {"num_samples": 20, "local_plate": "data"}
    decoder.chunks.clear()
    log_marginal_likelihood(model, prior_guide, x, **options)
    assert decoder.chunks == [20]
    decoder.chunks.clear()
    log_marginal_likelihood(model, prior_guide, x, memory_budget=5 * particle, **options)
    assert decoder.chunks == [2, 5, 5, 5, 2]


def test_log_marginal_likelihood_runs_the_encoder_once_per_batch(float64):
    model = _vae(torch.nn.Linear(2, 3))
    x = torch.bernoulli(torch.full((7, 3), 0.4))
    guide = AutoAmortizedNormal(model, hidden_dims=(4,))
    guide(x)
    rows = []
    guide.encoder.register_forward_hook(lambda net, inputs, out: rows.append(len(inputs[0])))
    log_marginal_likelihood(model, guide, x, num_samples=12, chunk_size=2)
    assert rows == [7]  # six chunks, one encoding
    rows.clear()
    log_marginal_likelihood(model, guide, x, num_samples=12, chunk_size=2, batch_size=3)
    # one encoding of all 7 rows as the globals are looked for, then one per batch
    assert rows == [7, 3, 3, 1]
    rows.clear()
    per_datapoint_elbo(model, guide, x, num_samples=12, batch_size=4)
    assert rows == [7, 4, 3]


def test_log_marginal_likelihood_is_a_hand_written_loop_on_the_same_draws(float64):
    decoder = torch.nn.Linear(2, 3)
    model = _vae(decoder)
    x = torch.bernoulli(torch.full((8, 3), 0.4))
    guide = AutoAmortizedNormal(model, hidden_dims=(4,))
    guide(x)
    pyro.set_rng_seed(3)
    ours = log_marginal_likelihood(model, guide, x, num_samples=30, memory_budget=700)
    pyro.set_rng_seed(3)
    with torch.no_grad():  # 8 x 2 normals a particle: torch's stream splits anywhere
        loc, scale = guide.encoder(x)
        eps = torch.randn(30, 8, 2)
        z = loc + eps * scale
        log_w = (
            dist.Bernoulli(logits=decoder(z)).log_prob(x).sum(-1)
            + dist.Normal(0.0, 1.0).log_prob(z).sum(-1)
            - dist.Normal(loc, scale).log_prob(z).sum(-1)
        )
    hand = torch.logsumexp(log_w, 0) - math.log(30)
    torch.testing.assert_close(ours, hand, rtol=0, atol=1e-12)


def test_log_marginal_likelihood_matches_the_analytic_evidence(float64):
    model = LinearGaussian()
    x = model.sample(40)
    guide = AutoAmortizedNormal(model, encoder=exact_encoder(model, perturb=0.3))
    guide(x)
    pyro.set_rng_seed(0)
    S = 4000
    estimate = log_marginal_likelihood(model, guide, x, num_samples=S, chunk_size=1000)
    one = log_marginal_likelihood(model, guide, x, num_samples=1)
    # Each estimate's standard error by the delta method, sd(w) / (mean(w) sqrt(S)),
    # from a second batch of S log-weights per datapoint
    elbo = Trace_IWELBO(S)
    log_w = elbo.log_weights(model, guide, x)
    log_w = log_w.model_local - log_w.guide_local
    w = (log_w - log_w.max(0).values).exp()
    se = (w.std(0) / w.mean(0) / math.sqrt(S)).detach()
    # the datapoints' errors are independent: their mean has standard error sqrt(sum se^2) / N
    error = (estimate - model.log_evidence(x)).mean()
    se_mean = se.pow(2).sum().sqrt() / len(x)
    assert error.abs() <= 3 * se_mean, (error, se_mean)
    assert se_mean < 0.01  # the check has teeth
    assert one.mean() < estimate.mean()  # IWAE-1 is the ELBO, below


def _global_model(a=0.8, sigma=0.6):
    def model(x, idx=None):
        mu = pyro.sample("mu", dist.Normal(0.0, 2.0))
        with pyro.plate("data", x.shape[0], subsample=idx) as ind:
            z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([1]).to_event(1))
            pyro.sample("x", dist.Normal(mu + a * z, sigma).to_event(1), obs=x[ind])

    return model


def test_log_marginal_likelihood_with_globals_fixes_them_at_the_median(float64):
    a, sigma = 0.8, 0.6
    model = _global_model(a, sigma)
    x = 1.5 + torch.randn(9, 1)
    encoder = AffineEncoder(torch.ones(1, 1), torch.zeros(1), torch.ones(1))
    guide = AutoAmortizedNormal(model, encoder=encoder)
    guide(x)
    mu = guide.median(x)["mu"].detach()
    # make the encoder the exact posterior of z given x and mu = the median
    v = a**2 + sigma**2
    with torch.no_grad():
        encoder.linear.weight.fill_(a / v)
        encoder.linear.bias.fill_(-a / v * mu.item())
        encoder.log_scale.fill_(0.5 * math.log(sigma**2 / v))
    estimate = log_marginal_likelihood(model, guide, x, num_samples=5, chunk_size=2, batch_size=4)
    exact = dist.Normal(mu, math.sqrt(v)).log_prob(x[:, 0])
    torch.testing.assert_close(estimate, exact, rtol=0, atol=1e-9)


def test_log_marginal_likelihood_bad_arguments():
    model = _global_model()
    x = torch.randn(5, 1)

    def guide(x, idx=None):
        pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("data", x.shape[0], subsample=idx):
            pyro.sample("z", dist.Normal(0.0, 1.0).expand([1]).to_event(1))

    with pytest.raises(ValueError, match=r"global latent sites \(mu\).*no median\(\)"):
        log_marginal_likelihood(model, guide, x, num_samples=2, progress=False)
    with pytest.raises(ValueError, match="num_samples must be an int >= 1"):
        log_marginal_likelihood(model, guide, x, num_samples=0)
    for name in ("chunk_size", "memory_budget"):
        with pytest.raises(ValueError, match=f"{name} must be None or an int >= 1"):
            log_marginal_likelihood(model, guide, x, **{name: 0})
    with pytest.raises(ValueError, match="chunk_size=5 and memory_budget=100 both given"):
        log_marginal_likelihood(model, guide, x, chunk_size=5, memory_budget=100)
    with pytest.raises(ValueError, match="batch_size must be None or an int >= 1"):
        log_marginal_likelihood(model, guide, x, batch_size=0)


def test_active_units_find_an_unused_latent(float64):
    model = LinearGaussian(latent_dim=3)
    model.A[:, 1] = 0.0  # the second latent dimension no longer reaches the data
    x = model.sample(200)
    guide = AutoAmortizedNormal(model, encoder=exact_encoder(model))
    units = active_units(guide, x)
    assert units.count == 2
    assert units.activity[1] == 0.0
    W, c, var = model.posterior()
    expected = (x @ W.T).var(0, unbiased=False)
    assert torch.allclose(units.activity, expected)
    # KL to the prior N(0, 1), per dimension: exactly 0 for the unused one
    mean = x @ W.T + c
    kl = 0.5 * (var + mean**2 - 1 - var.log()).mean(0)
    torch.testing.assert_close(units.kl, kl)
    assert units.kl[1].abs() < 1e-12 and (units.kl[[0, 2]] > 0.1).all()


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
    with pytest.raises(
        ValueError, match="is not an amortized guide \\(one with posterior\\(\\)\\)"
    ):
        active_units(lambda x: None, x)


def _kl_diagonal(loc_q, scale_q, loc_p, var_p):
    """KL(N(loc_q, scale_q^2) || N(loc_p, var_p)) per row, diagonal Gaussians."""
    var_q = scale_q**2
    return 0.5 * (var_q / var_p + (loc_q - loc_p) ** 2 / var_p - 1 + (var_p / var_q).log()).sum(-1)


@pytest.mark.parametrize("wrong", [False, True], ids=["exact encoder", "wrong encoder"])
def test_inference_gaps_split_matches_the_analytic_kls(float64, wrong, tmp_path):
    # A^T A diagonal: the posterior is a diagonal Normal, so q*_normal is exact, the
    # approximation gap is 0 and the amortization gap is KL(q || p(z | x)).
    model = LinearGaussian()
    x = model.sample(16)
    encoder = exact_encoder(model)
    if wrong:
        # Shifted and wider than the posterior. (A proposal narrower than the posterior
        # has heavy-tailed weights: its IWAE estimate can overshoot log p(x), and log p̂,
        # the best estimate, with it.)
        with torch.no_grad():
            encoder.linear.bias.add_(torch.tensor([0.6, -0.4]))
            encoder.log_scale.add_(0.4)
    guide = AutoAmortizedNormal(model, encoder=encoder)
    guide(x)
    S = 4000
    report = inference_gaps(
        model, guide, x, families=("normal",), num_samples=S, elbo_samples=S, progress=False
    )
    W, c, var = model.posterior()
    q = guide.site_posteriors(x)["z"]
    kl = _kl_diagonal(q.base_dist.loc, q.base_dist.scale, x @ W.T + c, var).detach()
    # Standard errors of the means over datapoints: of L[q] from the spread of its
    # log-weights; L[q*] and log p̂ are exact up to what Adam's jitter leaves (second
    # order, measured < 0.01 nats), at most 0.02 below.
    terms = Trace_IWELBO(S).log_weights(model, guide, x)
    log_w = terms.model_local - terms.guide_local
    se = (log_w.var(0) / S).sum().sqrt() / len(x)
    amortization = report.amortization_gap.mean()
    assert abs(amortization - kl.mean()) <= 0.02 + 5 * se, (amortization, kl.mean(), se)
    # log p̂ is the higher of two IWAE estimates, so its noise (the amortized proposal's,
    # by the delta method sd(w) / (mean(w) sqrt(S)); q*'s is ~0) may lift it.
    w = (log_w - log_w.max(0).values).exp()
    se_iwae = ((w.std(0) / w.mean(0)) ** 2 / S).sum().sqrt() / len(x)
    approximation = report.approximation_gap.mean()
    assert abs(approximation) <= 0.02 + 5 * se_iwae, (approximation, se_iwae)
    torch.testing.assert_close(report.inference_gap, report.log_px - report.elbo)
    torch.testing.assert_close(
        report.inference_gap, report.approximation_gap + report.amortization_gap
    )
    if wrong:
        assert kl.mean() > 0.5  # the check has teeth
    else:
        assert kl.abs().max() < 1e-12
    # the report's forms
    table = report.table()
    assert "| L[q*_normal] |" in table and "| amortization gap |" in table
    assert report.plot(tmp_path / "gaps.png").stat().st_size > 1000
    saved = report.to_dict()
    assert saved["mean"]["inference gap"] == pytest.approx(report.inference_gap.mean().item())
    assert len(saved["per_datapoint"]["log_px"]) == 16


def test_active_units_kl_of_a_constrained_site_by_monte_carlo(float64):
    # q(s | x) is a LogNormal (a Normal pushed through exp) against a LogNormal prior:
    # torch has no formula for the pair, so the KL is sampled. KL is invariant under
    # the shared exp, so it equals the Normals' KL.
    def model(x):
        with pyro.plate("data", x.shape[0]):
            s = pyro.sample("s", dist.LogNormal(0.0, 1.0))
            pyro.sample("x", dist.Normal(0.0, s), obs=x)

    x = torch.randn(50)
    guide = AutoAmortizedNormal(model, hidden_dims=(4,), init_scale=0.5)
    guide(x)
    S = 4000
    units = active_units(guide, x, num_samples=S)
    base = guide.site_posteriors(x)["s"].base_dist
    exact = torch.distributions.kl_divergence(base, dist.Normal(0.0, 1.0)).mean().detach()
    # the estimate's standard error, from the spread of log q - log p under q
    u = base.sample((S,))
    ratio = (base.log_prob(u) - dist.Normal(0.0, 1.0).log_prob(u)).detach()
    se = (ratio.var(0) / S).sum().sqrt() / len(x)
    assert abs(units.kl[0] - exact) <= 5 * se, (units.kl, exact, se)


def test_active_units_kl_of_a_constrained_site_with_an_event_dim(float64):
    # The same identity for a [3]-event site (it crashed: the event-dim log-densities of
    # q met the prior's per-coordinate ones).
    def model(x):
        with pyro.plate("data", x.shape[0]):
            s = pyro.sample("s", dist.LogNormal(torch.zeros(3), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(0.0, s).to_event(1), obs=x)

    x = torch.randn(40, 3)
    guide = AutoAmortizedNormal(model, hidden_dims=(4,), init_scale=0.5)
    guide(x)
    S = 4000
    units = active_units(guide, x, num_samples=S)
    base = guide.site_posteriors(x)["s"].base_dist.base_dist  # Independent(Normal) -> Normal
    exact = torch.distributions.kl_divergence(base, dist.Normal(0.0, 1.0)).mean(0).detach()
    u = base.sample((S,))
    ratio = (base.log_prob(u) - dist.Normal(0.0, 1.0).log_prob(u)).detach()
    se = (ratio.var(0) / S).sum(0).sqrt() / len(x)
    assert units.kl.shape == (3,)
    assert (abs(units.kl - exact) <= 5 * se).all(), (units.kl, exact, se)


def test_active_units_kl_of_a_gamma_site_runs_and_a_simplex_is_nan(float64):
    def model(x):
        with pyro.plate("data", x.shape[0]):
            g = pyro.sample("g", dist.Gamma(torch.ones(2), 1.0).to_event(1))
            p = pyro.sample("p", dist.Dirichlet(torch.ones(3)))
            pyro.sample("x", dist.Normal(g.sum(-1, keepdim=True) * p, 1.0).to_event(1), obs=x)

    x = torch.randn(30, 3)
    guide = AutoAmortizedNormal(model, hidden_dims=(4,))
    guide(x)
    units = active_units(guide, x, num_samples=200)
    assert units.kl.shape == (4,)  # 2 for the Gamma, 2 unconstrained for the simplex
    assert torch.isfinite(units.kl[:2]).all() and (units.kl[:2] > 0).all()
    assert torch.isnan(units.kl[2:]).all()


def test_log_marginal_likelihood_takes_local_plate(float64):
    model = LinearGaussian()
    x = model.sample(5)
    guide = AutoAmortizedNormal(model, encoder=exact_encoder(model))
    guide(x)
    estimate = log_marginal_likelihood(model, guide, x, num_samples=3, local_plate="data")
    assert torch.allclose(estimate, model.log_evidence(x), atol=1e-9)
    with pytest.raises(ValueError, match="no plate named 'rows'"):
        log_marginal_likelihood(model, guide, x, num_samples=3, local_plate="rows")


def test_log_marginal_likelihood_loops_over_particles_for_batchnorm(float64):
    # A decoder with BatchNorm1d (ProdLDA's) takes [B, H] only: the vectorized particles'
    # [K, B, H] fails in the network, which Trace_IWELBO names; the estimate loops instead.
    decoder = torch.nn.Sequential(torch.nn.Linear(2, 4), torch.nn.BatchNorm1d(4)).double()
    decoder.eval()

    def model(x):
        pyro.module("decoder", decoder)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(decoder(z), 1.0).to_event(1), obs=x)

    x = torch.randn(6, 4)
    guide = AutoAmortizedNormal(model, hidden_dims=(4,))
    guide(x)
    with pytest.raises(ParticleVectorizationError, match="BatchNorm1d.*vectorize_particles=False"):
        Trace_IWELBO(5).loss(model, guide, x)
    pyro.set_rng_seed(0)
    estimate = log_marginal_likelihood(model, guide, x, num_samples=5, progress=False)
    pyro.set_rng_seed(0)
    looped = Trace_IWELBO(5, vectorize_particles=False).log_weights(model, guide, x)
    assert torch.allclose(estimate, looped.log_mean_weight())


def test_inference_gaps_approximation_gap_is_the_mean_field_kl(float64):
    # The approximation gap of the normal family is KL(q*_FFG || p(z | x)).
    model, x, guide, Lam, kl = correlated_problem()
    S = 4000
    report = inference_gaps(
        model, guide, x, families=("normal",), num_samples=S, elbo_samples=S, progress=False
    )
    # Under q* = N(mu, D^-1), D = diag(Lam), log w = log p(x) - u^T (Lam - D) u / 2 + c
    # with u ~ N(0, D^-1): sd(log w) = sqrt(tr((M D^-1)^2) / 2), M = Lam - D, which gives
    # the standard error of the mean ELBO estimate; Adam's jitter costs < 0.02 more.
    M = Lam - torch.diag(Lam.diag())
    sd = ((M / Lam.diag()) @ (M / Lam.diag())).trace().div(2).sqrt()
    se = sd / math.sqrt(S * len(x))
    exact_gap = (model.log_evidence(x) - report.optimal_elbo["normal"]).mean()
    assert abs(exact_gap - kl) <= 0.02 + 5 * se, (exact_gap, kl, se)
    assert kl > 0.1  # the check has teeth
    # The report's gap uses log p̂, the best IWAE estimate (here q*'s), which is below
    # log p(x) in expectation: q* is narrower than p(z | x) along the correlation, so the
    # weights are heavy-tailed and IWAE-4000 falls short, in expectation, by a few hundredths.
    assert torch.equal(
        report.log_px, torch.maximum(report.iwae["amortized"], report.iwae["normal"])
    )
    errors = model.log_evidence(x) - report.log_px
    shortfall = errors.mean()
    # below in expectation, not in every draw: within 5 standard errors of the rows' mean
    assert -5 * errors.std() / math.sqrt(len(x)) < shortfall < 0.1, (shortfall, errors.std())
    torch.testing.assert_close(report.approximation_gap.mean(), exact_gap - shortfall)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(local_options=dict(init="zero")), "init must be 'encoder' or 'prior'"),
        (dict(local_options=dict(max_steps=0)), "max_steps must be an int >= 1"),
        (dict(local_options=dict(patience=1.5)), "patience must be an int >= 1"),
        (dict(local_options=dict(lr=0.0)), "lr must be > 0"),
        (dict(local_options=dict(num_transforms=0)), "num_transforms must be an int >= 1"),
        (dict(families=("normal", "maf")), "families must be among"),
    ],
)
def test_inference_gaps_bad_arguments(kwargs, match):
    model = LinearGaussian()
    x = model.sample(3)
    guide = AutoAmortizedNormal(model, hidden_dims=(4,))
    # the optimization's options are checked before the IWAE estimates
    with pytest.raises(ValueError, match="inference_gaps: " + match):
        inference_gaps(model, guide, x, progress=False, **kwargs)


@pytest.mark.parametrize(
    "cls, own", [(AutoAmortizedIAF, "iaf"), (AutoAmortizedRealNVP, "flow")], ids=["iaf", "flow"]
)
def test_inference_gaps_split_a_flow_guides_gaps_with_its_own_family(cls, own):
    model = LinearGaussian()
    x = model.sample(4)
    guide = cls(model, hidden_dims=(8,))
    guide(x)
    report = inference_gaps(
        model,
        guide,
        x,
        families=("normal",),
        num_samples=20,
        elbo_samples=20,
        local_options={"max_steps": 3},
        progress=False,
    )
    assert report.family == own
    assert list(report.optimal_elbo) == [own, "normal"]  # the guide's own family added, first
    assert list(report.iwae) == ["amortized", own, "normal"]
    torch.testing.assert_close(report.amortization_gap, report.optimal_elbo[own] - report.elbo)
    assert f"| L[q*_{own}] |" in report.table()


def test_gap_table_puts_reports_side_by_side():
    def report(family, optimal):
        t = torch.tensor
        return InferenceGaps(
            family=family,
            log_px=t([-90.0, -92.0]),
            elbo=t([-93.0, -95.0]),
            optimal_elbo={k: t(v) for k, v in optimal.items()},
            iwae={},
            steps={},
            num_samples=1,
            elbo_samples=1,
            seconds=0.0,
        )

    table = gap_table(
        {
            "FFG": report("normal", {"normal": [-92.0, -93.0]}),
            "flow": report("flow", {"flow": [-91.0, -92.0], "normal": [-100.0, -100.0]}),
        }
    ).splitlines()
    assert table[0] == "| | FFG | flow |"
    assert "| L[q*_normal] | -92.50 | -100.00 |" in table
    assert "| L[q*_flow] |  | -91.50 |" in table  # FFG's report has no flow row
    assert "| approximation gap | 1.50 | 0.50 |" in table
    assert "| amortization gap | 1.50 | 2.50 |" in table


def test_inference_gaps_report_how_much_refinement_recovers(float64):
    # A^T A diagonal and a wrong encoder: STL refinement converges to the exact posterior,
    # where every log-weight is log p(x), so the refined bound is log p(x) exactly and
    # recovers the whole amortization gap (up to the jitter Adam leaves in L[q*]).
    model = LinearGaussian()
    x = model.sample(8)
    encoder = exact_encoder(model)
    with torch.no_grad():
        encoder.linear.bias.add_(torch.tensor([0.6, -0.4]))
    guide = AutoAmortizedNormal(model, encoder=encoder)
    guide(x)
    report = inference_gaps(
        model,
        guide,
        x,
        families=("normal",),
        num_samples=100,
        elbo_samples=100,
        refine_steps=(0, 2000),
        # Adam's fixed step settles at 1e-2; at 2e-2 one datapoint still swung 1e-4 nats
        refine_options={"estimator": "stl", "lr": 1e-2},
        progress=False,
    )
    torch.testing.assert_close(report.refined[2000], model.log_evidence(x), rtol=0, atol=1e-9)
    assert report.amortization_gap.mean() > 0.1
    assert 0.97 < report.recovered(2000) < 1.05
    assert abs(report.recovered(0)) < 0.1  # no steps: the encoder's bound, other draws
    assert "| amortization gap recovered by 2000 refinement steps |" in report.table()
    assert set(report.to_dict()["recovered"]) == {"0", "2000"}
    with pytest.raises(ValueError, match="refine_options has \\['learning_rate'\\]"):
        inference_gaps(model, guide, x, refine_steps=(5,), refine_options={"learning_rate": 0.1})


def test_inference_gaps_old_keywords_warn_and_mean_the_same():
    model = LinearGaussian()
    x = model.sample(3)
    guide = AutoAmortizedNormal(model, hidden_dims=(4,))
    guide(x)
    options = dict(families=("normal",), num_samples=4, elbo_samples=4, progress=False)
    pyro.set_rng_seed(0)
    new = inference_gaps(model, guide, x, local_options={"max_steps": 2, "lr": 1e-2}, **options)
    pyro.set_rng_seed(0)
    with pytest.warns(FutureWarning) as record:
        old = inference_gaps(model, guide, x, max_steps=2, lr=1e-2, **options)
    messages = [str(w.message) for w in record]
    assert any("max_steps= is deprecated" in m and "local_options" in m for m in messages)
    assert any("lr= is deprecated" in m for m in messages)
    assert torch.equal(new.optimal_elbo["normal"], old.optimal_elbo["normal"])
    with pytest.raises(ValueError, match="lr= and local_options\\['lr'\\] both given"):
        inference_gaps(model, guide, x, lr=1e-2, local_options={"lr": 1e-3}, **options)


# ------------------------------------------------------------------ ELBO surgery
def _surgery_problem(n=200, perturb=0.3):
    """The linear-Gaussian model, n datapoints, a guide near the exact posterior."""
    model = LinearGaussian(latent_dim=2, obs_dim=3)
    x = model.sample(n)
    guide = AutoAmortizedNormal(model, encoder=exact_encoder(model, perturb=perturb))
    guide(x)
    return model, x, guide


def _closed_forms(model, x, guide):
    """Average KL and reconstruction in closed form; marginal KL by 2-D quadrature."""
    out = guide.encoder_output(x)
    loc, var = out.loc, out.scale**2
    average_kl = (0.5 * (var + loc**2 - 1 - var.log()).sum(-1)).mean().item()
    A = model.A
    mean = loc @ A.T + model.b.detach()
    trace = (var @ (A**2).T).sum(-1)  # tr(A diag(var) A^T), per datapoint
    reconstruction = (
        dist.Normal(mean, model.sigma).log_prob(x).sum(-1) - trace / (2 * model.sigma**2)
    ).mean()
    # KL(q(z) || p(z)) of the 200-component mixture on a grid: the integrand is smooth and
    # negligible past |z| = 7 (the grid's mass is 1 to 1e-7), so the trapezoid rule is exact
    # far below the Monte Carlo error it is compared with
    t = torch.linspace(-7, 7, 701)
    h = t[1] - t[0]
    grid = torch.stack(torch.meshgrid(t, t, indexing="ij"), -1).reshape(-1, 2)
    log_q = torch.logsumexp(
        dist.Normal(loc, var.sqrt()).log_prob(grid[:, None, :]).sum(-1), 1
    ) - math.log(len(x))
    log_p = dist.Normal(0.0, 1.0).log_prob(grid).sum(-1)
    weight = log_q.exp() * h * h
    assert abs(weight.sum().item() - 1) < 1e-6
    marginal_kl = (weight * (log_q - log_p)).sum().item()
    return average_kl, reconstruction.item(), marginal_kl


@pytest.mark.parametrize("batch_size", [None, 40])
def test_elbo_surgery_is_exact_at_the_exact_posterior(float64, batch_size):
    # q = p(z | x): every draw's log-weight is log p(x_n), so the ELBO is the closed-form
    # mean log-evidence with no Monte Carlo error, and both identities hold for the estimates
    model, x, guide = _surgery_problem(n=120, perturb=0.0)
    report = elbo_surgery(model, guide, x, num_samples=4, batch_size=batch_size)
    assert report.elbo.value == pytest.approx(model.log_evidence(x).mean().item(), abs=1e-9)
    assert report.elbo.se < 1e-9
    assert report.reconstruction.value - report.average_kl.value == pytest.approx(
        report.elbo.value, abs=1e-9
    )
    assert report.mutual_information.value + report.marginal_kl.value == pytest.approx(
        report.average_kl.value, abs=1e-9
    )
    assert (report.num_data, report.num_samples) == (120, 4)
    assert report.batch_size == (120 if batch_size is None else 40)


class _PriorEncoder(torch.nn.Module):
    """A collapsed encoder: q(z | x) = p(z) = N(0, I) for every datapoint."""

    def forward(self, x):
        return x.new_zeros(x.shape[0], 2), x.new_ones(x.shape[0], 2)


class _SeparatedEncoder(torch.nn.Module):
    """Posteriors 10^3 scales apart: q(z | x_m) is 0 in float64 at another row's draws."""

    def forward(self, x):
        rows = torch.arange(x.shape[0], dtype=x.dtype)
        loc = torch.stack([rows, torch.zeros_like(rows)], -1)
        return loc, x.new_full((x.shape[0], 2), 1e-3)


@pytest.mark.parametrize("batch_size", [None, 10])
def test_elbo_surgery_collapsed_and_separated_posteriors(float64, batch_size):
    model = LinearGaussian(latent_dim=2, obs_dim=3)
    x = model.sample(30)
    collapsed = AutoAmortizedNormal(model, encoder=_PriorEncoder())
    report = elbo_surgery(model, collapsed, x, num_samples=3, batch_size=batch_size)
    for term in (report.average_kl, report.mutual_information, report.marginal_kl):
        assert abs(term.value) < 1e-12 and term.se < 1e-12
    assert report.reconstruction.value == pytest.approx(report.elbo.value, abs=1e-12)
    pyro.clear_param_store()
    separated = AutoAmortizedNormal(model, encoder=_SeparatedEncoder())
    report = elbo_surgery(model, separated, x, num_samples=3, batch_size=batch_size)
    # each draw's aggregate density is its own posterior's over N: I_q = log N exactly,
    # with the stratified minibatch weights as with the whole data set
    assert report.mutual_information.value == pytest.approx(math.log(30), abs=1e-9)
    assert report.mutual_information.se < 1e-9


@pytest.mark.slow
@pytest.mark.parametrize("batch_size", [None, 100])
def test_elbo_surgery_matches_closed_forms_within_5_se(float64, batch_size):
    model, x, guide = _surgery_problem()
    average_kl, reconstruction, marginal_kl = _closed_forms(model, x, guide)
    report = elbo_surgery(model, guide, x, num_samples=50, batch_size=batch_size)
    expected = {
        "average_kl": average_kl,
        "reconstruction": reconstruction,
        "marginal_kl": marginal_kl,
        "mutual_information": average_kl - marginal_kl,
        "elbo": reconstruction - average_kl,
    }
    for name, value in expected.items():
        estimate = getattr(report, name)
        assert estimate.se > 0
        assert abs(estimate.value - value) < 5 * estimate.se, (name, estimate, value)


def test_elbo_surgery_is_invariant_to_the_sites_support(float64):
    # z ~ LogNormal with x | z ~ N(A log z + b) is the linear-Gaussian model in log space:
    # the guide works on log z, and the KLs (densities of the sites, with the Jacobian) and
    # the ELBO's difference of log p(x) are the same on the same draws
    model, x, guide = _surgery_problem(n=40)

    def positive(x, idx=None):
        with pyro.plate("data", x.shape[0], subsample=idx) as ind:
            s = pyro.sample("z", dist.LogNormal(x.new_zeros(2), 1.0).to_event(1))
            mean = s.log() @ model.A.T + model.b
            pyro.sample("x", dist.Normal(mean, model.sigma).to_event(1), obs=x[ind])

    other = AutoAmortizedNormal(positive, encoder=guide.encoder)
    for batch_size in (None, 10):
        pyro.set_rng_seed(3)
        expected = elbo_surgery(model, guide, x, num_samples=3, batch_size=batch_size)
        pyro.set_rng_seed(3)
        report = elbo_surgery(positive, other, x, num_samples=3, batch_size=batch_size)
        for name in ("average_kl", "mutual_information", "marginal_kl", "reconstruction"):
            assert getattr(report, name).value == pytest.approx(
                getattr(expected, name).value, abs=1e-9
            ), name


@pytest.mark.parametrize("flow", ["iaf", "realnvp"])
def test_elbo_surgery_of_flow_guides_agrees_with_per_datapoint_elbo(flow):
    model = LinearGaussian(latent_dim=2, obs_dim=3)
    x = model.sample(25)
    if flow == "iaf":
        guide = AutoAmortizedIAF(model, hidden_dims=(8,), num_transforms=2)
    else:
        guide = AutoAmortizedRealNVP(model, hidden_dims=(8,), num_transforms=2, auxiliary=False)
    guide(x)
    report = elbo_surgery(model, guide, x, num_samples=20, batch_size=10)
    elbo = per_datapoint_elbo(model, guide, x, num_samples=200).mean().item()
    assert abs(report.elbo.value - elbo) < 5 * report.elbo.se
    assert report.mutual_information.value + report.marginal_kl.value == pytest.approx(
        report.average_kl.value, abs=1e-5
    )
    assert 0 < report.mutual_information.value < math.log(25)


def test_elbo_surgery_refuses_what_it_cannot_split():
    model = LinearGaussian()
    x = model.sample(6)
    guide = AutoAmortizedNormal(model)
    with pytest.raises(ValueError, match="num_samples"):
        elbo_surgery(model, guide, x, num_samples=1)
    with pytest.raises(ValueError, match="batch_size"):
        elbo_surgery(model, guide, x, batch_size=1)
    with pytest.raises(ValueError, match="not an amortized guide"):
        elbo_surgery(model, pyro.infer.autoguide.AutoNormal(model), x)
    auxiliary = AutoAmortizedRealNVP(model, hidden_dims=(4,), num_transforms=1)
    auxiliary(x)
    with pytest.raises(ValueError, match="no density"):
        elbo_surgery(model, auxiliary, x, num_samples=2)

    def global_only(x):
        pyro.sample("z", dist.Normal(0.0, 1.0))

    with pytest.raises(ValueError, match="no plate"):
        elbo_surgery(global_only, AutoAmortizedNormal(global_only), x)


def test_elbo_surgery_report_table_and_dict(float64):
    model, x, guide = _surgery_problem(n=20)
    report = elbo_surgery(model, guide, x, num_samples=2)
    table = report.table()
    assert "mutual information" in table and f"{math.log(20):.3f}" in table
    assert report.to_dict()["marginal_kl"] == report.marginal_kl._asdict()
