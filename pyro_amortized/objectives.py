r"""Importance-weighted bounds with per-datapoint log-sum-exp and low-variance estimators."""

from __future__ import annotations

import functools
import itertools
import math
import types
from collections.abc import Callable
from typing import NamedTuple

import torch
from pyro import poutine
from pyro.distributions import Delta
from pyro.infer import ELBO
from pyro.infer.util import torch_item
from pyro.poutine.broadcast_messenger import BroadcastMessenger
from pyro.poutine.indep_messenger import CondIndepStackFrame
from pyro.poutine.messenger import Messenger
from pyro.poutine.subsample_messenger import _Subsample
from torch import Tensor, nn
from torch.distributions import Bernoulli, Distribution, Independent
from torch.distributions.transforms import Transform, _InverseTransform
from torch.distributions.utils import _sum_rightmost, broadcast_all
from torch.nn import functional as F

__all__ = ["ESTIMATORS", "Trace_IWELBO"]

#: Gradient estimators of :class:`Trace_IWELBO`.
ESTIMATORS = ("iwae", "stl", "dreg")

PARTICLE_PLATE = "num_particles_vectorized"


class _LocalParticlePlate(Messenger):
    """Adds a particle dimension to the sites inside the local plate, and only to them.

    Global sites stay un-batched, so one draw of the globals is shared by all particles.
    """

    def __init__(self, local_plate: str, size: int, dim: int):
        super().__init__()
        self.local_plate = local_plate
        self.frame = CondIndepStackFrame(PARTICLE_PLATE, dim, size, 0)

    def _pyro_sample(self, msg) -> None:
        stack = msg["cond_indep_stack"]
        if any(f.name == self.local_plate for f in stack):
            msg["cond_indep_stack"] = (self.frame,) + stack
            BroadcastMessenger._pyro_sample(msg)


def _stop_transform(transform: Transform, site: str) -> Transform:
    """A copy of ``transform`` whose parameters are detached and whose cache is off.

    The cache must go: a cached inverse hands back the pre-image tensor itself, and the
    gradient would then skip the sampled value on its way to the guide's parameters.
    """
    if isinstance(transform, _InverseTransform):
        return _stop_transform(transform._inv, site).inv
    if isinstance(transform, nn.Module) and next(transform.parameters(), None) is not None:
        _refuse_module(transform, site)  # a TransformModule with parameters of its own
    new = object.__new__(type(transform))
    state = new.__dict__
    for key, value in vars(transform).items():
        if isinstance(value, types.MethodType) and value.__self__ is transform:
            # a method chosen in __init__ (Pyro's stable IAF sets _call and _inverse so)
            # must run on the copy, or it would use the original's unstopped network
            state[key] = types.MethodType(value.__func__, new)
        elif key not in ("_inv", "_cached_x_y"):
            state[key] = _stop_value(value, site)
    if "_cache_size" in state:
        state["_cache_size"] = 0
        state["_cached_x_y"] = (None, None)
    state["_inv"] = None
    return new


def _stop_value(value, site: str):
    if isinstance(value, Tensor):
        return value.detach()
    if isinstance(value, Distribution):
        return _stop_distribution(value, site)
    if isinstance(value, Transform):
        return _stop_transform(value, site)
    if isinstance(value, (list, tuple)) and any(isinstance(v, Transform) for v in value):
        return type(value)(_stop_value(v, site) for v in value)
    if isinstance(value, nn.Module):
        _refuse_module(value, site)
    if isinstance(value, functools.partial) and (
        isinstance(value.func, nn.Module)
        or any(isinstance(v, nn.Module) for v in (*value.args, *value.keywords.values()))
    ):
        # A conditioned Pyro flow holds its network as partial(module, context=h).
        stopped = functools.partial(
            _StoppedCall(value.func, site),
            *(_stop_value(v, site) for v in value.args),
            **{k: _stop_value(v, site) for k, v in value.keywords.items()},
        )
        stopped.__dict__.update(value.__dict__)  # e.g. the permutation Pyro attaches
        return stopped
    return value


class _StoppedCall:
    """Calls a module with its parameters and buffers detached (``torch.func``)."""

    __slots__ = ("module", "state")

    def __init__(self, module, site: str):
        if not isinstance(module, nn.Module):
            _refuse_module(module, site)
        self.module = module
        tensors = itertools.chain(module.named_parameters(), module.named_buffers())
        self.state = {name: t.detach() for name, t in tensors}

    def __call__(self, *args, **kwargs):
        return torch.func.functional_call(self.module, self.state, args, kwargs)


def _refuse_module(module, site: str) -> None:
    raise ValueError(
        f"Trace_IWELBO: guide site '{site}' has a distribution holding an nn.Module "
        f"({type(module).__name__}), whose parameters cannot be stopped; estimator='stl' "
        "and 'dreg' need distributions built from tensors, or conditioned on a network "
        "held as functools.partial(module, ...) as Pyro's conditional flows are. Use "
        "estimator='iwae'."
    )


def _stop_distribution(fn: Distribution, site: str) -> Distribution:
    """``fn`` with every parameter detached: log q(z; stop_gradient(phi)) as a function of z.

    A ``Delta`` is kept as it is: its log-density (the Jacobian of a reparameterization,
    as in Pyro's autoguides) depends on parameters only through the sampled values.
    """
    if isinstance(fn, Delta):
        return fn
    new = object.__new__(type(fn))
    new.__dict__.update({k: _stop_value(v, site) for k, v in vars(fn).items()})
    return new


def _independent_bernoulli_log_prob(fn: Independent, value: Tensor) -> Tensor:
    """``fn.log_prob(value)``, negating after the event sum instead of before.

    Torch negates the elementwise loss over the full ``[K, B, pixels]`` tensor, the largest
    one in a binary-image VAE, forwards and backwards. Negation is exact in floating point,
    so summing first gives the bitwise identical result with two passes fewer.
    """
    base = fn.base_dist
    if base._validate_args:
        base._validate_sample(value)
    logits, value = broadcast_all(base.logits, value)
    loss = F.binary_cross_entropy_with_logits(logits, value, reduction="none")
    return -_sum_rightmost(loss, fn.reinterpreted_batch_ndims)


def _log_prob(site) -> Tensor:
    fn = site["fn"]
    if (
        isinstance(fn, Independent)
        and type(fn).log_prob is Independent.log_prob
        and isinstance(fn.base_dist, Bernoulli)
        and type(fn.base_dist).log_prob is Bernoulli.log_prob
        and not site["args"]
        and not site["kwargs"]
    ):
        log_p = _independent_bernoulli_log_prob(fn, site["value"])
    else:
        log_p = fn.log_prob(site["value"], *site["args"], **site["kwargs"])
    mask = site["mask"]
    if mask is None or mask is True:
        return log_p
    if mask is False:
        return torch.zeros_like(log_p)
    return torch.where(mask, log_p, log_p.new_zeros(()))


def _reads_particles(site, log_p: Tensor, K: int) -> bool:
    """Whether a site outside the local plate has a batch dimension of size K that none of
    its plates accounts for: it got the particle dimension from a local latent it reads."""
    plates = {f.dim: f.size for f in site["cond_indep_stack"] if f.vectorized}
    return any(
        size == K and plates.get(dim) != K
        for dim, size in zip(range(-log_p.dim(), 0), log_p.shape, strict=True)
    )


def _coupled_error(site: str | None, local: str) -> ValueError:
    where = f"site '{site}'" if site is not None else "a model site"
    return ValueError(
        f"Trace_IWELBO: {where} is outside plate '{local}' but depends on its latents "
        "(its log-density changes from particle to particle), so the datapoints' "
        "importance weights do not factorize; the per-datapoint bound needs every site that "
        f"reads a latent of plate '{local}' inside that plate. For latents coupled across "
        "datapoints (a game between two players, say) use num_particles=1 or Pyro's "
        "Trace_ELBO / TraceMeanField_ELBO."
    )


def _is_one(scale) -> bool:
    return isinstance(scale, (int, float)) and scale == 1.0


def _per_datapoint(log_p: Tensor, particle_dim: int, data_dim: int) -> Tensor:
    """Sums a site's log-density over every batch dim but (particle, datapoint): ``[K, B]``."""
    if not isinstance(log_p, Tensor):
        log_p = torch.as_tensor(log_p)
    if log_p.dim() < -particle_dim:
        log_p = log_p.reshape((1,) * (-particle_dim - log_p.dim()) + log_p.shape)
    other = [d for d in range(-log_p.dim(), 0) if d != particle_dim and d != data_dim]
    return log_p.sum(other) if other else log_p


class _Terms(NamedTuple):
    model_local: Tensor  # [K, B] log p(x_i, z_ik | beta), unscaled
    guide_local: Tensor  # [K, B] log q(z_ik | x_i), unscaled
    model_global: Tensor | float  # scalar, scaled; 0.0 without global sites
    guide_global: Tensor | float  # scalar, scaled; 0.0 without global sites
    # the latent sites' share of model_local and model_global (log-priors), tracked only
    # when kl_weight != 1; 0.0 otherwise
    prior_local: Tensor | float
    prior_global: Tensor | float
    outer_scale: float | Tensor  # subsample scale (and any scale common to all local sites)
    # guide samples that carry DReG's per-particle weights: (value, data dim, event dim,
    # particle index for looped particles or None when the value has a particle dim)
    local_values: list[tuple[Tensor, int, int, int | None]]


class Trace_IWELBO(ELBO):
    r"""The importance-weighted evidence lower bound, per datapoint, with shared globals.

    For datapoints :math:`i` of the local plate, :math:`K` particles and global latents
    :math:`\beta` drawn once and shared by all particles:

    .. math::

        \mathcal{L} = \mathbb{E}_{q(\beta)}\Big[\log p(\beta) - \log q(\beta)
            + \sum_i s \log \frac{1}{K} \sum_k w_{ik}(\beta)\Big],\qquad
        w_{ik} = \frac{p(x_i, z_{ik} \mid \beta)}{q(z_{ik} \mid x_i)},

    with **unscaled** log-densities inside the log-sum-exp and the subsample scale
    :math:`s = N / B` outside it. Scales that apply equally to every site of the local
    plate (such as a ``poutine.scale`` on the whole model) go outside as well; a scale on
    one site (say a KL warm-up on the prior) weights that site inside. With :math:`K = 1`
    the value and the gradients equal :class:`~pyro.infer.Trace_ELBO`'s.

    The estimator changes only the guide's gradients; the model's gradients are the
    standard IWAE ones whatever the estimator:

    - ``"iwae"``: the reparameterized gradient of the bound (Burda et al.).
    - ``"stl"``: "sticking the landing", :math:`\log q` evaluated with the guide's
      parameters stopped, which drops the score term (Roeder et al.).
    - ``"dreg"``: doubly reparameterized, the stopped-:math:`\log q` path term weighted by
      squared normalized weights (Tucker et al.). It assumes, as every guide of this
      package does, that the local sites are independent given the context.

    At the exact posterior the ``"stl"`` and ``"dreg"`` guide gradients are exactly zero.

    The bound needs each datapoint's likelihood to read only its own latents. A model site
    outside the local plate that reads the plate's latents (a game between two players
    of a ``"players"`` plate, say) couples the datapoints, so no per-datapoint weight
    exists: with ``num_particles > 1`` such a site raises ``ValueError``. One particle is
    the plain ELBO, which is right for coupled latents too.

    Arguments:
        num_particles: Number of importance samples :math:`K` per datapoint.
        estimator: One of ``"iwae"``, ``"stl"``, ``"dreg"``.
        vectorize_particles: Draw the particles in one vectorized pass (a particle
            dimension left of every plate) rather than a Python loop.
        max_plate_nesting: Bound on the number of nested plates; guessed from one run of
            the model and guide when left infinite.
        entropy_weight: :math:`\lambda` multiplying :math:`\log q` (an attribute that
            a schedule may set between steps; 1 is the bound). Cremer et al.'s entropy
            annealing takes it from 0 to 1.
        kl_weight: :math:`\beta` multiplying the latent sites' log-priors and
            :math:`\lambda \log q` together, so each weight is
            :math:`p(x \mid z) \, (p(z) / q(z)^{\lambda})^{\beta}` (global sites
            likewise); the observed sites keep weight 1. An attribute for KL warm-up
            schedules (0 to 1); 1 is the bound.
        local_plate: Name of the plate over datapoints. Defaults to the guide's
            ``local_plate`` attribute, else the plate that holds every observed site and
            a latent site.
        retain_graph: As in :class:`~pyro.infer.ELBO`.

    Example:
        >>> elbo = Trace_IWELBO(num_particles=5, estimator="dreg")
        >>> svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": 1e-3}), elbo)  # doctest: +SKIP

    References:
        Importance Weighted Autoencoders (Burda, Grosse and Salakhutdinov, 2016).
        Sticking the Landing: Simple, Lower-Variance Gradient Estimators for
        Variational Inference (Roeder, Wu and Duvenaud, 2017).
        Doubly Reparameterized Gradient Estimators for Monte Carlo Objectives
        (Tucker, Lawson, Gu and Maddison, 2019).
    """

    def __init__(
        self,
        num_particles: int = 1,
        *,
        estimator: str = "iwae",
        vectorize_particles: bool = True,
        max_plate_nesting: float = float("inf"),
        entropy_weight: float = 1.0,
        kl_weight: float = 1.0,
        local_plate: str | None = None,
        retain_graph: bool | None = None,
    ):
        if (
            isinstance(num_particles, bool)
            or not isinstance(num_particles, int)
            or num_particles < 1
        ):
            raise ValueError(
                f"Trace_IWELBO: num_particles must be an int >= 1, got {num_particles!r}"
            )
        if estimator not in ESTIMATORS:
            raise ValueError(
                f"Trace_IWELBO: unknown estimator {estimator!r}; choose one of "
                + ", ".join(repr(e) for e in ESTIMATORS)
            )
        if not max_plate_nesting >= 0:
            raise ValueError(
                f"Trace_IWELBO: max_plate_nesting must be >= 0, got {max_plate_nesting!r}"
            )
        if not isinstance(entropy_weight, (int, float)) or not entropy_weight >= 0:
            raise ValueError(f"Trace_IWELBO: entropy_weight must be >= 0, got {entropy_weight!r}")
        if not isinstance(kl_weight, (int, float)) or not kl_weight >= 0:
            raise ValueError(f"Trace_IWELBO: kl_weight must be >= 0, got {kl_weight!r}")
        super().__init__(
            num_particles=num_particles,
            max_plate_nesting=max_plate_nesting,
            vectorize_particles=vectorize_particles,
            retain_graph=retain_graph,
        )
        self.estimator = estimator
        self.entropy_weight = float(entropy_weight)
        self.kl_weight = float(kl_weight)
        self.local_plate = local_plate
        self._plate_nesting = max_plate_nesting  # without the particle dimension
        self._setup_for: tuple | None = None

    # ----------------------------------------------------------------- setup
    def _setup(self, model: Callable, guide: Callable, args, kwargs) -> None:
        """One unbatched run of model and guide: plate nesting and the local plate's name.

        The run leaves torch's RNG as it found it, so the draws of a computation do not
        depend on whether this objective had been set up before (a resumed run's first
        validation, say).
        """
        cuda = [torch.cuda.current_device()] if torch.cuda.is_initialized() else []
        with torch.random.fork_rng(cuda), poutine.block():
            guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
            model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(
                *args, **kwargs
            )
        frames = {}
        for trace in (model_trace, guide_trace):
            for site in trace.nodes.values():
                if site["type"] == "sample":
                    for frame in site["cond_indep_stack"]:
                        frames.setdefault(frame.name, frame)
        if self._plate_nesting == float("inf"):
            dims = [f.dim for f in frames.values() if f.vectorized]
            self._plate_nesting = -min(dims) if dims else 0

        name = self.local_plate or getattr(guide, "local_plate", None)
        if name is None:
            name = self._infer_local_plate(model_trace, guide_trace)
        if name not in frames:
            found = ", ".join(repr(n) for n in sorted(frames)) or "none"
            raise ValueError(
                f"Trace_IWELBO: the model has no plate named '{name}' (plates found: {found}); "
                "pass local_plate= the name of the plate over datapoints."
            )
        if not frames[name].vectorized:
            raise ValueError(
                f"Trace_IWELBO: plate '{name}' is sequential; the per-datapoint log-sum-exp "
                "needs a vectorized plate."
            )
        self._local_name = name
        self._setup_for = (model, guide)

    @staticmethod
    def _infer_local_plate(model_trace, guide_trace) -> str:
        observed = [
            {f.name for f in s["cond_indep_stack"] if f.vectorized}
            for s in model_trace.nodes.values()
            if s["type"] == "sample" and s["is_observed"] and not isinstance(s["fn"], _Subsample)
        ]
        common = set.intersection(*observed) if observed else set()
        latent = {
            f.name
            for s in guide_trace.nodes.values()
            if s["type"] == "sample" and not isinstance(s["fn"], _Subsample)
            for f in s["cond_indep_stack"]
        }
        candidates = sorted(common & latent)
        if len(candidates) != 1:
            found = ", ".join(repr(c) for c in candidates) or "none"
            raise ValueError(
                "Trace_IWELBO: cannot tell which plate runs over datapoints (candidates "
                f"holding every observed site and a latent site: {found}); pass local_plate=."
            )
        return candidates[0]

    # ------------------------------------------------------------- the bound
    def _particle_dim(self) -> int:
        return -int(self._plate_nesting) - 1

    def _traces(self, model, guide, args, kwargs, shared=None):
        """Guide then model traces; ``shared`` sites (globals, minibatch) are replayed."""
        K = self.num_particles
        if K > 1 and self.vectorize_particles:
            plate = _LocalParticlePlate(self._local_name, K, self._particle_dim())
            model, guide = plate(model), plate(guide)
        if shared is not None:
            guide = poutine.replay(guide, trace=shared)
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(
            *args, **kwargs
        )
        return model_trace, guide_trace

    def _get_trace(self, model, guide, args, kwargs):
        """One (model trace, guide trace) pair, particles included (Pyro's ELBO interface)."""
        if self._setup_for is None:
            self._setup(model, guide, args, kwargs)
        return self._traces(model, guide, args, kwargs)

    def _terms(self, model_trace, guide_trace, stopped: bool) -> _Terms:
        """Log-densities split into per-(particle, datapoint) local parts and global sums."""
        local = self._local_name
        particle_dim = self._particle_dim()
        data_dim = None
        local_scales = []
        local_sites = []  # (log_p, is_model, is_prior)
        model_global = guide_global = prior_global = 0.0
        track_prior = self.kl_weight != 1.0
        K = self.num_particles
        coupled_check = K > 1 and self.vectorize_particles
        local_values = []
        frames = {}
        for is_model, trace in ((True, model_trace), (False, guide_trace)):
            for name, site in trace.nodes.items():
                if site["type"] != "sample" or isinstance(site["fn"], _Subsample):
                    continue
                if not is_model and not site["is_observed"]:
                    fn = site["fn"]
                    if not fn.has_rsample:
                        raise ValueError(
                            f"Trace_IWELBO: guide site '{name}' ({type(fn).__name__}) cannot be "
                            "reparameterized; importance-weighted bounds here need "
                            "reparameterized guide samples."
                        )
                    if stopped:
                        site = dict(site, fn=_stop_distribution(fn, name))
                frame = next((f for f in site["cond_indep_stack"] if f.name == local), None)
                log_p = _log_prob(site)
                is_prior = track_prior and is_model and not site["is_observed"]
                if frame is None:
                    if is_model and coupled_check and _reads_particles(site, log_p, K):
                        raise _coupled_error(name, local)
                    scale = site["scale"]
                    total = log_p.sum() if _is_one(scale) else (log_p * scale).sum()
                    if is_model:
                        model_global = model_global + total
                        if is_prior:
                            prior_global = prior_global + total
                    else:
                        guide_global = guide_global + total
                    continue
                data_dim = frame.dim
                frames[is_model] = frame
                local_scales.append(site["scale"])
                local_sites.append((log_p, is_model, is_prior))
                if not is_model and not isinstance(site["fn"], Delta):
                    local_values.append((site["value"], frame.dim, site["fn"].event_dim, None))
        if data_dim is None:
            raise ValueError(
                f"Trace_IWELBO: no sample site is inside plate '{local}' in this call."
            )

        sizes = {k: (f.size, f.full_size or f.size) for k, f in frames.items()}
        if len(sizes) == 2 and sizes[True] != sizes[False]:
            model_frame, guide_frame = frames[True], frames[False]
            raise ValueError(
                f"Trace_IWELBO: plate '{local}' has size {guide_frame.full_size} (minibatch "
                f"{guide_frame.size}) in the guide but {model_frame.full_size} (minibatch "
                f"{model_frame.size}) in the model; an amortized guide sizes the plate from "
                "its context, which needs one row per datapoint."
            )
        first = local_scales[0]
        if all(isinstance(s, (int, float)) and s == first for s in local_scales):
            outer = first
            inner = [None] * len(local_sites)
        else:
            frame = frames.get(True) or frames[False]
            subsample = frame.full_size / frame.size if frame.full_size else 1.0
            outer = subsample
            inner = [s / subsample for s in local_scales]

        model_local = guide_local = prior_local = 0.0
        for (log_p, is_model, is_prior), inner_scale in zip(local_sites, inner, strict=True):
            if inner_scale is not None:
                log_p = log_p * inner_scale
            log_p = _per_datapoint(log_p, particle_dim, data_dim)
            if is_model:
                model_local = model_local + log_p
                if is_prior:
                    prior_local = prior_local + log_p
            else:
                guide_local = guide_local + log_p
        return _Terms(
            torch.as_tensor(model_local),
            torch.as_tensor(guide_local),
            model_global,
            guide_global,
            prior_local,
            prior_global,
            outer,
            local_values,
        )

    def _collect(self, model, guide, args, kwargs, stopped: bool) -> _Terms:
        if (
            self._setup_for is None
            or self._setup_for[0] is not model
            or self._setup_for[1] is not guide
        ):
            self._setup(model, guide, args, kwargs)
        if self.vectorize_particles or self.num_particles == 1:
            model_trace, guide_trace = self._traces(model, guide, args, kwargs)
            return self._terms(model_trace, guide_trace, stopped)
        return self._collect_sequential(model, guide, args, kwargs, stopped)

    def _collect_sequential(self, model, guide, args, kwargs, stopped: bool) -> _Terms:
        """Particles in a Python loop; globals and the minibatch are replayed from the first."""
        model_trace, guide_trace = self._traces(model, guide, args, kwargs)
        first = self._terms(model_trace, guide_trace, stopped)
        shared = guide_trace.copy()
        for name, site in list(shared.nodes.items()):
            if site["type"] == "sample" and any(
                f.name == self._local_name for f in site["cond_indep_stack"]
            ):
                shared.remove_node(name)
        model_local, guide_local = [first.model_local], [first.guide_local]
        prior_local = [first.prior_local]
        values = [v[:3] + (0,) for v in first.local_values]
        for k in range(1, self.num_particles):
            model_trace, guide_trace = self._traces(model, guide, args, kwargs, shared)
            terms = self._terms(model_trace, guide_trace, stopped)
            if not torch.equal(
                torch.as_tensor(terms.model_global), torch.as_tensor(first.model_global)
            ):
                # the globals are replayed, so only a site that reads the local latents
                # can change its log-density between particles
                raise _coupled_error(None, self._local_name)
            model_local.append(terms.model_local)
            guide_local.append(terms.guide_local)
            prior_local.append(terms.prior_local)
            values += [v[:3] + (k,) for v in terms.local_values]
        return first._replace(
            model_local=torch.cat(model_local),
            guide_local=torch.cat(guide_local),
            prior_local=torch.cat(prior_local) if isinstance(prior_local[0], Tensor) else 0.0,
            local_values=values,
        )

    def _bound(self, terms: _Terms) -> tuple[Tensor, Tensor]:
        """The bound and the per-(particle, datapoint) log-weights."""
        # Scalar ops on autograd tensors cost microseconds each; skip the ones that do nothing.
        lam, beta = self.entropy_weight, self.kl_weight
        guide_local = terms.guide_local if lam == 1.0 else lam * terms.guide_local
        log_w = terms.model_local - guide_local
        if beta != 1.0:  # log p(x | z) + beta (log p(z) - lam log q(z))
            log_w = log_w - (1.0 - beta) * (terms.prior_local - guide_local)
        K = self.num_particles
        local = torch.logsumexp(log_w, 0) - math.log(K) if K > 1 else log_w[0]
        bound = local.sum()
        if not _is_one(terms.outer_scale):
            bound = bound * terms.outer_scale
        if isinstance(terms.model_global, Tensor):
            bound = bound + terms.model_global - (1.0 - beta) * terms.prior_global
        if isinstance(terms.guide_global, Tensor):
            bound = bound - beta * lam * terms.guide_global
        return bound, log_w

    def _add_dreg_hooks(self, terms: _Terms, log_w: Tensor) -> None:
        """Multiplies the gradient reaching each local sample by its particle's weight.

        The surrogate's log-sum-exp already weights each particle's path term by its
        normalized weight; the hook supplies the second factor of DReG's squared weights.
        Only the guide's parameters sit behind the samples, so the model's gradients are
        untouched.
        """
        weights = torch.softmax(log_w.detach(), dim=0)  # [K, B]
        # A particle whose squared weight is below eps^4 cannot move the gradient, but its
        # products would be subnormal floats, which the CPU handles ~100x slower.
        negligible = torch.finfo(weights.dtype).eps ** 2
        weights = weights.masked_fill(weights < negligible, 0.0)
        particle_dim = self._particle_dim()
        for value, data_dim, event_dim, particle in terms.local_values:
            if not value.requires_grad:
                continue
            w = weights if particle is None else weights[particle]
            batch_end = value.dim() - event_dim
            shape = [1] * value.dim()
            shape[batch_end + data_dim] = w.shape[-1]
            if particle is None:
                shape[batch_end + particle_dim] = w.shape[0]
            value.register_hook(_ScaleGrad(w.reshape(shape)))

    def differentiable_loss(self, model: Callable, guide: Callable, *args, **kwargs) -> Tensor:
        """The negative bound, differentiable; its gradient is the chosen estimator's."""
        stopped = self.estimator != "iwae"
        terms = self._collect(model, guide, args, kwargs, stopped)
        bound, log_w = self._bound(terms)
        if self.estimator == "dreg" and self.num_particles > 1 and torch.is_grad_enabled():
            self._add_dreg_hooks(terms, log_w)
        return -bound

    def loss(self, model: Callable, guide: Callable, *args, **kwargs) -> float:
        """The negative bound, as a float."""
        with torch.no_grad():
            terms = self._collect(model, guide, args, kwargs, stopped=False)
            return torch_item(-self._bound(terms)[0])

    def loss_and_grads(self, model: Callable, guide: Callable, *args, **kwargs) -> float:
        """The negative bound as a float, after back-propagating the estimator's gradient."""
        loss = self.differentiable_loss(model, guide, *args, **kwargs)
        if loss.requires_grad:
            loss.backward(retain_graph=self.retain_graph)
        return torch_item(loss)


class _ScaleGrad:
    """Backward hook multiplying a sample's gradient by its particle's normalized weight."""

    __slots__ = ("weights",)

    def __init__(self, weights: Tensor):
        self.weights = weights

    def __call__(self, grad: Tensor) -> Tensor:
        return grad * self.weights
