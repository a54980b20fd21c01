"""The acceptance zoo's table: each Pyro example model trained with its hand-written guide
and with the amortized guide, the same steps and seeds, alternating in one process.

Prints, per model: whether it works, the ELBO per datapoint of both guides (20-particle
estimate after training; the median over seeds), the steps and the median wall time of
each training run, and how Trace_IWELBO(5) takes the model. Run alone on the machine::

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

IWELBO = {
    "vectorized": "yes",
    "batchnorm": "refused in training mode (BatchNorm couples the rows; says eval()); "
    "in eval() mode with vectorize_particles=False",
    "refused": "refused: enumerated site in a nested plate (says: TraceEnum_ELBO)",
}


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
                built = case.build()  # fresh networks for both guides
                for who, guide in (("hand", built.hand), ("ours", built.ours())):  # alternating
                    _, seconds = zoo.train(built, guide, case, seed=seed)
                    results[who].append((zoo.bound(built, guide, case), seconds))
            works = "yes"
        except Exception as error:  # noqa: BLE001 - the table says what broke
            works = f"no: {type(error).__name__}: {str(error).splitlines()[0][:60]}"
        row = [case.name, works, case.elbo().__class__.__name__, IWELBO[case.iwelbo]]
        row.append(str(case.steps))
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
        "trained with",
        "Trace_IWELBO(5)",
        "steps",
        "ours: ELBO / datapoint",
        "ours: time",
        "hand-written: ELBO / datapoint",
        "hand-written: time",
    ]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
