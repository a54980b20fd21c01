r"""The skill model against its field's baselines on leagues with home advantage, draws and
drift: held-out log-loss with paired per-game differences, fit times, and the recovered
home advantage and drift.

On a chronological split (the first ``--train-fraction`` of the games fitted, the rest
predicted from that fit without updating) every method is scored game by game:

- always 50% plus the training draw rate;
- the ``trueskill`` package, default (tau = 25/300) and with beta tuned on a validation tail;
- Bradley–Terry logistic and ordered logit (draws modelled directly), each with and
  without a home-advantage term, the ridge chosen on a validation tail
  (``models._skill_baselines``);
- ours (``models.trueskill.SkillModel``): the probit with a draw margin and a home
  advantage (where the games have a home side), static, and with skills that drift
  between periods (where the games have periods: ``--period`` for a file).

On synthetic leagues it also reports how well the home advantage (linear response's sd)
and the drift (its posterior on a grid, ``models.trueskill.drift_posterior``) are
recovered, in units of the generator's beta, which is what the games measure.

The paired difference "ours minus method" is the mean over the test games of the
per-game log-loss difference, with its standard error (sd / sqrt(G)), pooled over
``--leagues`` synthetic leagues (``models.tournaments.generate_league``, seeds 0 to
L - 1), or on one ``--games-file`` CSV (any format ``models.tournaments.read_games``
reads; ``--period`` sets the periods of drift, in the file's time units: days for dates).

``--nuts`` runs only the check of the drift's posterior against NUTS on a small league.

Run it alone on the machine (``python benchmarks/skill_leagues.py``); it writes
``--out/skill_leagues.json`` (``skill_leagues_nuts.json`` with ``--nuts``).
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

from models._skill_baselines import fit_baselines, game_log_loss, paired_difference  # noqa: E402
from models._skill_compare import check_split  # noqa: E402
from models.tournaments import BETA, Tournament, generate_league, read_games  # noqa: E402
from models.trueskill import SkillModel, drift_posterior, fit_posterior, predict  # noqa: E402


def our_name(drift: bool, home: bool) -> str:
    """The row of our model: static or drifting skills, with or without home advantage."""
    return f"ours, {'drift' if drift else 'static'}{' + home' if home else ''}"


def fit_ours(train: Tournament, *, drift: bool, epochs: int, seed: int):
    """Our model's fit: ``(probs function, posterior, seconds, model)``."""
    pyro.clear_param_store()
    model = SkillModel(
        train.num_players,
        num_periods=train.num_periods if drift else 1,
        home=train.has_home,
        draws=train.has_draws,
    )
    began = time.perf_counter()
    data = train if drift else train.by_period(float("inf"))
    posterior = fit_posterior(model, data, epochs=epochs, seed=seed)
    seconds = time.perf_counter() - began

    def probs(games):
        if not drift:
            games = games.clone()
            games[:, 4] = 0
        return predict(
            model.outcome,
            posterior.loc,
            posterior.scale,
            games,
            home_advantage=posterior.home_advantage,
            drift=posterior.drift,
        )

    return probs, posterior, seconds, model


def evaluate(league: Tournament, fraction: float, epochs: int, seed: int) -> dict:
    """Every method's per-game log-loss on the test part, fit times, and our globals."""
    train, test = league.split(fraction)
    check_split(train, test, "skill_leagues")
    losses, times = {}, {}
    for name, baseline in fit_baselines(train).items():
        losses[name] = game_log_loss(baseline.probs(test.games), test.games)
        times[name] = baseline.fit_time
    globals_, ours = {}, []
    # skills drift only where the games have periods (--period for a file)
    for drift in (False, True) if train.num_periods > 1 else (False,):
        name = our_name(drift, train.has_home)
        ours.append(name)
        probs, posterior, seconds, model = fit_ours(train, drift=drift, epochs=epochs, seed=seed)
        losses[name] = game_log_loss(probs(test.games).double(), test.games)
        times[name] = seconds
        globals_[f"{name}: beta"] = float(posterior.beta)
        home = (posterior.corrected_globals or {}).get("home_advantage")  # linear response's sd
        if home is not None:
            globals_[f"{name}: home_advantage"] = (float(home.mean), float(home.stddev))
        if drift:
            began = time.perf_counter()
            grid = drift_posterior(model, train, float(posterior.drift.mean), seed=seed)
            times["drift's posterior on the grid"] = time.perf_counter() - began
            globals_[f"{name}: drift"] = (grid.mean, grid.stddev)
            globals_[f"{name}: drift, the guide's"] = (
                float(posterior.drift.mean),
                float(posterior.drift.stddev),
            )
    return {
        "losses": losses,
        "times": times,
        "globals": globals_,
        "games": len(test),
        "ours": ours,
    }


def nuts_check(seed: int = 0) -> dict:
    """The drift's and the home advantage's posteriors by NUTS, by the guide (alone and with
    linear response) and by the grid, on an 8-team league of 4 seasons of two periods,
    beta and the draw margin held at the truth (NUTS cannot learn them)."""
    from pyro.infer import MCMC, NUTS

    from models._numerics import softplus_inverse
    from models.tournaments import draw_margin

    torch.set_default_dtype(torch.float64)
    try:
        league = generate_league(
            8, 4, home_advantage=3.0, drift=2.0, draw_probability=0.25, rounds_per_period=7,
            seed=seed,
        ).by_period(7)  # fmt: skip
        model = SkillModel(8, num_periods=league.num_periods, home=True, draws=True)
        model = model.double()
        with torch.no_grad():
            model.outcome.log_beta.fill_(math.log(BETA))
            model.outcome.raw_margin.fill_(softplus_inverse(draw_margin(0.25, BETA)))
        model.outcome.requires_grad_(False)
        pyro.set_rng_seed(seed)
        mcmc = MCMC(NUTS(model), num_samples=1000, warmup_steps=500, disable_progbar=True)
        mcmc.run(league.games)
        samples = mcmc.get_samples()
        out = {
            "NUTS": {
                site: (float(samples[site].mean()), float(samples[site].std()))
                for site in ("drift", "home_advantage")
            }
        }
        pyro.clear_param_store()
        posterior = fit_posterior(model, league, epochs=2000, seed=seed)
        for name, globals_ in (
            ("the guide", {"drift": posterior.drift, "home_advantage": posterior.home_advantage}),
            ("+ linear response", posterior.corrected_globals),
        ):
            out[name] = {k: (float(q.mean), float(q.stddev)) for k, q in globals_.items()}
        grid = drift_posterior(model, league, float(posterior.drift.mean), seed=seed)
        out["grid"] = {"drift": (grid.mean, grid.stddev)}
    finally:
        torch.set_default_dtype(torch.float32)
    print("\nAn 8-team league against NUTS (beta and the margin at the truth): mean ± sd")
    print("| | drift | home advantage |")
    print("|---|---|---|")
    for name, row in out.items():
        cells = [
            f"{row[k][0]:.2f} ± {row[k][1]:.2f}" if k in row else ""
            for k in ("drift", "home_advantage")
        ]
        print(f"| {name} | {' | '.join(cells)} |")
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--games-file", default=None, help="a CSV of games instead")
    parser.add_argument("--period", type=float, default=None, help="period length (time units)")
    parser.add_argument("--train-fraction", type=float, default=0.8)
    parser.add_argument("--leagues", type=int, default=5)
    parser.add_argument("--teams", type=int, default=20)
    parser.add_argument("--seasons", type=int, default=5)
    parser.add_argument("--home-advantage", type=float, default=3.0)
    parser.add_argument("--drift", type=float, default=1.0)
    parser.add_argument("--rounds-per-period", type=int, default=4)
    parser.add_argument("--draw-probability", type=float, default=0.25)
    parser.add_argument("--epochs", type=int, default=1000)
    parser.add_argument("--out", default="runs/benchmarks")
    parser.add_argument(
        "--nuts", action="store_true", help="only the 8-team check against NUTS (minutes)"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # small tensors: a second thread only adds contention
    if args.nuts:
        report = {"args": vars(args), "nuts": nuts_check()}
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "skill_leagues_nuts.json").write_text(json.dumps(report, indent=1))
        return report
    if args.games_file:
        try:
            league = read_games(args.games_file)
            if args.period:
                league = league.by_period(args.period)
            check_split(*league.split(args.train_fraction), args.games_file)
        except ValueError as error:  # the user's file or options: say so, no traceback
            raise SystemExit(f"error: {error}") from None
        leagues = [(args.games_file, league)]
    else:
        leagues = [
            (
                f"league {seed}",
                generate_league(
                    args.teams,
                    args.seasons,
                    home_advantage=args.home_advantage,
                    drift=args.drift,
                    draw_probability=args.draw_probability,
                    rounds_per_period=args.rounds_per_period,
                    seed=seed,
                ).by_period(args.rounds_per_period),
            )
            for seed in range(args.leagues)
        ]
    runs = []
    for seed, (name, league) in enumerate(leagues):
        runs.append(evaluate(league, args.train_fraction, args.epochs, seed))
        print(f"{name} done", flush=True)
    methods = list(runs[0]["losses"])
    extra_times = [k for k in runs[0]["times"] if k not in methods]
    pooled = {m: torch.cat([r["losses"][m] for r in runs]) for m in methods}
    reference = runs[0]["ours"][-1]
    report = {"args": vars(args), "table": {}, "globals": [r["globals"] for r in runs]}
    print(
        f"\n{len(leagues)} league(s), {sum(r['games'] for r in runs)} test games; "
        f"fit times are medians over the leagues"
    )
    print(f"| method | log-loss | {reference} minus method (se) | fit time (s) |")
    print("|---|---|---|---|")
    for m in methods:
        difference, se = paired_difference(pooled[reference], pooled[m])
        seconds = statistics.median(r["times"][m] for r in runs)
        report["table"][m] = {
            "log-loss": float(pooled[m].mean()),
            "difference": difference,
            "se": se,
            "time (s)": seconds,
        }
        cell = "" if m == reference else f"{difference:+.4f} ({se:.4f})"
        print(f"| {m} | {float(pooled[m].mean()):.4f} | {cell} | {seconds:.2f} |")
    for k in extra_times:
        seconds = statistics.median(r["times"][k] for r in runs)
        report["table"][k] = {"time (s)": seconds}
        print(f"| {k} | | | {seconds:.2f} |")
    if not args.games_file:
        # the data know skills in units of beta; the model's unit is its prior's sigma,
        # which P teams' realized skills match only to within about 1 / sqrt(2P)
        print(
            f"\ntruth: home advantage {args.home_advantage}, drift {args.drift} a period; "
            f"estimates in the generator's beta ({BETA:.3f}): the posterior's mean ± sd "
            "times beta / (the fitted beta), and z = (estimate - truth) / sd; the home "
            "advantage's sd by linear response, the drift's posterior on a grid"
        )
        truth = {"home_advantage": args.home_advantage, "drift": args.drift}
        report["recovery"] = []
        for name, run in zip((n for n, _ in leagues), runs, strict=True):
            cells, recovered = [], {}
            for method in run["ours"]:
                unit = BETA / run["globals"][f"{method}: beta"]
                for site, value in truth.items():
                    if f"{method}: {site}" not in run["globals"]:
                        continue
                    mean, sd = (unit * v for v in run["globals"][f"{method}: {site}"])
                    z = (mean - value) / sd
                    recovered[f"{method}: {site}"] = {"mean": mean, "sd": sd, "z": z}
                    cells.append(f"{method}: {site} {mean:.3f} ± {sd:.3f} (z {z:+.1f})")
            report["recovery"].append(recovered)
            print(f"{name}: " + "; ".join(cells))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "skill_leagues.json").write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
