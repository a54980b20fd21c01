r"""Per-step time of amortized VI on binarized MNIST: hand-written PyTorch, plain Pyro and ours.

What it measures: the wall-clock time of one optimisation step (forward, backward, Adam
update) of a VAE/IWAE with a 784-200-200-50 tanh MLP encoder and decoder, a batch of 100
binarized MNIST images and K importance samples, for

- ``hand``: a hand-written PyTorch step (the reference; one forward and one backward, DReG
  through a gradient hook on the samples) with ``torch.optim.Adam``;
- ``pyro-trace-elbo`` and ``pyro-renyi``: plain Pyro, a hand-written guide with
  ``Trace_ELBO`` and ``RenyiELBO(alpha=0)`` (IWAE), both through ``SVI``;
- ``ours-svi``: ``AutoAmortizedNormal`` + ``Trace_IWELBO`` through ``SVI`` with
  ``pyro.optim.Adam`` (one torch optimizer per parameter tensor);
- ``ours-svi-joint``: the same with ``pyro_amortized.optim.Adam`` (one torch optimizer);
- ``ours-module``: the same through ``ELBOModule`` and ``torch.optim.Adam``;
- ``ours-svi-joint-jit``, ``ours-module-jit``: those two with ``Trace_IWELBO(jit=True)``
  (not for DReG with K > 1, which it refuses).

Every contestant owns its own copy of the networks, initialised identically from one seed,
and its own Pyro parameter store (entered outside the timed region), so that contestants
do not share parameters through the global store. All contestants of one K are built and
warmed up first; then, round after round, each takes one timed step on the same minibatch,
in an order that rotates every round. Each time is divided by the hand-written step of the
same estimator and K in the same round (plain Pyro, which has only IWAE, by the
hand-written IWAE step); the table shows the median ratio and the median step time.

Run from the repository root::

    python benchmarks/step_time.py                       # full table, K in {1, 5, 50}
    python benchmarks/step_time.py --ks 1 --estimators iwae --repeats 50
    python benchmarks/step_time.py --profile ours-svi --profile-k 1 --profile-sort tottime

The data is read from ``../shared/data/binarized_mnist/binarized_mnist_train.amat.gz``
(relative to the repository root) or ``--data``; when the file is missing, random
Bernoulli(0.5) images of the same shape stand in (the timings do not depend on the pixels).
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import gzip
import itertools
import math
import os
import pstats
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro.infer import SVI, RenyiELBO, Trace_ELBO
from pyro.poutine.util import is_validation_enabled
from torch import Tensor, nn
from torch.nn import functional as F

import pyro_amortized.optim
from pyro_amortized import ESTIMATORS, AutoAmortizedNormal, MLPEncoder, Trace_IWELBO

INPUT_DIM = 784
LATENT_DIM = 50
HIDDEN_DIMS = (200, 200)
BATCH_SIZE = 100
LEARNING_RATE = 1e-3
HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)
DEFAULT_DATA = (
    Path(__file__).resolve().parents[1]
    / ".."
    / "shared"
    / "data"
    / "binarized_mnist"
    / "binarized_mnist_train.amat.gz"
)
CONTESTANTS = (
    "hand",
    "ours-svi",
    "ours-svi-joint",
    "ours-module",
    "ours-svi-joint-jit",
    "ours-module-jit",
    "pyro-trace-elbo",
    "pyro-renyi",
)
PLAIN_PYRO = ("pyro-trace-elbo", "pyro-renyi")
# Trace_IWELBO(jit=True) compiles the step; it cannot take DReG with more than 1 particle
JIT = ("ours-svi-joint-jit", "ours-module-jit")
# issue 23's targets, per K (any estimator at K=1, DReG at K=50), for these contestants
TARGETS = {1: 1.10, 50: 1.03}
TARGETED = ("ours-svi-joint", "ours-module", "ours-svi-joint-jit", "ours-module-jit")


# ------------------------------------------------------------------------------ data
def load_data(path: Path, num_rows: int, seed: int) -> Tensor:
    """The first ``num_rows`` images of a ``.amat.gz`` file, or random ones if it is missing."""
    if not path.exists():
        print(
            f"NOTE: {path} not found; timing on random Bernoulli(0.5) images of the same "
            "shape instead (nothing is downloaded)."
        )
        generator = torch.Generator().manual_seed(seed)
        return torch.bernoulli(torch.full((num_rows, INPUT_DIM), 0.5), generator=generator)
    with gzip.open(path, "rt") as lines:
        text = " ".join(itertools.islice(lines, num_rows))
    pixels = np.array(text.split(), dtype=np.float32).reshape(-1, INPUT_DIM)
    print(f"data: {path.resolve()} ({pixels.shape[0]} rows)")
    return torch.from_numpy(pixels)


# ------------------------------------------------------------------------------ nets
def make_nets(seed: int) -> tuple[MLPEncoder, nn.Sequential]:
    """The encoder and decoder, initialised identically for every contestant."""
    torch.manual_seed(seed)
    encoder = MLPEncoder(INPUT_DIM, LATENT_DIM, HIDDEN_DIMS, activation=nn.Tanh)
    decoder = nn.Sequential(
        nn.Linear(LATENT_DIM, HIDDEN_DIMS[1]),
        nn.Tanh(),
        nn.Linear(HIDDEN_DIMS[1], HIDDEN_DIMS[0]),
        nn.Tanh(),
        nn.Linear(HIDDEN_DIMS[0], INPUT_DIM),
    )
    return encoder, decoder


class Model(nn.Module):
    """The Pyro model a user writes; a module so that ``ELBOModule`` finds the decoder."""

    def __init__(self, decoder: nn.Module):
        super().__init__()
        self.decoder = decoder

    def forward(self, x: Tensor) -> None:
        pyro.module("decoder", self.decoder)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample(
                "z", dist.Normal(x.new_zeros(LATENT_DIM), x.new_ones(LATENT_DIM)).to_event(1)
            )
            pyro.sample("x", dist.Bernoulli(logits=self.decoder(z)).to_event(1), obs=x)


class Guide(nn.Module):
    """The hand-written Pyro guide of the plain-Pyro contestants."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, x: Tensor) -> None:
        pyro.module("encoder", self.encoder)
        with pyro.plate("data", x.shape[0]):
            loc, scale = self.encoder(x)
            pyro.sample("z", dist.Normal(loc, scale).to_event(1))


# ------------------------------------------------------------------------ contestants
@dataclass
class Contestant:
    """One way of taking a training step, with the parameter store it runs in."""

    name: str
    estimator: str
    num_particles: int
    step: Callable[[Tensor], object]
    store: dict | None = None  # a Pyro parameter-store state; None when Pyro is not used
    times: list[float] = field(default_factory=list)
    ratios: list[float] = field(default_factory=list)

    @property
    def reference(self) -> tuple[str, int]:
        """The (estimator, K) of the hand-written step this one is compared with."""
        return self.estimator, self.num_particles

    @contextlib.contextmanager
    def scope(self) -> Iterator[None]:
        if self.store is None:
            yield
            return
        with pyro.get_param_store().scope(self.store):
            yield


def hand_step(encoder: nn.Module, decoder: nn.Module, k: int, estimator: str) -> Callable:
    """The reference: the bound written out in tensors, one forward and one backward."""
    params = list(encoder.parameters()) + list(decoder.parameters())
    optimizer = torch.optim.Adam(params, lr=LEARNING_RATE)
    stopped = estimator in ("stl", "dreg")
    dreg = estimator == "dreg" and k > 1

    def step(x: Tensor) -> Tensor:
        loc, scale = encoder(x)
        z = loc + scale * torch.randn((k,) + loc.shape)
        logits = decoder(z)
        log_px = -F.binary_cross_entropy_with_logits(
            logits, x.expand_as(logits), reduction="none"
        ).sum(-1)
        log_pz = (-0.5 * z.pow(2)).sum(-1) - LATENT_DIM * HALF_LOG_2PI
        if stopped:
            loc, scale = loc.detach(), scale.detach()
        log_qz = (-0.5 * ((z - loc) / scale).pow(2) - scale.log()).sum(-1)
        log_w = log_px + log_pz - (log_qz - LATENT_DIM * HALF_LOG_2PI)
        if dreg:
            weights = torch.softmax(log_w.detach(), 0).unsqueeze(-1)
            z.register_hook(lambda grad: grad * weights)
        loss = -(torch.logsumexp(log_w, 0) - math.log(k)).sum()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return loss

    return step


def svi_step(model: Callable, guide: Callable, loss, optim=pyro.optim.Adam) -> Callable:
    svi = SVI(model, guide, optim({"lr": LEARNING_RATE}), loss)
    return svi.step


def module_step(model: Model, guide: AutoAmortizedNormal, objective, x: Tensor) -> Callable:
    """``ELBOModule`` + ``torch.optim``; the first call creates the guide's parameters."""
    elbo = objective(model, guide)
    elbo(x)
    params = list(elbo.parameters())
    found = {id(p) for p in params}
    expected = list(model.decoder.parameters()) + list(guide.encoder.parameters())
    if not all(id(p) in found for p in expected):
        raise RuntimeError("ELBOModule.parameters() misses encoder or decoder parameters")
    optimizer = torch.optim.Adam(params, lr=LEARNING_RATE)

    def step(x: Tensor) -> Tensor:
        optimizer.zero_grad()
        loss = elbo(x)
        loss.backward()
        optimizer.step()
        return loss

    return step


def pyro_loss(name: str, k: int):
    if name == "pyro-trace-elbo":
        return Trace_ELBO() if k == 1 else Trace_ELBO(num_particles=k, vectorize_particles=True)
    return RenyiELBO(alpha=0, num_particles=k, vectorize_particles=True)


def build(name: str, estimator: str, k: int, seed: int, x: Tensor) -> Contestant:
    """A fresh contestant with its own networks (and parameter store), not yet warmed up."""
    encoder, decoder = make_nets(seed)
    if name == "hand":
        return Contestant(name, estimator, k, hand_step(encoder, decoder, k, estimator))
    pyro.clear_param_store()
    store: dict = {"params": {}, "constraints": {}}
    model = Model(decoder)
    with pyro.get_param_store().scope(store):
        if name in PLAIN_PYRO:
            step = svi_step(model, Guide(encoder), pyro_loss(name, k))
        else:
            guide = AutoAmortizedNormal(model, encoder=encoder)
            objective = Trace_IWELBO(k, estimator=estimator, jit=name in JIT)
            if name == "ours-svi":
                step = svi_step(model, guide, objective)
            elif name in ("ours-svi-joint", "ours-svi-joint-jit"):
                step = svi_step(model, guide, objective, pyro_amortized.optim.Adam)
            else:
                step = module_step(model, guide, objective, x)
    return Contestant(name, estimator, k, step, store)


def build_all(k: int, estimators: list[str], seed: int, x: Tensor) -> list[Contestant]:
    contestants = [
        build(name, estimator, k, seed, x)
        for name in CONTESTANTS
        if name not in PLAIN_PYRO
        for estimator in estimators
        if not (name in JIT and estimator == "dreg" and k > 1)
    ]
    if "iwae" in estimators:
        contestants += [build(name, "iwae", k, seed, x) for name in PLAIN_PYRO]
    return contestants


# ----------------------------------------------------------------------------- timing
def timed_step(contestant: Contestant, x: Tensor) -> float:
    with contestant.scope():
        start = time.perf_counter()
        contestant.step(x)
        return time.perf_counter() - start


def minibatches(data: Tensor, seed: int) -> Iterator[Tensor]:
    generator = torch.Generator().manual_seed(seed)
    while True:
        yield data[torch.randint(len(data), (BATCH_SIZE,), generator=generator)]


def run_rounds(contestants: list[Contestant], batches: Iterator[Tensor], repeats: int) -> None:
    """Times one step of every contestant per round, in rotating order, and the ratios."""
    for r in range(repeats):
        x = next(batches)
        shift = r % len(contestants)
        order = contestants[shift:] + contestants[:shift]
        times = {id(c): timed_step(c, x) for c in order}
        hand = {c.reference: times[id(c)] for c in contestants if c.name == "hand"}
        for c in contestants:
            c.times.append(times[id(c)])
            c.ratios.append(times[id(c)] / hand[c.reference])


def benchmark(
    k: int, estimators: list[str], data: Tensor, repeats: int, warmup: int, seed: int
) -> list[Contestant]:
    start = time.perf_counter()
    batches = minibatches(data, seed)
    contestants = build_all(k, estimators, seed, next(batches))
    for c in contestants:
        for _ in range(warmup):
            timed_step(c, next(batches))
    run_rounds(contestants, batches, repeats)
    print(
        f"K={k}: {len(contestants)} contestants, {warmup} warm-up steps, {repeats} rounds, "
        f"{time.perf_counter() - start:.1f} s",
        flush=True,
    )
    return contestants


# ----------------------------------------------------------------------------- output
def table(results: dict[int, list[Contestant]]) -> str:
    ks = sorted(results)
    rows: dict[tuple[str, str], dict[int, str]] = {}
    for k in ks:
        for c in results[k]:
            ratio = statistics.median(c.ratios)
            ms = 1000 * statistics.median(c.times)
            rows.setdefault((c.name, c.estimator), {})[k] = f"{ratio:.2f}x ({ms:.1f} ms)"
    header = "| contestant | estimator | " + " | ".join(f"K={k}" for k in ks) + " |"
    lines = [header, "|" + "---|" * (len(ks) + 2)]
    for (name, estimator), cells in rows.items():
        values = " | ".join(cells.get(k, "") for k in ks)
        lines.append(f"| {name} | {estimator} | {values} |")
    return "\n".join(lines)


def target_report(results: dict[int, list[Contestant]]) -> list[str]:
    lines = []
    for k, limit in TARGETS.items():
        for c in results.get(k, []):
            if c.name not in TARGETED or (k != 1 and c.estimator != "dreg"):
                continue
            ratio = statistics.median(c.ratios)
            verdict = "ok" if ratio <= limit else "MISSED"
            lines.append(
                f"target {c.name} {c.estimator} K={k}: {ratio:.3f}x <= {limit:.2f}x {verdict}"
            )
    return lines


def load_average() -> str:
    """The machine's load, to tell timings taken on a busy machine."""
    one, five, _ = os.getloadavg()
    return f"load average {one:.2f} (1 min), {five:.2f} (5 min) on {os.cpu_count()} CPUs"


# ---------------------------------------------------------------------------- profile
def profile(args: argparse.Namespace, data: Tensor) -> None:
    """Profiles N steps of one contestant and prints the top entries."""
    estimator = "iwae" if args.profile in PLAIN_PYRO else args.profile_estimator
    batches = minibatches(data, args.seed)
    contestant = build(args.profile, estimator, args.profile_k, args.seed, next(batches))
    profiler = cProfile.Profile()
    with contestant.scope():
        for _ in range(args.warmup):
            contestant.step(next(batches))
        x = next(batches)
        start = time.perf_counter()
        profiler.enable()
        for _ in range(args.profile_steps):
            contestant.step(x)
        profiler.disable()
        elapsed = time.perf_counter() - start
    print(
        f"\nprofile: {args.profile} {estimator} K={args.profile_k}, {args.profile_steps} steps, "
        f"{1000 * elapsed / args.profile_steps:.2f} ms/step under cProfile"
    )
    for sort in args.profile_sort.split(","):
        pstats.Stats(profiler, stream=sys.stdout).sort_stats(sort).print_stats(args.profile_top)


# ------------------------------------------------------------------------------- main
def int_list(text: str) -> list[int]:
    return [int(v) for v in text.split(",")]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="a .amat.gz file")
    parser.add_argument("--num-rows", type=int, default=10000, help="images to read")
    parser.add_argument("--ks", type=int_list, default=[1, 5, 50], help="e.g. 1,5,50")
    parser.add_argument("--estimators", default="iwae,stl,dreg", help="subset of iwae,stl,dreg")
    parser.add_argument(
        "--repeats",
        type=int_list,
        default=[2000, 800, 160],
        help="timed rounds: one number for every K, or one per K of --ks",
    )
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per contestant")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument(
        "--validation",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="Pyro's argument validation (off by default: it checks every distribution)",
    )
    parser.add_argument("--profile", choices=CONTESTANTS, help="profile one contestant instead")
    parser.add_argument("--profile-k", type=int, default=1)
    parser.add_argument("--profile-estimator", choices=ESTIMATORS, default="iwae")
    parser.add_argument("--profile-steps", type=int, default=200)
    parser.add_argument("--profile-sort", default="cumulative", help="e.g. cumulative,tottime")
    parser.add_argument("--profile-top", type=int, default=30)
    args = parser.parse_args(argv)
    args.estimators = args.estimators.split(",")
    unknown = set(args.estimators) - set(ESTIMATORS)
    if unknown:
        parser.error(f"unknown estimators {sorted(unknown)}; choose from {ESTIMATORS}")
    if len(args.repeats) == 1:
        args.repeats = args.repeats * len(args.ks)
    if len(args.repeats) != len(args.ks):
        parser.error("--repeats needs one number, or one per K of --ks")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    pyro.enable_validation(args.validation)
    print(
        f"torch {torch.__version__}, pyro {pyro.__version__}, "
        f"{torch.get_num_threads()} threads, pyro validation "
        f"{'enabled' if is_validation_enabled() else 'disabled'}"
    )
    print(load_average())
    data = load_data(args.data, args.num_rows, args.seed)
    if args.profile:
        profile(args, data)
        return
    start = time.perf_counter()
    results = {
        k: benchmark(k, args.estimators, data, repeats, args.warmup, args.seed)
        for k, repeats in zip(args.ks, args.repeats, strict=True)
    }
    print("\nmedian time ratio to the hand-written step (median step time)\n")
    print(table(results))
    print()
    for line in target_report(results):
        print(line)
    print(f"\ntotal {time.perf_counter() - start:.1f} s, {load_average()}")


if __name__ == "__main__":
    main()
