import math
import subprocess
import sys

import pyro
import pyro.distributions as dist
import pytest
import torch
from linear_gaussian import LinearGaussian, exact_encoder
from pyro.infer import SVI, Predictive, Trace_ELBO, TraceMeanField_ELBO
from pyro.infer.autoguide import AutoNormal
from torch import nn

from pyro_amortized import AutoAmortizedNormal, MLPEncoder, Trace_IWELBO


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
    assert [s.name for s in guide._local_sites] == ["z", "s"]
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
    posterior = guide.encode(x)["z"]
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
