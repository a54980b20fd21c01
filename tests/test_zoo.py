"""The acceptance zoo (tests/zoo.py): Pyro's example models, as a user writes them, with
the amortized guide in place of the example's hand-written one.

Each case checks what a user would: training lowers the loss, the guide reaches the
hand-written guide's bound within a stated margin (2% of it, per datapoint, after the
same steps and seed), ``Predictive`` and ``log_marginal_likelihood`` work, and so does
``Trace_IWELBO`` (or it says what to use instead).
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
    window = max(2, len(losses) // 10)
    return sum(losses[-window:]) < sum(losses[:window])


@pytest.mark.slow
@pytest.mark.parametrize("key", list(zoo.CASES))
def test_zoo_amortized_guide_trains_as_well_as_the_hand_written_one(key):
    case = zoo.CASES[key]
    built = case.build()
    hand_losses, _ = zoo.train(built, built.hand, case)
    hand_bound = zoo.bound(built, built.hand, case)
    guide = built.ours()
    losses, _ = zoo.train(built, guide, case)
    our_bound = zoo.bound(built, guide, case)
    assert _falls(hand_losses) and _falls(losses)
    assert our_bound >= hand_bound - MARGIN * abs(hand_bound), (our_bound, hand_bound)

    batch = built.batches[0]
    samples = Predictive(built.model, guide=guide, num_samples=3)(*batch)
    for name in _observed(built.model, batch):
        assert samples[name].shape[0] == 3
    for network in built.networks:
        network.eval()  # evaluated as a user does: BatchNorm on its running statistics
    if case.iwelbo != "refused":
        log_px = log_marginal_likelihood(built.model, guide, *batch, num_samples=20, progress=False)
        assert torch.isfinite(log_px).all()


def _observed(model, args) -> list[str]:
    with pyro.poutine.block(), torch.no_grad():
        trace = pyro.poutine.trace(model).get_trace(*args)
    return [n for n, s in trace.nodes.items() if s["type"] == "sample" and s["is_observed"]]


@pytest.mark.parametrize("key", list(zoo.CASES))
def test_zoo_importance_weighted_bound_trains_or_says_why_not(key):
    case = zoo.CASES[key]
    built = case.build()
    guide = built.ours()
    batch = built.batches[0]
    guide(*batch)
    elbo = Trace_IWELBO(5, estimator="dreg")
    if case.iwelbo == "refused":
        with pytest.raises(ValueError, match=case.refusal):
            elbo.loss(built.model, guide, *batch)
        return
    if case.iwelbo == "batchnorm":
        # ProdLDA's BatchNorm couples the minibatch's rows in training mode: refused, with
        # what to do; in eval() mode it takes no particle dimension: the error names it
        with pytest.raises(ValueError, match="(?s)BatchNorm in training mode.*eval\\(\\)"):
            elbo.loss(built.model, guide, *batch)
        for network in built.networks:
            network.eval()
        with pytest.raises(ParticleVectorizationError, match="(?s)BatchNorm1d.*vectorize_part"):
            Trace_IWELBO(5, estimator="dreg").loss(built.model, guide, *batch)
        elbo = Trace_IWELBO(5, estimator="dreg", vectorize_particles=False)
    quick = zoo.Case(case.name, case.build, steps=60, lr=case.lr)
    losses, _ = zoo.train(built, guide, quick, elbo=elbo)
    assert all(math.isfinite(v) for v in losses) and _falls(losses)
