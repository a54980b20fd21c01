r"""Diagnostics of amortized inference: per-datapoint log-likelihood and active units."""

from __future__ import annotations

import dataclasses
import math
import os
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import pyro
import torch
from pyro import poutine
from pyro.poutine.messenger import Messenger
from torch import Tensor, nn
from torch.distributions import Distribution, TransformedDistribution
from torch.distributions.transforms import ComposeTransform, IndependentTransform, Transform
from tqdm import tqdm

from .checks import check_count, check_counts, options_from, renamed
from .devices import data_device, fork_rng
from .encoders import EncoderOutput
from .guides import AutoAmortizedGuide
from .objectives import ParticleVectorizationError, Trace_IWELBO
from .perdatapoint import FAMILIES, LocalOptions, fit_local, fix_globals
from .refinement import RefineOptions, refine_with

__all__ = [
    "ACCELERATOR_MEMORY_BUDGET",
    "CPU_MEMORY_BUDGET",
    "ActiveUnits",
    "ElboSurgery",
    "Estimate",
    "InferenceGaps",
    "active_units",
    "elbo_surgery",
    "gap_table",
    "inference_gaps",
    "log_marginal_likelihood",
    "per_datapoint_elbo",
]


#: Bytes of per-particle tensors that one chunk's sample sites may hold on the CPU, when
#: neither ``chunk_size`` nor ``memory_budget`` is given. Small on purpose: a chunk whose
#: largest tensors fit the CPU's last-level cache runs faster per particle (on the
#: project's 2-core machine, with 32 MiB of L3, the hand-written loop of
#: ``benchmarks/log_marginal.py`` took 20 ms a particle of 2,000 MNIST images in chunks
#: of 2 particles, 12.5 MB of logits, 26 ms in chunks of 5 and 43 ms in chunks of 40).
CPU_MEMORY_BUDGET = 16 * 2**20
#: The same on any other device (a GPU), where larger chunks amortize each pass's
#: kernel launches and Python overhead. Not measured here: no GPU on the project machine.
ACCELERATOR_MEMORY_BUDGET = 2**30


@torch.no_grad()
def log_marginal_likelihood(
    model: Callable,
    guide: Callable,
    *args,
    num_samples: int = 5000,
    chunk_size: int | None = None,
    memory_budget: int | None = None,
    batch_size: int | None = None,
    progress: bool = True,
    local_plate: str | None = None,
    **kwargs,
) -> Tensor:
    r"""Importance-sampling estimate of :math:`\log p(x_i)` for every datapoint.

    The IWAE bound with ``num_samples`` particles and the guide as proposal,
    :math:`\log \frac{1}{S} \sum_s p(x_i, z_s) / q(z_s \mid x_i)`, which tends to
    :math:`\log p(x_i)` from below as :math:`S` grows. Particles are drawn a chunk at a
    time and the chunks' log-sum-exps combined as they come, so memory is bounded by the
    chunk whatever ``num_samples``; the same draws give the same estimate, up to float
    rounding, whatever the chunking.

    **Chunks.** ``chunk_size`` particles a chunk when given. Otherwise, for an amortized
    guide (whose encoding is reused, below) or when ``memory_budget`` is given, the chunk
    size follows ``memory_budget``: the first two chunks (1 and 2 particles, which count
    towards the estimate) measure the bytes of the tensors that the model's and guide's
    sample sites hold per particle (values and distribution parameters: for a VAE the
    latents and the decoder's logits), and the rest take ``memory_budget`` over that,
    at least 1. The networks' intermediate tensors and the log-densities' temporaries
    come on top: for the MNIST VAE on 500 images the process's peak grew by 73 to 98 MiB
    with the default 16 MiB (docs/log-marginal.md). Any other guide keeps 500 particles
    a chunk by default (a :class:`~pyro_amortized.SemiAmortizedGuide` refines afresh in
    every call, so fewer, larger chunks are cheaper for it).

    **Speed.** An amortized guide's encoder runs once per batch of datapoints, and every
    chunk samples from its output (the guide's
    :meth:`~pyro_amortized.guides.AutoAmortizedGuide.prepare` and
    :meth:`~pyro_amortized.guides.AutoAmortizedGuide.sample_local`, the encoding reused
    while the call's context rows stay the same). Under Pyro's validation the first chunk
    of every batch runs Pyro's and torch's checks and the others run without them: they
    see the same data through the same sites, and the checks of every site's parameters
    cost as much as a tenth of the networks' time.

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
        chunk_size: Particles drawn per pass; ``None`` sizes the chunks from
            ``memory_budget`` (500 a chunk for a guide other than an amortized one, unless
            ``memory_budget`` is given).
        memory_budget: Bytes of per-particle site tensors a chunk may hold when
            ``chunk_size`` is None; ``None`` is :data:`CPU_MEMORY_BUDGET` for data on
            the CPU and :data:`ACCELERATOR_MEMORY_BUDGET` elsewhere.
        batch_size: When given, datapoints are taken this many at a time, following
            :func:`~pyro_amortized.fit`'s convention: the model is called as
            ``model(*args, idx, **kwargs)`` with ``idx`` the batch's rows of ``args[0]``
            (the plate takes ``subsample=idx``). ``None`` runs all datapoints at once.
        progress: Show a ``tqdm`` progress bar over the draws (on stderr).
        local_plate: The plate over datapoints, found as
            :class:`~pyro_amortized.objectives.Trace_IWELBO` finds it when None (the
            guide's ``local_plate`` first). A model without one gets a single estimate of
            :math:`\log p(x)` for the whole data set.
        **kwargs: The model's keyword arguments.

    Returns:
        ``[N]`` estimates, in nats, in the order of the local plate (``[1]`` without one).
        A network that cannot take a particle dimension is run with looped particles.

    References:
        Importance Weighted Autoencoders (Burda, Grosse and Salakhutdinov, 2016).
    """
    return _estimate(
        "log_marginal_likelihood",
        model,
        guide,
        args,
        kwargs,
        num_samples=num_samples,
        chunk_size=chunk_size,
        memory_budget=memory_budget,
        batch_size=batch_size,
        local_plate=local_plate,
        reduce="logmeanexp",
        desc=f"log p(x), S={num_samples}",
        progress=progress,
    )


@torch.no_grad()
def per_datapoint_elbo(
    model: Callable,
    guide: Callable,
    *args,
    num_samples: int = 1000,
    chunk_size: int | None = None,
    memory_budget: int | None = None,
    batch_size: int | None = None,
    progress: bool = False,
    local_plate: str | None = None,
    **kwargs,
) -> Tensor:
    r"""Monte Carlo estimate of every datapoint's ELBO,
    :math:`\frac{1}{S} \sum_s \log p(x_i, z_s) / q(z_s \mid x_i)`.

    The same draws, chunks, global latents (fixed at the guide's ``median()``) and
    arguments as :func:`log_marginal_likelihood`, with the mean of the log-weights in
    place of their log-mean-exp: :math:`\mathcal{L}[q]` of
    :func:`inference_gaps`, for one guide.

    Returns:
        ``[N]`` estimates, in nats, in the order of the local plate (``[1]`` without one).
    """
    return _estimate(
        "per_datapoint_elbo",
        model,
        guide,
        args,
        kwargs,
        num_samples=num_samples,
        chunk_size=chunk_size,
        memory_budget=memory_budget,
        batch_size=batch_size,
        local_plate=local_plate,
        reduce="mean",
        desc=f"ELBO, S={num_samples}",
        progress=progress,
    )


def _estimate(owner: str, model, guide, args, kwargs, *, batch_size, local_plate, **options):
    """Either estimate, with its arguments checked and the globals fixed."""
    check_counts(owner, num_samples=options["num_samples"])
    _check_chunking(owner, options["chunk_size"], options["memory_budget"])
    _check_batch_size(owner, batch_size, args)
    if local_plate is not None and (not isinstance(local_plate, str) or not local_plate):
        raise ValueError(f"{owner}: local_plate must be a plate name, got {local_plate!r}")
    proposal = _encoding_once(guide)
    options["chunk_size"] = _chunk_size(
        options["chunk_size"], options["memory_budget"], proposal is not guide
    )
    model, guide, local_plate, _ = fix_globals(
        model, proposal, args, kwargs, owner=owner, local_plate=local_plate
    )
    return _chunked_estimate(
        model, guide, args, kwargs, batch_size=batch_size, local_plate=local_plate, **options
    )


def _check_chunking(owner: str, chunk_size, memory_budget) -> None:
    """``chunk_size`` and ``memory_budget`` each None or a count, not both given."""
    check_count(owner, "chunk_size", chunk_size, optional=True)
    check_count(owner, "memory_budget", memory_budget, optional=True)
    if chunk_size is not None and memory_budget is not None:
        raise ValueError(
            f"{owner}: chunk_size={chunk_size} and memory_budget={memory_budget} both given; "
            "pass chunk_size for a fixed number of particles a chunk, or memory_budget "
            "(bytes) to size the chunks from it"
        )


#: Particles a chunk, by default, for a guide whose encoder cannot be run once (a
#: SemiAmortizedGuide refines afresh in every call, so fewer, larger chunks are cheaper).
_FIXED_CHUNK_SIZE = 500


def _chunk_size(chunk_size: int | None, memory_budget: int | None, encoded_once: bool):
    """The chunk size to draw with: ``chunk_size`` when given; None (sized from the
    budget) when ``memory_budget`` is given or the guide's encoding is reused; else 500."""
    if chunk_size is not None or memory_budget is not None or encoded_once:
        return chunk_size
    return _FIXED_CHUNK_SIZE


def _check_batch_size(owner: str, batch_size, args, minimum: int = 1) -> None:
    """``batch_size`` None or a count, with the data as the first argument to batch."""
    if batch_size is None:
        return
    check_count(owner, "batch_size", batch_size, minimum=minimum, optional=True)
    if not args or not isinstance(args[0], Tensor):
        raise ValueError(
            f"{owner}: batch_size needs the data as the first argument, "
            "model(data, idx), as fit calls it"
        )


class _EncodingOnce:
    """An amortized guide whose encoder runs once for the datapoints of many calls.

    A call is the guide's own two steps,
    :meth:`~pyro_amortized.guides.AutoAmortizedGuide.prepare` then
    :meth:`~pyro_amortized.guides.AutoAmortizedGuide.sample_local`, with the encoder's
    output for the call's context rows kept in between: the next call whose rows are the
    same (the same tensor, or equal, NaNs matching) samples from it without running the
    encoder again. So the chunks of particles of one batch of datapoints, each a call,
    share one encoding. Made under ``torch.no_grad()``, as the estimates here are; an
    encoder that draws at random (dropout in training mode) keeps its first draw.

    Arguments:
        guide: An amortized guide that leaves ``forward`` as the base class has it.
    """

    def __init__(self, guide: AutoAmortizedGuide):
        self.guide = guide
        self._rows: Tensor | None = None
        self._output: EncoderOutput | None = None

    @property
    def local_plate(self) -> str:
        """The guide's plate over datapoints."""
        return self.guide.local_plate

    def median(self, *args, **kwargs) -> dict[str, Tensor]:
        """The guide's :meth:`~pyro_amortized.guides.AutoAmortizedGuide.median`."""
        return self.guide.median(*args, **kwargs)

    def __call__(self, *args, **kwargs) -> dict[str, Tensor]:
        call = self.guide.prepare(*args, **kwargs)
        if self._rows is None or not _same_rows(call.rows, self._rows):
            self._output = self.guide.encode_rows(call.rows)
            self._rows = call.rows
        return self.guide.sample_local(call, self._output)


def _encoding_once(guide: Callable) -> Callable:
    """``guide`` as an :class:`_EncodingOnce` where that is the same guide: an amortized
    guide that does not override ``forward``; any other guide as it is."""
    if isinstance(guide, AutoAmortizedGuide) and type(guide).forward is AutoAmortizedGuide.forward:
        return _EncodingOnce(guide)
    return guide


def _same_rows(a: Tensor, b: Tensor) -> bool:
    if a is b:
        return True
    if a.shape != b.shape or a.dtype != b.dtype or a.device != b.device:
        return False
    return bool(((a == b) | (a.isnan() & b.isnan())).all())


class _SiteBytes(Messenger):
    """Counts the bytes of the storages behind the sample sites' values and distributions
    (their parameters, a base distribution's, a transform's cached values), each storage
    once, over the sites of the calls run inside it."""

    def __init__(self):
        super().__init__()
        self._storages: dict[tuple, int] = {}

    @property
    def nbytes(self) -> int:
        return sum(self._storages.values())

    def _pyro_post_sample(self, msg) -> None:
        for tensor in _tensors((msg["value"], msg["fn"]), depth=4, seen=set()):
            storage = tensor.untyped_storage()
            self._storages[(tensor.device, storage.data_ptr())] = storage.nbytes()


def _tensors(obj, *, depth: int, seen: set):
    """The tensors in ``obj``: itself, or those a distribution, a transform or a container
    holds, ``depth`` levels down (networks' parameters are not per particle: skipped)."""
    if isinstance(obj, Tensor):
        yield obj
        return
    if depth == 0 or id(obj) in seen or isinstance(obj, nn.Module):
        return
    seen.add(id(obj))
    if isinstance(obj, (list, tuple)):
        children = obj
    elif isinstance(obj, dict):
        children = obj.values()
    elif isinstance(obj, (Distribution, Transform)):
        children = vars(obj).values()
    else:
        return
    for child in children:
        yield from _tensors(child, depth=depth - 1, seen=seen)


def _memory_budget_for(device: torch.device | None) -> int:
    """The default ``memory_budget`` for data on ``device`` (the CPU when None)."""
    if device is None or device.type == "cpu":
        return CPU_MEMORY_BUDGET
    return ACCELERATOR_MEMORY_BUDGET


class _ChunkPlan:
    """How many particles each chunk draws: ``chunk_size``, or sized from a budget after
    two probe chunks of 1 and 2 particles (see :func:`log_marginal_likelihood`)."""

    def __init__(self, chunk_size: int | None, memory_budget: int):
        self.size = chunk_size
        self.budget = memory_budget
        self.probes: list[int] = []  # the probe chunks' site bytes, of 1 and 2 particles

    @property
    def probing(self) -> bool:
        return self.size is None

    def next(self, left: int) -> int:
        return min(len(self.probes) + 1 if self.size is None else self.size, left)

    def measured(self, nbytes: int) -> None:
        self.probes.append(nbytes)
        if len(self.probes) == 2:
            one, two = self.probes
            # what a particle adds; the data and the encoder's output do not grow
            per_particle = two - one if two > one else max(two // 2, 1)
            self.size = max(1, self.budget // per_particle)


def _chunked_estimate(
    model: Callable,
    guide: Callable,
    args,
    kwargs,
    *,
    num_samples: int,
    chunk_size: int | None,
    memory_budget: int | None,
    batch_size: int | None,
    local_plate: str | None,
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
    if memory_budget is None:
        memory_budget = _memory_budget_for(data_device(args, kwargs))
    plan = _ChunkPlan(chunk_size, memory_budget)
    # One objective per chunk size; their one-off setup runs draw from a forked RNG, so
    # the estimate's draws are the same whatever the chunking.
    objectives: dict[int, Trace_IWELBO] = {}
    results = []
    with tqdm(
        total=len(batches) * num_samples, desc=desc, unit="draw", disable=not progress
    ) as bar:
        for idx in batches:
            call_args = args if idx is None else (*args, idx)
            total = None
            drawn = 0
            while drawn < num_samples:
                k = plan.next(num_samples - drawn)
                with ExitStack() as stack:
                    counter = stack.enter_context(_SiteBytes()) if plan.probing else None
                    if drawn:
                        # the batch's first chunk ran the checks on these sites and data
                        stack.enter_context(pyro.validation_enabled(False))
                    log_w = _log_weights(
                        objectives, k, local_plate, model, guide, call_args, kwargs
                    )
                if counter is not None:
                    plan.measured(counter.nbytes)
                if reduce == "logmeanexp":
                    chunk = torch.logsumexp(log_w, 0)
                    total = chunk if total is None else torch.logaddexp(total, chunk)
                else:
                    chunk = log_w.sum(0)
                    total = chunk if total is None else total + chunk
                drawn += k
                bar.update(k)
            estimate = (
                total - math.log(num_samples) if reduce == "logmeanexp" else total / num_samples
            )
            results.append(estimate.reshape(-1))
    return torch.cat(results)


def _log_weights(objectives: dict, k: int, local_plate, model, guide, args, kwargs) -> Tensor:
    """One chunk's ``[k, B]`` log-weights, by the chunk size's objective (made on first use)."""
    elbo = objectives.get(k)
    if elbo is None:
        elbo = objectives[k] = Trace_IWELBO(k, local_plate=local_plate)
    state = _rng_state()
    try:
        return elbo.log_weights(model, guide, *args, **kwargs).log_w
    except ParticleVectorizationError:
        # a network that cannot take a particle dimension: loop instead, on the draws
        # the vectorized pass would have had
        _set_rng_state(state)
        elbo = objectives[k] = Trace_IWELBO(k, local_plate=local_plate, vectorize_particles=False)
        return elbo.log_weights(model, guide, *args, **kwargs).log_w


def _rng_state() -> tuple:
    cuda = torch.cuda.get_rng_state() if torch.cuda.is_initialized() else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1])


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
    unconstrained space the guide works in, over all local sites (the columns of the
    guide's ``posterior``): exactly for :class:`~pyro_amortized.AutoAmortizedNormal`,
    and from ``num_samples`` draws per datapoint for a flow guide: the variance
    over datapoints of the draws' averages, less the average variance of those averages,
    an unbiased estimate that may come out slightly negative for an inactive unit.

    Arguments:
        guide: An amortized guide.
        *args: The model's arguments (the datapoints).
        threshold: Activity above which a unit counts as active.
        num_samples: Draws per datapoint for the mean of a flow guide.
        **kwargs: The model's keyword arguments.

    Returns:
        The count, the per-dimension activity and, for the Normal guide, each dimension's mean KL from the posterior to the prior,
        :math:`\mathbb{E}_x \mathrm{KL}(q(z_u \mid x) \,\|\, p(z_u))`: an inactive unit's is
        near 0 (NaN for the coordinates of a site whose support ties them together, such
        as a simplex). The priors come from running the guide's model on the datapoints.

    References:
        Importance Weighted Autoencoders (Burda, Grosse and Salakhutdinov, 2016), Sec. 5.2.
    """
    if not isinstance(guide, AutoAmortizedGuide):
        raise ValueError(
            f"active_units: the guide ({type(guide).__name__}) is not an amortized guide "
            "(one with posterior()); pass an AutoAmortizedNormal, AutoAmortizedIAF or "
            "AutoAmortizedRealNVP"
        )
    if guide.family != "normal":
        # two draws at least: the correction below needs the draws' variance
        check_count("active_units", "num_samples", num_samples, minimum=2)
        draws = guide.posterior(*args, **kwargs).sample((num_samples,))
        means = draws.mean(0)
        # The averages' own variance, var_q / S, would add to the activity (for a unit at the
        # prior, 1 / S: as large as the threshold for S = 100); remove its unbiased estimate.
        noise = draws.var(0).mean(0) / num_samples
        activity = means.var(0, unbiased=False) - noise
        return ActiveUnits(int((activity > threshold).sum()), activity)
    means = guide.posterior(*args, **kwargs).mean
    posteriors = guide.site_posteriors(*args, **kwargs)
    activity = means.var(0, unbiased=False)
    kl = _kl_per_dimension(guide, posteriors, num_samples, args, kwargs)
    return ActiveUnits(int((activity > threshold).sum()), activity, kl)


def _kl_per_dimension(guide, posteriors: dict, num_samples: int, args, kwargs) -> Tensor:
    """Mean over datapoints of KL(q(z_d | x) || p(z_d)) per coordinate of every local site.

    Analytic where torch registers the pair (Normal against Normal), else from
    ``num_samples`` draws. The priors are the model's, run on these datapoints;
    ``posteriors`` is ``guide.site_posteriors``'s result for them.
    """
    with poutine.block(), fork_rng(args):
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        model_trace = poutine.trace(poutine.replay(guide.model, trace=guide_trace)).get_trace(
            *args, **kwargs
        )
    result = []
    for name, q in posteriors.items():
        p = model_trace.nodes[name]["fn"]
        q_dims, p_dims = _elementwise(q), _elementwise(p)
        if q_dims is None:  # a support that ties the coordinates together, e.g. a simplex
            base = q.base_dist if isinstance(q, TransformedDistribution) else q
            width = base.batch_shape[1:].numel() * base.event_shape.numel()
            result.append(
                torch.full((width,), math.nan, dtype=base.mean.dtype, device=base.mean.device)
            )
            continue
        try:
            kl = torch.distributions.kl_divergence(q_dims, p_dims)
        except NotImplementedError:
            z = q_dims.sample((num_samples,))
            kl = (q_dims.log_prob(z) - p_dims.log_prob(z)).mean(0)
        kl = kl.expand(q_dims.batch_shape)
        result.append(kl.reshape(kl.shape[0], -1).mean(0))
    return torch.cat(result)


def _elementwise(d: torch.distributions.Distribution) -> torch.distributions.Distribution | None:
    """``d`` with its coordinates as independent batch elements (None where it cannot be:
    a constrained site whose bijection mixes coordinates)."""
    while isinstance(d, torch.distributions.Independent):
        d = d.base_dist
    if isinstance(d, TransformedDistribution):
        transforms = []
        for t in d.transforms:
            t = _elementwise_transform(t)
            if t is None:
                return None
            transforms.append(t)
        base = _elementwise(d.base_dist)
        return None if base is None else TransformedDistribution(base, transforms)
    return d


def _elementwise_transform(t: Transform) -> Transform | None:
    while isinstance(t, IndependentTransform):
        t = t.base_transform
    if isinstance(t, ComposeTransform):
        parts = [_elementwise_transform(p) for p in t.parts]
        return None if any(p is None for p in parts) else ComposeTransform(parts)
    return t if t.domain.event_dim == 0 and t.codomain.event_dim == 0 else None


class Estimate(NamedTuple):
    """A Monte Carlo estimate and its standard error, in nats."""

    value: float
    se: float

    def __str__(self) -> str:
        return f"{self.value:.3f} ± {self.se:.3f}"


class ElboSurgery(NamedTuple):
    r"""Hoffman and Johnson's split of a data set's average ELBO, each term per datapoint.

    ``elbo = reconstruction - average_kl`` and
    ``average_kl = mutual_information + marginal_kl``, on every draw: the identities hold
    for the estimates, not only for their expectations.

    Attributes:
        elbo: :math:`\frac{1}{N}\sum_n \mathbb{E}_{q(z \mid x_n)}[\log p(x_n, z) - \log q(z \mid x_n)]`.
        reconstruction: :math:`\frac{1}{N}\sum_n \mathbb{E}_{q(z \mid x_n)}[\log p(x_n \mid z)]`.
        average_kl: :math:`\frac{1}{N}\sum_n \mathrm{KL}(q(z \mid x_n) \,\|\, p(z))`.
        mutual_information: The index-code mutual information :math:`I_q[n; z]`, at most
            :math:`\log N`.
        marginal_kl: :math:`\mathrm{KL}(q(z) \,\|\, p(z))`, from the aggregate posterior
            :math:`q(z) = \frac{1}{N}\sum_n q(z \mid x_n)` to the prior.
        num_data: :math:`N`.
        num_samples: Draws per datapoint.
        batch_size: Datapoints per minibatch of the aggregate posterior's estimate
            (:math:`N`: exact).
    """

    elbo: Estimate
    reconstruction: Estimate
    average_kl: Estimate
    mutual_information: Estimate
    marginal_kl: Estimate
    num_data: int
    num_samples: int
    batch_size: int

    def table(self) -> str:
        """A Markdown table of the five estimates with their standard errors."""
        rows = [
            ("ELBO", self.elbo),
            ("reconstruction E log p(x | z)", self.reconstruction),
            ("average KL(q(z | x) ‖ p(z))", self.average_kl),
            ("mutual information I_q[n; z]", self.mutual_information),
            ("marginal KL(q(z) ‖ p(z))", self.marginal_kl),
        ]
        lines = [f"| {self.num_data} datapoints | nats ± SE |", "|---|---|"]
        lines += [f"| {label} | {estimate} |" for label, estimate in rows]
        lines.append(f"| log N, the bound of I_q | {math.log(self.num_data):.3f} |")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """Plain Python numbers, for ``json.dump``."""
        return {
            name: value._asdict() if isinstance(value, Estimate) else value
            for name, value in self._asdict().items()
        }


@torch.no_grad()
def elbo_surgery(
    model: Callable,
    guide: AutoAmortizedGuide,
    *args,
    num_samples: int = 10,
    batch_size: int | None = None,
    progress: bool = False,
    local_plate: str | None = None,
    **kwargs,
) -> ElboSurgery:
    r"""ELBO surgery: a data set's average KL split into mutual information and marginal KL.

    The average ELBO of :math:`N` datapoints is the reconstruction term less the average
    :math:`\mathrm{KL}(q(z \mid x_n) \,\|\, p(z))`, and that average is the index-code mutual
    information :math:`I_q[n; z]` of the joint :math:`q(n, z) = q(z \mid x_n) / N` plus the
    KL from the aggregate posterior :math:`q(z) = \frac{1}{N}\sum_m q(z \mid x_m)` to the
    prior. A collapsed posterior has all three near 0; an encoder that tells datapoints apart
    without matching the prior in aggregate has :math:`I_q` near :math:`\log N` and a large
    marginal KL.

    Each datapoint gets ``num_samples`` draws :math:`z \sim q(z \mid x_n)`. The density
    :math:`\log q(z)` of the aggregate posterior at a draw sums over the datapoints of its
    minibatch: with all :math:`N` datapoints at once (``batch_size=None``) it is exact;
    with minibatches of :math:`M` (a fresh random partition per draw) it is the
    minibatch-stratified estimate
    :math:`\frac{1}{N} q(z \mid x_n) + \frac{N - 1}{N (M - 1)} \sum_{m \ne n} q(z \mid x_m)`,
    unbiased for :math:`q(z)` (its log is biased low by the estimate's relative variance,
    which a larger :math:`M` shrinks). The terms are evaluated in the unconstrained space of
    the guide's :meth:`~pyro_amortized.AutoAmortizedGuide.posterior`, less each draw's
    log-Jacobian, so they are densities of the model's sites. Global latents are fixed at
    the guide's ``median()`` and the model's prior of the local sites must not depend on
    the datapoint (the decomposition's :math:`p(z)` is one prior).

    Standard errors are those of the Monte Carlo draws given the data set:
    :math:`\sqrt{\sum_n \widehat{\mathrm{Var}}_n / S} / N`.

    Arguments:
        model: The model, with a plate over datapoints.
        guide: An amortized guide whose ``posterior`` has a density
            (:class:`~pyro_amortized.AutoAmortizedNormal`,
            :class:`~pyro_amortized.AutoAmortizedIAF`, or
            :class:`~pyro_amortized.AutoAmortizedRealNVP` without its auxiliary variable).
        *args: The model's arguments (the data set).
        num_samples: Draws :math:`S \ge 2` per datapoint.
        batch_size: Datapoints per minibatch, at least 2, following
            :func:`~pyro_amortized.fit`'s convention (the model is called as
            ``model(*args, idx)``); ``None`` takes all at once and the aggregate posterior
            exactly.
        progress: Show a ``tqdm`` progress bar over the draws (on stderr).
        local_plate: The plate over datapoints (None: the guide's, or found).
        **kwargs: The model's keyword arguments.

    Returns:
        An :class:`ElboSurgery`.

    References:
        ELBO surgery: yet another way to carve up the variational evidence lower bound
        (Hoffman and Johnson, 2016).
        Isolating Sources of Disentanglement in Variational Autoencoders (Chen et al., 2018),
        for minibatch-stratified sampling.
        Lagging Inference Networks and Posterior Collapse in Variational Autoencoders
        (He et al., 2019), which reports the three with active units.
    """
    owner = "elbo_surgery"
    if not isinstance(guide, AutoAmortizedGuide):
        raise ValueError(
            f"{owner}: the guide ({type(guide).__name__}) is not an amortized guide; the "
            "aggregate posterior needs q(z | x_m) at every datapoint's draws: pass an "
            "AutoAmortizedNormal, AutoAmortizedIAF or AutoAmortizedRealNVP"
        )
    check_count(owner, "num_samples", num_samples, minimum=2)
    _check_batch_size(owner, batch_size, args, minimum=2)
    model, fixed_guide, local_plate, _ = fix_globals(
        model, guide, args, kwargs, owner=owner, local_plate=local_plate
    )
    if local_plate is None:
        raise ValueError(
            f"{owner}: the model has no plate over datapoints; ELBO surgery splits an "
            "average over datapoints. Name the plate with local_plate="
        )
    objective = Trace_IWELBO(1, local_plate=local_plate)
    num_data = len(args[0]) if batch_size is not None else None
    draws = None  # [S, 5, N]: kept whole, as variances from running sums lose digits
    with tqdm(total=num_samples, desc="ELBO surgery", unit="draw", disable=not progress) as bar:
        for s in range(num_samples):
            if batch_size is None:
                batches = [None]
            else:
                order = torch.randperm(num_data, device=args[0].device)
                batches = list(order.split(batch_size))
                if len(batches) > 1 and len(batches[-1]) == 1:  # M - 1 = 0 leaves no others
                    batches[-2:] = [torch.cat(batches[-2:])]
            for idx in batches:
                call_args = args if idx is None else (*args, idx)
                terms = _surgery_terms(
                    model, fixed_guide, guide, objective, call_args, kwargs, num_data, owner
                )
                if draws is None:
                    num_data = num_data or terms.shape[-1]
                    draws = terms.new_zeros(num_samples, terms.shape[0], num_data)
                draws[s, :, slice(None) if idx is None else idx] = terms
            bar.update()
    totals = draws.mean((0, 2))
    ses = (draws.var(0).sum(1) / num_samples).sqrt() / num_data
    estimates = [Estimate(t.item(), s.item()) for t, s in zip(totals, ses, strict=True)]
    return ElboSurgery(
        *estimates,
        num_data=num_data,
        num_samples=num_samples,
        batch_size=num_data if batch_size is None else min(batch_size, num_data),
    )


def _surgery_terms(
    model, fixed_guide, guide: AutoAmortizedGuide, objective, args, kwargs, num_data, owner
) -> Tensor:
    """One draw for a minibatch: ``[5, M]`` ELBO, reconstruction, average KL, mutual
    information and marginal KL terms of each datapoint (float64)."""
    traced = poutine.trace(fixed_guide)
    terms = objective.log_weights(model, traced, *args, split_prior=True, **kwargs)
    scale = terms.scale
    subsampled = bool((scale != 1).any()) if isinstance(scale, Tensor) else scale != 1
    if num_data is None and subsampled:
        raise ValueError(
            f"{owner}: the plate {terms.local_plate!r} subsamples its datapoints by itself; "
            "pass batch_size= (and the model's idx argument) so every datapoint is seen"
        )
    log_q = terms.guide_local[0].double()
    log_prior = terms.prior_local[0].double()
    log_joint = terms.model_local[0].double()
    trace = traced.trace
    latent = guide.sites_to_latent({name: trace.nodes[name]["value"] for name in guide.local_sites})
    output = guide.encoder_output(*args, **kwargs)
    cross = _cross_log_density(guide, output, latent, owner)  # [n, m]: log q(u_n | x_m)
    batch = cross.shape[0]
    num_data = num_data or batch
    # log |det J| of each draw's map to the sites: what the guide's density of the sites
    # drops from the density of the unconstrained latent
    log_jacobian = cross.diagonal() - log_q
    if batch == num_data:
        weights = cross.new_full((batch, batch), -math.log(num_data))
    else:
        other = math.log(num_data - 1) - math.log(num_data) - math.log(batch - 1)
        weights = cross.new_full((batch, batch), other)
        weights.fill_diagonal_(-math.log(num_data))
    log_aggregate = torch.logsumexp(cross + weights, 1) - log_jacobian
    log_likelihood = log_joint - log_prior
    average_kl = log_q - log_prior
    return torch.stack(
        [
            log_likelihood - average_kl,
            log_likelihood,
            average_kl,
            log_q - log_aggregate,
            log_aggregate - log_prior,
        ]
    )


def _cross_log_density(guide, output, latent: Tensor, owner: str) -> Tensor:
    """``[n, m]`` log-density of datapoint m's posterior at datapoint n's draw, in the
    guide's unconstrained space, a few draws at a time (about 2^24 elements each)."""
    batch, dim = latent.shape[-2:]
    if latent.dim() != 2:
        raise ValueError(f"{owner}: expected one [batch, latent_dim] draw, got {latent.shape}")
    chunk = max(1, 2**24 // (batch * dim))
    rows = []
    for start in range(0, batch, chunk):
        draws = latent[start : start + chunk]
        c = draws.shape[0]
        expanded = EncoderOutput(
            *(None if t is None else t.unsqueeze(0).expand((c,) + t.shape) for t in output)
        )
        q = guide.local_distribution(expanded)
        try:
            rows.append(q.log_prob(draws.unsqueeze(1).expand(c, batch, dim)).double())
        except NotImplementedError as error:
            raise ValueError(
                f"{owner}: {type(guide).__name__}'s posterior q(z | x) has no density "
                f"({error}); the aggregate posterior needs it. The auxiliary flow's q(z | x) "
                "is a marginal over its auxiliary variable: use AutoAmortizedNormal, "
                "AutoAmortizedIAF or AutoAmortizedRealNVP(auxiliary=False)"
            ) from error
    return torch.cat(rows)


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
        refined: Number of refinement steps to ``[N]`` ELBO of the guide refined by
            that many steps (:func:`~pyro_amortized.refinement.refine`).
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
    refined: dict[int, Tensor] = field(default_factory=dict)

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

    def recovered(self, num_steps: int) -> float:
        """The fraction of the mean amortization gap that ``num_steps`` refinement steps
        recover: (mean L[q refined] - mean L[q]) / mean (L[q*] - L[q])."""
        gain = (self.refined[num_steps] - self.elbo).mean()
        return (gain / self.amortization_gap.mean()).item()

    def rows(self) -> list[tuple[str, float]]:
        """Cremer et al.'s Table 1 rows, each a (label, mean over datapoints in nats)."""
        rows = [("log p̂(x)", self.log_px)]
        rows += [(f"L[q*_{name}]", value) for name, value in self.optimal_elbo.items()]
        rows += [(f"L[q], refined {k} steps", value) for k, value in self.refined.items()]
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
        lines += [
            f"| amortization gap recovered by {k} refinement steps | {self.recovered(k):.0%} |"
            for k in self.refined
        ]
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
        per_datapoint.update({f"refined_{k}": v for k, v in self.refined.items()})
        return {
            "family": self.family,
            "num_samples": self.num_samples,
            "elbo_samples": self.elbo_samples,
            "seconds": self.seconds,
            "mean": dict(self.rows()),
            "recovered": {str(k): self.recovered(k) for k in self.refined},
            "per_datapoint": {k: v.tolist() for k, v in per_datapoint.items()},
        }


def gap_table(reports: Mapping[str, InferenceGaps]) -> str:
    """Several reports side by side, one column each, in Cremer et al.'s Table 1 layout.

    Arguments:
        reports: Column heading (e.g. the model's name) to its :class:`InferenceGaps`.

    Returns:
        A Markdown table of means in nats; a row a report lacks (a family it did not fit)
        is left blank there.
    """
    columns = {name: dict(report.rows()) for name, report in reports.items()}
    labels = list(dict.fromkeys(label for rows in columns.values() for label in rows))
    lines = ["| | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for label in labels:
        cells = [f"{rows[label]:.2f}" if label in rows else "" for rows in columns.values()]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def inference_gaps(
    model: Callable,
    guide: AutoAmortizedGuide,
    *args,
    families: Sequence[str] = ("normal", "flow"),
    num_samples: int = 5000,
    elbo_samples: int = 1000,
    chunk_size: int | None = None,
    memory_budget: int | None = None,
    local_options: LocalOptions | Mapping | None = None,
    refine_steps: Sequence[int] = (),
    refine_options: RefineOptions | Mapping | None = None,
    progress: bool = True,
    **kwargs,
) -> InferenceGaps:
    r"""The approximation and amortization gaps of an amortized guide on some datapoints.

    For the datapoints in the model's arguments: :math:`\mathcal{L}[q]` (the ELBO of the
    guide, from ``elbo_samples`` draws), and for each family the best posterior fitted to
    each datapoint on its own (:func:`~pyro_amortized.perdatapoint.optimize_local`) with
    its ELBO :math:`\mathcal{L}[q^*]`; :math:`\log \hat p(x)` is the highest of the IWAE
    estimates (``num_samples`` draws) with :math:`q` and each :math:`q^*` as proposals,
    as Cremer et al. take the best estimate available. Each estimate is a lower bound in
    expectation only. A proposal narrower than the posterior has heavy-tailed weights:
    its estimate converges slowly (on a correlated linear-Gaussian posterior, IWAE-4000
    from the mean-field optimum fell 0.026 nats short, which shrinks the approximation
    gap by as much), and a single estimate can overshoot, which the best one inherits.
    Global latents are fixed at the guide's median throughout (see
    :func:`log_marginal_likelihood`).

    The gaps are split with the guide's own family (its ``family``: ``"normal"`` for
    :class:`~pyro_amortized.AutoAmortizedNormal`, ``"flow"`` for
    :class:`~pyro_amortized.AutoAmortizedRealNVP`, ``"iaf"`` for
    :class:`~pyro_amortized.AutoAmortizedIAF`), which is fitted even when ``families``
    leaves it out; the other families' :math:`\mathcal{L}[q^*]` are reported beside it.

    Arguments:
        model: The model (called with all its datapoints at once).
        guide: An amortized guide.
        *args: The model's arguments.
        families: Families of the per-datapoint posteriors :math:`q^*`, among
            ``"normal"``, ``"flow"`` and ``"iaf"``.
        num_samples: Samples of every IWAE estimate of :math:`\log p(x)`.
        elbo_samples: Samples of every ELBO estimate.
        chunk_size: Samples drawn per pass; ``None`` sizes the chunks from
            ``memory_budget``, as :func:`log_marginal_likelihood` does.
        memory_budget: As for :func:`log_marginal_likelihood`.
        local_options: The per-datapoint fits' options, a
            :class:`~pyro_amortized.perdatapoint.LocalOptions` or a dict of its fields
            (``init``, ``num_particles``, ``lr``, ``max_steps``, ``patience``,
            ``num_transforms``, ``flow_hidden_dims``; ``family`` is each of ``families``).
            A flow :math:`q^*` of the guide's own family copies the guide's flow.
        refine_steps: Numbers of refinement steps whose bound to report, beside
            :math:`\mathcal{L}[q]`: how much of the amortization gap that many steps of
            :func:`~pyro_amortized.refinement.refine` from the encoder recover.
        refine_options: Refinement's options, a
            :class:`~pyro_amortized.refinement.RefineOptions` or a dict of its fields
            (``lr``, ``optimizer``, ``num_particles``, ...; ``num_steps`` is each of
            ``refine_steps``).
        progress: Show progress bars.
        **kwargs: The model's keyword arguments.

    The old keywords of the per-datapoint fits (``init=``, ``num_particles=``, ``lr=``,
    ``max_steps=``, ``patience=``, ``num_flows=``, ``flow_hidden_dims=``) still work for
    one release, with a ``FutureWarning``.

    Returns:
        An :class:`InferenceGaps` report.

    References:
        Inference Suboptimality in Variational Autoencoders (Cremer, Li and Duvenaud, 2018).
    """
    began = time.perf_counter()
    owner = "inference_gaps"
    families = tuple(families) if not isinstance(families, str) else (families,)
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        raise ValueError(f"{owner}: families must be among {FAMILIES}, got {unknown} in {families}")
    if not isinstance(guide, AutoAmortizedGuide):
        raise ValueError(
            f"{owner}: the guide ({type(guide).__name__}) is not an AutoAmortizedNormal, "
            "AutoAmortizedRealNVP or AutoAmortizedIAF"
        )
    own = guide.family
    families = tuple(dict.fromkeys((own, *families)))  # the guide's own first, no repeats
    check_counts(owner, num_samples=num_samples, elbo_samples=elbo_samples)
    _check_chunking(owner, chunk_size, memory_budget)
    # checked here, so that a bad option fails before the IWAE estimates, not after
    local = _options_with_old_keywords(LocalOptions, owner, local_options, kwargs, _OLD_LOCAL)
    local = dataclasses.replace(local, family=own)
    if refine_options is not None and not isinstance(refine_options, RefineOptions):
        refine_options = dict(refine_options)
        if "step_size" in refine_options:
            refine_options["lr"] = renamed(
                owner, "step_size", "lr", refine_options.pop("step_size")
            )
        unknown = sorted(set(refine_options) - set(_RefineFields))
        if unknown:
            raise ValueError(
                f"{owner}: refine_options has {unknown}; refine takes {sorted(_RefineFields)}"
            )
    refine_base = options_from(RefineOptions, owner, refine_options)
    refinements = {
        k: options_from(RefineOptions, owner, {**dataclasses.asdict(refine_base), "num_steps": k})
        for k in refine_steps
    }
    fixed = fix_globals(model, guide, args, kwargs, owner=owner)
    fixed_model, _, local_plate, globals_ = fixed
    # the same globals, with the encoder run once for all chunks
    proposal = _encoding_once(guide)
    encoded_once = proposal is not guide
    fixed_guide = fix_globals(model, proposal, args, kwargs, owner=owner).guide

    def estimate(m, g, samples, reduce, desc, encoded_once=False):
        return _chunked_estimate(
            m,
            g,
            args,
            kwargs,
            num_samples=samples,
            chunk_size=_chunk_size(chunk_size, memory_budget, encoded_once),
            memory_budget=memory_budget,
            batch_size=None,
            local_plate=local_plate,
            reduce=reduce,
            desc=desc,
            progress=progress,
        )

    with torch.no_grad():
        elbo = estimate(fixed_model, fixed_guide, elbo_samples, "mean", "L[q]", encoded_once)
        iwae = {
            "amortized": estimate(
                fixed_model, fixed_guide, num_samples, "logmeanexp", "IWAE q", encoded_once
            )
        }
    optimal, steps = {}, {}
    for family in families:
        options = dataclasses.replace(local, family=family)
        local_fit = fit_local(fixed, guide, args, kwargs, options, progress=progress)
        steps[family] = local_fit.steps
        with torch.no_grad():
            optimal[family] = estimate(
                fixed_model, local_fit.guide, elbo_samples, "mean", f"L[q*_{family}]"
            )
            iwae[family] = estimate(
                fixed_model, local_fit.guide, num_samples, "logmeanexp", f"IWAE q*_{family}"
            )
    refined = {}
    for k, options in refinements.items():
        r = refine_with(model, guide, args, kwargs, options)
        with torch.no_grad():
            refined[k] = estimate(r.model, r.guide, elbo_samples, "mean", f"L[q], {k} steps")
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
        refined=refined,
    )


# inference_gaps' keywords before LocalOptions: (old name, field)
_OLD_LOCAL = {
    "init": "init",
    "num_particles": "num_particles",
    "lr": "lr",
    "max_steps": "max_steps",
    "patience": "patience",
    "num_flows": "num_transforms",
    "flow_hidden_dims": "flow_hidden_dims",
}
_RefineFields = tuple(f.name for f in dataclasses.fields(RefineOptions) if f.name != "num_steps")


def _options_with_old_keywords(cls, owner: str, options, kwargs: dict, old: Mapping[str, str]):
    """``options`` (an instance, a dict of fields or None), with the deprecated flat
    keywords of ``old`` taken out of ``kwargs`` (the model's) and merged in, each after a
    ``FutureWarning``."""
    given = {name: kwargs.pop(name) for name in list(kwargs) if name in old}
    if not given:
        return options_from(cls, owner, options)
    values = dataclasses.asdict(options) if isinstance(options, cls) else dict(options or {})
    for name, value in given.items():
        field_name = old[name]
        if field_name in values and not isinstance(options, cls):
            raise ValueError(
                f"{owner}: {name}= and local_options[{field_name!r}] both given; pass "
                f"local_options={{{field_name!r}: ...}} only"
            )
        warnings.warn(
            f"{owner}: {name}= is deprecated and will be removed in the next release; pass "
            f"local_options={{{field_name!r}: ...}} (a {cls.__name__} field)",
            FutureWarning,
            stacklevel=3,
        )
        values[field_name] = value
    return options_from(cls, owner, values)
