r"""Skill ratings on synthetic tournaments: ours against the ``trueskill`` package and the oracle.

1. On one tournament (``--players`` 500, ``--games`` 20,000, TrueSkill's generative model,
   random pairings, seed ``--seed``), the first 80% of the games fit and the last 20%
   predicted, the same data for every method: held-out log-loss, accuracy, Brier score,
   Spearman correlation with the true skills, coverage of the true skills by the central
   95% intervals, and fit time (median of ``--rounds`` fits, the methods alternating).
2. The log-loss and coverage of each method on ``--tournaments`` tournaments (seeds 0,
   1, ...): one tournament's coverage of 500 players has a standard error near 0.01, so
   a single figure says little about calibration.
3. Newcomers on the same tournaments: 20% of the players held out; each method fits the
   others on the training games without them, reads each newcomer's first 5 games
   against them and predicts the rest of the newcomer's games against them. Ours: the
   amortized set encoder (and 100 refinement steps); TrueSkill: its one-pass update. The
   per-newcomer log-loss difference is reported with its standard error.

Run it alone on the machine (``python benchmarks/skill_ratings.py``); it writes
``--out/skill_ratings.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import pyro
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root

from models._newcomer_compare import newcomer_experiment  # noqa: E402
from models._skill_compare import oracle_probs, scores, trueskill_ratings  # noqa: E402
from models._skill_likelihood import probit_outcome  # noqa: E402
from models.tournaments import BETA, generate_tournament  # noqa: E402
from models.trueskill import SkillModel, fit_posterior, predict  # noqa: E402

METHODS = ("trueskill", "probit", "learned")


def fit_method(method: str, train):
    """``(outcome, loc, scales by label, seconds)`` of one method's fit."""
    began = time.perf_counter()
    if method == "trueskill":
        loc, scale = trueskill_ratings(train)
        return (
            probit_outcome(BETA),
            loc,
            {"one pass": scale},
            (time.perf_counter() - began),
        )
    pyro.clear_param_store()
    model = SkillModel(train.num_players, likelihood=method)
    posterior = fit_posterior(model, train)
    return (
        model.outcome,
        posterior.loc,
        {"mean-field": posterior.scale, "+ linear response": posterior.corrected},
        (posterior.fit_time, posterior.total_time),
    )


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--players", type=int, default=500)
    parser.add_argument("--games", type=int, default=20_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tournaments", type=int, default=10)
    parser.add_argument("--out", default="runs/benchmarks")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # small tensors: a second thread only adds contention
    report: dict = {"args": vars(args)}

    # 1. one tournament, times as medians of alternating rounds
    tournament = generate_tournament(args.players, args.games, seed=args.seed)
    train, test = tournament.split(0.8)
    times: dict[str, list] = {m: [] for m in METHODS}
    for _ in range(args.rounds):
        for method in METHODS:
            outcome, loc, scales, seconds = fit_method(method, train)
            times[method].append(seconds)
    table = {"oracle (true skills)": scores(oracle_probs(tournament, test.games), test.games)}
    for method in METHODS:
        outcome, loc, scales, _ = fit_method(method, train)
        for i, (label, scale) in enumerate(scales.items()):
            probs = predict(outcome, loc, scale, test.games)
            row = scores(probs, test.games, skills=tournament.skills, loc=loc, scale=scale)
            seconds = times[method]
            row["time (s)"] = statistics.median(
                s if method == "trueskill" else s[i] for s in seconds
            )
            name = {
                "trueskill": "trueskill",
                "probit": "ours, probit",
                "learned": "ours, learned θ",
            }
            table[f"{name[method]}, {label}"] = row
    report["table"] = table
    print(
        f"Tournament seed {args.seed}: {args.players} players, {len(train)} games fitted, "
        f"the next {len(test)} predicted; times are medians of {args.rounds} alternating fits"
    )
    columns = ["log-loss", "accuracy", "Brier", "Spearman", "coverage", "time (s)"]
    print(f"| method | {' | '.join(columns)} |")
    print("|---" * (len(columns) + 1) + "|")
    for name, row in table.items():
        cells = [f"{row[c]:.4f}" if c in row and c != "time (s)" else "" for c in columns[:-1]]
        cells.append(f"{row['time (s)']:.1f}" if "time (s)" in row else "")
        print(f"| {name} | {' | '.join(cells)} |")

    # 2. and 3. over several tournaments
    per_seed: dict[str, dict[str, list[float]]] = {}
    differences = []
    for seed in range(args.tournaments):
        tournament = generate_tournament(args.players, args.games, seed=seed)
        train, test = tournament.split(0.8)
        rows = {"oracle": scores(oracle_probs(tournament, test.games), test.games)}
        for method in ("trueskill", "probit"):
            outcome, loc, scales, _ = fit_method(method, train)
            for label, scale in scales.items():
                probs = predict(outcome, loc, scale, test.games)
                rows[f"{method}, {label}"] = scores(
                    probs, test.games, skills=tournament.skills, loc=loc, scale=scale
                )
        newcomers = newcomer_experiment(tournament, train, seed=seed)
        newcomers.pop("info")
        differences.append(newcomers.pop("difference"))
        for name, row in newcomers.items():
            rows[f"newcomers: {name}"] = row
        for name, row in rows.items():
            for key, value in row.items():
                per_seed.setdefault(name, {}).setdefault(key, []).append(value)
        print(f"tournament {seed} done", flush=True)
    report["per_seed"] = per_seed
    print(f"\nOver {args.tournaments} tournaments (seeds 0-{args.tournaments - 1}): mean (sd)")
    print("| method | log-loss | coverage |")
    print("|---|---|---|")
    for name, row in per_seed.items():
        cells = []
        for key in ("log-loss", "coverage"):
            if key in row:
                values = row[key]
                spread = statistics.stdev(values) if len(values) > 1 else math.nan
                cells.append(f"{statistics.mean(values):.4f} ({spread:.4f})")
            else:
                cells.append("")
        print(f"| {name} | {' | '.join(cells)} |")
    report["newcomer_difference"] = {}
    print()
    for name in differences[0]:
        diffs = torch.cat([d[name] for d in differences])
        se = float(diffs.std() / len(diffs) ** 0.5)
        report["newcomer_difference"][name] = {"mean": float(diffs.mean()), "se": se}
        print(
            f"Newcomers, {name} minus trueskill, log-loss per newcomer: "
            f"{float(diffs.mean()):+.5f} (standard error {se:.5f}, {len(diffs)} newcomers over "
            f"{args.tournaments} tournaments)"
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "skill_ratings.json").write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
