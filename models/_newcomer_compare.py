"""Newcomers scored by the set encoder against TrueSkill's update: the CLI's second table."""

from __future__ import annotations

import argparse
import math
import time

import pyro
import torch
from torch import Tensor

from models._newcomers import (
    encode_newcomers,
    fit_newcomer_encoder,
    game_records,
    newcomer_episodes,
    refine_newcomers,
)
from models._skill_compare import trueskill_newcomers, trueskill_ratings
from models._skill_likelihood import Outcome, home_boost, probit_outcome
from models.tournaments import BETA, Tournament
from models.trueskill import SkillModel, fit_posterior

__all__ = ["newcomer_experiment", "newcomer_report", "record_log_loss", "record_probs"]


def record_probs(
    outcome: Outcome,
    loc: Tensor,
    scale: Tensor,
    records: Tensor,
    *,
    home_advantage: float = 0.0,
) -> Tensor:
    """``[N, T, 3]`` predicted results of each newcomer's recorded games from their
    posterior (``loc``, ``scale``) and the opponents' (in the records), the side at home
    raised by ``home_advantage``."""
    opp_loc, opp_scale = records[..., 0], records[..., 1]
    boost, opp_boost = home_boost(records[..., 4], home_advantage)
    with torch.no_grad():
        return outcome.expected_probs(
            loc[:, None] + boost, scale[:, None].expand_as(opp_loc), opp_loc + opp_boost, opp_scale
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


def newcomer_report(
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
        se = float(values.std() / len(values) ** 0.5) if len(values) > 1 else math.nan
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
    model = SkillModel(
        P,
        num_periods=train.num_periods,
        home=tournament.has_home,
        likelihood=likelihood,
        draws=tournament.has_draws,
    )
    posterior = fit_posterior(model, old, epochs=epochs, batch_size=batch_size, seed=seed)
    loc, scale, drift = posterior.loc, posterior.corrected, posterior.drift
    home = 0.0 if posterior.home_advantage is None else float(posterior.home_advantage.mean)
    established_records = game_records(
        old, established.nonzero().squeeze(-1), loc, scale, max_games=32, drift=drift
    )
    newcomer_model, newcomer_guide = fit_newcomer_encoder(
        model,
        newcomer_episodes(established_records, seed=seed),
        epochs=encoder_epochs,
        home_advantage=home,
        seed=seed,
        progress=progress,
    )
    first, rest = split(game_records(versus, held_out, loc, scale, drift=drift))
    keep = rest[..., 3].sum(-1) > 0
    first, rest = first[keep], rest[keep]
    out: dict[str, dict[str, float]] = {
        "info": {"newcomers": len(first), "games": float(rest[..., 3].sum())}
    }
    began = time.perf_counter()
    q_loc, q_scale = encode_newcomers(newcomer_guide, first)
    elapsed = time.perf_counter() - began
    ours = record_probs(model.outcome, q_loc, q_scale, rest, home_advantage=home)
    out["ours, amortized encoder"] = {"log-loss": record_log_loss(ours, rest), "time (s)": elapsed}
    if refine_steps:
        began = time.perf_counter()
        r_loc, r_scale = refine_newcomers(
            newcomer_guide, newcomer_model, first, num_steps=refine_steps
        )
        elapsed = time.perf_counter() - began
        refined = record_probs(model.outcome, r_loc, r_scale, rest, home_advantage=home)
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
        "log-loss": record_log_loss(
            record_probs(model.outcome, *prior, rest, home_advantage=home), rest
        )
    }
    return out
