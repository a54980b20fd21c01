r"""Importance-weighted bounds with per-datapoint log-sum-exp and low-variance estimators."""

from __future__ import annotations

import math
import warnings
import weakref
from collections.abc import Callable
from typing import NamedTuple

import pyro
import pyro.ops.jit
import torch
from pyro import poutine
from pyro.distributions import Delta
from pyro.distributions.transforms import biject_to
from pyro.infer import ELBO
from pyro.infer.util import MultiFrameTensor, is_validation_enabled, torch_item
from pyro.poutine.broadcast_messenger import BroadcastMessenger
from pyro.poutine.indep_messenger import CondIndepStackFrame
from pyro.poutine.messenger import Messenger
from pyro.poutine.replay_messenger import ReplayMessenger
from pyro.poutine.subsample_messenger import _Subsample
from pyro.poutine.trace_messenger import TraceMessenger
from pyro.poutine.trace_struct import Trace
from pyro.poutine.util import prune_subsample_sites
from pyro.util import check_if_enumerated, check_model_guide_match, check_site_shape
from torch import Tensor, nn
from torch.distributions import Bernoulli, Independent, Normal
from torch.distributions.utils import _sum_rightmost, broadcast_all
from torch.nn import functional as F

from .devices import data_device
from .pathgrad import stop_distribution

__all__ = [
    "ESTIMATORS",
    "LocalParticlePlate",
    "LogWeights",
    "ParticleVectorizationError",
    "Trace_IWELBO",
    "log_weights",
    "site_log_prob",
]

#: Gradient estimators of :class:`Trace_IWELBO`.
ESTIMATORS = ("iwae", "stl", "dreg")

PARTICLE_PLATE = "num_particles_vectorized"


class LocalParticlePlate(Messenger):
    """Adds a particle dimension to the sites inside the local plate, and only to them.

    Global sites stay un-batched, so one draw of the globals is shared by all particles:
    the particles of :class:`Trace_IWELBO`.

    Arguments:
        local_plate: Name of the plate over datapoints.
        size: Number of particles.
        dim: The particle dimension, left of every plate (``-max_plate_nesting - 1``).
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


class _SiteRecorder(TraceMessenger):
    """``poutine.trace(poutine.replay(fn, trace=replay))`` as one handler, recording sample
    sites only: the trace of the bound's own runs of the model and guide.

    Pyro's pair puts two handlers on the stack and records every param site too, which
    every message of a run (a network's parameters are one param site each) then passes
    through; the bound reads sample sites alone. The replay is ``ReplayMessenger``'s own,
    and an outer handler (SVI's param trace) still sees every param site.
    """

    def __init__(self, replay: Trace | None = None):
        super().__init__()
        self._replay = None if replay is None else ReplayMessenger(trace=replay)

    def _process_message(self, msg) -> None:
        # sample sites only; Messenger's dispatch by name would run on every param site
        if self._replay is not None and msg["type"] == "sample":
            self._replay._pyro_sample(msg)

    def _postprocess_message(self, msg) -> None:
        if msg["type"] == "sample":
            self._pyro_post_sample(msg)


def _record(fn: Callable, args, kwargs, replay: Trace | None = None) -> Trace:
    """The sample sites of one run of ``fn``, its latents replayed from ``replay``."""
    recorder = _SiteRecorder(replay)
    with recorder:
        fn(*args, **kwargs)
    return recorder.trace


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


#: ``math.log(math.sqrt(2 * math.pi))`` exactly as torch's ``Normal.log_prob`` writes it.
_LOG_SQRT_2PI = math.log(math.sqrt(2 * math.pi))


def _independent_normal_log_prob(fn: Independent, value: Tensor) -> Tensor:
    """``fn.log_prob(value)`` for a Normal with tensor parameters, negating after the event
    sum instead of before.

    Torch computes ``-(d ** 2) / (2 var) - log(scale) - c`` elementwise and sums. Rounding
    is symmetric in sign, so ``-(((d ** 2) / (2 var) + log(scale)) + c)`` summed is the
    bitwise identical number, forwards and backwards, with one full-size pass fewer each.
    """
    base = fn.base_dist
    if base._validate_args:
        base._validate_sample(value)
    scale = base.scale
    var = scale**2
    t = (value - base.loc) ** 2 / (2 * var) + scale.log() + _LOG_SQRT_2PI
    return -_sum_rightmost(t, fn.reinterpreted_batch_ndims)


def _fast_log_prob(fn) -> Callable[[Independent, Tensor], Tensor] | None:
    """The shortcut that computes ``fn.log_prob`` bitwise as torch does, or None.

    Only types that keep torch's densities qualify: a subclass may override one.
    """
    if not isinstance(fn, Independent) or type(fn).log_prob is not Independent.log_prob:
        return None
    base = fn.base_dist
    if isinstance(base, Bernoulli) and type(base).log_prob is Bernoulli.log_prob:
        return _independent_bernoulli_log_prob
    if isinstance(base, Normal) and type(base).log_prob is Normal.log_prob:
        return _independent_normal_log_prob
    return None


def site_log_prob(site) -> Tensor:
    """A sample site's log-density, masked as its ``mask`` says (unscaled).

    Arguments:
        site: A trace's site (a dict with ``fn``, ``value``, ``args``, ``kwargs``, ``mask``).

    Returns:
        The elementwise log-density over the site's batch shape.
    """
    fn = site["fn"]
    fast = None if site["args"] or site["kwargs"] else _fast_log_prob(fn)
    if fast is not None:
        log_p = fast(fn, site["value"])
    else:
        log_p = fn.log_prob(site["value"], *site["args"], **site["kwargs"])
    mask = site["mask"]
    if mask is None or mask is True:
        return log_p
    if mask is False:
        return torch.zeros_like(log_p)
    return torch.where(mask, log_p, log_p.new_zeros(()))


def _site_log_density(site, name: str, stop: bool) -> Tensor:
    """A site's log-density for the bound: the one place where a guide site's log q is
    evaluated with its parameters stopped (``stop``, as STL and DReG do)."""
    if stop:
        site = dict(site, fn=stop_distribution(site["fn"], name))
    return site_log_prob(site)


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


def _accumulate(total: Tensor | float, term: Tensor) -> Tensor:
    """``total + term``, where a total of the float 0.0 (no term yet) is ``term`` itself: the
    same number, without an addition (and its backward) over the whole tensor."""
    if isinstance(total, float) and total == 0.0:
        return term
    return total + term


def _as_tensor(value: Tensor | float, like: Tensor | None) -> Tensor:
    """``value`` as a tensor: a tensor as it is (``torch.as_tensor`` would move it to a
    default device set with ``torch.set_default_device``), a float (a sum over no site) in
    ``like``'s dtype and on its device."""
    if isinstance(value, Tensor):
        return value
    if like is None:
        return torch.tensor(value, device="cpu")
    return torch.tensor(value, dtype=like.dtype, device=like.device)


def _per_datapoint(log_p: Tensor, particle_dim: int, data_dim: int | tuple[int, ...]) -> Tensor:
    """Sums a site's log-density over every batch dim but the particle and datapoint
    dims: ``[K, B]`` (or ``[K, *sizes]`` for a tuple of datapoint dims)."""
    if not isinstance(log_p, Tensor):
        log_p = torch.as_tensor(log_p)
    if log_p.dim() < -particle_dim:
        log_p = log_p.reshape((1,) * (-particle_dim - log_p.dim()) + log_p.shape)
    keep = data_dim if isinstance(data_dim, tuple) else (data_dim,)
    other = [d for d in range(-log_p.dim(), 0) if d != particle_dim and d not in keep]
    return log_p.sum(other) if other else log_p


class LogWeights(NamedTuple):
    r"""The log-densities behind one draw of :math:`K` particles, split as the bound needs them.

    With a local plate (``local_plate`` set), ``model_local`` and ``guide_local`` are
    ``[K, B]``: for particle :math:`k` and datapoint :math:`i` of the minibatch, the
    unscaled :math:`\log p(x_i, z_{ik} \mid \beta)` and :math:`\log q(z_{ik} \mid x_i)`
    summed over every site inside the plate; the sites outside it (the globals
    :math:`\beta`, drawn once and shared by the particles) are summed, scaled, into
    ``model_global`` and ``guide_global``. Without a local plate (``local_plate`` None)
    they are ``[K]``, each particle's whole scaled trace, and the globals are 0; or,
    when some plates hold every site, ``[K, B]`` over the elements of those plates
    (flattened), which the model then factorizes over.
    """

    model_local: Tensor
    guide_local: Tensor
    model_global: Tensor | float
    guide_global: Tensor | float
    #: The latent sites' share of ``model_local`` and ``model_global`` (the log-priors),
    #: tracked only for ``kl_weight != 1`` or ``split_prior=True``; 0 otherwise.
    prior_local: Tensor | float
    prior_global: Tensor | float
    #: Multiplies each datapoint's log-mean-weight: the subsample scale N / B, and any
    #: scale common to every site of the local plate.
    scale: float | Tensor
    local_plate: str | None
    #: Reparameterized local guide samples, for DReG's weights: (value, datapoint dims,
    #: event dim, particle index when the particles were looped, else None).
    samples: list[tuple[Tensor, tuple[int, ...], int, int | None]]
    #: Non-reparameterized guide sites: (log q unscaled as the site has it, its vectorized
    #: plates, log q reduced like ``guide_local`` or summed for a global site, is local).
    scores: list[tuple[Tensor, tuple, Tensor, bool]]
    #: With one particle and score terms: Trace_ELBO's per-plate downstream costs.
    log_r: MultiFrameTensor | None
    #: Sizes of the datapoint dims that ``B`` flattens (one size for a local plate).
    data_shape: tuple[int, ...] = ()

    @property
    def log_w(self) -> Tensor:
        """``[K, B]`` (or ``[K]``) log-weights ``model_local - guide_local``."""
        return self.model_local - self.guide_local

    def log_mean_weight(self) -> Tensor:
        """``[B]`` (or scalar) per-datapoint IWAE estimate ``log (1/K) sum_k w_k``."""
        log_w = self.log_w
        K = log_w.shape[0]
        return torch.logsumexp(log_w, 0) - math.log(K) if K > 1 else log_w[0]

    def mean_log_weight(self) -> Tensor:
        """``[B]`` (or scalar) per-datapoint ELBO estimate ``(1/K) sum_k log w_k``."""
        return self.log_w.mean(0)


class ParticleVectorizationError(ValueError):
    """A model or guide network cannot take the particle dimension of vectorized particles."""


def _failing_module(error: BaseException) -> nn.Module | None:
    """The innermost ``nn.Module`` whose code the traceback of ``error`` runs through."""
    found = None
    tb = error.__traceback__
    while tb is not None:
        owner = tb.tb_frame.f_locals.get("self")
        if isinstance(owner, nn.Module):
            found = owner
        tb = tb.tb_next
    return found


def _probe_size(*traces) -> int:
    """A particle count that no dimension of the traces has, so a site that gained it
    can only have it from the particle plate."""
    sizes = {
        size
        for trace in traces
        for site in trace.nodes.values()
        if site["type"] == "sample" and isinstance(site["value"], Tensor)
        for size in site["value"].shape
    }
    size = 3
    while size in sizes:
        size += 1
    return size


def _enumerated_sites(model_trace, guide_trace) -> list[str]:
    """Model latents marked for enumeration that the guide leaves to the objective."""
    return [
        name
        for name, site in model_trace.nodes.items()
        if site["type"] == "sample"
        and not site["is_observed"]
        and site["infer"].get("enumerate")
        and name not in guide_trace.nodes
    ]


def _validate(model_trace, guide_trace, enumerated: list[str]) -> None:
    """Pyro's own checks of a (model, guide) pair, as ``Trace_ELBO`` runs them; the
    sites this objective enumerates are, as for ``TraceEnum_ELBO``, not missing."""
    if enumerated:
        model_trace = model_trace.copy()
        for name in enumerated:
            model_trace.remove_node(name)
    check_model_guide_match(model_trace, guide_trace)
    model_trace = prune_subsample_sites(model_trace)
    guide_trace = prune_subsample_sites(guide_trace)
    model_trace.compute_log_prob()
    guide_trace.compute_log_prob()
    for trace in (model_trace, guide_trace):
        for site in trace.nodes.values():
            if site["type"] == "sample":
                check_site_shape(site, max_plate_nesting=float("inf"))
    check_if_enumerated(guide_trace)


def _check_enumerated(model_trace, names: list[str], local: str | None) -> None:
    """Sites to enumerate inside the weights: parallel, in the local plate and no other."""
    for name in names:
        site = model_trace.nodes[name]
        how = site["infer"]["enumerate"]
        plates = [f.name for f in site["cond_indep_stack"] if f.vectorized]
        if how != "parallel":
            raise ValueError(
                f"Trace_IWELBO: model site '{name}' is marked infer={{'enumerate': {how!r}}}; "
                "only parallel enumeration is summed inside the weights. Mark it "
                "infer={'enumerate': 'parallel'}, or sample it in the guide."
            )
        if local is None or plates != [local]:
            where = (
                "outside any plate over datapoints"
                if local is None
                else (f"in plates {plates}, not in plate '{local}' alone")
            )
            raise ValueError(
                f"Trace_IWELBO: model site '{name}' is enumerated and the guide does not "
                f"sample it, but it sits {where}; the weights sum out an enumerated site "
                "per particle and datapoint only directly inside the local plate. Use "
                "pyro.infer.TraceEnum_ELBO for this model, or sample the site in the guide."
            )


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

    **What is per datapoint.** The local plate is ``local_plate=`` if given, else the
    guide's ``local_plate`` attribute, else found from one run of the model and guide: a
    vectorized plate that holds a latent site of the guide and whose latents no site
    outside it reads (checked by running with a particle dimension on it). Among several,
    the one holding the most model sites wins (so of nested plates the outer one); a tie
    between unrelated plates is no local plate. Every site inside the local plate,
    nested plates included, belongs to its datapoint; every other site (sequential
    ``pyro.plate`` loops, sites outside every plate, plates without latents) is global.
    When there is **no local plate**, the bound is the joint IWAE over the whole trace,
    :math:`\log \frac{1}{K} \sum_k p(x, z_k) / q(z_k)` with scaled log-densities, equal in
    value to ``RenyiELBO(alpha=0)`` on the same draws: per element of the plates that hold
    every site, if any (the model factorizes over them), as Renyi's is.

    **Enumeration.** A model site marked ``infer={"enumerate": "parallel"}`` that the
    guide does not sample, directly inside the local plate, is summed out inside each
    particle's weight, :math:`w_{ik} = \sum_y p(x_i, y, z_{ik}) / q(z_{ik} \mid x_i)`;
    elsewhere it is refused with a pointer to ``TraceEnum_ELBO``.

    The estimator changes only the guide's gradients; the model's gradients are the
    standard IWAE ones whatever the estimator:

    - ``"iwae"``: the reparameterized gradient of the bound (Burda et al.).
    - ``"stl"``: "sticking the landing", :math:`\log q` evaluated with the guide's
      parameters stopped, which drops the score term (Roeder et al.).
    - ``"dreg"``: doubly reparameterized, the stopped-:math:`\log q` path term weighted by
      squared normalized weights (Tucker et al.). It assumes, as every guide of this
      package does, that the local sites are independent given the context.

    At the exact posterior the ``"stl"`` and ``"dreg"`` guide gradients are exactly zero.
    Guide sites that cannot be reparameterized get a score-function term under every
    estimator: with one particle Trace_ELBO's (its cost Rao-Blackwellized over plates);
    with more, a local site's cost is its datapoint's bound plus the global terms and any
    other site's the whole bound.

    The bound needs each datapoint's likelihood to read only its own latents. A model site
    outside a local plate named by the user or the guide that reads the plate's latents
    (a game between two players of a ``"players"`` plate, say) couples the datapoints, so
    no per-datapoint weight exists: with ``num_particles > 1`` it raises ``ValueError``.
    The same holds for couplings the trace cannot see, such as a network that normalizes
    over the minibatch (``BatchNorm`` in training mode): the bound is then not a bound,
    and DReG's weights are wrong; use ``num_particles=1`` or evaluate such networks in
    ``eval()`` mode. A network that cannot take the leading particle dimension of
    vectorized particles raises :class:`ParticleVectorizationError` naming it; pass
    ``vectorize_particles=False``.

    Under ``pyro.enable_validation(True)`` (Pyro's default) the first call on a (model,
    guide) pair runs Pyro's own checks, as ``Trace_ELBO`` does: sites missing on either
    side, plates in the guide but not the model, shape and event-dim mismatches.

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
        local_plate: Name of the plate over datapoints; see "What is per datapoint".
        retain_graph: As in :class:`~pyro.infer.ELBO`.
        jit: Compile the loss with :func:`pyro.ops.jit.trace`, as Pyro's ``JitTrace_*``
            losses do: the first call of each argument shape (and weights) traces the
            model, the guide and the bound into one graph, and later calls run the graph
            without Python. It needs a model and guide of fixed structure for given
            shapes; ``entropy_weight`` and ``kl_weight`` are part of the graph, so a
            schedule that changes them compiles again. Not with ``"dreg"`` and more than
            one particle, nor with ``"stl"`` or ``"dreg"`` through a flow guide (both
            raise ``ValueError``). It rests on ``torch.jit.trace``, which torch now
            deprecates.

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
        jit: bool = False,
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
        if local_plate is not None and (not isinstance(local_plate, str) or not local_plate):
            raise ValueError(
                f"Trace_IWELBO: local_plate must be a plate name or None, got {local_plate!r}"
            )
        if not isinstance(jit, bool):
            raise ValueError(f"Trace_IWELBO: jit must be a bool, got {jit!r}")
        if jit:
            _check_jit(estimator, num_particles)
        super().__init__(
            num_particles=num_particles,
            max_plate_nesting=max_plate_nesting,
            vectorize_particles=vectorize_particles,
            retain_graph=retain_graph,
        )
        self.jit = jit
        self._compiled: dict = {}  # (model id, guide id) -> pyro.ops.jit.trace of the loss
        self.estimator = estimator
        self.entropy_weight = float(entropy_weight)
        self.kl_weight = float(kl_weight)
        self.local_plate = local_plate
        self._plate_nesting = max_plate_nesting  # without the particle dimension
        self._local_name: str | None = None
        self._joint_dims: tuple[int, ...] = ()
        self._enumerate = False
        self._setup_for: tuple | None = None
        self._plan: _SitePlan | None = None  # see _terms

    # ----------------------------------------------------------------- setup
    def _setup(self, model: Callable, guide: Callable, args, kwargs) -> None:
        """One run of model and guide: validation, plate nesting, the local plate.

        The run is unbatched, or, with a given ``max_plate_nesting``, has the particle
        dimension as the objective's own runs will. It leaves torch's RNG as it found it,
        so the draws of a computation do not depend on whether this objective had been set
        up before (a resumed run's first validation, say).
        """
        cuda = [torch.cuda.current_device()] if torch.cuda.is_initialized() else []
        run_model, run_guide = model, guide
        if self._plate_nesting != float("inf") and self.vectorize_particles:
            # As Pyro's ELBOs with a given max_plate_nesting, never run the pair without
            # its particle dimension: a model may rely on it (or on its absence).
            K = self.num_particles
            plate = pyro.plate(
                PARTICLE_PLATE, K, dim=self._particle_dim(), device=data_device(args, kwargs)
            )
            run_model, run_guide = (plate(model), plate(guide)) if K > 1 else (model, guide)
        with torch.random.fork_rng(cuda), poutine.block():
            guide_trace = poutine.trace(run_guide).get_trace(*args, **kwargs)
            # the row probe re-runs the model on these draws (dropout masks included)
            model_rng = _rng_state()
            model_trace = poutine.trace(poutine.replay(run_model, trace=guide_trace)).get_trace(
                *args, **kwargs
            )
            enumerated = _enumerated_sites(model_trace, guide_trace)
            if is_validation_enabled():
                _validate(model_trace, guide_trace, enumerated)
            frames = {}
            for trace in (model_trace, guide_trace):
                for site in trace.nodes.values():
                    if site["type"] == "sample":
                        for frame in site["cond_indep_stack"]:
                            if frame.name != PARTICLE_PLATE:
                                frames.setdefault(frame.name, frame)
            if self._plate_nesting == float("inf"):
                dims = [f.dim for f in frames.values() if f.vectorized]
                self._plate_nesting = -min(dims) if dims else 0

            name = self.local_plate or getattr(guide, "local_plate", None)
            if name is None:
                name = self._find_local_plate(
                    model, guide, args, kwargs, model_trace, guide_trace, run_model, model_rng
                )
            elif name not in frames:
                found = ", ".join(repr(n) for n in sorted(frames)) or "none"
                raise ValueError(
                    f"Trace_IWELBO: the model has no plate named '{name}' (plates found: "
                    f"{found}); pass local_plate= the name of the plate over datapoints."
                )
            elif not frames[name].vectorized:
                raise ValueError(
                    f"Trace_IWELBO: plate '{name}' is sequential; the per-datapoint "
                    "log-sum-exp needs a vectorized plate (with pyro.plate(...) as ...)."
                )
            elif self.num_particles > 1:
                site = _rows_coupled(
                    run_model, model_trace, guide_trace, name, args, kwargs, model_rng
                )
                if site is not None:
                    raise ValueError(
                        f"Trace_IWELBO: the log-density of model site '{site}' at one datapoint "
                        f"of plate '{name}' changes when the latents of another datapoint "
                        "change (a network that normalizes over the minibatch, such as "
                        "BatchNorm in training mode, does this), so the datapoints' importance "
                        "weights do not factorize and neither the per-datapoint bound nor "
                        "DReG's weights hold. Use num_particles=1, put such networks in eval() "
                        "mode, or normalize each datapoint on its own (LayerNorm)."
                    )
        _check_enumerated(model_trace, enumerated, name)
        if enumerated and self.kl_weight != 1.0:
            raise ValueError(
                f"Trace_IWELBO: kl_weight={self.kl_weight} with enumerated sites "
                f"({', '.join(enumerated)}): the prior's share of a summed-out weight has "
                "no closed form; use kl_weight=1."
            )
        self._enumerate = bool(enumerated)
        self._local_name = name
        self._plan = None
        self._joint_dims = () if name is not None else _common_dims(model_trace, guide_trace)
        self._setup_for = (model, guide)

    def _find_local_plate(
        self, model, guide, args, kwargs, model_trace, guide_trace, run_model, model_rng
    ):
        """The plate over datapoints by the rule of the class docstring, or None."""
        counts = {}
        for site in model_trace.nodes.values():
            if site["type"] == "sample" and not isinstance(site["fn"], _Subsample):
                for f in site["cond_indep_stack"]:
                    if f.vectorized and f.name != PARTICLE_PLATE:
                        counts[f.name] = counts.get(f.name, 0) + 1
        candidates = {
            f.name
            for site in guide_trace.nodes.values()
            if site["type"] == "sample"
            and not site["is_observed"]
            and not isinstance(site["fn"], _Subsample)
            for f in site["cond_indep_stack"]
            if f.vectorized and f.name != PARTICLE_PLATE
        }
        size = _probe_size(model_trace, guide_trace)
        usable = [
            c
            for c in candidates
            if not self._reads_latents(model, guide, args, kwargs, c, size)
            and _rows_coupled(run_model, model_trace, guide_trace, c, args, kwargs, model_rng)
            is None
        ]
        if not usable:
            return None
        most = max(counts.get(c, 0) for c in usable)
        best = [c for c in usable if counts.get(c, 0) == most]
        return best[0] if len(best) == 1 else None

    def _reads_latents(self, model, guide, args, kwargs, name: str, size: int) -> bool:
        """Whether a site outside plate ``name`` reads the plate's latents (a probe run)."""
        plate = LocalParticlePlate(name, size, self._particle_dim())
        try:
            guide_trace = poutine.trace(plate(guide)).get_trace(*args, **kwargs)
            model_trace = poutine.trace(poutine.replay(plate(model), trace=guide_trace)).get_trace(
                *args, **kwargs
            )
        except Exception:  # noqa: BLE001 - a network that refuses the probe's extra dim
            return False  # the per-call checks still catch a coupling
        for trace in (model_trace, guide_trace):
            for site in trace.nodes.values():
                if (
                    site["type"] == "sample"
                    and not isinstance(site["fn"], _Subsample)
                    and not any(f.name == name for f in site["cond_indep_stack"])
                    and _reads_particles(site, site_log_prob(site), size)
                ):
                    return True
        return False

    def find_local_plate(self, model: Callable, guide: Callable, *args, **kwargs) -> str | None:
        """The plate this objective treats as running over datapoints for (model, guide),
        or None when the bound is the joint IWAE over the whole trace."""
        self._ensure_setup(model, guide, args, kwargs)
        return self._local_name

    def _ensure_setup(self, model, guide, args, kwargs) -> None:
        if (
            self._setup_for is None
            or self._setup_for[0] is not model
            or self._setup_for[1] is not guide
        ):
            self._setup(model, guide, args, kwargs)

    # ------------------------------------------------------------- the bound
    def _particle_dim(self) -> int:
        return -int(self._plate_nesting) - 1

    def _traces(self, model, guide, args, kwargs, shared=None, full: bool = False):
        """Guide then model traces; ``shared`` sites (globals, minibatch) are replayed.

        The bound's own runs record sample sites only (:class:`_SiteRecorder`); ``full``
        traces, or enumeration, take Pyro's ``trace`` and ``replay``."""
        K = self.num_particles
        vectorized = K > 1 and self.vectorize_particles
        if vectorized:
            if self._local_name is None:
                plate = pyro.plate(
                    PARTICLE_PLATE, K, dim=self._particle_dim(), device=data_device(args, kwargs)
                )
            else:
                plate = LocalParticlePlate(self._local_name, K, self._particle_dim())
            model, guide = plate(model), plate(guide)
        if shared is not None:
            guide = poutine.replay(guide, trace=shared)
        try:
            if full or self._enumerate:
                guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
                replayed = poutine.replay(model, trace=guide_trace)
                if self._enumerate:  # enumeration dims go left of the particle dim
                    dim = self._particle_dim() - 1
                    replayed = poutine.enum(replayed, first_available_dim=dim)
                model_trace = poutine.trace(replayed).get_trace(*args, **kwargs)
            else:
                guide_trace = _record(guide, args, kwargs)
                model_trace = _record(model, args, kwargs, replay=guide_trace)
        except RuntimeError as error:
            if not vectorized:
                raise
            module = _failing_module(error)
            where = f"module {type(module).__name__}" if module is not None else "a tensor op"
            first_line = str(error).splitlines()[0]
            raise ParticleVectorizationError(
                f"Trace_IWELBO: with {K} vectorized particles the model or guide failed in "
                f"{where} ({first_line}); each sample gets a particle dimension of size {K} "
                f"at dim {self._particle_dim()}, left of every plate, and that network cannot "
                "take it. Pass vectorize_particles=False to loop over the particles, or make "
                "the network accept leading batch dimensions."
            ) from error
        return model_trace, guide_trace

    def get_traces(self, model: Callable, guide: Callable, *args, **kwargs):
        """One ``(model_trace, guide_trace)`` pair as the bound draws it: with the
        particle dimension (vectorized particles) and the globals shared by all particles."""
        self._ensure_setup(model, guide, args, kwargs)
        return self._traces(model, guide, args, kwargs, full=True)

    def _get_trace(self, model, guide, args, kwargs):
        """Pyro's ELBO interface: :meth:`get_traces`."""
        return self.get_traces(model, guide, *args, **kwargs)

    def _terms(
        self, model_trace, guide_trace, stopped: bool, split_prior: bool = False
    ) -> LogWeights:
        """Log-densities split into per-(particle, datapoint) local parts and global sums.

        The traces of a training loop have the same structure step after step, so the
        decisions of one walk over their sites are kept as a :class:`_SitePlan`; a later
        pair of traces with the same structure runs the plan (the same tensor operations in
        the same order, so the same numbers), and any other is walked afresh and planned.
        """
        flags = (
            stopped,
            split_prior or self.kl_weight != 1.0,
            self.num_particles,
            self.vectorize_particles,
            self._plate_nesting,
            self._local_name,
        )
        plan = self._plan
        if plan is not None and plan.flags == flags:
            terms = plan.run(model_trace, guide_trace)
            if terms is not None:
                return terms
        record: list[_PlannedSite] | None = [] if self._plannable() else None
        terms, record = self._walk_terms(model_trace, guide_trace, stopped, split_prior, record)
        self._plan = None if record is None else _SitePlan(flags, tuple(record), terms)
        return terms

    @property
    def site_plan(self) -> _SitePlan | None:
        """The plan of the last structure of traces this objective walked, which its next
        calls run while their traces keep that structure (a new plan when it changes);
        None before a call, or for what no plan covers: no local plate, enumeration,
        looped particles, score-function sites, tensor scales or masks. For inspection."""
        return self._plan

    def _plannable(self) -> bool:
        """Whether :meth:`_terms` may plan: per-datapoint weights without enumeration,
        from one pair of traces (vectorized particles, or one)."""
        return (
            self._local_name is not None
            and not self._enumerate
            and (self.vectorize_particles or self.num_particles == 1)
        )

    def _walk_terms(
        self, model_trace, guide_trace, stopped: bool, split_prior: bool, record: list | None
    ) -> tuple[LogWeights, list | None]:
        """:meth:`_terms` by a walk over every site, and the record of its decisions: each
        site's appended to ``record``, which becomes None at a site no plan covers."""
        local = self._local_name
        joint = local is None
        particle_dim = self._particle_dim()
        K = self.num_particles
        data_dim = None
        local_scales = []
        local_sites = []  # (log_p, is_model, is_prior)
        model_global = guide_global = prior_global = 0.0
        track_prior = split_prior or self.kl_weight != 1.0
        coupled_check = K > 1 and self.vectorize_particles and not joint
        data_dims = self._joint_dims if joint else None
        enum_dims = ()
        if self._enumerate:
            enum_dims = tuple(
                sorted(
                    {
                        site["infer"]["_enumerate_dim"]
                        for site in model_trace.nodes.values()
                        if site["type"] == "sample"
                        and site["infer"].get("_enumerate_dim") is not None
                    }
                )
            )
        samples = []
        scores = []
        frames = {}
        for is_model, trace in ((True, model_trace), (False, guide_trace)):
            for name, site in trace.nodes.items():
                if site["type"] != "sample" or isinstance(site["fn"], _Subsample):
                    continue
                guide_latent = not is_model and not site["is_observed"]
                score = guide_latent and not site["fn"].has_rsample
                # DReG reweights the gradient through a reparameterized local sample
                sample = guide_latent and not score and not isinstance(site["fn"], Delta)
                stop = stopped and guide_latent and not score
                log_p = _site_log_density(site, name, stop)
                if record is not None and (
                    score
                    or site["scale"].__class__ not in (int, float)
                    or not (site["mask"] is None or site["mask"] is True)
                    or not isinstance(site["value"], Tensor)
                ):
                    record = None  # the walk goes on without planning
                if score:
                    unscaled = site["fn"].log_prob(site["value"], *site["args"], **site["kwargs"])
                    stack = tuple(f for f in site["cond_indep_stack"] if f.vectorized)
                    if K == 1:  # one particle drops the zero-mean direct term, as Trace_ELBO
                        log_p = log_p.detach()
                is_prior = track_prior and is_model and not site["is_observed"]
                frame = (
                    None
                    if joint
                    else next((f for f in site["cond_indep_stack"] if f.name == local), None)
                )
                if frame is None and not joint:
                    if is_model and coupled_check and _reads_particles(site, log_p, K):
                        raise _coupled_error(name, local)
                    if enum_dims and any(
                        -d <= log_p.dim() and log_p.shape[d] > 1 for d in enum_dims
                    ):
                        raise ValueError(
                            f"Trace_IWELBO: site '{name}' is outside plate '{local}' but "
                            "reads a site enumerated inside it, so the enumerated values of "
                            "the datapoints do not sum out one by one; use "
                            "pyro.infer.TraceEnum_ELBO for this model."
                        )
                    scale = site["scale"]
                    total = log_p.sum() if _is_one(scale) else (log_p * scale).sum()
                    if is_model:
                        model_global = _accumulate(model_global, total)
                        if is_prior:
                            prior_global = _accumulate(prior_global, total)
                    else:
                        guide_global = _accumulate(guide_global, total)
                    if score:
                        scores.append((unscaled, stack, unscaled.sum(), False))
                    if record is not None:
                        record.append(_PlannedSite.of(name, is_model, site, log_p, stop, is_prior))
                    continue
                if joint:
                    if not _is_one(site["scale"]):
                        log_p = log_p * site["scale"]
                    local_sites.append((log_p, is_model, is_prior))
                    if score:
                        reduced = _per_datapoint(unscaled, particle_dim, data_dims)
                        scores.append((unscaled, stack, reduced, True))
                    elif sample:
                        samples.append((site["value"], data_dims, site["fn"].event_dim, None))
                    continue
                data_dim = frame.dim
                frames[is_model] = frame
                local_scales.append(site["scale"])
                local_sites.append((log_p, is_model, is_prior))
                if score:
                    reduced = _per_datapoint(unscaled, particle_dim, data_dim)
                    scores.append((unscaled, stack, reduced, True))
                elif sample:
                    samples.append((site["value"], (frame.dim,), site["fn"].event_dim, None))
                if record is not None:
                    record.append(
                        _PlannedSite.of(
                            name, is_model, site, log_p, stop, is_prior, frame.dim, sample
                        )
                    )
        if joint:
            data_dim = data_dims
            outer = 1.0
            inner = [None] * len(local_sites)
        elif data_dim is None:
            raise ValueError(
                f"Trace_IWELBO: no sample site is inside plate '{local}' in this call."
            )
        else:
            sizes = {k: (f.size, f.full_size or f.size) for k, f in frames.items()}
            if len(sizes) == 2 and sizes[True] != sizes[False]:
                model_frame, guide_frame = frames[True], frames[False]
                raise ValueError(
                    f"Trace_IWELBO: plate '{local}' has size {guide_frame.full_size} (minibatch "
                    f"{guide_frame.size}) in the guide but {model_frame.full_size} (minibatch "
                    f"{model_frame.size}) in the model; an amortized guide sizes the plate "
                    "from its context, which needs one row per datapoint."
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

        if record is not None:
            scales = iter(inner)
            record[:] = [
                r if r.data_dim is None else _reduced(r, next(scales), particle_dim, data_dim)
                for r in record
            ]
        model_local = guide_local = prior_local = 0.0
        for (log_p, is_model, is_prior), inner_scale in zip(local_sites, inner, strict=True):
            if inner_scale is not None:
                log_p = log_p * inner_scale
            keep = (data_dim, *enum_dims) if enum_dims and is_model else data_dim
            log_p = _per_datapoint(log_p, particle_dim, keep)
            if is_model:
                model_local = _accumulate(model_local, log_p)
                if is_prior:
                    prior_local = _accumulate(prior_local, log_p)
            else:
                guide_local = _accumulate(guide_local, log_p)
        # a sum over no site is the float 0.0: a tensor of the sites' dtype and device
        like = local_sites[0][0] if local_sites else None
        model_local, guide_local = _as_tensor(model_local, like), _as_tensor(guide_local, like)
        if enum_dims:
            # each particle's weight sums the enumerated values out: log sum_y p(x, y, z)
            model_local = torch.logsumexp(model_local, dim=tuple(range(model_local.dim() - 2)))
        if joint:
            # sites without the particle dimension (none at all, or none read a latent)
            # hold the same value for every particle
            rows = K if self.vectorize_particles else 1
            shape = torch.broadcast_shapes(
                model_local.shape, guide_local.shape, (rows,) + (1,) * len(data_dims)
            )

            def flat(t):  # [K or 1, *sizes] (or a 0-d 0.0) -> [K, B] (or [K])
                t = t.expand(shape)
                return t.reshape(rows, -1) if data_dims else t.reshape(rows)

            model_local, guide_local = flat(model_local), flat(guide_local)
            if isinstance(prior_local, Tensor):
                prior_local = flat(prior_local)
        log_r = _downstream_costs(model_trace, guide_trace) if scores and K == 1 else None
        if joint:
            data_shape = tuple(shape[1:])
        else:
            data_shape = (model_local.shape[-1] if model_local.dim() else 1,)
        terms = LogWeights(
            model_local,
            guide_local,
            model_global,
            guide_global,
            prior_local,
            prior_global,
            outer,
            local,
            samples,
            scores,
            log_r,
            data_shape,
        )
        return terms, record

    def _collect(
        self, model, guide, args, kwargs, stopped: bool, split_prior: bool = False
    ) -> LogWeights:
        self._ensure_setup(model, guide, args, kwargs)
        if self.vectorize_particles or self.num_particles == 1:
            model_trace, guide_trace = self._traces(model, guide, args, kwargs)
            return self._terms(model_trace, guide_trace, stopped, split_prior)
        if self._local_name is None:
            return self._collect_joint_sequential(model, guide, args, kwargs, stopped, split_prior)
        return self._collect_sequential(model, guide, args, kwargs, stopped, split_prior)

    def _collect_joint_sequential(
        self, model, guide, args, kwargs, stopped: bool, split_prior: bool
    ) -> LogWeights:
        """Whole-trace particles in a Python loop, each drawn afresh."""
        parts = [
            self._terms(*self._traces(model, guide, args, kwargs), stopped, split_prior)
            for _ in range(self.num_particles)
        ]
        return _stack_particles(parts)

    def _collect_sequential(
        self, model, guide, args, kwargs, stopped: bool, split_prior: bool
    ) -> LogWeights:
        """Particles in a Python loop; globals and the minibatch are replayed from the first."""
        model_trace, guide_trace = self._traces(model, guide, args, kwargs)
        first = self._terms(model_trace, guide_trace, stopped, split_prior)
        shared = guide_trace.copy()
        for name, site in list(shared.nodes.items()):
            if site["type"] == "sample" and any(
                f.name == self._local_name for f in site["cond_indep_stack"]
            ):
                shared.remove_node(name)
        parts = [first]
        for _ in range(1, self.num_particles):
            model_trace, guide_trace = self._traces(model, guide, args, kwargs, shared)
            terms = self._terms(model_trace, guide_trace, stopped, split_prior)
            like = first.model_local
            if not torch.equal(
                _as_tensor(terms.model_global, like), _as_tensor(first.model_global, like)
            ):
                # the globals are replayed, so only a site that reads the local latents
                # can change its log-density between particles
                raise _coupled_error(None, self._local_name)
            parts.append(terms)
        return _stack_particles(parts)

    def log_weights(
        self,
        model: Callable,
        guide: Callable,
        *args,
        stop_guide: bool = False,
        split_prior: bool = False,
        **kwargs,
    ) -> LogWeights:
        """One draw of this objective's particles: the log-densities behind its bound.

        Arguments:
            model, guide: As for :meth:`loss`.
            stop_guide: Evaluate :math:`\\log q` with the guide's parameters stopped (as
                the ``"stl"`` and ``"dreg"`` estimators do), so the log-weights depend on
                the guide's parameters only through the samples.
            split_prior: Also track the latent sites' log-priors (``prior_local``,
                ``prior_global``), as ``kl_weight != 1`` does, so that
                ``model_local - prior_local`` is the log-likelihood of the datapoints.

        Returns:
            :class:`LogWeights`; ``.log_w`` is ``[K, B]`` over the local plate's
            minibatch, or ``[K]`` when there is no local plate.
        """
        return self._collect(
            model, guide, args, kwargs, stopped=stop_guide, split_prior=split_prior
        )

    def _bound(self, terms: LogWeights) -> tuple[Tensor, Tensor]:
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
        if not _is_one(terms.scale):
            bound = bound * terms.scale
        if isinstance(terms.model_global, Tensor):
            bound = bound + terms.model_global - (1.0 - beta) * terms.prior_global
        if isinstance(terms.guide_global, Tensor):
            bound = bound - beta * lam * terms.guide_global
        if terms.scores and torch.is_grad_enabled():
            surrogate = self._score_surrogate(terms, local.detach(), bound.detach())
            bound = bound + (surrogate - surrogate.detach())
        return bound, log_w

    def _score_surrogate(self, terms: LogWeights, local: Tensor, bound: Tensor) -> Tensor:
        """Score-function terms of the guide sites that cannot be reparameterized."""
        total = 0.0
        if terms.log_r is not None:  # one particle: Trace_ELBO's surrogate
            for unscaled, stack, _, _ in terms.scores:
                total = total + (terms.log_r.sum_to(stack) * unscaled).sum()
            return _as_tensor(total, bound)
        if terms.local_plate is None:
            cost_local = bound
        else:  # a datapoint's bound plus the global terms, which its score ignores
            cost_local = bound - terms.scale * local.sum() + terms.scale * local
        for _, _, reduced, is_local in terms.scores:
            total = total + ((cost_local if is_local else bound) * reduced).sum()
        return _as_tensor(total, bound)

    def _add_dreg_hooks(self, terms: LogWeights, log_w: Tensor) -> None:
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
        sizes = terms.data_shape
        for value, data_dims, event_dim, particle in terms.samples:
            if not value.requires_grad:
                continue
            w = weights if particle is None else weights[particle]
            batch_end = value.dim() - event_dim
            shape = [1] * value.dim()
            for dim, size in zip(data_dims, sizes, strict=True):
                shape[batch_end + dim] = size
            if particle is None:
                shape[batch_end + particle_dim] = w.shape[0]
            value.register_hook(_ScaleGrad(w.reshape(shape)))

    def differentiable_loss(self, model: Callable, guide: Callable, *args, **kwargs) -> Tensor:
        """The negative bound, differentiable; its gradient is the chosen estimator's."""
        if self.jit and torch.is_grad_enabled():
            loss = self._compiled_loss(model, guide, args, kwargs)
            _warn_if_nan(loss)
            return loss
        stopped = self.estimator != "iwae"
        terms = self._collect(model, guide, args, kwargs, stopped)
        bound, log_w = self._bound(terms)
        if self.estimator == "dreg" and self.num_particles > 1 and torch.is_grad_enabled():
            self._add_dreg_hooks(terms, log_w)
        loss = -bound
        _warn_if_nan(loss)
        return loss

    @property
    def compilations(self) -> int:
        """How many graphs ``jit=True`` has compiled so far (one per model and guide,
        argument shapes and weights)."""
        return sum(len(f.compiled) for f in self._compiled.values())

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_compiled"] = {}  # compiled graphs do not pickle; the next call compiles
        return state

    def _compiled_loss(self, model, guide, args, kwargs) -> Tensor:
        """The negative bound through the graph compiled for these arguments' shapes."""
        _check_jit(self.estimator, self.num_particles)  # the estimator may have changed
        self._ensure_setup(model, guide, args, kwargs)  # eagerly: validation, local plate
        key = (id(model), id(guide))
        compiled = self._compiled.get(key)
        if compiled is None:
            weakself = weakref.ref(self)

            def negative_bound(*args, **kwargs):
                kwargs.pop(_JIT_KEY)
                self = weakself()
                terms = self._collect(model, guide, args, kwargs, self.estimator != "iwae")
                return -self._bound(terms)[0]

            compiled = self._compiled[key] = pyro.ops.jit.trace(
                negative_bound, ignore_warnings=True
            )
        # what the graph depends on besides the tensors' values: Pyro keys a compiled
        # function by its keyword arguments
        shapes = tuple(
            (tuple(a.shape), a.dtype, a.device) if isinstance(a, Tensor) else None for a in args
        )
        signature = (shapes, self.estimator, self.entropy_weight, self.kl_weight)
        return compiled(*args, **kwargs, **{_JIT_KEY: signature})

    def loss(self, model: Callable, guide: Callable, *args, **kwargs) -> float:
        """The negative bound, as a float."""
        with torch.no_grad():
            terms = self._collect(model, guide, args, kwargs, stopped=False)
            loss = torch_item(-self._bound(terms)[0])
        if math.isnan(loss):
            warnings.warn("Encountered NaN: loss", UserWarning, stacklevel=1)
        return loss

    def loss_and_grads(self, model: Callable, guide: Callable, *args, **kwargs) -> float:
        """The negative bound as a float, after back-propagating the estimator's gradient."""
        loss = self.differentiable_loss(model, guide, *args, **kwargs)
        if loss.requires_grad:
            loss.backward(retain_graph=self.retain_graph)
        return torch_item(loss)


def _check_jit(estimator: str, num_particles: int) -> None:
    """What ``jit=True`` cannot compile: DReG with more than one particle."""
    if estimator == "dreg" and num_particles > 1:
        raise ValueError(
            "Trace_IWELBO: jit=True cannot take estimator='dreg' with num_particles > 1: "
            "DReG reweights the samples' gradients with hooks, which a compiled graph "
            "does not keep. Use jit=False, or estimator='stl'."
        )


#: The keyword argument that carries what a compiled loss depends on besides tensors.
_JIT_KEY = "_pyro_amortized_jit_signature"


def _warn_if_nan(loss: Tensor) -> None:
    """Pyro's ``warn_if_nan(loss, "loss")`` (the same warning) for a scalar loss.

    Pyro's also registers a backward hook on the loss that checks the gradient fed into
    it, which is the caller's own (1 from ``backward()``); one number read here costs less
    than Pyro's two ops, and the hook's Python call inside every backward pass goes.
    """
    if math.isnan(loss.item()):
        warnings.warn("Encountered NaN: loss", UserWarning, stacklevel=2)


def _rng_state() -> tuple:
    cuda = torch.cuda.get_rng_state() if torch.cuda.is_initialized() else None
    return torch.get_rng_state(), cuda


def _rows_coupled(
    model, model_trace, guide_trace, name: str, args, kwargs, rng: tuple
) -> str | None:
    """A model site in plate ``name`` whose log-density at some datapoint changes when the
    latents of datapoint 0 alone change (a probe run), or None.

    The trace cannot show such a coupling (a network normalizing over the minibatch reads
    every row), but it breaks the per-datapoint factorization the bound rests on.
    """
    probe = guide_trace.copy()
    moved = False
    for site_name, site in guide_trace.nodes.items():
        if site["type"] != "sample" or site["is_observed"] or isinstance(site["fn"], _Subsample):
            continue
        frame = next((f for f in site["cond_indep_stack"] if f.name == name), None)
        model_site = model_trace.nodes.get(site_name)
        if frame is None or model_site is None or model_site["is_observed"]:
            continue
        value = site["value"]
        position = value.dim() - model_site["fn"].event_dim + frame.dim
        support = model_site["fn"].support
        if position < 0 or value.shape[position] < 2 or support.is_discrete:
            continue  # a discrete value cannot move a little; the continuous ones show it
        transform = biject_to(support)
        with torch.no_grad():
            u = transform.inv(value).clone()
            shift = torch.zeros_like(u)
            row = shift.narrow(position, 0, 1)
            # not constant across a row's coordinates: a softmax would not see that
            steps = torch.linspace(0.5, -0.25, max(row.numel(), 2), dtype=u.dtype, device=u.device)
            row.copy_(steps[: row.numel()].reshape(row.shape))
            # only datapoint 0 moves: the round trip through u is inexact near a
            # support's boundary (a simplex's vertex), which would move the other rows too
            moved_value = value.clone()
            moved_value.narrow(position, 0, 1).copy_(transform(u + shift).narrow(position, 0, 1))
            probe.nodes[site_name] = dict(site, value=moved_value)
        moved = True
    if not moved:
        return None
    torch.set_rng_state(rng[0])
    if rng[1] is not None:
        torch.cuda.set_rng_state(rng[1])
    with torch.no_grad(), pyro.validation_enabled(False):
        try:
            shifted = poutine.trace(poutine.replay(model, trace=probe)).get_trace(*args, **kwargs)
        except Exception:  # noqa: BLE001 - the probe's value may be one the model refuses
            return None
    for site_name, site in model_trace.nodes.items():
        if site["type"] != "sample" or isinstance(site["fn"], _Subsample):
            continue
        frame = next((f for f in site["cond_indep_stack"] if f.name == name), None)
        other = shifted.nodes.get(site_name)
        if frame is None or other is None:
            continue
        with torch.no_grad():
            before = _per_datapoint(site_log_prob(site), frame.dim - 1, frame.dim)
            after = _per_datapoint(site_log_prob(other), frame.dim - 1, frame.dim)
        if before.shape != after.shape or before.shape[-1] < 2:
            continue
        before, after = before[..., 1:], after[..., 1:]
        tolerance = 1e-5 * (1.0 + before.abs())
        finite = torch.isfinite(before) & torch.isfinite(after)
        if ((before - after).abs() > tolerance)[finite].any():
            return site_name
    return None


class _PlannedSite(NamedTuple):
    """One sample site as :meth:`Trace_IWELBO._terms` treated it, and what identifies it."""

    name: str
    is_model: bool
    fn_type: type
    is_observed: bool
    has_rsample: bool
    stack: tuple  # the site's cond_indep_stack (plates, their sizes and dims)
    value_shape: torch.Size
    batch_shape: torch.Size
    log_shape: torch.Size
    scale: float
    stop: bool
    is_prior: bool
    data_dim: int | None = None  # the local plate's dim; None for a global site
    sample: bool = False  # a reparameterized local guide sample (DReG reweights it)
    inner: float | None = None  # the site's scale inside the log-sum-exp, if any
    pad: tuple[int, ...] | None = None  # [K, B] reshape of a log-density without dim K
    other: list[int] | None = None  # the dims summed out to [K, B]

    @classmethod
    def of(
        cls,
        name: str,
        is_model: bool,
        site: dict,
        log_p: Tensor,
        stop: bool,
        is_prior: bool,
        data_dim: int | None = None,
        sample: bool = False,
    ) -> _PlannedSite:
        fn = site["fn"]
        return cls(
            name,
            is_model,
            type(fn),
            site["is_observed"],
            fn.has_rsample,
            site["cond_indep_stack"],
            site["value"].shape,
            fn.batch_shape,
            log_p.shape,
            site["scale"],
            stop,
            is_prior,
            data_dim,
            sample,
        )

    def matches(self, name: str, is_model: bool, site: dict) -> bool:
        """Whether ``site`` has the structure this one was planned for."""
        fn = site["fn"]
        scale = site["scale"]
        mask = site["mask"]
        value = site["value"]
        return (
            name == self.name
            and is_model == self.is_model
            and type(fn) is self.fn_type
            and site["is_observed"] == self.is_observed
            and scale.__class__ in (int, float)
            and scale == self.scale
            and (mask is None or mask is True)
            and site["cond_indep_stack"] == self.stack
            and isinstance(value, Tensor)
            and value.shape == self.value_shape
            and fn.batch_shape == self.batch_shape
            and fn.has_rsample == self.has_rsample
        )


def _reduced(site: _PlannedSite, inner: float | None, particle_dim: int, keep: int) -> _PlannedSite:
    """``site`` with the reductions ``_per_datapoint`` makes of its log-density, keeping
    the particle dim and the datapoint dim ``keep``, and its scale ``inner`` inside."""
    shape = site.log_shape
    pad = None
    if len(shape) < -particle_dim:
        shape = (1,) * (-particle_dim - len(shape)) + tuple(shape)
        pad = shape
    dims = range(-len(shape), 0)
    other = [d for d in dims if d != particle_dim and d != keep]
    return site._replace(inner=inner, pad=pad, other=other or None)


class _SitePlan:
    """The decisions of one walk of :meth:`Trace_IWELBO._terms`, for traces of its structure.

    Which sites are local or global, their scales inside and outside the log-sum-exp, the
    reductions of their log-densities and the checks that passed (coupled sites, plate
    sizes) depend only on the structure of the traces: site names and order, distribution
    types, shapes, scales, masks and plates. :meth:`run` checks each site against that
    structure as it goes and returns None at the first difference, for the walk to run.
    """

    __slots__ = ("flags", "sites", "outer", "local")

    def __init__(self, flags: tuple, sites: tuple[_PlannedSite, ...], terms: LogWeights):
        self.flags = flags
        self.sites = sites
        self.outer = terms.scale
        self.local = terms.local_plate

    def run(self, model_trace, guide_trace) -> LogWeights | None:
        """The walk's :class:`LogWeights` for these traces, or None if their structure
        differs from the planned one."""
        planned = iter(self.sites)
        model_local = guide_local = prior_local = 0.0
        model_global = guide_global = prior_global = 0.0
        like = None
        samples = []
        for is_model, trace in ((True, model_trace), (False, guide_trace)):
            for name, site in trace.nodes.items():
                if site["type"] != "sample" or isinstance(site["fn"], _Subsample):
                    continue
                p = next(planned, None)
                if p is None or not p.matches(name, is_model, site):
                    return None
                log_p = _site_log_density(site, name, p.stop)
                if log_p.shape != p.log_shape:
                    return None
                if p.data_dim is None:
                    scale = p.scale
                    total = log_p.sum() if _is_one(scale) else (log_p * scale).sum()
                    if is_model:
                        model_global = _accumulate(model_global, total)
                        if p.is_prior:
                            prior_global = _accumulate(prior_global, total)
                    else:
                        guide_global = _accumulate(guide_global, total)
                    continue
                if like is None:
                    like = log_p
                if p.sample:
                    samples.append((site["value"], (p.data_dim,), site["fn"].event_dim, None))
                if p.inner is not None:
                    log_p = log_p * p.inner
                if p.pad is not None:
                    log_p = log_p.reshape(p.pad)
                if p.other is not None:
                    log_p = log_p.sum(p.other)
                if is_model:
                    model_local = _accumulate(model_local, log_p)
                    if p.is_prior:
                        prior_local = _accumulate(prior_local, log_p)
                else:
                    guide_local = _accumulate(guide_local, log_p)
        if next(planned, None) is not None:
            return None
        model_local, guide_local = _as_tensor(model_local, like), _as_tensor(guide_local, like)
        data_shape = (model_local.shape[-1] if model_local.dim() else 1,)
        return LogWeights(
            model_local,
            guide_local,
            model_global,
            guide_global,
            prior_local,
            prior_global,
            self.outer,
            self.local,
            samples,
            [],
            None,
            data_shape,
        )


def _stack_particles(parts: list[LogWeights]) -> LogWeights:
    """One particle's log-weights each, looped, stacked as vectorized particles are: the
    samples remember their particle, the local score terms are concatenated."""
    first = parts[0]
    return first._replace(
        model_local=torch.cat([p.model_local for p in parts]),
        guide_local=torch.cat([p.guide_local for p in parts]),
        prior_local=(
            torch.cat([p.prior_local for p in parts])
            if isinstance(first.prior_local, Tensor)
            else 0.0
        ),
        samples=[v[:3] + (k,) for k, p in enumerate(parts) for v in p.samples],
        scores=[
            (s[0], s[1], torch.cat([p.scores[j][2] for p in parts]) if s[3] else s[2], s[3])
            for j, s in enumerate(first.scores)
        ],
    )


def _common_dims(model_trace, guide_trace) -> tuple[int, ...]:
    """Dims of the vectorized plates that hold every sample site of both traces."""
    stacks = [
        {f for f in site["cond_indep_stack"] if f.vectorized and f.name != PARTICLE_PLATE}
        for trace in (model_trace, guide_trace)
        for site in trace.nodes.values()
        if site["type"] == "sample" and not isinstance(site["fn"], _Subsample)
    ]
    common = set.intersection(*stacks) if stacks else set()
    return tuple(sorted(f.dim for f in common))


def _downstream_costs(model_trace, guide_trace) -> MultiFrameTensor:
    """Trace_ELBO's log_r: each model site's scaled log p, less the guide's log q at the
    latent ones, as a MultiFrameTensor for per-plate sums."""

    def scaled(site):
        log_p = site_log_prob(site)
        return log_p if _is_one(site["scale"]) else log_p * site["scale"]

    log_r = MultiFrameTensor()
    with torch.no_grad():
        for name, site in model_trace.nodes.items():
            if site["type"] != "sample" or isinstance(site["fn"], _Subsample):
                continue
            value = scaled(site)
            guide_site = guide_trace.nodes.get(name)
            if not site["is_observed"] and guide_site is not None:
                value = value - scaled(guide_site)
            log_r.add((tuple(f for f in site["cond_indep_stack"] if f.vectorized), value))
    return log_r


def log_weights(
    model: Callable,
    guide: Callable,
    *args,
    num_particles: int = 1,
    local_plate: str | None = None,
    stop_guide: bool = False,
    split_prior: bool = False,
    vectorize_particles: bool = True,
    max_plate_nesting: float = float("inf"),
    **kwargs,
) -> LogWeights:
    r"""One draw of :math:`K` importance weights of ``guide`` for ``model``, per datapoint.

    The computation behind :class:`Trace_IWELBO`: ``log_weights(...).log_w`` is the
    ``[K, B]`` matrix :math:`\log p(x_i, z_{ik} \mid \beta) - \log q(z_{ik} \mid x_i)`
    over the local plate's minibatch (or ``[K]`` whole-trace log-weights when the model
    has no local plate), and ``.log_mean_weight()`` each datapoint's IWAE estimate.

    Arguments:
        model, guide: A Pyro model and guide.
        \*args, \*\*kwargs: Their arguments.
        num_particles: :math:`K`.
        local_plate: The plate over datapoints; found as :class:`Trace_IWELBO` finds it
            when None.
        stop_guide: Evaluate :math:`\log q` with the guide's parameters stopped.
        split_prior: Also track the local and global log-priors (see
            :meth:`Trace_IWELBO.log_weights`).
        vectorize_particles, max_plate_nesting: As in :class:`Trace_IWELBO`.

    Returns:
        :class:`LogWeights`.
    """
    elbo = Trace_IWELBO(
        num_particles,
        local_plate=local_plate,
        vectorize_particles=vectorize_particles,
        max_plate_nesting=max_plate_nesting,
    )
    return elbo.log_weights(
        model, guide, *args, stop_guide=stop_guide, split_prior=split_prior, **kwargs
    )


class _ScaleGrad:
    """Backward hook multiplying a sample's gradient by its particle's normalized weight."""

    __slots__ = ("weights",)

    def __init__(self, weights: Tensor):
        self.weights = weights

    def __call__(self, grad: Tensor) -> Tensor:
        return grad * self.weights
