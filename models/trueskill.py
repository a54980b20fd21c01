r"""A TrueSkill-style skill model written as a Pyro model, and amortized skills for newcomers.

One latent skill per player, one observed outcome per game:

.. math::

    z_i \sim N(\mu, \sigma^2), \qquad
    P(i \text{ beats } j \mid z) = F(\theta(z_i, z_j) - m),

with either TrueSkill's probit link, :math:`\theta = (z_i - z_j) / (\sqrt 2 \beta)` and
:math:`F = \Phi`, :math:`\beta` learned; or a learned network that is antisymmetric by
construction, :math:`\theta(z_i, z_j) = g(z_i, z_j) - g(z_j, z_i)`, and :math:`F = \sigma`.
With draws in the data, a game is drawn when :math:`|\theta| < m` (a learned margin), as in
TrueSkill. The posterior over skills is fitted by SVI on minibatches of games (Pyro's
``AutoNormal``, mean-field), and its covariance corrected by linear response.

Newcomers get their skill from an encoder that reads their games as a set of (opponent's
posterior mean and sd, outcome) and returns :math:`q(z_{\text{new}})`: it is an
:class:`~pyro_amortized.AutoAmortizedNormal` over a plate of newcomers, trained with
:class:`~pyro_amortized.Trace_IWELBO` on the fitted players, so scoring a newcomer needs no
refit (and :func:`~pyro_amortized.refinement.refine` tops it up when wanted)::

    python -m models.trueskill                      # 500 players, 20,000 games
    python -m models.trueskill --likelihood learned --players 200 --games 5000
    python -m models.trueskill --games-file games.csv   # winner,loser[,draw][,time]
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro.infer import TraceMeanField_ELBO
from pyro.infer.autoguide import AutoNormal, init_to_value
from pyro.nn import PyroModule
from torch import Tensor, nn
from torch.nn import functional as F
from torch.special import log_ndtr

from models.tournaments import (
    BETA,
    MU,
    SIGMA,
    Tournament,
    draw_margin,
    generate_tournament,
    read_games,
)
from pyro_amortized import AutoAmortizedNormal, Trace_IWELBO, fit
from pyro_amortized.optim import decaying_adam
from pyro_amortized.refinement import refine

LIKELIHOODS = ("probit", "learned")
# Outcome categories, seen from the first player of a game: loses, draws, wins.
LOSS, DRAW, WIN = 0, 1, 2
_GAUSS_HERMITE_NODES = 16
_POOL_SCALE = 8.0  # GameSetEncoder's sum of per-game features, divided by this


def _softplus_inverse(y: float) -> float:
    return y + math.log(-math.expm1(-y))


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x < 0, accurate at both ends (Maechler 2012); each branch sees
    only inputs it is finite on, so no NaN leaks into the gradient."""
    near = x > -math.log(2)
    return torch.where(
        near,
        torch.log(-torch.expm1(torch.where(near, x, -1.0))),
        torch.log1p(-torch.exp(torch.where(near, -1.0, x))),
    )


def _gauss_hermite(dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Nodes and weights of E[f(Z)], Z ~ N(0, 1) (probabilists' Gauss-Hermite)."""
    nodes, weights = np.polynomial.hermite_e.hermegauss(_GAUSS_HERMITE_NODES)
    weights = weights / weights.sum()
    return torch.tensor(nodes, dtype=dtype), torch.tensor(weights, dtype=dtype)


class AntisymmetricScore(nn.Module):
    r""":math:`\theta(a, b) = g(a, b) - g(b, a)`: the log-odds that skill ``a`` beats ``b``.

    Antisymmetric by construction, so :math:`\sigma(\theta(a, b)) + \sigma(\theta(b, a)) = 1`
    for every weight setting. :math:`g(a, b) = w a' + \text{MLP}(a', b')` on standardized
    skills :math:`a' = (a - \mu) / \sigma`; the MLP's last layer starts at zero and ``w`` at
    the logistic approximation of TrueSkill's probit, so training starts from TrueSkill's
    win probabilities (in logistic form, an Elo model).
    """

    def __init__(
        self,
        *,
        mu: float = MU,
        sigma: float = SIGMA,
        beta: float = BETA,
        hidden_dims: Sequence[int] = (32, 32),
    ):
        super().__init__()
        self.mu, self.sigma = mu, sigma
        self.slope = nn.Parameter(torch.tensor(1.702 * sigma / (math.sqrt(2) * beta)))
        layers: list[nn.Module] = []
        width = 2
        for hidden in hidden_dims:
            layers += [nn.Linear(width, hidden), nn.Tanh()]
            width = hidden
        last = nn.Linear(width, 1)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        self.net = nn.Sequential(*layers, last)

    def g(self, a: Tensor, b: Tensor) -> Tensor:
        a, b = (a - self.mu) / self.sigma, (b - self.mu) / self.sigma
        a, b = torch.broadcast_tensors(a, b)
        return self.slope * a + self.net(torch.stack([a, b], dim=-1)).squeeze(-1)

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        return self.g(a, b) - self.g(b, a)


class Outcome(nn.Module):
    r"""The likelihood of a game's result given the two skills: its parameters and formulas.

    ``log_probs(z_i, z_j)`` gives :math:`\log P(\text{first player loses, draws, wins})`.
    Probit: :math:`P(\text{win}) = \Phi((z_i - z_j - \varepsilon) / (\sqrt 2 \beta))`,
    learned: :math:`\sigma(\theta(z_i, z_j) - c)`; a draw is the rest. Without draws the
    margin is 0 and a draw has probability 0.

    Arguments:
        likelihood: ``"probit"`` or ``"learned"``.
        draws: Whether games can be drawn (the margin is then learned).
        beta: Initial (or, with ``learn_beta=False``, fixed) performance noise.
        learn_beta: Learn :math:`\beta` (probit only).
        mu, sigma: The skill prior, for the learned network's standardization.
        hidden_dims: Hidden widths of the learned network's :math:`g`.
    """

    def __init__(
        self,
        likelihood: str = "probit",
        *,
        draws: bool = False,
        beta: float = BETA,
        learn_beta: bool = True,
        mu: float = MU,
        sigma: float = SIGMA,
        hidden_dims: Sequence[int] = (32, 32),
    ):
        super().__init__()
        if likelihood not in LIKELIHOODS:
            raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {likelihood!r}")
        if not beta > 0:
            raise ValueError(f"beta must be > 0, got {beta}")
        self.likelihood = likelihood
        self.draws = draws
        if likelihood == "probit":
            log_beta = torch.tensor(math.log(beta))
            if learn_beta:
                self.log_beta = nn.Parameter(log_beta)
            else:
                self.register_buffer("log_beta", log_beta)
        else:
            self.score = AntisymmetricScore(mu=mu, sigma=sigma, beta=beta, hidden_dims=hidden_dims)
        if draws:
            # TrueSkill's margin for a 10% draw rate, in the link's units
            margin = draw_margin(0.1, beta)
            if likelihood == "learned":
                margin *= 1.702 / (math.sqrt(2) * beta)
            self.raw_margin = nn.Parameter(torch.tensor(_softplus_inverse(margin)))

    @property
    def beta(self) -> Tensor:
        return self.log_beta.exp()

    @property
    def margin(self) -> Tensor | float:
        return F.softplus(self.raw_margin) if self.draws else 0.0

    def _log_probs(self, t: Tensor, margin: Tensor | float, log_cdf) -> Tensor:
        log_win = log_cdf(t - margin)
        log_loss = log_cdf(-t - margin)
        if not self.draws:
            return torch.stack([log_loss, torch.full_like(t, -math.inf), log_win], dim=-1)
        # log(F(m - t) - F(-m - t)); taken in whichever tail keeps both terms small
        upper = t < 0  # then both arguments lean positive: use F(x) - F(y) = F(-y) - F(-x)
        hi = torch.where(upper, t + margin, margin - t)
        lo = torch.where(upper, t - margin, -margin - t)
        log_hi = log_cdf(hi)
        log_draw = log_hi + _log1mexp(log_cdf(lo) - log_hi)
        return torch.stack([log_loss, log_draw, log_win], dim=-1)

    def log_probs(self, skill_i: Tensor, skill_j: Tensor, variance: Tensor | float = 0.0) -> Tensor:
        r"""``[..., 3]``: log P(i loses, draws, wins against j).

        ``variance`` (probit only) adds Gaussian uncertainty about :math:`z_i - z_j`, which
        the probit integrates in closed form:
        :math:`E[\Phi((\Delta - \varepsilon) / (\sqrt 2 \beta))] = \Phi((E\Delta - \varepsilon)
        / \sqrt{2\beta^2 + \operatorname{Var}\Delta})`.
        """
        if self.likelihood == "probit":
            scale = torch.sqrt(2 * self.beta**2 + variance)
            return self._log_probs((skill_i - skill_j) / scale, self.margin / scale, log_ndtr)
        return self._log_probs(self.score(skill_i, skill_j), self.margin, F.logsigmoid)

    def expected_probs(
        self, loc_i: Tensor, scale_i: Tensor, loc_j: Tensor, scale_j: Tensor
    ) -> Tensor:
        r"""``[..., 3]``: :math:`E_q[P(\text{i loses, draws, wins})]` under independent
        :math:`z_i \sim N(\text{loc}_i, \text{scale}_i^2)`, :math:`z_j` likewise. Closed form
        for the probit, 16 x 16-point Gauss-Hermite quadrature for the learned network."""
        if self.likelihood == "probit":
            return self.log_probs(loc_i, loc_j, scale_i**2 + scale_j**2).exp()
        nodes, weights = _gauss_hermite(loc_i.dtype)
        z_i = loc_i[..., None, None] + scale_i[..., None, None] * nodes[:, None]
        z_j = loc_j[..., None, None] + scale_j[..., None, None] * nodes
        probs = self.log_probs(z_i, z_j).exp()  # [..., n, n, 3]
        return torch.einsum("...abc,a,b->...c", probs, weights, weights)

    def marginal_log_probs(self, skill: Tensor, opp_loc: Tensor, opp_scale: Tensor) -> Tensor:
        """``[..., 3]``: log P(result against an opponent whose skill is N(opp_loc, opp_scale²)),
        the opponent's skill integrated out (closed form, or Gauss-Hermite quadrature)."""
        if self.likelihood == "probit":
            return self.log_probs(skill, opp_loc, opp_scale**2)
        nodes, weights = _gauss_hermite(opp_loc.dtype)
        z_j = opp_loc[..., None] + opp_scale[..., None] * nodes
        log_p = self.log_probs(skill[..., None], z_j)  # [..., n, 3]
        return torch.logsumexp(log_p + weights.log()[:, None], dim=-2)


def _categories(games: Tensor) -> Tensor:
    """Each game's result from its first player's side: WIN, or DRAW for a drawn game."""
    return torch.where(games[:, 2].bool(), DRAW, WIN)


def _outcome_site(log_probs: Tensor, draws: bool) -> dist.Distribution:
    if draws:
        return dist.Categorical(logits=log_probs)
    # two outcomes: a Bernoulli on "the first player wins", logits log P(win) - log P(loss)
    return dist.Bernoulli(logits=log_probs[..., WIN] - log_probs[..., LOSS])


def _observed(categories: Tensor, draws: bool) -> Tensor:
    return categories if draws else (categories == WIN).to(torch.get_default_dtype())


class SkillModel(PyroModule):
    r"""Skills of ``num_players`` players in a ``"players"`` plate; each game's result observed.

    Called as ``model(games, idx=None)`` with ``games`` a ``LongTensor[G, 3]`` of (winner,
    loser, draw) (:attr:`Tournament.games <models.tournaments.Tournament.games>`) and ``idx``
    a minibatch of game indices: the ``"games"`` plate subsamples them and scales their
    log-likelihood by G / B, so :func:`pyro_amortized.fit` trains it on minibatches of games.

    Arguments:
        num_players: Number of players.
        likelihood: ``"probit"`` (TrueSkill's, :math:`\beta` learned) or ``"learned"`` (an
            antisymmetric network, :class:`AntisymmetricScore`).
        draws: Whether the games include draws (then a draw margin is learned).
        mu, sigma: The skill prior :math:`N(\mu, \sigma^2)`.
        beta: Initial (or fixed) performance noise :math:`\beta`.
        learn_beta: Learn :math:`\beta` (probit); ``False`` holds it at ``beta``.
        hidden_dims: Hidden widths of the learned network.
    """

    def __init__(
        self,
        num_players: int,
        *,
        likelihood: str = "probit",
        draws: bool = False,
        mu: float = MU,
        sigma: float = SIGMA,
        beta: float = BETA,
        learn_beta: bool = True,
        hidden_dims: Sequence[int] = (32, 32),
    ):
        super().__init__()
        if num_players < 1:
            raise ValueError(f"SkillModel needs num_players >= 1, got {num_players}")
        if not sigma > 0:
            raise ValueError(f"SkillModel needs sigma > 0, got {sigma}")
        self.num_players = num_players
        self.mu, self.sigma = mu, sigma
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
        if not outcome.draws and games[:, 2].any():
            raise ValueError(
                "SkillModel: the games include draws; build it with SkillModel(..., draws=True)"
            )
        prior = dist.Normal(torch.tensor(float(self.mu)), torch.tensor(float(self.sigma)))
        with pyro.plate("players", self.num_players):
            skill = pyro.sample("skill", prior)
        with pyro.plate("games", len(games), subsample=idx) as ind:
            batch = games[ind]
            log_p = outcome.log_probs(skill[..., batch[:, 0]], skill[..., batch[:, 1]])
            pyro.sample(
                "outcome",
                _outcome_site(log_p, outcome.draws),
                obs=_observed(_categories(batch), outcome.draws),
            )


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
) -> AutoNormal:
    """Fit a mean-field posterior over the skills (and the likelihood's parameters) by SVI.

    Pyro's ``AutoNormal`` over the ``"players"`` plate, started at :func:`initial_skills`;
    ``TraceMeanField_ELBO`` (the KL to the prior in closed form) with ``num_particles``
    vectorized draws, on minibatches of ``batch_size`` games, by
    :func:`pyro_amortized.fit`; Adam whose learning rate decays geometrically from ``lr``
    to ``final_lr`` over the run, so the last iterates settle.
    """
    games = train.games
    pyro.set_rng_seed(seed)
    start = initial_skills(games, model.num_players, mu=model.mu, sigma=model.sigma)
    guide = AutoNormal(
        model, init_loc_fn=init_to_value(values={"skill": start}), init_scale=init_scale
    )
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
    return guide


class SkillPosterior(NamedTuple):
    """A fitted posterior's per-player mean, mean-field sd and linear-response sd, with the
    seconds the mean-field fit took and those with the correction."""

    loc: Tensor
    scale: Tensor
    corrected: Tensor
    fit_time: float
    total_time: float


def fit_posterior(model: SkillModel, train: Tournament, **kwargs) -> SkillPosterior:
    """:func:`fit_skills` (``kwargs`` go to it), then :func:`linear_response` on its fit."""
    began = time.perf_counter()
    loc, scale = skill_posterior(fit_skills(model, train, **kwargs))
    fit_time = time.perf_counter() - began
    corrected = linear_response(model, loc, scale, train.games).diagonal().sqrt()
    return SkillPosterior(loc, scale, corrected, fit_time, time.perf_counter() - began)


def skill_posterior(guide: AutoNormal) -> tuple[Tensor, Tensor]:
    """Posterior mean and sd of every player's skill under a fitted ``AutoNormal``."""
    with torch.no_grad():
        return guide.locs.skill.detach().clone(), guide.scales.skill.detach().clone()


def linear_response(
    model: SkillModel,
    loc: Tensor,
    scale: Tensor,
    games: Tensor,
    *,
    num_samples: int = 16,
    seed: int = 0,
) -> Tensor:
    r"""The linear-response covariance of the skills: :math:`(-E_q[\nabla^2 \log p(x, z)])^{-1}`.

    A mean-field posterior's variances are the inverse diagonal of the posterior precision,
    which understates the marginal variances when skills are correlated (every game ties
    two of them). Linear response recovers the covariance from the mean-field fit: for a
    Gaussian posterior, exactly. The Hessian of each game's log-likelihood in its two
    skills is taken by autograd (``num_samples`` draws from ``q``, averaged) and scattered
    into the ``[P, P]`` precision with the prior's :math:`1 / \sigma^2` diagonal.

    Returns:
        The ``[P, P]`` covariance (dense: fine for thousands of players).

    References:
        Linear Response Methods for Accurate Covariance Estimates from Mean Field
        Variational Bayes (Giordano, Broderick and Jordan, 2015).
    """
    generator = torch.Generator().manual_seed(seed)
    draws = loc + scale * torch.randn(num_samples, len(loc), generator=generator, dtype=loc.dtype)
    first, second = games[:, 0], games[:, 1]
    a = draws[:, first].detach().requires_grad_()
    b = draws[:, second].detach().requires_grad_()
    log_p = model.outcome.log_probs(a, b)
    observed = _categories(games)
    log_lik = log_p.gather(-1, observed.expand(num_samples, -1)[..., None]).sum()
    grad_a, grad_b = torch.autograd.grad(log_lik, (a, b), create_graph=True)
    h_aa, h_ab = torch.autograd.grad(grad_a.sum(), (a, b), retain_graph=True)
    (h_bb,) = torch.autograd.grad(grad_b.sum(), b)
    h_aa, h_ab, h_bb = (h.detach().mean(0).double() for h in (h_aa, h_ab, h_bb))
    P = len(loc)
    precision = torch.eye(P, dtype=torch.float64) / model.sigma**2
    precision.index_put_((first, first), -h_aa, accumulate=True)
    precision.index_put_((second, second), -h_bb, accumulate=True)
    precision.index_put_((first, second), -h_ab, accumulate=True)
    precision.index_put_((second, first), -h_ab, accumulate=True)
    factor, info = torch.linalg.cholesky_ex(precision)
    if info:
        raise ValueError(
            "linear_response: the expected Hessian of the log joint is not negative definite "
            "at this posterior (a learned likelihood that is not log-concave there), so it "
            "gives no covariance; use the mean-field scales"
        )
    return torch.cholesky_inverse(factor).to(loc.dtype)


# ------------------------------------------------------------------------ newcomers
def game_records(
    tournament: Tournament,
    players: Tensor,
    loc: Tensor,
    scale: Tensor,
    *,
    max_games: int | None = None,
) -> Tensor:
    """Each of ``players``' games, in order, as a padded set: ``[len(players), T, 4]``.

    Row ``t`` of a player holds their ``t``-th game: the opponent's posterior mean
    ``loc[opponent]`` and sd ``scale[opponent]``, the result from the player's side
    (:data:`LOSS`, :data:`DRAW` or :data:`WIN`, as a float) and 1 (a game; padding is 0).
    ``T`` is the most games any of them played, or ``max_games`` (their first games).
    """
    G = len(tournament)
    winner, loser, drawn = tournament.winner, tournament.loser, tournament.draw
    player = torch.cat([winner, loser])
    opponent = torch.cat([loser, winner])
    result = torch.cat([torch.where(drawn, DRAW, WIN), torch.where(drawn, DRAW, LOSS)])
    order = torch.cat([torch.arange(G), torch.arange(G)])
    slot = torch.full((tournament.num_players,), -1)
    slot[players] = torch.arange(len(players))
    keep = slot[player] >= 0
    row, opponent, result, order = slot[player[keep]], opponent[keep], result[keep], order[keep]
    sort = (row * G + order).argsort()
    row, opponent, result = row[sort], opponent[sort], result[sort]
    counts = torch.bincount(row, minlength=len(players))
    rank = torch.arange(len(row)) - (counts.cumsum(0) - counts)[row]
    T = int(counts.max()) if len(row) else 0
    if max_games is not None:
        T = min(T, max_games)
        keep = rank < T
        row, opponent, result, rank = row[keep], opponent[keep], result[keep], rank[keep]
    records = torch.zeros(len(players), T, 4, dtype=loc.dtype)
    records[..., 2] = WIN  # padding holds a valid category; its mask is 0
    records[row, rank] = torch.stack(
        [loc[opponent], scale[opponent], result.to(loc.dtype), torch.ones_like(loc[opponent])],
        dim=-1,
    )
    return records


class GameSetEncoder(nn.Module):
    r"""q(skill | a player's games): a permutation-invariant set encoder (Deep Sets).

    Each game (opponent's standardized posterior mean and sd, one-hot result) goes through
    :math:`\phi`; the sum over the games, with :math:`\log(1 + \text{count})`, goes
    through :math:`\rho` to the posterior's location and scale. Padding (mask 0) is left
    out of the sum, so the output depends on the set of games only, not on their order or
    on how much padding follows them. It starts at the prior, whatever the games.

    Arguments:
        mu, sigma: The skill prior; outputs are in its units.
        hidden_dim: Width of :math:`\phi` and :math:`\rho`.

    Returns:
        ``forward(records)`` (``[B, T, 4]``, see :func:`game_records`) returns ``(loc,
        scale)``, each ``[B, 1]``: what :class:`~pyro_amortized.AutoAmortizedNormal` takes
        from an encoder.

    References:
        Deep Sets (Zaheer, Kottur, Ravanbakhsh, Poczos, Salakhutdinov and Smola, 2017).
    """

    def __init__(self, *, mu: float = MU, sigma: float = SIGMA, hidden_dim: int = 32):
        super().__init__()
        self.mu, self.sigma = mu, sigma
        self.phi = nn.Sequential(
            nn.Linear(5, hidden_dim), nn.Tanh(), nn.Linear(hidden_dim, hidden_dim), nn.Tanh()
        )
        self.rho = nn.Sequential(nn.Linear(hidden_dim + 1, hidden_dim), nn.Tanh())
        self.head = nn.Linear(hidden_dim, 2)
        with torch.no_grad():
            self.head.weight.zero_()
            self.head.bias.copy_(torch.tensor([0.0, _softplus_inverse(1.0)]))

    def forward(self, records: Tensor) -> tuple[Tensor, Tensor]:
        opp_loc, opp_scale, result, mask = records.unbind(-1)
        features = torch.cat(
            [
                ((opp_loc - self.mu) / self.sigma)[..., None],
                (opp_scale / self.sigma)[..., None],
                F.one_hot(result.long(), 3).to(records.dtype),
            ],
            dim=-1,
        )
        count = mask.sum(-1, keepdim=True)
        # a sum, as the games' log-likelihoods add up (a mean would leave rho to multiply
        # it back by the count: 3x the error at five games); scaled to stay O(1)
        pooled = (self.phi(features) * mask[..., None]).sum(-2) / _POOL_SCALE
        out = self.head(self.rho(torch.cat([pooled, count.log1p()], dim=-1)))
        return self.mu + self.sigma * out[..., :1], self.sigma * F.softplus(out[..., 1:])


class NewcomerModel:
    r"""The skill of each newcomer given their games against players already fitted.

    :math:`z \sim N(\mu, \sigma^2)`, and each game's result has the likelihood of the fitted
    :class:`Outcome` with the opponent's skill integrated over its posterior
    :math:`N(m, s^2)` (closed form for the probit, quadrature for the learned network).
    Called as ``model(records, idx=None)`` with ``records`` from :func:`game_records`; the
    ``"newcomers"`` plate is the local plate of an amortized guide. The outcome's
    parameters are copied and frozen: training a newcomer encoder never changes the fit.
    """

    def __init__(self, outcome: Outcome, *, mu: float = MU, sigma: float = SIGMA):
        self.outcome = copy.deepcopy(outcome).requires_grad_(False)
        self.mu, self.sigma = mu, sigma

    def __call__(self, records: Tensor, idx: Tensor | None = None) -> None:
        draws = self.outcome.draws
        prior = dist.Normal(records.new_tensor(self.mu), records.new_tensor(self.sigma))
        with pyro.plate("newcomers", len(records), subsample=idx) as ind:
            opp_loc, opp_scale, result, mask = records[ind].unbind(-1)
            skill = pyro.sample("skill", prior)
            log_p = self.outcome.marginal_log_probs(skill[..., None], opp_loc, opp_scale)
            pyro.sample(
                "results",
                _outcome_site(log_p, draws).mask(mask.bool()).to_event(1),
                obs=_observed(result.long(), draws),
            )


def newcomer_episodes(records: Tensor, *, copies: int = 8, seed: int = 0) -> Tensor:
    """Training episodes for a newcomer encoder: ``copies`` prefixes of each record.

    Prefix lengths are log-uniform between 1 and the player's number of games, so the
    encoder sees as many short records (a newcomer's) as long ones.
    """
    generator = torch.Generator().manual_seed(seed)
    episodes = records.repeat(copies, 1, 1)
    games = episodes[..., 3].sum(-1)
    u = torch.rand(len(episodes), generator=generator, dtype=torch.float64)
    length = torch.exp(u * torch.log(games.double() + 1)).floor().clamp(min=1)
    episodes[..., 3] *= (torch.arange(episodes.shape[1]) < length[:, None]).to(records.dtype)
    return episodes


def fit_newcomer_encoder(
    model: SkillModel,
    episodes: Tensor,
    *,
    epochs: int = 150,
    batch_size: int = 256,
    lr: float = 1e-2,
    final_lr: float = 1e-3,
    num_particles: int = 1,
    estimator: str = "iwae",
    hidden_dim: int = 32,
    seed: int = 0,
    progress: bool = False,
) -> tuple[NewcomerModel, AutoAmortizedNormal]:
    """Train a :class:`GameSetEncoder` guide on episodes of fitted players' games.

    The guide is an :class:`~pyro_amortized.AutoAmortizedNormal` over the newcomers plate
    with the set encoder, trained by :func:`~pyro_amortized.fit` with
    :class:`~pyro_amortized.Trace_IWELBO` (``num_particles``, ``estimator``) and Adam
    decaying from ``lr`` to ``final_lr``. One particle (the ELBO) by default: the encoder's
    q is then used as the newcomer's posterior, and a bound with more particles trains a
    proposal instead, wider than the posterior (with 4, its sds came out 9% too wide and
    its means three times further from the exact ones, at five games).

    Returns:
        The newcomer model and its guide: ``guide.encode(records)["skill"]`` is
        :math:`q(z)` for each row of ``records``.
    """
    newcomers = NewcomerModel(model.outcome, mu=model.mu, sigma=model.sigma)
    encoder = GameSetEncoder(mu=model.mu, sigma=model.sigma, hidden_dim=hidden_dim)
    guide = AutoAmortizedNormal(newcomers, local_plate="newcomers", encoder=encoder)
    pyro.set_rng_seed(seed)
    steps = epochs * max(1, math.ceil(len(episodes) / batch_size))
    fit(
        newcomers,
        guide,
        Trace_IWELBO(num_particles, estimator=estimator),
        episodes,
        epochs=epochs,
        batch_size=batch_size,
        optimizer=decaying_adam(lr, final_lr=final_lr, steps=steps),
        seed=seed,
        progress=progress,
    )
    return newcomers, guide


def encode_newcomers(guide: AutoAmortizedNormal, records: Tensor) -> tuple[Tensor, Tensor]:
    """Posterior mean and sd of each newcomer's skill, from their records, without refitting."""
    with torch.no_grad():
        q = guide.encode(records)["skill"]
        return q.mean.reshape(-1), q.stddev.reshape(-1)


def refine_newcomers(
    guide: AutoAmortizedNormal,
    newcomers: NewcomerModel,
    records: Tensor,
    *,
    num_steps: int = 100,
    step_size: float = 0.1,
) -> tuple[Tensor, Tensor]:
    """The encoder's posteriors topped up by ``num_steps`` per-newcomer gradient steps
    (:func:`~pyro_amortized.refinement.refine`: Adam, 16 draws a step, sticking-the-landing
    gradients, which vanish at the exact posterior; the step size is in skill units)."""
    refined = refine(
        guide,
        newcomers,
        records,
        num_steps=num_steps,
        step_size=step_size,
        num_particles=16,
        estimator="stl",
    )
    return refined.loc.reshape(-1), refined.scale.reshape(-1)


# ------------------------------------------------------------------- evaluation
def scores(
    probs: Tensor,
    games: Tensor,
    *,
    skills: Tensor | None = None,
    loc: Tensor | None = None,
    scale: Tensor | None = None,
) -> dict[str, float]:
    """Held-out log-loss, accuracy and Brier score of predicted ``probs`` (``[G, 3]``, the
    first player's loss, draw, win) for ``games``; with true ``skills``, the Spearman
    correlation of ``loc`` with them and the coverage of the central 95% intervals."""
    observed = _categories(games)
    p = probs.gather(-1, observed[:, None]).squeeze(-1)
    onehot = F.one_hot(observed, 3).to(probs.dtype)
    out = {
        "log-loss": float(-p.log().mean()),
        "accuracy": float((probs.argmax(-1) == observed).double().mean()),
        "Brier": float(0.5 * ((probs - onehot) ** 2).sum(-1).mean()),
    }
    if skills is not None and loc is not None:
        out["Spearman"] = spearman(loc, skills)
        if scale is not None:
            z = torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(0.975)).item()
            out["coverage"] = float(((skills - loc).abs() <= z * scale).double().mean())
    return out


def spearman(x: Tensor, y: Tensor) -> float:
    """Spearman's rank correlation (no ties expected: continuous values)."""
    rx, ry = (v.double().argsort().argsort().double() for v in (x, y))
    return float(torch.corrcoef(torch.stack([rx, ry]))[0, 1])


def oracle_probs(tournament: Tournament, games: Tensor, draw_probability: float = 0.0) -> Tensor:
    """The generator's own probabilities: true skills and true beta."""
    outcome = probit_outcome(tournament.beta, draw_probability)
    s = tournament.skills.to(torch.get_default_dtype())
    zero = torch.zeros(len(games))
    return outcome.expected_probs(s[games[:, 0]], zero, s[games[:, 1]], zero)


def probit_outcome(beta: float, draw_probability: float = 0.0) -> Outcome:
    """TrueSkill's likelihood with a fixed :math:`\beta` and the draw margin of
    ``draw_probability`` (:func:`~models.tournaments.draw_margin`): the generator's, or
    the one the ``trueskill`` package predicts with. Without draws, ``expected_probs``
    is the package's documented win probability
    :math:`\\Phi(\\Delta\\mu / \\sqrt{2\beta^2 + \\sigma_i^2 + \\sigma_j^2})`."""
    draws = draw_probability > 0
    outcome = Outcome("probit", draws=draws, beta=beta, learn_beta=False)
    if draws:
        with torch.no_grad():
            outcome.raw_margin.fill_(_softplus_inverse(draw_margin(draw_probability, beta)))
    return outcome


def _trueskill_env(mu: float, sigma: float, beta: float, draw_probability: float):
    try:
        import trueskill
    except ImportError as error:
        raise ImportError(
            "the TrueSkill baseline needs the trueskill package: pip install trueskill "
            "(or pip install -e '.[test]')"
        ) from error
    # static skills: no dynamics (tau = 0)
    env = trueskill.TrueSkill(
        mu=mu, sigma=sigma, beta=beta, tau=0.0, draw_probability=draw_probability
    )
    return trueskill, env


def trueskill_ratings(
    train: Tournament,
    *,
    mu: float = MU,
    sigma: float = SIGMA,
    beta: float = BETA,
    draw_probability: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """One pass of the ``trueskill`` package's updates over ``train``, in order: each
    player's (mu, sigma)."""
    trueskill, env = _trueskill_env(mu, sigma, beta, draw_probability)
    ratings = [env.create_rating() for _ in range(train.num_players)]
    for w, ell, d in zip(
        train.winner.tolist(), train.loser.tolist(), train.draw.tolist(), strict=True
    ):
        ratings[w], ratings[ell] = trueskill.rate_1vs1(ratings[w], ratings[ell], drawn=d, env=env)
    dtype = torch.get_default_dtype()
    return (
        torch.tensor([r.mu for r in ratings], dtype=dtype),
        torch.tensor([r.sigma for r in ratings], dtype=dtype),
    )


def trueskill_newcomers(
    records: Tensor,
    *,
    mu: float = MU,
    sigma: float = SIGMA,
    beta: float = BETA,
    draw_probability: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """TrueSkill's one-pass update of each newcomer over their records (opponents' ratings
    held fixed): each newcomer's (mu, sigma)."""
    trueskill, env = _trueskill_env(mu, sigma, beta, draw_probability)
    locs, scales = [], []
    for record in records:
        rating = env.create_rating()
        for opp_loc, opp_scale, result, mask in record.tolist():
            if not mask:
                continue
            opponent = env.create_rating(opp_loc, opp_scale)
            if result == LOSS:
                _, rating = trueskill.rate_1vs1(opponent, rating, env=env)
            else:
                rating, _ = trueskill.rate_1vs1(rating, opponent, drawn=result == DRAW, env=env)
        locs.append(rating.mu)
        scales.append(rating.sigma)
    dtype = torch.get_default_dtype()
    return torch.tensor(locs, dtype=dtype), torch.tensor(scales, dtype=dtype)


def record_probs(outcome: Outcome, loc: Tensor, scale: Tensor, records: Tensor) -> Tensor:
    """``[N, T, 3]`` predicted results of each newcomer's recorded games from their
    posterior (``loc``, ``scale``) and the opponents' (in the records)."""
    opp_loc, opp_scale = records[..., 0], records[..., 1]
    with torch.no_grad():
        return outcome.expected_probs(
            loc[:, None].expand_as(opp_loc), scale[:, None].expand_as(opp_loc), opp_loc, opp_scale
        )


def _game_log_loss(probs: Tensor, records: Tensor) -> Tensor:
    """``[N, T]``: minus the log-probability of each recorded result (padding included)."""
    return -probs.gather(-1, records[..., 2].long()[..., None]).squeeze(-1).log()


def _per_row_log_loss(probs: Tensor, records: Tensor) -> Tensor:
    mask = records[..., 3]
    return (_game_log_loss(probs, records) * mask).sum(-1) / mask.sum(-1)


def record_log_loss(probs: Tensor, records: Tensor) -> float:
    """Mean log-loss over the recorded (unpadded) games."""
    return float(_game_log_loss(probs, records)[records[..., 3].bool()].mean())


# --------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Fit player skills from game results; compare with TrueSkill."
    )
    parser.add_argument("--players", type=int, default=500)
    parser.add_argument("--games", type=int, default=20_000)
    parser.add_argument("--pairing", default="random", choices=["random", "matched"])
    parser.add_argument("--draw-probability", type=float, default=0.0)
    parser.add_argument(
        "--games-file", default=None, help="a CSV of winner,loser[,draw][,time] instead"
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
    args = parse_args(argv)
    if args.games_file:
        tournament = read_games(args.games_file)
    else:
        tournament = generate_tournament(
            args.players,
            args.games,
            pairing=args.pairing,
            draw_probability=args.draw_probability,
            seed=args.seed,
        )
    train, test = tournament.split(args.train_fraction)
    if not args.no_baseline and importlib.util.find_spec("trueskill") is None:
        print("(the trueskill package is not installed: pip install trueskill for its rows)")
        args.no_baseline = True
    draws = tournament.has_draws
    draw_rate = float(train.draw.double().mean())
    skills = tournament.skills
    results: dict[str, dict[str, float]] = {}
    if skills is not None:
        probs = oracle_probs(tournament, test.games, args.draw_probability)
        results["oracle (true skills)"] = scores(probs, test.games, skills=skills)
    if not args.no_baseline:
        began = time.perf_counter()
        loc, scale = trueskill_ratings(train, draw_probability=draw_rate)
        elapsed = time.perf_counter() - began
        outcome = probit_outcome(BETA, draw_rate)
        probs = predict(outcome, loc, scale, test.games)
        results["trueskill, one pass"] = scores(
            probs, test.games, skills=skills, loc=loc, scale=scale
        ) | {"time (s)": elapsed}

    likelihoods = LIKELIHOODS if args.likelihood == "both" else (args.likelihood,)
    fitted = {}
    for likelihood in likelihoods:
        pyro.clear_param_store()
        model = SkillModel(tournament.num_players, likelihood=likelihood, draws=draws)
        posterior = fit_posterior(
            model,
            train,
            epochs=args.epochs,
            batch_size=args.batch_size,
            lr=args.lr,
            num_particles=args.particles,
            seed=args.seed,
            progress=not args.no_progress,
        )
        loc = posterior.loc
        name = "probit" if likelihood == "probit" else "learned θ"
        for label, sd, elapsed in (
            ("mean-field", posterior.scale, posterior.fit_time),
            ("+ linear response", posterior.corrected, posterior.total_time),
        ):
            probs = predict(model.outcome, loc, sd, test.games)
            results[f"ours, {name}, {label}"] = scores(
                probs, test.games, skills=skills, loc=loc, scale=sd
            ) | {"time (s)": elapsed}
        fitted[likelihood] = (model, loc, posterior.corrected)

    print_table(results, tournament, train, test)
    model, loc, scale = fitted[likelihoods[0]]
    if skills is not None:
        path = plot_skills(Path(args.out) / "skills.png", skills, loc, scale)
        print(f"figure: {path}")
    if args.newcomers > 0:
        results |= newcomers(args, tournament, train, likelihoods[0], draw_rate)
    return results


def predict(outcome: Outcome, loc: Tensor, scale: Tensor, games: Tensor) -> Tensor:
    """``[G, 3]``: E_q[P(first player loses, draws, wins)] for each game."""
    first, second = games[:, 0], games[:, 1]
    with torch.no_grad():
        return outcome.expected_probs(loc[first], scale[first], loc[second], scale[second])


def newcomers(
    args: argparse.Namespace,
    tournament: Tournament,
    train: Tournament,
    likelihood: str,
    draw_rate: float,
) -> dict[str, dict[str, float]]:
    """The newcomer experiment of the CLI, printed; see :func:`newcomer_experiment`."""
    began = time.perf_counter()
    out = newcomer_experiment(
        tournament,
        train,
        fraction=args.newcomers,
        first_games=args.first_games,
        likelihood=likelihood,
        draw_rate=draw_rate,
        epochs=args.epochs,
        batch_size=args.batch_size,
        encoder_epochs=args.encoder_epochs,
        refine_steps=args.refine_steps,
        baseline=not args.no_baseline,
        seed=args.seed,
        progress=not args.no_progress,
    )
    info = out.pop("info")
    difference = out.pop("difference", None)
    print(
        f"\nNewcomers: {info['newcomers']:.0f} held-out players; their first "
        f"{args.first_games} games read, their next {info['games']:.0f} games predicted "
        f"(established players fitted and encoder trained in "
        f"{time.perf_counter() - began:.0f} s)"
    )
    print(f"{'method':<42}{'log-loss':>10}{'time (s)':>10}")
    for name, row in out.items():
        timing = f"{row['time (s)']:10.3f}" if "time (s)" in row else ""
        print(f"{name:<42}{row['log-loss']:10.4f}{timing}")
    for name, values in (difference or {}).items():
        se = float(values.std() / len(values) ** 0.5)
        print(
            f"{name} minus trueskill, per newcomer: {float(values.mean()):+.4f} "
            f"(standard error {se:.4f})"
        )
    return {f"newcomers: {name}": row for name, row in out.items()}


def newcomer_experiment(
    tournament: Tournament,
    train: Tournament,
    *,
    fraction: float = 0.2,
    first_games: int = 5,
    likelihood: str = "probit",
    draw_rate: float = 0.0,
    epochs: int = 200,
    batch_size: int = 4000,
    encoder_epochs: int = 150,
    refine_steps: int = 100,
    baseline: bool = True,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, dict[str, float]]:
    """Hold out ``fraction`` of the players, fit the rest, then score the held-out ones as
    newcomers from their first ``first_games`` games and predict the rest of their games.

    Every method works from its own fit of the established players on the ``train`` games
    without the newcomers: ours (mean-field SVI, the newcomer encoder, optionally
    refined), and TrueSkill (one pass over the same games, then its one-pass update of
    each newcomer). Only the newcomers' games against established players are used.

    Returns:
        Rows of ``{"log-loss": ..., "time (s)": ...}`` by method; ``"info"``: the number
        of newcomers and of predicted games; with the baseline, ``"difference"``: each
        newcomer's log-loss minus TrueSkill's, for the encoder and the refined posterior.
    """
    generator = torch.Generator().manual_seed(seed + 1)
    P = tournament.num_players
    held_out = torch.randperm(P, generator=generator)[: max(1, int(fraction * P))]
    established = torch.ones(P, dtype=torch.bool)
    established[held_out] = False
    old = train.subset(~train.involving(held_out))
    versus = tournament.subset(tournament.involving(held_out) & ~tournament.among(held_out))

    def split(records: Tensor) -> tuple[Tensor, Tensor]:
        first, rest = records.clone(), records.clone()
        first[:, first_games:, 3] = 0
        rest[:, :first_games, 3] = 0
        return first, rest

    pyro.clear_param_store()
    model = SkillModel(P, likelihood=likelihood, draws=tournament.has_draws)
    posterior = fit_posterior(model, old, epochs=epochs, batch_size=batch_size, seed=seed)
    loc, scale = posterior.loc, posterior.corrected
    episodes = newcomer_episodes(
        game_records(old, established.nonzero().squeeze(-1), loc, scale, max_games=32),
        seed=seed,
    )
    newcomer_model, newcomer_guide = fit_newcomer_encoder(
        model, episodes, epochs=encoder_epochs, seed=seed, progress=progress
    )
    first, rest = split(game_records(versus, held_out, loc, scale))
    keep = rest[..., 3].sum(-1) > 0
    first, rest = first[keep], rest[keep]
    out: dict[str, dict[str, float]] = {
        "info": {"newcomers": len(first), "games": float(rest[..., 3].sum())}
    }
    began = time.perf_counter()
    q_loc, q_scale = encode_newcomers(newcomer_guide, first)
    elapsed = time.perf_counter() - began
    ours = record_probs(model.outcome, q_loc, q_scale, rest)
    out["ours, amortized encoder"] = {"log-loss": record_log_loss(ours, rest), "time (s)": elapsed}
    if refine_steps:
        began = time.perf_counter()
        r_loc, r_scale = refine_newcomers(
            newcomer_guide, newcomer_model, first, num_steps=refine_steps
        )
        elapsed = time.perf_counter() - began
        refined = record_probs(model.outcome, r_loc, r_scale, rest)
        out[f"ours, encoder + {refine_steps} refinement steps"] = {
            "log-loss": record_log_loss(refined, rest),
            "time (s)": elapsed,
        }
    if baseline:
        ts_loc, ts_scale = trueskill_ratings(old, draw_probability=draw_rate)
        ts_first, ts_rest = split(game_records(versus, held_out, ts_loc, ts_scale))
        ts_first, ts_rest = ts_first[keep], ts_rest[keep]
        began = time.perf_counter()
        t_loc, t_scale = trueskill_newcomers(ts_first, draw_probability=draw_rate)
        elapsed = time.perf_counter() - began
        outcome = probit_outcome(BETA, draw_rate)
        theirs = record_probs(outcome, t_loc, t_scale, ts_rest)
        out["trueskill, one-pass update"] = {
            "log-loss": record_log_loss(theirs, ts_rest),
            "time (s)": elapsed,
        }
        # the same games, newcomer by newcomer: paired comparisons
        baseline_loss = _per_row_log_loss(theirs, ts_rest)
        out["difference"] = {"encoder": _per_row_log_loss(ours, rest) - baseline_loss}
        if refine_steps:
            out["difference"]["refined"] = _per_row_log_loss(refined, rest) - baseline_loss
    prior = torch.full((len(first),), model.mu), torch.full((len(first),), model.sigma)
    out["prior (no games read)"] = {
        "log-loss": record_log_loss(record_probs(model.outcome, *prior, rest), rest)
    }
    return out


def print_table(results, tournament: Tournament, train: Tournament, test: Tournament) -> None:
    print(
        f"{tournament.num_players} players; {len(train)} games to fit, the next {len(test)} "
        "to predict"
    )
    columns = ["log-loss", "accuracy", "Brier", "Spearman", "coverage", "time (s)"]
    print(f"{'method':<42}" + "".join(f"{c:>10}" for c in columns))
    for name, row in results.items():
        cells = "".join(f"{row[c]:10.4f}" if c in row else f"{'':>10}" for c in columns)
        print(f"{name:<42}{cells}")


def plot_skills(path: Path, skills: Tensor, loc: Tensor, scale: Tensor) -> Path:
    """Posterior means +- 2 sd against the true skills."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.errorbar(skills, loc, yerr=2 * scale, fmt=".", ms=3, elinewidth=0.5, alpha=0.6)
    low, high = float(skills.min()), float(skills.max())
    ax.plot([low, high], [low, high], "k--", lw=1)
    ax.set_xlabel("true skill")
    ax.set_ylabel("posterior mean ± 2 sd")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


if __name__ == "__main__":
    main()
