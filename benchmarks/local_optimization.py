r"""Batched per-datapoint optimization (``optimize_local``) against a Python loop.

``inference_gaps`` fits a separate diagonal Normal to every datapoint. This script times
that fit for 256 test images in one batched call against 256 calls of one image each
(what a loop over datapoints costs), with the same number of Adam steps for every image
(patience off). The VAE is ``models.vae``'s 784-200-200-50 tanh net on binarized MNIST
(the digits' 64-200-200-20 when ``../shared`` is missing), untrained: the cost of a step
does not depend on the weights. Batched and looped runs alternate, ``--rounds`` times;
the table gives medians.

Run from the repository root, alone on the machine::

    python benchmarks/local_optimization.py
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root

from models.datasets import DatasetNotFoundError, load_dataset  # noqa: E402
from models.vae import build, parse_args  # noqa: E402
from pyro_amortized.perdatapoint import optimize_local  # noqa: E402

MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "binarized_mnist"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-data", type=int, default=256)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=3)
    options = parser.parse_args(argv)
    pyro.enable_validation(False)
    pyro.set_rng_seed(0)
    try:
        data = load_dataset("binarized-mnist", root=MNIST)
        vae_args = parse_args(["--latent", "50"])
    except DatasetNotFoundError:
        data = load_dataset("digits")
        vae_args = parse_args([])
    print(data.description)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"load average {os.getloadavg()[0]:.2f}"
    )
    model, guide, _ = build(vae_args, data.train)
    x = data.test[: options.num_data]
    guide(x)
    fit = {"max_steps": options.steps, "patience": options.steps + 1, "progress": False}

    def batched() -> None:
        optimize_local(model, guide, x, **fit)

    def looped() -> None:
        for i in range(len(x)):
            optimize_local(model, guide, x[i : i + 1], **fit)

    times = {"batched": [], "looped": []}
    for r in range(options.rounds):
        order = ("batched", "looped") if r % 2 == 0 else ("looped", "batched")
        for name in order:
            began = time.perf_counter()
            batched() if name == "batched" else looped()
            times[name].append(time.perf_counter() - began)
    batch, loop = (statistics.median(times[k]) for k in ("batched", "looped"))
    ratios = [b_loop / b for b, b_loop in zip(times["batched"], times["looped"], strict=True)]
    print(f"\n{len(x)} datapoints, {options.steps} Adam steps each, {options.rounds} rounds\n")
    print("| | time (median) |")
    print("|---|---|")
    print(f"| batched, one call | {batch:.2f} s |")
    print(f"| Python loop, one call per datapoint | {loop:.2f} s |")
    print(f"| loop / batched | {statistics.median(ratios):.1f}x |")
    print(f"\nload average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
