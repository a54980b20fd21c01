r"""A hand-written PyTorch VAE/IWAE trained exactly like ``python -m models.vae``, side by side.

The quality bar of ``models/vae.py``: trained on the same data with the same settings,
our VAE (``AutoAmortizedNormal`` + ``Trace_IWELBO`` + ``fit``) must reach the same test
ELBO and test log p(x) as a VAE written out in plain PyTorch, and an epoch of ours must
take at most 1.15 times as long as an epoch of the reference.

The reference is what one writes by hand: an MLP encoder and decoder, the IWAE bound in
tensors (STL by detaching the encoder's outputs in log q; DReG by a gradient hook on the
samples), ``torch.optim.Adam``, a loop over shuffled minibatches and a validation pass
after each epoch. It is trained *identically* to ours:

- the same networks, starting from the same weights (copied from ours after it is built);
- the same minibatches in the same order (a ``torch.Generator`` seeded like ``fit``'s);
- the same loss scale (Pyro scales a minibatch's log-densities by N/B, so Adam's epsilon
  acts alike), learning rate, particles, estimator and number of epochs;
- the same validation bound after every epoch, counted in the epoch's time as ``fit``
  counts it. Early stopping is off for both (``--patience 0``): both train every epoch.

Ours is trained by ``models.vae.train`` (``fit`` with a checkpoint, as the CLI does), one
epoch per call, so the two alternate epoch by epoch in one process (who goes first
alternates too) and each epoch's time ratio compares neighbours in time. ``fit`` resumes
from its checkpoint with its random-number state, so ours trains exactly as an
uninterrupted ``python -m models.vae`` with the same options does; the reference draws its
noise from a generator of its own and leaves the global one alone.

Before training, a check: on one minibatch, with the same weights and the same standard
normal draws, the reference's bound and every gradient of it must agree with
``Trace_IWELBO``'s to float32 precision, for the chosen K and estimator.

Both are then evaluated on the test set: the ELBO (one sample per datapoint), the
training bound (K samples) and log p(x) by importance sampling with ``--eval-samples``
samples, ours by ``models._vae_evaluation.evaluate`` (``pyro_amortized.diagnostics``), the
reference by its own hand-written estimator.

Run from the repository root, alone on the machine (the timing is the point)::

    python benchmarks/reference_vae.py --epochs 20                    # K=5 DReG (the CLI default)
    python benchmarks/reference_vae.py --epochs 20 --num-particles 1 --estimator iwae   # ELBO

It takes the options of ``python -m models.vae`` (see its ``--help``), with other
defaults: ``--dataset binarized-mnist --root ../shared/data/binarized_mnist --latent 50
--eval-samples 5000 --patience 0 --no-progress``. The numbers, and the per-epoch times
with their ratios, are printed and written to ``--out`` as ``results.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import pyro
import torch
from torch import Tensor, nn
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root

from models._vae_evaluation import evaluate  # noqa: E402
from models._vae_training import VALID_BATCH_SIZE  # noqa: E402
from models.datasets import Dataset, load_dataset  # noqa: E402
from models.vae import ACTIVATIONS, build, parse_args, train  # noqa: E402
from pyro_amortized.diagnostics import active_units  # noqa: E402

DEFAULTS = [
    "--dataset",
    "binarized-mnist",
    "--root",
    str(Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "binarized_mnist"),
    "--latent",
    "50",
    "--eval-samples",
    "5000",
    "--patience",
    "0",
    "--no-progress",
]
TARGET_RATIO = 1.15


# ---------------------------------------------------------------------------- the model
class Encoder(nn.Module):
    """MLP from an image to the location and (softplus) scale of a diagonal Normal."""

    def __init__(self, num_pixels: int, latent_dim: int, hidden_dims: list[int], activation):
        super().__init__()
        layers: list[nn.Module] = []
        width = num_pixels
        for hidden in hidden_dims:
            layers += [nn.Linear(width, hidden), activation()]
            width = hidden
        self.hidden = nn.Sequential(*layers)
        self.head = nn.Linear(width, 2 * latent_dim)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        loc, raw_scale = self.head(self.hidden(x)).chunk(2, dim=-1)
        return loc, F.softplus(raw_scale)


def make_decoder(num_pixels: int, latent_dim: int, hidden_dims: list[int], activation) -> nn.Module:
    """MLP from a latent to the logits of the pixels."""
    layers: list[nn.Module] = []
    width = latent_dim
    for hidden in hidden_dims:
        layers += [nn.Linear(width, hidden), activation()]
        width = hidden
    return nn.Sequential(*layers, nn.Linear(width, num_pixels))


def log_weights(
    encoder: nn.Module,
    decoder: nn.Module,
    x: Tensor,
    num_particles: int,
    estimator: str = "iwae",
    generator: torch.Generator | None = None,
) -> Tensor:
    """``log p(x, z_k) - log q(z_k | x)`` for K samples per image, ``[K, batch]``.

    With ``"stl"`` and ``"dreg"`` the encoder's outputs are detached in log q (sticking
    the landing); with ``"dreg"`` and K > 1 a hook on the samples multiplies their gradient
    by the normalized weights, which turns the IWAE gradient of the encoder into DReG's.
    """
    loc, scale = encoder(x)
    eps = torch.randn((num_particles,) + loc.shape, generator=generator, dtype=loc.dtype)
    z = loc + scale * eps
    logits = decoder(z)
    log_px = -F.binary_cross_entropy_with_logits(logits, x.expand_as(logits), reduction="none").sum(
        -1
    )
    log_pz = -0.5 * z.pow(2).sum(-1)
    if estimator in ("stl", "dreg"):
        loc, scale = loc.detach(), scale.detach()
    log_qz = -0.5 * eps.pow(2) if estimator == "iwae" else -0.5 * ((z - loc) / scale).pow(2)
    log_qz = log_qz.sum(-1) - scale.log().sum(-1)
    log_w = log_px + log_pz - log_qz  # the 2 pi terms of p(z) and q(z) cancel
    if estimator == "dreg" and num_particles > 1 and torch.is_grad_enabled():
        weights = torch.softmax(log_w.detach(), 0).unsqueeze(-1)
        z.register_hook(lambda grad: grad * weights)
    return log_w


def iwae_bound(log_w: Tensor) -> Tensor:
    """``log (1/K) sum_k w_k`` per image, ``[batch]``."""
    return torch.logsumexp(log_w, 0) - math.log(log_w.shape[0])


class Reference:
    """The hand-written VAE, its optimizer, its generators and its epoch loop."""

    def __init__(self, args: argparse.Namespace, num_pixels: int):
        activation = ACTIVATIONS[args.activation]
        self.encoder = Encoder(num_pixels, args.latent, args.hidden, activation)
        self.decoder = make_decoder(num_pixels, args.latent, args.hidden, activation)
        params = list(self.encoder.parameters()) + list(self.decoder.parameters())
        # As written by hand: torch's default Adam (or its fused kernel, as ours uses).
        fused = {"fused": True} if args.reference_fused else {}
        self.optimizer = torch.optim.Adam(params, lr=args.lr, **fused)
        self.num_particles = args.num_particles
        self.estimator = args.estimator
        self.batch_size = args.batch_size
        self.order = torch.Generator().manual_seed(args.seed)  # fit's shuffling generator
        self.noise = torch.Generator().manual_seed(args.seed + 1)
        self.train_loss: list[float] = []
        self.valid_bound: list[float] = []
        self.epoch_time: list[float] = []

    def epoch(self, train: Tensor, valid: Tensor) -> None:
        """One epoch of training, then the validation bound; records both and the time."""
        began = time.perf_counter()
        num_data = train.shape[0]
        total = 0.0
        for idx in torch.randperm(num_data, generator=self.order).split(self.batch_size):
            x = train[idx]
            log_w = log_weights(
                self.encoder, self.decoder, x, self.num_particles, self.estimator, self.noise
            )
            loss = -(num_data / len(idx)) * iwae_bound(log_w).sum()
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()
            total += loss.item() * len(idx) / num_data
        with torch.no_grad():
            bound = sum(
                iwae_bound(
                    log_weights(
                        self.encoder, self.decoder, x, self.num_particles, "iwae", self.noise
                    )
                ).sum()
                for x in valid.split(VALID_BATCH_SIZE)
            )
        self.train_loss.append(total / num_data)
        self.valid_bound.append(float(bound) / valid.shape[0])
        self.epoch_time.append(time.perf_counter() - began)

    @torch.no_grad()
    def log_likelihood(self, data: Tensor, num_samples: int, chunk: int = 500) -> Tensor:
        """Importance-sampling estimate of log p(x) per image, ``[N]``, K drawn ``chunk`` at a time."""
        results = []
        for x in data.split(self.batch_size):
            total, drawn = None, 0
            while drawn < num_samples:
                k = min(chunk, num_samples - drawn)
                part = torch.logsumexp(
                    log_weights(self.encoder, self.decoder, x, k, "iwae", self.noise), 0
                )
                total = part if total is None else torch.logaddexp(total, part)
                drawn += k
            results.append(total - math.log(num_samples))
        return torch.cat(results)

    def evaluate(self, args: argparse.Namespace, data: Dataset) -> dict[str, float]:
        """The numbers of ``models._vae_evaluation.evaluate``, under the same names."""
        K = args.num_particles
        results = {
            f"train bound (IWAE-{K})": self.log_likelihood(data.train, K).mean().item(),
            f"valid bound (IWAE-{K})": self.log_likelihood(data.valid, K).mean().item(),
            f"test bound (IWAE-{K})": self.log_likelihood(data.test, K).mean().item(),
        }
        if K > 1:
            results["test ELBO"] = self.log_likelihood(data.test, 1).mean().item()
        results[f"test log p(x) (IWAE-{args.eval_samples})"] = (
            self.log_likelihood(data.test, args.eval_samples).mean().item()
        )
        return results

    @torch.no_grad()
    def active_units(self, data: Tensor, threshold: float = 0.01) -> int:
        """Latent dimensions whose posterior mean varies over ``data`` by more than ``threshold``."""
        loc, _ = self.encoder(data)
        return int((loc.var(0, unbiased=False) > threshold).sum())


# ------------------------------------------------------------------------------ checks
def check_same_gradients(args: argparse.Namespace, x: Tensor) -> tuple[float, float]:
    """How far the reference's loss and gradients are from ``Trace_IWELBO``'s on ``x``.

    Both start from the same weights and see the same standard normal draws, so the
    loss and every parameter's gradient (the chosen estimator's) must agree to float32
    rounding. Runs on networks of its own, in a parameter store and random state of its
    own, so that the run that follows is exactly the CLI's.

    Returns:
        The relative gap of the losses and the largest relative gap of a gradient.
    """
    with torch.random.fork_rng(), pyro.get_param_store().scope():
        model, guide, loss = build(args, x)
        reference = Reference(args, x.shape[1])
        copy_weights(reference, model, guide)
        loss.loss(model, guide, x, None)  # the first call runs model and guide once more
        torch.manual_seed(args.seed)
        ours = loss.differentiable_loss(model, guide, x, None)  # full batch: no N/B scaling
        ours.backward()
        generator = torch.Generator().manual_seed(args.seed)
        log_w = log_weights(
            reference.encoder, reference.decoder, x, args.num_particles, args.estimator, generator
        )
        theirs = -iwae_bound(log_w).sum()
        theirs.backward()
        loss_gap = (abs(ours - theirs) / abs(theirs)).item()
        pairs = zip(
            [*guide.encoder.parameters(), *model.decoder.parameters()],
            [*reference.encoder.parameters(), *reference.decoder.parameters()],
            strict=True,
        )
        grad_gap = max(((a.grad - b.grad).norm() / b.grad.norm()).item() for a, b in pairs)
    # float32 sums over 100 images and 784 pixels: relative rounding of 1e-5 to 1e-4
    if not (loss_gap < 1e-5 and grad_gap < 1e-3):
        raise AssertionError(
            f"the reference and Trace_IWELBO disagree: relative gap {loss_gap:.1e} in the loss, "
            f"up to {grad_gap:.1e} in a gradient"
        )
    return loss_gap, grad_gap


def copy_weights(reference: Reference, model, guide) -> None:
    """Start the reference from our initial weights (the layouts are the same)."""
    reference.encoder.load_state_dict(guide.encoder.state_dict())
    reference.decoder.load_state_dict(model.decoder.state_dict())


# -------------------------------------------------------------------------------- main
def parse(argv: list[str]) -> argparse.Namespace:
    """``models.vae``'s options with this script's defaults, and two of its own.

    ``--reference-fused`` gives the reference torch's fused Adam kernel, which ours uses
    (like for like); ``--skip-eval`` stops after training (for timings only).
    """
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--reference-fused", action="store_true")
    parser.add_argument("--skip-eval", action="store_true")
    own, rest = parser.parse_known_args(argv)
    args = parse_args(DEFAULTS + rest)
    args.reference_fused = own.reference_fused
    args.skip_eval = own.skip_eval
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse(sys.argv[1:] if argv is None else argv)
    if args.likelihood != "bernoulli":
        raise SystemExit("the reference is written for the Bernoulli likelihood only")
    out = Path(args.out or Path("runs") / f"reference-K{args.num_particles}-{args.estimator}")
    out.mkdir(parents=True, exist_ok=True)
    checkpoint = out / "ours.pt"
    checkpoint.unlink(missing_ok=True)
    print(
        f"torch {torch.__version__}, pyro {pyro.__version__}, {torch.get_num_threads()} "
        f"threads, load average {os.getloadavg()[0]:.2f}"
    )
    data = load_dataset(args.dataset, root=args.root)
    if data.dynamic_binarization:
        raise SystemExit("the reference is written for statically binarized data sets")
    print(data.description)
    loss_gap, grad_gap = check_same_gradients(args, data.train[:100])
    print(
        f"check: same weights and draws, same loss (relative gap {loss_gap:.1e}) and "
        f"{args.estimator} gradients (largest relative gap {grad_gap:.1e})"
    )

    pyro.set_rng_seed(args.seed)  # what the CLI does, in the same order
    pyro.clear_param_store()
    model, guide, loss = build(args, data.train)
    with torch.random.fork_rng():  # the reference's init draws are overwritten anyway
        reference = Reference(args, data.train.shape[1])
    copy_weights(reference, model, guide)

    ratios = []
    for epoch in range(args.epochs):
        ours_first = epoch % 2 == 0
        for turn in (0, 1):
            if (turn == 0) == ours_first:
                history = train(args, model, guide, loss, data, checkpoint, epochs=epoch + 1)
            else:
                reference.epoch(data.train, data.valid)
        ratios.append(history.epoch_time[-1] / reference.epoch_time[-1])
        print(
            f"epoch {epoch:3d}: ours {history.epoch_time[-1]:6.2f} s, valid {history.valid_bound[-1]:9.3f}"
            f" | reference {reference.epoch_time[-1]:6.2f} s, valid "
            f"{reference.valid_bound[-1]:9.3f} | ratio {ratios[-1]:.3f}",
            flush=True,
        )

    ours, theirs = {}, {}
    if not args.skip_eval:
        began = time.perf_counter()
        ours = evaluate(args, model, guide, data)
        ours["active units"] = active_units(guide, data.test).count
        middle = time.perf_counter()
        theirs = reference.evaluate(args, data)
        theirs["active units"] = reference.active_units(data.test)
        print(
            f"evaluation: ours {middle - began:.0f} s, reference "
            f"{time.perf_counter() - middle:.0f} s"
        )
    summary = {
        "options": vars(args),
        "ours": ours,
        "reference": theirs,
        "ours epoch time": history.epoch_time,
        "reference epoch time": reference.epoch_time,
        "ratios": ratios,
        "median ratio": statistics.median(ratios),
        "load average": os.getloadavg()[0],
    }
    print_table(args, summary)
    (out / "results.json").write_text(json.dumps(summary, indent=1, default=str))
    return summary


def print_table(args: argparse.Namespace, summary: dict) -> None:
    ours, theirs = summary["ours"], summary["reference"]
    print()
    print(
        f"| K={args.num_particles}, {args.estimator}, {args.epochs} epochs | ours | reference | ours - reference |"
    )
    print("|---|---|---|---|")
    for name in ours:
        a, b = ours[name], theirs[name]
        if isinstance(a, int):
            print(f"| {name} | {a} | {b} | {a - b:+d} |")
        else:
            print(f"| {name} | {a:.3f} | {b:.3f} | {a - b:+.3f} |")
    ours_time = statistics.median(summary["ours epoch time"])
    their_time = statistics.median(summary["reference epoch time"])
    print(
        f"| time per epoch (median) | {ours_time:.2f} s | {their_time:.2f} s | "
        f"ratio {summary['median ratio']:.3f} (median of per-epoch ratios) |"
    )
    verdict = "met" if summary["median ratio"] <= TARGET_RATIO else "MISSED"
    print(f"\ntime target ratio <= {TARGET_RATIO}: {verdict}")


if __name__ == "__main__":
    main()
