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
from pyro import poutine
from pyro.distributions import constraints
from pyro.infer import SVI, Trace_ELBO, TraceEnum_ELBO
from pyro.infer.autoguide import AutoNormal
from sklearn.datasets import load_digits
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from pyro_amortized import AutoAmortizedNormal


@dataclass
class Zoo:
    """A built zoo model: the model, its data as the batches SVI steps through in turn,
    the hand-written guide, a factory for ours, and what the bound is divided by."""

    model: Callable
    batches: list[tuple]
    hand: Callable
    ours: Callable[[], Callable]
    rows: int  # datapoints the bound is per
    minibatches: bool = False  # batches cut from one data set (else disjoint parts)
    #: networks a user puts in eval() mode to evaluate (BatchNorm's running statistics)
    networks: tuple[nn.Module, ...] = ()


@dataclass
class Case:
    """One zoo model: how to build it, train it and score it."""

    name: str
    build: Callable[[], Zoo]
    steps: int = 300
    lr: float = 1e-2
    elbo: Callable = Trace_ELBO  # the objective both guides train with
    eval_particles: int = 20
    #: Trace_IWELBO(K > 1) with this model: "vectorized"; "batchnorm" (refused while the
    #: networks normalize over the minibatch; in eval() mode looped, as they take no
    #: particle dimension); or "refused" (with the error's expected words)
    iwelbo: str = "vectorized"
    refusal: str = ""
    extra: dict = field(default_factory=dict)


def train(zoo: Zoo, guide, case: Case, seed: int = 0, elbo=None) -> tuple[list[float], float]:
    """``case.steps`` SVI steps with Adam through the batches; losses and wall time."""
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    svi = SVI(zoo.model, guide, pyro.optim.Adam({"lr": case.lr}), elbo or case.elbo())
    began = time.perf_counter()
    batches = zoo.batches
    losses = [svi.step(*batches[step % len(batches)]) for step in range(case.steps)]
    return losses, time.perf_counter() - began


def bound(zoo: Zoo, guide, case: Case, seed: int = 1) -> float:
    """The ELBO per datapoint, each batch's averaged over ``case.eval_particles`` draws."""
    pyro.set_rng_seed(seed)
    elbo = case.elbo(num_particles=case.eval_particles)
    with torch.no_grad():
        values = [-elbo.loss(zoo.model, guide, *batch) for batch in zoo.batches]
    total = sum(values) / len(values) if zoo.minibatches else sum(values)
    return total / zoo.rows


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

    return Zoo(
        model, [(x,)], guide, lambda: AutoAmortizedNormal(model, hidden_dims=(hidden,)), len(x)
    )


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

    return Zoo(
        model,
        [(y,)],
        AutoNormal(model),
        lambda: AutoAmortizedNormal(model, local_plate="groups", hidden_dims=(32,)),
        len(y),
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

    return Zoo(
        model,
        [(docs,)],
        guide,
        lambda: AutoAmortizedNormal(model, local_plate="documents", hidden_dims=(hidden,)),
        len(docs),
        networks=(decoder, encoder),
    )


# --------------------------------------------------------------------------- LDA
def lda() -> Zoo:
    """Pyro's examples/lda.py: topics global, a Dirichlet per document, and each word's
    topic a discrete site enumerated in the model (TraceEnum_ELBO sums it out)."""
    T, V, D, W = 3, 20, 60, 16
    g = torch.Generator().manual_seed(1)
    true_words = torch.distributions.Dirichlet(torch.full((T, V), 0.3)).sample()
    true_topics = torch.distributions.Dirichlet(torch.full((T,), 0.5)).sample((D,))
    z = torch.multinomial(true_topics, W, replacement=True, generator=g)  # [D, W]
    data = torch.multinomial(true_words[z.reshape(-1)], 1, generator=g).reshape(D, W).T

    def model(data):
        with pyro.plate("topics", T):
            topic_weights = pyro.sample("topic_weights", dist.Gamma(1.0 / T, 1.0))
            topic_words = pyro.sample("topic_words", dist.Dirichlet(torch.ones(V) / V))
        with pyro.plate("documents", data.shape[1]):
            doc_topics = pyro.sample("doc_topics", dist.Dirichlet(topic_weights))
            with pyro.plate("words", data.shape[0]):
                word_topics = pyro.sample(
                    "word_topics", dist.Categorical(doc_topics), infer={"enumerate": "parallel"}
                )
                pyro.sample("doc_words", dist.Categorical(topic_words[word_topics]), obs=data)

    def counts(data):
        return F.one_hot(data, V).sum(0).float()  # [documents, vocabulary]

    predictor = nn.Sequential(nn.Linear(V, 32), nn.Softplus(), nn.Linear(32, T))

    def guide(data):
        weights = pyro.param("weights_q", torch.ones(T), constraint=constraints.positive)
        words = pyro.param("words_q", torch.ones(T, V), constraint=constraints.positive)
        with pyro.plate("topics", T):
            pyro.sample("topic_weights", dist.Gamma(weights, 1.0))
            pyro.sample("topic_words", dist.Dirichlet(words))
        pyro.module("predictor", predictor)
        with pyro.plate("documents", data.shape[1]):
            concentration = F.softplus(predictor(counts(data))) + 1e-3
            pyro.sample("doc_topics", dist.Dirichlet(concentration))

    return Zoo(
        model,
        [(data,)],
        guide,
        lambda: AutoAmortizedNormal(
            model, local_plate="documents", context=counts, hidden_dims=(32,)
        ),
        D,
    )


# ------------------------------------------------------------------------ scANVI
def scanvi() -> Zoo:
    """Pyro's examples/scanvi (smaller): cell types y observed for labeled cells and
    enumerated for unlabeled ones, a zero-inflated negative binomial, and the whole plate
    under poutine.scale(1 / (N G)) in model and guide."""
    N, G, C, Z = 120, 12, 2, 2
    g = torch.Generator().manual_seed(2)
    types = torch.arange(N) % C
    rates = torch.tensor([[6.0] * 6 + [1.0] * 6, [1.0] * 6 + [6.0] * 6])[types]
    x = torch.distributions.Poisson(rates).sample() * (torch.rand(N, G, generator=g) > 0.1)
    labeled = torch.arange(N) < N // 2
    y = F.one_hot(types, C).float()
    scale = 1.0 / (N * G)

    z2_decoder = nn.Sequential(nn.Linear(Z + C, 16), nn.Softplus(), nn.Linear(16, 2 * Z))
    x_decoder = nn.Sequential(nn.Linear(Z, 16), nn.Softplus(), nn.Linear(16, 2 * G))

    def model(x, y=None):
        pyro.module("z2_decoder", z2_decoder)
        pyro.module("x_decoder", x_decoder)
        theta = pyro.param(
            "inverse_dispersion", 10.0 * x.new_ones(G), constraint=constraints.positive
        )
        with pyro.plate("cells", len(x)), poutine.scale(scale=scale):
            z1 = pyro.sample("z1", dist.Normal(0.0, x.new_ones(Z)).to_event(1))
            y = pyro.sample(
                "y",
                dist.OneHotCategorical(logits=x.new_zeros(C)),
                obs=y,
                infer={"enumerate": "parallel"},
            )
            z2_loc, z2_log_scale = z2_decoder(torch.cat(_broadcast_last(z1, y), -1)).chunk(2, -1)
            z2 = pyro.sample("z2", dist.Normal(z2_loc, z2_log_scale.exp()).to_event(1))
            library = pyro.sample("l", dist.LogNormal(math.log(20.0), x.new_ones(1)).to_event(1))
            gate_logits, mu = x_decoder(z2).chunk(2, -1)
            nb_logits = (library * F.softmax(mu, -1) + 5e-3).log() - (theta + 5e-3).log()
            x_dist = dist.ZeroInflatedNegativeBinomial(
                gate_logits=gate_logits, total_count=theta, logits=nb_logits
            )
            pyro.sample("x", x_dist.to_event(1), obs=x)

    encoder = nn.Sequential(nn.Linear(G, 32), nn.Softplus(), nn.Linear(32, 4 * Z + 2))

    def guide(x, y=None):
        pyro.module("encoder", encoder)
        with pyro.plate("cells", len(x)), poutine.scale(scale=scale):
            out = encoder(torch.log1p(x))
            z1_loc, z1_log_scale, z2_loc, z2_log_scale = out[..., : 4 * Z].chunk(4, -1)
            l_loc, l_log_scale = out[..., 4 * Z :].chunk(2, -1)
            pyro.sample("l", dist.LogNormal(l_loc, l_log_scale.exp()).to_event(1))
            pyro.sample("z2", dist.Normal(z2_loc, z2_log_scale.exp()).to_event(1))
            pyro.sample("z1", dist.Normal(z1_loc, z1_log_scale.exp()).to_event(1))

    return Zoo(
        model,
        [(x[labeled], y[labeled]), (x[~labeled],)],
        guide,
        lambda: AutoAmortizedNormal(model, local_plate="cells", hidden_dims=(32,)),
        1,  # the bound is already per cell and gene
    )


def _broadcast_last(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``a`` and ``b`` broadcast in every dim but the last (an enumerated y adds one)."""
    shape = torch.broadcast_shapes(a.shape[:-1], b.shape[:-1])
    return a.expand(shape + a.shape[-1:]), b.expand(shape + b.shape[-1:])


# -------------------------------------------------------------------------- CVAE
def cvae() -> Zoo:
    """Pyro's examples/cvae: the bottom half of a digit given its top half, with
    ``pyro.plate("data")`` of no size; the guide's context is (top, bottom)."""
    images = _digits(300)
    xs, ys = images[:, :32], images[:, 32:]
    Z = 4
    prior_net = nn.Sequential(nn.Linear(32, 32), nn.Softplus(), nn.Linear(32, 2 * Z))
    generation_net = nn.Sequential(nn.Linear(Z + 32, 32), nn.Softplus(), nn.Linear(32, 32))
    recognition_net = nn.Sequential(nn.Linear(64, 32), nn.Softplus(), nn.Linear(32, 2 * Z))

    def model(xs, ys=None):
        pyro.module("prior_net", prior_net)
        pyro.module("generation_net", generation_net)
        with pyro.plate("data"):
            prior_loc, prior_log_scale = prior_net(xs).chunk(2, -1)
            zs = pyro.sample("z", dist.Normal(prior_loc, prior_log_scale.exp()).to_event(1))
            logits = generation_net(torch.cat(_broadcast_last(zs, xs), -1))
            pyro.sample("y", dist.Bernoulli(logits=logits).to_event(1), obs=ys)

    def guide(xs, ys=None):
        pyro.module("recognition_net", recognition_net)
        with pyro.plate("data"):
            loc, log_scale = recognition_net(torch.cat([xs, ys], -1)).chunk(2, -1)
            pyro.sample("z", dist.Normal(loc, log_scale.exp()).to_event(1))

    return Zoo(
        model,
        [(xs, ys)],
        guide,
        lambda: AutoAmortizedNormal(
            model, context=lambda xs, ys=None: torch.cat([xs, ys], -1), hidden_dims=(32,)
        ),
        len(xs),
    )


# --------------------------------------------------------------------- Lightning
def lightning() -> Zoo:
    """Pyro's examples/svi_lightning.py pattern on the VAE: a DataLoader cuts the
    minibatches, and the model's plate is ``pyro.plate("data", N, len(batch))``."""
    x = _digits()
    N, z_dim, hidden = len(x), 8, 64
    decoder, encoder = _Decoder(z_dim, hidden, x.shape[1]), _Encoder(x.shape[1], hidden, z_dim)

    def model(batch):
        pyro.module("decoder", decoder)
        with pyro.plate("data", N, len(batch)):
            z = pyro.sample("z", dist.Normal(batch.new_zeros(z_dim), 1.0).to_event(1))
            pyro.sample("x", dist.Bernoulli(decoder(z), validate_args=False).to_event(1), obs=batch)

    def guide(batch):
        pyro.module("encoder", encoder)
        with pyro.plate("data", N, len(batch)):
            loc, scale = encoder(batch)
            pyro.sample("z", dist.Normal(loc, scale).to_event(1))

    loader = DataLoader(
        TensorDataset(x), batch_size=50, shuffle=True, generator=torch.Generator().manual_seed(0)
    )
    batches = [tuple(b) for b in loader]
    return Zoo(
        model,
        batches,
        guide,
        lambda: AutoAmortizedNormal(model, hidden_dims=(hidden,)),
        N,
        minibatches=True,
    )


CASES = {
    "vae": Case("VAE (examples/vae)", vae, steps=300),
    "hierarchical": Case("hierarchical, global + local", hierarchical, steps=400, lr=2e-2),
    "prodlda": Case("ProdLDA with BatchNorm", prodlda, steps=300, iwelbo="batchnorm"),
    "lda": Case(
        "LDA, enumerated word topics",
        lda,
        steps=300,
        lr=2e-2,
        elbo=lambda **kw: TraceEnum_ELBO(max_plate_nesting=2, **kw),
        iwelbo="refused",
        refusal="TraceEnum_ELBO",
    ),
    "scanvi": Case(
        "scANVI, labeled + unlabeled cells",
        scanvi,
        steps=400,
        elbo=lambda **kw: TraceEnum_ELBO(max_plate_nesting=1, **kw),
    ),
    "cvae": Case("CVAE, plate without size", cvae, steps=300),
    "lightning": Case("VAE, Lightning-style minibatches", lightning, steps=300),
}
