"""The skill model against the ``trueskill`` package and the oracle: baselines, metrics, tables."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyro
import torch
from torch import Tensor
from torch.nn import functional as F

from models._skill_likelihood import DRAW, LIKELIHOODS, LOSS, game_results, probit_outcome
from models.tournaments import BETA, MU, SIGMA, Tournament
from models.trueskill import SkillModel, fit_posterior, predict

__all__ = [
    "check_split",
    "compare_ratings",
    "oracle_probs",
    "plot_skills",
    "print_table",
    "scores",
    "spearman",
    "trueskill_newcomers",
    "trueskill_ratings",
]


def check_split(train: Tournament, test: Tournament, where: str) -> None:
    """Refuse a split that no model could be fitted and scored on: a part without games,
    or test games holding draws that no fitted model could predict.

    Arguments:
        train, test: The two parts of a chronological split.
        where: The caller, or the file, for the message.

    Raises:
        ValueError: A part holds no games (or the test part one, too few to compare
            on), or ``test`` has draws and ``train`` none; the message says how many and
            what to do.
    """
    for part, games, least in (("training", train, 1), ("test", test, 2)):
        if len(games) < least:
            raise ValueError(
                f"{where}: the {part} part holds {len(games)} game(s) of "
                f"{len(train) + len(test)}; move the split (--train-fraction) or give more "
                "games"
            )
    if test.has_draws and not train.has_draws:
        raise ValueError(
            f"{where}: the training games hold no draws but {int(test.draw.sum())} of the "
            f"{len(test)} test games are draws, which no model fitted to them can predict "
            "(their log-loss would be infinite); move the split (--train-fraction) so the "
            "training part holds draws, or drop the draws from the file"
        )


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
    observed = game_results(games)
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
        for opp_loc, opp_scale, result, mask, _home in record.tolist():
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


def compare_ratings(
    tournament: Tournament,
    train: Tournament,
    test: Tournament,
    *,
    likelihoods: Sequence[str] = LIKELIHOODS,
    draw_probability: float = 0.0,
    baseline: bool = True,
    **fit_kwargs: Any,
) -> tuple[dict[str, dict[str, float]], tuple[Tensor, Tensor]]:
    """The table of ``python -m models.trueskill``: every method's :func:`scores` on ``test``.

    Arguments:
        tournament: All the games; with true skills (a synthetic one), the oracle's row
            comes first, from those skills and ``draw_probability``.
        train: The games to fit.
        test: The games to predict.
        likelihoods: Ours to fit, each mean-field and with linear response.
        draw_probability: The generator's, for the oracle.
        baseline: Add one pass of the ``trueskill`` package over ``train``.
        **fit_kwargs: For :func:`~models.trueskill.fit_posterior`.

    Returns:
        The rows by method, and the first likelihood's posterior means and linear-response
        sds.
    """
    check_split(train, test, "compare_ratings")
    draws = tournament.has_draws
    draw_rate = float(train.draw.double().mean())
    skills = tournament.skills
    # skills by round (a league's) have no one value to rank or cover
    static_skills = skills if skills is not None and skills.dim() == 1 else None
    results: dict[str, dict[str, float]] = {}
    if static_skills is not None:
        probs = oracle_probs(tournament, test.games, draw_probability)
        results["oracle (true skills)"] = scores(probs, test.games, skills=skills)
    if baseline:
        began = time.perf_counter()
        loc, scale = trueskill_ratings(train, draw_probability=draw_rate)
        elapsed = time.perf_counter() - began
        outcome = probit_outcome(BETA, draw_rate)
        probs = predict(outcome, loc, scale, test.games)
        results["trueskill, one pass"] = scores(
            probs, test.games, skills=static_skills, loc=loc, scale=scale
        ) | {"time (s)": elapsed}
    fitted = []
    for likelihood in likelihoods:
        pyro.clear_param_store()
        model = SkillModel(
            tournament.num_players,
            num_periods=train.num_periods,
            home=tournament.has_home,
            likelihood=likelihood,
            draws=draws,
        )
        posterior = fit_posterior(model, train, **fit_kwargs)
        loc = posterior.loc
        name = "probit" if likelihood == "probit" else "learned θ"
        guide_label = "mean-field" if train.num_periods == 1 else "Markov chains"
        for label, corrected, elapsed in (
            (guide_label, False, posterior.fit_time),
            ("+ linear response", True, posterior.total_time),
        ):
            probs = posterior.predict(model.outcome, test.games, corrected=corrected)
            sd = posterior.corrected if corrected else posterior.scale
            row = scores(probs, test.games, skills=static_skills, loc=loc, scale=sd)
            results[f"ours, {name}, {label}"] = row | {"time (s)": elapsed}
        for site in ("home_advantage", "drift"):
            q = getattr(posterior, site)
            if q is not None:
                results[f"ours, {name}, {label}"][site] = float(q.mean)
        fitted.append((loc, posterior.corrected))
    return results, fitted[0]


def print_table(
    results: dict[str, dict[str, float]],
    tournament: Tournament,
    train: Tournament,
    test: Tournament,
) -> None:
    """Prints :func:`compare_ratings`' rows, one a method."""
    print(
        f"{tournament.num_players} players; {len(train)} games to fit, the next {len(test)} "
        "to predict"
    )
    columns = ["log-loss", "accuracy", "Brier", "Spearman", "coverage", "time (s)"]
    columns += [c for c in ("home_advantage", "drift") if any(c in r for r in results.values())]
    print(f"{'method':<42}" + "".join(f"{c[:9]:>10}" for c in columns))
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
