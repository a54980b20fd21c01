import inspect

import pyro
import pytest
import torch
from linear_gaussian import LinearGaussian, exact_encoder

from pyro_amortized import AutoAmortizedIAF, AutoAmortizedNormal, Trace_IWELBO
from pyro_amortized.refinement import REFINE_DEFAULTS, refine


@pytest.fixture
def float64():
    torch.set_default_dtype(torch.float64)


def _wrong_encoder_problem(n=10):
    """Linear-Gaussian data, a guide whose encoder is shifted and too wide, and the exact
    posterior's means [n, 2] and variances [2] (A^T A diagonal: q* is the posterior)."""
    model = LinearGaussian()
    x = model.sample(n)
    encoder = exact_encoder(model)
    with torch.no_grad():
        encoder.linear.bias.add_(torch.tensor([0.6, -0.4]))
        encoder.log_scale.add_(0.4)
    guide = AutoAmortizedNormal(model, encoder=encoder)
    guide(x)
    W, c, var = model.posterior()
    return model, x, guide, x @ W.T + c, var


def _kl_to_posterior(loc, scale, mean, var):
    """KL(N(loc, scale^2) || N(mean, var)) per datapoint: log p(x) - ELBO, exactly."""
    return 0.5 * (scale**2 / var + (loc - mean) ** 2 / var - 1 + (var / scale**2).log()).sum(-1)


@pytest.mark.parametrize("optimizer, step_size", [("adam", 1e-2), ("sgd", 0.05)])
def test_refinement_converges_to_the_exact_posterior(float64, optimizer, step_size):
    # With STL the gradient vanishes at the exact posterior, so the steps settle there.
    model, x, guide, mean, var = _wrong_encoder_problem()
    refined = refine(
        guide, model, x, num_steps=2000, step_size=step_size, optimizer=optimizer, estimator="stl"
    )
    assert (refined.loc - mean).abs().max() < 1e-3
    assert (refined.scale - var.sqrt()).abs().max() < 1e-3
    start = guide.encode(x)["z"].base_dist
    assert (start.loc - mean).abs().max() > 0.3  # the start was far: the check has teeth


def test_refined_bound_rises_monotonically_in_expectation(float64):
    # The exact ELBO of the refined posteriors after k steps (the same draws for every k),
    # with SGD on 1000-draw gradient estimates: close to the expected gradient, so every
    # step raises the expected bound of every datapoint.
    model, x, guide, mean, var = _wrong_encoder_problem()
    kls = []
    for k in range(0, 31, 3):
        pyro.set_rng_seed(5)
        r = refine(
            guide, model, x, num_steps=k, step_size=0.02, optimizer="sgd", num_particles=1000
        )
        kls.append(_kl_to_posterior(r.loc, r.scale, mean, var))
    kls = torch.stack(kls)  # [checkpoints, datapoints]
    assert (kls[1:] < kls[:-1]).all(), kls
    assert kls[-1].mean() < 0.5 * kls[0].mean()


def test_refinement_holds_the_model_and_encoder_fixed(float64):
    model, x, guide, _, _ = _wrong_encoder_problem()
    before = {
        k: v.detach().clone() for k, v in [*model.named_parameters(), *guide.named_parameters()]
    }
    refine(guide, model, x, num_steps=5)
    for name, value in [*model.named_parameters(), *guide.named_parameters()]:
        assert torch.equal(value, before[name]), name
        assert value.grad is None, name


def test_each_datapoint_is_refined_as_if_alone(float64):
    # Datapoint 0's data changes; every other datapoint sees the same draws and must end
    # exactly where it did: rows share nothing (Adam's moments, clipping, step counts).
    model, x, guide, _, _ = _wrong_encoder_problem()
    other = x.clone()
    other[0] += 3.0
    results = []
    for data in (x, other):
        pyro.set_rng_seed(2)
        results.append(refine(guide, model, data, num_steps=10, num_particles=3, max_grad_norm=0.5))
    assert torch.equal(results[0].loc[1:], results[1].loc[1:])
    assert torch.equal(results[0].scale[1:], results[1].scale[1:])
    assert not torch.equal(results[0].loc[0], results[1].loc[0])


def test_gradient_clipping_bounds_each_datapoints_step(float64):
    model, x, guide, _, _ = _wrong_encoder_problem()
    start = guide.encode(x)["z"].base_dist
    r = refine(guide, model, x, num_steps=1, step_size=1.0, optimizer="sgd", max_grad_norm=0.1)
    moved = torch.cat([r.loc - start.loc, r.scale.log() - start.scale.log()], -1).norm(dim=-1)
    assert (moved <= 0.1 + 1e-12).all()
    assert (moved > 0.1 - 1e-9).any()  # the clip was active for some


def test_refining_a_flow_guide_moves_only_the_base(float64):
    model = LinearGaussian()
    x = model.sample(6)
    guide = AutoAmortizedIAF(model, hidden_dims=(8,), num_transforms=2)
    guide(x)
    with torch.no_grad():
        for p in guide.parameters():
            p.add_(0.2 * torch.randn_like(p))
    start = refine(guide, model, x, num_steps=0)
    # no steps: the refined guide is the guide (the same draws give the same log q)
    elbo = Trace_IWELBO(4)
    values = []
    for g in (guide, start.guide):
        elbo._collect(model, g, (x,), {}, stopped=False)
        pyro.set_rng_seed(3)
        values.append(elbo._collect(model, g, (x,), {}, stopped=False).guide_local)
    torch.testing.assert_close(values[1], values[0], rtol=1e-12, atol=0)
    refined = refine(guide, model, x, num_steps=20)
    flows = [[p.detach().clone() for p in r.guide.flow.parameters()] for r in (start, refined)]
    for a, b in zip(*flows, strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(refined.loc, start.loc)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_steps=-1), "num_steps must be an int >= 0"),
        (dict(step_size=0.0), "step_size must be > 0"),
        (dict(optimizer="rmsprop"), "optimizer must be one of"),
        (dict(momentum=0.9), "momentum is SGD's"),
        (dict(optimizer="sgd", momentum=1.0), "momentum must be in \\[0, 1\\)"),
        (dict(estimator="dreg"), "estimator must be 'iwae' or 'stl'"),
        (dict(max_grad_norm=0.0), "max_grad_norm must be None or > 0"),
        (dict(num_particles=0), "num_particles must be an int >= 1"),
    ],
)
def test_refine_bad_arguments(kwargs, match):
    model = LinearGaussian()
    x = model.sample(3)
    guide = AutoAmortizedNormal(model, hidden_dims=(4,))
    with pytest.raises(ValueError, match="refine: " + match):
        refine(guide, model, x, **kwargs)
    with pytest.raises(ValueError, match="not an AutoAmortizedGuide"):
        refine(lambda x: None, model, x)


def test_refine_defaults_are_refines_own():
    parameters = inspect.signature(refine).parameters
    assert REFINE_DEFAULTS == {k: parameters[k].default for k in REFINE_DEFAULTS}
