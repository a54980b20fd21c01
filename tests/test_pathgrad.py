import copy

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.distributions import transforms as T
from pyro.nn import ConditionalAutoRegressiveNN, ConditionalDenseNN

from pyro_amortized import AutoAmortizedIAF, AutoAmortizedRealNVP, EncoderOutput, Trace_IWELBO
from pyro_amortized.pathgrad import StoppedFlow, flow_path_sweeps, stop_distribution

D, CONTEXT, ROWS = 5, 3, 4


def _randomize(modules, scale):
    with torch.no_grad():
        for module in modules:
            for p in module.parameters():
                p.normal_(0.0, scale)


def _iaf(stable=False, steps=2, scale=0.5, **network):
    modules = [
        T.ConditionalAffineAutoregressive(
            ConditionalAutoRegressiveNN(
                D, CONTEXT, [8, 8], permutation=torch.randperm(D, generator=_gen(t)), **network
            ),
            stable=stable,
        )
        for t in range(steps)
    ]
    _randomize(modules, scale)
    return modules, lambda h: [m.condition(h) for m in modules]


def _coupling(scale=0.5):
    modules = [
        T.ConditionalAffineCoupling(2, ConditionalDenseNN(2, CONTEXT, [8], [D - 2, D - 2]))
        for _ in range(2)
    ]
    _randomize(modules, scale)
    flip = T.Permute(torch.arange(D - 1, -1, -1))
    return modules, lambda h: [t for m in modules for t in (m.condition(h), flip)]


def _gen(seed):
    return torch.Generator().manual_seed(seed)


FLOWS = {
    "iaf": lambda: _iaf(),
    "iaf-stable": lambda: _iaf(stable=True),
    "iaf-strong": lambda: _iaf(steps=1, scale=1.5),
    # not Pyro's default MADE: its products go through autograd
    "iaf-tanh": lambda: _iaf(nonlinearity=torch.nn.Tanh(), skip_connections=True),
    "iaf-tanh-stable": lambda: _iaf(stable=True, nonlinearity=torch.nn.Tanh()),
    "coupling": _coupling,
}


def _flow(name):
    """A random conditional flow, its parameters, and q(. | h) for a parameter-tracking h."""
    modules, build = FLOWS[name]()
    loc = torch.randn(ROWS, D, requires_grad=True)
    log_scale = (0.3 * torch.randn(ROWS, D)).requires_grad_()
    h = torch.randn(ROWS, CONTEXT, requires_grad=True)
    params = [loc, log_scale, h] + [p for m in modules for p in m.parameters()]

    def q(loc=loc, log_scale=log_scale, h=h, build=build):
        return dist.TransformedDistribution(dist.Normal(loc, log_scale.exp()).to_event(1), build(h))

    return q, params, modules


def _reference(name, params, modules, z, dtype=torch.float64):
    """log q at a fresh copy of ``z`` (no cache, so the flow is inverted), every parameter
    frozen in a deep copy, in ``dtype``; returns (log q, the copy of z)."""
    frozen = copy.deepcopy(modules)
    for m in frozen:
        m.to(dtype).requires_grad_(False)
    loc, log_scale, h = (p.detach().to(dtype) for p in params[:3])
    if name == "coupling":
        flip = T.Permute(torch.arange(D - 1, -1, -1))
        steps = [t for m in frozen for t in (m.condition(h), flip)]
    else:
        steps = [m.condition(h) for m in frozen]
    base = dist.Normal(loc, log_scale.exp()).to_event(1)
    z_ref = z.detach().to(dtype).requires_grad_()
    return dist.TransformedDistribution(base, steps).log_prob(z_ref), z_ref


@pytest.mark.parametrize("name", sorted(FLOWS))
@pytest.mark.parametrize("K", [(), (3,)])
def test_path_gradient_equals_the_inverse_based_one(float64, name, K):
    torch.manual_seed(0)
    q, params, modules = _flow(name)
    flow = q()
    z = flow.rsample(K)
    stopped = stop_distribution(flow, "z")
    assert isinstance(stopped, StoppedFlow)
    ours = stopped.log_prob(z)
    reference, z_ref = _reference(name, params, modules, z)
    assert torch.allclose(ours, reference, rtol=1e-12, atol=1e-12)
    # the gradient w.r.t. the sample, and through it w.r.t. every parameter
    (g_ours,) = torch.autograd.grad(ours.sum(), z, retain_graph=True)
    (g_ref,) = torch.autograd.grad(reference.sum(), z_ref)
    assert g_ours.abs().max() > 1e-3
    assert torch.allclose(g_ours, g_ref, rtol=1e-10, atol=1e-12)
    path_ours = torch.autograd.grad(ours.sum(), params, retain_graph=True)
    path_ref = torch.autograd.grad((g_ref * z).sum(), params)
    for a, b in zip(path_ours, path_ref, strict=True):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-10 * b.abs().max().item())


def test_path_gradient_is_exact_to_float32_precision():
    torch.manual_seed(1)
    q, params, modules = _flow("iaf")
    flow = q()
    z = flow.rsample((3,))
    ours = stop_distribution(flow, "z").log_prob(z)
    (g_ours,) = torch.autograd.grad(ours.sum(), z)
    ref, z64 = _reference("iaf", params, modules, z)
    (g_ref,) = torch.autograd.grad(ref.sum(), z64)
    # float32 sweeps against float64 back-substitution: a few float32 roundings per entry
    eps = torch.finfo(torch.float32).eps
    scale = g_ref.abs().amax(-1, keepdim=True)
    assert ((g_ours.double() - g_ref).abs() <= 100 * eps * scale).all()


def test_sweeps_stop_early_and_never_pass_the_dimension(float64):
    torch.manual_seed(0)
    for name, most in (("iaf", D), ("iaf-strong", D), ("coupling", 0)):
        q = _flow(name)[0]
        flow = q()
        z = flow.rsample((2,))
        sweeps = flow_path_sweeps(flow, z)
        assert len(sweeps) == len(flow.transforms)
        assert all(0 <= n <= most for n in sweeps)
        if most:
            assert all(n >= 1 for n in sweeps)
    # a flow near the identity settles in a sweep or two
    q = _flow("iaf")[0]
    flow = q()
    flow.transforms[0].arn.func.layers[-1].weight.data.mul_(1e-9)
    assert flow_path_sweeps(flow, flow.rsample())[0] <= 2


def test_other_values_are_evaluated_by_inversion(float64):
    torch.manual_seed(0)
    q, params, _ = _flow("iaf")
    flow = q()
    z = flow.rsample()
    stopped = stop_distribution(flow, "z")
    other = (z + 0.1).detach().requires_grad_()
    value = stopped.log_prob(other)
    assert torch.allclose(value, flow.log_prob(other.detach()), rtol=1e-12)
    (g,) = torch.autograd.grad(value.sum(), other)
    assert g.abs().max() > 0
    # without a path to the sample, nothing depends on a parameter
    assert not stopped.log_prob(z.detach()).requires_grad
    with pytest.raises(ValueError, match="not the flow's last sample"):
        flow_path_sweeps(flow, other)


def test_without_gradients_only_the_value_is_computed(float64):
    torch.manual_seed(0)
    q = _flow("iaf")[0]
    flow = q()
    z = flow.rsample((2,))
    with torch.no_grad():
        value = stop_distribution(flow, "z").log_prob(z)
    assert not value.requires_grad
    assert torch.allclose(value, flow.log_prob(z).detach(), rtol=1e-12)


def _frozen_target_model(guide_holder, N):
    """A model whose posterior is exactly the guide's q(z | x): its prior is a frozen copy
    of the guide's flow at x, and x does not depend on z."""
    state = {"prior": dist.Normal(0.0, 1.0).expand([N, D]).to_event(1)}

    def model(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", state["prior"])
            pyro.sample("x", dist.Normal(0.0, 1.0).expand([x.shape[1]]).to_event(1), obs=x)

    return model, state


@pytest.mark.parametrize(
    "Guide, options", [(AutoAmortizedIAF, {}), (AutoAmortizedRealNVP, {"auxiliary": False})]
)
@pytest.mark.parametrize("K", [1, 5])
def test_stl_and_dreg_vanish_at_an_exact_posterior_that_is_a_random_flow(
    float64, Guide, options, K
):
    pyro.clear_param_store()
    torch.manual_seed(0)
    N = 4
    x = torch.randn(N, 2)
    model, state = _frozen_target_model(None, N)
    guide = Guide(model, hidden_dims=(8,), num_transforms=2, **options)
    guide(x)
    with torch.no_grad():
        for p in guide.flow.parameters():
            p.normal_(0.0, 0.4)
    # a frozen copy of the flow at the encoder's output for x (the copy never registers
    # its networks in the param store, which would hand them to the live guide)
    frozen = copy.deepcopy(guide)
    for p in frozen.parameters():
        p.requires_grad_(False)
    output = EncoderOutput(*(t.detach() for t in guide.encoder_output(x)))
    state["prior"] = frozen.joint_distribution(output)
    params = [p for p in guide.parameters() if p.requires_grad]
    for estimator in ("stl", "dreg"):
        loss = Trace_IWELBO(K, estimator=estimator).differentiable_loss(model, guide, x)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        largest = max(g.abs().max().item() for g in grads if g is not None)
        assert largest <= 1e-9, (estimator, largest)
    loss = Trace_IWELBO(K).differentiable_loss(model, guide, x)
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    assert max(g.abs().max().item() for g in grads if g is not None) > 1e-3


def test_a_compiled_bound_refuses_a_stopped_flow():
    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([3]).to_event(1))
            pyro.sample("x", dist.Normal(z, 0.5).to_event(1), obs=x)

    x = torch.randn(6, 3)
    guide = AutoAmortizedIAF(model, hidden_dims=(8,), num_transforms=2)
    guide(x)
    with pytest.raises(ValueError, match="jit=True cannot take estimator='stl' or 'dreg'"):
        Trace_IWELBO(2, estimator="stl", jit=True).differentiable_loss(model, guide, x)
    # IWAE needs no stopped density, and compiles
    elbo = Trace_IWELBO(2, jit=True)
    elbo.differentiable_loss(model, guide, x)
    assert elbo.compilations == 1
