"""The skill benchmark's baselines (models/_skill_baselines.py): their probabilities, their
optima, what they recover of a synthetic league, and the trueskill package's own updates."""

import math
import statistics
from dataclasses import replace

import pytest
import torch

from models._skill_baselines import (
    BASELINES,
    BETA_GRID,
    RIDGE_GRID,
    VALIDATION_FRACTION,
    BradleyTerryFit,
    bradley_terry_loss,
    draw_rate_baseline,
    fit_baselines,
    fit_bradley_terry,
    game_log_loss,
    paired_difference,
    trueskill_fit,
)
from models.tournaments import BETA, DRAW, LOSS, WIN, draw_margin, generate_league

trueskill = pytest.importorskip("trueskill")

HOME = BETA / 2  # the generator's home advantage, in skill units
VARIANTS = [(draws, home) for draws in (False, True) for home in (False, True)]


@pytest.fixture(scope="module")
def league():
    """A static league (no drift) with home advantage and draws: 1900 games."""
    torch.set_num_threads(1)
    return generate_league(20, 5, home_advantage=HOME, draw_probability=0.25, seed=3)


@pytest.fixture(scope="module")
def split(league):
    return league.split(0.8)


@pytest.fixture(scope="module")
def baselines(split):
    return fit_baselines(split[0])


def test_every_baseline_gives_probabilities_and_times_itself(baselines, split):
    test = split[1]
    assert list(baselines) == list(BASELINES)
    for name, fit in baselines.items():
        probs = fit.probs(test.games)
        assert probs.shape == (len(test), 3) and probs.dtype == torch.float64, name
        assert torch.allclose(probs.sum(-1), torch.ones(len(test), dtype=torch.float64)), name
        assert ((probs > 0) & (probs < 1)).all(), name
        assert fit.fit_time > 0, name
        assert game_log_loss(probs, test.games).isfinite().all(), name


def test_draw_rate_baseline_reproduces_the_training_draw_rate(split):
    train, test = split
    fit = draw_rate_baseline(train)
    rate = int(train.draw.sum()) / len(train)
    assert 0 < rate < 1
    probs = fit.probs(test.games)
    assert (probs[:, DRAW] == rate).all()
    assert (probs[:, WIN] == probs[:, LOSS]).all()
    assert (probs[:, WIN] == (1 - rate) / 2).all()


@pytest.mark.parametrize("draws, home", VARIANTS)
def test_bradley_terry_sits_at_the_penalized_optimum(league, draws, home):
    fit = fit_bradley_terry(league, draws=draws, home=home)
    assert fit.ridge in RIDGE_GRID and set(fit.validation) == set(RIDGE_GRID)
    assert fit.validation[fit.ridge] == min(fit.validation.values())

    def gradient(x):
        x = x.clone().requires_grad_()
        loss = bradley_terry_loss(
            x, league.games, league.num_players, draws=draws, home=home, ridge=fit.ridge
        )
        (grad,) = torch.autograd.grad(loss, x)
        return grad.abs().max()

    # float64 resolves a loss in the thousands to ~1e-13: a gradient near 1e-6 is its floor
    assert gradient(torch.zeros_like(fit.parameters)) > 10
    assert gradient(fit.parameters) < 1e-4
    assert fit.home == home and fit.draws == draws
    assert (fit.home_advantage != 0) == home and (fit.threshold > 0) == draws


@pytest.mark.parametrize("draws", [False, True])
def test_bradley_terry_probs_are_the_stated_formulas(split, draws):
    train, test = split
    fit = fit_bradley_terry(train, draws=draws, home=True, ridge=0.1)
    games = test.games
    delta = (
        fit.skills[games[:, 0]]
        - fit.skills[games[:, 1]]
        + fit.home_advantage * games[:, 3].double()
    )
    probs = fit.probs(games)
    if draws:
        c = fit.threshold
        win, loss = torch.sigmoid(delta - c), torch.sigmoid(-delta - c)
        draw = 1 - win - loss
    else:
        d = fit.draw_rate
        win, loss = (1 - d) * torch.sigmoid(delta), (1 - d) * torch.sigmoid(-delta)
        draw = torch.full_like(delta, d)
    expected = torch.stack([loss, draw, win], dim=-1)
    assert torch.allclose(probs, expected, rtol=1e-12, atol=1e-15)


def test_ordered_logit_log_draw_is_stable_in_the_tails():
    """log P(draw) from log-sigmoids: finite and right where 1 - P(win) - P(loss) is 0."""
    skills = torch.tensor([0.0, 60.0], dtype=torch.float64)
    fit = BradleyTerryFit(
        skills=skills,
        home_advantage=0.0,
        threshold=0.5,
        draw_rate=0.2,
        ridge=1.0,
        draws=True,
        home=False,
        parameters=skills,
    )
    games = torch.tensor([[0, 1, 1, 0, 0], [1, 0, 1, 0, 0]])
    log_draw = fit.log_probs(games)[:, DRAW]
    # P(draw) = sigma(c - |D|) - sigma(-c - |D|) ~ e^{-|D|} (e^c - e^{-c}) for large |D|
    expected = -60.0 + math.log(math.exp(0.5) - math.exp(-0.5))
    assert torch.allclose(log_draw, torch.full((2,), expected, dtype=torch.float64), rtol=1e-10)


def test_bradley_terry_home_advantage_is_recovered(league):
    """The generator is probit: in logit units its home advantage is about 1.702 eta /
    (sqrt 2 beta); the ordered logit's estimate lies within 5 standard errors (the inverse
    Hessian's) of it, and the logistic's is positive by more than 3."""
    truth = 1.702 * HOME / (math.sqrt(2) * BETA)
    ordered = fit_bradley_terry(league, draws=True, home=True)
    se = float(ordered.covariance(league)[league.num_players, league.num_players].sqrt())
    assert 0 < se < 0.1
    assert abs(ordered.home_advantage - truth) < 5 * se
    logistic = fit_bradley_terry(league, draws=False, home=True)
    se = float(logistic.covariance(league)[league.num_players, league.num_players].sqrt())
    assert logistic.home_advantage > 3 * se


def test_ordered_logit_without_draws_is_the_logistic(league):
    """No draws: the ordered logit's threshold goes to 0, where its likelihood is the
    logistic's, so the two fits agree."""
    decisive = league.subset(~league.draw)
    ordered = fit_bradley_terry(decisive, draws=True, home=True, ridge=0.1)
    logistic = fit_bradley_terry(decisive, draws=False, home=True, ridge=0.1)
    assert 0 < ordered.threshold < 1e-6
    assert torch.allclose(ordered.skills, logistic.skills, atol=1e-5)
    assert ordered.home_advantage == pytest.approx(logistic.home_advantage, abs=1e-5)
    assert torch.allclose(ordered.probs(league.games), logistic.probs(league.games), atol=1e-5)


@pytest.mark.parametrize("draws", [False, True])
def test_home_term_is_inert_on_neutral_games(league, draws):
    neutral = replace(league, home=torch.zeros_like(league.home))
    with_home = fit_bradley_terry(neutral, draws=draws, home=True)
    without = fit_bradley_terry(neutral, draws=draws, home=False)
    # eta's gradient is exactly 0 on neutral ground, so it never moves; the rest is the
    # same optimum, reached to the optimizer's accuracy (a gradient near 1e-6)
    assert with_home.home_advantage == 0.0
    assert with_home.ridge == without.ridge
    assert torch.allclose(with_home.skills, without.skills, rtol=0, atol=1e-6)
    assert with_home.threshold == pytest.approx(without.threshold, abs=1e-6)
    assert with_home.validation == pytest.approx(without.validation, abs=1e-9)


def test_trueskill_default_is_the_packages_own_loop(league):
    games = league.subset(slice(0, 40))
    fit = trueskill_fit(games)
    rate = int(games.draw.sum()) / len(games)
    assert 0 < rate < 1
    env = trueskill.TrueSkill(draw_probability=rate)  # every other setting the package's
    assert (fit.beta, fit.tau, fit.draw_probability) == (env.beta, env.tau, env.draw_probability)
    ratings = [env.create_rating() for _ in range(games.num_players)]
    for w, ell, d in zip(
        games.winner.tolist(), games.loser.tolist(), games.draw.tolist(), strict=True
    ):
        ratings[w], ratings[ell] = trueskill.rate_1vs1(ratings[w], ratings[ell], drawn=d, env=env)
    assert fit.mu.tolist() == [r.mu for r in ratings]
    assert fit.sigma.tolist() == [r.sigma for r in ratings]
    assert (fit.mu != env.mu).sum() >= 10


def test_trueskill_probs_are_the_formula(split):
    train, test = split
    fit = trueskill_fit(train)
    games = test.games
    i, j = games[:, 0], games[:, 1]
    c = (2 * fit.beta**2 + fit.sigma[i] ** 2 + fit.sigma[j] ** 2).sqrt()
    # the margin in float64 (the package's own calc_draw_margin approximates the same
    # inverse cdf, to ~1e-7)
    margin = statistics.NormalDist().inv_cdf((1 + fit.draw_probability) / 2)
    margin *= math.sqrt(2) * fit.beta
    assert margin == pytest.approx(draw_margin(fit.draw_probability, fit.beta), rel=1e-6)
    gap = fit.mu[i] - fit.mu[j]
    win, loss = torch.special.ndtr((gap - margin) / c), torch.special.ndtr((-gap - margin) / c)
    expected = torch.stack([loss, 1 - win - loss, win], dim=-1)
    assert torch.allclose(fit.probs(games), expected, rtol=1e-10, atol=1e-14)


def test_tuned_beta_is_chosen_on_the_validation_tail(split, baselines):
    train = split[0]
    tuned = baselines["trueskill, tuned β"]
    assert tuned.beta in BETA_GRID and set(tuned.validation) == set(BETA_GRID)
    assert tuned.validation[tuned.beta] == min(tuned.validation.values())
    # the default, passed over the same head and scored on the same tail by hand
    head, tail = train.split(VALIDATION_FRACTION)
    default = trueskill_fit(head)
    default_loss = float(game_log_loss(default.probs(tail.games), tail.games).mean())
    assert tuned.validation[BETA] == pytest.approx(default_loss, rel=1e-12)
    assert tuned.validation[tuned.beta] <= default_loss
    # the final ratings come from one pass over all of train with the chosen beta
    again = trueskill_fit(train, beta=tuned.beta)
    assert torch.equal(again.mu, tuned.mu) and torch.equal(again.sigma, tuned.sigma)


def test_game_log_loss_and_paired_difference_by_hand():
    games = torch.tensor([[0, 1, 0, 0, 0], [1, 2, 1, 1, 0], [2, 0, 0, -1, 0]])
    probs = torch.tensor([[0.2, 0.3, 0.5], [0.1, 0.6, 0.3], [0.3, 0.3, 0.4]], dtype=torch.float64)
    loss = game_log_loss(probs, games)
    assert loss.tolist() == pytest.approx([-math.log(0.5), -math.log(0.6), -math.log(0.4)])

    a = torch.tensor([0.7, 0.2, 1.3, 0.9, 0.4], dtype=torch.float64)
    b = torch.tensor([0.5, 0.4, 1.0, 1.0, 0.1], dtype=torch.float64)
    mean, se = paired_difference(a, b)
    differences = (a - b).tolist()
    assert mean == pytest.approx(statistics.mean(differences), rel=1e-12)
    assert se == pytest.approx(statistics.stdev(differences) / math.sqrt(5), rel=1e-12)


def test_bad_arguments_are_refused_by_name(split):
    train = split[0]
    with pytest.raises(ValueError, match="ridge must be"):
        fit_bradley_terry(train, draws=True, home=True, ridge=0.0)
    with pytest.raises(ValueError, match="ridge_grid"):
        fit_bradley_terry(train, draws=True, home=True, ridge_grid=())
    with pytest.raises(ValueError, match="pass ridge="):
        fit_bradley_terry(train.subset(slice(0, 1)), draws=False, home=False)
    with pytest.raises(ValueError, match="beta must be"):
        trueskill_fit(train, beta=-1.0)
    with pytest.raises(ValueError, match="not both"):
        trueskill_fit(train, beta=BETA, tune_beta=True)
    with pytest.raises(ValueError, match="tau must be"):
        trueskill_fit(train, tau=-0.1)
    with pytest.raises(ValueError, match="beta_grid"):
        trueskill_fit(train, tune_beta=True, beta_grid=[1.0, 0.0])
    with pytest.raises(ValueError, match="paired_difference"):
        paired_difference(torch.zeros(3), torch.zeros(4))
    with pytest.raises(ValueError, match="game_log_loss"):
        game_log_loss(torch.full((2, 3), 1 / 3), train.games[:3])
    fit = fit_bradley_terry(train, draws=False, home=False, ridge=1.0)
    bad = train.games[:2].clone()
    bad[0, 1] = train.num_players
    with pytest.raises(ValueError, match="player"):
        fit.probs(bad)
