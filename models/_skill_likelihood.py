r"""The skill model's likelihood: P(a game's result | the two skills), probit or learned."""

from __future__ import annotations

import math
from collections.abc import Sequence

import pyro.distributions as dist
import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.special import log_ndtr

from models._numerics import gauss_hermite, log1mexp, softplus_inverse
from models.tournaments import BETA, DRAW, LOSS, MU, SIGMA, WIN, draw_margin

__all__ = [
    "DRAW",
    "LIKELIHOODS",
    "LOSS",
    "WIN",
    "AntisymmetricScore",
    "Outcome",
    "game_results",
    "home_boost",
    "outcome_distribution",
    "outcome_observation",
    "probit_outcome",
]

LIKELIHOODS = ("probit", "learned")
_GAUSS_HERMITE_NODES = 16


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
            self.raw_margin = nn.Parameter(torch.tensor(softplus_inverse(margin)))

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
        log_draw = log_hi + log1mexp(log_cdf(lo) - log_hi)
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
        nodes, weights = gauss_hermite(_GAUSS_HERMITE_NODES, loc_i.dtype)
        z_i = loc_i[..., None, None] + scale_i[..., None, None] * nodes[:, None]
        z_j = loc_j[..., None, None] + scale_j[..., None, None] * nodes
        probs = self.log_probs(z_i, z_j).exp()  # [..., n, n, 3]
        return torch.einsum("...abc,a,b->...c", probs, weights, weights)

    def marginal_log_probs(self, skill: Tensor, opp_loc: Tensor, opp_scale: Tensor) -> Tensor:
        """``[..., 3]``: log P(result against an opponent whose skill is N(opp_loc, opp_scale²)),
        the opponent's skill integrated out (closed form, or Gauss-Hermite quadrature)."""
        if self.likelihood == "probit":
            return self.log_probs(skill, opp_loc, opp_scale**2)
        nodes, weights = gauss_hermite(_GAUSS_HERMITE_NODES, opp_loc.dtype)
        z_j = opp_loc[..., None] + opp_scale[..., None] * nodes
        log_p = self.log_probs(skill[..., None], z_j)  # [..., n, 3]
        return torch.logsumexp(log_p + weights.log()[:, None], dim=-2)


def home_boost(home: Tensor, advantage: Tensor | float) -> tuple[Tensor, Tensor]:
    """What each side's skill gains from playing at home.

    Arguments:
        home: Each game's home flag: +1 the first side at home, -1 the second, 0 neutral.
        advantage: The home advantage (a tensor of any shape that broadcasts with
            ``home``, e.g. with particle dimensions).

    Returns:
        The first side's and the second side's gains: ``advantage`` for the side at
        home, 0 for the other and on neutral ground.
    """
    return (home == 1) * advantage, (home == -1) * advantage


def game_results(games: Tensor) -> Tensor:
    """Each game's result from its first player's side: WIN, or DRAW for a drawn game.

    Arguments:
        games: ``[G, 5]`` (winner, loser, draw, home, period; only draw is read).

    Returns:
        ``[G]`` categories.
    """
    return torch.where(games[:, 2].bool(), DRAW, WIN)


def outcome_distribution(log_probs: Tensor, draws: bool) -> dist.Distribution:
    """The distribution of an outcome site: a Categorical with draws, else a Bernoulli on
    "the first player wins".

    Arguments:
        log_probs: ``[..., 3]`` from :meth:`Outcome.log_probs`.
        draws: Whether games can be drawn.

    Returns:
        The distribution, batch shape ``[...]``.
    """
    if draws:
        return dist.Categorical(logits=log_probs)
    # two outcomes: a Bernoulli on "the first player wins", logits log P(win) - log P(loss)
    return dist.Bernoulli(logits=log_probs[..., WIN] - log_probs[..., LOSS])


def outcome_observation(categories: Tensor, draws: bool) -> Tensor:
    """What :func:`outcome_distribution` observes for results ``categories``.

    Arguments:
        categories: Results from the first player's side (:data:`LOSS`, :data:`DRAW`,
            :data:`WIN`).
        draws: Whether games can be drawn.

    Returns:
        The categories with draws, else whether the first player won (as floats).
    """
    return categories if draws else (categories == WIN).to(torch.get_default_dtype())


def probit_outcome(beta: float, draw_probability: float = 0.0) -> Outcome:
    r"""TrueSkill's likelihood with a fixed :math:`\beta` and the draw margin of
    ``draw_probability`` (:func:`~models.tournaments.draw_margin`): the generator's, or
    the one the ``trueskill`` package predicts with. Without draws, ``expected_probs``
    is the package's documented win probability
    :math:`\Phi(\Delta\mu / \sqrt{2\beta^2 + \sigma_i^2 + \sigma_j^2})`.

    Arguments:
        beta: The performance noise.
        draw_probability: TrueSkill's draw probability between equal players (0: no draws).

    Returns:
        The :class:`Outcome`, its parameters fixed.
    """
    draws = draw_probability > 0
    outcome = Outcome("probit", draws=draws, beta=beta, learn_beta=False)
    if draws:
        with torch.no_grad():
            outcome.raw_margin.fill_(softplus_inverse(draw_margin(draw_probability, beta)))
    return outcome
