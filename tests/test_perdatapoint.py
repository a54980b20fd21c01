import math

import pyro
import pytest
import torch
from linear_gaussian import LinearGaussian, correlated_problem
from pyro.nn import ConditionalAutoRegressiveNN, ConditionalDenseNN

from pyro_amortized import AutoAmortizedIAF, AutoAmortizedNormal, AutoAmortizedRealNVP, Trace_IWELBO
from pyro_amortized.perdatapoint import (
    LocalOptions,
    _PerRowNetwork,
    optimize_local,
    per_datapoint_guide,
)


def _log_weights(model, guide, x, num_particles, seed):
    """The local sites' log q and log p of ``num_particles`` draws, after a fixed seed."""
    elbo = Trace_IWELBO(num_particles)
    elbo.log_weights(model, guide, x)  # one-off setup draws first
    pyro.set_rng_seed(seed)
    return elbo.log_weights(model, guide, x)


# ------------------------------------------------------- per-datapoint networks
@pytest.mark.parametrize("autoregressive", [False, True], ids=["dense", "made"])
def test_per_row_network_computes_the_network_at_each_context(float64, autoregressive):
    N, D, C = 6, 4, 3
    if autoregressive:
        net = ConditionalAutoRegressiveNN(D, C, [8, 8], permutation=torch.arange(D).flip(0))
    else:
        net = ConditionalDenseNN(D, C, [8, 8], [2, 2])
    context = torch.randn(N, C)
    x = torch.randn(5, N, D)  # particles x datapoints
    copy = _PerRowNetwork(net, context)
    rows = torch.arange(N, dtype=x.dtype).unsqueeze(-1)
    for expected, got in zip(net(x, context=context), copy(x, context=rows), strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    # rows in another order pick their own weights
    order = torch.tensor([3, 0, 5])
    for expected, got in zip(
        net(x[:, order], context=context[order]),
        copy(x[:, order], context=rows[order]),
        strict=True,
    ):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    if autoregressive:
        assert torch.equal(copy.get_permutation(), net.get_permutation())


def test_per_row_networks_are_independent_and_keep_the_masks(float64):
    # Row n's output depends on row n's weights only, and a MADE's masked weights get
    # no gradient, so its outputs stay autoregressive while the rows learn.
    N, D, C = 4, 3, 2
    net = ConditionalAutoRegressiveNN(D, C, [6], permutation=torch.arange(D))
    copy = _PerRowNetwork(net, torch.randn(N, C))
    rows = torch.arange(N, dtype=torch.float64).unsqueeze(-1)
    m, log_s = copy(torch.randn(N, D), context=rows)
    grads = torch.autograd.grad((m[1] + log_s[1]).sum(), list(copy.parameters()))
    for g in grads:
        assert g[[0, 2, 3]].abs().max() == 0  # other rows' weights untouched
        assert g[1].abs().max() > 0
    for i, g in enumerate(grads[: len(copy.weights)]):
        assert (g[1] * (1 - getattr(copy, f"mask{i}"))).abs().max() == 0


# ------------------------------------------------------------- the start points
@pytest.mark.parametrize(
    "cls, options, family",
    [
        (AutoAmortizedRealNVP, {"num_transforms": 2}, "flow"),
        (AutoAmortizedRealNVP, {"num_transforms": 2, "auxiliary": False}, "flow"),
        (AutoAmortizedIAF, {"num_transforms": 2}, "iaf"),
    ],
    ids=["auxiliary flow", "real-nvp", "iaf"],
)
def test_a_flow_of_the_guides_class_starts_as_the_guide(float64, cls, options, family):
    model = LinearGaussian()
    x = model.sample(8)
    guide = cls(model, hidden_dims=(8,), **options)
    guide(x)
    with torch.no_grad():  # a guide far from its identity start
        for p in guide.parameters():
            p.add_(0.3 * torch.randn_like(p))
    local, params = per_datapoint_guide(
        model, guide, (x,), {}, local_plate="data", family=family, num_transforms=2
    )
    assert all(p.shape[0] == len(x) for p in params)
    amortized = _log_weights(model, guide, x, 5, seed=1)
    per_datapoint = _log_weights(model, local, x, 5, seed=1)
    torch.testing.assert_close(per_datapoint.guide_local, amortized.guide_local, rtol=1e-12, atol=0)
    torch.testing.assert_close(per_datapoint.model_local, amortized.model_local, rtol=1e-12, atol=0)


@pytest.mark.parametrize("family", ["normal", "flow", "iaf"])
def test_a_fresh_flow_starts_as_the_encoders_normal(float64, family):
    model = LinearGaussian()
    x = model.sample(8)
    guide = AutoAmortizedNormal(model, hidden_dims=(8,))
    guide(x)
    local, _ = per_datapoint_guide(
        model, guide, (x,), {}, local_plate="data", family=family, num_transforms=2
    )
    trace = pyro.poutine.trace(local).get_trace(x)
    trace.compute_log_prob()
    log_q = sum(site["log_prob"] for site in trace.nodes.values() if site["type"] == "sample")
    # for the auxiliary flow, log q(z, v) - log r(v | z): exact at its start, whatever v
    z = trace.nodes["z"]["value"]
    torch.testing.assert_close(log_q, guide.site_posteriors(x)["z"].log_prob(z), rtol=1e-12, atol=0)


# ------------------------------------------------------------------ the optimum
def test_local_normal_optimum_reaches_the_analytic_mean_field_bound(float64):
    # The optimized ELBO of each datapoint is log p(x) - KL at best.
    model, x, guide, _, kl = correlated_problem()
    model_, local, steps = optimize_local(model, guide, x, progress=False)
    assert (steps < 5000).all()  # every datapoint stopped by patience
    optimum = model.log_evidence(x) - kl
    S = 20000
    terms = Trace_IWELBO(S).log_weights(model_, local, x)
    log_w = terms.model_local - terms.guide_local
    bound, se = log_w.mean(0), log_w.std(0) / math.sqrt(S)
    # Above the optimum only by noise; below it by noise and by what Adam's jitter leaves,
    # a second-order loss: about 0.5 * Lam * (0.07 loc error)^2 < 0.02 nats.
    assert (bound <= optimum + 5 * se).all()
    assert (bound >= optimum - 0.02 - 5 * se).all(), (optimum - bound).max()
    assert kl > 0.1  # the posterior is far from diagonal: the check has teeth


@pytest.mark.slow
@pytest.mark.parametrize("family", ["flow", "iaf"])
def test_local_flows_beat_the_mean_field_bound(float64, family):
    # A flow can follow the posterior's correlation, which no diagonal Normal can: its
    # optimized bound must pass log p(x) - KL(q*_FFG || p(z | x)), the best a diagonal
    # Normal reaches, while staying below log p(x).
    model, x, guide, _, kl = correlated_problem()
    # the faster settings of a small, easy problem (the defaults suit noisier ones)
    model_, local, steps = optimize_local(
        model, guide, x, family=family, lr=1e-2, patience=200, progress=False
    )
    assert (steps < 5000).all()
    S = 20000
    terms = Trace_IWELBO(S).log_weights(model_, local, x)
    log_w = (terms.model_local - terms.guide_local).detach()
    bound = log_w.mean(0).mean()
    se = (log_w.var(0) / S).sum().sqrt() / len(x)
    log_px = model.log_evidence(x).mean()
    assert bound <= log_px + 5 * se
    # measured: 0.16 (flow) and 0.08 (iaf) nats below log p(x), against 0.46
    assert bound >= log_px - kl + 0.2 + 5 * se, (log_px - bound, kl)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(family="maf"), "family must be one of"),
        (dict(init="zero"), "init must be 'encoder' or 'prior'"),
        (dict(max_steps=0), "max_steps must be an int >= 1"),
        (dict(patience=1.5), "patience must be an int >= 1"),
        (dict(num_transforms=True), "num_transforms must be an int >= 1"),
        (dict(lr=0.0), "lr must be > 0"),
    ],
)
def test_optimize_local_bad_arguments(kwargs, match):
    model = LinearGaussian()
    x = model.sample(3)
    guide = AutoAmortizedNormal(model, hidden_dims=(4,))
    with pytest.raises(ValueError, match="optimize_local: " + match):
        optimize_local(model, guide, x, progress=False, **kwargs)
    with pytest.raises(ValueError, match="not an AutoAmortizedGuide"):
        optimize_local(model, lambda x: None, x)


def test_per_datapoint_guides_leave_the_param_store_alone(float64):
    # Their parameters are optimized directly; in the store they would linger (and clash
    # with a fit resumed from a checkpoint).
    model = LinearGaussian()
    x = model.sample(4)
    for cls, family in ((AutoAmortizedNormal, "normal"), (AutoAmortizedIAF, "iaf")):
        pyro.clear_param_store()
        guide = cls(model, hidden_dims=(8,))
        guide(x)
        before = dict(pyro.get_param_store().named_parameters())
        model_, local, _ = optimize_local(
            model, guide, x, family=family, max_steps=3, progress=False
        )
        Trace_IWELBO(2).loss(model_, local, x)
        after = dict(pyro.get_param_store().named_parameters())
        assert after.keys() == before.keys()
        assert all(after[k] is before[k] for k in before)


# ------------------------------------------------------------ deprecated names
def test_the_local_module_and_num_flows_are_deprecated(float64):
    import importlib
    import sys

    sys.modules.pop("pyro_amortized.local", None)
    with pytest.warns(FutureWarning, match="pyro_amortized.local is deprecated.*perdatapoint"):
        local = importlib.import_module("pyro_amortized.local")
    assert local.optimize_local is optimize_local
    model = LinearGaussian()
    x = model.sample(3)
    guide = AutoAmortizedIAF(model, hidden_dims=(4,))
    guide(x)
    options = dict(family="normal", max_steps=2, progress=False)
    pyro.set_rng_seed(0)
    new = optimize_local(model, guide, x, num_transforms=1, **options)
    pyro.set_rng_seed(0)
    with pytest.warns(FutureWarning, match="optimize_local: num_flows= is deprecated"):
        old = optimize_local(model, guide, x, num_flows=1, **options)
    assert torch.equal(new.steps, old.steps)
    with pytest.raises(ValueError, match="LocalOptions: num_transforms must be an int >= 1"):
        LocalOptions(num_transforms=0)
