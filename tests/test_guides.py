import math
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pyro
import pyro.distributions as dist
import pytest
import saved_guide_job
import torch
from linear_gaussian import LinearGaussian, exact_encoder
from pyro import poutine
from pyro.infer import (
    SVI,
    Predictive,
    Trace_ELBO,
    TraceEnum_ELBO,
    TraceMeanField_ELBO,
    config_enumerate,
)
from pyro.infer.autoguide import AutoNormal
from torch import nn

from pyro_amortized import (
    AutoAmortizedIAF,
    AutoAmortizedNormal,
    AutoAmortizedRealNVP,
    MLPEncoder,
    Trace_IWELBO,
)
from pyro_amortized.flows import QUANTILE_SAMPLES


def hierarchical(x, idx=None, subsample_size=None):
    """A global mean, a 2-d local latent and a positive local scale per datapoint."""
    mu = pyro.sample("mu", dist.Normal(0.0, 3.0))
    with pyro.plate("data", 20, subsample=idx, subsample_size=subsample_size) as ind:
        z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
        s = pyro.sample("s", dist.LogNormal(0.0, 0.5))
        rows = x if x.shape[0] == len(ind) else x[ind]
        loc = mu.unsqueeze(-1) + z.sum(-1, keepdim=True)
        pyro.sample("x", dist.Normal(loc, s.unsqueeze(-1)).to_event(1), obs=rows)


class Recorder(nn.Module):
    """A user encoder that remembers the last context it saw."""

    def __init__(self, in_dim, out_dim):
        super().__init__()
        self.linear = nn.Linear(in_dim, 2 * out_dim)
        self.seen = None

    def forward(self, context):
        self.seen = context
        loc, raw = self.linear(context).chunk(2, -1)
        return loc, nn.functional.softplus(raw)


@pytest.fixture
def x():
    return torch.randn(20, 3)


# --------------------------------------------------------------- site discovery
def test_splits_local_and_global_sites(x):
    guide = AutoAmortizedNormal(hierarchical, hidden_dims=(8,))
    sample = guide(x)
    assert list(guide.local_sites) == ["z", "s"]
    assert isinstance(guide.global_guide, AutoNormal)
    assert sample["mu"].shape == ()
    assert sample["z"].shape == (20, 2)
    assert sample["s"].shape == (20,) and (sample["s"] > 0).all()
    assert guide.encoder.output_dim == 3  # z (2) + s (1)


def test_no_global_sites_means_no_global_guide():
    model = LinearGaussian()
    guide = AutoAmortizedNormal(model, hidden_dims=(4,))
    guide(model.sample(5))
    assert guide.global_guide is None


def test_nested_plate_inside_local_plate():
    def model(x):
        with pyro.plate("data", x.shape[0], dim=-2), pyro.plate("items", x.shape[1], dim=-1):
            u = pyro.sample("u", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(u, 1.0), obs=x)

    x = torch.randn(6, 4)
    guide = AutoAmortizedNormal(model, hidden_dims=(8,))
    assert guide(x)["u"].shape == (6, 4)
    loss = Trace_IWELBO(3).loss(model, guide, x)
    assert math.isfinite(loss)


def test_local_plate_on_the_right_of_a_nested_plate():
    def model(x):
        with pyro.plate("data", x.shape[1], dim=-1), pyro.plate("items", x.shape[0], dim=-2):
            u = pyro.sample("u", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(u, 1.0), obs=x)

    x = torch.randn(4, 6)  # items x data

    def context(x):
        return x.T

    guide = AutoAmortizedNormal(model, context=context, hidden_dims=(8,))
    assert guide(x)["u"].shape == (4, 6)
    medians = guide.median(x)["u"]
    loc, _ = guide.encoder(x.T)
    assert torch.allclose(medians, loc.T)


# ---------------------------------------------------------------------- context
def test_context_default_is_first_tensor_argument():
    model = LinearGaussian()
    x = model.sample(5)
    encoder = Recorder(3, 2)
    AutoAmortizedNormal(model, encoder=encoder)(x)
    assert encoder.seen is x


@pytest.mark.parametrize("how", ["index", "name", "name-as-keyword", "callable"])
def test_context_choices(how):
    def model(labels, x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
            pyro.sample("x", dist.Normal(z.sum(-1, keepdim=True), 1.0).to_event(1), obs=x)

    labels, x = torch.arange(5), torch.randn(5, 1)
    context = {"index": 1, "name": "x", "name-as-keyword": "x", "callable": lambda labels, x: 2 * x}
    encoder = Recorder(1, 2)
    guide = AutoAmortizedNormal(model, encoder=encoder, context=context[how])
    if how == "name-as-keyword":
        guide(labels, x=x)
    else:
        guide(labels, x)
    expected = 2 * x if how == "callable" else x
    assert torch.equal(encoder.seen, expected)


def test_subsample_size_picks_context_rows(x):
    encoder = Recorder(3, 3)
    guide = AutoAmortizedNormal(
        lambda x: hierarchical(x, subsample_size=5), encoder=encoder, hidden_dims=(8,)
    )
    trace = pyro.poutine.trace(guide).get_trace(x)
    idx = trace.nodes["data"]["value"]
    assert len(idx) == 5 and trace.nodes["z"]["value"].shape == (5, 2)
    assert torch.equal(encoder.seen, x[idx])


def test_subsample_argument_is_recognized(x):
    encoder = Recorder(3, 3)
    guide = AutoAmortizedNormal(hierarchical, encoder=encoder)
    idx = torch.tensor([3, 1, 4, 1, 5])
    trace = pyro.poutine.trace(guide).get_trace(x, idx)
    assert trace.nodes["data"]["value"] is idx
    assert torch.equal(encoder.seen, x[idx])
    # the model's plate then runs on the same indices
    model_trace = pyro.poutine.trace(pyro.poutine.replay(hierarchical, trace=trace)).get_trace(
        x, idx
    )
    assert torch.equal(model_trace.nodes["data"]["value"], idx)


def test_minibatch_sized_context_is_taken_as_is(x):
    encoder = Recorder(3, 3)
    guide = AutoAmortizedNormal(hierarchical, encoder=encoder)
    idx = torch.tensor([0, 2, 4])
    batch = x[idx]
    guide(batch, idx)
    assert encoder.seen is batch


def test_image_contexts_are_flattened_for_the_default_encoder():
    def model(images):
        with pyro.plate("data", images.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([3]).to_event(1))
            logits = z.sum(-1)[:, None, None].expand(images.shape)
            pyro.sample("x", dist.Bernoulli(logits=logits).to_event(2), obs=images)

    images = torch.bernoulli(torch.full((4, 5, 5), 0.5))
    guide = AutoAmortizedNormal(model, hidden_dims=(8,))
    assert guide(images)["z"].shape == (4, 3)
    assert guide.encoder.input_dim == 25


def test_missing_values_get_an_observed_mask(x):
    x = x.clone()
    x[0, 1] = math.nan
    x[3, 0] = math.nan
    guide = AutoAmortizedNormal(hierarchical, hidden_dims=(8,))
    sample = guide(x)
    assert guide.encoder.observed_mask
    assert torch.isfinite(sample["z"]).all()


# --------------------------------------------------------- Pyro's tools just work
@pytest.mark.parametrize("elbo", [Trace_ELBO(), TraceMeanField_ELBO(), Trace_IWELBO(3)])
def test_trains_with_pyro_objectives(x, elbo):
    guide = AutoAmortizedNormal(lambda x: hierarchical(x, subsample_size=10), hidden_dims=(8,))
    model = guide.model
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.01}), elbo)
    losses = [svi.step(x) for _ in range(40)]
    assert all(math.isfinite(v) for v in losses)


@pytest.mark.parametrize("parallel", [False, True])
def test_predictive(x, parallel):
    guide = AutoAmortizedNormal(hierarchical, hidden_dims=(8,))
    guide(x)
    samples = Predictive(hierarchical, guide=guide, num_samples=4, parallel=parallel)(x)
    assert samples["z"].shape == (4, 20, 2)
    assert samples["mu"].shape == (4,) or samples["mu"].shape == (4, 1)
    assert samples["x"].shape == (4, 20, 3)


def test_median_quantiles_and_encode_match_the_exact_posterior():
    torch.set_default_dtype(torch.float64)
    model = LinearGaussian()
    x = model.sample(7)
    guide = AutoAmortizedNormal(model, encoder=exact_encoder(model))
    W, c, var = model.posterior()
    mean = x @ W.T + c
    assert torch.allclose(guide.median(x)["z"], mean)
    q = guide.quantiles([0.1, 0.5, 0.9], x)["z"]
    assert q.shape == (3, 7, 2)
    assert torch.allclose(q[1], mean)
    z90 = dist.Normal(0.0, 1.0).icdf(torch.tensor(0.9))
    assert torch.allclose(q[2], mean + z90 * var.sqrt())
    posterior = guide.site_posteriors(x)["z"]
    assert torch.allclose(posterior.mean, mean)
    assert torch.allclose(posterior.variance, var.expand(7, 2))


def test_median_and_quantiles_include_globals_and_constraints(x):
    guide = AutoAmortizedNormal(hierarchical, hidden_dims=(8,))
    medians = guide.median(x)
    assert set(medians) == {"mu", "z", "s"}
    assert medians["s"].shape == (20,) and (medians["s"] > 0).all()
    quantiles = guide.quantiles([0.25, 0.75], x)
    assert quantiles["mu"].shape[0] == 2
    assert (quantiles["s"][0] < quantiles["s"][1]).all()
    assert (quantiles["s"][0] > 0).all()


# ------------------------------------------------------------------- guide API
GUIDES = {
    "normal": lambda model, **kw: AutoAmortizedNormal(model, hidden_dims=(8,), **kw),
    "iaf": lambda model, **kw: AutoAmortizedIAF(model, hidden_dims=(8,), **kw),
    "realnvp": lambda model, **kw: AutoAmortizedRealNVP(model, hidden_dims=(8,), **kw),
}


@pytest.mark.parametrize("name", GUIDES)
def test_every_guide_answers_posterior_median_and_quantiles_with_the_same_shapes(x, name):
    guide = GUIDES[name](hierarchical)
    q = guide.posterior(x)  # the joint unconstrained local latent: z (2 columns), then s
    assert guide.local_sites == ("z", "s") and guide.latent_dim == 3
    assert q.batch_shape == (20,) and q.event_shape == (3,)
    u = q.rsample((5,))
    assert u.shape == (5, 20, 3) and u.requires_grad
    sites = guide.latent_to_sites(u)
    assert sites["z"].shape == (5, 20, 2) and sites["s"].shape == (5, 20)
    assert (sites["s"] > 0).all()
    median = guide.median(x)
    assert {k: tuple(v.shape) for k, v in median.items()} == {"mu": (), "z": (20, 2), "s": (20,)}
    quantiles = guide.quantiles([0.1, 0.5, 0.9], x)
    shapes = {k: tuple(v.shape) for k, v in quantiles.items()}
    assert shapes == {"mu": (3,), "z": (3, 20, 2), "s": (3, 20)}
    for site in ("z", "s"):
        assert (quantiles[site][0] < quantiles[site][1]).all()
        assert (quantiles[site][1] < quantiles[site][2]).all()
    assert (quantiles["s"] > 0).all()
    assert guide.encoder_output(x).loc.shape == (20, 3)


@pytest.mark.parametrize("name", ["iaf", "realnvp"])
def test_identity_flow_median_and_quantiles_are_the_encoders_normals(x, name):
    # A fresh flow is the identity, so the local latent is the encoder's Normal: the median
    # is its loc exactly, and the Monte Carlo quantiles are its quantiles within 5 SE.
    guide = GUIDES[name](hierarchical, init_scale=0.5)
    normal = AutoAmortizedNormal(hierarchical, encoder=_BaseOf(guide), global_guide=lambda x: {})
    torch.testing.assert_close(guide.median(x)["z"], normal.median(x)["z"], rtol=0, atol=1e-6)
    levels = torch.tensor([0.1, 0.5, 0.9])
    ours, exact = guide.quantiles(levels, x), normal.quantiles(levels, x)
    standard = dist.Normal(0.0, 1.0)
    # SE of a sample quantile: sqrt(q (1 - q) / n) / density, in units of the scale
    se = (levels * (1 - levels) / QUANTILE_SAMPLES).sqrt() / standard.log_prob(
        standard.icdf(levels)
    ).exp()
    scale = guide.encoder_output(x).scale[:, :2]
    assert ((ours["z"] - exact["z"]).abs() < 5 * se[:, None, None] * scale).all()
    assert torch.equal(guide.quantiles(levels, x)["z"], ours["z"])  # its own random stream


class _BaseOf(nn.Module):
    """A flow guide's encoder without its context: the Normal guide's encoder."""

    def __init__(self, guide):
        super().__init__()
        self.guide = guide

    def forward(self, context):
        return self.guide.encode_rows(context)[:2]


@pytest.mark.parametrize("name", GUIDES)
def test_prepare_then_sample_local_is_a_call(x, name):
    guide = GUIDES[name](hierarchical)
    guide(x)
    pyro.set_rng_seed(3)
    whole = poutine.trace(guide).get_trace(x)
    pyro.set_rng_seed(3)
    with poutine.trace() as tracer:
        call = guide.prepare(x)
        guide.sample_local(call, guide.encode_rows(call.rows))
    parts = tracer.trace
    samples = [n for n, site in whole.nodes.items() if site["type"] == "sample"]
    assert samples == [n for n, site in parts.nodes.items() if site["type"] == "sample"]
    assert {"mu", "z", "s"} <= set(samples)
    for name_ in samples:
        assert torch.equal(parts.nodes[name_]["value"], whole.nodes[name_]["value"])


@pytest.mark.parametrize("name", GUIDES)
def test_sample_local_takes_given_local_parameters(x, name):
    # the seam a wrapper uses: the local sites sampled from any (loc, scale, context)
    guide = GUIDES[name](hierarchical, init_scale=1e-8)
    guide(x)
    call = guide.prepare(x)
    output = guide.encode_rows(call.rows)
    target = torch.full_like(output.loc, 0.7)
    values = guide.sample_local(call, output._replace(loc=target))
    torch.testing.assert_close(values["z"], torch.full((20, 2), 0.7), rtol=0, atol=1e-6)
    torch.testing.assert_close(values["s"], torch.full((20,), 0.7).exp(), rtol=0, atol=1e-6)


def test_normal_guides_encode_is_deprecated_for_site_posteriors(x):
    guide = AutoAmortizedNormal(hierarchical, hidden_dims=(8,))
    with pytest.warns(FutureWarning, match="encode\\(\\) is deprecated.*site_posteriors"):
        old = guide.encode(x)
    new = guide.site_posteriors(x)
    assert set(old) == set(new) == {"z", "s"}
    assert torch.equal(old["z"].mean, new["z"].mean)


def test_importing_changes_nothing():
    code = (
        "import torch, pyro, pyro.poutine.runtime as rt\n"
        "before = (torch.get_default_dtype(), len(rt._PYRO_STACK), "
        "pyro.poutine.util.is_validation_enabled(), dict(torch.distributions.kl._KL_REGISTRY))\n"
        "import pyro_amortized\n"
        "after = (torch.get_default_dtype(), len(rt._PYRO_STACK), "
        "pyro.poutine.util.is_validation_enabled(), dict(torch.distributions.kl._KL_REGISTRY))\n"
        "assert before == after, (before, after)\n"
        "assert len(pyro.get_param_store()) == 0\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ------------------------------------------------------------------------ errors
def test_no_such_plate_lists_the_plates_found(x):
    guide = AutoAmortizedNormal(hierarchical, local_plate="people")
    with pytest.raises(ValueError, match="no plate named 'people' \\(plates found: 'data'\\)"):
        guide(x)


def test_discrete_local_site_is_named():
    def model(x):
        with pyro.plate("data", x.shape[0]):
            c = pyro.sample("cluster", dist.Categorical(torch.ones(3) / 3))
            pyro.sample("x", dist.Normal(c.float(), 1.0), obs=x)

    with pytest.raises(ValueError, match="site 'cluster' inside plate 'data' is discrete"):
        AutoAmortizedNormal(model)(torch.randn(4))


def test_context_with_wrong_batch_size(x):
    guide = AutoAmortizedNormal(hierarchical, context=lambda x: x[:7], hidden_dims=(8,))
    with pytest.raises(ValueError, match="context has 7 rows but plate 'data' has size 20"):
        guide(x)


def test_nan_context_without_mask(x):
    guide = AutoAmortizedNormal(hierarchical, hidden_dims=(8,))
    guide(x)
    x = x.clone()
    x[2, 2] = math.nan
    with pytest.raises(ValueError, match="context rows of plate 'data' contain NaN.*observed-mask"):
        guide(x)


def test_user_encoder_with_wrong_output_size(x):
    guide = AutoAmortizedNormal(hierarchical, encoder=MLPEncoder(3, 5, (4,)))
    with pytest.raises(ValueError, match="expected \\(20, 3\\).*'z': 2, 's': 1"):
        guide(x)


def test_subsample_indices_made_inside_the_model(x):
    def model(x, start):
        idx = torch.arange(start, start + 4)
        hierarchical(x, idx)

    with pytest.raises(ValueError, match="subsample= indices that are not one of the model's"):
        AutoAmortizedNormal(model)(x, 2)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(local_plate=""), "local_plate"),
        (dict(context=2.5), "context"),
        (dict(init_scale=0.0), "init_scale"),
        (dict(hidden_dims=(8, 0)), "hidden_dims"),
        (dict(encoder="mlp"), "encoder"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AutoAmortizedNormal(hierarchical, **kwargs)


def test_plain_function_as_global_guide(x):
    def mu_guide(x, *args, **kwargs):
        loc = pyro.param("mu_loc", torch.tensor(0.5))
        return {"mu": pyro.sample("mu", dist.Normal(loc, 0.1))}

    guide = AutoAmortizedNormal(hierarchical, global_guide=mu_guide, hidden_dims=(8,))
    trace = pyro.poutine.trace(guide).get_trace(x)
    assert trace.nodes["mu"]["fn"].loc.item() == 0.5
    assert guide.global_guide is None
    assert math.isfinite(Trace_IWELBO(3).loss(hierarchical, guide, x))


def test_create_plates_is_honoured(x):
    encoder = Recorder(3, 3)
    idx = torch.tensor([5, 6, 7])
    guide = AutoAmortizedNormal(
        hierarchical,
        encoder=encoder,
        create_plates=lambda x, idx: pyro.plate("data", 20, subsample=idx),
    )
    trace = pyro.poutine.trace(guide).get_trace(x, idx)
    assert trace.nodes["data"]["value"] is idx
    assert torch.equal(encoder.seen, x[idx])
    assert guide._subsample_location is None  # create_plates takes precedence


@pytest.mark.parametrize("how", ["positional", "keyword"])
def test_subsample_argument_found_after_a_full_first_call(x, how):
    def model(x, idx=None):
        hierarchical(x, idx)

    encoder = Recorder(3, 3)
    guide = AutoAmortizedNormal(model, encoder=encoder)
    guide(x)  # the first call runs the whole plate
    assert encoder.seen.shape[0] == 20
    idx = torch.tensor([2, 9, 4])
    args, kwargs = ((x, idx), {}) if how == "positional" else ((x,), {"idx": idx})
    trace = pyro.poutine.trace(guide).get_trace(*args, **kwargs)
    assert trace.nodes["data"]["value"] is idx
    assert torch.equal(encoder.seen, x[idx])


# ----------------------------------------------------------- patterns of Pyro's examples
def _hand_loss(model, guide, x):
    """-(N / B) * sum(log p - log q) on the guide's draw, with unscaled log-densities."""
    guide_trace = pyro.poutine.trace(guide).get_trace(x)
    model_trace = pyro.poutine.trace(pyro.poutine.replay(model, trace=guide_trace)).get_trace(x)
    total = 0.0
    for sign, trace in ((1.0, model_trace), (-1.0, guide_trace)):
        for site in trace.nodes.values():
            if site["type"] == "sample" and site["name"] != "data":
                total = total + sign * site["fn"].log_prob(site["value"]).sum()
    plate = guide_trace.nodes["data"]["fn"]
    return -(plate.size / plate.subsample_size) * total.item(), guide_trace


@pytest.mark.parametrize("elbo", [Trace_ELBO(), Trace_IWELBO(1)], ids=["Trace_ELBO", "IWELBO"])
def test_minibatch_context_keeps_the_plates_full_size(float64, elbo):
    # Pyro's examples/svi_lightning.py: a DataLoader cut the batch, the plate keeps N.
    N = 50

    def model(x):
        with pyro.plate("data", N, subsample_size=len(x)):
            z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
            pyro.sample("x", dist.Normal(z, 1.0).to_event(1), obs=x)

    data = torch.randn(N, 2)
    guide = AutoAmortizedNormal(model, hidden_dims=(8,))
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.01}), elbo)
    for batch in (data[:10], data[10:20], data[20:27]):  # the last batch is shorter
        assert math.isfinite(svi.step(batch))
        pyro.set_rng_seed(1)
        loss = elbo.loss(model, guide, batch)
        pyro.set_rng_seed(1)
        expected, guide_trace = _hand_loss(model, guide, batch)
        assert loss == pytest.approx(expected, rel=1e-10)
        assert guide_trace.nodes["data"]["fn"].size == N
        assert guide_trace.nodes["z"]["scale"] == pytest.approx(N / len(batch))


def test_plate_without_a_size_takes_it_from_the_context():
    # Pyro's examples/cvae and ss_vae_M2.py: pyro.plate("data") with no size
    def model(x):
        with pyro.plate("data"):
            z = pyro.sample("z", dist.Normal(torch.zeros(x.shape[0], 10), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z, 1.0).to_event(1), obs=x)

    guide = AutoAmortizedNormal(model, hidden_dims=(8,))
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.01}), Trace_ELBO())
    for rows in (200, 30):
        x = torch.randn(rows, 10)
        assert math.isfinite(svi.step(x))
        assert guide(x)["z"].shape == (rows, 10)
        assert math.isfinite(Trace_IWELBO(3).loss(model, guide, x))

    wrong = AutoAmortizedNormal(model, hidden_dims=(8,), context=lambda x: x[:7])
    with pytest.raises(ValueError, match="no dimension of size 7 .*plate 'data' has no size"):
        wrong(torch.randn(20, 10))


@pytest.mark.parametrize("guide_class", [AutoAmortizedNormal, AutoAmortizedIAF])
def test_model_scale_is_mirrored_on_the_local_sites(float64, guide_class):
    # Pyro's examples/scanvi.py: poutine.scale on the whole plate, in model and guide
    def scaled(c):
        def model(x):
            with pyro.plate("data", 20, subsample_size=5) as idx, pyro.poutine.scale(scale=c):
                z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
                s = pyro.sample("s", dist.LogNormal(0.0, 0.5))
                loc = z.sum(-1, keepdim=True)
                pyro.sample("x", dist.Normal(loc, s.unsqueeze(-1)).to_event(1), obs=x[idx])

        return model

    x, c = torch.randn(20, 3), 0.01
    losses = []
    for model in (scaled(1.0), scaled(c)):
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        guide = guide_class(model, hidden_dims=(8,))
        guide(x)  # the same encoder for both
        pyro.set_rng_seed(3)
        losses.append(Trace_ELBO().loss(model, guide, x))
    assert losses[1] == pytest.approx(c * losses[0], rel=1e-10)
    trace = pyro.poutine.trace(guide).get_trace(x)
    model_trace = pyro.poutine.trace(pyro.poutine.replay(model, trace=trace)).get_trace(x)
    for name in ("z", "s"):
        assert trace.nodes[name]["scale"] == pytest.approx(model_trace.nodes[name]["scale"])
        assert trace.nodes[name]["scale"] == pytest.approx(c * 20 / 5)


def test_flow_guide_refuses_local_sites_of_different_scales(x):
    def model(x):
        with pyro.plate("data", x.shape[0]):
            with pyro.poutine.scale(scale=0.5):
                z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
            s = pyro.sample("s", dist.LogNormal(0.0, 0.5))
            loc = z.sum(-1, keepdim=True)
            pyro.sample("x", dist.Normal(loc, s.unsqueeze(-1)).to_event(1), obs=x)

    with pytest.raises(ValueError, match="different scales in the model.*\\('z': 0.5, 's': 1\\)"):
        AutoAmortizedIAF(model, hidden_dims=(8,))(x)
    assert AutoAmortizedNormal(model, hidden_dims=(8,))(x)["z"].shape == (20, 2)


def mixture(x, y=None):
    """Two components: an assignment y, enumerated unless observed, and a local z."""
    locs = torch.tensor([-2.0, 2.0])
    with pyro.plate("data", x.shape[0]):
        y = pyro.sample(
            "y", dist.Categorical(torch.ones(2) / 2), obs=y, infer={"enumerate": "parallel"}
        )
        z = pyro.sample("z", dist.Normal(locs[y], 1.0))
        pyro.sample("x", dist.Normal(z, 0.5), obs=x)


def _mixture_data(n=40):
    y = torch.arange(n) % 2
    return torch.tensor([-2.0, 2.0])[y] + 1.1 * torch.randn(n), y


def test_enumerated_local_site_is_left_to_trace_enum_elbo():
    x, _ = _mixture_data()
    guide = AutoAmortizedNormal(mixture, hidden_dims=(16,))
    elbo = TraceEnum_ELBO(max_plate_nesting=1)
    svi = SVI(mixture, guide, pyro.optim.Adam({"lr": 0.03}), elbo)
    losses = [svi.step(x) for _ in range(200)]
    assert sum(losses[-20:]) < sum(losses[:20]) - 20 * 5.0
    trace = pyro.poutine.trace(guide).get_trace(x)
    assert "z" in trace.nodes and "y" not in trace.nodes
    assert guide.global_guide is None  # y is no global latent either


@pytest.mark.parametrize("first", ["labeled", "unlabeled"])
def test_semi_supervised_labels_observed_or_enumerated(first):
    # ss_vae_M2.py / scanvi.py: y observed in labeled batches, enumerated in the others
    x, y = _mixture_data()
    batches = [(x[:20], y[:20]), (x[20:], None)]
    if first == "unlabeled":
        batches.reverse()
    guide = AutoAmortizedNormal(mixture, hidden_dims=(16,))
    svi = SVI(mixture, guide, pyro.optim.Adam({"lr": 0.03}), TraceEnum_ELBO(max_plate_nesting=1))
    losses = {True: [], False: []}
    for _ in range(100):
        for xs, ys in batches:
            losses[ys is None].append(svi.step(xs, ys))
    for values in losses.values():
        assert sum(values[-10:]) < sum(values[:10])
    for xs, ys in batches:
        trace = pyro.poutine.trace(guide).get_trace(xs, ys)
        assert "z" in trace.nodes and "y" not in trace.nodes

    # a mask of labeled rows within one batch, as obs_mask= (config_enumerate marks the
    # unobserved part, which obs_mask= gives no infer= of its own)
    def masked(x, y, labeled):
        with pyro.plate("data", x.shape[0]):
            y = pyro.sample("y", dist.Categorical(torch.ones(2) / 2), obs=y, obs_mask=labeled)
            z = pyro.sample("z", dist.Normal(torch.tensor([-2.0, 2.0])[y], 1.0))
            pyro.sample("x", dist.Normal(z, 0.5), obs=x)

    masked = config_enumerate(masked)
    pyro.clear_param_store()
    guide = AutoAmortizedNormal(masked, hidden_dims=(16,))
    svi = SVI(masked, guide, pyro.optim.Adam({"lr": 0.03}), TraceEnum_ELBO(max_plate_nesting=1))
    labeled = torch.arange(40) < 10
    values = [svi.step(x, y, labeled) for _ in range(100)]
    assert sum(values[-10:]) < sum(values[:10])
    trace = pyro.poutine.trace(guide).get_trace(x, y, labeled)
    assert "z" in trace.nodes and not any(name.startswith("y") for name in trace.nodes)


def test_unmarked_discrete_local_site_says_how_to_enumerate_it():
    def model(x):
        with pyro.plate("data", x.shape[0]):
            c = pyro.sample("cluster", dist.Categorical(torch.ones(3) / 3))
            pyro.sample("x", dist.Normal(c.float(), 1.0), obs=x)

    guide = AutoAmortizedNormal(model)
    with pytest.raises(ValueError, match="'cluster' inside plate 'data' is discrete.*enumerate"):
        guide(torch.randn(4))
    assert guide.prototype_trace is None  # a failed setup runs again on the next call


def test_default_encoder_refuses_a_context_of_another_width():
    # Pyro's examples/dmm.py minibatches sequences of different lengths
    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
            loc = z[..., :1] + z[..., 1:] * torch.arange(x.shape[1])
            pyro.sample("x", dist.Normal(loc, 0.5).to_event(1), obs=x)

    guide = AutoAmortizedNormal(model, hidden_dims=(8,))
    guide(torch.randn(5, 7))
    with pytest.raises(ValueError, match=r"rows of shape \(4,\).*rows of shape \(7,\).*pad"):
        guide(torch.randn(5, 4))

    class GRUEncoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.GRU(1, 8, batch_first=True)
            self.head = nn.Linear(8, 4)

        def forward(self, x):
            _, h = self.rnn(x.unsqueeze(-1))
            loc, raw = self.head(h[-1]).chunk(2, -1)
            return loc, nn.functional.softplus(raw)

    pyro.clear_param_store()
    guide = AutoAmortizedNormal(model, encoder=GRUEncoder())
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.01}), Trace_IWELBO(2))
    for length in (7, 4, 9):
        x = torch.randn(5, length)
        assert math.isfinite(svi.step(x))
        assert guide(x)["z"].shape == (5, 2)


def test_param_store_save_and_load_restore_the_encoder_and_train_it(x, tmp_path):
    # Pyro's recipe: pyro.get_param_store().save(path), then .load(path) in a new process
    def train(guide, steps):
        svi = SVI(hierarchical, guide, pyro.optim.Adam({"lr": 0.05}), Trace_ELBO())
        for _ in range(steps):
            svi.step(x)

    guide = AutoAmortizedNormal(hierarchical, hidden_dims=(8,))
    train(guide, 5)
    value = guide(x)["z"].detach()
    score = guide.site_posteriors(x)["z"].log_prob(value)
    mu = guide.median(x)["mu"]
    pyro.get_param_store().save(tmp_path / "params.pt")
    pyro.clear_param_store()
    del guide

    pyro.get_param_store().load(tmp_path / "params.pt")
    fresh = AutoAmortizedNormal(hierarchical, hidden_dims=(8,))
    fresh(x)  # the first call
    assert torch.equal(fresh.site_posteriors(x)["z"].log_prob(value), score)
    assert torch.equal(fresh.median(x)["mu"], mu)
    loaded = [p.detach().clone() for p in fresh.encoder.parameters()]
    train(fresh, 20)
    for before, after in zip(loaded, fresh.encoder.parameters(), strict=True):
        assert not torch.equal(before, after)
    store = dict(pyro.get_param_store().named_parameters())
    assert store["AutoAmortizedNormal.encoder$$$head.weight"] is fresh.encoder.head.weight


def test_param_store_of_another_architecture_is_refused(x):
    AutoAmortizedNormal(hierarchical, hidden_dims=(8,))(x)
    other = AutoAmortizedNormal(hierarchical, hidden_dims=(6,))
    with pytest.raises(ValueError, match="holds 'AutoAmortizedNormal.encoder\\$\\$\\$hidden.0"):
        other(x)


# ------------------------------------------------------------------- saved guides
# Every guide with a global latent, trained a few steps and saved three ways
# (saved_guide_job.py): torch.save of the guide, its state_dict() into a new guide, and
# Pyro's param store; then loaded in this process and in a fresh one, and scored on new
# data. The same code on the same machine, in float64 on one thread: bit-identical.
SAVED_JOB = Path(__file__).resolve().parent / "saved_guide_job.py"


@pytest.fixture(scope="module")
def saved_guides(tmp_path_factory):
    job = saved_guide_job
    directory = tmp_path_factory.mktemp("saved-guides")
    dtype, threads = torch.get_default_dtype(), torch.get_num_threads()
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    try:
        x, new = job.data()
        torch.save((x, new), directory / "data.pt")
        trained, after_saving, here = {}, {}, {}
        for kind in job.KINDS:
            model, guide = job.train(kind, x)
            trained[kind] = job.score(model, guide, new)
            job.save(model, guide, directory / kind)
            after_saving[kind] = job.score(model, guide, new)
            assert guide.model is model  # Pyro's AutoGuide would have dropped it
            for method in job.METHODS:
                loaded = job.load(method, kind, directory / kind, new)
                here[kind, method] = job.score(*loaded, new)
    finally:
        torch.set_default_dtype(dtype)
        torch.set_num_threads(threads)
        pyro.clear_param_store()
    result = subprocess.run(
        [sys.executable, str(SAVED_JOB), str(directory)],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    fresh = torch.load(directory / "scores.pt", weights_only=True)
    return {"trained": trained, "after saving": after_saving, "here": here, "fresh": fresh}


def _assert_same_scores(scores: dict, expected: dict) -> None:
    assert sorted(k for k in scores if k != "still") == sorted(expected)
    for key, value in expected.items():
        assert torch.equal(scores[key], value), key


SAVED_CASES = [
    (kind, method) for kind in saved_guide_job.KINDS for method in saved_guide_job.METHODS
]


@pytest.mark.parametrize("kind", saved_guide_job.KINDS)
def test_saving_a_guide_leaves_it_as_it_was(saved_guides, kind):
    # torch.save pickles a twin of the global AutoNormal: Pyro's __getstate__ would drop
    # the model and master of the guide being saved, not only of the copy
    _assert_same_scores(saved_guides["after saving"][kind], saved_guides["trained"][kind])


@pytest.mark.parametrize("kind, method", SAVED_CASES)
def test_saved_guide_scores_new_data_alike_when_loaded_in_the_same_process(
    saved_guides, kind, method
):
    _assert_same_scores(saved_guides["here"][kind, method], saved_guides["trained"][kind])


@pytest.mark.parametrize("kind, method", SAVED_CASES)
def test_saved_guide_scores_new_data_alike_and_trains_in_a_fresh_process(
    saved_guides, kind, method
):
    # the encoder's posterior of the new rows, the global median, every parameter of the
    # guide and model, and under one seed per_datapoint_elbo and log_marginal_likelihood
    # (a SemiAmortizedGuide: the log-weights and draws of its refined posterior)
    scores = saved_guides["fresh"][kind, method]
    _assert_same_scores(scores, saved_guides["trained"][kind])
    assert scores["still"] == []  # two SVI steps there move every parameter of the guide


def test_a_set_up_guide_has_every_entry_of_its_state_dict(x):
    # setup() builds the global AutoNormal's parameters too, so that a new guide can
    # load_state_dict a saved one before its first call
    trained = AutoAmortizedIAF(hierarchical, hidden_dims=(8,))
    trained(x)
    pyro.clear_param_store()
    fresh = AutoAmortizedIAF(hierarchical, hidden_dims=(8,))
    fresh.setup(x)
    assert fresh.state_dict().keys() == trained.state_dict().keys()
    fresh.load_state_dict(trained.state_dict())
    assert torch.equal(fresh.median(x)["mu"], trained.median(x)["mu"])
    assert torch.equal(fresh.encoder_output(x).loc, trained.encoder_output(x).loc)


def test_a_guide_pickled_before_its_first_call_sets_up_when_loaded(x, tmp_path):
    guide = AutoAmortizedNormal(hierarchical, hidden_dims=(8,))
    torch.save(guide, tmp_path / "guide.pt")
    loaded = torch.load(tmp_path / "guide.pt", weights_only=False)
    assert loaded.model is hierarchical  # a module-level function, pickled by name
    assert loaded(x)["z"].shape == (20, 2)
    assert isinstance(loaded.global_guide, AutoNormal)


def test_a_guide_of_a_local_function_cannot_be_pickled(tmp_path):
    def model(x):  # not importable by name
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(0.0, 1.0))

    guide = AutoAmortizedNormal(model, hidden_dims=(4,))
    guide(torch.randn(3, 1))
    with pytest.raises((AttributeError, pickle.PicklingError), match="local object"):
        torch.save(guide, tmp_path / "guide.pt")
    assert guide.model is model
    torch.save(guide.state_dict(), tmp_path / "state.pt")  # the way for such a model


# ------------------------------------------------------------------ per-call shortcuts
def _vae_model(decoder):
    def model(x):
        pyro.module("decoder", decoder)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(decoder(z), 1.0).to_event(1), obs=x)

    return model


def test_normal_shortcut_is_the_constructors_distribution():
    from pyro_amortized.guides import _normal

    loc = torch.randn(5, 3, requires_grad=True)
    scale = torch.rand(5, 3).add(0.1).requires_grad_()
    ours, theirs = _normal(loc, scale), dist.Normal(loc, scale)
    assert type(ours) is type(theirs)
    assert (ours.batch_shape, ours.event_shape) == (theirs.batch_shape, theirs.event_shape)
    assert ours._validate_args == theirs._validate_args
    draws = []
    for fn in (ours, theirs):
        pyro.set_rng_seed(3)
        value = fn.to_event(1).rsample()
        draws.append((value, torch.autograd.grad(value.square().sum(), (loc, scale))))
    assert torch.equal(draws[0][0], draws[1][0])
    assert all(torch.equal(a, b) for a, b in zip(draws[0][1], draws[1][1], strict=True))
    with pyro.validation_enabled(True), pytest.raises(ValueError, match="scale"):
        _normal(loc, -scale)  # validated as the constructor validates
    assert _normal(loc, scale[0]).batch_shape == (5, 3)  # other shapes: the constructor


def test_encoder_registration_makes_pyro_modules_param_sites():
    decoder = nn.Linear(2, 3)
    model = _vae_model(decoder)
    guide = AutoAmortizedNormal(model, hidden_dims=(4,))
    x = torch.randn(6, 3)
    guide(x)
    trace = poutine.trace(guide).get_trace(x)
    params = {name: site["value"] for name, site in trace.nodes.items() if site["type"] == "param"}
    with poutine.trace() as expected:
        pyro.module("AutoAmortizedNormal.encoder", guide.encoder)
    wanted = {name: site["value"] for name, site in expected.trace.nodes.items()}
    assert params.keys() == wanted.keys() and len(params) == 4
    assert all(params[name] is wanted[name] for name in params)
    # a frozen parameter is left out, as pyro.module leaves it
    first = next(guide.encoder.parameters())
    first.requires_grad_(False)
    with pytest.warns(UserWarning, match="requires_grad=False"):
        trace = poutine.trace(guide).get_trace(x)
    assert sum(site["type"] == "param" for site in trace.nodes.values()) == 3


def test_guide_calls_after_a_param_store_load_take_the_loaded_tensors():
    decoder = nn.Linear(2, 3)
    guide = AutoAmortizedNormal(_vae_model(decoder), hidden_dims=(4,))
    x = torch.randn(6, 3)
    guide(x)  # the names are kept from here on
    state = pyro.get_param_store().get_state()
    for name, value in state["params"].items():
        state["params"][name] = value.detach() + 1.0
    pyro.get_param_store().set_state(state)
    trace = poutine.trace(guide).get_trace(x)
    store = dict(pyro.get_param_store().named_parameters())
    for name, site in trace.nodes.items():
        if site["type"] == "param":
            assert site["value"] is store[name]
    for path, param in guide.encoder.named_parameters():
        assert param is store[f"AutoAmortizedNormal.encoder$$${path}"]
