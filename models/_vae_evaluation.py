"""The VAE's evaluation: test bounds, refined bounds, inference gaps, the table, the figures."""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from models.datasets import Dataset, binarize
from pyro_amortized import AutoAmortizedIAF, AutoAmortizedNormal, AutoAmortizedRealNVP, History
from pyro_amortized.diagnostics import (
    ActiveUnits,
    ElboSurgery,
    InferenceGaps,
    elbo_surgery,
    inference_gaps,
    log_marginal_likelihood,
)
from pyro_amortized.plotting import plot_image_grid, plot_posterior_contours, plot_training_curves
from pyro_amortized.refinement import refine

if TYPE_CHECKING:
    from models.vae import VAE

__all__ = ["evaluate", "gaps", "print_table", "refined_bounds", "surgery", "write_figures"]


def evaluate(
    args: argparse.Namespace, model: VAE, guide: AutoAmortizedNormal, data: Dataset
) -> dict[str, float]:
    """Mean bounds per datapoint: the training bound on every split, the test ELBO and log p(x)."""
    train = data.train
    if data.dynamic_binarization:  # evaluate on one fixed binarization of the grey levels
        train = binarize(train, torch.Generator(train.device).manual_seed(args.seed))
    K = args.num_particles
    results = {
        f"train bound (IWAE-{K})": _mean_bound(model, guide, train, K),
        f"valid bound (IWAE-{K})": _mean_bound(model, guide, data.valid, K),
        f"test bound (IWAE-{K})": _mean_bound(model, guide, data.test, K),
    }
    if K > 1:
        results["test ELBO"] = _mean_bound(model, guide, data.test, 1)
    results[f"test log p(x) (IWAE-{args.eval_samples})"] = _mean_bound(
        model, guide, data.test, args.eval_samples, progress=not args.no_progress
    )
    return results


def refined_bounds(args: argparse.Namespace, model: VAE, guide, test: Tensor) -> dict[str, float]:
    """The test ELBO (one draw per image) and log p(x) after ``args.refine_steps``
    refinement steps from the encoder (:func:`~pyro_amortized.refinement.refine`), the
    refined posterior being the proposal; the encoder's own are :func:`evaluate`'s."""
    steps = args.refine_steps
    refined = refine(model, guide, test, num_steps=steps, lr=args.refine_lr)
    results = {}
    for label, num_samples in (
        ("ELBO", 1),
        (f"log p(x) (IWAE-{args.eval_samples})", args.eval_samples),
    ):
        value = log_marginal_likelihood(
            refined.model,
            refined.guide,
            test,
            num_samples=num_samples,
            batch_size=100,
            progress=num_samples > 1 and not args.no_progress,
        )
        results[f"test {label}, refined {steps} steps"] = value.mean().item()
    return results


def _mean_bound(
    model: VAE, guide: AutoAmortizedNormal, data: Tensor, num_samples: int, progress: bool = False
) -> float:
    estimates = log_marginal_likelihood(
        model, guide, data, num_samples=num_samples, batch_size=100, progress=progress
    )
    return estimates.mean().item()


def gaps(
    args: argparse.Namespace,
    model: VAE,
    guide: AutoAmortizedNormal | AutoAmortizedIAF | AutoAmortizedRealNVP,
    test: Tensor,
    out: Path,
) -> InferenceGaps:
    """The inference-gap report of ``test``: printed, and saved as gaps.json and gaps.png."""
    report = inference_gaps(
        model,
        guide,
        test,
        families=args.gap_families,
        num_samples=args.eval_samples,
        chunk_size=100,  # 100 draws x N images x 784 logits at a time
        local_options={"max_steps": args.gap_max_steps},
        progress=not args.no_progress,
    )
    print()
    print(report.table())
    print(f"({report.seconds:.0f} s)")
    report.plot(out / "gaps.png")
    with open(out / "gaps.json", "w") as file:
        json.dump(report.to_dict(), file)
    return report


#: Test sets up to this size (MNIST's 10,000 among them) get the aggregate posterior
#: exactly; larger ones minibatches of it, whose stratified estimate is biased (see
#: docs/elbo-surgery.md).
SURGERY_BATCH = 10_000


def surgery(model: VAE, guide, test: Tensor, num_samples: int = 10) -> ElboSurgery | None:
    """ELBO surgery of the test set; None for the auxiliary flow, whose q(z | x) has no
    density."""
    if guide.family == "flow" and guide.auxiliary:
        return None
    batch_size = None if len(test) <= SURGERY_BATCH else SURGERY_BATCH
    return elbo_surgery(model, guide, test, num_samples=num_samples, batch_size=batch_size)


def print_table(
    results: dict[str, float],
    units: ActiveUnits,
    latent_dim: int,
    history: History,
    args: argparse.Namespace,
    surgery: ElboSurgery | None = None,
) -> None:
    """Prints the results table of ``python -m models.vae`` (Markdown)."""
    epoch_time = statistics.median(history.epoch_time) if history.epoch_time else math.nan
    print()
    print(f"| {args.dataset}, K={args.num_particles}, {args.estimator} | nats per datapoint |")
    print("|---|---|")
    for name, value in results.items():
        print(f"| {name} | {value:.3f} |")
    print(f"| active units | {units.count} of {latent_dim} |")
    if surgery is None:
        print("| KL, mutual information, marginal KL | n/a: q(z \\| x) has no density |")
    else:  # Hoffman and Johnson's ELBO surgery: KL = I_q[n; z] + KL(q(z) || p(z))
        log_n = math.log(surgery.num_data)
        print(f"| test KL(q(z \\| x) ‖ p(z)) | {surgery.average_kl} |")
        mutual_information = f"{surgery.mutual_information} (≤ log N = {log_n:.2f})"
        print(f"| test mutual information I_q[n; z] | {mutual_information} |")
        print(f"| test marginal KL(q(z) ‖ p(z)) | {surgery.marginal_kl} |")
    print(f"| epochs | {history.epochs} (best {history.best_epoch}) |")
    print(f"| time per epoch | {epoch_time:.2f} s |")


def write_figures(
    out: Path,
    model: VAE,
    guide: AutoAmortizedNormal | AutoAmortizedIAF | AutoAmortizedRealNVP,
    test: Tensor,
    history: History,
    image_shape: tuple[int, int],
) -> None:
    """Writes the training curves, test images, reconstructions, samples and, for a 2-D
    latent, the posterior contours to ``out``."""
    shown = test[:50]
    curves = {"train bound": [-v for v in history.train_loss]}
    curves["valid bound"] = [v for v in history.valid_bound if v is not None]
    plot_training_curves(curves, out / "curves.png")
    plot_image_grid(shown, out / "data.png", image_shape=image_shape, title="test images")
    z = guide.median(shown)["z"]
    plot_image_grid(
        model.mean_image(z),
        out / "reconstructions.png",
        image_shape=image_shape,
        title="reconstructions (posterior median)",
    )
    # drawn on the CPU whatever the device, so the figure is the same everywhere
    prior = torch.randn(50, model.latent_dim, dtype=test.dtype, device="cpu").to(test.device)
    plot_image_grid(
        model.mean_image(prior), out / "samples.png", image_shape=image_shape, title="samples"
    )
    if model.latent_dim == 2:
        if isinstance(guide, AutoAmortizedRealNVP) and guide.auxiliary:
            # q(z | x) is only bounded (through r(v | x, z)), not evaluated, so no contours
            print("posterior contours skipped: the auxiliary flow has no closed-form q(z | x)")
            return
        # the VAE has one local site, z, unconstrained: the guide's posterior is z's
        posteriors = lambda x: {"z": guide.posterior(x)}  # noqa: E731
        plot_posterior_contours(model, posteriors, test, out / "posteriors.png")
