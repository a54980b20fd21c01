"""The acceptance zoo's table: each Pyro example model trained with its hand-written guide
and with the amortized guide, the same steps and seeds, alternating in one process.

Prints, per model: whether it works, the ELBO per datapoint of both guides (20-particle
estimate after training; the median over seeds), the steps and the median wall time of
each training run. Run alone on the machine::

    python benchmarks/zoo.py --seeds 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import zoo  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--only", nargs="*", default=None, help="zoo keys to run")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for key, case in zoo.CASES.items():
        if args.only and key not in args.only:
            continue
        results = {"hand": [], "ours": []}
        try:
            for seed in range(args.seeds):
                model, data, hand, ours = case.build()
                for who, guide in (("hand", hand), ("ours", ours())):  # alternating
                    _, seconds = zoo.train(model, guide, data, case, seed=seed)
                    results[who].append((zoo.bound(model, guide, data, case), seconds))
            works = "yes"
        except Exception as error:  # noqa: BLE001 - the table says what broke
            works = f"no: {type(error).__name__}: {str(error).splitlines()[0][:60]}"
        row = [case.name, works, str(case.steps)]
        for who in ("ours", "hand"):
            if results[who]:
                row += [
                    f"{statistics.median(b for b, _ in results[who]):.3f}",
                    f"{statistics.median(s for _, s in results[who]):.2f} s",
                ]
            else:
                row += ["-", "-"]
        rows.append(row)
    header = [
        "model",
        "works",
        "steps",
        "ours: ELBO/pt",
        "ours: time",
        "hand: ELBO/pt",
        "hand: time",
    ]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
