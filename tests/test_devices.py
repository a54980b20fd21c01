"""Devices: the data's device decides, and nothing is made on a default device behind the
user's back.

**How the CPU tests see a tensor made on the wrong device.** With CPU data, the block runs
with the default device set to ``meta`` (``with torch.device("meta")``, which sets it for
torch's factory functions: ``torch.zeros``, ``torch.tensor``, ``nn.Linear``'s weights, ...)
under :class:`_Probe`, a torch function mode that sees each factory call before the default
device is filled in. A call that names no device and comes from this package's code lands
on ``meta`` and is recorded: a meta tensor has no data, so the computation also fails or
returns meta tensors, as it would return CUDA tensors for CPU data under
``torch.set_default_device("cuda")``. A call that comes from Pyro's or torch's own code is
their behaviour, not this package's: the probe sends it to the CPU, so only our code is
tested, and records it apart. (Pyro's ``pyro.plate`` without ``device=`` makes its indices
on the default device, so a model's plate, or the plates of the ``AutoNormal`` that guides
the global sites, follow the default device, not the data.) The test models give their
plates ``device=x.device`` and make their tensors from ``x``, as a model that runs on any
device does in Pyro, and keep their global site outside every plate.

The GPU tests move a trained guide between devices and train with ``fit(device="cuda")``;
they are skipped where torch sees no CUDA device.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from pathlib import Path

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO
from torch.overrides import TorchFunctionMode

import pyro_amortized
from pyro_amortized import (
    AutoAmortizedIAF,
    AutoAmortizedNormal,
    AutoAmortizedRealNVP,
    MLPEncoder,
    SemiAmortizedGuide,
    Trace_IWELBO,
    Validation,
    active_units,
    fit,
    inference_gaps,
    log_marginal_likelihood,
    optimize_local,
    per_datapoint_elbo,
    refine,
)
from pyro_amortized.devices import data_device, fork_rng
from pyro_amortized.optim import Adam

GUIDES = [AutoAmortizedNormal, AutoAmortizedIAF, AutoAmortizedRealNVP]
NEEDS_CUDA = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device; none on this machine"
)

_TORCH = str(Path(torch.__file__).parent) + os.sep
_TORCH_OPTIM = _TORCH + "optim" + os.sep
_PYRO = str(Path(pyro.__file__).parent) + os.sep
_OURS = str(Path(pyro_amortized.__file__).parent) + os.sep
# torch's functions that make a tensor on the default device when given no device
_FACTORIES = {
    torch.arange,
    torch.as_tensor,
    torch.asarray,
    torch.empty,
    torch.empty_strided,
    torch.eye,
    torch.full,
    torch.linspace,
    torch.logspace,
    torch.ones,
    torch.rand,
    torch.randint,
    torch.randn,
    torch.randperm,
    torch.scalar_tensor,
    torch.tensor,
    torch.tril_indices,
    torch.triu_indices,
    torch.zeros,
}


def _caller() -> tuple[str, str]:
    """Whose code made the call: ``("ours", where)`` when the nearest frame outside torch's
    modules (``nn.Linear``'s constructor, say) and Pyro's is this package's; ``("torch",
    where)`` for torch's optimizers, ``("other", where)`` for the rest (a test's own
    line, Pyro's code called from a test)."""
    frame = sys._getframe(2)
    while frame is not None:
        path = frame.f_code.co_filename
        where = f"{os.path.basename(path)}:{frame.f_lineno} ({frame.f_code.co_name})"
        if path.startswith(_OURS):
            return "ours", where
        if path.startswith(_TORCH_OPTIM):
            return "torch", where
        if not path.startswith((_TORCH, _PYRO)):
            return "other", where
        frame = frame.f_back
    return "other", "?"


class _Probe(TorchFunctionMode):
    """Records the factory calls that name no device while the default device is ``meta``:
    ours in ``ours`` (they land on ``meta``), torch's and Pyro's in ``theirs`` (sent to the
    CPU). A call under a ``with torch.device(...)`` of our code's own is on that device."""

    def __init__(self):
        super().__init__()
        self.ours: list[str] = []
        self.theirs: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if (
            func in _FACTORIES
            and kwargs.get("device") is None
            and torch.get_default_device().type == "meta"
        ):
            who, where = _caller()
            if who == "ours":
                self.ours.append(f"torch.{func.__name__} at {where}")
            else:
                self.theirs.append(f"{who}: torch.{func.__name__} at {where}")
                kwargs["device"] = "cpu"
        return func(*args, **kwargs)


@contextmanager
def default_device_elsewhere():
    """The block with the default device ``meta``; fails if our code made a tensor there."""
    probe = _Probe()
    try:
        with torch.device("meta"), probe:
            yield probe
    except Exception as error:
        if probe.ours:  # the likely cause of the error
            raise AssertionError(_report(probe)) from error
        raise
    assert probe.ours == [], _report(probe)


def _report(probe: _Probe) -> str:
    return "made on the default device:\n" + "\n".join(sorted(set(probe.ours)))


def model(x, idx=None):
    """A global shift, a 2-d local latent per row: written to run on x's device."""
    shift = pyro.sample("shift", dist.Normal(x.new_zeros(()), 1.0))
    with pyro.plate("data", x.shape[0], subsample=idx, device=x.device) as ind:
        z = pyro.sample("z", dist.Normal(x.new_zeros(2), 1.0).to_event(1))
        pyro.sample("x", dist.Normal(z + shift, 1.0).to_event(1), obs=x.index_select(0, ind))


def local_model(x, idx=None):
    """The same without the global shift (inference_gaps needs local latents only)."""
    with pyro.plate("data", x.shape[0], subsample=idx, device=x.device) as ind:
        z = pyro.sample("z", dist.Normal(x.new_zeros(2), 1.0).to_event(1))
        pyro.sample("x", dist.Normal(z, 1.0).to_event(1), obs=x.index_select(0, ind))


def data(rows=12, device="cpu"):
    return torch.randn(rows, 2, generator=torch.Generator().manual_seed(0)).to(device)


def build(cls, which=model):
    options = {"hidden_dims": (4,)}
    if cls is not AutoAmortizedNormal:
        options["num_transforms"] = 1
    return cls(which, **options)


def on(device, *tensors):
    return all(t.device == torch.device(device) for t in tensors)


# ------------------------------------------------------------------ the probe
def test_the_probe_sees_a_module_built_on_the_default_device():
    # as torch does: a network built without a device under a default device is put there;
    # called from the package's code, the probe records it (and it would fail a test)
    probe = _Probe()
    with torch.device("meta"), probe:
        encoder = MLPEncoder(2, 2, hidden_dims=(3,))
        made_by_a_test = torch.zeros(2)
    assert encoder.head.weight.is_meta
    assert any("encoders.py" in call for call in probe.ours)
    assert not made_by_a_test.is_meta and any("test_devices.py" in c for c in probe.theirs)


# ------------------------------------------------------------- CPU, default elsewhere
@pytest.mark.parametrize("cls", GUIDES, ids=lambda c: c.__name__)
@pytest.mark.parametrize(
    "loss",
    [
        Trace_ELBO,
        lambda: Trace_IWELBO(3),
        lambda: Trace_IWELBO(3, estimator="stl"),
        lambda: Trace_IWELBO(3, estimator="dreg"),
    ],
    ids=["Trace_ELBO", "iwae", "stl", "dreg"],
)
def test_setup_and_svi_steps_make_nothing_on_the_default_device(cls, loss):
    x = data()
    guide = build(cls)
    with default_device_elsewhere():
        guide.setup(x)
        svi = SVI(model, guide, Adam({"lr": 0.01}), loss())
        losses = [svi.step(x, torch.arange(4, device=x.device)) for _ in range(2)]
        posterior = guide.posterior(x)
        draws = posterior.sample()
        median = guide.median(x)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert on("cpu", draws, *median.values(), *(p for p in guide.parameters()))
    assert all(not p.is_meta for p in pyro.get_param_store().values())


def test_fit_makes_nothing_on_the_default_device(tmp_path):
    x, valid = data(), data(6)
    guide = build(AutoAmortizedNormal)
    with default_device_elsewhere():
        history = fit(
            model,
            guide,
            Trace_IWELBO(2),
            x,
            epochs=1,
            batch_size=5,
            optimizer=Adam({"lr": 0.01}),
            validation=Validation(valid, batch_size=4),
            checkpoint=tmp_path / "run.pt",
            resample=lambda t, g: t + 0.01 * torch.randn(t.shape, generator=g, device=t.device),
            progress=False,
        )
    assert history.epochs == 1 and history.valid_bound[0] is not None
    assert all(map(torch.isfinite, torch.tensor(history.step_losses)))


@pytest.mark.parametrize("cls", GUIDES, ids=lambda c: c.__name__)
def test_refinement_makes_nothing_on_the_default_device(cls):
    x = data(6)
    guide = build(cls)
    guide.setup(x)
    with default_device_elsewhere():
        refined = refine(model, guide, x, num_steps=2)
        semi = SemiAmortizedGuide(guide, num_steps=2, mode="savi")
        svi = SVI(model, semi, Adam({"lr": 0.01}), Trace_IWELBO(2))
        value = svi.step(x)
    assert on("cpu", refined.bounds) and torch.isfinite(refined.bounds).all()
    assert torch.isfinite(torch.tensor(value))


@pytest.mark.parametrize("cls", GUIDES, ids=lambda c: c.__name__)
def test_diagnostics_make_nothing_on_the_default_device(cls):
    x = data(6)
    guide = build(cls)
    guide.setup(x)
    with default_device_elsewhere():
        log_px = log_marginal_likelihood(
            model, guide, x, num_samples=6, chunk_size=4, batch_size=4, progress=False
        )
        elbo = per_datapoint_elbo(model, guide, x, num_samples=4)
        units = active_units(guide, x, num_samples=4)
        fitted = optimize_local(model, guide, x, max_steps=3, patience=2, progress=False)
    assert on("cpu", log_px, elbo, units.activity) and log_px.shape == elbo.shape == (6,)
    assert torch.isfinite(log_px).all() and torch.isfinite(elbo).all()
    assert fitted.steps.device.type == "cpu"


@pytest.mark.parametrize("cls", GUIDES[:2], ids=lambda c: c.__name__)
def test_elbo_surgery_makes_nothing_on_the_default_device(cls):
    x = data(8)
    guide = build(cls)
    guide.setup(x)
    with default_device_elsewhere():
        exact = pyro_amortized.elbo_surgery(model, guide, x, num_samples=2)
        stratified = pyro_amortized.elbo_surgery(model, guide, x, num_samples=2, batch_size=4)
    for report in (exact, stratified):
        assert report.average_kl.value == pytest.approx(
            report.mutual_information.value + report.marginal_kl.value, abs=1e-5
        )


def test_inference_gaps_make_nothing_on_the_default_device():
    x = data(4)
    guide = build(AutoAmortizedNormal, local_model)
    guide.setup(x)
    with default_device_elsewhere():
        gaps = inference_gaps(
            local_model,
            guide,
            x,
            families=("normal", "flow"),
            num_samples=4,
            elbo_samples=4,
            local_options={"max_steps": 2, "patience": 1},
            refine_steps=(1,),
            progress=False,
        )
    assert all(isinstance(value, float) for _, value in gaps.rows())


def test_a_float64_guide_builds_its_networks_in_the_datas_dtype():
    x = data().double()
    for cls in GUIDES:
        guide = build(cls)
        with default_device_elsewhere():
            guide.setup(x)
        assert {p.dtype for p in guide.parameters()} == {torch.float64}


# ---------------------------------------------------------------------- GPU
def _trained(cls):
    x = data(20)
    guide = build(cls)
    fit(
        model,
        guide,
        Trace_IWELBO(2),
        x,
        epochs=2,
        batch_size=8,
        optimizer=Adam({"lr": 0.01}),
        progress=False,
    )
    return guide, x


@NEEDS_CUDA
@pytest.mark.parametrize("cls", GUIDES, ids=lambda c: c.__name__)
def test_a_trained_guide_moves_to_the_gpu_and_back_with_the_same_posterior(cls):
    guide, x = _trained(cls)
    with torch.no_grad():
        before = guide.encoder_output(x)
        bound = per_datapoint_elbo(model, guide, x, num_samples=2000)
    guide.to("cuda")
    xc = x.to("cuda")
    with torch.no_grad():
        on_gpu = guide.encoder_output(xc)
        gpu_bound = per_datapoint_elbo(model, guide, xc, num_samples=2000)
        draws = guide.posterior(xc).sample()
    assert on("cuda:0", draws, *on_gpu, *guide.parameters(), gpu_bound)
    for a, b in zip(before, on_gpu, strict=True):
        torch.testing.assert_close(b.cpu(), a, rtol=1e-5, atol=1e-5)
    # Monte Carlo bounds of 2000 draws each: their standard error is far below 0.1 nats
    torch.testing.assert_close(gpu_bound.cpu(), bound, rtol=0, atol=0.1)
    guide.to("cpu")
    after = guide.encoder_output(x)
    for a, b in zip(before, after, strict=True):
        torch.testing.assert_close(b.detach(), a, rtol=1e-5, atol=1e-5)


@NEEDS_CUDA
def test_fit_on_the_gpu_moves_the_data_model_and_guide():
    x, valid = data(20), data(6)
    guide = build(AutoAmortizedRealNVP)
    history = fit(
        model,
        guide,
        Trace_IWELBO(2),
        x,
        epochs=2,
        batch_size=8,
        optimizer=Adam({"lr": 0.01}),
        validation=Validation(valid),
        device="cuda",
        progress=False,
    )
    assert history.epochs == 2 and all(b is not None for b in history.valid_bound)
    assert on("cuda:0", *guide.parameters())
    assert x.device.type == "cpu"  # the caller's tensor is left where it was


# ---------------------------------------------------------------- the helpers
def test_data_device_is_the_first_tensor_arguments():
    meta = torch.empty(1, device="meta")
    assert data_device((3, meta, torch.zeros(1))) == torch.device("meta")
    assert data_device((3,), {"x": meta}) == torch.device("meta")
    assert data_device((3, "a"), {"n": 2}) is None


def test_fork_rng_leaves_the_global_stream_as_it_was():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    with fork_rng((torch.zeros(2),)):
        inside = torch.rand(3)
    assert torch.equal(inside, expected)  # the fork starts from the global state
    assert torch.equal(torch.rand(3), expected)  # which it leaves untouched
