r"""ELBO surgery's estimators against numerically exact values, and their cost.

A linear-Gaussian model (2-D latent, 3-D observations, N datapoints) with a guide near
its exact posterior: the average KL and the reconstruction term have closed forms, and
the marginal KL of the N-component aggregate posterior is integrated on a 701 x 701 grid
(its mass is 1 to 1e-7), so every term of ``elbo_surgery`` has a reference. The script
prints each estimate's error in standard errors for the exact aggregate
(``batch_size=None``) and for minibatch-stratified ones, whose log is biased low by the
estimate's relative variance, and the wall time of each.

Run from the repository root, alone on the machine::

    python benchmarks/elbo_surgery.py
"""

from __future__ import annotations

import argparse
import math
import time

import pyro
import pyro.distributions as dist
import torch

from pyro_amortized import AutoAmortizedNormal
from pyro_amortized.diagnostics import elbo_surgery

TERMS = ("average_kl", "reconstruction", "mutual_information", "marginal_kl")


class PerturbedPosterior(torch.nn.Module):
    """The exact posterior's affine encoder, its weights moved by ``perturb``."""

    def __init__(self, A: torch.Tensor, b: torch.Tensor, sigma: float, perturb: float):
        super().__init__()
        var = 1.0 / (1.0 + (A**2).sum(0) / sigma**2)
        W = var[:, None] * A.T / sigma**2
        g = torch.Generator().manual_seed(1)
        self.W = W + perturb * torch.randn(W.shape, generator=g)
        self.c = -W @ b + perturb * torch.randn(W.shape[0], generator=g)
        self.scale = var.sqrt() * (1 + perturb)

    def forward(self, x):
        return x @ self.W.T + self.c, self.scale.expand(x.shape[0], -1)


def references(x, loc, scale, A, b, sigma) -> dict[str, float]:
    """Closed-form average KL and reconstruction; the marginal KL by quadrature."""
    var = scale**2
    average_kl = (0.5 * (var + loc**2 - 1 - var.log()).sum(-1)).mean().item()
    reconstruction = (
        dist.Normal(loc @ A.T + b, sigma).log_prob(x).sum(-1)
        - (var @ (A**2).T).sum(-1) / 2 / sigma**2
    ).mean()
    t = torch.linspace(-7, 7, 701)
    grid = torch.stack(torch.meshgrid(t, t, indexing="ij"), -1).reshape(-1, 2)
    log_q = torch.logsumexp(
        dist.Normal(loc, scale).log_prob(grid[:, None, :]).sum(-1), 1
    ) - math.log(len(x))
    log_p = dist.Normal(0.0, 1.0).log_prob(grid).sum(-1)
    weight = log_q.exp() * (t[1] - t[0]) ** 2
    marginal_kl = (weight * (log_q - log_p)).sum().item()
    return {
        "average_kl": average_kl,
        "reconstruction": reconstruction.item(),
        "mutual_information": average_kl - marginal_kl,
        "marginal_kl": marginal_kl,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-data", type=int, default=500)
    parser.add_argument("--num-samples", type=int, default=50)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[25, 50, 100, 250])
    args = parser.parse_args(argv)
    torch.set_default_dtype(torch.float64)
    pyro.set_rng_seed(0)
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(3, 2, generator=g))
    A, b, sigma = q * torch.tensor([1.5, 0.5]), torch.randn(3, generator=g), 0.7
    z = torch.randn(args.num_data, 2, generator=g)
    x = z @ A.T + b + sigma * torch.randn(args.num_data, 3, generator=g)

    def model(x, idx=None):
        with pyro.plate("data", x.shape[0], subsample=idx) as ind:
            z = pyro.sample("z", dist.Normal(x.new_zeros(2), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z @ A.T + b, sigma).to_event(1), obs=x[ind])

    encoder = PerturbedPosterior(A, b, sigma, perturb=0.3)
    guide = AutoAmortizedNormal(model, encoder=encoder)
    guide(x)
    loc, scale = encoder(x)
    exact = references(x, loc, scale, A, b, sigma)
    print(f"N = {args.num_data}, S = {args.num_samples} draws per datapoint, float64")
    print()
    header = " | ".join(f"{name} (err / SE)" for name in TERMS)
    print(f"| minibatch M | {header} | seconds |")
    print("|---" * (len(TERMS) + 2) + "|")
    print("| reference | " + " | ".join(f"{exact[name]:.4f}" for name in TERMS) + " | |")
    for batch_size in [None, *args.batch_sizes]:
        start = time.perf_counter()
        report = elbo_surgery(model, guide, x, num_samples=args.num_samples, batch_size=batch_size)
        seconds = time.perf_counter() - start
        cells = []
        for name in TERMS:
            estimate = getattr(report, name)
            error = estimate.value - exact[name]
            cells.append(f"{estimate.value:.4f} ({error / estimate.se:+.1f})")
        label = f"{args.num_data} (exact q(z))" if batch_size is None else str(batch_size)
        print(f"| {label} | " + " | ".join(cells) + f" | {seconds:.1f} |")


if __name__ == "__main__":
    main()
