"""The acceptance zoo: models that Pyro's examples and tutorials use, written as a user
writes them, each beside the hand-written guide its example trains.

Re-written for this project (not copied) after Pyro's ``examples/vae/vae.py``, the ProdLDA
tutorial, ``examples/lda.py``, ``examples/scanvi.py``, ``examples/cvae``,
``examples/svi_lightning.py`` and the usual hierarchical (random effects) model. Each
:class:`Case` holds a model, its data, the hand-written guide and a factory for ours;
``tests/test_zoo.py`` checks them and ``benchmarks/zoo.py`` prints the docs' table.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoNormal
from sklearn.datasets import load_digits
from torch import nn
from torch.nn import functional as F

from pyro_amortized import AutoAmortizedNormal


@dataclass
class Case:
    """One zoo model: how to build it, train it and score it."""

    name: str
    build: Callable[[], tuple]  # () -> (model, args, hand-written guide, our guide)
    steps: int = 300
    lr: float = 1e-2
    elbo: Callable = Trace_ELBO  # the objective both guides train with
    eval_particles: int = 20
    notes: str = ""
    extra: dict = field(default_factory=dict)


def train(model, guide, args, case: Case, seed: int = 0) -> tuple[list[float], float]:
    """``case.steps`` SVI steps with Adam; the losses and the wall time."""
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": case.lr}), case.elbo())
    began = time.perf_counter()
    losses = [svi.step(*args) for _ in range(case.steps)]
    return losses, time.perf_counter() - began


def bound(model, guide, args, case: Case, seed: int = 1) -> float:
    """The ELBO per datapoint, averaged over ``case.eval_particles`` draws."""
    pyro.set_rng_seed(seed)
    elbo = case.elbo(num_particles=case.eval_particles)
    with torch.no_grad():
        return -elbo.loss(model, guide, *args) / _rows(args)


def _rows(args) -> int:
    return len(args[0])


# ----------------------------------------------------------------------- the VAE
def _digits(n: int = 400) -> torch.Tensor:
    images = torch.as_tensor(load_digits().images[:n], dtype=torch.float32) / 16.0
    return (images.reshape(n, -1) > 0.5).float()


class _Decoder(nn.Module):
    def __init__(self, z_dim: int, hidden: int, x_dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(z_dim, hidden), nn.Softplus(), nn.Linear(hidden, x_dim))

    def forward(self, z):
        return torch.sigmoid(self.net(z))


class _Encoder(nn.Module):
    def __init__(self, x_dim: int, hidden: int, z_dim: int):
        super().__init__()
        self.hidden = nn.Sequential(nn.Linear(x_dim, hidden), nn.Softplus())
        self.loc, self.scale = nn.Linear(hidden, z_dim), nn.Linear(hidden, z_dim)

    def forward(self, x):
        h = self.hidden(x)
        return self.loc(h), torch.exp(self.scale(h))


def vae() -> tuple:
    """Pyro's examples/vae/vae.py, on the digits: Bernoulli pixels, a 2-layer decoder."""
    x = _digits()
    z_dim, hidden = 8, 64
    decoder, encoder = _Decoder(z_dim, hidden, x.shape[1]), _Encoder(x.shape[1], hidden, z_dim)

    def model(x):
        pyro.module("decoder", decoder)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(z_dim), 1.0).to_event(1))
            pyro.sample("x", dist.Bernoulli(decoder(z), validate_args=False).to_event(1), obs=x)

    def guide(x):
        pyro.module("encoder", encoder)
        with pyro.plate("data", x.shape[0]):
            loc, scale = encoder(x)
            pyro.sample("z", dist.Normal(loc, scale).to_event(1))

    return model, (x,), guide, lambda: AutoAmortizedNormal(model, hidden_dims=(hidden,))


# --------------------------------------------------------------------- hierarchy
def hierarchical() -> tuple:
    """Random effects with global and local latents: mu, tau global; theta_i per group."""
    g = torch.Generator().manual_seed(0)
    N, n = 60, 5
    theta = 1.0 + 2.0 * torch.randn(N, generator=g)
    y = theta.unsqueeze(-1) + torch.randn(N, n, generator=g)

    def model(y):
        mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
        tau = pyro.sample("tau", dist.HalfCauchy(2.0))
        with pyro.plate("groups", y.shape[0]):
            theta = pyro.sample("theta", dist.Normal(mu, tau))
            pyro.sample("y", dist.Normal(theta.unsqueeze(-1), 1.0).to_event(1), obs=y)

    return (
        model,
        (y,),
        AutoNormal(model),
        lambda: AutoAmortizedNormal(model, local_plate="groups", hidden_dims=(32,)),
    )


# ----------------------------------------------------------------------- ProdLDA
def _documents(num_docs=200, vocab=30, topics=3, words=20, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    beta = torch.distributions.Dirichlet(torch.full((topics, vocab), 0.2)).sample()
    theta = torch.distributions.Dirichlet(torch.full((topics,), 0.5)).sample((num_docs,))
    probs = theta @ beta
    return torch.stack(
        [
            torch.multinomial(p, words, replacement=True, generator=g).bincount(minlength=vocab)
            for p in probs
        ]
    ).float()


def prodlda() -> tuple:
    """The ProdLDA tutorial: logistic-Normal topic proportions, a BatchNorm decoder."""
    docs = _documents()
    topics, vocab, hidden = 3, docs.shape[1], 32

    class Decoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.beta = nn.Linear(topics, vocab, bias=False)
            self.bn = nn.BatchNorm1d(vocab, affine=False)

        def forward(self, theta):
            return F.softmax(self.bn(self.beta(theta)), dim=1)

    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Sequential(nn.Linear(vocab, hidden), nn.Softplus())
            self.loc = nn.Linear(hidden, topics)
            self.log_scale = nn.Linear(hidden, topics)

        def forward(self, x):
            h = self.fc(x)
            return self.loc(h), (0.5 * self.log_scale(h)).exp()

    decoder, encoder = Decoder(), Encoder()

    def model(docs):
        pyro.module("decoder", decoder)
        with pyro.plate("documents", docs.shape[0]):
            logtheta = pyro.sample("logtheta", dist.Normal(docs.new_zeros(topics), 1.0).to_event(1))
            theta = F.softmax(logtheta, -1)
            counts = decoder(theta)
            total = int(docs.sum(-1).max())
            pyro.sample("obs", dist.Multinomial(total, counts), obs=docs)

    def guide(docs):
        pyro.module("encoder", encoder)
        with pyro.plate("documents", docs.shape[0]):
            loc, scale = encoder(docs)
            pyro.sample("logtheta", dist.Normal(loc, scale).to_event(1))

    return (
        model,
        (docs,),
        guide,
        lambda: AutoAmortizedNormal(model, local_plate="documents", hidden_dims=(hidden,)),
    )


def log_evidence_scale(value: float) -> float:
    """Nats as the docs' table prints them."""
    return round(value, 2) if math.isfinite(value) else value


CASES = {
    "vae": Case("VAE (examples/vae)", vae, steps=300),
    "hierarchical": Case("hierarchical, global + local", hierarchical, steps=400, lr=2e-2),
    "prodlda": Case("ProdLDA with BatchNorm", prodlda, steps=300),
}
