r"""Diagnostics of amortized inference: per-datapoint log-likelihood and active units."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from pyro import poutine
from pyro.poutine.subsample_messenger import _Subsample
from torch import Tensor, nn
from tqdm import tqdm

from .guides import AutoAmortizedGuide, AutoAmortizedNormal
from .objectives import Trace_IWELBO

__all__ = [
    "ActiveUnits",
    "InferenceGaps",
    "active_units",
    "inference_gaps",
    "log_marginal_likelihood",
    "optimize_local_normal",
]


@torch.no_grad()
def log_marginal_likelihood(
    model: Callable,
    guide: Callable,
    *args,
    num_samples: int = 5000,
    chunk_size: int = 500,
    batch_size: int | None = None,
    progress: bool = True,
    **kwargs,
) -> Tensor:
    r"""Importance-sampling estimate of :math:`\log p(x_i)` for every datapoint.

    The IWAE bound with ``num_samples`` particles and the guide as proposal,
    :math:`\log \frac{1}{S} \sum_s p(x_i, z_s) / q(z_s \mid x_i)`, which tends to
    :math:`\log p(x_i)` from below as :math:`S` grows. Particles are drawn ``chunk_size``
    at a time and the chunks' log-sum-exps combined as they come, so memory is bounded by
    ``chunk_size`` whatever ``num_samples``; the same draws give the same estimate, up to
    float rounding, whatever the chunking.

    **Global latents.** With global latent sites (outside the local plate) the estimate
    is of :math:`\log p(x_i \mid \hat\beta)`, the globals fixed at the guide's
    ``median()``: one value shared by every datapoint and chunk, so the estimates split
    over datapoints and do not depend on a random draw of the globals. Their own prior
    and entropy are left out.

    Arguments:
        model: The model.
        guide: The guide (the proposal); with globals, it needs a ``median`` method, as
            every :class:`~pyro_amortized.guides.AutoAmortizedGuide` has.
        *args: The model's arguments.
        num_samples: Importance samples :math:`S` per datapoint.
        chunk_size: Particles drawn per pass.
        batch_size: When given, datapoints are taken this many at a time, following
            :func:`~pyro_amortized.fit`'s convention: the model is called as
            ``model(*args, idx, **kwargs)`` with ``idx`` the batch's rows of ``args[0]``
            (the plate takes ``subsample=idx``). ``None`` runs all datapoints at once.
        progress: Show a ``tqdm`` progress bar over the chunks (on stderr).
        **kwargs: The model's keyword arguments.

    Returns:
        ``[N]`` estimates, in nats, in the order of the local plate.

    References:
        Importance Weighted Autoencoders (Burda, Grosse and Salakhutdinov, 2016).
    """
    _check_counts("log_marginal_likelihood", num_samples=num_samples, chunk_size=chunk_size)
    if batch_size is not None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(
                "log_marginal_likelihood: batch_size must be None or an int >= 1, "
                f"got {batch_size!r}"
            )
        if not args or not isinstance(args[0], Tensor):
            raise ValueError(
                "log_marginal_likelihood: batch_size needs the data as the first argument, "
                "model(data, idx), as fit calls it"
            )
    model, guide, local_plate, _ = _fix_globals(model, guide, args, kwargs)
    return _chunked_estimate(
        model,
        guide,
        args,
        kwargs,
        num_samples=num_samples,
        chunk_size=chunk_size,
        batch_size=batch_size,
        local_plate=local_plate,
        reduce="logmeanexp",
        desc=f"log p(x), S={num_samples}",
        progress=progress,
    )


def _chunked_estimate(
    model: Callable,
    guide: Callable,
    args,
    kwargs,
    *,
    num_samples: int,
    chunk_size: int,
    batch_size: int | None,
    local_plate: str,
    reduce: str,
    desc: str,
    progress: bool,
) -> Tensor:
    """Per-datapoint log-mean-exp (IWAE) or mean (ELBO) of ``num_samples`` log-weights."""
    if batch_size is None:
        batches = [None]
    else:
        rows = torch.arange(len(args[0]), device=args[0].device)
        batches = list(rows.split(batch_size))
    chunks = [min(chunk_size, num_samples - start) for start in range(0, num_samples, chunk_size)]
    # One objective per chunk size; their one-off setup runs draw from a forked RNG, so
    # the estimate's draws are the same whatever the chunking.
    objectives: dict[int, Trace_IWELBO] = {}
    results = []
    with tqdm(
        total=len(batches) * len(chunks), desc=desc, unit="chunk", disable=not progress
    ) as bar:
        for idx in batches:
            call_args = args if idx is None else (*args, idx)
            total = None
            for k in chunks:
                elbo = objectives.get(k)
                if elbo is None:
                    elbo = objectives[k] = Trace_IWELBO(k, local_plate=local_plate)
                    with torch.random.fork_rng(devices=[]):
                        elbo._setup(model, guide, call_args, kwargs)
                terms = elbo._collect(model, guide, call_args, kwargs, stopped=False)
                log_w = terms.model_local - terms.guide_local
                if reduce == "logmeanexp":
                    chunk = torch.logsumexp(log_w, 0)
                    total = chunk if total is None else torch.logaddexp(total, chunk)
                else:
                    chunk = log_w.sum(0)
                    total = chunk if total is None else total + chunk
                bar.update()
            results.append(
                total - math.log(num_samples) if reduce == "logmeanexp" else total / num_samples
            )
    return torch.cat(results)


def _check_counts(owner: str, **values) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{owner}: {name} must be an int >= 1, got {value!r}")


def _check_local_options(
    owner: str, init: str, num_particles: int, lr: float, max_steps: int, patience: int
) -> None:
    """The options of the per-datapoint optimization (:func:`optimize_local_normal`)."""
    if init not in ("encoder", "prior"):
        raise ValueError(f"{owner}: init must be 'encoder' or 'prior', got {init!r}")
    _check_counts(owner, num_particles=num_particles, max_steps=max_steps, patience=patience)
    if not lr > 0:
        raise ValueError(f"{owner}: lr must be > 0, got {lr!r}")


def _fix_globals(model: Callable, guide: Callable, args, kwargs):
    """Model and guide with the global latents fixed at the guide's median.

    Returns ``(model, guide, local_plate, globals)``; model and guide come back unchanged
    when there are no globals.
    """
    probe = Trace_IWELBO(1, local_plate=getattr(guide, "local_plate", None))
    with torch.random.fork_rng(devices=[]):  # the setup's draws leave the estimate's alone
        probe._setup(model, guide, args, kwargs)
    local_plate = probe._local_name
    globals_ = _global_medians(guide, local_plate, args, kwargs)
    if globals_:
        model = poutine.condition(model, data=globals_)
        guide = poutine.condition(guide, data=globals_)
    return model, guide, local_plate, globals_


def _global_medians(guide: Callable, local: str, args, kwargs) -> dict[str, Tensor]:
    """The guide's median of every latent site outside the local plate ({} without any)."""
    with poutine.block(), torch.random.fork_rng(devices=[]):
        trace = poutine.trace(guide).get_trace(*args, **kwargs)
    names = [
        name
        for name, site in trace.nodes.items()
        if site["type"] == "sample"
        and not site["is_observed"]
        and not isinstance(site["fn"], _Subsample)
        and not site["infer"].get("is_auxiliary")
        and all(f.name != local for f in site["cond_indep_stack"])
    ]
    if not names:
        return {}
    if not hasattr(guide, "median"):
        raise ValueError(
            f"log_marginal_likelihood: the model has global latent sites ({', '.join(names)}) "
            f"and the guide ({type(guide).__name__}) has no median() to fix them at"
        )
    medians = guide.median(*args, **kwargs)
    return {name: medians[name] for name in names}


class ActiveUnits(NamedTuple):
    """The number of active latent dimensions, every dimension's activity and KL."""

    count: int
    activity: Tensor  # [D] variance over datapoints of the posterior mean
    # [D] mean over datapoints of KL(q(z_d | x) || p(z_d)); None for flow guides
    kl: Tensor | None = None


@torch.no_grad()
def active_units(
    guide: Callable, *args, threshold: float = 0.01, num_samples: int = 100, **kwargs
) -> ActiveUnits:
    r"""Latent dimensions whose posterior mean varies across datapoints.

    Activity of dimension :math:`u` is :math:`\mathrm{Cov}_x(\mathbb{E}_{q(z \mid x)}[z_u])`;
    a unit is active when its activity exceeds ``threshold``. Means are taken in the
    unconstrained space the guide works in, over all local sites (concatenated): exactly
    for a guide with an ``encode`` method (:class:`~pyro_amortized.AutoAmortizedNormal`),
    and from ``num_samples`` draws per datapoint for a flow guide (one with
    ``get_posterior``, such as :class:`~pyro_amortized.AutoAmortizedIAF`): the variance
    over datapoints of the draws' averages, less the average variance of those averages,
    an unbiased estimate that may come out slightly negative for an inactive unit.

    Arguments:
        guide: An amortized guide with an ``encode`` or a ``get_posterior`` method.
        *args: The model's arguments (the datapoints).
        threshold: Activity above which a unit counts as active.
        num_samples: Draws per datapoint for the mean of a flow guide.
        **kwargs: The model's keyword arguments.

    Returns:
        The count, the per-dimension activity and, for a guide with ``encode`` (the
        Normal guide), each dimension's mean KL from the posterior to the prior,
        :math:`\mathbb{E}_x \mathrm{KL}(q(z_u \mid x) \,\|\, p(z_u))`: an inactive unit's is
        near 0. The priors come from running the guide's model on the datapoints.

    References:
        Importance Weighted Autoencoders (Burda, Grosse and Salakhutdinov, 2016), Sec. 5.2.
    """
    if hasattr(guide, "encode"):
        posteriors = guide.encode(*args, **kwargs)
        means = []
        for q in posteriors.values():
            base = q.base_dist if isinstance(q, torch.distributions.TransformedDistribution) else q
            means.append(base.mean.reshape(base.mean.shape[0], -1))
        means = torch.cat(means, dim=-1)
    elif hasattr(guide, "get_posterior"):
        # two draws at least: the correction below needs the draws' variance
        if not isinstance(num_samples, int) or num_samples < 2:
            raise ValueError(f"active_units: num_samples must be an int >= 2, got {num_samples!r}")
        draws = guide.get_posterior(*args, **kwargs).sample((num_samples,))
        draws = draws[..., : guide.latent_dim]  # not a flow's auxiliary columns
        means = draws.mean(0)
        # The averages' own variance, var_q / S, would add to the activity (for a unit at the
        # prior, 1 / S: as large as the threshold for S = 100); remove its unbiased estimate.
        noise = draws.var(0).mean(0) / num_samples
        activity = means.var(0, unbiased=False) - noise
        return ActiveUnits(int((activity > threshold).sum()), activity)
    else:
        raise ValueError(
            f"active_units: the guide ({type(guide).__name__}) has neither encode() nor "
            "get_posterior(); pass an amortized guide"
        )
    activity = means.var(0, unbiased=False)
    kl = _kl_per_dimension(guide, posteriors, num_samples, args, kwargs)
    return ActiveUnits(int((activity > threshold).sum()), activity, kl)


def _kl_per_dimension(guide, posteriors: dict, num_samples: int, args, kwargs) -> Tensor:
    """Mean over datapoints of KL(q(z_d | x) || p(z_d)) per coordinate of every local site.

    Analytic where torch registers the pair (Normal against Normal), else from
    ``num_samples`` draws. The priors are the model's, run on these datapoints;
    ``posteriors`` is ``guide.encode``'s result for them.
    """
    with poutine.block(), torch.random.fork_rng(devices=[]):
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        model_trace = poutine.trace(poutine.replay(guide.model, trace=guide_trace)).get_trace(
            *args, **kwargs
        )
    result = []
    for name, q in posteriors.items():
        p = model_trace.nodes[name]["fn"]
        q_dims, p_dims = _elementwise(q), _elementwise(p)
        try:
            kl = torch.distributions.kl_divergence(q_dims, p_dims)
        except NotImplementedError:
            z = q_dims.sample((num_samples,))
            kl = (q_dims.log_prob(z) - p_dims.log_prob(z)).mean(0)
        kl = kl.expand(q_dims.batch_shape)
        result.append(kl.reshape(kl.shape[0], -1).mean(0))
    return torch.cat(result)


def _elementwise(d: torch.distributions.Distribution) -> torch.distributions.Distribution:
    while isinstance(d, torch.distributions.Independent):
        d = d.base_dist
    return d


class _RowTable(nn.Module):
    """A diagonal Normal per datapoint, looked up by row number: a non-amortized encoder."""

    def __init__(self, loc: Tensor, scale: Tensor):
        super().__init__()
        self.loc = nn.Parameter(loc.detach().clone())
        self.log_scale = nn.Parameter(scale.detach().log())

    def forward(self, rows: Tensor) -> tuple[Tensor, Tensor]:
        i = rows[..., 0].long()
        return self.loc[i], self.log_scale[i].exp()


def _local_elbo(elbo: Trace_IWELBO, model, guide, args, kwargs) -> Tensor:
    """``[N]`` per-datapoint ELBO estimates: the mean over the particles of log w."""
    terms = elbo._collect(model, guide, args, kwargs, stopped=False)
    return (terms.model_local - terms.guide_local).mean(0)


def optimize_local_normal(
    model: Callable,
    guide: Callable,
    *args,
    init: str = "encoder",
    num_particles: int = 10,
    lr: float = 1e-2,
    max_steps: int = 5000,
    patience: int = 200,
    progress: bool = True,
    **kwargs,
) -> tuple[Callable, Callable, Tensor]:
    r"""The best diagonal Normal for each datapoint, :math:`q^*_{\mathrm{FFG}}(z \mid x_i)`.

    One free (loc, scale) per datapoint over the guide's joint unconstrained local latent,
    started at the encoder's output (``init="encoder"``) or at a standard Normal
    (``"prior"``), and optimized by Adam on each datapoint's own ELBO estimate
    (``num_particles`` draws a step). All datapoints move in one batched tensor program;
    Adam's moments and step counts are per datapoint, and a datapoint stops once the
    running average of its bound (an exponential average over about 20 steps) has not
    risen for ``patience`` steps. Globals are fixed at the guide's median.

    Arguments:
        model: The model (called with all its datapoints at once).
        guide: An amortized guide; its encoder gives the start and its sites the layout.
        *args: The model's arguments.
        init: ``"encoder"`` or ``"prior"``: where each datapoint's Normal starts.
        num_particles: Draws per step.
        lr: Adam's step size.
        max_steps: Cap on the steps.
        patience: Steps without a higher running-average bound before a datapoint stops.
        progress: Show a ``tqdm`` progress bar (on stderr).
        **kwargs: The model's keyword arguments.

    Returns:
        ``(model, local_guide, steps)``: the model and a guide for the optimized
        posteriors (both with the globals fixed), and each datapoint's number of steps.

    References:
        Inference Suboptimality in Variational Autoencoders (Cremer, Li and Duvenaud, 2018).
    """
    _check_local_options("optimize_local_normal", init, num_particles, lr, max_steps, patience)
    if not isinstance(guide, AutoAmortizedGuide):
        raise ValueError(
            f"optimize_local_normal: the guide ({type(guide).__name__}) is not an "
            "AutoAmortizedGuide"
        )
    model, _, local_plate, globals_ = _fix_globals(model, guide, args, kwargs)
    with torch.no_grad():
        # the encoder's base Normal over the joint local latent (a flow guide's, before its flow)
        out = guide._encode(guide._get_context(None, args, kwargs))
        loc, scale = out[0], out[1]
        if init == "prior":
            loc, scale = torch.zeros_like(loc), torch.ones_like(scale)
    N = loc.shape[0]
    rows = torch.arange(N, dtype=loc.dtype, device=loc.device).unsqueeze(-1)
    table = _RowTable(loc, scale)
    local_guide = AutoAmortizedNormal(
        model, local_plate=local_plate, encoder=table, context=lambda *a, **k: rows
    )
    if globals_:
        local_guide = poutine.condition(local_guide, data=globals_)
    elbo = Trace_IWELBO(num_particles, local_plate=local_plate)
    params = list(table.parameters())
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    t = torch.zeros(N, dtype=loc.dtype, device=loc.device)
    active = torch.ones(N, dtype=torch.bool, device=loc.device)
    average = best = None
    since = torch.zeros(N, dtype=torch.long, device=loc.device)
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    with tqdm(total=max_steps, desc="local q*", unit="step", disable=not progress) as bar:
        for _ in range(max_steps):
            bound = _local_elbo(elbo, model, local_guide, args, kwargs)
            grads = torch.autograd.grad(-(bound * active).sum(), params)
            with torch.no_grad():
                t += active
                mask = active.unsqueeze(-1)
                c1 = (1 - beta1**t).clamp_min(1e-12).unsqueeze(-1)
                c2 = (1 - beta2**t).clamp_min(1e-12).unsqueeze(-1)
                for p, g, m_, v_ in zip(params, grads, m, v, strict=True):
                    m_.copy_(torch.where(mask, beta1 * m_ + (1 - beta1) * g, m_))
                    v_.copy_(torch.where(mask, beta2 * v_ + (1 - beta2) * g * g, v_))
                    step = lr * (m_ / c1) / ((v_ / c2).sqrt() + eps)
                    p.sub_(torch.where(mask, step, torch.zeros_like(step)))
                value = bound.detach()
                average = value if average is None else 0.95 * average + 0.05 * value
                improved = average > best if best is not None else torch.ones_like(active)
                best = average if best is None else torch.where(improved, average, best)
                since = torch.where(improved, torch.zeros_like(since), since + 1)
                active &= since < patience
            bar.update()
            bar.set_postfix(active=int(active.sum()))
            if not active.any():
                break
    return model, local_guide, t


FAMILIES = ("normal",)


@dataclass
class InferenceGaps:
    r"""Cremer et al.'s split of the inference gap, per datapoint and on average.

    With :math:`q` the amortized posterior and :math:`q^*` the best posterior of the same
    family fitted to each datapoint on its own:

    - approximation gap :math:`\log \hat p(x) - \mathcal{L}[q^*]`,
    - amortization gap :math:`\mathcal{L}[q^*] - \mathcal{L}[q]`,
    - inference gap :math:`\log \hat p(x) - \mathcal{L}[q]`, their sum.

    Attributes:
        family: The family of the guide, whose :math:`q^*` splits the gap.
        log_px: ``[N]`` :math:`\log \hat p(x)`, the best (highest) of the IWAE estimates.
        elbo: ``[N]`` :math:`\mathcal{L}[q]`, the amortized guide's ELBO.
        optimal_elbo: Family to ``[N]`` :math:`\mathcal{L}[q^*_{\mathrm{family}}]`.
        iwae: Proposal (``"amortized"`` or a family) to its ``[N]`` IWAE estimate.
        steps: Family to ``[N]`` optimization steps each datapoint took.
        num_samples: Samples of the IWAE estimates.
        elbo_samples: Samples of the ELBO estimates.
        seconds: Wall time of the whole computation.
    """

    family: str
    log_px: Tensor
    elbo: Tensor
    optimal_elbo: dict[str, Tensor]
    iwae: dict[str, Tensor]
    steps: dict[str, Tensor]
    num_samples: int
    elbo_samples: int
    seconds: float

    @property
    def approximation_gap(self) -> Tensor:
        """``[N]`` log p̂(x) − L[q*]."""
        return self.log_px - self.optimal_elbo[self.family]

    @property
    def amortization_gap(self) -> Tensor:
        """``[N]`` L[q*] − L[q]."""
        return self.optimal_elbo[self.family] - self.elbo

    @property
    def inference_gap(self) -> Tensor:
        """``[N]`` log p̂(x) − L[q]."""
        return self.log_px - self.elbo

    def rows(self) -> list[tuple[str, float]]:
        """Cremer et al.'s Table 1 rows, each a (label, mean over datapoints in nats)."""
        rows = [("log p̂(x)", self.log_px)]
        rows += [(f"L[q*_{name}]", value) for name, value in self.optimal_elbo.items()]
        rows += [
            ("L[q]", self.elbo),
            ("approximation gap", self.approximation_gap),
            ("amortization gap", self.amortization_gap),
            ("inference gap", self.inference_gap),
        ]
        return [(label, value.mean().item()) for label, value in rows]

    def table(self) -> str:
        """A Markdown table in the layout of Cremer et al.'s Table 1 (means, in nats)."""
        lines = [f"| {len(self.log_px)} datapoints | q = {self.family} |", "|---|---|"]
        lines += [f"| {label} | {value:.2f} |" for label, value in self.rows()]
        return "\n".join(lines)

    def plot(self, path: str | os.PathLike) -> Path:
        """Stacked bars of the mean approximation and amortization gaps; returns the path."""
        from .plotting import plot_inference_gaps

        return plot_inference_gaps({f"q = {self.family}": self}, path)

    def to_dict(self) -> dict:
        """Plain Python numbers and lists, for ``json.dump``."""
        per_datapoint = {
            "log_px": self.log_px,
            "elbo": self.elbo,
            "approximation_gap": self.approximation_gap,
            "amortization_gap": self.amortization_gap,
        }
        per_datapoint.update({f"optimal_elbo_{k}": v for k, v in self.optimal_elbo.items()})
        per_datapoint.update({f"iwae_{k}": v for k, v in self.iwae.items()})
        per_datapoint.update({f"steps_{k}": v for k, v in self.steps.items()})
        return {
            "family": self.family,
            "num_samples": self.num_samples,
            "elbo_samples": self.elbo_samples,
            "seconds": self.seconds,
            "mean": dict(self.rows()),
            "per_datapoint": {k: v.tolist() for k, v in per_datapoint.items()},
        }


def inference_gaps(
    model: Callable,
    guide: AutoAmortizedGuide,
    *args,
    families: Sequence[str] = FAMILIES,
    num_samples: int = 5000,
    elbo_samples: int = 1000,
    chunk_size: int = 500,
    init: str = "encoder",
    num_particles: int = 10,
    lr: float = 1e-2,
    max_steps: int = 5000,
    patience: int = 200,
    progress: bool = True,
    **kwargs,
) -> InferenceGaps:
    r"""The approximation and amortization gaps of an amortized guide on some datapoints.

    For the datapoints in the model's arguments: :math:`\mathcal{L}[q]` (the ELBO of the
    guide, from ``elbo_samples`` draws), and for each family the best posterior fitted to
    each datapoint on its own (:func:`optimize_local_normal` for ``"normal"``) with its
    ELBO :math:`\mathcal{L}[q^*]`; :math:`\log \hat p(x)` is the highest of the IWAE
    estimates (``num_samples`` draws) with :math:`q` and each :math:`q^*` as proposals,
    as Cremer et al. take the best estimate available. Each estimate is a lower bound in
    expectation only. A proposal narrower than the posterior has heavy-tailed weights:
    its estimate converges slowly (on a correlated linear-Gaussian posterior, IWAE-4000
    from the mean-field optimum fell 0.026 nats short, which shrinks the approximation
    gap by as much), and a single estimate can overshoot, which the best one inherits.
    Global latents are
    fixed at the guide's median throughout (see :func:`log_marginal_likelihood`).

    Arguments:
        model: The model (called with all its datapoints at once).
        guide: An amortized guide; its own family (``"normal"`` for
            :class:`~pyro_amortized.AutoAmortizedNormal`) must be among ``families``.
        *args: The model's arguments.
        families: Families of the per-datapoint posteriors :math:`q^*`.
        num_samples: Samples of every IWAE estimate of :math:`\log p(x)`.
        elbo_samples: Samples of every ELBO estimate.
        chunk_size: Samples drawn per pass.
        init: Start of the per-datapoint optimization: ``"encoder"`` (the guide's output)
            or ``"prior"`` (a standard Normal).
        num_particles: Draws per optimization step.
        lr: Adam's step size.
        max_steps: Cap on the optimization steps.
        patience: Steps without a higher running-average bound before a datapoint stops.
        progress: Show progress bars.
        **kwargs: The model's keyword arguments.

    Returns:
        An :class:`InferenceGaps` report.

    References:
        Inference Suboptimality in Variational Autoencoders (Cremer, Li and Duvenaud, 2018).
    """
    began = time.perf_counter()
    families = tuple(families)
    unknown = [f for f in families if f not in FAMILIES]
    if unknown or not families:
        raise ValueError(
            f"inference_gaps: families must be a non-empty subset of {FAMILIES}, got {families}"
        )
    own = _family(guide)
    if own not in families:
        raise ValueError(
            f"inference_gaps: the guide ({type(guide).__name__}) is of family '{own}'; "
            f"add it to families={families} so that its gaps can be split"
        )
    _check_counts(
        "inference_gaps", num_samples=num_samples, elbo_samples=elbo_samples, chunk_size=chunk_size
    )
    # checked here too, so that a bad option fails before the IWAE estimates, not after
    _check_local_options("inference_gaps", init, num_particles, lr, max_steps, patience)
    fixed_model, fixed_guide, local_plate, _ = _fix_globals(model, guide, args, kwargs)

    def estimate(m, g, samples, reduce, desc):
        return _chunked_estimate(
            m,
            g,
            args,
            kwargs,
            num_samples=samples,
            chunk_size=chunk_size,
            batch_size=None,
            local_plate=local_plate,
            reduce=reduce,
            desc=desc,
            progress=progress,
        )

    with torch.no_grad():
        elbo = estimate(fixed_model, fixed_guide, elbo_samples, "mean", "L[q]")
        iwae = {
            "amortized": estimate(fixed_model, fixed_guide, num_samples, "logmeanexp", "IWAE q")
        }
    optimal, steps = {}, {}
    for family in families:
        m, local_guide, steps[family] = optimize_local_normal(
            model,
            guide,
            *args,
            init=init,
            num_particles=num_particles,
            lr=lr,
            max_steps=max_steps,
            patience=patience,
            progress=progress,
            **kwargs,
        )
        with torch.no_grad():
            optimal[family] = estimate(m, local_guide, elbo_samples, "mean", f"L[q*_{family}]")
            iwae[family] = estimate(m, local_guide, num_samples, "logmeanexp", f"IWAE q*_{family}")
    log_px = torch.stack(list(iwae.values())).max(0).values
    return InferenceGaps(
        family=own,
        log_px=log_px,
        elbo=elbo,
        optimal_elbo=optimal,
        iwae=iwae,
        steps=steps,
        num_samples=num_samples,
        elbo_samples=elbo_samples,
        seconds=time.perf_counter() - began,
    )


def _family(guide: Callable) -> str:
    if isinstance(guide, AutoAmortizedNormal):
        return "normal"
    if hasattr(guide, "flow"):
        return "flow"
    raise ValueError(
        f"inference_gaps: the guide ({type(guide).__name__}) is not an AutoAmortizedNormal "
        "or a flow guide"
    )
