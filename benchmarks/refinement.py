r"""Test-time refinement of a trained VAE: how much of the amortization gap it recovers.

Loads a ``models.vae`` run's checkpoint (``RUN/checkpoint.pt``; everything after ``--`` is
the run's own command line) and, on the first ``--num-data`` test images:

1. the gap report (``inference_gaps``, Normal family) with the bound after 20 and 100
   refinement steps (``refine``: Adam, lr 1e-2, 10 draws a step) and the fraction of the
   amortization gap each recovers, and the same at the ``--sweep`` step sizes;
2. the same refinement written by hand in PyTorch (batched Adam on per-datapoint loc and
   log-scale from the encoder's output, the ELBO of 10 draws a step), its recovered
   fractions from the same report, and the time per step of both, alternating in this
   process (``--rounds`` rounds of 20 steps each; medians);
3. the cost of refining a batch of 100 for 20 steps against one training step of the same
   model (``Trace_IWELBO(1)`` through ``SVI``, batch 100), alternating likewise.

The README's refinement table comes from::

    python benchmarks/refinement.py --run runs/q6-k1 -- \
        --dataset binarized-mnist --root ../shared/data/binarized_mnist \
        --latent 50 --epochs 30 --num-particles 1 --estimator iwae --patience 0
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from pyro.infer import SVI
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root

from _runs import restore_run, split_argv  # noqa: E402

import pyro_amortized.optim  # noqa: E402
from pyro_amortized import Trace_IWELBO  # noqa: E402
from pyro_amortized.diagnostics import inference_gaps, per_datapoint_elbo  # noqa: E402
from pyro_amortized.refinement import refine  # noqa: E402

STEPS = (20, 100)
OPTIONS = {"lr": 1e-2, "optimizer": "adam", "num_particles": 10}


def hand_refine(decoder, x: Tensor, loc: Tensor, scale: Tensor, steps: int, draws: int = 10):
    """Batched Adam on each datapoint's (loc, log scale): the ELBO of ``draws`` draws a step."""
    loc = loc.detach().clone().requires_grad_()
    log_scale = scale.detach().log().requires_grad_()
    optimizer = torch.optim.Adam([loc, log_scale], lr=OPTIONS["lr"])
    for _ in range(steps):
        elbo = hand_elbo(decoder, x, loc, log_scale, draws)
        optimizer.zero_grad()
        (-elbo.sum()).backward()
        optimizer.step()
    return loc.detach(), log_scale.detach().exp()


def hand_elbo(decoder, x: Tensor, loc: Tensor, log_scale: Tensor, draws: int) -> Tensor:
    """[N] ELBO estimates of N(loc, exp(log_scale)^2) for a Bernoulli decoder."""
    eps = torch.randn((draws,) + loc.shape, dtype=loc.dtype)
    z = loc + log_scale.exp() * eps
    logits = decoder(z)
    log_px_z = -torch.nn.functional.binary_cross_entropy_with_logits(
        logits, x.expand_as(logits), reduction="none"
    ).sum(-1)
    log_pz = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(-1)
    log_qz = (torch.distributions.Normal(0.0, 1.0).log_prob(eps) - log_scale).sum(-1)
    return (log_px_z + log_pz - log_qz).mean(0)


def main(argv: list[str] | None = None) -> None:
    own_argv, run_argv = split_argv(argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", required=True, help="the run's directory (its --out)")
    parser.add_argument("--num-data", type=int, default=500)
    parser.add_argument("--num-samples", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument(
        "--sweep",
        type=float,
        nargs="*",
        default=[2e-2, 3e-2, 5e-2],
        help="further step sizes of refine whose recovered shares to report",
    )
    options = parser.parse_args(own_argv)
    run = Path(options.run)
    args, data, model, guide, history = restore_run(run, run_argv)
    print(
        f"{run}: {history.epochs} epochs; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.2f}"
    )
    x = data.test[: options.num_data]

    # 1. the gap report, with our refinement
    report = inference_gaps(
        model,
        guide,
        x,
        families=("normal",),
        num_samples=options.num_samples,
        chunk_size=100,
        refine_steps=STEPS,
        refine_options=OPTIONS,
        progress=sys.stderr.isatty(),
    )
    print(report.table())
    print(f"({report.seconds:.0f} s)")

    # 2. the hand-written refinement: its recovered fractions, from the same report
    q = guide.encoder_output(x)
    decoder = model.decoder
    gap = report.amortization_gap.mean()
    hand = {}
    for k in STEPS:
        loc, scale = hand_refine(decoder, x, q.loc, q.scale, k)
        with torch.no_grad():
            bound = torch.stack(
                [hand_elbo(decoder, x, loc, scale.log(), 100) for _ in range(10)]
            ).mean(0)
        hand[k] = ((bound - report.elbo).mean() / gap).item()
    for k in STEPS:
        print(f"{k} steps: recovered {report.recovered(k):.1%} (ours), {hand[k]:.1%} (by hand)")

    # the recovered shares at other step sizes, against the same report
    swept = {}
    for lr in options.sweep:
        for k in STEPS:
            r = refine(model, guide, x, num_steps=k, **{**OPTIONS, "lr": lr})
            with torch.no_grad():
                bound = per_datapoint_elbo(
                    r.model, r.guide, x, num_samples=1000, chunk_size=100, local_plate="data"
                )
            swept[f"{lr:g}, {k}"] = ((bound - report.elbo).mean() / gap).item()
            print(f"refine at lr {lr:g}, {k} steps: recovered {swept[f'{lr:g}, {k}']:.1%}")

    # 3. time per refinement step, ours and by hand, and a refinement against a training step
    batch = x[:100]
    svi = SVI(model, guide, pyro_amortized.optim.Adam({"lr": 1e-3}), Trace_IWELBO(1))
    qb = guide.encoder_output(batch)
    one_draw = {**OPTIONS, "num_particles": 1}
    jobs = {  # the training steps come last in the first round: they move the model
        "ours": lambda: refine(model, guide, batch, num_steps=20, **OPTIONS),
        "hand": lambda: hand_refine(decoder, batch, qb.loc, qb.scale, 20),
        "ours, 1 draw": lambda: refine(model, guide, batch, num_steps=20, **one_draw),
        "train step": lambda: svi.step(batch),
    }
    times = {name: [] for name in jobs}
    for r in range(options.rounds):
        names = list(jobs)
        for name in names[r % len(names) :] + names[: r % len(names)]:
            began = time.perf_counter()
            jobs[name]()
            times[name].append(time.perf_counter() - began)
    med = {k: statistics.median(v) for k, v in times.items()}

    def ratio(a: str, b: str) -> float:
        return statistics.median(x / y for x, y in zip(times[a], times[b], strict=True))

    print(f"\nbatch of 100, 20 refinement steps ({options.rounds} rounds, medians):")
    print("| | 20 steps | a step |")
    print("|---|---|---|")
    for name in ("ours", "hand", "ours, 1 draw"):
        print(f"| {name} | {med[name] * 1e3:.0f} ms | {med[name] / 20 * 1e3:.2f} ms |")
    print(f"| one training step (SVI, K=1) | | {med['train step'] * 1e3:.2f} ms |")
    print(f"ours / by hand (10 draws): {ratio('ours', 'hand'):.2f}x")
    print(f"20 steps of 1 draw / one training step: {ratio('ours, 1 draw', 'train step'):.1f}x")
    print(f"20 steps of 10 draws / one training step: {ratio('ours', 'train step'):.1f}x")
    print(f"load average {os.getloadavg()[0]:.2f}")
    result = {
        "report": report.to_dict(),
        "hand_recovered": {str(k): v for k, v in hand.items()},
        "swept_recovered": swept,
        "times": times,
    }
    with open(run / f"refinement-{options.num_data}.json", "w") as file:
        json.dump(result, file)


if __name__ == "__main__":
    main()
