r"""Scoring people from 5 answers on psych::bfi: our encoder against factor_analyzer's predictor.

For each seed s of ``--seeds`` (default 2200..2209, none used before), the 2,800 people are
split at random (seeded by s) into 2,240 for training and 560 held out. On the training
people, ``fit_factor_model`` fits the graded response model (5 factors, its defaults:
100 epochs, answer dropout ``(0.1, 0.02)``), once as it is and once with
``keep_answers=5`` (half the rows keep only 5 answers each epoch), and
``fit_factor_analyzer`` fits ``factor_analyzer``'s minres/oblimin. Every method's factors are
oblimin-rotated and aligned to the traits. Each held-out person then keeps 5 of their
answers, chosen at random (``few_answers``, seeded by s), and is scored from those 5 and
from all their answers by:

- ``encoder``: the guide's posterior means (one pass);
- ``encoder + refine``: the same after ``--steps`` refinement steps per person
  (``refined_factor_scores``: Adam, lr 5e-2, 10 draws a step), from 5 answers and from all;
- ``encoder + importance``: the exact posterior's means by self-normalized importance
  sampling, the encoder as proposal (``importance_factor_scores``, ``--samples`` 1,000
  draws a person), from 5 answers and from all;
- the same three with the ``keep_answers=5`` encoder;
- ``factor_analyzer``: the regression scores from the observed items, S_oᵀ R_oo⁻¹ x_o
  (``linear_factor_scores``; ``FactorAnalyzer.transform`` when every answer is given), the
  best linear predictor of its full-answer scores.

Each method's figure is the correlation across held-out people, per factor, of its
5-answer scores with its own full-answer scores, averaged over the 5 factors; and the
same against two common references, ``factor_analyzer``'s full-answer scores and our
encoder's. Reported: the mean over seeds with its standard error (sd / sqrt(seeds)), the
paired difference from ``factor_analyzer`` (same split, same 5 answers) with its standard
error over seeds and the median over seeds of its bootstrap standard error over people,
the per-factor figures, fit and scoring times, how closely the refined and
importance-sampled 5-answer scores agree with themselves from other random draws, and
each fit's lowest congruence with ``factor_analyzer``'s loadings (a check that the fits
found the same factors).

Run it alone on the machine (``python benchmarks/few_answers.py``, one thread, ~9
minutes); it needs ``factor_analyzer`` (the ``test`` extra) and writes
``--out/few_answers.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import pyro
import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root

from models._factor_analysis import (  # noqa: E402
    congruence,
    factor_scores,
    importance_factor_scores,
    oblimin_to_traits,
    refined_factor_scores,
)
from models._personality_compare import (  # noqa: E402
    fit_factor_analyzer,
    linear_factor_scores,
    score_correlation,
)
from models.personality import fit_factor_model  # noqa: E402
from models.questionnaires import few_answers, load_bfi  # noqa: E402

REFERENCE = "factor_analyzer"
HELD_OUT = 560
BOOTSTRAP = 500


SCORINGS = ("", " + refine", " + importance")


def score(scoring: str, fitted, rotation: Tensor, answers: Tensor, *, steps: int, samples: int):
    """``[N, Q]`` posterior means: the encoder's, refined, or by importance sampling."""
    if scoring == " + refine":
        return refined_factor_scores(
            fitted.model, fitted.guide, answers, rotation, num_steps=steps
        )[0]
    if scoring == " + importance":
        return importance_factor_scores(
            fitted.model, fitted.guide, answers, rotation, num_samples=samples
        )[0]
    return factor_scores(fitted.guide, answers, rotation)[0]


def bootstrap_se(five: Tensor, full: Tensor, five_ref: Tensor, full_ref: Tensor, seed: int):
    """Bootstrap standard error, over people, of the paired difference of two methods'
    mean-over-factors correlations."""
    generator = torch.Generator().manual_seed(seed)
    n = len(five)
    draws = []
    for _ in range(BOOTSTRAP):
        i = torch.randint(n, (n,), generator=generator)
        ours = score_correlation(five[i], full[i]).mean()
        theirs = score_correlation(five_ref[i], full_ref[i]).mean()
        draws.append(float(ours - theirs))
    return statistics.stdev(draws)


def one_seed(q, seed: int, steps: int, samples: int, count: int) -> dict:
    """Every method's 5-answer and full-answer scores on one split; their figures."""
    perm = torch.randperm(len(q.answers), generator=torch.Generator().manual_seed(seed))
    train, test = q.answers[perm[HELD_OUT:]], q.answers[perm[:HELD_OUT]]
    shown, _ = few_answers(test, count, seed=seed)
    scores: dict[str, dict[str, Tensor]] = {}
    record: dict = {"seed": seed, "fit_time": {}, "score_time": {}, "congruence": {}, "repeat": {}}

    began = time.perf_counter()
    analysis = fit_factor_analyzer(train.double(), categories=q.categories).aligned(q.traits)
    record["fit_time"][REFERENCE] = time.perf_counter() - began
    began = time.perf_counter()
    scores[REFERENCE] = {
        "full": linear_factor_scores(analysis, test.double()).float(),
        "five": linear_factor_scores(analysis, shown.double()).float(),
    }
    record["score_time"][REFERENCE] = (time.perf_counter() - began) / 2
    fits = {"encoder": {}, f"keep_answers={count}": {"keep_answers": count}}
    for name, options in fits.items():
        fitted = fit_factor_model(train, seed=seed, items=q.items, **options)
        record["fit_time"][name] = fitted.fit_time
        rotated, rotation = oblimin_to_traits(fitted.model, q.traits)
        record["congruence"][name] = float(congruence(rotated.double(), analysis.loadings)[0].min())
        for scoring in SCORINGS:
            method = name + scoring
            pyro.set_rng_seed(seed)
            began = time.perf_counter()
            scores[method] = {
                answers: score(scoring, fitted, rotation, data, steps=steps, samples=samples)
                for answers, data in (("full", test), ("five", shown))
            }
            record["score_time"][method] = (time.perf_counter() - began) / 2
            if scoring:  # the same scores from other draws: how much the draws move them
                pyro.set_rng_seed(seed + 1)
                again = score(scoring, fitted, rotation, shown, steps=steps, samples=samples)
                record["repeat"][method] = score_correlation(again, scores[method]["five"]).tolist()

    references = {
        "own": None,
        REFERENCE: scores[REFERENCE]["full"],
        "encoder": scores["encoder"]["full"],
    }
    record["correlation"] = {}
    for method, s in scores.items():
        record["correlation"][method] = {
            against: score_correlation(s["five"], s["full"] if ref is None else ref).tolist()
            for against, ref in references.items()
        }
    record["full_answer_agreement"] = score_correlation(
        scores["encoder"]["full"], scores[REFERENCE]["full"]
    ).tolist()
    theirs = scores[REFERENCE]
    record["bootstrap_se"] = {
        method: bootstrap_se(s["five"], s["full"], theirs["five"], theirs["full"], seed)
        for method, s in scores.items()
        if method != REFERENCE
    }
    return record


def summarize(records: list[dict], count: int) -> None:
    """Print the table: means over seeds with standard errors."""
    S = len(records)

    def mean_se(values: list[float]) -> tuple[float, float]:
        se = statistics.stdev(values) / S**0.5 if S > 1 else float("nan")
        return statistics.fmean(values), se

    def figure(method: str, against: str) -> list[float]:
        return [statistics.fmean(r["correlation"][method][against]) for r in records]

    methods = list(records[0]["correlation"])
    print(
        f"\npsych::bfi, {HELD_OUT} held-out people a seed, {count} random answers each; "
        f"{S} seeds ({records[0]['seed']}..{records[-1]['seed']}); correlation of the "
        f"{count}-answer scores with the full-answer scores, mean over factors and seeds "
        "(SE over seeds); diff: paired, minus factor_analyzer's; boot: the median over seeds "
        "of its bootstrap SE over people"
    )
    against = {"own": "own", REFERENCE: "FA's", "encoder": "encoder's"}
    print(
        f"{'':28s}"
        + "".join(f"{f'vs {name} full':>19s}{'diff':>19s}" for name in against.values())
        + f"{'boot':>8s}"
    )
    for method in methods:
        cells = ""
        for reference in against:
            value, se = mean_se(figure(method, reference))
            cells += f"{value:>10.4f} ({se:.4f})"
            if method == REFERENCE:
                cells += f"{'':>19s}"
            else:
                pairs = zip(figure(method, reference), figure(REFERENCE, reference), strict=True)
                diff, dse = mean_se([a - b for a, b in pairs])
                cells += f"{diff:>+10.4f} ({dse:.4f})"
        if method != REFERENCE:
            cells += f"{statistics.median(r['bootstrap_se'][method] for r in records):>8.4f}"
        print(f"{method:28s}{cells}")
    print("per factor, vs own full-answer scores (mean over seeds):")
    for method in methods:
        per = torch.tensor([r["correlation"][method]["own"] for r in records]).mean(0)
        print(f"  {method:28s}" + " ".join(f"{float(v):.3f}" for v in per))
    print(f"scoring {HELD_OUT} people (ms) and fit time (s), medians over seeds:")
    for method in methods:
        score = statistics.median(r["score_time"][method] for r in records)
        fitted = method in records[0]["fit_time"]
        fit = statistics.median(r["fit_time"][method] for r in records) if fitted else None
        print(f"  {method:28s}{1000 * score:9.1f} ms" + ("" if fit is None else f"{fit:9.2f} s"))
    print(
        f"the {count}-answer scores again from other random draws, correlated with the first "
        "(lowest factor, median over seeds):"
    )
    for method in records[0]["repeat"]:
        repeat = statistics.median(min(r["repeat"][method]) for r in records)
        print(f"  {method:28s}{repeat:9.4f}")
    lows = [min(r["congruence"].values()) for r in records]
    agreement = [min(r["full_answer_agreement"]) for r in records]
    print(
        f"lowest congruence with factor_analyzer's loadings over fits and seeds {min(lows):.3f}; "
        f"full-answer scores, encoder vs factor_analyzer, lowest factor's correlation "
        f"{min(agreement):.3f}"
    )


def main(argv: list[str] | None = None) -> dict:
    """Run the seeds (or reprint a run's table with ``--table``); returns the report."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(2200, 2210)))
    parser.add_argument("--answers", type=int, default=5, help="answers kept per person")
    parser.add_argument("--steps", type=int, default=100, help="refinement steps")
    parser.add_argument("--samples", type=int, default=1000, help="importance samples")
    parser.add_argument("--out", default="runs/benchmarks")
    parser.add_argument("--table", metavar="JSON", help="reprint the table of a run's JSON")
    args = parser.parse_args(argv)
    if args.table:
        report = json.loads(Path(args.table).read_text())
        summarize(report["records"], report["answers"])
        return report
    torch.set_num_threads(1)  # small tensors: a second thread only adds contention

    q = load_bfi()
    # imports scikit-learn before any timing
    fit_factor_analyzer(q.answers[:100].double(), categories=q.categories)
    records = []
    for seed in args.seeds:
        record = one_seed(q, seed, args.steps, args.samples, args.answers)
        records.append(record)
        print(
            f"seed {seed}: "
            + "  ".join(
                f"{m} {statistics.fmean(c['own']):.4f}" for m, c in record["correlation"].items()
            ),
            flush=True,
        )
    summarize(records, args.answers)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {
        "answers": args.answers,
        "steps": args.steps,
        "samples": args.samples,
        "records": records,
    }
    (out / "few_answers.json").write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
