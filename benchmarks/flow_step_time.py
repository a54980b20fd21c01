r"""Per-step time of the flow guides relative to the diagonal Normal guide, on the MNIST VAE.

Every contestant is ``models.vae``'s VAE (784-200-200-50 tanh, as the quality bar) with
one guide and one estimator of ``Trace_IWELBO``, trained through ``SVI`` with
``pyro_amortized.optim.Adam`` (as the CLI) on minibatches of 100 binarized MNIST images.
Contestants live in parameter stores of their own and take one step each per round, in an
order that rotates; each step's time is divided by the ``normal``/``iwae`` step of the
same round, and the table shows the median ratio and the median time.

``iaf`` with ``stl`` or ``dreg`` needs the flow's inverse (one MADE pass per latent
dimension, in sequence): it is timed with fewer rounds.

Run from the repository root, alone on the machine::

    python benchmarks/flow_step_time.py
    python benchmarks/flow_step_time.py --num-particles 1 --rounds 100
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import pyro
import torch
from pyro.infer import SVI

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root

import pyro_amortized.optim  # noqa: E402
from models._vae_training import adam_options  # noqa: E402
from models.datasets import load_dataset  # noqa: E402
from models.vae import build, parse_args  # noqa: E402

GUIDES = ("normal", "iaf", "flow")
ESTIMATORS = ("iwae", "dreg")
SLOW = {("iaf", "dreg"), ("iaf", "stl")}  # the sequential inverse


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--root",
        default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "binarized_mnist"),
    )
    parser.add_argument("--num-particles", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument(
        "--slow-every", type=int, default=10, help="slow contestants step every Nth round"
    )
    parser.add_argument("--seed", type=int, default=0)
    options = parser.parse_args(argv)
    pyro.enable_validation(False)  # as the CLI trains
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"load average {os.getloadavg()[0]:.2f}"
    )
    data = load_dataset("binarized-mnist", root=options.root)
    train = data.train[:10000]
    contestants = {}
    for guide in GUIDES:
        for estimator in ESTIMATORS:
            args = parse_args(
                ["--guide", guide, "--estimator", estimator, "--latent", "50"]
                + ["--num-particles", str(options.num_particles), "--seed", str(options.seed)]
            )
            store = {"params": {}, "constraints": {}}
            with pyro.get_param_store().scope(store):
                torch.manual_seed(options.seed)
                model, guide_, loss = build(args, train)
                svi = SVI(model, guide_, pyro_amortized.optim.Adam(adam_options(1e-3)), loss)
                svi.step(train, torch.arange(100))  # builds the guide and the optimizer
            contestants[(guide, estimator)] = (store, svi)
    generator = torch.Generator().manual_seed(options.seed)
    times: dict = {key: [] for key in contestants}
    ratios: dict = {key: [] for key in contestants}
    start = time.perf_counter()
    for r in range(options.rounds):
        idx = torch.randint(len(train), (100,), generator=generator)
        keys = [k for k in contestants if k not in SLOW or r % options.slow_every == 0]
        shift = r % len(keys)
        taken = {}
        for key in keys[shift:] + keys[:shift]:
            store, svi = contestants[key]
            with pyro.get_param_store().scope(store):
                began = time.perf_counter()
                svi.step(train, idx)
                taken[key] = time.perf_counter() - began
        for key, seconds in taken.items():
            times[key].append(seconds)
            ratios[key].append(seconds / taken[("normal", "iwae")])
    print(
        f"\nK={options.num_particles}, batch 100, {options.rounds} rounds "
        f"({time.perf_counter() - start:.0f} s)\n"
    )
    print("| guide | estimator | step time / normal-iwae step | step time (median) |")
    print("|---|---|---|---|")
    for (guide, estimator), values in times.items():
        ratio = statistics.median(ratios[(guide, estimator)])
        print(
            f"| {guide} | {estimator} | {ratio:.2f}x | {1000 * statistics.median(values):.1f} ms |"
        )
    print(f"\nload average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
