r"""The inference-gap table of a trained VAE, from the checkpoint of a ``models.vae`` run.

Loads the run's checkpoint (``RUN/checkpoint.pt``, written by ``python -m models.vae ...
--out RUN``) through the same command line, trains nothing more, and splits the inference
gap of the first ``--num-data`` test images (``inference_gaps``), printing Cremer et al.'s
Table 1 layout and saving ``RUN/gaps-N.json`` and ``RUN/gaps-N.png``. The README's gap
table on binarized MNIST comes from::

    python benchmarks/inference_gaps.py --run runs/q4-normal -- \
        --dataset binarized-mnist --root ../shared/data/binarized_mnist \
        --latent 50 --epochs 20 --patience 0 --estimator iwae [--guide iaf|flow]

Everything after ``--`` is the run's own command line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root

from _runs import restore_run, split_argv  # noqa: E402

from pyro_amortized.diagnostics import inference_gaps  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    own_argv, run_argv = split_argv(argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", required=True, help="the run's directory (its --out)")
    parser.add_argument("--num-data", type=int, default=200)
    parser.add_argument("--num-samples", type=int, default=5000)
    parser.add_argument("--families", nargs="+", default=["normal", "flow"])
    parser.add_argument("--max-steps", type=int, default=5000)
    parser.add_argument("--patience", type=int, default=500)
    options = parser.parse_args(own_argv)
    run = Path(options.run)
    args, data, model, guide, history = restore_run(run, run_argv)
    print(
        f"{run}: {type(guide).__name__}, {history.epochs} epochs, "
        f"{sum(history.epoch_time):.0f} s of training; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.2f}"
    )
    began = time.perf_counter()
    report = inference_gaps(
        model,
        guide,
        data.test[: options.num_data],
        families=options.families,
        num_samples=options.num_samples,
        chunk_size=100,
        local_options={"max_steps": options.max_steps, "patience": options.patience},
        progress=sys.stderr.isatty(),
    )
    print(report.table())
    steps = ", ".join(f"{k} {v.float().mean():.0f}" for k, v in report.steps.items())
    print(f"mean Adam steps: {steps}; {time.perf_counter() - began:.0f} s in all")
    report.plot(run / f"gaps-{options.num_data}.png")
    with open(run / f"gaps-{options.num_data}.json", "w") as file:
        json.dump(report.to_dict(), file)


if __name__ == "__main__":
    main()
