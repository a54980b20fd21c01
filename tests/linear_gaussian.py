"""A linear-Gaussian latent variable model whose posterior and evidence are known exactly."""

import math

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule
from torch import nn

from pyro_amortized import AutoAmortizedNormal


class LinearGaussian(PyroModule):
    r"""z ~ N(0, I_D), x | z ~ N(A z + b, sigma^2 I_P), with A^T A diagonal.

    The posterior p(z | x) is then a diagonal Normal whose mean is linear in x, so an
    affine encoder represents it exactly. ``b`` is a model parameter.
    """

    def __init__(self, latent_dim=2, obs_dim=3, sigma=0.7, subsample_size=None, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        q, _ = torch.linalg.qr(torch.randn(obs_dim, latent_dim, generator=g, dtype=torch.float64))
        d = torch.linspace(1.5, 0.5, latent_dim, dtype=torch.float64)
        dtype = torch.get_default_dtype()
        self.A = (q * d).to(dtype)
        self.b = nn.Parameter(torch.randn(obs_dim, generator=g, dtype=torch.float64).to(dtype))
        self.sigma = sigma
        self.subsample_size = subsample_size
        self.seen_indices = []

    def forward(self, x, idx=None):
        N, D = x.shape[0], self.A.shape[1]
        with pyro.plate("data", N, subsample_size=self.subsample_size, subsample=idx) as ind:
            self.seen_indices.append(ind)
            z = pyro.sample("z", dist.Normal(x.new_zeros(D), 1.0).to_event(1))
            mean = z @ self.A.T + self.b
            pyro.sample("x", dist.Normal(mean, self.sigma).to_event(1), obs=x.index_select(0, ind))

    def sample(self, n):
        with torch.no_grad():
            z = torch.randn(n, self.A.shape[1])
            return z @ self.A.T + self.b + self.sigma * torch.randn(n, self.A.shape[0])

    def posterior(self):
        """(W, c, var): p(z | x) = N(W x + c, diag(var))."""
        with torch.no_grad():
            var = 1.0 / (1.0 + (self.A**2).sum(0) / self.sigma**2)
            W = var[:, None] * self.A.T / self.sigma**2
            return W, -W @ self.b, var

    def log_evidence(self, x):
        """log p(x_i) for each row."""
        with torch.no_grad():
            cov = self.A @ self.A.T + self.sigma**2 * torch.eye(self.A.shape[0], dtype=x.dtype)
            return dist.MultivariateNormal(self.b.detach(), cov).log_prob(x)


class AffineEncoder(nn.Module):
    """loc = W x + c and a free per-dimension scale: the exact posterior family."""

    def __init__(self, W, c, var):
        super().__init__()
        self.linear = nn.Linear(W.shape[1], W.shape[0]).to(W.dtype)
        with torch.no_grad():
            self.linear.weight.copy_(W)
            self.linear.bias.copy_(c)
        self.log_scale = nn.Parameter(0.5 * torch.log(var))

    def forward(self, x):
        scale = self.log_scale.exp().expand(x.shape[0], -1)
        return self.linear(x), scale


def exact_encoder(model, perturb=0.0, seed=1):
    W, c, var = model.posterior()
    encoder = AffineEncoder(W, c, var)
    if perturb:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in encoder.parameters():
                p.add_(perturb * torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype))
    return encoder


def encoder_grad(loss, encoder):
    grads = torch.autograd.grad(loss, list(encoder.parameters()))
    return torch.cat([g.reshape(-1) for g in grads])


LOG2PI = math.log(2 * math.pi)


def correlated_problem():
    """A linear-Gaussian model with a correlated posterior, 16 datapoints, an untrained guide,
    the posterior precision Lam and the KL of the best diagonal Normal to the posterior.

    With non-orthogonal columns of A the posterior N(mu, Lam^-1) is correlated; the best
    diagonal Normal (in KL(q || p)) has mean mu and precisions diag(Lam), and its KL to
    the posterior is (sum log Lam_ii - log det Lam) / 2, the same for every datapoint.
    """
    model = LinearGaussian()
    model.A = torch.tensor([[1.0, 0.8], [0.9, 1.0], [0.3, 0.5]])  # columns far from orthogonal
    x = model.sample(16)
    guide = AutoAmortizedNormal(model, hidden_dims=(4,))  # an untrained, wrong encoder
    guide(x)
    Lam = torch.eye(2) + model.A.T @ model.A / model.sigma**2
    kl = 0.5 * (Lam.diag().log().sum() - torch.logdet(Lam))
    return model, x, guide, Lam, kl
