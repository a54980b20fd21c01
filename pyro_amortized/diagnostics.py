r"""Diagnostics of amortized inference: per-datapoint log-likelihood and active units."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from pyro import poutine
from pyro.poutine.subsample_messenger import _Subsample
from torch import Tensor
from tqdm import tqdm

from .objectives import Trace_IWELBO

__all__ = ["ActiveUnits", "active_units", "log_marginal_likelihood"]


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
    for name, value in (("num_samples", num_samples), ("chunk_size", chunk_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"log_marginal_likelihood: {name} must be an int >= 1, got {value!r}")
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
    probe = Trace_IWELBO(1, local_plate=getattr(guide, "local_plate", None))
    with torch.random.fork_rng(devices=[]):  # the setup's draws leave the estimate's alone
        probe._setup(model, guide, args, kwargs)
    local_plate = probe._local_name
    globals_ = _global_medians(guide, local_plate, args, kwargs)
    if globals_:
        model = poutine.condition(model, data=globals_)
        guide = poutine.condition(guide, data=globals_)

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
        total=len(batches) * len(chunks),
        desc=f"log p(x), S={num_samples}",
        unit="chunk",
        disable=not progress,
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
                chunk = torch.logsumexp(terms.model_local - terms.guide_local, 0)
                total = chunk if total is None else torch.logaddexp(total, chunk)
                bar.update()
            results.append(total - math.log(num_samples))
    return torch.cat(results)


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
    """The number of active latent dimensions and every dimension's activity."""

    count: int
    activity: Tensor  # [D] variance over datapoints of the posterior mean


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
        The count and the per-dimension activity.

    References:
        Importance Weighted Autoencoders (Burda, Grosse and Salakhutdinov, 2016), Sec. 5.2.
    """
    if hasattr(guide, "encode"):
        means = []
        for q in guide.encode(*args, **kwargs).values():
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
    return ActiveUnits(int((activity > threshold).sum()), activity)
