import dataclasses
import inspect
import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from linear_gaussian import LinearGaussian, exact_encoder
from pyro import poutine
from pyro.infer.autoguide import AutoNormal

from pyro_amortized import (
    AutoAmortizedIAF,
    AutoAmortizedNormal,
    SemiAmortizedGuide,
    Trace_IWELBO,
    Validation,
    fit,
)
from pyro_amortized.refinement import MODES, RefineOptions, refine


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


@pytest.mark.parametrize("optimizer, lr", [("adam", 1e-2), ("sgd", 0.05)])
def test_refinement_converges_to_the_exact_posterior(float64, optimizer, lr):
    # With STL the gradient vanishes at the exact posterior, so the steps settle there.
    model, x, guide, mean, var = _wrong_encoder_problem()
    refined = refine(model, guide, x, num_steps=2000, lr=lr, optimizer=optimizer, estimator="stl")
    assert (refined.loc - mean).abs().max() < 1e-3
    assert (refined.scale - var.sqrt()).abs().max() < 1e-3
    start = guide.site_posteriors(x)["z"].base_dist
    assert (start.loc - mean).abs().max() > 0.3  # the start was far: the check has teeth


def test_refined_bound_rises_monotonically_in_expectation(float64):
    # The exact ELBO of the refined posteriors after k steps (the same draws for every k),
    # with SGD on 1000-draw gradient estimates: close to the expected gradient, so every
    # step raises the expected bound of every datapoint.
    model, x, guide, mean, var = _wrong_encoder_problem()
    kls = []
    for k in range(0, 31, 3):
        pyro.set_rng_seed(5)
        r = refine(model, guide, x, num_steps=k, lr=0.02, optimizer="sgd", num_particles=1000)
        kls.append(_kl_to_posterior(r.loc, r.scale, mean, var))
    kls = torch.stack(kls)  # [checkpoints, datapoints]
    assert (kls[1:] < kls[:-1]).all(), kls
    assert kls[-1].mean() < 0.5 * kls[0].mean()


def test_refinement_holds_the_model_and_encoder_fixed(float64):
    model, x, guide, _, _ = _wrong_encoder_problem()
    before = {
        k: v.detach().clone() for k, v in [*model.named_parameters(), *guide.named_parameters()]
    }
    refine(model, guide, x, num_steps=5)
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
        results.append(refine(model, guide, data, num_steps=10, num_particles=3, max_grad_norm=0.5))
    assert torch.equal(results[0].loc[1:], results[1].loc[1:])
    assert torch.equal(results[0].scale[1:], results[1].scale[1:])
    assert not torch.equal(results[0].loc[0], results[1].loc[0])


def test_gradient_clipping_bounds_each_datapoints_step(float64):
    model, x, guide, _, _ = _wrong_encoder_problem()
    start = guide.site_posteriors(x)["z"].base_dist
    r = refine(model, guide, x, num_steps=1, lr=1.0, optimizer="sgd", max_grad_norm=0.1)
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
    start = refine(model, guide, x, num_steps=0)
    # no steps: the refined guide is the guide (the same draws give the same log q)
    elbo = Trace_IWELBO(4)
    values = []
    for g in (guide, start.guide):
        elbo.log_weights(model, g, x)
        pyro.set_rng_seed(3)
        values.append(elbo.log_weights(model, g, x).guide_local)
    torch.testing.assert_close(values[1], values[0], rtol=1e-12, atol=0)
    refined = refine(model, guide, x, num_steps=20)
    flows = [[p.detach().clone() for p in r.guide.flow.parameters()] for r in (start, refined)]
    for a, b in zip(*flows, strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(refined.loc, start.loc)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_steps=-1), "num_steps must be an int >= 0"),
        (dict(lr=0.0), "lr must be > 0"),
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
        refine(model, guide, x, **kwargs)
    with pytest.raises(ValueError, match="not an AutoAmortizedGuide"):
        refine(model, lambda x: None, x)


def test_refine_defaults_are_refines_own():
    parameters = inspect.signature(refine).parameters
    defaults = {f.name: f.default for f in dataclasses.fields(RefineOptions)}
    assert defaults == {k: parameters[k].default for k in defaults}


# ------------------------------------------------------------------ SemiAmortizedGuide
def _site_base(guide, *args):
    """The base Normal of site z in one call of ``guide``: (loc, scale, plate indices)."""
    trace = poutine.trace(guide).get_trace(*args)
    return trace.nodes["z"]["fn"].base_dist, trace.nodes["data"]["value"]


@pytest.mark.parametrize("subsample_size", [None, 4])
def test_semi_amortized_guide_in_eval_refines_to_the_exact_posterior(float64, subsample_size):
    # A plate that draws its own rows (subsample_size) must be refined on those rows.
    model, x, guide, mean, var = _wrong_encoder_problem()
    model.subsample_size = subsample_size
    guide = AutoAmortizedNormal(model, encoder=guide.encoder)  # set up for this plate
    semi = SemiAmortizedGuide(guide, num_steps=2000, lr=1e-2, estimator="stl")
    semi.eval()
    base, rows = _site_base(semi, x)
    assert (base.loc - mean[rows]).abs().max() < 1e-3
    assert (base.scale - var.sqrt()).abs().max() < 1e-3
    semi.train()  # mode "test": training sees the encoder
    base, rows = _site_base(semi, x)
    assert (base.loc - mean[rows]).abs().max() > 0.3


def test_semi_amortized_guide_holds_the_globals_at_the_calls_draw(float64):
    # b, a global latent: given its draw, the posterior of z is N(W x - W b, var).
    lg = LinearGaussian()
    x = lg.sample(6)
    W, _, var = lg.posterior()

    def model(x):
        b = pyro.sample("b", dist.Normal(torch.zeros(3), 1.0).to_event(1))
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z @ lg.A.T + b, lg.sigma).to_event(1), obs=x)

    guide = AutoAmortizedNormal(model, hidden_dims=(4,), init_scale=0.5)
    semi = SemiAmortizedGuide(guide, num_steps=2000, lr=1e-2, estimator="stl").eval()
    trace = poutine.trace(semi).get_trace(x)
    b = trace.nodes["b"]["value"]
    base = trace.nodes["z"]["fn"].base_dist
    assert (base.loc - (x - b) @ W.T).abs().max() < 1e-3
    assert (base.scale - var.sqrt()).abs().max() < 1e-3


@pytest.mark.parametrize("mode", MODES)
def test_semi_amortized_guide_never_changes_the_model(float64, mode):
    model, x, guide, _, _ = _wrong_encoder_problem()
    semi = SemiAmortizedGuide(guide, num_steps=5, mode=mode)
    named = [*model.named_parameters(), *guide.named_parameters()]
    before = {k: v.detach().clone() for k, v in named}
    for train in (True, False):
        semi.train(train)
        poutine.trace(semi).get_trace(x, torch.arange(4))
    for name, value in named:
        assert torch.equal(value, before[name]), name
        assert value.grad is None, name  # the inner steps leave no gradients behind


def _gradients(loss_fn, params):
    loss_fn()  # the objectives' one-time setup draws random numbers
    return torch.autograd.grad(loss_fn(), params)


@pytest.mark.parametrize("guide_class", ["normal", "iaf"])
@pytest.mark.parametrize(
    "optimizer, lr, momentum", [("sgd", 0.1, 0.0), ("sgd", 0.1, 0.5), ("adam", 0.05, 0.0)]
)
def test_sa_vae_gradients_match_finite_differences(float64, guide_class, optimizer, lr, momentum):
    # The loss as a function of every parameter, the draws fixed by the seed: SA-VAE's
    # gradients (through the unrolled steps, into encoder and model alike) are its
    # derivatives. Those of mode "test" (the plain guide's) are not.
    model, x, guide, _, _ = _wrong_encoder_problem(n=4)
    if guide_class == "iaf":
        guide = AutoAmortizedIAF(model, hidden_dims=(3,), num_transforms=1)
        guide(x)
    params = [*guide.parameters(), *model.parameters()]
    options = dict(num_steps=3, optimizer=optimizer, lr=lr, momentum=momentum)
    elbo = Trace_IWELBO(2)

    def loss(semi):
        pyro.set_rng_seed(7)
        return elbo.differentiable_loss(model, semi, x)

    sa_vae = SemiAmortizedGuide(guide, mode="sa-vae", num_particles=2, **options)
    grads = torch.cat([g.reshape(-1) for g in _gradients(lambda: loss(sa_vae), params)])
    eps, numeric = 1e-6, []
    with torch.no_grad():
        for p in params:
            for i in range(p.numel()):
                p.view(-1)[i] += eps
                up = loss(sa_vae)
                p.view(-1)[i] -= 2 * eps
                down = loss(sa_vae)
                p.view(-1)[i] += eps
                numeric.append((up - down) / (2 * eps))
    numeric = torch.stack(numeric)
    torch.testing.assert_close(grads, numeric, rtol=1e-5, atol=1e-6)
    test = SemiAmortizedGuide(guide, mode="test", **options)
    plain = torch.cat([g.reshape(-1) for g in _gradients(lambda: loss(test), params)])
    assert (plain - grads).abs().max() > 0.1 * grads.abs().max()


def test_sa_vae_with_adam_has_finite_gradients_where_the_step_gradient_vanishes(float64):
    # The exact posterior with STL: every inner gradient is exactly 0, where sqrt(v) has
    # an infinite derivative (the NaN that ended an MNIST run); sqrt(v + eps^2) has not.
    model = LinearGaussian()
    x = model.sample(5)
    guide = AutoAmortizedNormal(model, encoder=exact_encoder(model))
    semi = SemiAmortizedGuide(guide, num_steps=3, mode="sa-vae", estimator="stl")
    loss = Trace_IWELBO(1).differentiable_loss(model, semi, x)
    grads = torch.autograd.grad(loss, [*guide.parameters(), *model.parameters()])
    assert all(torch.isfinite(g).all() for g in grads)
    assert any((g != 0).any() for g in grads)


def test_sa_vae_clips_what_flows_back_into_each_step(float64):
    # The encoder's bias c enters only the start loc, one row per datapoint, so with each
    # row's gradient there clipped to m, |dL/dc| <= B m; unclipped it is 37 here.
    model, x, guide, _, _ = _wrong_encoder_problem()
    bias = guide.encoder.linear.bias
    norms = {}
    for max_norm in (None, 1e-4):
        semi = SemiAmortizedGuide(guide, num_steps=3, mode="sa-vae", max_grad_norm=max_norm)
        pyro.set_rng_seed(1)
        loss = Trace_IWELBO(1).differentiable_loss(model, semi, x)
        norms[max_norm] = torch.autograd.grad(loss, bias)[0].norm()
    assert norms[1e-4] <= len(x) * 1e-4 < 0.01 < norms[None]


def test_savi_trains_the_encoder_on_its_own_bound_and_the_model_on_the_refined(float64):
    # At the same draws (K=1, minibatch of 4 of 10 rows, so the N/B scale counts), the
    # encoder's gradient under SAVI is the plain ELBO's: the first inner step draws what
    # the plain guide draws. The model's is not: it is taken at the refined posterior.
    model, x, guide, _, _ = _wrong_encoder_problem()
    idx = torch.tensor([0, 3, 5, 9])
    encoder, decoder = list(guide.parameters()), list(model.parameters())
    elbo = Trace_IWELBO(1)
    savi = SemiAmortizedGuide(guide, num_steps=10, mode="savi", lr=0.1)

    def loss(g):
        pyro.set_rng_seed(4)
        return elbo.differentiable_loss(model, g, x, idx)

    ours = _gradients(lambda: loss(savi), encoder + decoder)
    plain = _gradients(lambda: loss(guide), encoder + decoder)
    for a, b in zip(ours[: len(encoder)], plain[: len(encoder)], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(ours[-1], plain[-1], rtol=0.05)
    # the encoder-bound site adds nothing to the loss's value: it is the refined bound's
    trace = poutine.trace(savi).get_trace(x, idx)
    site = next(s for name, s in trace.nodes.items() if name.endswith("_encoder_bound"))
    assert torch.equal(site["fn"].log_prob(site["value"]).detach(), torch.zeros(4))


def test_semi_amortized_guide_trains_with_fit(float64):
    # savi and sa-vae by minibatches, validated in eval mode (refined), for a few epochs
    model = LinearGaussian()
    x = model.sample(40)
    for mode in ("savi", "sa-vae"):
        pyro.clear_param_store()
        guide = SemiAmortizedGuide(
            AutoAmortizedNormal(model, hidden_dims=(4,)), num_steps=3, mode=mode
        )
        history = fit(
            model,
            guide,
            Trace_IWELBO(2),
            x,
            validation=Validation(x[:10]),
            epochs=3,
            batch_size=16,
            optimizer=pyro.optim.Adam({"lr": 1e-2}),
            progress=False,
        )
        assert history.steps == 9 and all(math.isfinite(v) for v in history.valid_bound)
        assert guide.training  # fit puts it back in training mode after validating


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(mode="amortized"), "mode must be one of"),
        (dict(num_steps=1.5), "num_steps must be an int >= 0"),
        (dict(optimizer="sgd", momentum=-0.1), "momentum must be in"),
        (dict(max_grad_norm=-1.0), "max_grad_norm must be None or > 0"),
    ],
)
def test_semi_amortized_guide_bad_arguments(kwargs, match):
    model = LinearGaussian()
    guide = AutoAmortizedNormal(model, hidden_dims=(4,))
    with pytest.raises(ValueError, match="SemiAmortizedGuide: " + match):
        SemiAmortizedGuide(guide, **kwargs)
    with pytest.raises(ValueError, match="not an AutoAmortizedGuide; wrap"):
        SemiAmortizedGuide(AutoNormal(model))


def test_semi_amortized_guide_defaults_are_refines():
    parameters = inspect.signature(SemiAmortizedGuide).parameters
    defaults = {f.name: f.default for f in dataclasses.fields(RefineOptions)}
    assert defaults == {k: parameters[k].default for k in defaults}


# ------------------------------------------------------------ deprecated names
def test_refine_in_the_old_order_and_step_size_warn_and_refine_the_same(float64):
    model, x, guide, _, _ = _wrong_encoder_problem()
    pyro.set_rng_seed(0)
    new = refine(model, guide, x, num_steps=5, lr=0.05)
    pyro.set_rng_seed(0)
    with pytest.warns(FutureWarning) as record:
        old = refine(guide, model, x, num_steps=5, step_size=0.05)
    messages = " ".join(str(w.message) for w in record)
    assert "refine(guide, model, ...) is deprecated" in messages
    assert "step_size= is deprecated" in messages and "pass lr=" in messages
    assert torch.equal(new.loc, old.loc) and torch.equal(new.bounds, old.bounds)


def test_semi_amortized_guides_step_size_is_deprecated_for_lr():
    model, x, guide, _, _ = _wrong_encoder_problem()
    with pytest.warns(FutureWarning, match="SemiAmortizedGuide: step_size= is deprecated"):
        semi = SemiAmortizedGuide(guide, num_steps=3, step_size=0.05)
    assert semi.options == RefineOptions(num_steps=3, lr=0.05)


def test_refine_options_are_a_validated_frozen_value():
    options = RefineOptions(num_steps=3, lr=0.1, optimizer="sgd", momentum=0.5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.lr = 1.0
    with pytest.raises(ValueError, match="RefineOptions: momentum is SGD's"):
        RefineOptions(momentum=0.5)
    with pytest.raises(ValueError, match="RefineOptions: lr must be > 0"):
        RefineOptions(lr=float("nan"))


def test_semi_amortized_guide_reaches_no_private_attribute_of_the_guide():
    # it composes the guide through its public API (prepare, encode_rows, sample_local)
    import ast

    import pyro_amortized.refinement as refinement

    tree = ast.parse(inspect.getsource(refinement))
    reached = {
        node.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and node.attr.startswith("_")
        and not node.attr.startswith("__")
        and isinstance(node.value, ast.Attribute)
        and node.value.attr == "guide"
    }
    assert reached == set()
    assert not hasattr(AutoAmortizedNormal(lambda x: None), "_refiner")


@pytest.mark.parametrize("mode", ["savi", "sa-vae"])
@pytest.mark.parametrize("guide_class", [AutoAmortizedNormal, AutoAmortizedIAF])
def test_svi_sees_and_trains_the_wrapped_guides_networks(mode, guide_class):
    # the wrapper calls the guide's public steps, not guide(...): the networks must still
    # be registered in the trace, or SVI would leave the encoder untrained
    model, x, guide, _, _ = _wrong_encoder_problem()
    pyro.clear_param_store()
    guide = guide_class(model, hidden_dims=(4,))
    semi = SemiAmortizedGuide(guide, num_steps=2, mode=mode)
    trace = poutine.trace(semi).get_trace(x)
    params = {name for name, site in trace.nodes.items() if site["type"] == "param"}
    assert any(".encoder$$$" in name for name in params), params
    before = {k: v.detach().clone() for k, v in guide.encoder.named_parameters()}
    svi = pyro.infer.SVI(model, semi, pyro.optim.Adam({"lr": 1e-2}), Trace_IWELBO(2))
    svi.step(x)
    assert all(not torch.equal(v, before[k]) for k, v in guide.encoder.named_parameters())
