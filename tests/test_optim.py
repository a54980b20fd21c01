import copy

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoNormal
from torch import nn

from pyro_amortized.optim import Adam, AdamW, JointOptim, decaying_adam


def _regression():
    """A model with a pyro.module-registered nn.Linear, an AutoNormal guide and data."""
    net = nn.Linear(3, 1)

    def model(x, y):
        # update_module_params: after a param-store load the net computes with the loaded values
        pyro.module("net", net, update_module_params=True)
        w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([3]).to_event(1))
        scale = pyro.sample("scale", dist.LogNormal(0.0, 1.0))
        with pyro.plate("data", len(x)):
            pyro.sample("y", dist.Normal(net(x).squeeze(-1) + x @ w, scale), obs=y)

    x = torch.randn(20, 3)
    y = x.sum(-1) + 0.1 * torch.randn(20)
    return model, AutoNormal(model), (x, y)


def _params():
    return {k: v.detach().clone() for k, v in pyro.get_param_store().items()}


def _set_params(unconstrained):
    for name, value in unconstrained.items():
        pyro.param(name).unconstrained().data.copy_(value)


def _unconstrained_params():
    return {k: v.unconstrained().detach().clone() for k, v in pyro.get_param_store().items()}


def _train(optim, steps=50, setup=_regression):
    """Fresh param store and seed, then ``steps`` SVI steps; returns the final param values."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    model, guide, args = setup()
    svi = SVI(model, guide, optim, Trace_ELBO())
    for _ in range(steps):
        svi.step(*args)
    return _params()


def _assert_same(a, b, tol=1e-10):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=tol, msg=name)


# ------------------------------------------------------------------ same trajectory as PyroOptim
def test_matches_pyro_adam(float64):
    optim = JointOptim(torch.optim.Adam, {"lr": 0.01})
    joint = _train(optim)
    _assert_same(joint, _train(pyro.optim.Adam({"lr": 0.01})))
    assert len(joint) == 6  # net weight and bias, loc and scale of w and of scale
    assert [len(g["params"]) for g in optim.optimizer.param_groups] == [6]


@pytest.mark.parametrize(
    "joint, pyro_optim",
    [
        (
            Adam({"lr": 0.01, "betas": (0.8, 0.9)}),
            pyro.optim.Adam({"lr": 0.01, "betas": (0.8, 0.9)}),
        ),
        (AdamW({"lr": 0.01}), pyro.optim.AdamW({"lr": 0.01})),
        (JointOptim(torch.optim.SGD, {"lr": 0.01}), pyro.optim.SGD({"lr": 0.01})),
    ],
    ids=["Adam", "AdamW", "SGD"],
)
def test_matches_pyro_other_optimizers(float64, joint, pyro_optim):
    _assert_same(_train(joint), _train(pyro_optim))


def _lr_by_module(module_name, param_name):
    return {"lr": 0.05 if module_name == "net" else 0.01, "betas": (0.9, 0.99)}


def _lr_by_name(name):
    return {"lr": 0.05 if name.startswith("net.") else 0.01}


@pytest.mark.parametrize("optim_args", [_lr_by_module, _lr_by_name], ids=["2 args", "1 arg"])
def test_callable_optim_args(float64, optim_args):
    optim = JointOptim(torch.optim.Adam, optim_args)
    joint = _train(optim)
    _assert_same(joint, _train(pyro.optim.Adam(optim_args)))
    lrs = sorted((g["lr"], len(g["params"])) for g in optim.optimizer.param_groups)
    assert lrs == [(0.01, 4), (0.05, 2)]


@pytest.mark.parametrize("clip_args", [{"clip_norm": 0.5}, {"clip_value": 0.1}])
def test_clip_args(float64, clip_args):
    # SGD, not Adam: Adam is nearly invariant to the scale of the gradient
    joint = _train(JointOptim(torch.optim.SGD, {"lr": 0.01}, clip_args))
    _assert_same(joint, _train(pyro.optim.SGD({"lr": 0.01}, clip_args)))
    unclipped = _train(JointOptim(torch.optim.SGD, {"lr": 0.01}))
    assert not torch.allclose(joint["net$$$weight"], unclipped["net$$$weight"])


# ------------------------------------------------------------------ parameters absent from a step
def _alternating():
    """Param "b" is only used on odd steps; the step number is the model's argument."""

    def model(step):
        pyro.sample("z", dist.Normal(1.0, 1.0))

    def guide(step):
        loc = pyro.param("a", torch.tensor(0.0))
        if step % 2:
            loc = loc + pyro.param("b", torch.tensor(0.5))
        pyro.sample("z", dist.Normal(loc, 1.0))

    return model, guide


def _train_alternating(optim, steps=20):
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    model, guide = _alternating()
    svi = SVI(model, guide, optim, Trace_ELBO())
    b = []
    for step in range(1, steps + 1):
        svi.step(step)
        b.append(pyro.param("b").detach().clone())
        if isinstance(optim, JointOptim):  # stepped gradients are cleared to None, as torch does
            assert all(p.grad is None for p in pyro.get_param_store().values())
    return b, _params()


@pytest.mark.parametrize(
    "optim_constructor", [torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD]
)
def test_absent_param_does_not_move(float64, optim_constructor):
    args = {"lr": 0.1, "momentum": 0.9} if optim_constructor is torch.optim.SGD else {"lr": 0.1}
    b, joint = _train_alternating(JointOptim(optim_constructor, args))
    for i in range(1, len(b), 2):  # b[i] is after step i + 1, which is even: "b" absent
        assert torch.equal(b[i], b[i - 1])
    assert not torch.equal(b[2], b[1])
    b_pyro, pyro_params = _train_alternating(pyro.optim.PyroOptim(optim_constructor, args))
    _assert_same(joint, pyro_params)
    torch.testing.assert_close(b, b_pyro, rtol=0, atol=1e-10)


# ------------------------------------------------------------------ state
def _continue(optim, svi_args, steps=10):
    pyro.set_rng_seed(1)
    model, guide, args = svi_args
    svi = SVI(model, guide, optim, Trace_ELBO())
    for _ in range(steps):
        svi.step(*args)
    return _params()


@pytest.mark.parametrize("optim_args", [{"lr": 0.02}, _lr_by_module], ids=["dict", "callable"])
def test_save_load_round_trip(float64, tmp_path, optim_args):
    pyro.set_rng_seed(0)
    model, guide, args = _regression()
    optim = JointOptim(torch.optim.Adam, optim_args)
    _continue(optim, (model, guide, args))
    optim.save(tmp_path / "optim.pt")
    pyro.get_param_store().save(tmp_path / "params.pt")
    a = _continue(optim, (model, guide, args))

    pyro.clear_param_store()
    model, guide, _ = _regression()  # fresh net and guide, random initial values
    guide(*args)  # its setup samples from the model: not after the seed of _continue
    pyro.get_param_store().load(tmp_path / "params.pt")
    optim = JointOptim(torch.optim.Adam, optim_args)
    optim.load(tmp_path / "optim.pt")
    b = _continue(optim, (model, guide, args))
    _assert_same(a, b, tol=0)


def test_state_is_interchangeable_with_pyro_optim(float64):
    """Either optimizer's state, loaded into the other, continues like the original."""
    pyro.set_rng_seed(0)
    svi_args = _regression()
    svi_args[1](*svi_args[2])  # creates the guide's and the net's params
    start = _unconstrained_params()
    for first, second in [
        (pyro.optim.Adam({"lr": 0.02}), Adam({"lr": 0.02})),
        (Adam({"lr": 0.02}), pyro.optim.Adam({"lr": 0.02})),
    ]:
        _set_params(start)  # same starting point for both directions
        _continue(first, svi_args)
        middle = _unconstrained_params()
        # PyroOptim.get_state() hands out its live buffers, which `first` goes on updating
        second.set_state(copy.deepcopy(first.get_state()))
        a = _continue(first, svi_args)
        _set_params(middle)
        b = _continue(second, svi_args)
        _assert_same(a, b)


def test_get_state_keeps_pending_state_and_copies(float64, tmp_path):
    pyro.set_rng_seed(0)
    svi_args = _regression()
    optim = Adam({"lr": 0.02})
    _continue(optim, svi_args, steps=3)
    state = optim.get_state()
    assert state["net$$$bias"]["state"][0]["step"].item() == 3
    assert state["net$$$bias"]["param_groups"][0]["lr"] == 0.02
    _continue(optim, svi_args, steps=1)
    assert state["net$$$bias"]["state"][0]["step"].item() == 3  # a copy, not the live state
    fresh = Adam({"lr": 0.02})
    fresh.set_state(state)
    assert fresh.get_state().keys() == state.keys()  # not lost before the first step


# ------------------------------------------------------------------ errors
@pytest.mark.parametrize(
    "scheduler", [torch.optim.lr_scheduler.StepLR, torch.optim.lr_scheduler.ReduceLROnPlateau]
)
def test_scheduler_is_refused(scheduler):
    with pytest.raises(ValueError, match="use pyro.optim.PyroLRScheduler"):
        JointOptim(scheduler, {"optimizer": torch.optim.Adam, "optim_args": {"lr": 0.1}})


def test_constructor_must_build_an_optimizer():
    optim = JointOptim(lambda params, **kwargs: object(), {})
    with pytest.raises(ValueError, match="must build a torch.optim.Optimizer"):
        optim([pyro.param("a", torch.tensor(0.0))])


@pytest.mark.parametrize("bad", [None, 0.01, [("lr", 0.01)]])
def test_bad_optim_args(bad):
    with pytest.raises(ValueError, match="optim_args must be a dict or a callable"):
        JointOptim(torch.optim.Adam, bad)


def test_bad_clip_args():
    with pytest.raises(ValueError, match="clip_args must be None, a dict or a callable"):
        JointOptim(torch.optim.Adam, {"lr": 0.01}, clip_args=0.5)


def test_decaying_adam_reaches_final_lr_after_its_steps():
    param = torch.nn.Parameter(torch.zeros(3))
    optim = decaying_adam(0.1, final_lr=0.001, steps=50)
    for _ in range(50):
        param.grad = torch.ones(3)
        optim([param])
    (torch_optim,) = optim.optim_objs.values()
    assert torch_optim.param_groups[0]["lr"] == pytest.approx(0.001, rel=1e-10)
    with pytest.raises(ValueError, match="final_lr <= lr"):
        decaying_adam(0.01, final_lr=0.1, steps=10)
    with pytest.raises(ValueError, match="steps >= 1"):
        decaying_adam(0.01, final_lr=0.001, steps=0)
    with pytest.raises(ValueError, match="steps >= 1, got True"):
        decaying_adam(0.01, final_lr=0.001, steps=True)
    with pytest.raises(ValueError, match=r"decaying_adam: lr must be > 0 \(a finite number\)"):
        decaying_adam(float("nan"), final_lr=0.001, steps=10)
    with pytest.raises(ValueError, match=r"decaying_adam: final_lr must be > 0"):
        decaying_adam(0.01, final_lr=0.0, steps=10)
