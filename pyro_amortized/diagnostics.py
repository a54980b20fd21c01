r"""Diagnostics of amortized inference: per-datapoint log-likelihood and active units."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor
from tqdm import tqdm

from .objectives import Trace_IWELBO

__all__ = ["ActiveUnits", "active_units", "log_marginal_likelihood"]


@torch.no_grad()
def log_marginal_likelihood(
    model: Callable,
    guide: Callable,
    data: Tensor,
    *,
    num_samples: int = 5000,
    particle_chunk: int = 500,
    batch_size: int = 100,
    progress: bool = False,
) -> Tensor:
    r"""Importance-sampling estimate of :math:`\log p(x_i)` for every datapoint.

    The IWAE bound with ``num_samples`` particles and the guide as proposal,
    :math:`\log \frac{1}{S} \sum_s p(x_i, z_s) / q(z_s \mid x_i)`, which tends to
    :math:`\log p(x_i)` from below as :math:`S` grows. Particles are drawn
    ``particle_chunk`` at a time and datapoints ``batch_size`` at a time, so memory stays
    bounded whatever ``num_samples``.

    The model follows :func:`~pyro_amortized.training.fit`'s convention,
    ``model(data, idx)`` with ``pyro.plate(..., subsample=idx)``, and must have no global
    latent sites (with globals, :math:`\log p(x_i)` does not split over datapoints).

    Arguments:
        model: The model.
        guide: The guide (the proposal).
        data: ``[N, ...]`` datapoints.
        num_samples: Importance samples :math:`S` per datapoint.
        particle_chunk: Particles drawn per pass.
        batch_size: Datapoints per pass.
        progress: Show a ``tqdm`` progress bar over the datapoints (on stderr).

    Returns:
        ``[N]`` estimates, in nats.

    References:
        Importance Weighted Autoencoders (Burda, Grosse and Salakhutdinov, 2016).
    """
    for name, value in (("num_samples", num_samples), ("particle_chunk", particle_chunk)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"log_marginal_likelihood: {name} must be an int >= 1, got {value!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(
            f"log_marginal_likelihood: batch_size must be an int >= 1, got {batch_size!r}"
        )
    # One objective per chunk size, built once: each runs model and guide once on first use.
    objectives: dict[int, Trace_IWELBO] = {}
    results = []
    starts = range(0, len(data), batch_size)
    for start in tqdm(
        starts, desc=f"log p(x), S={num_samples}", unit="batch", disable=not progress
    ):
        idx = torch.arange(start, min(start + batch_size, len(data)), device=data.device)
        total, drawn = None, 0
        while drawn < num_samples:
            k = min(particle_chunk, num_samples - drawn)
            elbo = objectives.setdefault(k, Trace_IWELBO(k))
            terms = elbo._collect(model, guide, (data, idx), {}, stopped=False)
            if isinstance(terms.model_global, Tensor) or isinstance(terms.guide_global, Tensor):
                raise ValueError(
                    "log_marginal_likelihood: the model has global latent sites; log p(x_i) "
                    "does not split over datapoints then"
                )
            log_w = terms.model_local - terms.guide_local  # [k, B]
            chunk = torch.logsumexp(log_w, 0)
            total = chunk if total is None else torch.logaddexp(total, chunk)
            drawn += k
        results.append(total - math.log(num_samples))
    return torch.cat(results)


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
