r"""Per-step time of the flow guides relative to the diagonal Normal guide, on the MNIST VAE.

Every contestant is ``models.vae``'s VAE (784-200-200-50 tanh, as the quality bar) with
one guide and one estimator of ``Trace_IWELBO``, trained through ``SVI`` with
``pyro_amortized.optim.Adam`` (as the CLI) on minibatches of 100 binarized MNIST images.

A flow's STL and DReG cost depends on what it has learned: the IAF's path gradient
solves a triangular system per step by sweeps (``pyro_amortized.pathgrad``), and a flow
near the identity settles in one sweep. So each guide is first trained ``--train-steps``
steps with ``"iwae"``; its ``"dreg"`` contestant is a deep copy of the trained model and
guide (checked: the same loss on the same draws). Contestants live in parameter stores of
their own and take one step each per round, in an order that rotates; each step's time
is divided by the ``normal``/``iwae`` step of the same round and by its own guide's
``iwae`` step, and the table shows the median ratios and the median time. It also gives
the sweeps each IAF step took on a batch after training.

Run from the repository root, alone on the machine::

    python benchmarks/flow_step_time.py
    python benchmarks/flow_step_time.py --num-particles 1 --rounds 100 --train-steps 500
"""

from __future__ import annotations

import argparse
import copy
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
from pyro_amortized import Trace_IWELBO  # noqa: E402
from pyro_amortized.pathgrad import flow_path_sweeps  # noqa: E402

GUIDES = ("normal", "iaf", "flow")
ESTIMATORS = ("iwae", "dreg")


def _scope():
    return {"params": {}, "constraints": {}}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--root",
        default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "binarized_mnist"),
    )
    parser.add_argument("--num-particles", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--train-steps", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    options = parser.parse_args(argv)
    pyro.enable_validation(False)  # as the CLI trains
    K = options.num_particles
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"load average {os.getloadavg()[0]:.2f}"
    )
    data = load_dataset("binarized-mnist", root=options.root)
    train = data.train[:10000]
    generator = torch.Generator().manual_seed(options.seed)
    contestants = {}
    sweeps = None
    began = time.perf_counter()
    for guide_name in GUIDES:
        args = parse_args(
            ["--guide", guide_name, "--estimator", "iwae", "--latent", "50"]
            + ["--num-particles", str(K), "--seed", str(options.seed)]
        )
        store = _scope()
        with pyro.get_param_store().scope(store):
            torch.manual_seed(options.seed)
            model, guide, loss = build(args, train)
            svi = SVI(model, guide, pyro_amortized.optim.Adam(adam_options(1e-3)), loss)
            for _ in range(max(1, options.train_steps)):
                svi.step(train, torch.randint(len(train), (100,), generator=generator))
        contestants[(guide_name, "iwae")] = (store, svi, model, guide)
        model_copy, guide_copy = copy.deepcopy(model), copy.deepcopy(guide)
        store_copy = _scope()
        with pyro.get_param_store().scope(store_copy):
            loss_copy = Trace_IWELBO(K, estimator="dreg")
            svi_copy = SVI(
                model_copy, guide_copy, pyro_amortized.optim.Adam(adam_options(1e-3)), loss_copy
            )
        contestants[(guide_name, "dreg")] = (store_copy, svi_copy, model_copy, guide_copy)
        idx = torch.arange(100)
        values = []
        for store_, model_, guide_ in ((store, model, guide), (store_copy, model_copy, guide_copy)):
            with pyro.get_param_store().scope(store_), torch.no_grad():
                pyro.set_rng_seed(options.seed)
                values.append(Trace_IWELBO(K).loss(model_, guide_, train, idx))
        if values[0] != values[1]:
            raise RuntimeError(f"the copy of the {guide_name} contestant differs: {values}")
        if guide_name == "iaf":
            with pyro.get_param_store().scope(store):
                q = guide.joint_distribution(guide.encoder_output(train, idx))
                sweeps = flow_path_sweeps(q, q.rsample((K,)))
    print(f"trained every guide {options.train_steps} steps ({time.perf_counter() - began:.0f} s)")
    times: dict = {key: [] for key in contestants}
    ratios: dict = {key: [] for key in contestants}
    own: dict = {key: [] for key in contestants}
    start = time.perf_counter()
    for r in range(options.rounds):
        idx = torch.randint(len(train), (100,), generator=generator)
        keys = list(contestants)
        shift = r % len(keys)
        taken = {}
        for key in keys[shift:] + keys[:shift]:
            store, svi, _, _ = contestants[key]
            with pyro.get_param_store().scope(store):
                began = time.perf_counter()
                svi.step(train, idx)
                taken[key] = time.perf_counter() - began
        for key, seconds in taken.items():
            times[key].append(seconds)
            ratios[key].append(seconds / taken[("normal", "iwae")])
            own[key].append(seconds / taken[(key[0], "iwae")])
    print(f"\nK={K}, batch 100, {options.rounds} rounds ({time.perf_counter() - start:.0f} s)\n")
    print("| guide | estimator | step / Normal-IWAE step | step / own IWAE step | step time |")
    print("|---|---|---|---|---|")
    for (guide_name, estimator), values in times.items():
        print(
            f"| {guide_name} | {estimator} "
            f"| {statistics.median(ratios[(guide_name, estimator)]):.2f}x "
            f"| {statistics.median(own[(guide_name, estimator)]):.2f}x "
            f"| {1000 * statistics.median(values):.1f} ms |"
        )
    print(f"\nIAF path-gradient sweeps per step after training: {sweeps}")
    print(f"load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
