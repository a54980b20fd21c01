"""The factor model against ``factor_analyzer`` and item baselines: metrics, the CLI's table."""

from __future__ import annotations

import importlib.util
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import pyro
import torch
from torch import Tensor

from models._factor_analysis import (
    align_to_traits,
    congruence,
    discretized_normal,
    factor_scores,
    importance_factor_scores,
    items_on_trait,
    oblimin_to_traits,
    posterior_predictive,
)
from models.personality import FactorFit, fit_factor_model
from models.questionnaires import Questionnaire, check_answers, few_answers, hide_answers

__all__ = [
    "Comparison",
    "FactorAnalysis",
    "compare",
    "factor_analyzer_loadings",
    "factor_names",
    "fit_factor_analyzer",
    "heldout_log_likelihood",
    "item_frequencies",
    "item_mean_normal",
    "linear_factor_scores",
    "plot_loadings",
    "print_comparison",
    "score_correlation",
]


def heldout_log_likelihood(predictive: Tensor, answers: Tensor, hidden: Tensor) -> float:
    """Mean log-probability of the ``hidden`` answers under ``predictive``.

    Arguments:
        predictive: ``[N, D, C]`` category probabilities, or ``[D, C]`` shared by all.
        answers: ``[N, D]`` true answers in 1..C.
        hidden: ``[N, D]`` mask of the held-out cells.

    Raises:
        ValueError: An answer is not one of the ``C`` categories
            (:func:`~models.questionnaires.check_answers`).
    """
    check_answers(answers, predictive.shape[-1], empty_items=True)
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
    return discretized_normal(mean, variance.sqrt().clamp_min(1e-3), categories)


@dataclass(frozen=True, eq=False)
class FactorAnalysis:
    """A ``factor_analyzer`` fit (minres, oblimin) of the items' correlation matrix.

    Attributes:
        loadings: ``[D, Q]`` pattern matrix.
        structure: ``[D, Q]`` structure matrix, the items' correlations with the factors
            (``loadings @ phi``).
        correlation: ``[D, D]`` the items' pairwise-complete correlation matrix it fitted.
        mean, sd: ``[D]`` the items' means and sds (observed answers; sd with ddof 0, as
            ``FactorAnalyzer.transform`` standardizes).
        categories: C, the answer scale 1..C that it was fitted on and that
            :func:`linear_factor_scores` checks new answers against.
    """

    loadings: Tensor
    structure: Tensor
    correlation: Tensor = field(repr=False)
    mean: Tensor = field(repr=False)
    sd: Tensor = field(repr=False)
    categories: int

    def aligned(self, traits: Sequence[int]) -> FactorAnalysis:
        """The same fit with its factors ordered and signed so factor t is trait t's."""
        loadings, order, signs = align_to_traits(self.loadings, traits, self.loadings.shape[1])
        structure = self.structure[:, order] * signs
        return FactorAnalysis(
            loadings, structure, self.correlation, self.mean, self.sd, self.categories
        )


def fit_factor_analyzer(
    answers: Tensor, num_factors: int = 5, *, categories: int = 6
) -> FactorAnalysis:
    """The reference: ``factor_analyzer``'s minres factor analysis with oblimin rotation.

    Fitted to the items' pairwise-complete correlation matrix, so missing answers drop out
    pair by pair (nothing is imputed).

    ``factor_analyzer`` 0.5.1 sorts the factors by variance after the rotation but leaves
    ``phi_`` in the order before, so ``loadings_ @ phi_`` is not the structure matrix;
    ``structure_`` is, and is what this returns.

    Arguments:
        answers: ``[N, D]`` answers in 1..``categories``, NaN where missing; checked by
            :func:`~models.questionnaires.check_answers` (an item with no answers is
            refused, as :func:`~models.personality.fit_factor_model` refuses it).
        num_factors: Q.
        categories: C, the answer scale 1..C (as for
            :func:`~models.personality.fit_factor_model`).

    Returns:
        The :class:`FactorAnalysis`, in ``answers``' dtype.

    Raises:
        ValueError: An answer is not a whole number in 1..C, or an item has no answers.
        ImportError: ``factor_analyzer`` is not installed (``pip install factor_analyzer
            "scikit-learn<1.8"``, or this project's ``bench`` extra).
    """
    check_answers(answers, categories)
    try:
        from factor_analyzer import FactorAnalyzer
    except ImportError as error:
        raise ImportError(
            "fit_factor_analyzer needs factor_analyzer, which needs scikit-learn < 1.8: "
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
    observed = ~torch.isnan(answers)
    mean = answers.nanmean(0)
    sd = (((answers - mean).nan_to_num(0.0) ** 2).sum(0) / observed.sum(0)).sqrt()
    return FactorAnalysis(
        torch.tensor(analyzer.loadings_, dtype=answers.dtype),
        torch.tensor(analyzer.structure_, dtype=answers.dtype),
        torch.tensor(correlation, dtype=answers.dtype),
        mean,
        sd,
        categories,
    )


def factor_analyzer_loadings(
    answers: Tensor, num_factors: int = 5, *, categories: int = 6
) -> Tensor:
    """:func:`fit_factor_analyzer`'s ``[D, Q]`` loadings (pattern matrix)."""
    return fit_factor_analyzer(answers, num_factors, categories=categories).loadings


def linear_factor_scores(analysis: FactorAnalysis, answers: Tensor) -> Tensor:
    r"""``[N, Q]``: the regression (Thurstone) factor scores from each person's observed answers.

    For person i with observed items o, standardized answers :math:`x_o`, the items'
    correlations :math:`R_{oo}` and the structure matrix's rows :math:`S_o`,
    :math:`\hat f_i = S_o^\top R_{oo}^{-1} x_o`: the best linear predictor of the
    factors from the answers given, and of the full-answer scores too
    (:math:`\operatorname{Cov}(S^\top R^{-1} x, x_o) = S_o^\top`). With every answer
    given it is ``FactorAnalyzer.transform``; a person with none scores 0.

    Arguments:
        analysis: The :class:`FactorAnalysis` (:func:`fit_factor_analyzer`), aligned or
            not.
        answers: ``[N, D]`` answers of the people to score, new ones included, in
            1..``analysis.categories``, NaN where missing.

    Returns:
        ``[N, Q]``: the scores, in the basis of ``analysis.loadings``.

    Raises:
        ValueError: An answer is not a whole number in 1..C
            (:func:`~models.questionnaires.check_answers`, naming the row and item; an
            item none of these people answered is fine).

    References:
        The Vectors of Mind (Thurstone, 1935), the regression factor-score predictor, here
        with the structure matrix of oblique factors (``psych::factor.scores``'s
        ``"Thurstone"`` weights ``R^{-1} S``), restricted to the items each person answered.
    """
    check_answers(answers, analysis.categories, empty_items=True)
    x = (answers - analysis.mean) / analysis.sd
    observed = ~torch.isnan(x)
    both = observed[:, :, None] & observed[:, None, :]
    # R_oo on the observed block, the identity elsewhere: the solve leaves 0 on missing items
    eye = torch.eye(x.shape[1], dtype=x.dtype)
    system = torch.where(both, analysis.correlation, eye)
    weights = torch.linalg.solve(system, x.nan_to_num(0.0))
    return weights @ analysis.structure


def score_correlation(scores: Tensor, reference: Tensor) -> Tensor:
    """Pearson's correlation across people of each factor's scores with its reference's.

    Arguments:
        scores: ``[N, Q]``, e.g. scores from a few answers a person.
        reference: ``[N, Q]``, the same people's reference scores (e.g. from all their
            answers), factor q against factor q.

    Returns:
        ``[Q]``: one correlation per factor (NaN for a factor constant over people).
    """
    a = scores - scores.mean(0)
    b = reference - reference.mean(0)
    return (a * b).sum(0) / (a.norm(dim=0) * b.norm(dim=0))


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
        few_answers: With ``keep_answers = k`` in the fit: each method's scores of the
            people fitted from ``k`` of their answers (chosen at random), correlated per
            factor with its scores from all their answers, averaged over the factors:
            ``"ours"`` (the encoder), ``"ours, importance sampled"``
            (:func:`~models._factor_analysis.importance_factor_scores`, 1,000 draws a
            person) and ``"factor_analyzer"`` (:func:`linear_factor_scores`, when
            installed); else ``None``. ``benchmarks/few_answers.py`` measures it on
            held-out people.
    """

    fitted: FactorFit
    loadings: Tensor = field(repr=False)
    rotation: Tensor = field(repr=False)
    items_on_trait: int | None
    heldout: dict[str, float]
    score_time: float
    reference: dict | None
    few_answers: dict[str, float] | None = None


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
    predictive draws 64 samples per person. Every answer is checked first
    (:func:`~models.questionnaires.check_answers`), the held-out ones included.
    """
    # every answer checked, the held-out ones included, before anything is fitted
    check_answers(q.answers, q.categories, items=q.items)
    shown, hidden = hide_answers(q.answers, heldout, seed=seed)
    fitted = fit_factor_model(
        shown,
        num_factors=num_factors,
        likelihood=likelihood,
        categories=q.categories,
        items=q.items,
        seed=seed,
        **fit_kwargs,
    )
    # with one factor per trait, factor t is trait t's; otherwise the factors stay as found
    by_trait = num_factors == len(q.trait_names)
    rotated, rotation = oblimin_to_traits(fitted.model, q.traits if by_trait else None)
    with torch.no_grad():
        score_time, _ = _median_time(lambda: fitted.guide.site_posteriors(q.answers))
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
    result, analysis = None, None
    if reference and importlib.util.find_spec("factor_analyzer") is not None:
        fa_time, analysis = _median_time(
            lambda: fit_factor_analyzer(shown, num_factors, categories=q.categories)
        )
        if by_trait:
            analysis = analysis.aligned(q.traits)
        theirs = analysis.loadings
        per_factor, _, _ = congruence(rotated, theirs)
        result = {
            "loadings": theirs,
            "items_on_trait": items_on_trait(theirs, q.traits) if by_trait else None,
            "congruence": per_factor,
            "fit_time": fa_time,
        }
    few = None
    if fit_kwargs.get("keep_answers") is not None:
        kept, _ = few_answers(shown, fit_kwargs["keep_answers"], seed=seed)
        full, _ = factor_scores(fitted.guide, shown, rotation)
        some, _ = factor_scores(fitted.guide, kept, rotation)
        few = {"ours": float(score_correlation(some, full).mean())}
        pyro.set_rng_seed(seed)
        full, some = (
            importance_factor_scores(fitted.model, fitted.guide, x, rotation) for x in (shown, kept)
        )
        few["ours, importance sampled"] = float(score_correlation(some[0], full[0]).mean())
        if analysis is not None:
            full, some = (linear_factor_scores(analysis, x) for x in (shown, kept))
            few["factor_analyzer"] = float(score_correlation(some, full).mean())
    return Comparison(
        fitted,
        rotated,
        rotation,
        items_on_trait(rotated, q.traits) if by_trait else None,
        scores,
        score_time,
        result,
        few,
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
    if comparison.few_answers is not None:
        count = fitted.keep_answers
        print(
            f"scores from {count} random answers a person against those from all, correlation "
            "(mean over factors; the people fitted):"
        )
        for name, value in comparison.few_answers.items():
            print(f"  {name:24s}{value:>10.4f}")


def factor_names(q: Questionnaire, num_factors: int) -> list[str]:
    """The traits' names when there is one factor per trait (as :func:`compare` aligns
    them), else ``"factor k"``."""
    if num_factors == len(q.trait_names):
        return list(q.trait_names)
    return [f"factor {k}" for k in range(num_factors)]
