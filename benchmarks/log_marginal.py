"""``log_marginal_likelihood`` against a hand-written batched loop on binarized MNIST.

Both estimate :math:`\\log p(x)` by importance sampling with the encoder as proposal,
K = 5000 draws per image (Burda et al.'s IWAE-5000), for the README's MNIST VAE (latent
50, hidden 200-200, tanh; ``models.vae.build``) as built, untrained: the timings depend
on the networks' shapes, not their weights. The hand-written loop is what one writes in
plain torch: the encoder once, then chunks of particles, ``z = loc + eps * scale``,
:math:`\\log p(x \\mid z)` from the decoder's Bernoulli logits, plus
:math:`\\log \\mathcal{N}(z; 0, I) - \\log q(z \\mid x)`, and a streaming log-sum-exp. It
takes as many particles a chunk as ``log_marginal_likelihood`` chooses from its default
memory budget (the same rule, by hand), after a first two chunks of 1 and 2 particles as
``log_marginal_likelihood`` takes them, so both run the same tensor shapes on the same
draws.

The images are cut into slices (``--slice``); on every slice both run, in alternating
order, on one thread, in this one process, from the same seed: they see the same draws,
and the script checks that their estimates agree. It prints each slice's times and
ratio, the medians, and the spread of the ratios across slices as the machine's noise.
Peak memory is each contestant's peak resident set size during one call on one slice
less the resident set before it, in a fresh subprocess per contestant (Linux's
``VmHWM``, reset through ``/proc/self/clear_refs`` before the call; torch's CPU
allocations are invisible to ``tracemalloc``).

Run alone on the machine::

    python benchmarks/log_marginal.py                     # 2,000 images, K = 5000
    python benchmarks/log_marginal.py --images 200 --num-samples 200   # a trial run
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pyro
import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root

from models.datasets import load_dataset  # noqa: E402
from models.vae import build, parse_args  # noqa: E402
from pyro_amortized.diagnostics import CPU_MEMORY_BUDGET, log_marginal_likelihood  # noqa: E402

DEFAULT_ROOT = Path(__file__).resolve().parents[2] / "shared" / "data" / "binarized_mnist"


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default=str(DEFAULT_ROOT), help="binarized MNIST's folder")
    parser.add_argument("--images", type=int, default=2000, help="first test images")
    parser.add_argument("--num-samples", type=int, default=5000, help="K, draws per image")
    parser.add_argument("--slice", type=int, default=500, help="images per timed call")
    parser.add_argument("--rounds", type=int, default=1, help="passes over the images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--memory-samples", type=int, default=100, help="K of the memory runs")
    parser.add_argument("--peak-of", choices=["ours", "hand"], help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def setup(args: argparse.Namespace):
    """The VAE's model and guide, set up, and the test images."""
    torch.set_num_threads(1)
    pyro.set_rng_seed(args.seed)
    pyro.clear_param_store()
    data = load_dataset("binarized-mnist", root=args.root)
    vae_args = parse_args(["--dataset", "binarized-mnist", "--latent", "50"])
    model, guide, _ = build(vae_args, data.train)
    x = data.test[: args.images]
    guide.setup(x)
    return model, guide, x


def chunk_for(x: Tensor, latent_dim: int) -> int:
    """The particles a chunk that ``log_marginal_likelihood``'s default budget gives, by
    hand: per particle, the latents and the logits of every image, in float32."""
    per_particle = x.shape[0] * (latent_dim + x.shape[1]) * x.element_size()
    return max(1, CPU_MEMORY_BUDGET // per_particle)


def chunks(num_samples: int, chunk: int) -> list[int]:
    """Particles a chunk: 1 and 2 first, as ``log_marginal_likelihood`` measures its
    chunk on them, so that both draw the same normals in the same pieces (torch's stream
    splits anywhere only where every piece is a multiple of 16 normals)."""
    sizes, left = [], num_samples
    for k in (1, 2):
        if left:
            sizes.append(min(k, left))
            left -= sizes[-1]
    while left:
        sizes.append(min(chunk, left))
        left -= sizes[-1]
    return sizes


@torch.no_grad()
def hand_written(
    encoder: nn.Module, decoder: nn.Module, x: Tensor, num_samples: int, chunk: int
) -> Tensor:
    """IWAE-``num_samples`` per image in plain torch: one encoding, then chunks of
    particles (of ``chunk``, after a first two of 1 and 2)."""
    loc, scale = encoder(x)
    log_norm = 0.5 * math.log(2 * math.pi) * loc.shape[-1]
    log_q_const = -scale.log().sum(-1) - log_norm
    total = None
    for k in chunks(num_samples, chunk):
        eps = torch.randn((k, *loc.shape), dtype=loc.dtype, device=loc.device)
        z = loc + eps * scale
        logits = decoder(z)
        log_px_z = -F.binary_cross_entropy_with_logits(
            logits, x.expand_as(logits), reduction="none"
        ).sum(-1)
        log_pz = -0.5 * z.pow(2).sum(-1) - log_norm
        log_qz = -0.5 * eps.pow(2).sum(-1) + log_q_const
        part = torch.logsumexp(log_px_z + log_pz - log_qz, 0)
        total = part if total is None else torch.logaddexp(total, part)
    return total - math.log(num_samples)


def ours(model, guide, x: Tensor, num_samples: int) -> Tensor:
    return log_marginal_likelihood(model, guide, x, num_samples=num_samples, progress=False)


def timed(fn, seed: int) -> tuple[float, Tensor]:
    pyro.set_rng_seed(seed)
    began = time.perf_counter()
    result = fn()
    return time.perf_counter() - began, result


def peak_memory(args: argparse.Namespace, who: str) -> int:
    """Peak RSS growth in bytes of one call on one slice, in a fresh process."""
    command = [sys.executable, __file__, "--root", args.root, "--peak-of", who]
    command += ["--images", str(min(args.slice, args.images))]
    command += ["--num-samples", str(args.memory_samples), "--seed", str(args.seed)]
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_growth"]


def _status(field: str) -> int:
    """A field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``), in bytes."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def measure_peak(args: argparse.Namespace) -> None:
    """The child of :func:`peak_memory`: prints its peak RSS growth as JSON."""
    model, guide, x = setup(args)
    chunk = chunk_for(x, guide.latent_dim)
    run = {
        "ours": lambda: ours(model, guide, x, args.num_samples),
        "hand": lambda: hand_written(guide.encoder, model.decoder, x, args.num_samples, chunk),
    }[args.peak_of]
    # the peak is the call's: Linux resets the high-water mark on writing 5 to clear_refs
    # (the data's loading peaked higher before)
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")
    before = _status("VmRSS")
    run()
    print(json.dumps({"peak_growth": _status("VmHWM") - before}))


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    if args.peak_of is not None:
        return measure_peak(args)
    model, guide, x = setup(args)
    encoder, decoder = guide.encoder, model.decoder
    seen: list[int] = []  # the particles of each of our chunks, from the decoder's input
    hook = decoder.register_forward_hook(
        lambda m, inputs, out: seen.append(inputs[0].shape[0] if inputs[0].dim() == 3 else 1)
    )
    S = args.num_samples
    slices = list(x.split(args.slice))
    # warm-up: torch's and Pyro's lazy set-ups, outside the timings
    ours(model, guide, slices[0][:10], 3)
    hand_written(encoder, decoder, slices[0][:10], 3, 1)
    rows = []
    worst = 0.0
    for round_ in range(args.rounds):
        for i, part in enumerate(slices):
            chunk = chunk_for(part, guide.latent_dim)
            seed = args.seed + 1000 * round_ + i
            contestants = {
                "ours": lambda part=part: ours(model, guide, part, S),
                "hand": lambda part=part, chunk=chunk: hand_written(
                    encoder, decoder, part, S, chunk
                ),
            }
            order = ["ours", "hand"] if (round_ * len(slices) + i) % 2 == 0 else ["hand", "ours"]
            seen.clear()
            times, results = {}, {}
            for who in order:
                times[who], results[who] = timed(contestants[who], seed)
            ours_chunk = max(seen)
            worst = max(worst, (results["ours"] - results["hand"]).abs().max().item())
            rows.append((round_, i, len(part), chunk, ours_chunk, times["ours"], times["hand"]))
            print(
                f"round {round_} slice {i}: {len(part)} images, chunk {chunk} "
                f"(ours {ours_chunk}), ours {times['ours']:.2f} s, "
                f"hand-written {times['hand']:.2f} s, ratio {times['ours'] / times['hand']:.3f}",
                flush=True,
            )
    hook.remove()
    ratios = [r[5] / r[6] for r in rows]
    print()
    print(f"K = {S}, {len(x)} images in slices of {args.slice}, {args.rounds} round(s), 1 thread")
    print(f"largest |ours - hand-written| over every image: {worst:.2e} nats")
    print(f"load average after the timings: {os.getloadavg()}")
    peaks = {who: peak_memory(args, who) for who in ("ours", "hand")}
    print()
    print("| | ours | hand-written | ratio |")
    print("|---|---|---|---|")
    for round_, i, n, _, _, t_ours, t_hand in rows:
        print(
            f"| round {round_}, slice {i} ({n} images) | {t_ours:.2f} s | {t_hand:.2f} s "
            f"| {t_ours / t_hand:.3f} |"
        )
    med_ours = statistics.median(r[5] for r in rows)
    med_hand = statistics.median(r[6] for r in rows)
    print(
        f"| median a slice | {med_ours:.2f} s | {med_hand:.2f} s "
        f"| {statistics.median(ratios):.3f} |"
    )
    total_ours = sum(r[5] for r in rows) / args.rounds
    total_hand = sum(r[6] for r in rows) / args.rounds
    print(
        f"| all {len(x)} images (mean over rounds) | {total_ours:.1f} s | {total_hand:.1f} s "
        f"| {total_ours / total_hand:.3f} |"
    )
    print(
        f"| peak RSS growth, one slice of {min(args.slice, args.images)} images | "
        f"{peaks['ours'] / 2**20:.0f} MiB | {peaks['hand'] / 2**20:.0f} MiB | "
        f"{peaks['ours'] / max(peaks['hand'], 1):.2f} |"
    )
    print()
    print(
        f"ratio across slices: min {min(ratios):.3f}, median {statistics.median(ratios):.3f}, "
        f"max {max(ratios):.3f} (the spread is the machine's noise)"
    )


if __name__ == "__main__":
    main()
