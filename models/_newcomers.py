"""Amortized skills for newcomers: their games as a set, the set encoder, its training."""

from __future__ import annotations

import copy
import math

import pyro
import pyro.distributions as dist
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from models._numerics import softplus_inverse
from models._skill_likelihood import (
    DRAW,
    LOSS,
    WIN,
    Outcome,
    home_boost,
    outcome_distribution,
    outcome_observation,
)
from models.tournaments import MU, SIGMA, Tournament
from models.trueskill import SkillModel, skill_at
from pyro_amortized import AutoAmortizedNormal, Trace_IWELBO, fit
from pyro_amortized.optim import decaying_adam
from pyro_amortized.refinement import refine

__all__ = [
    "GameSetEncoder",
    "NewcomerModel",
    "encode_newcomers",
    "fit_newcomer_encoder",
    "game_records",
    "newcomer_episodes",
    "refine_newcomers",
]

_POOL_SCALE = 8.0  # GameSetEncoder's sum of per-game features, divided by this


def game_records(
    tournament: Tournament,
    players: Tensor,
    loc: Tensor,
    scale: Tensor,
    *,
    max_games: int | None = None,
    drift: torch.distributions.Distribution | None = None,
) -> Tensor:
    """Each of ``players``' games, in order, as a padded set: ``[len(players), T, 5]``.

    Row ``t`` of a player holds their ``t``-th game: the opponent's posterior mean and sd
    in that game, the result from the player's side (:data:`LOSS`, :data:`DRAW` or
    :data:`WIN`, as a float), 1 (a game; padding is 0), and where it was played from the
    player's side (+1 at home, -1 away, 0 neutral). ``T`` is the most games any of them
    played, or ``max_games`` (their first games).

    ``loc`` and ``scale`` are ``[P]``, or ``[P, T']`` by period: a game takes its period's
    column, or after the last period the last one's, widened by ``drift`` (the drift's
    posterior): :func:`~models.trueskill.skill_at`.
    """
    G = len(tournament)
    winner, loser, drawn = tournament.winner, tournament.loser, tournament.draw
    player = torch.cat([winner, loser])
    opponent = torch.cat([loser, winner])
    result = torch.cat([torch.where(drawn, DRAW, WIN), torch.where(drawn, DRAW, LOSS)])
    home = torch.cat([tournament.home, -tournament.home])
    order = torch.cat([torch.arange(G), torch.arange(G)])
    opp_loc, opp_var = skill_at(loc, scale, opponent, tournament.period.repeat(2), drift=drift)
    opp_scale = opp_var.sqrt()
    slot = torch.full((tournament.num_players,), -1)
    slot[players] = torch.arange(len(players))
    keep = slot[player] >= 0
    row, order = slot[player[keep]], order[keep]
    columns = [opp_loc[keep], opp_scale[keep], result[keep].to(loc.dtype), home[keep].to(loc.dtype)]
    sort = (row * G + order).argsort()
    row, columns = row[sort], [c[sort] for c in columns]
    counts = torch.bincount(row, minlength=len(players))
    rank = torch.arange(len(row)) - (counts.cumsum(0) - counts)[row]
    T = int(counts.max()) if len(row) else 0
    if max_games is not None:
        T = min(T, max_games)
        keep = rank < T
        row, rank, columns = row[keep], rank[keep], [c[keep] for c in columns]
    records = torch.zeros(len(players), T, 5, dtype=loc.dtype)
    records[..., 2] = WIN  # padding holds a valid category; its mask is 0
    o_loc, o_scale, o_result, o_home = columns
    records[row, rank] = torch.stack(
        [o_loc, o_scale, o_result, torch.ones_like(o_loc), o_home], dim=-1
    )
    return records


class GameSetEncoder(nn.Module):
    r"""q(skill | a player's games): a permutation-invariant set encoder (Deep Sets).

    Each game (opponent's standardized posterior mean and sd, one-hot result, where it was
    played) goes through
    :math:`\phi`; the sum over the games, with :math:`\log(1 + \text{count})`, goes
    through :math:`\rho` to the posterior's location and scale. Padding (mask 0) is left
    out of the sum, so the output depends on the set of games only, not on their order or
    on how much padding follows them. It starts at the prior, whatever the games.

    Arguments:
        mu, sigma: The skill prior; outputs are in its units.
        hidden_dim: Width of :math:`\phi` and :math:`\rho`.

    Returns:
        ``forward(records)`` (``[B, T, 5]``, see :func:`game_records`) returns ``(loc,
        scale)``, each ``[B, 1]``: what :class:`~pyro_amortized.AutoAmortizedNormal` takes
        from an encoder.

    References:
        Deep Sets (Zaheer, Kottur, Ravanbakhsh, Poczos, Salakhutdinov and Smola, 2017).
    """

    def __init__(self, *, mu: float = MU, sigma: float = SIGMA, hidden_dim: int = 32):
        super().__init__()
        self.mu, self.sigma = mu, sigma
        self.phi = nn.Sequential(
            nn.Linear(6, hidden_dim), nn.Tanh(), nn.Linear(hidden_dim, hidden_dim), nn.Tanh()
        )
        self.rho = nn.Sequential(nn.Linear(hidden_dim + 1, hidden_dim), nn.Tanh())
        self.head = nn.Linear(hidden_dim, 2)
        with torch.no_grad():
            self.head.weight.zero_()
            self.head.bias.copy_(torch.tensor([0.0, softplus_inverse(1.0)]))

    def forward(self, records: Tensor) -> tuple[Tensor, Tensor]:
        opp_loc, opp_scale, result, mask, home = records.unbind(-1)
        features = torch.cat(
            [
                ((opp_loc - self.mu) / self.sigma)[..., None],
                (opp_scale / self.sigma)[..., None],
                F.one_hot(result.long(), 3).to(records.dtype),
                home[..., None],
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
    :math:`N(m, s^2)` (closed form for the probit, quadrature for the learned network),
    and ``home_advantage`` (the fit's posterior mean) added to the side at home.
    Called as ``model(records, idx=None)`` with ``records`` from :func:`game_records`; the
    ``"newcomers"`` plate is the local plate of an amortized guide. The outcome's
    parameters are copied and frozen: training a newcomer encoder never changes the fit.
    """

    def __init__(
        self,
        outcome: Outcome,
        *,
        mu: float = MU,
        sigma: float = SIGMA,
        home_advantage: float = 0.0,
    ):
        self.outcome = copy.deepcopy(outcome).requires_grad_(False)
        self.mu, self.sigma, self.home_advantage = mu, sigma, home_advantage

    def __call__(self, records: Tensor, idx: Tensor | None = None) -> None:
        draws = self.outcome.draws
        prior = dist.Normal(records.new_tensor(self.mu), records.new_tensor(self.sigma))
        with pyro.plate("newcomers", len(records), subsample=idx) as ind:
            opp_loc, opp_scale, result, mask, home = records[ind].unbind(-1)
            skill = pyro.sample("skill", prior)
            boost, opp_boost = home_boost(home, self.home_advantage)
            log_p = self.outcome.marginal_log_probs(
                skill[..., None] + boost, opp_loc + opp_boost, opp_scale
            )
            pyro.sample(
                "results",
                outcome_distribution(log_p, draws).mask(mask.bool()).to_event(1),
                obs=outcome_observation(result.long(), draws),
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
    home_advantage: float = 0.0,
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
    ``home_advantage`` is the fit's (its posterior mean), for games with a home side.

    Returns:
        The newcomer model and its guide: ``guide.site_posteriors(records)["skill"]`` is
        :math:`q(z)` for each row of ``records``.
    """
    newcomers = NewcomerModel(
        model.outcome, mu=model.mu, sigma=model.sigma, home_advantage=home_advantage
    )
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
        q = guide.site_posteriors(records)["skill"]
        return q.mean.reshape(-1), q.stddev.reshape(-1)


def refine_newcomers(
    guide: AutoAmortizedNormal,
    newcomers: NewcomerModel,
    records: Tensor,
    *,
    num_steps: int = 100,
    lr: float = 0.1,
) -> tuple[Tensor, Tensor]:
    """The encoder's posteriors topped up by ``num_steps`` per-newcomer gradient steps
    (:func:`~pyro_amortized.refinement.refine`: Adam, 16 draws a step, sticking-the-landing
    gradients, which vanish at the exact posterior; the step size is in skill units)."""
    refined = refine(
        newcomers,
        guide,
        records,
        num_steps=num_steps,
        lr=lr,
        num_particles=16,
        estimator="stl",
    )
    return refined.loc.reshape(-1), refined.scale.reshape(-1)
