r"""The baselines a skill model is benchmarked against, each fitted on the training games
of a chronological split and asked for ``[G, 3]`` probabilities of a held-out game's
result seen from its first side (loses, draws, wins), like the model's own predictions.

- :func:`draw_rate_baseline`: always 50% plus the training draw rate.
- :func:`fit_bradley_terry`: Bradley–Terry, logistic (a draw counted as half a win and
  half a loss; P(draw) the training draw rate) or ordered logit (draws modelled by a
  learned threshold), each with or without a home advantage; penalized maximum
  likelihood by L-BFGS, the ridge chosen on a chronological validation tail.
- :func:`trueskill_fit`: one pass of the ``trueskill`` package's updates, with its default
  environment or with :math:`\beta` tuned on a chronological validation tail.
- :func:`fit_baselines`: all seven, by name (:data:`BASELINES`).
- :func:`game_log_loss` and :func:`paired_difference`: per-game log-loss and the paired
  difference of two methods with its standard error.

**The ridge's units.** Bradley–Terry maximizes the log-likelihood *summed* over games minus
:math:`\lambda \sum_i s_i^2`, the MAP estimate under skills :math:`s_i \sim N(0, 1/(2\lambda))`
(logit units). So :math:`2\lambda` is a prior's precision, and :math:`\lambda` is not
rescaled by the number of games per player (scale 1): the summed likelihood already
outweighs a fixed penalty more as a player's games grow, and the validation fit (80% of the
games) and the final fit (all of them) mean the same prior. The grid :data:`RIDGE_GRID`,
:math:`10^{-3}` to :math:`10` in half-decades, spans prior sds from 22 to 0.22 logits: from
nearly unpenalized to skills hardly apart (a synthetic league's with TrueSkill's defaults
spread about 2.4 logits).

Every fit records its own wall-clock time, validation fits included, as ``fit_time``.

Example:
    >>> from models.tournaments import generate_league
    >>> train, test = generate_league(20, 2, home_advantage=2.0, seed=0).split(0.8)
    >>> fit = fit_bradley_terry(train, draws=False, home=True)
    >>> fit.probs(test.games).shape
    torch.Size([152, 3])
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

import torch
from torch import Tensor
from torch.nn import functional as F

from models._numerics import softplus_inverse
from models._skill_likelihood import game_results, probit_outcome
from models.tournaments import BETA, MU, SIGMA, Tournament
from models.trueskill import check_games, predict

__all__ = [
    "BASELINES",
    "BETA_GRID",
    "RIDGE_GRID",
    "TAU",
    "VALIDATION_FRACTION",
    "Baseline",
    "BradleyTerryFit",
    "DrawRateBaseline",
    "TrueSkillFit",
    "bradley_terry_loss",
    "draw_rate_baseline",
    "fit_baselines",
    "fit_bradley_terry",
    "game_log_loss",
    "paired_difference",
    "trueskill_fit",
]

#: The ``trueskill`` package's default dynamics: the sd added to a rating before a game.
TAU = SIGMA / 100.0
#: The share of the training games a hyperparameter's validation fit sees; it is scored
#: on the rest, which come later.
VALIDATION_FRACTION = 0.8
#: The ridges :func:`fit_bradley_terry` chooses from: :math:`10^{-3}` to :math:`10` in
#: half-decades (see the module's note on their units).
RIDGE_GRID = tuple(10.0 ** (k / 2) for k in range(-6, 3))
#: The :math:`\beta` values :func:`trueskill_fit` tunes over: the package's default times
#: :math:`2^{k/2}`, 0.25 to 4 times.
BETA_GRID = tuple(BETA * 2.0 ** (k / 2) for k in range(-4, 5))
#: The names :func:`fit_baselines` gives its fits, in its order.
BASELINES = (
    "always 50% + draw rate",
    "trueskill, default",
    "trueskill, tuned β",
    "Bradley–Terry",
    "Bradley–Terry + home",
    "ordered logit",
    "ordered logit + home",
)
# L-BFGS's stopping rules: the penalized log-likelihood is summed over games, so these
# are absolute; float64 resolves them for a loss in the thousands.
_MAX_ITER = 1000
_TOLERANCE_GRAD = 1e-9
_TOLERANCE_CHANGE = 1e-14


class Baseline(Protocol):
    """What the benchmark asks of a fitted baseline."""

    fit_time: float

    def probs(self, games: Tensor) -> Tensor: ...


def _draw_rate(games: Tournament) -> float:
    return float(games.draw.double().mean()) if len(games) else 0.0


def _validation_split(train: Tournament, where: str, what: str) -> tuple[Tournament, Tournament]:
    """The first :data:`VALIDATION_FRACTION` of ``train`` and the later rest."""
    head, tail = train.split(VALIDATION_FRACTION)
    if not len(head) or not len(tail):
        raise ValueError(
            f"{where}: choosing {what} needs a validation split of the training games, but "
            f"{len(train)} games leave one side empty; give at least 2 games or pass {what}="
        )
    return head, tail


def _choose(values: Sequence[float], losses: list[float]) -> float:
    """The value of least validation loss (the first of ties)."""
    return values[min(range(len(values)), key=lambda k: losses[k])]


def _check_grid(grid: Sequence[float], name: str, where: str) -> tuple[float, ...]:
    grid = tuple(float(v) for v in grid)
    if not grid or not all(math.isfinite(v) and v > 0 for v in grid):
        raise ValueError(f"{where}: {name} must be a non-empty sequence of numbers > 0, got {grid}")
    return grid


# --------------------------------------------------------------------------- metrics
def game_log_loss(probs: Tensor, games: Tensor) -> Tensor:
    r"""Each game's log-loss: minus the log of the probability given to its result.

    Arguments:
        probs: ``[G, 3]`` predicted P(first side loses, draws, wins).
        games: ``LongTensor[G, 5]`` (:attr:`Tournament.games`).

    Returns:
        ``[G]``: :math:`-\log p(\text{observed result})`, in nats.
    """
    if probs.dim() != 2 or probs.shape != (len(games), 3):
        raise ValueError(
            f"game_log_loss: probs must be [G, 3] for the {len(games)} games, got "
            f"{list(probs.shape)}"
        )
    return -probs.gather(-1, game_results(games)[:, None]).squeeze(-1).log()


def paired_difference(loss_a: Tensor, loss_b: Tensor) -> tuple[float, float]:
    r"""The mean per-game difference of two methods' losses on the same games and its
    standard error: negative when ``a`` is better.

    Arguments:
        loss_a, loss_b: ``[G]`` per-game losses (:func:`game_log_loss`), ``G >= 2``.

    Returns:
        ``(mean, se)``: the mean of ``loss_a - loss_b`` and its sd (with ``G - 1``) over
        :math:`\sqrt G`.
    """
    if loss_a.dim() != 1 or loss_a.shape != loss_b.shape or len(loss_a) < 2:
        raise ValueError(
            "paired_difference: loss_a and loss_b must be [G] on the same G >= 2 games, got "
            f"{list(loss_a.shape)} and {list(loss_b.shape)}"
        )
    difference = loss_a.double() - loss_b.double()
    return float(difference.mean()), float(difference.std() / math.sqrt(len(difference)))


# --------------------------------------------------------------------------- draw rate
@dataclass(frozen=True)
class DrawRateBaseline:
    """Always 50% plus the draw rate: P(draw) = ``draw_rate``, the rest split evenly.

    Attributes:
        draw_rate: The training games' share of draws.
        fit_time: Seconds to fit.
    """

    draw_rate: float
    fit_time: float

    def probs(self, games: Tensor) -> Tensor:
        """``[G, 3]`` (float64): the same (1 - d) / 2, d, (1 - d) / 2 for every game."""
        d = self.draw_rate
        row = torch.tensor([(1 - d) / 2, d, (1 - d) / 2], dtype=torch.float64)
        return row.expand(len(games), 3).clone()


def draw_rate_baseline(train: Tournament) -> DrawRateBaseline:
    """The baseline that knows nothing of the players: each side wins half of the games
    that are not drawn.

    Arguments:
        train: The training games.

    Returns:
        The :class:`DrawRateBaseline` with the training draw rate.
    """
    began = time.perf_counter()
    d = _draw_rate(train)
    return DrawRateBaseline(draw_rate=d, fit_time=time.perf_counter() - began)


# --------------------------------------------------------------------------- Bradley-Terry
def _unpack(
    parameters: Tensor, num_players: int, *, draws: bool, home: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """Skills, home advantage and threshold from the flat vector ``[s, eta?, raw_c?]``
    (the threshold is ``softplus(raw_c)``; absent terms are 0)."""
    zero = parameters.new_zeros(())
    skills = parameters[:num_players]
    eta = parameters[num_players] if home else zero
    threshold = F.softplus(parameters[-1]) if draws else zero
    return skills, eta, threshold


def _strength(skills: Tensor, eta: Tensor, games: Tensor) -> Tensor:
    r""":math:`\Delta = s_i - s_j + \eta \cdot \text{home}`, the first side's log-odds."""
    return skills[games[:, 0]] - skills[games[:, 1]] + eta * games[:, 3].to(skills.dtype)


def _ordered_log_probs(delta: Tensor, threshold: Tensor) -> Tensor:
    r"""``[G, 3]``: log P(loss, draw, win) of the ordered logit, thresholds :math:`\pm c`.

    :math:`P(\text{draw}) = \sigma(c - \Delta) - \sigma(-c - \Delta)
    = \sigma(c - \Delta)\,\sigma(c + \Delta)\,(1 - e^{-2c})`, an identity that gives its
    log as a sum of log-sigmoids: stable in both tails, no cancellation.
    """
    return torch.stack(
        [
            F.logsigmoid(-delta - threshold),
            _log_draw(delta, threshold),
            F.logsigmoid(delta - threshold),
        ],
        dim=-1,
    )


def _log_draw(delta: Tensor, threshold: Tensor) -> Tensor:
    """The ordered logit's log P(draw) (:func:`_ordered_log_probs`)."""
    log_draw = F.logsigmoid(threshold - delta) + F.logsigmoid(threshold + delta)
    return log_draw + torch.log(-torch.expm1(-2 * threshold))


def bradley_terry_loss(
    parameters: Tensor,
    games: Tensor,
    num_players: int,
    *,
    draws: bool,
    home: bool,
    ridge: float,
) -> Tensor:
    r"""The penalized negative log-likelihood that :func:`fit_bradley_terry` minimizes.

    Logistic (``draws=False``): :math:`-\sum_g [w_g \log\sigma(\Delta_g) + (1 - w_g)
    \log\sigma(-\Delta_g)]`, :math:`w_g` 1 for a win of the first side and 1/2 for a draw.
    Ordered logit (``draws=True``): :math:`-\sum_g \log P(\text{result}_g)` with
    :math:`P(\text{win}) = \sigma(\Delta - c)`, :math:`P(\text{loss}) = \sigma(-\Delta - c)`.
    Both add :math:`\lambda \sum_i s_i^2`.

    Arguments:
        parameters: The flat vector ``[s_0 .. s_{P-1}, eta (with home), raw_c (with
            draws)]``, :math:`c = \operatorname{softplus}(\text{raw}_c)`; the parameters of a
            fit are :attr:`BradleyTerryFit.parameters`.
        games: ``LongTensor[G, 5]`` (:attr:`Tournament.games`).
        num_players: ``P``.
        draws: Ordered logit (True) or logistic (False).
        home: Whether ``parameters`` holds a home advantage :math:`\eta`.
        ridge: :math:`\lambda`.

    Returns:
        The scalar loss.
    """
    skills, eta, threshold = _unpack(parameters, num_players, draws=draws, home=home)
    delta = _strength(skills, eta, games)
    drawn = games[:, 2].bool()
    if draws:
        nll = -F.logsigmoid(delta[~drawn] - threshold).sum()
        if drawn.any():  # only then: log P(draw) is -inf at c = 0, where games without draws go
            nll = nll - _log_draw(delta[drawn], threshold).sum()
    else:
        weight = torch.where(drawn, 0.5, 1.0).to(delta.dtype)
        nll = -(weight * F.logsigmoid(delta) + (1 - weight) * F.logsigmoid(-delta)).sum()
    return nll + ridge * skills.pow(2).sum()


@dataclass(frozen=True)
class BradleyTerryFit:
    r"""A fitted Bradley–Terry model, logistic or ordered logit.

    Attributes:
        skills: ``[P]`` (float64), the skills in logit units (mean near 0: the ridge pins
            the common level).
        home_advantage: :math:`\eta`, what playing at home adds to the log-odds (0.0
            without ``home``).
        threshold: :math:`c` of the ordered logit (0.0 for the logistic).
        draw_rate: The training draw rate, the logistic's P(draw).
        ridge: :math:`\lambda`, given or chosen.
        draws: Ordered logit (True) or logistic (False).
        home: Whether :math:`\eta` was fitted.
        parameters: The flat unconstrained optimum (:func:`bradley_terry_loss`).
        validation: The validation log-loss (nats a game) of each ridge tried, empty when
            ``ridge`` was given.
        fit_time: Seconds to fit, the validation fits included.
    """

    skills: Tensor = field(repr=False)
    home_advantage: float
    threshold: float
    draw_rate: float
    ridge: float
    draws: bool
    home: bool
    parameters: Tensor = field(repr=False)
    validation: dict[float, float] = field(default_factory=dict, repr=False)
    fit_time: float = 0.0

    def log_probs(self, games: Tensor) -> Tensor:
        """``[G, 3]`` (float64): log P(first side loses, draws, wins)."""
        check_games(games, len(self.skills), None, "BradleyTerryFit.probs")
        eta = torch.tensor(self.home_advantage, dtype=torch.float64)
        delta = _strength(self.skills, eta, games)
        if self.draws:
            return _ordered_log_probs(delta, torch.tensor(self.threshold, dtype=torch.float64))
        log_decided = math.log1p(-self.draw_rate) if self.draw_rate < 1 else -math.inf
        log_draw = math.log(self.draw_rate) if self.draw_rate > 0 else -math.inf
        return torch.stack(
            [
                log_decided + F.logsigmoid(-delta),
                torch.full_like(delta, log_draw),
                log_decided + F.logsigmoid(delta),
            ],
            dim=-1,
        )

    def probs(self, games: Tensor) -> Tensor:
        r"""``[G, 3]`` (float64): P(first side loses, draws, wins). The ordered logit's:
        :math:`\sigma(-\Delta - c)`, the rest, :math:`\sigma(\Delta - c)`; the
        logistic's: :math:`(1 - d)\sigma(-\Delta)`, :math:`d`, :math:`(1 - d)\sigma(\Delta)`."""
        return self.log_probs(games).exp()

    def covariance(self, train: Tournament) -> Tensor:
        r"""The inverse Hessian of the penalized loss at the fit, over :attr:`parameters`
        (skills, then :math:`\eta`, then the threshold's raw parameter): the Laplace
        covariance, whose diagonal gives standard errors. Memory :math:`O(P^2)`.

        Arguments:
            train: The games it was fitted on.

        Returns:
            ``[K, K]`` (float64), ``K = len(parameters)``.
        """
        hessian = torch.autograd.functional.hessian(
            lambda x: bradley_terry_loss(
                x,
                train.games,
                train.num_players,
                draws=self.draws,
                home=self.home,
                ridge=self.ridge,
            ),
            self.parameters,
        )
        return torch.linalg.inv(hessian)


def _bradley_terry_optimum(train: Tournament, *, draws: bool, home: bool, ridge: float) -> Tensor:
    """The minimizer of :func:`bradley_terry_loss` by L-BFGS (strong Wolfe), from skills
    and home advantage 0 and the threshold at which equal sides draw at the draw rate."""
    num_players, games = train.num_players, train.games
    x = torch.zeros(num_players + home + draws, dtype=torch.float64)
    if draws:
        # equal sides draw with 1 - 2 sigma(-c) = d: c = log((1 + d) / (1 - d))
        d = min(_draw_rate(train), 0.99)
        x[-1] = softplus_inverse(max(math.log((1 + d) / (1 - d)), 1e-2))
    x.requires_grad_()
    optimizer = torch.optim.LBFGS(
        [x],
        lr=1.0,
        max_iter=_MAX_ITER,
        tolerance_grad=_TOLERANCE_GRAD,
        tolerance_change=_TOLERANCE_CHANGE,
        history_size=20,
        line_search_fn="strong_wolfe",
    )

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = bradley_terry_loss(x, games, num_players, draws=draws, home=home, ridge=ridge)
        loss.backward()
        return loss

    optimizer.step(closure)
    return x.detach()


def _bradley_terry_at(
    train: Tournament, *, draws: bool, home: bool, ridge: float
) -> BradleyTerryFit:
    x = _bradley_terry_optimum(train, draws=draws, home=home, ridge=ridge)
    skills, eta, threshold = _unpack(x, train.num_players, draws=draws, home=home)
    return BradleyTerryFit(
        skills=skills.clone(),
        home_advantage=float(eta),
        threshold=float(threshold),
        draw_rate=_draw_rate(train),
        ridge=ridge,
        draws=draws,
        home=home,
        parameters=x,
    )


def fit_bradley_terry(
    train: Tournament,
    *,
    draws: bool,
    home: bool,
    ridge: float | None = None,
    ridge_grid: Sequence[float] = RIDGE_GRID,
) -> BradleyTerryFit:
    r"""Bradley–Terry by penalized maximum likelihood: the first side's log-odds are
    :math:`\Delta = s_i - s_j + \eta \cdot \text{home}` (home +1, -1 or 0 for the first
    side at home, the second, neutral).

    Logistic (``draws=False``): :math:`P(\text{first beats second}) = \sigma(\Delta)`,
    fitted with a draw counted as half a win and half a loss (BradleyTerry2's
    convention); it predicts a draw at the training draw rate :math:`d` and the rest
    :math:`(1 - d)\sigma(\pm\Delta)`. Ordered logit (``draws=True``): the cumulative logit
    with thresholds :math:`\pm c`, :math:`P(\text{win}) = \sigma(\Delta - c)`,
    :math:`P(\text{loss}) = \sigma(-\Delta - c)`, a draw the rest, :math:`c > 0` learned;
    it is Rao and Kupper's model with :math:`\theta = e^c`. Both minimize
    :func:`bradley_terry_loss` (:math:`\lambda \sum s^2`, :math:`\eta` and :math:`c`
    unpenalized) by L-BFGS in float64 with a strong Wolfe line search.

    Arguments:
        train: The training games, in order.
        draws: Model draws by the ordered logit's threshold (else the logistic).
        home: Fit a home advantage :math:`\eta`.
        ridge: :math:`\lambda > 0`; ``None``: chosen from ``ridge_grid`` by the
            log-loss of a fit to the first :data:`VALIDATION_FRACTION` of ``train`` on the
            later rest, then refitted on all of ``train``.
        ridge_grid: The ridges to choose from (module note: their units).

    Returns:
        The :class:`BradleyTerryFit`.

    Raises:
        ValueError: ``ridge`` or ``ridge_grid`` is not positive, or ``train`` is too short
            to split for validation.

    References:
        Bradley, R. A. and Terry, M. E. (1952). Rank analysis of incomplete block designs:
        I. The method of paired comparisons. Biometrika 39, 324-345.
        Rao, P. V. and Kupper, L. L. (1967). Ties in paired-comparison experiments: a
        generalization of the Bradley-Terry model. JASA 62, 194-204.
        Agresti, A. (2002). Categorical Data Analysis, 2nd ed., Wiley: the cumulative
        logit model (ch. 7) and the Bradley-Terry model with a home advantage (ch. 10).
        Turner, H. and Firth, D. (2012). Bradley-Terry models in R: the BradleyTerry2
        package. Journal of Statistical Software 48(9).
    """
    where = "fit_bradley_terry"
    if ridge is not None and not (math.isfinite(ridge) and ridge > 0):
        raise ValueError(f"{where}: ridge must be a number > 0 or None, got {ridge}")
    began = time.perf_counter()
    validation: dict[float, float] = {}
    if ridge is None:
        grid = _check_grid(ridge_grid, "ridge_grid", where)
        head, tail = _validation_split(train, where, "ridge")
        for value in grid:
            fit = _bradley_terry_at(head, draws=draws, home=home, ridge=value)
            validation[value] = float(game_log_loss(fit.probs(tail.games), tail.games).mean())
        ridge = _choose(grid, [validation[v] for v in grid])
    fit = _bradley_terry_at(train, draws=draws, home=home, ridge=ridge)
    return replace(fit, validation=validation, fit_time=time.perf_counter() - began)


# --------------------------------------------------------------------------- TrueSkill
def _trueskill():
    try:
        import trueskill
    except ImportError as error:
        raise ImportError(
            "the TrueSkill baselines need the trueskill package: pip install trueskill "
            "(or pip install -e '.[test]')"
        ) from error
    return trueskill


@dataclass(frozen=True)
class TrueSkillFit:
    r"""Ratings after one chronological pass of the ``trueskill`` package.

    Attributes:
        mu, sigma: ``[P]`` (float64), each player's rating (a player without games keeps
            the prior).
        beta: The performance noise :math:`\beta`, given, the default or tuned.
        tau: The dynamics, the sd added to a rating before each of its games.
        draw_probability: The environment's, the training draw rate.
        validation: The validation log-loss (nats a game) of each :math:`\beta` tried,
            empty without tuning.
        fit_time: Seconds to fit, the validation passes included.
    """

    mu: Tensor = field(repr=False)
    sigma: Tensor = field(repr=False)
    beta: float
    tau: float
    draw_probability: float
    validation: dict[float, float] = field(default_factory=dict, repr=False)
    fit_time: float = 0.0

    def probs(self, games: Tensor) -> Tensor:
        r"""``[G, 3]`` (float64): TrueSkill's prediction from the final ratings, no update:
        :math:`P(\text{win}) = \Phi((\Delta\mu - \varepsilon) / c)`,
        :math:`P(\text{loss}) = \Phi((-\Delta\mu - \varepsilon) / c)`, a draw the rest, with
        :math:`c = \sqrt{2\beta^2 + \sigma_i^2 + \sigma_j^2}` and the draw margin
        :math:`\varepsilon` of ``draw_probability`` (:func:`~models.tournaments.draw_margin`).
        Home is ignored: TrueSkill has no home advantage."""
        # made in float64 from the start: .double() afterwards would keep beta and the
        # margin as rounded to float32
        default = torch.get_default_dtype()
        torch.set_default_dtype(torch.float64)
        try:
            outcome = probit_outcome(self.beta, self.draw_probability)
        finally:
            torch.set_default_dtype(default)
        return predict(outcome, self.mu, self.sigma, games)


def _trueskill_pass(train: Tournament, *, beta: float, tau: float) -> TrueSkillFit:
    """One pass of ``trueskill.rate_1vs1`` over ``train`` in order, from the package's
    default prior, with ``beta``, ``tau`` and the games' draw rate."""
    trueskill = _trueskill()
    d = _draw_rate(train)
    env = trueskill.TrueSkill(mu=MU, sigma=SIGMA, beta=beta, tau=tau, draw_probability=d)
    ratings = [env.create_rating() for _ in range(train.num_players)]
    for w, ell, drawn in zip(
        train.winner.tolist(), train.loser.tolist(), train.draw.tolist(), strict=True
    ):
        ratings[w], ratings[ell] = trueskill.rate_1vs1(
            ratings[w], ratings[ell], drawn=drawn, env=env
        )
    return TrueSkillFit(
        mu=torch.tensor([r.mu for r in ratings], dtype=torch.float64),
        sigma=torch.tensor([r.sigma for r in ratings], dtype=torch.float64),
        beta=beta,
        tau=tau,
        draw_probability=d,
    )


def trueskill_fit(
    train: Tournament,
    *,
    beta: float | None = None,
    tau: float = TAU,
    tune_beta: bool = False,
    beta_grid: Sequence[float] = BETA_GRID,
) -> TrueSkillFit:
    r"""TrueSkill as its package runs it: one chronological pass of ``trueskill.rate_1vs1``
    over the training games, in the package's environment (prior :math:`\mu = 25`,
    :math:`\sigma = 25/3`, :math:`\beta = 25/6`, :math:`\tau = 25/300`) with the draw
    probability the training draw rate.

    Arguments:
        train: The training games, in order.
        beta: The performance noise; ``None``: the package's default (or, with
            ``tune_beta``, tuned).
        tau: The dynamics, the sd added to a rating before each game (0: static skills).
        tune_beta: Choose :math:`\beta` from ``beta_grid`` by the log-loss on the last
            ``1 - VALIDATION_FRACTION`` of ``train`` (no updates there) after a pass over
            the rest, then pass over all of ``train`` with it.
        beta_grid: The :math:`\beta` values to choose from.

    Returns:
        The :class:`TrueSkillFit`.

    Raises:
        ValueError: ``beta`` is not positive or is given with ``tune_beta``, ``tau`` is
            negative, ``beta_grid`` is not positive, or ``train`` is too short to split.
        ImportError: The ``trueskill`` package is not installed.

    References:
        Herbrich, R., Minka, T. and Graepel, T. (2007). TrueSkill™: a Bayesian skill rating
        system. NIPS 19, 569-576.
    """
    where = "trueskill_fit"
    if beta is not None and not (math.isfinite(beta) and beta > 0):
        raise ValueError(f"{where}: beta must be a number > 0 or None, got {beta}")
    if beta is not None and tune_beta:
        raise ValueError(f"{where}: give beta or tune_beta=True, not both (got beta={beta})")
    if not (math.isfinite(tau) and tau >= 0):
        raise ValueError(f"{where}: tau must be a number >= 0, got {tau}")
    began = time.perf_counter()
    validation: dict[float, float] = {}
    if tune_beta:
        grid = _check_grid(beta_grid, "beta_grid", where)
        head, tail = _validation_split(train, where, "beta")
        for value in grid:
            fit = _trueskill_pass(head, beta=value, tau=tau)
            validation[value] = float(game_log_loss(fit.probs(tail.games), tail.games).mean())
        beta = _choose(grid, [validation[v] for v in grid])
    fit = _trueskill_pass(train, beta=BETA if beta is None else beta, tau=tau)
    return replace(fit, validation=validation, fit_time=time.perf_counter() - began)


# --------------------------------------------------------------------------- all of them
def fit_baselines(train: Tournament) -> dict[str, Baseline]:
    """Every baseline fitted on ``train``, by the names of :data:`BASELINES`, in order.

    Arguments:
        train: The training games, in order.

    Returns:
        The fits, each with ``probs(games)`` and ``fit_time``.
    """
    fits: list[Baseline] = [
        draw_rate_baseline(train),
        trueskill_fit(train),
        trueskill_fit(train, tune_beta=True),
    ]
    fits += [
        fit_bradley_terry(train, draws=draws, home=home)
        for draws in (False, True)
        for home in (False, True)
    ]
    return dict(zip(BASELINES, fits, strict=True))
