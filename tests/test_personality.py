import math

import pyro
import pytest
import torch
from pyro import poutine

from models.personality import (
    FactorModel,
    congruence,
    generate_questionnaire,
    oblimin,
    varimax,
)
from pyro_amortized import AutoAmortizedNormal, Trace_IWELBO, fit
from pyro_amortized.optim import Adam


def _simple_structure(D: int = 12, Q: int = 3, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    loadings = 0.05 * torch.randn(D, Q, generator=generator, dtype=torch.float64)
    loadings[torch.arange(D), torch.arange(D) % Q] = 1 + torch.rand(
        D, generator=generator, dtype=torch.float64
    )
    return loadings


def _random_rotation(Q: int, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(Q, Q, generator=generator, dtype=torch.float64))
    return q


@pytest.mark.parametrize("rotate", [varimax, oblimin])
def test_rotations_recover_a_rotated_simple_structure(rotate):
    truth = _simple_structure()
    rotated, _ = rotate(truth @ _random_rotation(3))
    per_factor, _, _ = congruence(rotated, truth)
    assert (per_factor > 0.999).all(), per_factor


def test_varimax_returns_an_orthogonal_rotation_and_oblimin_a_correlation_matrix():
    loadings = _simple_structure() @ _random_rotation(3)
    rotated, rotation = varimax(loadings)
    assert torch.allclose(rotation.T @ rotation, torch.eye(3, dtype=torch.float64), atol=1e-10)
    assert torch.allclose(loadings @ rotation, rotated)
    _, phi = oblimin(loadings)
    assert torch.allclose(phi.diagonal(), torch.ones(3, dtype=torch.float64), atol=1e-10)


def test_congruence_aligns_permuted_and_flipped_factors():
    truth = _simple_structure()
    shuffled = truth[:, [2, 0, 1]] * torch.tensor([1.0, -1.0, 1.0], dtype=torch.float64)
    per_factor, order, signs = congruence(shuffled, truth)
    assert torch.allclose(per_factor, torch.ones(3, dtype=torch.float64))
    assert torch.equal(shuffled[:, order] * signs, truth)


@pytest.mark.parametrize("likelihood", ["grm", "linear"])
def test_masking_a_cell_changes_only_that_cells_likelihood_term(likelihood):
    q = generate_questionnaire(6, num_factors=2, items_per_factor=3, missing=0.0, seed=1)
    model = FactorModel(6, 2, likelihood=likelihood)
    z = torch.randn(6, 2)

    def log_lik(answers):
        conditioned = poutine.condition(model, data={"z": z})
        trace = poutine.trace(conditioned).get_trace(answers)
        return trace.nodes["answers"]["fn"].log_prob(trace.nodes["answers"]["value"])

    full = log_lik(q.answers)
    hidden = q.answers.clone()
    hidden[2, 4] = math.nan
    masked = log_lik(hidden)
    # only row 2 changes, by exactly the hidden cell's term
    cell = model.answer_distribution(z[2]).log_prob(
        q.answers[2] - 1 if likelihood == "grm" else q.answers[2]
    )[4]
    assert torch.equal(masked[[0, 1, 3, 4, 5]], full[[0, 1, 3, 4, 5]])
    assert torch.allclose(full[2] - masked[2], cell.detach(), atol=1e-6)


def test_encode_on_new_people_equals_the_guides_posterior_for_those_rows():
    q = generate_questionnaire(200, num_factors=2, items_per_factor=3, seed=2)
    pyro.clear_param_store()
    model = FactorModel(6, 2, item_means=q.answers.nanmean(0))
    guide = AutoAmortizedNormal(model, local_plate="people", hidden_dims=(16,))
    fit(
        model,
        guide,
        Trace_IWELBO(5),
        q.answers,
        epochs=2,
        batch_size=50,
        optimizer=Adam({"lr": 1e-2}),
        progress=False,
    )
    new = generate_questionnaire(7, num_factors=2, items_per_factor=3, seed=3).answers
    new[0] = math.nan  # a person who answered nothing
    posterior = guide.encode(new)["z"]
    # the same people as a minibatch of a larger data set: the guide draws their z from
    # the same distributions
    combined = torch.cat([q.answers, new])
    idx = torch.arange(200, 207)
    trace = poutine.trace(guide).get_trace(combined, idx)
    fn = trace.nodes["z"]["fn"]
    assert torch.allclose(fn.mean, posterior.mean) and torch.allclose(fn.stddev, posterior.stddev)
    assert posterior.mean.shape == (7, 2)
    assert torch.isfinite(posterior.mean).all()


@pytest.mark.slow
def test_fit_recovers_known_loadings_on_synthetic_answers():
    q = generate_questionnaire(2000, seed=0)
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    model = FactorModel(25, 5, item_means=q.answers.nanmean(0))
    guide = AutoAmortizedNormal(model, local_plate="people", hidden_dims=(128,))
    fit(
        model,
        guide,
        Trace_IWELBO(5, estimator="dreg"),
        q.answers,
        epochs=30,
        batch_size=128,
        optimizer=Adam({"lr": 1e-2}),
        progress=False,
    )
    rotated, _ = oblimin(model.loadings.detach())
    per_factor, _, _ = congruence(rotated, q.loadings)
    assert (per_factor >= 0.95).all(), per_factor
