import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from linear_gaussian import LinearGaussian, exact_encoder
from pyro import poutine
from pyro.distributions import transforms as T
from torch import nn

from pyro_amortized import (
    AutoAmortizedFlow,
    AutoAmortizedIAF,
    AutoAmortizedNormal,
    AutoAmortizedRealNVP,
    MLPEncoder,
    Trace_IWELBO,
)
from pyro_amortized.encoders import EncoderOutput
from pyro_amortized.objectives import stop_distribution


def gaussian_model(x):
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([3]).to_event(1))
        pyro.sample("x", dist.Normal(z, 0.5).to_event(1), obs=x)


def mixed_model(x):
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
        s = pyro.sample("s", dist.LogNormal(0.0, 1.0))
        pyro.sample("x", dist.Normal(z, s.unsqueeze(-1)).to_event(1), obs=x)


def conditioned_steps(guide, x):
    """The guide's IAF steps conditioned on the context of ``x``, built afresh (no cache)."""
    _, _, h = guide.encode_rows(x)
    return [step.condition(h) for step in guide.flow]


def randomize(module: nn.Module, scale=0.5):
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, scale)


# ------------------------------------------------------------------ the transforms
@pytest.mark.parametrize("stable", [True, False])
def test_inverse_of_forward_is_identity(float64, stable):
    x = torch.randn(4, 3)
    guide = AutoAmortizedIAF(gaussian_model, hidden_dims=(8,), num_transforms=3, stable=stable)
    guide(x)
    randomize(guide.flow)
    u = torch.randn(4, 3)
    for step in conditioned_steps(guide, x):
        y = step(u)
        back = step._inverse(y)  # the sequential inverse, not the cached value
        assert torch.allclose(back, u, atol=1e-10)
        assert not torch.allclose(y, u)
        u = y


@pytest.mark.parametrize("stable", [True, False])
def test_log_det_equals_slogdet_of_the_jacobian_which_is_triangular(float64, stable):
    x = torch.randn(1, 4)

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([4]).to_event(1))
            pyro.sample("x", dist.Normal(z, 1.0).to_event(1), obs=x)

    guide = AutoAmortizedIAF(model, hidden_dims=(8,), num_transforms=2, stable=stable)
    guide(x)
    randomize(guide.flow)
    _, _, h = guide.encode_rows(x)
    for step in guide.flow:
        u = torch.randn(4)
        # a fresh conditioning per call: the transform's cache would hand back old values
        J = torch.autograd.functional.jacobian(lambda u, step=step: step.condition(h[0])(u), u)
        conditioned = step.condition(h[0])
        log_det = conditioned.log_abs_det_jacobian(u, conditioned(u))
        assert torch.allclose(log_det, torch.linalg.slogdet(J).logabsdet, atol=1e-10)
        order = step.nn.permutation
        permuted = J[order][:, order]
        assert torch.allclose(permuted.triu(1), torch.zeros(4, 4), atol=1e-12)
        assert permuted.tril(-1).abs().sum() > 1e-3  # not merely diagonal


@pytest.mark.parametrize("stable", [True, False])
def test_log_q_integrates_to_one_in_2d(float64, stable):
    x = torch.randn(1, 2)

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
            pyro.sample("x", dist.Normal(z, 1.0).to_event(1), obs=x)

    guide = AutoAmortizedIAF(
        model, hidden_dims=(8,), num_transforms=2, init_scale=0.8, stable=stable
    )
    guide(x)
    randomize(guide.flow, 1.0 if stable else 0.5)
    q = guide.joint_distribution(guide.encoder_output(x))
    proposal = dist.Normal(torch.zeros(2), 3.0).to_event(1)
    n = 200_000
    u = proposal.sample((n,))
    ratio = (q.log_prob(u.unsqueeze(1)).squeeze(1) - proposal.log_prob(u)).exp()
    estimate, se = ratio.mean(), ratio.std() / math.sqrt(n)
    assert abs(estimate - 1.0) < 5 * se, (estimate, se)
    assert se < 0.02  # the check has teeth


# ------------------------------------------------------------------ the guide
def test_sample_shapes_with_particles_and_batch():
    x = torch.randn(7, 2)
    guide = AutoAmortizedIAF(mixed_model, hidden_dims=(8,), num_transforms=2)
    guide(x)
    with pyro.plate("particles", 5, dim=-2):
        trace = poutine.trace(guide).get_trace(x)
    assert trace.nodes["z"]["value"].shape == (5, 7, 2)
    assert trace.nodes["s"]["value"].shape == (5, 7)
    assert (trace.nodes["s"]["value"] > 0).all()
    assert trace.nodes[guide.latent_name]["value"].shape == (5, 7, 3)
    loss = Trace_IWELBO(5).loss(mixed_model, guide, x)
    assert math.isfinite(loss)


class WithZeroContext(nn.Module):
    def __init__(self, encoder, context_dim):
        super().__init__()
        self.encoder = encoder
        self.context_dim = context_dim

    def forward(self, x):
        loc, scale = self.encoder(x)
        return loc, scale, loc.new_zeros(loc.shape[:-1] + (self.context_dim,))


@pytest.mark.parametrize("fresh", [True, False], ids=["fresh", "zeroed"])
@pytest.mark.parametrize("K", [1, 5])
def test_identity_flow_gives_the_normal_guides_bounds_exactly(float64, K, fresh):
    x = torch.randn(6, 3)
    encoder = MLPEncoder(3, 3, (8,), init_scale=0.5)
    normal = AutoAmortizedNormal(gaussian_model, encoder=encoder)
    iaf = AutoAmortizedIAF(
        gaussian_model,
        encoder=WithZeroContext(encoder, 4),
        context_dim=4,
        num_transforms=2,
        hidden_dims=(8,),
    )
    iaf(x)
    if not fresh:  # a trained flow set back to m = 0 and log s = 0 in every step
        randomize(iaf.flow)
        with torch.no_grad():
            for step in iaf.flow:
                step.nn.layers[-1].weight.zero_()
                step.nn.layers[-1].bias.zero_()
    # A fresh default guide starts there: its MADE output layers are zero.
    values = []
    for guide in (normal, iaf):
        elbo = Trace_IWELBO(K)
        elbo.loss(gaussian_model, guide, x)
        pyro.set_rng_seed(4)
        values.append(elbo.loss(gaussian_model, guide, x))
    assert values[0] == pytest.approx(values[1], rel=1e-12, abs=1e-12)


def test_positive_site_log_q_includes_the_support_jacobian(float64):
    x = torch.randn(3, 2)
    guide = AutoAmortizedIAF(mixed_model, hidden_dims=(8,), num_transforms=1)
    trace = poutine.trace(guide).get_trace(x)
    trace.compute_log_prob()
    u = trace.nodes[guide.latent_name]["value"]
    s = trace.nodes["s"]["value"]
    assert torch.allclose(s, u[:, 2].exp())
    # log q(s) picks up -log |ds/du| = -u for s = exp(u)
    assert torch.allclose(trace.nodes["s"]["log_prob"], -u[:, 2])
    assert torch.equal(trace.nodes["z"]["value"], u[:, :2])


FLOW_GUIDES = {
    "iaf": (lambda: AutoAmortizedIAF(mixed_model, hidden_dims=(8,), num_transforms=2), 3),
    "real-nvp": (lambda: AutoAmortizedRealNVP(mixed_model, hidden_dims=(8,), auxiliary=False), 3),
    "auxiliary": (lambda: AutoAmortizedRealNVP(mixed_model, hidden_dims=(8,)), 6),
}


@pytest.mark.parametrize("kind", sorted(FLOW_GUIDES))
def test_save_and_load_give_the_same_log_q(float64, tmp_path, kind):
    make, width = FLOW_GUIDES[kind]
    x = torch.randn(5, 2)
    guide = make()
    guide(x)
    randomize(guide)
    u = torch.randn(5, width)
    before = guide.joint_distribution(guide.encoder_output(x)).log_prob(u)
    torch.save(guide.state_dict(), tmp_path / "guide.pt")

    pyro.clear_param_store()
    other = make()
    other(x)
    assert not torch.allclose(other.joint_distribution(other.encoder_output(x)).log_prob(u), before)
    other.load_state_dict(torch.load(tmp_path / "guide.pt", weights_only=True))
    assert torch.equal(other.joint_distribution(other.encoder_output(x)).log_prob(u), before)


# ------------------------------------------------------------ STL and DReG through the flow
def _identity_iaf_at_exact_posterior(K_context=3):
    model = LinearGaussian()
    x = model.sample(6)
    guide = AutoAmortizedIAF(
        model,
        encoder=WithZeroContext(exact_encoder(model), K_context),
        context_dim=K_context,
        num_transforms=2,
        hidden_dims=(8,),
        stable=False,
    )
    guide(x)
    with torch.no_grad():
        for step in guide.flow:
            step.nn.layers[-1].weight.zero_()
            step.nn.layers[-1].bias.zero_()
    return model, guide, x


def _guide_grad(loss, guide):
    params = list(guide.encoder.parameters()) + list(guide.flow.parameters())
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return torch.cat(
        [
            (torch.zeros_like(p) if g is None else g).reshape(-1)
            for g, p in zip(grads, params, strict=True)
        ]
    )


@pytest.mark.parametrize("K", [1, 5])
def test_stl_and_dreg_gradients_vanish_at_exact_posterior_through_the_flow(float64, K):
    model, guide, x = _identity_iaf_at_exact_posterior()
    for estimator in ("stl", "dreg"):
        elbo = Trace_IWELBO(K, estimator=estimator)
        for _ in range(3):
            grad = _guide_grad(elbo.differentiable_loss(model, guide, x), guide)
            assert grad.abs().max().item() <= 1e-8
    grad = _guide_grad(Trace_IWELBO(K).differentiable_loss(model, guide, x), guide)
    assert grad.abs().max().item() > 1e-3


def test_stopped_flow_density_keeps_the_value_and_only_the_path(float64):
    x = torch.randn(4, 2)
    guide = AutoAmortizedIAF(mixed_model, hidden_dims=(8,), num_transforms=2)
    guide(x)
    randomize(guide.flow)
    q = guide.joint_distribution(guide.encoder_output(x))
    u = q.rsample()
    stopped = stop_distribution(q, "u")
    assert torch.allclose(stopped.log_prob(u), q.log_prob(u), atol=1e-10)
    params = list(guide.encoder.parameters()) + list(guide.flow.parameters())
    # Without the path through u, the stopped density depends on no parameter at all.
    detached = stopped.log_prob(u.detach()).sum()
    assert not detached.requires_grad
    path = torch.autograd.grad(stopped.log_prob(u).sum(), params, allow_unused=True)
    assert any(g is not None and g.abs().max() > 1e-6 for g in path)


@pytest.mark.slow
def test_dreg_expected_gradient_matches_iwae_through_the_flow(float64):
    model = LinearGaussian()
    x = model.sample(6)
    guide = AutoAmortizedIAF(
        model,
        encoder=WithZeroContext(exact_encoder(model, 0.3), 3),
        context_dim=3,
        num_transforms=2,
        hidden_dims=(8,),
    )
    guide(x)
    randomize(guide.flow, 0.3)
    draws = {}
    for estimator in ("iwae", "dreg"):
        elbo = Trace_IWELBO(5, estimator=estimator)
        elbo.loss(model, guide, x)
        pyro.set_rng_seed(11)
        draws[estimator] = torch.stack(
            [_guide_grad(elbo.differentiable_loss(model, guide, x), guide) for _ in range(400)]
        )
    se = (draws["iwae"].var(0) / 400 + draws["dreg"].var(0) / 400).sqrt()
    diff = (draws["iwae"].mean(0) - draws["dreg"].mean(0)).abs()
    assert (diff <= 5 * se + 1e-12).all(), (diff / se).max()
    assert draws["dreg"].var(0).sum() < draws["iwae"].var(0).sum()


def test_stl_refuses_a_transform_module_with_parameters_of_its_own():
    flow = T.affine_autoregressive(2)

    def guide(x):
        pyro.module("flow", flow)
        with pyro.plate("data", x.shape[0]):
            base = dist.Normal(torch.zeros(x.shape[0], 2), 1.0).to_event(1)
            pyro.sample("z", dist.TransformedDistribution(base, [flow]))

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
            pyro.sample("x", dist.Normal(z, 1.0).to_event(1), obs=x)

    with pytest.raises(ValueError, match="cannot be stopped"):
        Trace_IWELBO(3, estimator="stl").loss_and_grads(model, guide, torch.randn(4, 2))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_transforms=-1), "num_transforms"),
        (dict(num_transforms=True), "num_transforms"),
        (dict(flow_hidden_dims=()), "flow_hidden_dims"),
        (dict(context_dim=0), "context_dim"),
        (dict(stable="yes"), "stable"),
        (dict(encoder="mlp"), "encoder"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AutoAmortizedIAF(gaussian_model, **kwargs)


def test_user_encoder_with_wrong_outputs_is_named():
    x = torch.randn(4, 3)
    guide = AutoAmortizedIAF(gaussian_model, encoder=MLPEncoder(3, 3, (8,)), context_dim=2)
    with pytest.raises(
        ValueError, match=r"returned \(loc, scale, h\) of shapes \[\(4, 3\), \(4, 3\)\]"
    ):
        guide(x)


# ------------------------------------------------------------------ AutoAmortizedRealNVP
@pytest.mark.parametrize("auxiliary", [True, False])
def test_coupling_steps_invert_and_their_log_det_is_the_jacobians(float64, auxiliary):
    x = torch.randn(1, 3)
    guide = AutoAmortizedRealNVP(
        gaussian_model, hidden_dims=(8,), num_transforms=2, auxiliary=auxiliary
    )
    guide(x)
    randomize(guide)
    loc, scale, h = guide.encode_rows(x)
    width = 6 if auxiliary else 3
    u = torch.randn(width)
    for transform in guide.joint_distribution(EncoderOutput(loc[0], scale[0], h[0])).transforms:
        y = transform(u)
        assert torch.allclose(transform._inverse(y), u, atol=1e-10)
        J = torch.autograd.functional.jacobian(lambda u, t=transform: t._call(u), u)
        log_det = transform.log_abs_det_jacobian(u, y)
        assert torch.allclose(log_det, torch.linalg.slogdet(J).logabsdet, atol=1e-10)
        u = y


def test_real_nvp_log_q_integrates_to_one_in_2d(float64):
    x = torch.randn(1, 2)

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
            pyro.sample("x", dist.Normal(z, 1.0).to_event(1), obs=x)

    guide = AutoAmortizedRealNVP(
        model, hidden_dims=(8,), num_transforms=3, auxiliary=False, init_scale=0.8
    )
    guide(x)
    randomize(guide.flow, 0.5)
    q = guide.joint_distribution(guide.encoder_output(x))
    proposal = dist.Normal(torch.zeros(2), 3.0).to_event(1)
    n = 200_000
    u = proposal.sample((n,))
    ratio = (q.log_prob(u.unsqueeze(1)).squeeze(1) - proposal.log_prob(u)).exp()
    estimate, se = ratio.mean(), ratio.std() / math.sqrt(n)
    assert abs(estimate - 1.0) < 5 * se, (estimate, se)
    assert se < 0.02


@pytest.mark.parametrize("auxiliary", [True, False])
def test_flow_sample_shapes_with_particles_and_batch(auxiliary):
    x = torch.randn(7, 2)
    guide = AutoAmortizedRealNVP(mixed_model, hidden_dims=(8,), auxiliary=auxiliary)
    guide(x)
    with pyro.plate("particles", 5, dim=-2):
        trace = poutine.trace(guide).get_trace(x)
    assert trace.nodes["z"]["value"].shape == (5, 7, 2)
    assert trace.nodes["s"]["value"].shape == (5, 7)
    width = 6 if auxiliary else 3
    assert trace.nodes[guide.latent_name]["value"].shape == (5, 7, width)
    for estimator in ("iwae", "stl", "dreg"):
        assert math.isfinite(Trace_IWELBO(5, estimator=estimator).loss(mixed_model, guide, x))


def _flow_at_exact_posterior(auxiliary):
    model = LinearGaussian()
    x = model.sample(6)
    guide = AutoAmortizedRealNVP(
        model,
        encoder=WithZeroContext(exact_encoder(model), 3),
        context_dim=3,
        num_transforms=2,
        hidden_dims=(8,),
        auxiliary=auxiliary,
    )
    # Fresh, as built: the couplings start as the identity and r(v | x, z) as N(0, I),
    # the law of v0, so the auxiliary bound is the encoder's exact log q(z | x).
    guide(x)
    return model, guide, x


@pytest.mark.parametrize("auxiliary", [True, False])
@pytest.mark.parametrize("estimator", ["iwae", "stl", "dreg"])
def test_identity_flow_at_exact_posterior_gives_log_evidence(float64, auxiliary, estimator):
    model, guide, x = _flow_at_exact_posterior(auxiliary)
    expected = -model.log_evidence(x).sum().item()
    elbo = Trace_IWELBO(5, estimator=estimator)
    for _ in range(3):
        assert elbo.loss(model, guide, x) == pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize("auxiliary", [True, False])
def test_stl_and_dreg_gradients_vanish_at_exact_posterior_through_couplings(float64, auxiliary):
    model, guide, x = _flow_at_exact_posterior(auxiliary)
    params = list(guide.encoder.parameters()) + list(guide.flow.parameters())
    if auxiliary:
        params += list(guide.auxiliary_prior.parameters())
    for estimator in ("stl", "dreg"):
        elbo = Trace_IWELBO(5, estimator=estimator)
        for _ in range(3):
            loss = elbo.differentiable_loss(model, guide, x)
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            assert max(0.0 if g is None else g.abs().max().item() for g in grads) <= 1e-8
    loss = Trace_IWELBO(5).differentiable_loss(model, guide, x)
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    assert max(0.0 if g is None else g.abs().max().item() for g in grads) > 1e-3


def test_real_nvp_needs_two_dimensions():
    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    guide = AutoAmortizedRealNVP(model, auxiliary=False, hidden_dims=(4,))
    with pytest.raises(ValueError, match="at least 2 unconstrained local latent dimensions"):
        guide(torch.randn(3))


@pytest.mark.parametrize(
    "kwargs, match",
    [(dict(num_transforms=-1), "num_transforms"), (dict(auxiliary=1), "auxiliary")],
)
def test_flow_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AutoAmortizedRealNVP(gaussian_model, **kwargs)


# ------------------------------------------------------------ plates and the param store
def single_site_at_dim_minus_2(x):
    with pyro.plate("data", x.shape[0], dim=-2):
        z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([1, 2]).to_event(1))
        pyro.sample("x", dist.Normal(z, 1.0).to_event(1), obs=x.unsqueeze(-2))


def inner_plate(x):
    with pyro.plate("data", x.shape[0], dim=-2), pyro.plate("items", x.shape[1], dim=-1):
        u = pyro.sample("u", dist.Normal(0.0, 1.0))
        s = pyro.sample("s", dist.LogNormal(0.0, 1.0))
        pyro.sample("x", dist.Normal(u, s), obs=x)


FLOW_CLASSES = {
    "iaf": lambda model: AutoAmortizedIAF(model, hidden_dims=(8,), num_transforms=2),
    "auxiliary": lambda model: AutoAmortizedRealNVP(model, hidden_dims=(8,), num_transforms=2),
}


@pytest.mark.parametrize("kind", sorted(FLOW_CLASSES))
@pytest.mark.parametrize(
    "model, shapes",
    [(single_site_at_dim_minus_2, {"z": (1, 2)}), (inner_plate, {"u": (3,), "s": (3,)})],
    ids=["single-site", "inner-plate"],
)
def test_flow_guides_on_a_plate_at_dim_minus_2(kind, model, shapes):
    x = torch.randn(20, 3) if model is inner_plate else torch.randn(20, 2)
    guide = FLOW_CLASSES[kind](model)
    sample = guide(x)
    for name, shape in shapes.items():
        assert sample[name].shape == (20,) + shape
    if "s" in sample:
        assert (sample["s"] > 0).all()
    with pyro.plate("particles", 4, dim=-3):
        trace = poutine.trace(guide).get_trace(x)
    for name, shape in shapes.items():
        assert trace.nodes[name]["value"].shape == (4, 20) + shape
    elbo = pyro.infer.Trace_ELBO()
    assert math.isfinite(elbo.loss(model, guide, x))
    assert math.isfinite(Trace_IWELBO(3, max_plate_nesting=2).loss(model, guide, x))
    svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": 0.01}), elbo)
    assert math.isfinite(svi.step(x))


@pytest.mark.parametrize("kind", sorted(FLOW_GUIDES))
def test_param_store_save_and_load_restore_the_flow_and_train_it(float64, tmp_path, kind):
    # Pyro's recipe: pyro.get_param_store().save(path), then .load(path) in a new process
    make, width = FLOW_GUIDES[kind]
    x = torch.randn(5, 2)

    def train(guide, steps):
        svi = pyro.infer.SVI(mixed_model, guide, pyro.optim.Adam({"lr": 0.05}), Trace_IWELBO(2))
        for _ in range(steps):
            svi.step(x)

    guide = make()
    train(guide, 5)
    u = torch.randn(5, width)
    before = guide.joint_distribution(guide.encoder_output(x)).log_prob(u)
    pyro.get_param_store().save(tmp_path / "params.pt")
    pyro.clear_param_store()
    del guide

    pyro.get_param_store().load(tmp_path / "params.pt")
    fresh = make()
    fresh(x)  # the first call
    assert torch.equal(fresh.joint_distribution(fresh.encoder_output(x)).log_prob(u), before)
    loaded = {name: p.detach().clone() for name, p in fresh.named_parameters()}
    train(fresh, 20)
    changed = {name for name, p in fresh.named_parameters() if not torch.equal(loaded[name], p)}
    for prefix in ("encoder.", "flow."):  # every network trains
        assert any(name.startswith(prefix) for name in changed), (prefix, sorted(changed))
    store = set(map(id, pyro.get_param_store().values()))
    assert all(id(p) in store for p in fresh.parameters())


# ------------------------------------------------------------ deprecated names
def test_auto_amortized_flow_is_a_deprecated_name_of_real_nvp(float64):
    x = torch.randn(4, 3)
    with pytest.warns(FutureWarning, match="AutoAmortizedFlow is deprecated.*AutoAmortizedRealNVP"):
        old = AutoAmortizedFlow(gaussian_model, hidden_dims=(8,), num_transforms=3)
    assert isinstance(old, AutoAmortizedRealNVP) and old.family == "flow"
    assert old.num_transforms == 3 == old.num_flows
    with pytest.warns(FutureWarning, match="num_flows is deprecated.*num_transforms"):
        renamed = AutoAmortizedRealNVP(gaussian_model, hidden_dims=(8,), num_flows=3)
    assert renamed.num_transforms == 3
    new = AutoAmortizedRealNVP(gaussian_model, hidden_dims=(8,), num_transforms=3)
    for guide in (old, renamed, new):
        pyro.set_rng_seed(0)
        guide(x)
    assert len(old.flow) == len(renamed.flow) == len(new.flow) == 6  # (z, v) couplings


def test_get_posterior_is_deprecated_for_joint_distribution():
    x = torch.randn(4, 3)
    guide = AutoAmortizedIAF(gaussian_model, hidden_dims=(8,))
    with pytest.warns(FutureWarning, match="get_posterior\\(\\) is deprecated"):
        old = guide.get_posterior(x)
    new = guide.joint_distribution(guide.encoder_output(x))
    u = new.sample()
    assert torch.equal(old.log_prob(u), new.log_prob(u))


def test_auxiliary_flows_local_distribution_samples_z_and_has_no_density():
    x = torch.randn(4, 3)
    guide = AutoAmortizedRealNVP(gaussian_model, hidden_dims=(8,))
    q = guide.posterior(x)
    assert q.event_shape == (3,) and q.joint.event_shape == (6,)
    pyro.set_rng_seed(1)
    z = q.rsample((2,))
    pyro.set_rng_seed(1)
    assert torch.equal(z, q.joint.rsample((2,))[..., :3])
    with pytest.raises(NotImplementedError, match="no closed form"):
        q.log_prob(z)
