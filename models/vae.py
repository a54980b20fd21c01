"""A variational autoencoder on scikit-learn's handwritten digits, trained with an IWAE bound.

The model is an ordinary Pyro model; the guide and the objective come from pyro_amortized::

    python -m models.vae --epochs 20 --num-particles 5 --estimator dreg
"""

from __future__ import annotations

import argparse
import math

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import SVI
from pyro.nn import PyroModule
from sklearn.datasets import load_digits
from torch import nn

from pyro_amortized import AutoAmortizedNormal, Trace_IWELBO


class VAE(PyroModule):
    """z ~ N(0, I), x | z ~ Bernoulli(decoder(z)), one z per image in plate "data"."""

    def __init__(self, num_pixels: int, latent_dim: int = 8, hidden_dim: int = 64):
        super().__init__()
        self.latent_dim = latent_dim
        self.decoder = nn.Sequential(
            nn.Linear(latent_dim, hidden_dim),
            nn.Tanh(),
            nn.Linear(hidden_dim, hidden_dim),
            nn.Tanh(),
            nn.Linear(hidden_dim, num_pixels),
        )

    def forward(self, x: torch.Tensor, idx: torch.Tensor | None = None) -> None:
        with pyro.plate("data", x.shape[0], subsample=idx) as ind:
            z = pyro.sample("z", dist.Normal(x.new_zeros(self.latent_dim), 1.0).to_event(1))
            logits = self.decoder(z)
            pyro.sample("x", dist.Bernoulli(logits=logits).to_event(1), obs=x[ind])


def load_binarized_digits(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 8x8 digits (bundled with the package), binarized at half intensity."""
    images = torch.as_tensor(load_digits().data, dtype=torch.float32) / 16.0
    images = (images > 0.5).float()
    perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    images = images[perm]
    return images[:1500], images[1500:]


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--num-particles", type=int, default=5)
    parser.add_argument("--estimator", default="dreg", choices=["iwae", "stl", "dreg"])
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    pyro.set_rng_seed(args.seed)
    pyro.clear_param_store()
    train, test = load_binarized_digits(args.seed)
    model = VAE(train.shape[1])
    guide = AutoAmortizedNormal(model, hidden_dims=(64, 64))
    elbo = Trace_IWELBO(args.num_particles, estimator=args.estimator)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": args.lr}), elbo)

    num_batches = math.ceil(len(train) / args.batch_size)
    for epoch in range(args.epochs):
        perm = torch.randperm(len(train))
        total = sum(
            svi.step(train, perm[b * args.batch_size : (b + 1) * args.batch_size])
            for b in range(num_batches)
        )
        if epoch % 5 == 4 or epoch == args.epochs - 1:
            # each step's loss estimates the whole training set's bound
            per_image = -total / num_batches / len(train)
            print(f"epoch {epoch + 1:3d}  train bound per image {per_image:8.3f} nats")

    test_elbo = Trace_IWELBO(100)
    with torch.no_grad():
        test_bound = -test_elbo.loss(model, guide, test) / len(test)
    print(f"test IWAE-100 bound per image: {test_bound:.3f} nats ({len(test)} images)")
    return test_bound


if __name__ == "__main__":
    main()
