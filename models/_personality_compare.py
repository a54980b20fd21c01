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
    items_on_trait,
    oblimin,
    posterior_predictive,
    standardized_loadings,
)
from models.personality import FactorFit, fit_factor_model
from models.questionnaires import Questionnaire, hide_answers

__all__ = [
    "Comparison",
    "compare",
    "factor_analyzer_loadings",
    "factor_names",
    "heldout_log_likelihood",
    "item_frequencies",
    "item_mean_normal",
    "plot_loadings",
    "print_comparison",
]


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
    return discretized_normal(mean, variance.sqrt().clamp_min(1e-3), categories)


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
