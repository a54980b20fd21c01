r"""The personality factor model on psych::bfi against ``factor_analyzer`` (minres, oblimin).

For each seed (``--seeds``, default 3) and each variant — the graded response model, the
linear-Gaussian model, and the graded response model trained without answer dropout —
5% of the observed answers are hidden at random (seeded), the model is fitted to the
rest with ``fit_factor_model``'s defaults (amortized Normal guide, ``Trace_IWELBO(5)``
with DReG, 100 epochs), and ``models._personality_compare.compare`` reports:

- Tucker's congruence per factor with ``factor_analyzer``'s loadings on the same answers
  (both oblimin-rotated and aligned to the traits, allowing sign flips and permutations);
- the items whose largest loading is on their own trait, ours and ``factor_analyzer``'s;
- the held-out answers' mean log-probability under our importance-weighted posterior
  predictive and under the item-frequency and item-mean baselines;
- fit time (ours: one fit; ``factor_analyzer``: median of 5), and the time to encode all
  2,800 people (median of 5);
- KL(q || prior) of a person who answered nothing (the prior: 0).

The variants alternate within each seed. Run it alone on the machine
(``python benchmarks/personality.py``); it needs ``factor_analyzer`` (the ``test`` extra)
and writes ``--out/personality.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root

from models._personality_compare import compare  # noqa: E402
from models.questionnaires import load_bfi  # noqa: E402

VARIANTS = {
    "grm": {"likelihood": "grm"},
    "linear": {"likelihood": "linear"},
    "grm, no dropout": {"likelihood": "grm", "drop": None},
}


def empty_row_kl(comparison, num_items: int) -> float:
    """KL(q || N(0, I)) of a person with no answers."""
    with torch.no_grad():
        posterior = comparison.fitted.guide.site_posteriors(torch.full((1, num_items), math.nan))[
            "z"
        ]
    prior = torch.distributions.Normal(torch.zeros_like(posterior.mean), 1.0)
    prior = torch.distributions.Independent(prior, 1)
    return float(torch.distributions.kl_divergence(posterior, prior))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--out", default="runs/benchmarks")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # small tensors: a second thread only adds contention

    q = load_bfi()
    records: dict[str, list[dict]] = {name: [] for name in VARIANTS}
    for seed in range(args.seeds):
        for name, options in VARIANTS.items():
            comparison = compare(q, seed=seed, epochs=args.epochs, **options)
            reference = comparison.reference
            if reference is None:
                raise SystemExit('pip install factor_analyzer "scikit-learn<1.8" first')
            record = {
                "seed": seed,
                "congruence": [float(c) for c in reference["congruence"]],
                "items_on_trait": comparison.items_on_trait,
                "reference_items_on_trait": reference["items_on_trait"],
                "heldout": comparison.heldout,
                "fit_time": comparison.fitted.fit_time,
                "reference_fit_time": reference["fit_time"],
                "score_time": comparison.score_time,
                "empty_row_kl": empty_row_kl(comparison, q.answers.shape[1]),
            }
            records[name].append(record)
            print(
                f"seed {seed} {name:16s} congruence "
                + " ".join(f"{c:.3f}" for c in record["congruence"])
                + f"  items {record['items_on_trait']}/25  held-out "
                + f"{record['heldout']['ours']:.4f}  fit {record['fit_time']:.1f} s",
                flush=True,
            )

    def median(name: str, key) -> float:
        return statistics.median(key(r) for r in records[name])

    first = next(iter(records.values()))
    print(f"\npsych::bfi, 2800 people x 25 items, 5 factors; medians over {args.seeds} seeds")
    print(
        f"{'':18s}{'min congruence':>15s}{'items':>7s}{'held-out':>10s}"
        f"{'fit (s)':>9s}{'score (ms)':>11s}{'KL empty':>10s}"
    )
    for name in records:
        print(
            f"{name:18s}{median(name, lambda r: min(r['congruence'])):>15.3f}"
            f"{median(name, lambda r: r['items_on_trait']):>7.0f}"
            f"{median(name, lambda r: r['heldout']['ours']):>10.4f}"
            f"{median(name, lambda r: r['fit_time']):>9.1f}"
            f"{1000 * median(name, lambda r: r['score_time']):>11.1f}"
            f"{median(name, lambda r: r['empty_row_kl']):>10.3f}"
        )
    print(
        f"{'factor_analyzer':18s}{'':>15s}"
        f"{statistics.median(r['reference_items_on_trait'] for r in first):>7.0f}{'':>10s}"
        f"{statistics.median(r['reference_fit_time'] for r in first):>9.2f}"
    )
    for baseline in ("item frequencies", "item mean"):
        value = statistics.median(r["heldout"][baseline] for r in first)
        print(f"{baseline:18s}{'':>22s}{value:>10.4f}")
    for name in records:
        lows = [min(r["congruence"]) for r in records[name]]
        items = [r["items_on_trait"] for r in records[name]]
        print(
            f"{name}: min congruence over seeds {min(lows):.3f}-{max(lows):.3f}, "
            f"items on trait {min(items)}-{max(items)}"
        )
    report = {"epochs": args.epochs, "seeds": args.seeds, "records": records}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "personality.json").write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
