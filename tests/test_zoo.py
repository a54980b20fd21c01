"""The acceptance zoo (tests/zoo.py): Pyro's example models, as a user writes them, with
the amortized guide in place of the example's hand-written one.

Each case checks what a user would: training lowers the loss, the guide reaches the
hand-written guide's bound within a stated margin (2% of it, per datapoint, after the
same steps), ``Predictive`` and ``log_marginal_likelihood`` work, and so does
``Trace_IWELBO``.
"""

import math

import pyro
import pytest
import torch
import zoo
from pyro.infer import Predictive

from pyro_amortized import Trace_IWELBO
from pyro_amortized.diagnostics import log_marginal_likelihood
from pyro_amortized.objectives import ParticleVectorizationError

MARGIN = 0.02  # of the hand-written guide's bound, per datapoint


def _falls(losses) -> bool:
    window = max(1, len(losses) // 10)
    return sum(losses[-window:]) < sum(losses[:window])


@pytest.mark.slow
@pytest.mark.parametrize("key", sorted(zoo.CASES))
def test_zoo_amortized_guide_trains_as_well_as_the_hand_written_one(key):
    case = zoo.CASES[key]
    model, args, hand, ours = case.build()
    hand_losses, _ = zoo.train(model, hand, args, case)
    hand_bound = zoo.bound(model, hand, args, case)
    guide = ours()
    losses, _ = zoo.train(model, guide, args, case)
    our_bound = zoo.bound(model, guide, args, case)
    assert _falls(hand_losses) and _falls(losses)
    assert our_bound >= hand_bound - MARGIN * abs(hand_bound), (our_bound, hand_bound)

    samples = Predictive(model, guide=guide, num_samples=3)(*args)
    observed = [name for name, site in _trace(model, args).nodes.items() if _is_obs(site)]
    for name in observed:
        assert samples[name].shape[0] == 3
    log_px = log_marginal_likelihood(model, guide, *args, num_samples=20, progress=False)
    assert torch.isfinite(log_px).all()
    assert log_px.mean().item() >= our_bound - 5 * log_px.std().item() / math.sqrt(len(log_px))


def _trace(model, args):
    with pyro.poutine.block(), torch.no_grad():
        return pyro.poutine.trace(model).get_trace(*args)


def _is_obs(site) -> bool:
    return site["type"] == "sample" and site["is_observed"] and not site["name"].endswith("_")


@pytest.mark.parametrize("key", sorted(zoo.CASES))
def test_zoo_importance_weighted_bound_trains(key):
    case = zoo.CASES[key]
    model, args, _, ours = case.build()
    guide = ours()
    guide(*args)
    elbo = Trace_IWELBO(5, estimator="dreg")
    try:
        elbo.loss(model, guide, *args)
    except ParticleVectorizationError as error:  # ProdLDA's BatchNorm: told what to do
        assert "BatchNorm1d" in str(error) and "vectorize_particles=False" in str(error)
        elbo = Trace_IWELBO(5, estimator="dreg", vectorize_particles=False)
    svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": case.lr}), elbo)
    losses = [svi.step(*args) for _ in range(40)]
    assert all(math.isfinite(v) for v in losses) and _falls(losses)
