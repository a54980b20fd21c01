# Gradient tests of Trace_IWELBO, ported from:
#
# - Pyro (Apache-2.0, https://github.com/pyro-ppl/pyro), tests/infer/test_gradient.py:
#   test_particle_gradient, test_subsample_gradient, test_plate,
#   test_plate_elbo_vectorized_particles, test_subsample_gradient_sequential;
#   tests/infer/test_inference.py: test_reparam_stable, test_sequential_plating_sum,
#   test_non_nested_plating_sum; tests/infer/test_conjugate_gradients.py with the
#   GaussianChain model of tests/integration_tests/test_conjugate_gaussian_models.py.
# - NumPyro (Apache-2.0, https://github.com/pyro-ppl/numpyro), test/infer/test_svi.py:
#   test_renyi_elbo, test_renyi_local, test_renyi_nonnested_plates, test_renyi_create_plates.
#
# What changed:
# - The models and guides are Pyro's (NumPyro's translated to Pyro: numpyro.plate ->
#   pyro.plate, numpyro.subsample -> pyro.subsample, random keys -> pyro.set_rng_seed),
#   in float64, run against pyro_amortized.Trace_IWELBO.
# - Only reparameterized guides: Trace_IWELBO refuses guide sites without rsample, so the
#   "nonreparam" / "reparam-False" parametrizations and the GaussianChain's
#   NonreparameterizedNormal nodes are left out, as is every other ELBO class of the
#   originals (TraceGraph, TraceEnum, TraceMeanField, Jit*), which Trace_IWELBO is not.
# - With one particle Trace_IWELBO is Trace_ELBO: value and gradients are compared on the
#   same draws (same seed) to 1e-6.
# - For K > 1 particles the originals' expectations are ELBO gradients averaged over many
#   particles, which an importance-weighted bound does not have (its guide gradient is
#   the self-normalized weighted one and shrinks with K). Where a single-draw closed form
#   exists (Pyro's pathwise formula of test_particle_gradient) it is extended with the
#   normalized importance weights and checked on the captured draws, for every K, with
#   the subsample scale outside the per-datapoint log-sum-exp. The statistical
#   expectations of test_plate are kept for K = 1 only; test_plate_elbo_vectorized_particles
#   and test_subsample_gradient's 50000-particle expectations and
#   test_subsample_gradient_sequential's 5000-draw average are replaced by the exact
#   per-draw formula (one particle plate of ELBO particles is not K importance samples).
# - NumPyro's alpha=2 case of test_renyi_elbo is left out (Trace_IWELBO is alpha = 0).
#   NumPyro's RenyiELBO._single_particle_elbo shapes are checked through
#   pyro_amortized.objectives.log_weights instead.
# - New: models without a local plate, where Trace_IWELBO is the joint IWAE and must equal
#   pyro.infer.RenyiELBO(alpha=0) on the same draws, particles looped or vectorized.
import math
from collections.abc import Callable
from typing import NamedTuple

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import SVI, RenyiELBO, Trace_ELBO
from pyro.infer.autoguide import AutoDelta
from pyro.infer.reparam import LatentStableReparam
from torch.distributions import constraints

from pyro_amortized import Trace_IWELBO

VECTORIZE = pytest.mark.parametrize("vectorize", [True, False], ids=["vectorized", "looped"])
PARTICLES = pytest.mark.parametrize("K", [1, 5], ids=["K1", "K5"])
METHODS = ("loss", "differentiable_loss", "loss_and_grads")


# --------------------------------------------------------------------------- helpers
class Case(NamedTuple):
    model: Callable
    guide: Callable
    args: tuple = ()
    kwargs: dict | None = None
    max_plate_nesting: int = 1
    local_plate: str | None = None


def _params() -> dict:
    return dict(pyro.get_param_store().named_parameters())


def _init_params(case: Case) -> None:
    """Creates every param (some initializers draw random numbers) before any seeded run."""
    with poutine.block():
        case.guide(*case.args, **(case.kwargs or {}))
    for p in _params().values():
        p.grad = None


def _evaluate(elbo, method: str, case: Case, seed: int = 0):
    """(loss, gradients of every param) of one evaluation from ``seed``; no gradients for
    ``method="loss"``."""
    params = _params()
    for p in params.values():
        p.grad = None
    kwargs = case.kwargs or {}
    pyro.set_rng_seed(seed)
    if method == "loss":
        return elbo.loss(case.model, case.guide, *case.args, **kwargs), None
    if method == "differentiable_loss":
        loss = elbo.differentiable_loss(case.model, case.guide, *case.args, **kwargs)
        if loss.requires_grad:
            loss.backward()
        loss = loss.item()
    else:
        loss = float(elbo.loss_and_grads(case.model, case.guide, *case.args, **kwargs))
    grads = {
        name: torch.zeros_like(p) if p.grad is None else p.grad.detach().clone()
        for name, p in _params().items()
    }
    return loss, grads


def _assert_same(actual, expected, tol: float = 1e-6) -> None:
    (loss, grads), (expected_loss, expected_grads) = actual, expected
    assert math.isfinite(loss)
    assert loss == pytest.approx(expected_loss, abs=tol, rel=tol)
    if grads is None or expected_grads is None:
        return
    assert set(grads) == set(expected_grads)
    for name, grad in grads.items():
        assert torch.isfinite(grad).all(), name
        torch.testing.assert_close(grad, expected_grads[name], atol=tol, rtol=tol, msg=name)


def _iwelbo(K: int, vectorize: bool, case: Case, **kwargs) -> Trace_IWELBO:
    return Trace_IWELBO(
        K,
        vectorize_particles=vectorize,
        max_plate_nesting=case.max_plate_nesting,
        local_plate=case.local_plate,
        **kwargs,
    )


def _particles(draws: list, K: int, batch_dims: int) -> torch.Tensor:
    """The last evaluation's K particles ``[K, *batch]`` of a guide site the guide appended
    to ``draws``: one call with a particle dim (vectorized), else one call per particle."""
    if draws[-1].dim() == batch_dims + 1:
        return draws[-1].detach()
    return torch.stack([d.detach() for d in draws[-K:]])


def _normal_normal_iwae(x, z, loc, scale, factor=1.0, local_dim=-1):
    """Pyro's pathwise formula of test_particle_gradient, importance-weighted.

    Model ``z ~ N(0, 1)``, ``x ~ N(z, 1)``, guide ``N(loc, scale)``; ``z`` holds the
    guide's draws ``[K, ...]``. The datapoints along ``local_dim`` each get a log-sum-exp
    over the K particles of their log-weight (summed over the other batch dims), scaled by
    ``factor`` outside it. With z = loc + scale * eps::

        d log w / d loc = x - 2 z,   d log w / d scale = ((x - 2 z) (z - loc) + 1) / scale

    Returns the loss and its elementwise gradients ``dloc`` (summed over particles, shape
    ``z.shape[1:]``) and ``dscale`` (summed), weighted by the normalized weights.
    """
    K = z.shape[0]
    log_w = (
        dist.Normal(0.0, 1.0).log_prob(z)
        + dist.Normal(z, 1.0).log_prob(x)
        - dist.Normal(loc, scale).log_prob(z)
    )
    other = [d for d in range(1, z.dim()) if d != z.dim() + local_dim]
    log_w = log_w.sum(other, keepdim=True) if other else log_w
    weights = torch.softmax(log_w, 0)
    loss = -factor * (torch.logsumexp(log_w, 0) - math.log(K)).sum()
    dloc = -factor * (weights * (x - 2 * z)).sum(0)
    dscale = -factor * (weights * ((x - 2 * z) * (z - loc) + 1)).sum() / scale
    return loss.item(), dloc, dscale


# ------------------------------------------------------------- Pyro's models, as cases
def particle_case(draws=None) -> Case:
    """Pyro's test_particle_gradient."""
    data = torch.tensor([-0.5, 2.0])
    draws = [] if draws is None else draws

    def model():
        with pyro.plate("data", len(data)) as ind:
            x = data[ind]
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    def guide():
        scale = pyro.param("scale", lambda: torch.tensor([1.0]))
        with pyro.plate("data", len(data)):
            loc = pyro.param("loc", lambda: torch.zeros(len(data)), event_dim=0)
            draws.append(pyro.sample("z", dist.Normal(loc, scale)))

    return Case(model, guide)


def subsample_case(subsample=False, scale=1.0, draws=None, idx=None) -> Case:
    """Pyro's test_subsample_gradient (the minibatch passed as ``subsample``)."""
    data = torch.tensor([-0.5, 2.0])
    subsample_size = 1 if subsample else len(data)
    draws = [] if draws is None else draws

    def model(subsample):
        with pyro.plate("data", len(data), subsample_size, subsample) as ind:
            x = data[ind]
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    def guide(subsample):
        scale = pyro.param("scale", lambda: torch.tensor([1.0]))
        with pyro.plate("data", len(data), subsample_size, subsample):
            loc = pyro.param("loc", lambda: torch.zeros(len(data)), event_dim=0)
            draws.append(pyro.sample("z", dist.Normal(loc, scale)))

    if scale != 1.0:
        model = poutine.scale(model, scale=scale)
        guide = poutine.scale(guide, scale=scale)
    if idx is None:
        idx = torch.tensor([1]) if subsample else torch.tensor([0, 1])
    return Case(model, guide, (idx,))


def plate_case(num_particles=200000, draws=None, local_plate="data") -> Case:
    """Pyro's test_plate: a plate of ELBO particles (dim -2) around the data plate."""
    data = torch.tensor([-0.5, 2.0])
    draws = [] if draws is None else draws

    def model():
        particles_plate = pyro.plate("particles", num_particles, dim=-2)
        data_plate = pyro.plate("data", len(data), dim=-1)

        pyro.sample("nuisance_a", dist.Normal(0.0, 1.0))
        with particles_plate, data_plate:
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("nuisance_b", dist.Normal(2.0, 3.0))
        with data_plate, particles_plate:
            pyro.sample("x", dist.Normal(z, 1.0), obs=data)
        pyro.sample("nuisance_c", dist.Normal(4.0, 5.0))

    def guide():
        loc = pyro.param("loc", torch.zeros(len(data)))
        scale = pyro.param("scale", torch.tensor([1.0]))

        pyro.sample("nuisance_c", dist.Normal(4.0, 5.0))
        with pyro.plate("particles", num_particles, dim=-2):
            with pyro.plate("data", len(data), dim=-1):
                draws.append(pyro.sample("z", dist.Normal(loc, scale)))
        pyro.sample("nuisance_b", dist.Normal(2.0, 3.0))
        pyro.sample("nuisance_a", dist.Normal(0.0, 1.0))

    # two plates hold every observed site and a latent: name the one over datapoints
    return Case(model, guide, max_plate_nesting=2, local_plate=local_plate)


def plate_vectorized_case(draws=None) -> Case:
    """Pyro's test_plate_elbo_vectorized_particles: global nuisance sites around a plate."""
    data = torch.tensor([-0.5, 2.0])
    draws = [] if draws is None else draws

    def model():
        data_plate = pyro.plate("data", len(data))

        pyro.sample("nuisance_a", dist.Normal(0.0, 1.0))
        with data_plate:
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("nuisance_b", dist.Normal(2.0, 3.0))
        with data_plate:
            pyro.sample("x", dist.Normal(z, 1.0), obs=data)
        pyro.sample("nuisance_c", dist.Normal(4.0, 5.0))

    def guide():
        loc = pyro.param("loc", torch.zeros(len(data)))
        scale = pyro.param("scale", torch.tensor([1.0]))

        pyro.sample("nuisance_c", dist.Normal(4.0, 5.0))
        with pyro.plate("data", len(data)):
            draws.append(pyro.sample("z", dist.Normal(loc, scale)))
        pyro.sample("nuisance_b", dist.Normal(2.0, 3.0))
        pyro.sample("nuisance_a", dist.Normal(0.0, 1.0))

    return Case(model, guide)


def subsample_sequential_case(draws=None) -> Case:
    """Pyro's test_subsample_gradient_sequential: a random minibatch of one datapoint,
    the guide indexing its params by hand."""
    data = torch.tensor([-0.5, 2.0])
    draws = [] if draws is None else draws

    def model():
        with pyro.plate("data", len(data), 1) as ind:
            x = data[ind]
            z = pyro.sample("z", dist.Normal(0.0, 1.0).expand_by(x.shape))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    def guide():
        loc = pyro.param("loc", lambda: torch.zeros(len(data), requires_grad=True))
        scale = pyro.param("scale", lambda: torch.tensor([1.0], requires_grad=True))
        with pyro.plate("data", len(data), 1) as ind:
            draws.append((ind, pyro.sample("z", dist.Normal(loc[ind], scale))))

    return Case(model, guide)


def reparam_stable_case() -> Case:
    """Pyro's test_reparam_stable (test_inference.py): AutoDelta on a Stable model."""
    data = dist.Poisson(torch.randn(8).exp()).sample()

    @poutine.reparam(config={"dz": LatentStableReparam(), "y": LatentStableReparam()})
    def model():
        stability = pyro.sample("stability", dist.Uniform(1.0, 2.0))
        trans_skew = pyro.sample("trans_skew", dist.Uniform(-1.0, 1.0))
        obs_skew = pyro.sample("obs_skew", dist.Uniform(-1.0, 1.0))
        scale = pyro.sample("scale", dist.Gamma(3.0, 1.0))

        # We use separate plates because the .cumsum() op breaks independence.
        with pyro.plate("time1", len(data)):
            dz = pyro.sample("dz", dist.Stable(stability, trans_skew))
        z = dz.cumsum(-1)
        with pyro.plate("time2", len(data)):
            y = pyro.sample("y", dist.Stable(stability, obs_skew, scale, z))
            pyro.sample("x", dist.Poisson(y.abs()), obs=data)

    return Case(model, AutoDelta(model))


class GaussianChain:
    """Pyro's conjugate chain of normals with known covariances and latent means
    (tests/integration_tests/test_conjugate_gaussian_models.py), reparameterized only.

    With ``difficulty=0`` the guide is the exact posterior.
    """

    def __init__(self, N: int):
        self.loc0 = torch.tensor([0.2])
        self.data = torch.tensor([-0.1, 0.03, 0.20, 0.10])
        self.n_data = self.data.size(0)
        self.sum_data = self.data.sum()
        self.N = N  # number of latent variables in the chain
        self.lambdas = [torch.tensor([1.5 * (k + 1) / N]) for k in range(N + 1)]
        self.lambda_tilde_posts = [self.lambdas[0]]
        for k in range(1, N):
            lambda_tilde_k = (self.lambdas[k] * self.lambda_tilde_posts[k - 1]) / (
                self.lambdas[k] + self.lambda_tilde_posts[k - 1]
            )
            self.lambda_tilde_posts.append(lambda_tilde_k)
        self.lambda_posts = [None]  # shifts the indexing by 1
        for k in range(1, N):
            self.lambda_posts.append(self.lambdas[k] + self.lambda_tilde_posts[k - 1])
        lambda_N_post = self.n_data * self.lambdas[N] + self.lambda_tilde_posts[N - 1]
        self.lambda_posts.append(lambda_N_post)
        self.target_kappas = [None]
        self.target_kappas.extend([self.lambdas[k] / self.lambda_posts[k] for k in range(1, N)])
        self.target_mus = [None]
        self.target_mus.extend(
            [self.loc0 * self.lambda_tilde_posts[k - 1] / self.lambda_posts[k] for k in range(1, N)]
        )
        target_loc_N = (
            self.sum_data * self.lambdas[N] / lambda_N_post
            + self.loc0 * self.lambda_tilde_posts[N - 1] / lambda_N_post
        )
        self.target_mus.append(target_loc_N)

    def model(self, difficulty=0.0):
        next_mean = self.loc0
        for k in range(1, self.N + 1):
            latent_dist = dist.Normal(next_mean, torch.pow(self.lambdas[k - 1], -0.5))
            next_mean = pyro.sample(f"loc_latent_{k}", latent_dist)
        with pyro.plate("data", self.data.size(0)):
            pyro.sample(
                "obs",
                dist.Normal(next_mean, torch.pow(self.lambdas[self.N], -0.5)),
                obs=self.data,
            )
        return next_mean

    def guide(self, difficulty=0.0):
        previous_sample = None
        for k in reversed(range(1, self.N + 1)):
            loc_q = pyro.param(
                f"loc_q_{k}",
                self.target_mus[k].detach() + difficulty * (0.1 * torch.randn(1) - 0.53),
            )
            log_sig_q = pyro.param(
                f"log_sig_q_{k}",
                -0.5 * torch.log(self.lambda_posts[k]).data
                + difficulty * (0.1 * torch.randn(1) - 0.53),
            )
            sig_q = torch.exp(log_sig_q)
            kappa_q = None
            if k != self.N:
                kappa_q = pyro.param(
                    f"kappa_q_{k}",
                    self.target_kappas[k].data + difficulty * (0.1 * torch.randn(1) - 0.53),
                )
            mean_function = loc_q if k == self.N else kappa_q * previous_sample + loc_q
            previous_sample = pyro.sample(f"loc_latent_{k}", dist.Normal(mean_function, sig_q))
        return previous_sample

    def log_evidence(self) -> float:
        """log p(data): the data are jointly normal with one shared chain mean."""
        var = sum(1.0 / lam for lam in self.lambdas[: self.N])
        cov = (
            var * torch.ones(self.n_data, self.n_data)
            + torch.eye(self.n_data) / (self.lambdas[self.N])
        )
        mvn = dist.MultivariateNormal(self.loc0.expand(self.n_data), cov)
        return mvn.log_prob(self.data).item()


def gaussian_chain_case(N=3, difficulty=1.0) -> Case:
    chain = GaussianChain(N)
    return Case(chain.model, chain.guide, kwargs={"difficulty": difficulty})


# ----------------------------------------------- new: models without a local plate
def global_latent_case(subsample=False) -> Case:
    """Only global latents; the observations in a plate (a fixed minibatch if
    ``subsample``: no latent is in the subsampled plate)."""
    data = torch.tensor([0.3, -1.2, 0.8, 2.1, -0.4, 1.0])
    idx = torch.tensor([4, 1, 3]) if subsample else None

    def model():
        loc = pyro.sample("loc", dist.Normal(0.0, 2.0))
        log_scale = pyro.sample("log_scale", dist.Normal(0.0, 1.0))
        with pyro.plate("data", len(data), subsample=idx) as ind:
            pyro.sample("x", dist.Normal(loc, log_scale.exp()), obs=data[ind])

    def guide():
        loc_q = pyro.param("loc_q", torch.tensor(0.4))
        scale_q = pyro.param("scale_q", torch.tensor(0.6), constraint=constraints.positive)
        pyro.sample("loc", dist.Normal(loc_q, scale_q))
        ls_q = pyro.param("ls_q", torch.tensor([-0.2, 0.1]))
        pyro.sample("log_scale", dist.Normal(ls_q[0], ls_q[1].exp()))

    return Case(model, guide)


def obs_outside_plates_case() -> Case:
    """Observations outside every plate (one with an event dim, one scaled)."""
    x = torch.tensor(0.7)
    y = torch.tensor([0.1, -0.5, 1.3])

    def model():
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("x", dist.Normal(z, 1.0), obs=x)
        with poutine.scale(scale=0.5):
            loc = z.unsqueeze(-1).expand(z.shape + (3,))  # z has a particle dim, vectorized
            pyro.sample("y", dist.Normal(loc, 0.8).to_event(1), obs=y)

    def guide():
        loc = pyro.param("loc", torch.tensor(0.2))
        scale = pyro.param("scale", torch.tensor(0.9), constraint=constraints.positive)
        pyro.sample("z", dist.Normal(loc, scale))

    return Case(model, guide, max_plate_nesting=0)


def sequential_plate_case() -> Case:
    """Latents in a sequential ``for i in pyro.plate(...)`` loop, after Pyro's
    test_sequential_plating_sum (a Normal global for its Bernoulli one: the guide must be
    reparameterized); one observation masked out."""
    data = torch.tensor([0.5, -1.0, 1.5])

    def model():
        x = pyro.sample("x", dist.Normal(0.0, 1.0))
        for i in pyro.plate("seq", len(data)):
            z = pyro.sample(f"z_{i}", dist.Normal(x, 1.0))
            with poutine.mask(mask=i != 1):
                pyro.sample(f"data_{i}", dist.Normal(z, 0.5), obs=data[i])

    def guide():
        x_loc = pyro.param("x_loc", torch.tensor(0.1))
        pyro.sample("x", dist.Normal(x_loc, 0.7))
        locs = pyro.param("locs", torch.zeros(len(data)))
        scales = pyro.param("scales", torch.ones(len(data)), constraint=constraints.positive)
        for i in pyro.plate("seq", len(data)):
            pyro.sample(f"z_{i}", dist.Normal(locs[i], scales[i]))

    return Case(model, guide, max_plate_nesting=0)


def non_nested_plates_case() -> Case:
    """Pyro's test_non_nested_plating_sum: latents in a plate that holds no observation,
    observations in two other plates, a mask on some of them."""
    data = torch.randn([5, 3])
    weights = torch.randn([2, 3])
    mask = torch.tensor([True, False, True])

    def model(data, weights):
        loc = torch.tensor(1.0)
        scale = torch.tensor(0.1)
        with pyro.plate("x_plate", weights.shape[0]):
            x = pyro.sample("x", dist.Normal(loc, scale))
        with pyro.plate("data_plate_1", data.shape[-1]):
            with pyro.plate("data_plate_2", data.shape[-2]), poutine.mask(mask=mask):
                pyro.sample("data", dist.Normal(x @ weights, scale), obs=data)

    def guide(data, weights):
        loc = pyro.param("x_loc", torch.tensor(0.5))
        scale = pyro.param("x_scale", torch.tensor(0.1), constraint=constraints.positive)
        with pyro.plate("x_plate", weights.shape[0]):
            pyro.sample("x", dist.Normal(loc, scale))

    return Case(model, guide, (data, weights), max_plate_nesting=2)


NO_LOCAL_CASES = {
    "global_latent": global_latent_case,
    "global_latent_subsample": lambda: global_latent_case(subsample=True),
    "obs_outside_plates": obs_outside_plates_case,
    "sequential_plate": sequential_plate_case,
    "non_nested_plates": non_nested_plates_case,
    "gaussian_chain": gaussian_chain_case,
    "reparam_stable": reparam_stable_case,
}

TRACE_ELBO_CASES = {
    "particle": particle_case,
    "subsample_full": subsample_case,
    "subsample": lambda: subsample_case(subsample=True),
    "subsample_scaled": lambda: subsample_case(subsample=True, scale=2.0),
    "plate": lambda: plate_case(num_particles=1000),
    "plate_vectorized_particles": plate_vectorized_case,
    "subsample_sequential": subsample_sequential_case,
    **NO_LOCAL_CASES,
}


# ------------------------------------------------------ one particle is Trace_ELBO
@pytest.mark.parametrize("method", METHODS)
@VECTORIZE
@pytest.mark.parametrize("case", sorted(TRACE_ELBO_CASES))
def test_one_particle_equals_trace_elbo(float64, case, vectorize, method):
    case = TRACE_ELBO_CASES[case]()
    _init_params(case)
    trace_elbo = Trace_ELBO(
        num_particles=1, vectorize_particles=vectorize, max_plate_nesting=case.max_plate_nesting
    )
    for seed in (0, 1):
        expected = _evaluate(trace_elbo, method, case, seed)
        actual = _evaluate(_iwelbo(1, vectorize, case), method, case, seed)
        _assert_same(actual, expected)


# ------------------------------------------------ Pyro's test_gradient.py, extended
@VECTORIZE
@PARTICLES
def test_particle_gradient(float64, K, vectorize):
    draws = []
    case = particle_case(draws)
    elbo = _iwelbo(K, vectorize, case)
    loss = elbo.loss_and_grads(case.model, case.guide)
    params = _params()
    loc, scale = params["loc"], params["scale"]
    x = torch.tensor([-0.5, 2.0])
    z = _particles(draws, K, batch_dims=1)
    assert z.shape == (K, 2)
    expected_loss, dloc, dscale = _normal_normal_iwae(x, z, loc.detach(), scale.detach())
    assert loss == pytest.approx(expected_loss, abs=1e-6, rel=1e-6)
    torch.testing.assert_close(loc.grad, dloc, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(scale.grad, dscale.reshape(1), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("scale", [1.0, 2.0], ids=["unscaled", "scaled"])
@pytest.mark.parametrize("subsample", [False, True], ids=["full", "subsample"])
@VECTORIZE
@PARTICLES
def test_subsample_gradient(float64, K, vectorize, subsample, scale):
    """The subsample scale N/B (and a poutine.scale on model and guide) multiplies each
    datapoint's log-sum-exp from outside; gradients accumulate over the minibatches as in
    Pyro's test."""
    data = torch.tensor([-0.5, 2.0])
    draws = []
    case = subsample_case(subsample, scale, draws)
    elbo = _iwelbo(K, vectorize, case)
    batches = [torch.tensor([0]), torch.tensor([1])] if subsample else [torch.tensor([0, 1])]
    expected_loc = torch.zeros(2)
    expected_scale = torch.zeros(1)
    for idx in batches:
        loss = elbo.loss_and_grads(case.model, case.guide, idx)
        params = _params()
        z = _particles(draws, K, batch_dims=1)
        assert z.shape == (K, len(idx))
        factor = scale * len(data) / len(idx)
        expected_loss, dloc, dscale = _normal_normal_iwae(
            data[idx], z, params["loc"].detach()[idx], params["scale"].detach(), factor
        )
        assert loss == pytest.approx(expected_loss, abs=1e-6, rel=1e-6)
        expected_loc[idx] += dloc
        expected_scale += dscale
    torch.testing.assert_close(params["loc"].grad, expected_loc, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(params["scale"].grad, expected_scale, atol=1e-6, rtol=1e-6)


def test_plate(float64):
    """Pyro's expectation over a plate of 200000 ELBO particles, with one particle."""
    num_particles = 200000
    case = plate_case(num_particles)
    elbo = Trace_IWELBO(1, local_plate="data")
    SVI(case.model, case.guide, pyro.optim.Adam({"lr": 0.1}), elbo).loss_and_grads(
        case.model, case.guide
    )
    params = _params()
    actual = {name: p.grad.detach() / num_particles for name, p in params.items()}
    expected = {"loc": torch.tensor([0.5, -2.0]), "scale": torch.tensor([2.0])}
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], atol=0.06, rtol=0, msg=name)


@VECTORIZE
@PARTICLES
def test_plate_local_particles_plate(float64, K, vectorize):
    """test_plate's model with the outer plate as the local plate: each of its rows is a
    datapoint whose weight is the joint of both values of the inner plate."""
    draws = []
    case = plate_case(num_particles=3, draws=draws, local_plate="particles")
    elbo = _iwelbo(K, vectorize, case)
    loss = elbo.loss_and_grads(case.model, case.guide)
    params = _params()
    z = _particles(draws, K, batch_dims=2)
    assert z.shape == (K, 3, 2)
    x = torch.tensor([-0.5, 2.0])
    expected_loss, dloc, dscale = _normal_normal_iwae(
        x, z, params["loc"].detach(), params["scale"].detach(), local_dim=-2
    )
    assert loss == pytest.approx(expected_loss, abs=1e-6, rel=1e-6)
    torch.testing.assert_close(params["loc"].grad, dloc.sum(0), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(params["scale"].grad, dscale.reshape(1), atol=1e-6, rtol=1e-6)


@VECTORIZE
@PARTICLES
def test_plate_elbo_vectorized_particles(float64, K, vectorize):
    """The nuisance globals, drawn once and shared by the particles, cancel exactly."""
    draws = []
    case = plate_vectorized_case(draws)
    elbo = _iwelbo(K, vectorize, case)
    loss = elbo.loss_and_grads(case.model, case.guide)
    params = _params()
    z = _particles(draws, K, batch_dims=1)
    assert z.shape == (K, 2)
    x = torch.tensor([-0.5, 2.0])
    expected_loss, dloc, dscale = _normal_normal_iwae(
        x, z, params["loc"].detach(), params["scale"].detach()
    )
    assert loss == pytest.approx(expected_loss, abs=1e-6, rel=1e-6)
    torch.testing.assert_close(params["loc"].grad, dloc, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(params["scale"].grad, dscale.reshape(1), atol=1e-6, rtol=1e-6)


@VECTORIZE
@PARTICLES
def test_subsample_gradient_sequential(float64, K, vectorize):
    """A random minibatch, shared by the particles; the guide indexes its params."""
    data = torch.tensor([-0.5, 2.0])
    draws = []
    case = subsample_sequential_case(draws)
    elbo = _iwelbo(K, vectorize, case)
    for step in range(3):
        pyro.set_rng_seed(step)
        loss = elbo.loss_and_grads(case.model, case.guide)
        params = _params()
        calls = draws[-1:] if draws[-1][1].dim() == 2 else draws[-K:]
        ind = calls[0][0]
        assert all(torch.equal(i, ind) for i, _ in calls)
        z = _particles([v for _, v in calls], K, batch_dims=1)
        expected_loss, dloc, dscale = _normal_normal_iwae(
            data[ind], z, params["loc"].detach()[ind], params["scale"].detach(), 2.0
        )
        assert loss == pytest.approx(expected_loss, abs=1e-6, rel=1e-6)
        expected_loc = torch.zeros(2).index_add(0, ind, dloc)
        torch.testing.assert_close(params["loc"].grad, expected_loc, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(params["scale"].grad, dscale.reshape(1), atol=1e-6, rtol=1e-6)
        for p in params.values():
            p.grad = None


# ------------------------------------------ Pyro's test_inference.py: reparam_stable
@VECTORIZE
@pytest.mark.parametrize("K", [1, 3], ids=["K1", "K3"])
def test_reparam_stable(float64, K, vectorize):
    """A Delta guide draws nothing: all particles are equal, and the bound with its
    gradients is Trace_ELBO's for every K. Then Pyro's SVI run, shortened."""
    case = reparam_stable_case()
    _init_params(case)
    expected = _evaluate(Trace_ELBO(max_plate_nesting=1), "loss_and_grads", case)
    for method in METHODS:
        actual = _evaluate(_iwelbo(K, vectorize, case), method, case)
        _assert_same(actual, (expected[0], None if method == "loss" else expected[1]))

    svi = SVI(case.model, case.guide, pyro.optim.Adam({"lr": 0.01}), _iwelbo(K, vectorize, case))
    for _ in range(20):
        assert math.isfinite(svi.step())


# ------------------------------------------- Pyro's test_conjugate_gradients.py
@pytest.mark.parametrize("N", [3, 5])
def test_conjugate_chain_gradients(float64, N):
    """At the exact posterior all K importance weights are equal, so the IWAE gradient is
    the mean of K single-particle ELBO gradients: zero in expectation."""
    chain = GaussianChain(N)
    elbo = Trace_IWELBO(num_particles=100000, vectorize_particles=True, max_plate_nesting=1)
    elbo.loss_and_grads(chain.model, chain.guide)
    for i in range(1, N + 1):
        for prefix in ["loc_q", "log_sig_q", "kappa_q"]:
            if i == N and prefix == "kappa_q":
                continue
            grad = _params()[f"{prefix}_{i}"].grad
            torch.testing.assert_close(
                grad, torch.zeros_like(grad), atol=0.10, rtol=0, msg=f"{prefix}_{i}"
            )


@pytest.mark.parametrize("method", METHODS)
@VECTORIZE
@pytest.mark.parametrize("K", [1, 5, 100], ids=["K1", "K5", "K100"])
@pytest.mark.parametrize("N", [3, 5])
def test_conjugate_chain_exact_posterior(float64, N, K, vectorize, method):
    """At the exact posterior every log-weight is log p(x): looped and vectorized
    particles both give it exactly, and finite gradients."""
    chain = GaussianChain(N)
    case = Case(chain.model, chain.guide)
    _init_params(case)
    elbo = _iwelbo(K, vectorize, case)
    for seed in range(3):
        loss, grads = _evaluate(elbo, method, case, seed)
        assert loss == pytest.approx(-chain.log_evidence(), abs=1e-9)
        if grads is not None:
            assert all(torch.isfinite(g).all() for g in grads.values())


# ------------------------------------------------ NumPyro's test/infer/test_svi.py
@VECTORIZE
def test_renyi_elbo(float64, vectorize):
    """NumPyro's alpha=0 case: no latent, one observation, an empty guide."""

    def model(x):
        pyro.sample("obs", dist.Normal(0.0, 1.0), obs=x)

    def guide(x):
        pass

    def loss_and_grad(elbo):
        x = torch.tensor(2.0, requires_grad=True)
        pyro.set_rng_seed(0)
        loss = elbo.differentiable_loss(model, guide, x)
        (grad,) = torch.autograd.grad(loss, [x])
        return loss.item(), grad.item()

    elbo_loss, elbo_grad = loss_and_grad(Trace_ELBO())
    elbo = Trace_IWELBO(num_particles=10, vectorize_particles=vectorize, max_plate_nesting=0)
    renyi_loss, renyi_grad = loss_and_grad(elbo)
    assert renyi_loss == pytest.approx(elbo_loss, rel=1e-6)
    assert renyi_grad == pytest.approx(elbo_grad, rel=1e-6)
    assert renyi_loss == pytest.approx(2.0 + 0.5 * math.log(2 * math.pi), rel=1e-6)
    assert renyi_grad == pytest.approx(2.0, rel=1e-6)
    pyro.set_rng_seed(0)
    assert elbo.loss(model, guide, torch.tensor(2.0)) == pytest.approx(elbo_loss, rel=1e-6)


@VECTORIZE
def test_renyi_local(float64, vectorize):
    """Each particle's log p - log q is log(0.6) per datapoint; the subsample scale sits
    outside the log-sum-exp (NumPyro's fixed expectation, numpyro#1608)."""
    from pyro_amortized import objectives

    def model(subsample_size=None):
        with pyro.plate("N", 100, subsample_size=subsample_size):
            pyro.sample("x", dist.Normal(0.0, 1.0))
            pyro.sample("obs", dist.Bernoulli(0.6), obs=torch.tensor(1.0))

    def guide(subsample_size=None):
        with pyro.plate("N", 100, subsample_size=subsample_size):
            pyro.sample("x", dist.Normal(0.0, 1.0))

    elbo = Trace_IWELBO(num_particles=10, vectorize_particles=vectorize, max_plate_nesting=1)

    def renyi_loss_fn(subsample_size=None):
        pyro.set_rng_seed(0)
        loss = elbo.loss(model, guide, subsample_size)
        pyro.set_rng_seed(0)
        assert elbo.differentiable_loss(model, guide, subsample_size).item() == pytest.approx(
            loss, rel=1e-6
        )
        return loss

    full_loss = renyi_loss_fn()
    subsample_loss = renyi_loss_fn(subsample_size=2)
    assert full_loss == pytest.approx(-math.log(0.6) * 100, rel=1e-6)
    assert subsample_loss == pytest.approx(full_loss, rel=1e-6)

    for subsample_size, B in ((None, 100), (2, 2)):
        weights = objectives.log_weights(
            model,
            guide,
            subsample_size,
            num_particles=10,
            vectorize_particles=vectorize,
            max_plate_nesting=1,
        )
        assert weights.local_plate == "N"
        assert weights.log_w.shape == (10, B)
        torch.testing.assert_close(weights.log_w, torch.full((10, B), math.log(0.6)))


@VECTORIZE
def test_renyi_nonnested_plates(float64, vectorize):
    """Two plates of latents, neither nested in the other nor holding every site (NumPyro
    expects a scalar per-particle elbo): the joint bound, here of the model as its own
    guide, so every log-weight is 0."""
    from pyro_amortized import objectives

    def model():
        with pyro.plate("N", 10):
            pyro.sample("x", dist.Normal(0.0, 1.0))
        with pyro.plate("M", 10):
            pyro.sample("y", dist.Normal(0.0, 1.0))

    elbo = Trace_IWELBO(num_particles=10, vectorize_particles=vectorize, max_plate_nesting=1)
    pyro.set_rng_seed(0)
    assert elbo.loss(model, model) == pytest.approx(0.0, abs=1e-12)
    pyro.set_rng_seed(0)
    assert elbo.differentiable_loss(model, model).item() == pytest.approx(0.0, abs=1e-12)
    weights = objectives.log_weights(
        model, model, num_particles=10, vectorize_particles=vectorize, max_plate_nesting=1
    )
    assert weights.local_plate is None
    assert weights.log_w.shape == (10,)
    torch.testing.assert_close(weights.log_w, torch.zeros(10), atol=1e-12, rtol=0)


def _create_plates_model():
    N, M, K = 3, 4, 5
    data = torch.linspace(0.1, 0.9, N * M * K).reshape((N, M, K))

    def model(data, n=N, k=K, fix_indices=True):
        with pyro.plate("N", N, subsample_size=n, dim=-3):
            with pyro.plate("M", M, dim=-2):
                with pyro.plate("K", K, subsample_size=k, dim=-1):
                    if fix_indices:
                        batch = data[:n, :, :k]
                    else:
                        batch = pyro.subsample(data, event_dim=0)
                    pyro.sample("data", dist.Bernoulli(batch), obs=torch.tensor(1.0))

    def guide(data, n=N, k=K, fix_indices=True):
        pass

    return model, guide, data


@VECTORIZE
@pytest.mark.parametrize("n,k", [(3, 5), (2, 5), (3, 3), (2, 3)], ids=str)
def test_renyi_create_plates(float64, n, k, vectorize):
    """Subsampled plates holding only observations: no local plate, scaled log-densities."""
    from pyro_amortized import objectives

    P = 10
    N, K = 3, 5
    model, guide, data = _create_plates_model()
    elbo = Trace_IWELBO(num_particles=P, vectorize_particles=vectorize, max_plate_nesting=3)

    def get_renyi(n=N, k=K, fix_indices=True):
        pyro.set_rng_seed(0)
        return -elbo.loss(model, guide, data, n=n, k=k, fix_indices=fix_indices)

    expected_scale = N * K / n / k
    expected_elbo = torch.log(data)[:n, :, :k]
    renyi = get_renyi(n=n, k=k)
    assert renyi == pytest.approx((expected_elbo.sum() * expected_scale).item(), rel=1e-6)
    pyro_renyi = RenyiELBO(
        alpha=0, num_particles=P, vectorize_particles=vectorize, max_plate_nesting=3
    )
    pyro.set_rng_seed(0)
    assert -pyro_renyi.loss(model, guide, data, n=n, k=k) == pytest.approx(renyi, rel=1e-6)

    # Random minibatches: with vectorized particles one draw of the indices is shared by
    # all particles, as in NumPyro; looped particles each draw their own (as Pyro's
    # RenyiELBO does), so the bound mixes minibatches and matches no single one.
    if (n, k) == (2, 5) and vectorize:
        renyi_random = get_renyi(n=2, fix_indices=False)
        log_data = torch.log(data)
        candidates = torch.stack(
            [log_data[torch.tensor(idx)].sum() * N / 2 for idx in ([0, 1], [0, 2], [1, 2])]
        )
        atol = (candidates - renyi_random).abs().min().item()
        assert atol == pytest.approx(0.0, abs=1e-5)

    weights = objectives.log_weights(
        model,
        guide,
        data,
        n=n,
        k=k,
        num_particles=P,
        vectorize_particles=vectorize,
        max_plate_nesting=3,
    )
    # Every site sits in all three plates, so the model factorizes over their elements:
    # one scaled log-weight per element (flattened), as RenyiELBO's common plates.
    assert weights.local_plate is None
    assert weights.log_w.shape == (P, n * expected_elbo.shape[1] * k)
    torch.testing.assert_close(
        weights.log_w,
        (expected_elbo * expected_scale).reshape(1, -1).expand(P, -1),
        rtol=1e-6,
        atol=0,
    )


# --------------------------------- new: without a local plate it is RenyiELBO(alpha=0)
@VECTORIZE
@PARTICLES
@pytest.mark.parametrize("case", sorted(NO_LOCAL_CASES))
def test_no_local_plate_equals_renyi(float64, case, K, vectorize):
    """Loss, differentiable_loss and loss_and_grads equal RenyiELBO(alpha=0)'s on the
    same draws, in value and in the gradients of every param; the same explicit
    max_plate_nesting for both, so neither guesses it with an extra draw."""
    case = NO_LOCAL_CASES[case]()
    _init_params(case)
    m = case.max_plate_nesting
    renyi = RenyiELBO(alpha=0, num_particles=K, vectorize_particles=vectorize, max_plate_nesting=m)
    expected_loss, _ = _evaluate(renyi, "loss", case)
    expected = _evaluate(renyi, "loss_and_grads", case)
    assert expected[0] == pytest.approx(expected_loss, rel=1e-9)  # the same draws
    for method in METHODS:
        for seed in (0, 1):
            want = _evaluate(renyi, "loss_and_grads", case, seed)
            if method == "loss":
                want = (want[0], None)
            _assert_same(_evaluate(_iwelbo(K, vectorize, case), method, case, seed), want)


@VECTORIZE
@pytest.mark.parametrize("case", sorted(set(NO_LOCAL_CASES) - {"reparam_stable"}))
def test_no_local_plate_log_weights(float64, case, vectorize):
    """log_weights finds no local plate and gives the [K] joint log-weights of the loss.

    (reparam_stable is left out: whether its plate "time2" counts as local depends on how
    the reparameterized Stable sites count; its bound is the same either way.)
    """
    from pyro_amortized import objectives

    K = 5
    case = NO_LOCAL_CASES[case]()
    _init_params(case)
    kwargs = case.kwargs or {}
    pyro.set_rng_seed(0)
    weights = objectives.log_weights(
        case.model,
        case.guide,
        *case.args,
        num_particles=K,
        vectorize_particles=vectorize,
        max_plate_nesting=case.max_plate_nesting,
        **kwargs,
    )
    assert weights.local_plate is None
    assert weights.log_w.shape == (K,)
    assert torch.isfinite(weights.log_w).all()
    loss, _ = _evaluate(_iwelbo(K, vectorize, case), "loss", case)
    expected = -(torch.logsumexp(weights.log_w, 0) - math.log(K)).item()
    assert loss == pytest.approx(expected, abs=1e-6, rel=1e-6)


@pytest.mark.parametrize("case", ["global_latent", "gaussian_chain", "obs_outside_plates"])
def test_looped_and_vectorized_particles_finite(float64, case):
    """Looped particles used to fail on models without local latents ("zero-dimensional
    tensor (at position 0) cannot be concatenated"); both ways now give finite values and
    gradients, and agree in expectation."""
    case = NO_LOCAL_CASES[case]()
    _init_params(case)
    means = {}
    for vectorize in (True, False):
        elbo = _iwelbo(5, vectorize, case)
        losses = []
        for seed in range(40):
            loss, grads = _evaluate(elbo, "loss_and_grads", case, seed)
            assert math.isfinite(loss)
            assert all(torch.isfinite(g).all() for g in grads.values())
            losses.append(loss)
        losses = torch.tensor(losses)
        means[vectorize] = (losses.mean().item(), losses.std().item() / math.sqrt(len(losses)))
    (m1, s1), (m2, s2) = means[True], means[False]
    assert abs(m1 - m2) < 5 * math.hypot(s1, s2) + 1e-9
