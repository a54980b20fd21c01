r"""A TrueSkill-style skill model written as a Pyro model, fitted by SVI on minibatches of games.

One latent skill per player, one observed outcome per game:

.. math::

    z_i \sim N(\mu, \sigma^2), \qquad
    P(i \text{ beats } j \mid z) = F(\theta(z_i, z_j) - m),

with either TrueSkill's probit link, :math:`\theta = (z_i - z_j) / (\sqrt 2 \beta)` and
:math:`F = \Phi`, :math:`\beta` learned; or a learned network that is antisymmetric by
construction, :math:`\theta(z_i, z_j) = g(z_i, z_j) - g(z_j, z_i)`, and :math:`F = \sigma`
(both in ``models._skill_likelihood``). With draws in the data, a game is drawn when
:math:`|\theta| < m` (a learned margin), as in TrueSkill. The posterior over skills is
fitted by SVI on minibatches of games (Pyro's ``AutoNormal``, mean-field), and its
covariance corrected by linear response.

Newcomers get their skill from a set encoder over their games (``models._newcomers``): an
:class:`~pyro_amortized.AutoAmortizedNormal` over a plate of newcomers, so scoring one
needs no refit. The CLI compares both with the ``trueskill`` package
(``models._skill_compare``, ``models._newcomer_compare``)::

    python -m models.trueskill                      # 500 players, 20,000 games
    python -m models.trueskill --likelihood learned --players 200 --games 5000
    python -m models.trueskill --games-file games.csv   # winner,loser[,draw][,time]
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import TraceMeanField_ELBO
from pyro.infer.autoguide import AutoNormal, init_to_value
from pyro.nn import PyroModule
from torch import Tensor

from models._skill_likelihood import (
    LIKELIHOODS,
    Outcome,
    game_results,
    outcome_distribution,
    outcome_observation,
)
from models.tournaments import BETA, MU, SIGMA, Tournament, generate_tournament, read_games
from pyro_amortized import fit
from pyro_amortized.optim import decaying_adam

__all__ = [
    "SkillModel",
    "SkillPosterior",
    "fit_posterior",
    "fit_skills",
    "initial_skills",
    "linear_response",
    "main",
    "parse_args",
    "player_features",
    "predict",
    "skill_posterior",
]


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
                outcome_distribution(log_p, outcome.draws),
                obs=outcome_observation(game_results(batch), outcome.draws),
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
    observed = game_results(games)
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


def predict(outcome: Outcome, loc: Tensor, scale: Tensor, games: Tensor) -> Tensor:
    """``[G, 3]``: E_q[P(first player loses, draws, wins)] for each game."""
    first, second = games[:, 0], games[:, 1]
    with torch.no_grad():
        return outcome.expected_probs(loc[first], scale[first], loc[second], scale[second])


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
    """Fit the skills, print the comparison tables and write the figure; returns the rows.

    Arguments:
        argv: The command line (default ``sys.argv[1:]``).

    Returns:
        Each table row's scores, by method.
    """
    # imported here, not above: the comparisons are built on this module's model
    from models._newcomer_compare import newcomer_report
    from models._skill_compare import compare_ratings, plot_skills, print_table

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
    if tournament.skills is not None:
        path = plot_skills(Path(args.out) / "skills.png", tournament.skills, loc, scale)
        print(f"figure: {path}")
    if args.newcomers > 0:
        results |= newcomer_report(args, tournament, train, likelihoods[0], draw_rate)
    return results


if __name__ == "__main__":
    main()
