"""A fitted factor model read out: rotations, factor scores, posterior predictive, imputation."""

from __future__ import annotations

import math
from collections.abc import Sequence

import pyro.distributions as dist
import torch
from torch import Tensor
from torch.nn import functional as F

from models.personality import FactorModel, coded_answers
from models.questionnaires import check_answers
from pyro_amortized import AutoAmortizedNormal
from pyro_amortized.refinement import refine

__all__ = [
    "align_to_traits",
    "category_probs",
    "congruence",
    "discretized_normal",
    "factor_correlation",
    "factor_scores",
    "importance_factor_scores",
    "importance_samples",
    "impute",
    "items_on_trait",
    "oblimin",
    "oblimin_to_traits",
    "posterior_predictive",
    "refined_factor_scores",
    "rotate_scores",
    "standardized_loadings",
    "varimax",
]


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


def oblimin_to_traits(
    model: FactorModel, traits: Sequence[int] | None = None
) -> tuple[Tensor, Tensor]:
    """The model's :func:`standardized_loadings` after :func:`oblimin`, and the rotation.

    With ``traits`` (one per item, as many traits as factors), the factors are also
    ordered and signed by :func:`align_to_traits`, so factor t is trait t's.

    Arguments:
        model: The fitted model.
        traits: Each item's trait, an index in ``0..Q-1`` (``D`` of them), e.g. a
            :class:`~models.questionnaires.Questionnaire`'s ``traits``; ``None`` leaves
            the factors in :func:`oblimin`'s order and signs.

    Returns:
        ``(rotated, rotation)``, ``[D, Q]`` and ``[Q, Q]``, with ``rotated =
        standardized_loadings(model) @ rotation``; :func:`factor_scores` ``(guide,
        answers, rotation)`` scores people in that basis.
    """
    rotated, rotation = oblimin(standardized_loadings(model))
    if traits is not None:
        rotated, order, signs = align_to_traits(rotated, traits, model.num_factors)
        rotation = rotation[:, order] * signs
    return rotated, rotation


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

    Arguments:
        guide: The fitted guide; its ``model`` is the :class:`FactorModel`, whose
            ``categories`` the answers are checked against.
        answers: ``[N, D]``, NaN where missing (checked as below).
        rotation: ``[Q, Q]``, e.g. :func:`oblimin_to_traits`'s, or ``None``.

    Returns:
        ``(mean, sd)``, ``[N, Q]`` each.

    Raises:
        ValueError: An answer is not a whole number on the model's scale 1..C
            (:func:`~models.questionnaires.check_answers`, naming the row and item; an
            item none of these people answered is fine).
    """
    check_answers(answers, guide.model.categories, empty_items=True)
    with torch.no_grad():
        posterior = guide.site_posteriors(answers)["z"]
    return _in_basis(posterior.mean, posterior.stddev, rotation)


def refined_factor_scores(
    model: FactorModel,
    guide: AutoAmortizedNormal,
    answers: Tensor,
    rotation: Tensor | None = None,
    *,
    num_steps: int = 100,
    lr: float = 5e-2,
    num_particles: int = 10,
    **options,
) -> tuple[Tensor, Tensor]:
    """:func:`factor_scores` after ``num_steps`` refinement steps per person.

    Each person's Normal posterior starts at the encoder's output and takes Adam steps on
    their own ELBO (:func:`~pyro_amortized.refinement.refine`, ``num_particles`` draws a
    step), the item parameters held fixed: it closes the encoder's amortization gap,
    largest for rows unlike those it was trained on (e.g. people who gave few answers).
    Draws from Pyro's RNG.

    Arguments:
        model: The fitted model.
        guide: Its guide.
        answers: ``[N, D]``, NaN where missing.
        rotation: As for :func:`factor_scores`.
        num_steps, lr, num_particles: :func:`~pyro_amortized.refinement.refine`'s; on
            bfi, 100 steps at 5e-2 with 10 draws (docs/personality.md).
        **options: :func:`~pyro_amortized.refinement.refine`'s other options
            (``optimizer``, ``estimator``, ...).

    Returns:
        ``(mean, sd)``, ``[N, Q]`` each.

    Raises:
        ValueError: As :func:`factor_scores`, for the model's scale.
    """
    check_answers(answers, model.categories, empty_items=True)
    refined = refine(
        model,
        guide,
        answers,
        num_steps=num_steps,
        lr=lr,
        num_particles=num_particles,
        **options,
    )
    # z has real support, so the refined base Normal is z's posterior itself
    return _in_basis(refined.loc, refined.scale, rotation)


def importance_factor_scores(
    model: FactorModel,
    guide: AutoAmortizedNormal,
    answers: Tensor,
    rotation: Tensor | None = None,
    *,
    num_samples: int = 1000,
) -> tuple[Tensor, Tensor]:
    r"""The exact posterior's means and sds of the people's personalities, ``[N, Q]`` each,
    by self-normalized importance sampling with the guide as proposal.

    :math:`E[z_i \mid x_{i,\mathrm{obs}}] \approx \sum_s \bar w_s z_s` with
    :math:`z_s \sim q(z \mid x_{i,\mathrm{obs}})` and :math:`w_s \propto p(z_s)\,
    p(x_{i,\mathrm{obs}} \mid z_s) / q(z_s)`, as :func:`posterior_predictive` weighs
    them: consistent as ``num_samples`` grows, however far the encoder is from the exact
    posterior (e.g. for people who gave few answers), and without the jitter of a last
    gradient step. One pass of the encoder and ``num_samples`` likelihood evaluations a
    person; draws from Pyro's RNG.

    Arguments:
        model: The fitted model.
        guide: Its guide.
        answers: ``[N, D]``, NaN where missing.
        rotation: As for :func:`factor_scores`; the sds are then the rotated posterior's.
        num_samples: Importance samples per person.

    Returns:
        ``(mean, sd)``, ``[N, Q]`` each.

    Raises:
        ValueError: As :func:`factor_scores`, for the model's scale; or ``num_samples``
            is not a whole number >= 1.
    """
    check_answers(answers, model.categories, empty_items=True)
    _check_num_samples("importance_factor_scores", num_samples)
    with torch.no_grad():
        z, log_w = importance_samples(model, guide, answers, num_samples)
        if rotation is not None:
            z = rotate_scores(z, rotation)
        weights = log_w.softmax(0)[..., None]
        mean = (weights * z).sum(0)
        return mean, (weights * (z - mean) ** 2).sum(0).sqrt()


def _in_basis(mean: Tensor, sd: Tensor, rotation: Tensor | None) -> tuple[Tensor, Tensor]:
    """Diagonal-Normal scores ``(mean, sd)`` in the basis of ``loadings @ rotation``."""
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
    return discretized_normal(answer.loc, answer.scale, model.categories)


def discretized_normal(loc: Tensor, scale: Tensor, categories: int) -> Tensor:
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

    Raises:
        ValueError: As :func:`importance_samples`.
    """
    with torch.no_grad():
        z, log_w = importance_samples(model, guide, answers, num_samples)
        return torch.einsum("sn,sndc->ndc", log_w.softmax(0), category_probs(model, z))


def importance_samples(
    model: FactorModel,
    guide: AutoAmortizedNormal,
    answers: Tensor,
    num_samples: int,
    *,
    chunk: int = 256,
) -> tuple[Tensor, Tensor]:
    r"""Draws from the guide and their log importance weights, person by person.

    :math:`z_s \sim q(z \mid x_{i,\mathrm{obs}})` and :math:`\log w_s = \log p(z_s) +
    \log p(x_{i,\mathrm{obs}} \mid z_s) - \log q(z_s)`, which :func:`posterior_predictive`
    and :func:`importance_factor_scores` weigh with. For diagnostics,
    ``log_w.logsumexp(0) - math.log(S)`` estimates each person's
    :math:`\log p(x_{i,\mathrm{obs}})`, and ``1 / (log_w.softmax(0) ** 2).sum(0)`` is each
    person's effective sample size. Drawn ``chunk`` samples at a time, so the likelihood's
    ``[chunk, N, D, C]`` tensors stay small however many are asked for; draws from Pyro's
    RNG.

    Arguments:
        model: The fitted model.
        guide: Its guide, the proposal.
        answers: ``[N, D]``, NaN where missing.
        num_samples: S, draws per person.
        chunk: Draws at a time.

    Returns:
        ``(z, log_w)``: ``[S, N, Q]`` and ``[S, N]``.

    Raises:
        ValueError: As :func:`factor_scores`, for the model's scale; or ``num_samples``
            is not a whole number >= 1.
    """
    check_answers(answers, model.categories, empty_items=True)
    _check_num_samples("importance_samples", num_samples)
    posterior = guide.site_posteriors(answers)["z"]
    observed, coded = ~torch.isnan(answers), coded_answers(model, answers)
    draws, log_weights = [], []
    for start in range(0, num_samples, chunk):
        z = posterior.sample((min(chunk, num_samples - start),))
        prior = dist.Normal(torch.zeros_like(z), 1.0).to_event(1)
        log_lik = model.answer_distribution(z).mask(observed).log_prob(coded).sum(-1)
        draws.append(z)
        log_weights.append(prior.log_prob(z) + log_lik - posterior.log_prob(z))
    return torch.cat(draws), torch.cat(log_weights)


def _check_num_samples(owner: str, num_samples: int) -> None:
    """Raise a ``ValueError`` naming ``owner`` unless ``num_samples`` is a whole number >= 1."""
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"{owner}: num_samples must be a whole number >= 1, got {num_samples!r}")


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
