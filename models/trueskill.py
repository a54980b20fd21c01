r"""A TrueSkill-style skill model written as a Pyro model, fitted by SVI on minibatches of games.

One latent skill per player, one observed outcome per game:

.. math::

    z_i \sim N(\mu, \sigma^2), \qquad
    P(i \text{ beats } j \mid z) = F(\theta(z_i, z_j) - m),

with either TrueSkill's probit link, :math:`\theta = (z_i - z_j) / (\sqrt 2 \beta)` and
:math:`F = \Phi`, :math:`\beta` learned; or a learned network that is antisymmetric by
construction, :math:`\theta(z_i, z_j) = g(z_i, z_j) - g(z_j, z_i)`, and :math:`F = \sigma`
(both in ``models._skill_likelihood``). With draws in the data, a game is drawn when
:math:`|\theta| < m` (a learned margin), as in TrueSkill: an ordinal outcome. Games with
a home side add a learned home advantage :math:`\eta` to that side's skill; with periods
(a ``time`` column cut by ``--period``) each skill takes a Gaussian random walk from
period to period, its drift :math:`\tau` learned (Glicko, TrueSkill Through Time). The
posterior over skills is fitted by SVI on minibatches of games (Pyro's ``AutoNormal``,
mean-field; with drift a Gaussian Markov chain per player, :class:`TrajectoryGuide`),
and its covariance corrected by linear response.

Newcomers get their skill from a set encoder over their games (``models._newcomers``): an
:class:`~pyro_amortized.AutoAmortizedNormal` over a plate of newcomers, so scoring one
needs no refit. The CLI compares both with the ``trueskill`` package
(``models._skill_compare``, ``models._newcomer_compare``)::

    python -m models.trueskill                      # 500 players, 20,000 games
    python -m models.trueskill --likelihood learned --players 200 --games 5000
    python -m models.trueskill --games-file games.csv   # winner,loser[,draw][,time]
    python -m models.trueskill --games-file league.csv --period 30   # home,away,result,time
    python -m models.trueskill --players 20 --seasons 5 --home-advantage 3 --drift 1 \
        --draw-probability 0.25                      # a synthetic league
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.distributions import constraints
from pyro.distributions.torch_distribution import TorchDistribution
from pyro.infer import TraceMeanField_ELBO
from pyro.infer.autoguide import AutoNormal, init_to_value
from pyro.nn import PyroModule, PyroParam
from torch import Tensor

from models._skill_likelihood import (
    LIKELIHOODS,
    Outcome,
    game_results,
    home_boost,
    outcome_distribution,
    outcome_observation,
)
from models.tournaments import (
    BETA,
    GAME_COLUMNS,
    MU,
    SIGMA,
    Tournament,
    generate_league,
    generate_tournament,
    read_games,
)
from pyro_amortized import fit
from pyro_amortized.optim import decaying_adam

__all__ = [
    "DriftPosterior",
    "MarkovNormal",
    "RandomWalk",
    "SkillModel",
    "SkillPosterior",
    "TrajectoryGuide",
    "check_games",
    "drift_posterior",
    "expected_precision",
    "fit_posterior",
    "fit_skills",
    "global_posteriors",
    "initial_skills",
    "linear_response",
    "main",
    "parse_args",
    "player_features",
    "predict",
    "skill_at",
    "skill_posterior",
    "skills_in_games",
]


_NO_SHAPE = torch.Size()


class RandomWalk(TorchDistribution):
    r"""One player's skills over ``num_periods`` periods: :math:`z_0 \sim N(\mu, \sigma^2)`
    and :math:`z_t = z_{t-1} + \tau \epsilon_t`, a Gaussian random walk (Glicko's and
    TrueSkill Through Time's dynamics).

    The density is the product of the first period's and of the steps', :math:`O(T)`; as
    a multivariate Normal (:meth:`as_multivariate_normal`) its scale_tril is
    :math:`\sigma` down column 0 and :math:`\tau` below the diagonal of columns 1 on.

    Arguments:
        mu, sigma: The first period's mean and sd.
        drift: :math:`\tau`, the sd of a change between consecutive periods; its shape is
            the batch shape.
        num_periods: :math:`T`, the event shape.

    References:
        Parameter estimation in large dynamic paired comparison experiments (Glickman,
        1999); TrueSkill Through Time (Dangauthier, Herbrich, Minka and Graepel, 2007).
    """

    arg_constraints = {"drift": constraints.positive}
    support = constraints.real_vector
    has_rsample = True

    def __init__(
        self,
        mu: float,
        sigma: float,
        drift: Tensor,
        num_periods: int,
        validate_args: bool | None = None,
    ):
        self.mu, self.sigma, self.drift, self.num_periods = mu, sigma, drift, num_periods
        super().__init__(drift.shape, torch.Size([num_periods]), validate_args=validate_args)

    def expand(self, batch_shape, _instance=None) -> RandomWalk:
        drift = self.drift.expand(batch_shape)
        return RandomWalk(self.mu, self.sigma, drift, self.num_periods, validate_args=False)

    def rsample(self, sample_shape: torch.Size = _NO_SHAPE) -> Tensor:
        shape = self._extended_shape(sample_shape)
        noise = torch.randn(shape, dtype=self.drift.dtype, device=self.drift.device)
        steps = noise[..., 1:] * self.drift[..., None]
        start = self.mu + self.sigma * noise[..., :1]
        return torch.cat([start, start + steps.cumsum(-1)], dim=-1)

    def log_prob(self, value: Tensor) -> Tensor:
        start = dist.Normal(self.mu, self.sigma).log_prob(value[..., 0])
        steps = value[..., 1:] - value[..., :-1]
        return start + dist.Normal(0.0, self.drift[..., None]).log_prob(steps).sum(-1)

    def as_multivariate_normal(self) -> dist.MultivariateNormal:
        """The same distribution as a ``MultivariateNormal`` (dense; for checks)."""
        T = self.num_periods
        steps = torch.ones(T, T, dtype=self.drift.dtype).tril()
        steps[:, 0] = 0.0
        first = torch.zeros(T, T, dtype=self.drift.dtype)
        first[:, 0] = self.sigma
        scale_tril = first + self.drift[..., None, None] * steps
        loc = torch.full((T,), float(self.mu), dtype=self.drift.dtype)
        return dist.MultivariateNormal(loc, scale_tril=scale_tril)


class MarkovNormal(TorchDistribution):
    r"""A Gaussian Markov chain over ``T`` periods: :math:`z_0 = m_0 + c_0 \epsilon_0` and
    :math:`z_t = m_t + a_t (z_{t-1} - m_{t-1}) + c_t \epsilon_t`, the family of posteriors
    of a Gaussian random walk seen through Gaussian observations (a Kalman smoother's).

    Its density is that of the standardized residuals, :math:`O(T)` and exact; a draw is
    :math:`m + L \epsilon` with :math:`L_{ts} = c_s \prod_{r=s+1}^{t} a_r`, taken through
    cumulative sums of :math:`\log a` (``coupling`` in (0, 1)) so no product overflows.

    Arguments:
        loc: ``[..., T]``, :math:`m`.
        coupling: ``[..., T]``, :math:`a` in (0, 1) (``a_0`` is unused).
        scale: ``[..., T]``, :math:`c > 0`.
    """

    arg_constraints = {
        "loc": constraints.real_vector,
        "coupling": constraints.independent(constraints.unit_interval, 1),
        "scale": constraints.independent(constraints.positive, 1),
    }
    support = constraints.real_vector
    has_rsample = True

    def __init__(
        self, loc: Tensor, coupling: Tensor, scale: Tensor, validate_args: bool | None = None
    ):
        loc, coupling, scale = torch.broadcast_tensors(loc, coupling, scale)
        self.loc, self.coupling, self.scale = loc, coupling, scale
        super().__init__(loc.shape[:-1], loc.shape[-1:], validate_args=validate_args)

    def expand(self, batch_shape, _instance=None) -> MarkovNormal:
        shape = torch.Size(batch_shape) + self.event_shape
        return MarkovNormal(
            self.loc.expand(shape),
            self.coupling.expand(shape),
            self.scale.expand(shape),
            validate_args=False,
        )

    def scale_tril(self) -> Tensor:
        """``[..., T, T]``: :math:`L`, the covariance's Cholesky factor."""
        log_a = self.coupling[..., 1:].log()
        cum = torch.cat([torch.zeros_like(log_a[..., :1]), log_a.cumsum(-1)], dim=-1)
        exponent = (cum[..., :, None] - cum[..., None, :]).tril()
        mask = torch.ones_like(exponent, dtype=torch.bool).tril()
        return torch.where(mask, exponent.exp(), 0.0) * self.scale[..., None, :]

    @property
    def variance(self) -> Tensor:
        return self.scale_tril().pow(2).sum(-1)

    @property
    def mean(self) -> Tensor:
        return self.loc

    def rsample(self, sample_shape: torch.Size = _NO_SHAPE) -> Tensor:
        shape = self._extended_shape(sample_shape)
        noise = torch.randn(shape, dtype=self.loc.dtype, device=self.loc.device)
        return self.loc + (self.scale_tril() @ noise[..., None]).squeeze(-1)

    def log_prob(self, value: Tensor) -> Tensor:
        deviation = value - self.loc
        predicted = torch.cat(
            [torch.zeros_like(deviation[..., :1]), self.coupling[..., 1:] * deviation[..., :-1]],
            dim=-1,
        )
        return dist.Normal(predicted, self.scale).log_prob(deviation).sum(-1)


class TrajectoryGuide(PyroModule):
    r"""The guide of a :class:`SkillModel` with drift: a Gaussian Markov chain per player
    over their periods (:class:`MarkovNormal`, independent between players) for the
    ``"skill"`` site, and Pyro's ``AutoNormal`` for the global sites (the drift, the home
    advantage).

    A mean-field guide (independent periods) fails here, measured on a league with a
    known drift: consecutive periods of a player are strongly correlated a posteriori,
    and with them factorized the fitted drift came out at 4 times the true one (centred
    parameterization) or a quarter of it (non-centred). The chain captures what the
    random walk ties within a player, with 3 numbers a period; the games' ties between
    players are left to :func:`linear_response`.

    Arguments:
        model: The :class:`SkillModel` (or a model that calls it, e.g. conditioned).
        loc: ``[P, T]``, the skills' initial means.
        init_loc_fn: ``AutoNormal``'s initialization of the global sites.
        init_scale: The initial sd of a skill given the previous period's, and of the
            global sites.
        init_coupling: The initial :math:`a`.
    """

    def __init__(
        self,
        model: Callable[..., None],
        loc: Tensor,
        *,
        init_loc_fn: Callable | None = None,
        init_scale: float = 1.0,
        init_coupling: float = 0.9,
    ):
        super().__init__()
        if not init_scale > 0:
            raise ValueError(f"TrajectoryGuide needs init_scale > 0, got {init_scale}")
        if not 0 < init_coupling < 1:
            raise ValueError(f"TrajectoryGuide needs 0 < init_coupling < 1, got {init_coupling}")
        if loc.dim() != 2:
            raise ValueError(f"TrajectoryGuide: loc must be [P, T], got {list(loc.shape)}")
        self.loc = PyroParam(loc.clone())
        self.coupling = PyroParam(
            torch.full_like(loc, init_coupling), constraint=constraints.unit_interval
        )
        self.scale = PyroParam(torch.full_like(loc, init_scale), constraint=constraints.positive)
        kwargs = {} if init_loc_fn is None else {"init_loc_fn": init_loc_fn}
        self.globals = AutoNormal(
            poutine.block(model, hide=["skill"]), init_scale=init_scale, **kwargs
        )

    def forward(self, games: Tensor, idx: Tensor | None = None) -> dict[str, Tensor]:
        values = self.globals(games, idx)
        with pyro.plate("players", len(self.loc)):
            q = MarkovNormal(self.loc, self.coupling, self.scale)
            values["skill"] = pyro.sample("skill", q)
        return values

    def marginals(self) -> tuple[Tensor, Tensor]:
        """``[P, T]`` posterior means and sds of the skills."""
        with torch.no_grad():
            q = MarkovNormal(self.loc, self.coupling, self.scale)
            return q.mean.detach().clone(), q.variance.sqrt().detach()

    def square_steps(self) -> float:
        r""":math:`E_q[\sum_{i,t} (z_{i,t} - z_{i,t-1})^2]`, each player's chain's
        covariances included (:func:`linear_response` takes it)."""
        with torch.no_grad():
            q = MarkovNormal(self.loc, self.coupling, self.scale)
            L = q.scale_tril().double()
            step = L[..., 1:, :] - L[..., :-1, :]
            mean_step = q.mean[..., 1:] - q.mean[..., :-1]
            return float((mean_step.double() ** 2).sum() + step.pow(2).sum())


def check_games(games: Tensor, num_players: int, num_periods: int | None, where: str) -> None:
    """Refuse a games tensor the skill model cannot read, naming the first bad game.

    Arguments:
        games: ``LongTensor[G, 5]``, :attr:`Tournament.games <models.tournaments.Tournament.games>`.
        num_players, num_periods: What the model was built for (``num_periods=None``:
            any period, as a prediction may be for later periods).
        where: The caller, for the message.

    Raises:
        ValueError: ``games`` has the wrong shape or is not integer, names a player outside
            ``0..num_players - 1``, a negative period or one past ``num_periods - 1``, or a
            home flag other than -1, 0, +1.
    """
    if games.dim() != 2 or games.shape[-1] != len(GAME_COLUMNS):
        raise ValueError(
            f"{where}: games must be [G, {len(GAME_COLUMNS)}] ({', '.join(GAME_COLUMNS)}), "
            f"Tournament.games; got shape {list(games.shape)}"
        )
    if games.dtype.is_floating_point or games.dtype.is_complex or games.dtype == torch.bool:
        raise ValueError(
            f"{where}: games must hold integers (a LongTensor, as Tournament.games is); got "
            f"{games.dtype}"
        )
    limits = [(0, num_players, "player"), (1, num_players, "player"), (4, num_periods, "period")]
    for column, limit, what in limits:
        values = games[:, column]
        negative = values < 0
        if negative.any():
            g = int(negative.nonzero()[0])
            raise ValueError(
                f"{where}: game {g} names {what} {int(values[g])} ({GAME_COLUMNS[column]}); "
                f"{what}s are numbered from 0"
            )
        if limit is None:
            continue
        bad = values >= limit
        if bad.any():
            g = int(bad.nonzero()[0])
            raise ValueError(
                f"{where}: game {g} names {what} {int(values[g])} ({GAME_COLUMNS[column]}), "
                f"but the model has {what}s 0 to {limit - 1}; build it with "
                f"num_{what}s={int(values.max()) + 1} or more"
            )
    if (games[:, 3].abs() > 1).any():
        g = int((games[:, 3].abs() > 1).nonzero()[0])
        raise ValueError(f"{where}: game {g} has home {int(games[g, 3])}; it must be -1, 0 or +1")


class SkillModel(PyroModule):
    r"""Skills of ``num_players`` players in a ``"players"`` plate; each game's result observed.

    Called as ``model(games, idx=None)`` with ``games`` the ``LongTensor[G, 5]`` of
    :attr:`Tournament.games <models.tournaments.Tournament.games>` (winner, loser, draw,
    home, period) and ``idx`` a minibatch of game indices: the ``"games"`` plate subsamples
    them and scales their log-likelihood by G / B, so :func:`pyro_amortized.fit` trains it
    on minibatches of games.

    A game between skills :math:`z_i, z_j` (in its period) has the :class:`Outcome`'s
    likelihood, with :math:`\eta` (the global latent ``"home_advantage"``,
    :math:`N(0, \sigma^2)` a priori) added to the skill of the side at home. A draw is
    an ordinal outcome between a loss and a win, inside a learned margin. With
    ``num_periods > 1`` each player's skills follow a :class:`RandomWalk` from period
    to period, the drift :math:`\tau` a global latent ``"drift"``, half-Normal with scale
    ``drift_scale`` a priori.

    Arguments:
        num_players: Number of players.
        num_periods: Number of periods (1: skills constant).
        home: Whether the games have a home side (then :math:`\eta` is learned).
        likelihood: ``"probit"`` (TrueSkill's, :math:`\beta` learned) or ``"learned"`` (an
            antisymmetric network, :class:`AntisymmetricScore`).
        draws: Whether the games include draws (then a draw margin is learned).
        mu, sigma: The skill prior :math:`N(\mu, \sigma^2)` (of the first period).
        beta: Initial (or fixed) performance noise :math:`\beta`.
        learn_beta: Learn :math:`\beta` (probit); ``False`` holds it at ``beta``.
        drift_scale: The scale of the drift's half-Normal prior (default :math:`\sigma`).
        hidden_dims: Hidden widths of the learned network.
    """

    def __init__(
        self,
        num_players: int,
        *,
        num_periods: int = 1,
        home: bool = False,
        likelihood: str = "probit",
        draws: bool = False,
        mu: float = MU,
        sigma: float = SIGMA,
        beta: float = BETA,
        learn_beta: bool = True,
        drift_scale: float | None = None,
        hidden_dims: Sequence[int] = (32, 32),
    ):
        super().__init__()
        if num_players < 1:
            raise ValueError(f"SkillModel needs num_players >= 1, got {num_players}")
        if num_periods < 1:
            raise ValueError(f"SkillModel needs num_periods >= 1, got {num_periods}")
        if not sigma > 0:
            raise ValueError(f"SkillModel needs sigma > 0, got {sigma}")
        drift_scale = sigma if drift_scale is None else drift_scale
        if not drift_scale > 0:
            raise ValueError(f"SkillModel needs drift_scale > 0, got {drift_scale}")
        self.num_players, self.num_periods, self.home = num_players, num_periods, home
        self.mu, self.sigma, self.drift_scale = mu, sigma, drift_scale
        self.outcome = Outcome(
            likelihood,
            draws=draws,
            beta=beta,
            learn_beta=learn_beta,
            mu=mu,
            sigma=sigma,
            hidden_dims=hidden_dims,
        )

    def forward(self, games: Tensor, idx: Tensor | None = None) -> None:
        outcome = self.outcome
        check_games(games, self.num_players, self.num_periods, "SkillModel")
        if not outcome.draws and games[:, 2].any():
            raise ValueError(
                "SkillModel: the games include draws; build it with SkillModel(..., draws=True)"
            )
        if not self.home and games[:, 3].any():
            raise ValueError(
                "SkillModel: some games have a home side; build it with SkillModel(..., "
                "home=True) (or set their home column to 0)"
            )
        zero = games.new_zeros((), dtype=torch.get_default_dtype())
        advantage = zero
        if self.home:
            advantage = pyro.sample("home_advantage", dist.Normal(zero, self.sigma))
        if self.num_periods > 1:
            drift = pyro.sample("drift", dist.HalfNormal(zero + self.drift_scale))
            prior = RandomWalk(self.mu, self.sigma, drift, self.num_periods)
        else:
            prior = dist.Normal(zero + self.mu, zero + self.sigma)
        with pyro.plate("players", self.num_players):
            skill = pyro.sample("skill", prior)
        with pyro.plate("games", len(games), subsample=idx) as ind:
            batch = games[ind]
            first, second = skills_in_games(skill, batch, self.num_periods)
            boost_first, boost_second = home_boost(batch[:, 3], advantage)
            log_p = outcome.log_probs(first + boost_first, second + boost_second)
            pyro.sample(
                "outcome",
                outcome_distribution(log_p, outcome.draws),
                obs=outcome_observation(game_results(batch), outcome.draws),
            )


def skills_in_games(skill: Tensor, games: Tensor, num_periods: int) -> tuple[Tensor, Tensor]:
    """The two sides' skills in each game.

    Arguments:
        skill: ``[..., P]`` (one period) or ``[..., P, T]``.
        games: ``[G, 5]``.
        num_periods: ``T`` (1: ``skill`` has no period dimension).

    Returns:
        The first sides' and the second sides' skills, each ``[..., G]``.
    """
    if num_periods == 1:
        return skill[..., games[:, 0]], skill[..., games[:, 1]]
    return skill[..., games[:, 0], games[:, 4]], skill[..., games[:, 1], games[:, 4]]


def initial_skills(
    games: Tensor, num_players: int, *, mu: float = MU, sigma: float = SIGMA, beta: float = BETA
) -> Tensor:
    r"""A data-driven starting point for the skills:
    :math:`\mu + \sqrt{\sigma^2 + 2\beta^2}\, \Phi^{-1}(r)`, with :math:`r` the win rate
    (a draw counts half) smoothed as (wins + 1) / (games + 2).

    Against opponents drawn from the prior, a player of skill :math:`z` wins a share
    :math:`\Phi((z - \mu) / \sqrt{\sigma^2 + 2\beta^2})` of games, which this inverts.
    Starting every skill at the prior mean instead leaves SVI a long way along a flat
    ridge (all skills spreading out while :math:`\beta` grows).
    """
    first = torch.bincount(games[:, 0], minlength=num_players).double()
    second = torch.bincount(games[:, 1], minlength=num_players).double()
    drawn = games[:, 2].bool()
    drawn_first = torch.bincount(games[drawn, 0], minlength=num_players).double()
    drawn_second = torch.bincount(games[drawn, 1], minlength=num_players).double()
    wins = first - drawn_first + 0.5 * (drawn_first + drawn_second)
    rate = (wins + 1) / (first + second + 2)
    normal = torch.distributions.Normal(0.0, 1.0)
    spread = math.sqrt(sigma**2 + 2 * beta**2)
    return (mu + spread * normal.icdf(rate)).to(torch.get_default_dtype())


def player_features(games: Tensor, num_players: int) -> Tensor:
    r"""``[P, 3]``: a summary of each player's record, a context for an amortized guide over
    the ``"players"`` plate: :math:`\Phi^{-1}` of the smoothed win rate, the mean of that
    over their opponents (strength of schedule), and :math:`\log(1 + \text{games})`."""
    standard = (initial_skills(games, num_players, mu=0.0, sigma=1.0, beta=0.0)).double()
    player = torch.cat([games[:, 0], games[:, 1]])
    opponent = torch.cat([games[:, 1], games[:, 0]])
    count = torch.bincount(player, minlength=num_players).double()
    schedule = torch.zeros(num_players, dtype=torch.float64).index_add_(
        0, player, standard[opponent]
    ) / count.clamp(min=1)
    features = torch.stack([standard, schedule, count.log1p()], dim=-1)
    return features.to(torch.get_default_dtype())


def fit_skills(
    model: SkillModel,
    train: Tournament,
    *,
    epochs: int = 200,
    batch_size: int = 4000,
    lr: float = 0.1,
    final_lr: float = 0.01,
    num_particles: int = 4,
    init_scale: float = 1.0,
    seed: int = 0,
    progress: bool = False,
) -> AutoNormal | TrajectoryGuide:
    """Fit a mean-field posterior over the skills (and the likelihood's parameters) by SVI.

    Pyro's ``AutoNormal`` over every latent site (the skills of the ``"players"`` plate,
    and the home advantage and drift where the model has them), the skills started at
    :func:`initial_skills` in every period, the home advantage at 0 and the drift at
    :math:`\\sigma / 10`; ``TraceMeanField_ELBO`` (the KL to the prior in closed form) with
    ``num_particles`` vectorized draws, on minibatches of ``batch_size`` games, by
    :func:`pyro_amortized.fit`; Adam whose learning rate decays geometrically from ``lr``
    to ``final_lr`` over the run, so the last iterates settle.
    """
    for name, value in (("epochs", epochs), ("batch_size", batch_size)):
        if value < 1:
            raise ValueError(f"fit_skills needs {name} >= 1, got {value}")
    if not lr > 0 or not final_lr > 0:
        raise ValueError(f"fit_skills needs lr > 0 and final_lr > 0, got {lr}, {final_lr}")
    games = train.games
    check_games(games, model.num_players, model.num_periods, "fit_skills")
    pyro.set_rng_seed(seed)
    start = initial_skills(games, model.num_players, mu=model.mu, sigma=model.sigma)
    values = {"skill": start, "home_advantage": torch.tensor(0.0)}
    values["drift"] = torch.tensor(model.sigma / 10)
    init = init_to_value(values=values)
    if model.num_periods == 1:
        guide = AutoNormal(model, init_loc_fn=init, init_scale=init_scale)
    else:
        trajectories = start[:, None].expand(-1, model.num_periods)
        guide = TrajectoryGuide(model, trajectories, init_loc_fn=init, init_scale=init_scale)
    _train(
        model,
        guide,
        games,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        final_lr=final_lr,
        num_particles=num_particles,
        seed=seed,
        progress=progress,
    )
    return guide


def _train(model, guide, games: Tensor, *, epochs, batch_size, lr, final_lr, num_particles,
           seed, progress=False) -> None:  # fmt: skip
    steps = epochs * max(1, math.ceil(len(games) / batch_size))
    optimizer = decaying_adam(lr, final_lr=final_lr, steps=steps)
    loss = TraceMeanField_ELBO(
        num_particles=num_particles, vectorize_particles=True, max_plate_nesting=1
    )
    fit(
        model,
        guide,
        loss,
        games,
        epochs=epochs,
        batch_size=batch_size,
        optimizer=optimizer,
        seed=seed,
        progress=progress,
    )


class _FixedDrift:
    """A :class:`SkillModel` with its drift held at ``value`` (observed)."""

    def __init__(self, model: SkillModel):
        self.model, self.value = model, None

    def __call__(self, games: Tensor, idx: Tensor | None = None) -> None:
        data = {"drift": torch.tensor(self.value)}
        return poutine.condition(self.model, data=data)(games, idx)


class DriftPosterior(NamedTuple):
    """The drift's marginal posterior on a grid: the values, their normalized
    probabilities, and its mean and sd (:func:`drift_posterior`)."""

    values: Tensor
    probs: Tensor
    mean: float
    stddev: float


def drift_posterior(
    model: SkillModel,
    train: Tournament,
    center: float,
    *,
    width: float = 1.5,
    num_points: int = 17,
    epochs: int = 1000,
    step_epochs: int = 300,
    num_particles: int = 128,
    seed: int = 0,
) -> DriftPosterior:
    r"""The drift's marginal posterior, :math:`p(\tau \mid x)`, by integrating it on a grid.

    A guide that treats the drift apart from the skills (as :func:`fit_skills`' does)
    understates its uncertainty badly: a smooth trajectory and a small drift explain the
    same games as a rough one and a large drift, a trade the factorized guide cannot
    express (measured against NUTS on an 8-team league: sd 0.16 for the guide, 0.20 with
    linear response, 0.90 for NUTS). So, as INLA does with hyperparameters, this fits the
    skills' posterior at each value of :math:`u = \log \tau` on an evenly spaced grid
    (``num_points`` values within ``width`` of :math:`\log` ``center``, the first fit
    ``epochs`` long and each next one warm-started for ``step_epochs``), takes the ELBO
    there (``num_particles`` draws, the same ones at every value) as
    :math:`\log p(x \mid u)`, adds the prior's :math:`\log p(u)`, and normalizes.
    :math:`\beta` and the draw margin are held at the model's values throughout (the
    model is left as it was).

    Arguments:
        model: The :class:`SkillModel` (with ``num_periods > 1``).
        train: The games.
        center: The grid's middle, e.g. the guide's estimate of the drift.
        width, num_points: The grid, in :math:`\log \tau`.
        epochs, step_epochs: SVI epochs of the first and of each later value's fit.
        num_particles: Draws of the ELBO at each value.
        seed: Seed of the fits and of the draws.

    Returns:
        The :class:`DriftPosterior`.

    References:
        Approximate Bayesian inference for latent Gaussian models by using integrated
        nested Laplace approximations (Rue, Martino and Chopin, 2009).
    """
    if model.num_periods < 2:
        raise ValueError("drift_posterior: the model has no drift (num_periods = 1)")
    if not center > 0 or not width > 0 or num_points < 3:
        raise ValueError(
            f"drift_posterior needs center > 0, width > 0 and num_points >= 3, got {center}, "
            f"{width}, {num_points}"
        )
    for name, value in (("epochs", epochs), ("step_epochs", step_epochs)):
        if value < 1:
            raise ValueError(f"drift_posterior needs {name} >= 1, got {value}")
    if num_particles < 1:
        raise ValueError(f"drift_posterior needs num_particles >= 1, got {num_particles}")
    games = train.games
    # beta and the draw margin stay at the fit's values: a posterior of the drift given
    # them, in the fit's units, and the caller's model comes back unchanged
    frozen = [(p, p.requires_grad) for p in model.outcome.parameters()]
    training = model.outcome.training
    model.outcome.requires_grad_(False).train(False)
    try:
        return _drift_grid(model, games, center, width, num_points, epochs, step_epochs,
                           num_particles, seed)  # fmt: skip
    finally:
        for parameter, flag in frozen:
            parameter.requires_grad_(flag)
        model.outcome.train(training)


def _drift_grid(model, games, center, width, num_points, epochs, step_epochs, num_particles,
                seed) -> DriftPosterior:  # fmt: skip
    fixed = _FixedDrift(model)
    start = initial_skills(games, model.num_players, mu=model.mu, sigma=model.sigma)
    init = init_to_value(values={"home_advantage": torch.tensor(0.0)})
    guide = TrajectoryGuide(fixed, start[:, None].expand(-1, model.num_periods), init_loc_fn=init)
    u = math.log(center) + torch.linspace(-width, width, num_points, dtype=torch.float64)
    elbo = TraceMeanField_ELBO(
        num_particles=num_particles, vectorize_particles=True, max_plate_nesting=1
    )
    log_post = []
    for k, value in enumerate(u.exp().tolist()):
        fixed.value = value
        _train(
            fixed,
            guide,
            games,
            epochs=epochs if k == 0 else step_epochs,
            batch_size=len(games),
            lr=0.1 if k == 0 else 0.03,
            final_lr=0.01,
            num_particles=4,
            seed=seed,
        )
        pyro.set_rng_seed(seed)  # the same draws at every value
        with torch.no_grad():
            log_lik = -elbo.loss(fixed, guide, games)
        # the conditioned model's ELBO holds the drift's prior density already; the
        # grid is even in u = log tau: add the Jacobian
        log_post.append(log_lik + float(u[k]))
    log_post = torch.tensor(log_post, dtype=torch.float64)
    probs = (log_post - log_post.logsumexp(0)).exp()
    values = u.exp()
    mean = float((probs * values).sum())
    stddev = float((probs * (values - mean) ** 2).sum().sqrt())
    return DriftPosterior(values, probs, mean, stddev)


class SkillPosterior(NamedTuple):
    r"""A fitted posterior: per player (and period) the mean, the mean-field sd and the
    linear-response sd; the seconds the mean-field fit took and those with the
    correction; the posteriors of the home advantage (a ``Normal``) and of the drift
    (a ``LogNormal``), ``None`` where the model has none; and the fitted :math:`\beta`
    (the probit's; ``None`` for the learned likelihood); ``corrected_globals``, the home
    advantage's and the drift's posteriors with the linear-response sds (the guide's
    means), by site.

    The data know skills only in units of :math:`\beta` (a game's probabilities depend
    on skill differences over it); the model's unit is its prior's :math:`\sigma`. To
    compare the home advantage or the drift with another fit's, or with a generator's,
    compare them over :math:`\beta`."""

    loc: Tensor
    scale: Tensor
    corrected: Tensor
    fit_time: float
    total_time: float
    home_advantage: torch.distributions.Normal | None = None
    drift: torch.distributions.LogNormal | None = None
    beta: float | None = None
    corrected_globals: dict[str, torch.distributions.Distribution] | None = None

    def predict(self, outcome: Outcome, games: Tensor, *, corrected: bool = True) -> Tensor:
        """``[G, 3]``: :func:`predict` from this posterior, with the linear-response sds
        (``corrected``) or the guide's own."""
        globals_ = self.corrected_globals if corrected and self.corrected_globals else {}
        return predict(
            outcome,
            self.loc,
            self.corrected if corrected else self.scale,
            games,
            home_advantage=globals_.get("home_advantage", self.home_advantage),
            drift=globals_.get("drift", self.drift),
        )


def fit_posterior(model: SkillModel, train: Tournament, **kwargs) -> SkillPosterior:
    """:func:`fit_skills`, then :func:`linear_response` on its fit.

    Arguments:
        model: The :class:`SkillModel`.
        train: The games to fit.
        **kwargs: For :func:`fit_skills` (``epochs``, ``lr``, ``seed``, ...).

    Returns:
        The :class:`SkillPosterior`, with its timings.
    """
    began = time.perf_counter()
    guide = fit_skills(model, train, **kwargs)
    loc, scale = skill_posterior(guide)
    home, drift = global_posteriors(guide)
    fit_time = time.perf_counter() - began
    square_steps = guide.square_steps() if isinstance(guide, TrajectoryGuide) else None
    precision = expected_precision(
        model,
        loc,
        scale,
        train.games,
        home_advantage=home,
        drift=drift,
        square_steps=square_steps,
    )
    covariance = _inverse(precision)
    if covariance is None and square_steps is not None:
        # the random walk's density is not concave in (skills, log drift) (a funnel); where
        # the games do not outweigh that, leave the drift out (its row and column are the
        # last) and keep the guide's sd
        square_steps = None
        covariance = _inverse(precision[:-1, :-1])
    if covariance is None:
        raise ValueError(_NOT_DEFINITE)
    covariance = covariance.to(loc.dtype)
    sd = covariance.diagonal().sqrt()
    corrected = sd[: loc.numel()].reshape(loc.shape)
    corrected_globals = {}
    if home is not None:
        corrected_globals["home_advantage"] = dist.Normal(home.mean, sd[loc.numel()])
    if drift is not None:
        scale_u = sd[-1] if square_steps is not None else drift.scale
        corrected_globals["drift"] = dist.LogNormal(drift.loc, scale_u)
    beta = float(model.outcome.beta.detach()) if model.outcome.likelihood == "probit" else None
    total_time = time.perf_counter() - began
    return SkillPosterior(
        loc, scale, corrected, fit_time, total_time, home, drift, beta, corrected_globals
    )


def skill_posterior(guide: AutoNormal | TrajectoryGuide) -> tuple[Tensor, Tensor]:
    """Posterior mean and sd of every player's skill (``[P]``, or ``[P, T]`` by period)
    under a guide of :func:`fit_skills`."""
    if isinstance(guide, TrajectoryGuide):
        return guide.marginals()
    with torch.no_grad():
        return guide.locs.skill.detach().clone(), guide.scales.skill.detach().clone()


def global_posteriors(
    guide: AutoNormal | TrajectoryGuide,
) -> tuple[torch.distributions.Normal | None, torch.distributions.LogNormal | None]:
    """The fitted posteriors of the home advantage (``Normal``) and of the drift
    (``LogNormal``: ``AutoNormal``'s Normal on its logarithm), ``None`` where the model
    has no such site; ``guide`` is one of :func:`fit_skills`."""
    if isinstance(guide, TrajectoryGuide):
        guide = guide.globals
    with torch.no_grad():
        home = drift = None
        if hasattr(guide.locs, "home_advantage"):
            home = torch.distributions.Normal(
                guide.locs.home_advantage.detach().clone(),
                guide.scales.home_advantage.detach().clone(),
            )
        if hasattr(guide.locs, "drift"):
            drift = torch.distributions.LogNormal(
                guide.locs.drift.detach().clone(), guide.scales.drift.detach().clone()
            )
    return home, drift


def _mean_or_zero(q: torch.distributions.Distribution | None) -> Tensor | float:
    return 0.0 if q is None else q.mean


def expected_precision(
    model: SkillModel,
    loc: Tensor,
    scale: Tensor,
    games: Tensor,
    *,
    home_advantage: torch.distributions.Normal | None = None,
    drift: torch.distributions.LogNormal | None = None,
    square_steps: float | None = None,
    num_samples: int = 16,
    seed: int = 0,
) -> Tensor:
    r""":math:`-E_q[\nabla^2 \log p(x, \theta)]`, the expected negative Hessian of the log
    joint over :math:`\theta`: the skills, flattened player-major, then the home
    advantage :math:`\eta` (with ``home_advantage``), then :math:`u = \log \tau` (with
    ``drift`` and ``square_steps``).

    The Hessian of each game's log-likelihood in its two skills is taken by autograd
    (``num_samples`` draws from ``q``, averaged, :math:`\eta` at its mean) and scattered
    into the precision, with the prior's: :math:`1 / \sigma^2` on the diagonal, and with
    drift the random walk's tridiagonal precision, :math:`e^{-2u}` replaced by its
    expectation under ``drift``. The random walk's log-density,
    :math:`-(T - 1) P u - S e^{-2u} / 2` with :math:`S = \sum (z_t - z_{t-1})^2`, gives
    the :math:`u` rows: :math:`2 E[S] E[e^{-2u}]` (and the half-Normal prior's
    :math:`2 E[e^{2u}] / s^2`) on the diagonal and :math:`-E[e^{-2u}]\, \partial S /
    \partial z` (at the means) against the skills; :math:`\eta` enters each game as a
    gain of the side at home.

    Arguments:
        model: The fitted model.
        loc, scale: The posterior means and sds of the skills, ``[P]`` or ``[P, T]``.
        games: The games fitted, ``[G, 5]``.
        home_advantage, drift: Their posteriors (:func:`global_posteriors`), where the
            model has them.
        square_steps: :math:`E_q[S]`, the expected sum of squared steps under the
            fitted guide (:meth:`TrajectoryGuide.square_steps`); with it, :math:`u`
            joins :math:`\theta`.
        num_samples: Draws from ``q`` for the games' expected Hessian.
        seed: Seed of those draws (the global RNG is left alone).

    Returns:
        The ``[N, N]`` precision (float64, dense: fine for thousands of skills).
    """
    if num_samples < 1:
        raise ValueError(f"expected_precision needs num_samples >= 1, got {num_samples}")
    P, T = model.num_players, model.num_periods
    generator = torch.Generator().manual_seed(seed)
    flat_loc, flat_scale = loc.reshape(-1), scale.reshape(-1)
    draws = flat_loc + flat_scale * torch.randn(
        num_samples, len(flat_loc), generator=generator, dtype=loc.dtype
    )
    period = games[:, 4] if T > 1 else torch.zeros_like(games[:, 0])
    first, second = games[:, 0] * T + period, games[:, 1] * T + period
    boost_first, boost_second = home_boost(games[:, 3], _mean_or_zero(home_advantage))
    a = draws[:, first].detach().requires_grad_()
    b = draws[:, second].detach().requires_grad_()
    log_p = model.outcome.log_probs(a + boost_first, b + boost_second)
    observed = game_results(games)
    log_lik = log_p.gather(-1, observed.expand(num_samples, -1)[..., None]).sum()
    grad_a, grad_b = torch.autograd.grad(log_lik, (a, b), create_graph=True)
    h_aa, h_ab = torch.autograd.grad(grad_a.sum(), (a, b), retain_graph=True)
    (h_bb,) = torch.autograd.grad(grad_b.sum(), b)
    h_aa, h_ab, h_bb = (h.detach().mean(0).double() for h in (h_aa, h_ab, h_bb))
    with_home, with_drift = home_advantage is not None, square_steps is not None
    N = P * T + with_home + with_drift
    precision = torch.zeros(N, N, dtype=torch.float64)
    block = torch.zeros(T, T, dtype=torch.float64)
    block[0, 0] = 1 / model.sigma**2
    if T > 1:
        if drift is None:
            raise ValueError("expected_precision: a model with num_periods > 1 needs drift=")
        # E_q[e^{-2u}] and E_q[e^{2u}] for u = log tau ~ N(m, s^2)
        inverse = float(torch.exp(-2 * drift.loc + 2 * drift.scale**2))
        steps = torch.arange(T - 1)
        block[steps, steps] += inverse
        block[steps + 1, steps + 1] += inverse
        block[steps, steps + 1] -= inverse
        block[steps + 1, steps] -= inverse
    precision[: P * T, : P * T] = torch.block_diag(*[block] * P)
    precision.index_put_((first, first), -h_aa, accumulate=True)
    precision.index_put_((second, second), -h_bb, accumulate=True)
    precision.index_put_((first, second), -h_ab, accumulate=True)
    precision.index_put_((second, first), -h_ab, accumulate=True)
    if with_home:
        at_first, at_second = (games[:, 3] == 1).double(), (games[:, 3] == -1).double()
        e = P * T
        precision[e, e] = 1 / model.sigma**2 - (h_aa * at_first + h_bb * at_second).sum()
        column = torch.zeros(P * T, dtype=torch.float64)
        column.index_add_(0, first, -(h_aa * at_first + h_ab * at_second))
        column.index_add_(0, second, -(h_ab * at_first + h_bb * at_second))
        precision[e, : P * T] = precision[: P * T, e] = column
    if with_drift:
        if T == 1:
            raise ValueError("expected_precision: square_steps= needs a model with drift")
        u = N - 1
        square = float(torch.exp(2 * drift.loc + 2 * drift.scale**2))
        precision[u, u] = 2 * square_steps * inverse + 2 * square / model.drift_scale**2
        m = loc.double().reshape(P, T)
        step = m[:, 1:] - m[:, :-1]
        d_square = torch.zeros(P, T, dtype=torch.float64)  # dS/dz at the means
        d_square[:, 1:] += 2 * step
        d_square[:, :-1] -= 2 * step
        precision[u, : P * T] = precision[: P * T, u] = -inverse * d_square.reshape(-1)
    return precision


def linear_response(
    model: SkillModel, loc: Tensor, scale: Tensor, games: Tensor, **kwargs: Any
) -> Tensor:
    r"""The linear-response covariance, :math:`(-E_q[\nabla^2 \log p(x, \theta)])^{-1}`:
    the inverse of :func:`expected_precision`, which takes the same arguments (its
    keywords: ``home_advantage``, ``drift``, ``square_steps``, ``num_samples``,
    ``seed``).

    A mean-field posterior's variances are the inverse diagonal of the posterior
    precision, which understates the marginal variances when the latents are correlated
    (every game ties two skills, the random walk ties a player's periods, and the drift
    and the home advantage are tied to all of them). Linear response recovers the
    covariance from the fit: for a Gaussian posterior, exactly.

    Raises:
        ValueError: The expected Hessian is not negative definite there: a learned
            likelihood that is not log-concave, or the drift's funnel where the games
            do not outweigh it.

    References:
        Linear Response Methods for Accurate Covariance Estimates from Mean Field
        Variational Bayes (Giordano, Broderick and Jordan, 2015).
    """
    precision = expected_precision(model, loc, scale, games, **kwargs)
    covariance = _inverse(precision)
    if covariance is None:
        raise ValueError(_NOT_DEFINITE)
    return covariance.to(loc.dtype)


_NOT_DEFINITE = (
    "linear_response: the expected Hessian of the log joint is not negative definite at "
    "this posterior (a learned likelihood that is not log-concave there, or, with "
    "square_steps=, the drift's funnel where the games do not outweigh it), so it gives no "
    "covariance; use the guide's scales (or leave square_steps out)"
)


def _inverse(precision: Tensor) -> Tensor | None:
    """The inverse of a positive-definite ``precision`` by Cholesky, else ``None``."""
    factor, info = torch.linalg.cholesky_ex(precision)
    return None if info else torch.cholesky_inverse(factor)


def skill_at(
    loc: Tensor,
    scale: Tensor,
    players: Tensor,
    periods: Tensor,
    *,
    drift: torch.distributions.Distribution | None = None,
) -> tuple[Tensor, Tensor]:
    r"""The posterior mean and variance of ``players``' skills in ``periods``.

    A period after the last one fitted takes the last period's posterior, widened by the
    random walk: :math:`k E_q[\tau^2]` more variance ``k`` periods on.

    Arguments:
        loc, scale: The skills' posterior means and sds, ``[P]`` (constant skills: the
            periods are ignored) or ``[P, T]``.
        players, periods: ``LongTensor[N]`` each.
        drift: The drift's posterior, for periods after the last.

    Returns:
        Means and variances, ``[N]`` each.
    """
    if loc.dim() == 1:
        return loc[players], scale[players] ** 2
    last = loc.shape[1] - 1
    ahead = (periods - last).clamp(min=0).to(loc.dtype)
    spread = 0.0 if drift is None else drift.mean**2 + drift.variance
    column = periods.clamp(max=last)
    return loc[players, column], scale[players, column] ** 2 + ahead * spread


def predict(
    outcome: Outcome,
    loc: Tensor,
    scale: Tensor,
    games: Tensor,
    *,
    home_advantage: torch.distributions.Normal | None = None,
    drift: torch.distributions.LogNormal | None = None,
) -> Tensor:
    r"""E_q[P(first player loses, draws, wins)] for each game.

    Each side's skill is :func:`skill_at` the game's period (periods after the last one
    fitted widened by the drift). The home side's skill gains the home advantage, its posterior variance included
    (exact for the probit: the sum of independent Normals).

    Arguments:
        outcome: The fitted likelihood (``model.outcome``).
        loc, scale: The skills' posterior means and sds, ``[P]`` or ``[P, T]`` by period.
        games: ``[G, 5]``; periods may run past the last one fitted.
        home_advantage, drift: Their posteriors, where the model has them.

    Returns:
        ``[G, 3]`` probabilities.
    """
    check_games(games, loc.shape[0], None, "predict")
    loc_i, var_i = skill_at(loc, scale, games[:, 0], games[:, 4], drift=drift)
    loc_j, var_j = skill_at(loc, scale, games[:, 1], games[:, 4], drift=drift)
    if home_advantage is not None:
        at_first, at_second = games[:, 3] == 1, games[:, 3] == -1
        loc_i = loc_i + at_first * home_advantage.mean
        loc_j = loc_j + at_second * home_advantage.mean
        var_i = var_i + at_first * home_advantage.variance
        var_j = var_j + at_second * home_advantage.variance
    with torch.no_grad():
        return outcome.expected_probs(loc_i, var_i.sqrt(), loc_j, var_j.sqrt())


# --------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The CLI's options (see ``python -m models.trueskill --help``)."""
    parser = argparse.ArgumentParser(
        description="Fit player skills from game results; compare with TrueSkill."
    )
    parser.add_argument("--players", type=int, default=500)
    parser.add_argument("--games", type=int, default=20_000)
    parser.add_argument("--pairing", default="random", choices=["random", "matched"])
    parser.add_argument("--draw-probability", type=float, default=0.0)
    parser.add_argument(
        "--games-file",
        default=None,
        help="a CSV of games instead: winner,loser[,draw][,time][,home], "
        "first,second,result[,time][,home] or home,away,result[,time][,neutral]",
    )
    parser.add_argument(
        "--seasons",
        type=int,
        default=None,
        help="a league instead: --players teams, each season a double round robin",
    )
    parser.add_argument("--home-advantage", type=float, default=0.0, help="the league's")
    parser.add_argument("--drift", type=float, default=0.0, help="the league's, a period")
    parser.add_argument("--rounds-per-period", type=int, default=4, help="the league's")
    parser.add_argument(
        "--period",
        type=float,
        default=None,
        help="skills drift from period to period, each this long in the time column's "
        "units (days for dates); default: a league's --rounds-per-period when it drifts, "
        "else skills stay constant",
    )
    parser.add_argument(
        "--likelihood", default="both", choices=[*LIKELIHOODS, "both"], help="which to fit"
    )
    parser.add_argument("--train-fraction", type=float, default=0.8)
    parser.add_argument("--epochs", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=4000)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--particles", type=int, default=4)
    parser.add_argument(
        "--newcomers", type=float, default=0.2, help="fraction of players held out as newcomers"
    )
    parser.add_argument("--first-games", type=int, default=5, help="newcomer games to read")
    parser.add_argument("--encoder-epochs", type=int, default=150)
    parser.add_argument("--refine-steps", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/trueskill", help="directory for the figure")
    parser.add_argument("--no-baseline", action="store_true", help="skip the trueskill package")
    parser.add_argument("--no-progress", action="store_true")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    """Fit the skills, print the comparison tables and write the figure; returns the rows.

    Arguments:
        argv: The command line (default ``sys.argv[1:]``).

    Returns:
        Each table row's scores, by method.
    """
    # imported here, not above: the comparisons are built on this module's model
    from models._newcomer_compare import newcomer_report
    from models._skill_compare import check_split, compare_ratings, plot_skills, print_table

    args = parse_args(argv)
    try:
        tournament = _tournament(args)
        train, test = tournament.split(args.train_fraction)
        check_split(train, test, args.games_file or "the generated games")
    except ValueError as error:  # the user's file or options: say so, without a traceback
        raise SystemExit(f"error: {error}") from None
    if not args.no_baseline and importlib.util.find_spec("trueskill") is None:
        print("(the trueskill package is not installed: pip install trueskill for its rows)")
        args.no_baseline = True
    draw_rate = float(train.draw.double().mean())
    likelihoods = LIKELIHOODS if args.likelihood == "both" else (args.likelihood,)
    results, (loc, scale) = compare_ratings(
        tournament,
        train,
        test,
        likelihoods=likelihoods,
        draw_probability=args.draw_probability,
        baseline=not args.no_baseline,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        num_particles=args.particles,
        seed=args.seed,
        progress=not args.no_progress,
    )
    print_table(results, tournament, train, test)
    if tournament.skills is not None and tournament.skills.dim() == 1:
        path = plot_skills(Path(args.out) / "skills.png", tournament.skills, loc, scale)
        print(f"figure: {path}")
    if args.newcomers > 0:
        results |= newcomer_report(args, tournament, train, likelihoods[0], draw_rate)
    return results


def _tournament(args: argparse.Namespace) -> Tournament:
    """The games the options name, with their periods."""
    if args.games_file:
        tournament = read_games(args.games_file)
    elif args.seasons:
        tournament = generate_league(
            args.players,
            args.seasons,
            home_advantage=args.home_advantage,
            drift=args.drift,
            draw_probability=args.draw_probability,
            rounds_per_period=args.rounds_per_period,
            seed=args.seed,
        )
        if args.period is None and args.drift > 0:
            args.period = args.rounds_per_period
    else:
        tournament = generate_tournament(
            args.players,
            args.games,
            pairing=args.pairing,
            draw_probability=args.draw_probability,
            seed=args.seed,
        )
    return tournament if args.period is None else tournament.by_period(args.period)


if __name__ == "__main__":
    main()
