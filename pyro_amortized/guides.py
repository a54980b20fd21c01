r"""Amortized autoguides: an encoder maps each datapoint to the posterior of its local latents."""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from typing import NamedTuple

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.distributions.distribution import COERCIONS
from pyro.distributions.transforms import biject_to
from pyro.infer.autoguide import AutoGuide, AutoNormal
from pyro.nn import PyroModule
from pyro.params.param_store import param_with_module_name
from pyro.poutine.indep_messenger import CondIndepStackFrame
from pyro.poutine.util import is_validation_enabled
from torch import Tensor, nn
from torch.distributions import Distribution as TorchDistribution
from torch.distributions.transforms import ComposeTransform, IndependentTransform, Transform

from .devices import data_device
from .encoders import EncoderOutput, MLPEncoder

__all__ = ["AutoAmortizedGuide", "AutoAmortizedNormal", "ContextSpec", "GuideCall"]

#: What an amortized guide's encoder sees: see :class:`AutoAmortizedGuide`'s ``context``.
ContextSpec = int | str | Callable[..., Tensor] | None


class GuideCall(NamedTuple):
    """One call of an amortized guide before its local sites are sampled.

    :meth:`AutoAmortizedGuide.prepare` makes the call's plates and samples its global
    sites; :meth:`AutoAmortizedGuide.sample_local` then samples the local sites under the
    same plates, from any :class:`~pyro_amortized.encoders.EncoderOutput` (the encoder's,
    or refined parameters).
    """

    plates: dict[str, pyro.plate]  # every plate of the guide, by name
    plate: pyro.plate  # the local plate, over this call's datapoints
    values: dict[str, Tensor]  # the global sites' values this call drew
    rows: Tensor  # the encoder's input: the context rows of the plate's datapoints


class _LocalSite(NamedTuple):
    """Where one local site lives in the encoder's flat output and how to reshape it back."""

    name: str
    start: int
    stop: int
    shape: torch.Size  # per-datapoint shape of the unconstrained value
    position: int  # index of the local plate's dimension in the unconstrained value
    event_dim: int  # event dim of the unconstrained value
    transform: Transform | None  # unconstrained -> constrained bijection; None for identity
    frames: tuple[CondIndepStackFrame, ...]
    scale: float = 1.0  # the model's scale on the site, less its plates' subsample scales


def _is_sizeless(frame: CondIndepStackFrame) -> bool:
    """Whether a plate was made without a size, ``pyro.plate(name)`` (Pyro's size -1)."""
    return frame.size is None or frame.size < 0


def _normal(loc: Tensor, scale: Tensor) -> dist.Normal:
    """``dist.Normal(loc, scale)``; for two tensors of one shape, built as its constructor
    builds it but on the tensors themselves.

    The constructor's ``broadcast_all`` hands back a view of each tensor even when the
    shapes agree, an autograd node apiece in every forward and backward pass of a step;
    the distribution is the same either way (same values, dtype, device and batch shape,
    arguments validated as Pyro's setting says). A coercion registered with Pyro's
    distributions (``pyro.contrib.funsor``) gets the constructor.
    """
    if COERCIONS or loc.shape != scale.shape:
        return dist.Normal(loc, scale)
    fn = dist.Normal.__new__(dist.Normal)
    fn.loc, fn.scale = loc, scale
    TorchDistribution.__init__(fn, loc.shape)  # what Normal.__init__ ends with
    return fn


def _is_identity(transform: Transform) -> bool:
    while isinstance(transform, IndependentTransform):
        transform = transform.base_transform
    return isinstance(transform, ComposeTransform) and not transform.parts


class _Hiding:
    """``poutine.block(model, hide=names)`` as a picklable callable: the default global
    guide's model, which a pickled guide keeps (a blocked function is not picklable)."""

    def __init__(self, model: Callable, hide: Sequence[str]):
        self.model, self.hide = model, tuple(hide)

    def __call__(self, *args, **kwargs):
        return poutine.block(self.model, hide=list(self.hide))(*args, **kwargs)


def _model_signature(model: Callable) -> inspect.Signature | None:
    # PyroModule.__call__ takes (*args, **kwargs); the model's own arguments are forward's.
    if isinstance(model, nn.Module):
        model = model.forward
    try:
        return inspect.signature(model)
    except (TypeError, ValueError):
        return None


class AutoAmortizedGuide(AutoGuide):
    r"""Base class of the amortized autoguides: site discovery, plates, context, and the
    guide API that every amortized guide answers.

    On its first call the guide traces the model once and splits its latent sites into
    **local** sites (inside the plate named ``local_plate``) and **global** sites
    (everything else). Subclasses decide how the local sites are sampled from the
    encoder's output; global sites go to ``global_guide``.

    Arguments:
        model: A Pyro model.
        local_plate: Name of the plate over datapoints.
        context: What the encoder sees for each datapoint. ``None`` takes the model's
            first tensor argument; an ``int`` or ``str`` names a positional or keyword
            argument; a callable ``(*args, **kwargs) -> Tensor[batch, C]`` computes it.
            When the context has the plate's full size and the plate is subsampled,
            the minibatch rows are picked with the plate's indices.
        global_guide: Guide for the global sites. Defaults to ``AutoNormal`` on the
            model with the local sites hidden.
        init_scale: Initial posterior scale of every site.
        create_plates: As in :class:`~pyro.infer.autoguide.AutoGuide`. Rarely needed:
            a model plate taking ``subsample=`` from one of the model's arguments is
            recognized by itself.

    How the guide follows the model's plate and sites:

    - **Minibatch contexts.** When the first call's context has as many rows as the
      plate's subsample size, below its full size (``pyro.plate("data", N,
      subsample_size=len(batch))`` with a batch a DataLoader cut, as in Pyro's Lightning
      example), every call's context is taken to be the minibatch: the guide's plate is
      ``pyro.plate("data", N, subsample_size=rows)``, with the model's scale N / rows.
    - **Plates without a size** (``pyro.plate("data")``): the guide's plate has none
      either, and the context's rows are the datapoints.
    - **Scales.** A local site gets the scale the model gives it on the first call (a
      ``poutine.scale``, as Pyro's scANVI example puts on its plate), less the plates'
      subsample scales, which the guide's own plates add. The scale is read once: one
      that changes between calls (KL annealing) is not followed; use
      :class:`~pyro_amortized.Trace_IWELBO`'s ``kl_weight`` for that.
    - **Enumerated sites.** A discrete site the model marks ``infer={"enumerate": ...}``
      has no site in the guide, as with Pyro's autoguides, so that
      :class:`~pyro.infer.TraceEnum_ELBO` sums it out.
    - **The param store.** The networks are named in Pyro's param store after the guide
      (``"AutoAmortizedNormal.encoder$$$head.weight"``); a guide called after
      ``pyro.get_param_store().load(path)`` takes the stored tensors of its names, as
      ``pyro.module(..., update_module_params=True)`` does, and trains them.

    **The guide API.** Every amortized guide answers :meth:`posterior` (the
    per-datapoint distribution of the joint unconstrained local latent, built from the
    encoder's output by :meth:`local_distribution`), :meth:`median` and
    :meth:`quantiles`, and samples in two public steps, :meth:`prepare` then
    :meth:`sample_local`, so that a wrapper can change the local parameters in between
    (:class:`~pyro_amortized.SemiAmortizedGuide` refines them there).
    """

    #: The family of per-datapoint posterior: ``"normal"``, ``"flow"`` or ``"iaf"``.
    family: str = ""
    #: Networks that every call reaches through :meth:`_network`, which checks them
    #: against the param store there, so that ``prepare`` need not.
    _checked_networks: tuple[str, ...] = ()

    def __init__(
        self,
        model: Callable,
        *,
        local_plate: str = "data",
        context: ContextSpec = None,
        global_guide: Callable | None = None,
        init_scale: float = 0.1,
        create_plates: Callable | None = None,
    ):
        if not isinstance(local_plate, str) or not local_plate:
            raise ValueError(
                f"local_plate must be a plate name (a non-empty str), got {local_plate!r}"
            )
        if not (context is None or isinstance(context, (int, str)) or callable(context)):
            raise ValueError(
                "context must be None (the model's first tensor argument), an argument "
                f"index or name, or a callable returning a tensor; got {context!r}"
            )
        if isinstance(context, bool):
            raise ValueError(f"context must be an argument index or name, got {context!r}")
        if not isinstance(init_scale, (int, float)) or not init_scale > 0:
            raise ValueError(f"init_scale must be a positive float, got {init_scale!r}")
        super().__init__(model, create_plates=create_plates)
        self.local_plate = local_plate
        self.init_scale = float(init_scale)
        self._context_spec = context
        self._context_location: tuple[str, int | str] | None = None
        self._subsample_location: tuple[str, object] | None = None
        self._global_guide_arg = global_guide
        self.global_guide: Callable | None = None
        self._global_guide_fn: tuple[Callable] | None = None
        self._local_sites: list[_LocalSite] = []
        self._latent_dim = 0
        self._default_encoder = False  # subclasses that build an MLPEncoder set it
        self._minibatch_context = False  # see _local_plate_args
        self._context_row_shape: torch.Size | None = None  # what the default encoder takes

    @property
    def latent_dim(self) -> int:
        """Total unconstrained size of the local sites per datapoint (0 before the first call)."""
        return self._latent_dim

    @property
    def local_sites(self) -> tuple[str, ...]:
        """The names of the local sites, in the order of the joint latent's columns."""
        return tuple(site.name for site in self._local_sites)

    # ------------------------------------------------------------ guide API
    def setup(self, *args, **kwargs) -> None:
        """Trace the model and build the networks and the global guide's parameters, as
        the first call does (a no-op after it): a guide so set up has every entry of its
        ``state_dict()``, and can ``load_state_dict`` a saved one.

        Nothing is sampled into an outer trace; the model's own draws use the global
        random state, as any autoguide's first call does.
        """
        self._setup(*args, **kwargs)
        guide = self.global_guide
        if isinstance(guide, AutoGuide) and guide.prototype_trace is None:
            # what its first call does first; its parameters are created under the
            # module's context, so they take a loaded param store's values as in a call
            with self._pyro_context, poutine.block():
                guide._setup_prototype(*args, **kwargs)

    def _setup(self, *args, **kwargs) -> None:
        """The guide's own set-up (the global guide sets itself up on its first call)."""
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        self._load_networks_from_param_store()

    def prepare(self, *args, **kwargs) -> GuideCall:
        """The first half of a call: plates made, global sites sampled, rows selected.

        ``guide(*args, **kwargs)`` is ``guide.sample_local(call, guide.encode_rows(call.rows))``
        with ``call = guide.prepare(*args, **kwargs)``.
        """
        # as in a call: under the module's Pyro context, so that the networks it reaches
        # are registered in the trace (SVI trains what the trace shows)
        with self._pyro_context:
            if self.prototype_trace is None:
                self._setup(*args, **kwargs)
            else:  # _setup's remainder, less the networks the call checks as it reaches them
                self._load_networks_from_param_store(skip=self._checked_networks)
            context = self._raw_context(args, kwargs)
            plates = self._make_plates(context, args, kwargs)
            values = self._global_sample(*args, **kwargs)
            plate = plates[self.local_plate]
            rows = self._select_rows(context, plate, args, kwargs)
        return GuideCall(plates, plate, values, rows)

    def encode_rows(self, rows: Tensor) -> EncoderOutput:
        """The encoder's output for context rows, one row per datapoint."""
        with self._pyro_context:
            return EncoderOutput(*self._encode(rows))

    def encoder_output(self, *args, **kwargs) -> EncoderOutput:
        """The encoder's output for the datapoints of a model call (its minibatch rows,
        when the model's arguments carry subsample indices)."""
        self._setup(*args, **kwargs)
        return self.encode_rows(
            self._select_rows(self._raw_context(args, kwargs), None, args, kwargs)
        )

    def sample_local(self, call: GuideCall, output: EncoderOutput) -> dict[str, Tensor]:
        """The second half of a call: the local sites sampled from ``output`` under the
        call's plates. Returns every site's value, the call's globals included."""
        with self._pyro_context:
            return self._sample_sites(call, output)

    def _sample_sites(self, call: GuideCall, output: EncoderOutput) -> dict[str, Tensor]:
        raise NotImplementedError

    def local_distribution(self, output: EncoderOutput) -> torch.distributions.Distribution:
        """The distribution of the joint unconstrained local latent for an encoder output:
        batch shape ``[batch]``, event shape ``[latent_dim]``, columns in the order of
        :attr:`local_sites`."""
        raise NotImplementedError

    def posterior(self, *args, **kwargs) -> torch.distributions.Distribution:
        """The posterior of the joint unconstrained local latent of a model call's
        datapoints (:meth:`local_distribution` of :meth:`encoder_output`): batch shape
        ``[batch]``, event shape ``[latent_dim]``. :meth:`latent_to_sites` maps its
        samples to the sites."""
        return self.local_distribution(self.encoder_output(*args, **kwargs))

    def latent_to_sites(self, latent: Tensor) -> dict[str, Tensor]:
        """Each local site's constrained value in a ``[..., batch, latent_dim]`` joint
        unconstrained latent, in the model's layout (the plate's dimension where the
        model puts it)."""
        result = {}
        for site in self._local_sites:
            block = self._split(latent, site)
            result[site.name] = block if site.transform is None else site.transform(block)
        return result

    def sites_to_latent(self, values: Mapping[str, Tensor]) -> Tensor:
        """The inverse of :meth:`latent_to_sites`: the ``[..., batch, latent_dim]`` joint
        unconstrained latent of the local sites' constrained values (each in the model's
        layout, as a trace of the guide holds them)."""
        blocks = []
        for site in self._local_sites:
            block = values[site.name]
            if site.transform is not None:
                block = site.transform.inv(block)
            lead = block.dim() - 1 - len(site.shape)  # dims left of the datapoint's
            if site.position != 0:
                block = block.movedim(lead + site.position, lead)
            blocks.append(block.reshape(block.shape[: lead + 1] + (-1,)))
        return blocks[0] if len(blocks) == 1 else torch.cat(blocks, -1)

    @torch.no_grad()
    def median(self, *args, **kwargs) -> dict[str, Tensor]:
        """A point estimate of every latent site: locals per datapoint, and globals.

        The posterior median for :class:`AutoAmortizedNormal`; a flow guide gives its
        flow's image of the base median (see its docstring).
        """
        self._setup(*args, **kwargs)
        result = self._global_call("median", *args, **kwargs)
        result.update(
            self.latent_to_sites(self._median_latent(self.encoder_output(*args, **kwargs)))
        )
        return result

    @torch.no_grad()
    def quantiles(self, quantiles: Sequence[float] | Tensor, *args, **kwargs) -> dict[str, Tensor]:
        """Posterior quantiles of every latent site (locals per datapoint, and globals);
        each result has a leading dimension of the quantiles."""
        self._setup(*args, **kwargs)
        result = self._global_call("quantiles", quantiles, *args, **kwargs)
        output = self.encoder_output(*args, **kwargs)
        q = torch.as_tensor(quantiles, dtype=output.loc.dtype, device=output.loc.device)
        result.update(self._local_quantiles(output, q))
        return result

    def _median_latent(self, output: EncoderOutput) -> Tensor:
        """The joint unconstrained latent that :meth:`median` maps to the sites."""
        raise NotImplementedError

    def _local_quantiles(self, output: EncoderOutput, q: Tensor) -> dict[str, Tensor]:
        raise NotImplementedError

    def forward(self, *args, **kwargs) -> dict[str, Tensor]:
        # prepare, encode_rows and sample_local in one entry of the module's Pyro context
        # (each enters it for callers outside a call): the same statements, once per call
        with self._pyro_context:
            call = self.prepare(*args, **kwargs)
            return self._sample_sites(call, EncoderOutput(*self._encode(call.rows)))

    # -------------------------------------------------------------- pickling
    def __getstate__(self) -> dict:
        """What ``torch.save(guide)`` pickles: the guide with its model.

        Pyro's ``AutoGuide`` drops its model and its master's weakref when pickled, from
        the guide itself as well as from the copy, so that ``guide.model`` fails after a
        ``torch.save``. An amortized guide keeps both on itself and its model (and its
        global guide's) in the copy, which can then set up again and refine; the model
        must be picklable (a module-level function or class, importable where it loads).
        A ``global_guide=`` of the user's loses its model in the copy, as Pyro's do.
        """
        model, master = self._model, self.master
        state = super().__getstate__()
        self._model, self.master = model, master
        state["_model"] = model
        for cache in ("_first_parameters", "_parameter_names"):
            state.pop(cache, None)  # look-ups kept between calls, made again on the next
        if isinstance(model[0], nn.Module):
            # pyro.param marks a network's parameters with a weakref, as PyroModule's own
            # __getstate__ knows for its parameters; pyro.module(name, net) in the model so
            # marks the model's (Pyro puts it back at the next pyro.param)
            for param in model[0].parameters():
                param.__dict__.pop("unconstrained", None)
        guide = self.global_guide
        if isinstance(guide, AutoGuide):
            # Pyro's AutoGuide.__getstate__ would run on the global guide itself: pickle a
            # shallow twin instead, whose model and master it drops, and restore its model.
            twin = object.__new__(type(guide))
            twin.__dict__.update(guide.__dict__)
            state["_modules"] = {**state["_modules"], "global_guide": twin}
            if state["_global_guide_arg"] is guide:
                state["_global_guide_arg"] = twin
            elif isinstance(guide.model, _Hiding):
                # the default AutoNormal's model is picklable; a user's guide's may not be
                state["_global_guide_model"] = guide._model
        return state

    def __setstate__(self, state: dict) -> None:
        global_model = state.pop("_global_guide_model", None)
        super().__setstate__(state)
        if global_model is not None:
            self.global_guide._model = global_model

    # ----------------------------------------------------------------- setup
    def _setup_prototype(self, *args, **kwargs) -> None:
        super()._setup_prototype(*args, **kwargs)
        try:
            self._setup_local_sites(args, kwargs)
        except BaseException:
            # A failed setup must not look done: the next call would skip it.
            self.prototype_trace = None
            self._local_sites = []
            self._latent_dim = 0
            raise

    def _setup_local_sites(self, args, kwargs) -> None:
        guide_name = type(self).__name__
        self._local_sites = []
        frame = self._find_local_frame(*args, **kwargs)
        self._local_frame = frame
        self._locate_subsample(frame, args, kwargs)
        self._locate_context(args, kwargs)
        context = self._raw_context(args, kwargs)
        rows = context.shape[0]
        full_size = frame.full_size or frame.size
        if _is_sizeless(frame):
            # pyro.plate(name) without a size: Pyro takes the size from the sites, and the
            # guide takes it from the context, one row per datapoint.
            expected = rows
        else:
            self._check_rows(rows, full_size, frame.size)
            expected = frame.size
        # Context rows equal to the plate's subsample size, below its full size: a
        # DataLoader already cut this minibatch (Pyro's Lightning example), so the guide's
        # plate keeps the model's full size and the subsample scale N / B.
        self._minibatch_context = (
            self._subsample_location is None
            and self.create_plates is None
            and frame.size < full_size
            and rows == frame.size
        )

        local_names, enumerated = [], []  # enumerated: left to TraceEnum_ELBO
        start = 0
        for name, site in self.prototype_trace.iter_stochastic_nodes():
            fn = site["fn"]
            if site["infer"].get("enumerate") and fn.has_enumerate_support:
                # As Pyro's autoguides leave such sites to TraceEnum_ELBO: the model
                # enumerates them, the guide has no site for them.
                enumerated.append(name)
                continue
            if frame not in site["cond_indep_stack"]:
                continue
            if fn.support.is_discrete or not fn.has_rsample:
                if fn.support.is_discrete:
                    raise ValueError(
                        f"{guide_name}: latent site '{name}' inside plate '{self.local_plate}' is "
                        f"discrete ({type(fn).__name__}); amortized guides sample continuous, "
                        "reparameterizable local latents. Mark it "
                        'infer={"enumerate": "parallel"} in the model so that TraceEnum_ELBO '
                        "sums it out (the guide then leaves it out), or marginalize it in the "
                        "model."
                    )
                raise ValueError(
                    f"{guide_name}: latent site '{name}' inside plate '{self.local_plate}' is not "
                    f"reparameterizable ({type(fn).__name__}); amortized guides need "
                    "continuous, reparameterizable local latents. Marginalize it in the model "
                    "or move it out of the plate."
                )
            for other in site["cond_indep_stack"]:
                if other.name != frame.name and (other.full_size or other.size) != other.size:
                    raise ValueError(
                        f"{guide_name}: local site '{name}' sits in subsampled plate "
                        f"'{other.name}' nested in '{self.local_plate}'; only the local plate "
                        "itself may be subsampled."
                    )
            transform = biject_to(fn.support)
            unconstrained = transform.inv(site["value"].detach())
            if _is_identity(transform):
                transform = None
            event_dim = fn.event_dim + unconstrained.dim() - site["value"].dim()
            position = unconstrained.dim() - event_dim + frame.dim
            if position < 0 or unconstrained.shape[position] != expected:
                what = (
                    f"{expected} (the context's rows: plate '{frame.name}' has no size, so the "
                    "guide takes it from the context; pass context= one row per datapoint)"
                    if _is_sizeless(frame)
                    else str(expected)
                )
                raise ValueError(
                    f"{guide_name}: site '{name}' has shape {tuple(site['value'].shape)}, "
                    f"which has no dimension of size {what} at plate '{frame.name}' "
                    f"dim {frame.dim}"
                )
            shape = unconstrained.movedim(position, 0).shape[1:]
            stop = start + shape.numel()
            frames = tuple(f for f in site["cond_indep_stack"] if f.vectorized)
            scale = self._model_scale(name, site)
            self._local_sites.append(
                _LocalSite(name, start, stop, shape, position, event_dim, transform, frames, scale)
            )
            local_names.append(name)
            start = stop
        self._latent_dim = start
        if not self._local_sites:
            raise ValueError(
                f"{guide_name}: plate '{self.local_plate}' holds no latent site, so "
                "there is nothing to amortize; use an ordinary autoguide such as AutoNormal."
            )

        self._setup_encoder(self._select_rows(context, None, args, kwargs))

        global_guide = self._global_guide_arg
        hidden = local_names + enumerated
        has_globals = any(
            name not in hidden for name, _ in self.prototype_trace.iter_stochastic_nodes()
        )
        if global_guide is None and has_globals:
            global_guide = AutoNormal(_Hiding(self.model, hidden), init_scale=self.init_scale)
        if isinstance(global_guide, nn.Module):
            self.global_guide = global_guide
        elif global_guide is not None:
            self._global_guide_fn = (global_guide,)  # plain callables are not submodules

    def _model_scale(self, name: str, site: dict) -> float:
        """The scale the model puts on a local site besides its plates' subsample scales
        (a ``poutine.scale``, as Pyro's scANVI example puts on its whole plate).

        The guide samples the site under this scale, and its own plates add their subsample
        scales, so the guide's site has the model's scale and log q is weighted as log p.
        """
        scale = site["scale"]
        if isinstance(scale, Tensor):
            if scale.numel() != 1:
                raise ValueError(
                    f"{type(self).__name__}: local site '{name}' has a scale of shape "
                    f"{tuple(scale.shape)} in the model (a poutine.scale with a tensor); the "
                    "guide can mirror one number per site, not per-element weights that change "
                    "with the data. Put such weights on the observed sites only, or give the "
                    "site a scalar scale."
                )
            scale = scale.item()
        subsample = 1.0
        for frame in site["cond_indep_stack"]:
            if frame.size is not None and frame.size > 0 and frame.full_size:
                subsample *= frame.full_size / frame.size
        scale = float(scale) / subsample
        return 1.0 if math.isclose(scale, 1.0, rel_tol=1e-12) else scale

    def _find_local_frame(self, *args, **kwargs) -> CondIndepStackFrame:
        # Plates that hold only observed sites are invisible in the prototype trace.
        with poutine.block():
            full_trace = poutine.trace(self.model).get_trace(*args, **kwargs)
        frames = {}
        for site in full_trace.nodes.values():
            if site["type"] == "sample":
                for f in site["cond_indep_stack"]:
                    frames.setdefault(f.name, f)
        if self.local_plate not in frames:
            found = ", ".join(repr(n) for n in sorted(frames)) or "none"
            raise ValueError(
                f"{type(self).__name__}: the model has no plate named '{self.local_plate}' "
                f"(plates found: {found}); pass local_plate= the name of the plate over datapoints."
            )
        frame = frames[self.local_plate]
        if not frame.vectorized:
            raise ValueError(
                f"{type(self).__name__}: plate '{self.local_plate}' is sequential; amortized "
                "guides need a vectorized plate (with pyro.plate(...) as ...)."
            )
        self._local_subsample_site = full_trace.nodes.get(self.local_plate)
        return frame

    def _locate_subsample(self, frame, args, kwargs) -> None:
        """Recognize a model plate that takes ``subsample=`` from one of the model's arguments."""
        site = self._local_subsample_site
        full_size = frame.full_size or frame.size
        if self.create_plates is not None or site is None:
            return
        if frame.size == full_size:
            # This call ran the whole plate, but an argument left at None may carry the
            # indices later, as in model(x, idx=None); find it now, or later minibatches
            # would silently run on every row (the model replays the guide's plate).
            self._subsample_location = self._probe_subsample_argument(args, kwargs)
            return
        if site["fn"].subsample_size is not None:
            return  # the plate draws its own indices: subsample_size=
        indices = site["value"]
        for i, arg in enumerate(args):
            if arg is indices:
                self._subsample_location = ("arg", i)
                return
        for key, arg in kwargs.items():
            if arg is indices:
                self._subsample_location = ("kwarg", key)
                return
        raise ValueError(
            f"{type(self).__name__}: plate '{self.local_plate}' takes subsample= indices that "
            "are not one of the model's arguments, so the guide cannot see them; pass "
            f"create_plates=lambda *args, **kwargs: pyro.plate('{self.local_plate}', size, "
            "subsample=...)."
        )

    def _probe_subsample_argument(self, args, kwargs) -> tuple[str, object] | None:
        """The model argument, None in this call, that the local plate takes as ``subsample=``."""
        signature = _model_signature(self.model)
        if signature is None:
            return None
        # on the data's device (the first tensor argument's); CPU without any
        probe = torch.arange(1, device=data_device(args, kwargs) or "cpu")
        named = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
        for i, param in enumerate(signature.parameters.values()):
            if param.kind in named:
                continue
            positional = i < len(args) and param.kind != inspect.Parameter.KEYWORD_ONLY
            value = args[i] if positional else kwargs.get(param.name, param.default)
            if value is not None:
                continue
            trial_args, trial_kwargs = list(args), dict(kwargs)
            if positional:
                trial_args[i] = probe
            else:
                trial_kwargs[param.name] = probe
            try:
                with poutine.block():
                    trace = poutine.trace(self.model).get_trace(*trial_args, **trial_kwargs)
            except Exception:  # the argument is something else; the model may reject it
                continue
            node = trace.nodes.get(self.local_plate)
            if node is not None and node["value"] is probe:
                if param.kind == inspect.Parameter.KEYWORD_ONLY:
                    return ("kwarg", param.name)
                return ("param", (i, param.name))
        return None

    def _locate_context(self, args, kwargs) -> None:
        spec = self._context_spec
        name = type(self).__name__
        if callable(spec):
            return
        if spec is None:
            for i, arg in enumerate(args):
                if isinstance(arg, Tensor):
                    self._context_location = ("arg", i)
                    return
            for key, arg in kwargs.items():
                if isinstance(arg, Tensor):
                    self._context_location = ("kwarg", key)
                    return
            raise ValueError(
                f"{name}: the model got no tensor argument to use as context; pass context= "
                "an argument index or name, or a callable returning a [batch, C] tensor."
            )
        if isinstance(spec, int):
            if not -len(args) <= spec < len(args):
                raise ValueError(
                    f"{name}: context={spec} but the model got {len(args)} positional arguments"
                )
            self._context_location = ("arg", spec)
            return
        signature = _model_signature(self.model)
        position = None
        if signature is not None and spec in signature.parameters:
            params = list(signature.parameters)
            position = params.index(spec)
        if spec not in kwargs and (position is None or position >= len(args)):
            raise ValueError(
                f"{name}: context='{spec}' names no argument of this model call "
                f"(keyword arguments: {sorted(kwargs)})"
            )
        self._context_location = ("kwarg", spec) if spec in kwargs else ("arg", position)

    def _check_rows(self, rows: int, size: int, minibatch: int) -> None:
        if rows not in (size, minibatch):
            raise ValueError(
                f"{type(self).__name__}: the context has {rows} rows but plate "
                f"'{self.local_plate}' has size {size} (minibatch {minibatch}); the "
                "context needs one row per datapoint, or per minibatch datapoint. Pass "
                "context= to pick or compute it."
            )

    def _setup_encoder(self, context: Tensor) -> None:
        """Subclasses build or check their encoder for the given context here."""

    def _build_default_encoder(
        self, context: Tensor, hidden_dims: Sequence[int], context_dim: int = 0
    ) -> None:
        """``self.encoder``: an MLPEncoder for this context, with an observed-mask input when
        the context has NaNs, in the context's floating dtype and on its device."""
        observed_mask = bool(context.is_floating_point() and torch.isnan(context).any())
        dtype = context.dtype if context.is_floating_point() else torch.get_default_dtype()
        with torch.device(context.device):  # built there, not on the default device
            encoder = MLPEncoder(
                context[0].numel(),
                self._latent_dim,
                hidden_dims,
                init_scale=self.init_scale,
                observed_mask=observed_mask,
                context_dim=context_dim,
            )
        self.encoder = encoder.to(dtype=dtype)
        self._context_row_shape = context.shape[1:]

    def _encoder_input(self, context: Tensor) -> Tensor:
        """The context as the default encoder takes it: floating, one flat row per datapoint.

        A user's encoder gets the context as it is.
        """
        if not self._default_encoder:
            return context
        expected = getattr(self, "_context_row_shape", None)  # None: pickled before it
        if expected is not None and context.shape[1:] != expected:
            # An MLP has a fixed input width; a shorter sequence would fail in a matmul.
            raise ValueError(
                f"{type(self).__name__}: the context of plate '{self.local_plate}' has rows of "
                f"shape {tuple(context.shape[1:])}, but the default encoder was built for rows "
                f"of shape {tuple(expected)} on the first call and takes a fixed width. For "
                "sequences of different lengths, pad every batch to the longest sequence "
                "(with a mask in the model), pass context= a callable returning a fixed-width "
                "summary per datapoint, or pass encoder= a network that takes variable widths "
                "(e.g. an RNN)."
            )
        if not context.is_floating_point():
            context = context.to(torch.get_default_dtype())
        if context.dim() != 2:
            context = context.reshape(context.shape[0], -1)
        return context

    def _check_prototype(self, part_trace) -> None:
        for name, part_site in part_trace.iter_stochastic_nodes():
            site = self.prototype_trace.nodes[name]
            assert part_site["fn"].batch_shape == site["fn"].batch_shape
            assert part_site["value"].shape == site["value"].shape

    # ------------------------------------------------------------- per call
    @staticmethod
    def _fetch(location: tuple[str, object], args, kwargs):
        """The argument at ``location``, or None when this call does not pass it."""
        kind, key = location
        if kind == "arg":
            return args[key] if -len(args) <= key < len(args) else None
        if kind == "param":  # a parameter that may come by position or by name
            position, name = key
            return args[position] if position < len(args) else kwargs.get(name)
        return kwargs.get(key)

    def _raw_context(self, args, kwargs) -> Tensor:
        spec = self._context_spec
        if callable(spec):
            context = spec(*args, **kwargs)
        else:
            context = self._fetch(self._context_location, args, kwargs)
        if not isinstance(context, Tensor) or context.dim() == 0:
            raise ValueError(
                f"{type(self).__name__}: the context must be a tensor with one row per "
                f"datapoint of plate '{self.local_plate}', got {type(context).__name__}"
            )
        return context

    def _local_plate_args(self, rows: int, args, kwargs) -> dict:
        """Size and subsampling of the local plate for a context with ``rows`` rows.

        Data sets change size between calls (a training set, then a test set), so the
        plate is sized from this call's context, not from the first call's, unless the
        context holds only the minibatch of a plate of fixed full size.
        """
        frame = self._local_frame
        first_size = frame.full_size or frame.size
        if self._subsample_location is not None:
            indices = self._fetch(self._subsample_location, args, kwargs)
            if indices is None:
                return {"size": rows}
            already_minibatch = rows == len(indices) and rows != first_size
            return {"size": first_size if already_minibatch else rows, "subsample": indices}
        if frame.size == first_size:
            return {"size": rows}
        if getattr(self, "_minibatch_context", False) and rows <= first_size:
            # The model's plate is pyro.plate(name, N, subsample_size=len(batch)) with the
            # batch as context: N stays, and every row is a datapoint of the minibatch.
            return {"size": first_size, "subsample_size": rows}
        return {"size": rows, "subsample_size": min(frame.size, rows)}

    def _create_plates(self, *args, **kwargs) -> dict:
        if self.master is not None:
            return super()._create_plates(*args, **kwargs)
        return self._make_plates(self._raw_context(args, kwargs), args, kwargs)

    def _make_plates(self, context: Tensor, args, kwargs) -> dict:
        """The call's plates, on the context's device (their indices are drawn there)."""
        rows = context.shape[0]
        if self.create_plates is not None:
            given = self.create_plates(*args, **kwargs)
            given = [given] if isinstance(given, pyro.plate) else list(given)
            plates = {p.name: p for p in given}
        else:
            plates = {}
        # a plain dict attribute: nn.Module's and PyroModule's __setattr__ (which look for
        # parameters, modules and Pyro attributes) would run on every call for nothing
        object.__setattr__(self, "plates", plates)
        for name, frame in sorted(self._prototype_frames.items()):
            if name in plates:
                continue
            if _is_sizeless(frame):
                # as the model's: the size comes from the sites (the encoder's rows)
                plate_args = {}
            elif name == self.local_plate:
                plate_args = self._local_plate_args(rows, args, kwargs)
            else:
                plate_args = {"size": frame.full_size or frame.size, "subsample_size": frame.size}
            plates[name] = pyro.plate(name, dim=frame.dim, device=context.device, **plate_args)
        return plates

    def _select_rows(self, context: Tensor, plate: pyro.plate | None, args, kwargs) -> Tensor:
        """The context rows of the datapoints in ``plate`` (of the call's indices if None)."""
        rows = context.shape[0]
        if plate is None:
            if self._subsample_location is not None:
                indices = self._fetch(self._subsample_location, args, kwargs)
                if indices is not None and rows != len(indices):
                    context = context.index_select(0, indices)
            return context
        if plate.size is None or plate.size < 0:
            return context  # a plate without a size has as many datapoints as rows
        if plate.subsample_size < plate.size and rows == plate.size:
            return context.index_select(0, plate.indices)
        if rows != plate.subsample_size:
            self._check_rows(rows, plate.size, plate.subsample_size)
        return context

    def _load_networks_from_param_store(self, skip: tuple[str, ...] = ()) -> None:
        """Point this guide's networks (but those named in ``skip``) at the param store's
        tensors of the same names.

        A PyroModule registers a plain ``nn.Module`` attribute (the encoder, a flow) with
        ``pyro.module(name, net)``, which neither restores it from a store loaded with
        ``pyro.get_param_store().load(path)`` nor lets SVI train it then (SVI steps the
        store's tensors). This does what Pyro's recipe for a loaded store,
        ``pyro.module(name, net, update_module_params=True)``, does, and what PyroModule
        does for its own parameters: the store's tensor of a parameter's name becomes the
        network's parameter.
        """
        if not self._pyro_context.used or pyro.settings.get("module_local_params"):
            return  # no name in the store yet, or no global store at all
        store = pyro.get_param_store()
        for child, network in self._modules.items():
            if child not in skip:
                self._check_network(store, child, network)

    def _check_network(self, store, child: str, network: nn.Module | None) -> None:
        """One network of :meth:`_load_networks_from_param_store`."""
        if network is None or isinstance(network, PyroModule):
            return  # a PyroModule (the global AutoNormal) restores itself
        first = self._first_parameter(child, network)
        if first is None:
            return
        prefix, key, owner, attr = first
        # One look-up a network and call: a load replaces every tensor of the store.
        if key in store and store[key] is not owner._parameters.get(attr):
            self._load_network(store, prefix, child, network)

    def _network(self, child: str) -> nn.Module:
        """``getattr(self, child)`` for a network: the same ``pyro.param`` statements, after
        the param-store check of :meth:`_load_networks_from_param_store` for a network of
        :attr:`_checked_networks` (which a call's ``prepare`` leaves to this).

        A PyroModule registers a plain ``nn.Module`` attribute on every access with
        ``pyro.module``, which walks the network's modules for its parameters' names; here
        the names are kept between calls, and each parameter is registered as
        ``pyro.module`` registers it. Anything else (no active context, module-local
        parameters, a frozen parameter, which ``pyro.module`` skips) takes the attribute.
        """
        network = self._modules.get(child)
        local_params = pyro.settings.get("module_local_params")
        if child in self._checked_networks and self._pyro_context.used and not local_params:
            self._check_network(pyro.get_param_store(), child, network)
        if (
            network is None
            or isinstance(network, PyroModule)
            or not self._pyro_context.active
            or local_params
        ):
            return getattr(self, child)
        cache = self.__dict__.setdefault("_parameter_names", {})
        cached = cache.get(child)
        if cached is None or cached[0] is not network or cached[1] != self._pyro_name:
            prefix = self._pyro_get_fullname(child)
            names = []
            for path, _ in network.named_parameters():
                owner_path, _, attr = path.rpartition(".")
                owner = network.get_submodule(owner_path) if owner_path else network
                names.append((param_with_module_name(prefix, path), owner, attr))
            cached = cache[child] = (network, self._pyro_name, tuple(names))
        params = [(name, owner._parameters[attr]) for name, owner, attr in cached[2]]
        if not all(param.requires_grad for _, param in params):
            return getattr(self, child)
        for name, param in params:
            pyro.param(name, param)
        return network

    def _first_parameter(self, child: str, network: nn.Module) -> tuple | None:
        """Where a network's first parameter lives: (the network's name in the store, the
        parameter's, the module holding it, its attribute), or None without parameters.

        Kept between calls, for this network under this guide's name: walking the
        network's modules for it on every call costs more than the look-up it serves.
        """
        cache = self.__dict__.setdefault("_first_parameters", {})
        cached = cache.get(child)
        if cached is not None and cached[0] is network and cached[1] == self._pyro_name:
            return cached[2]
        first = next(network.named_parameters(), None)
        found = None
        if first is not None:
            prefix = self._pyro_get_fullname(child)
            owner_path, _, attr = first[0].rpartition(".")
            owner = network.get_submodule(owner_path) if owner_path else network
            found = (prefix, param_with_module_name(prefix, first[0]), owner, attr)
        cache[child] = (network, self._pyro_name, found)
        return found

    def _load_network(self, store, prefix: str, child: str, network: nn.Module) -> None:
        for path, param in list(network.named_parameters()):
            key = param_with_module_name(prefix, path)
            if key not in store:
                continue
            stored = store[key]
            if stored is param:
                continue
            if stored.shape != param.shape:
                raise ValueError(
                    f"{type(self).__name__}: the param store holds '{key}' of shape "
                    f"{tuple(stored.shape)}, but this guide's '{child}' has "
                    f"{tuple(param.shape)}; a guide takes its networks from the store by "
                    "name, so build it with the architecture the store was saved from, or "
                    "call pyro.clear_param_store() first."
                )
            if not isinstance(stored, nn.Parameter):
                stored = nn.Parameter(stored.detach())
                store[key] = stored  # the store and the network share one tensor
            owner_path, _, attr = path.rpartition(".")
            owner = network.get_submodule(owner_path) if owner_path else network
            owner._parameters[attr] = stored

    def _global_sample(self, *args, **kwargs) -> dict:
        if self.global_guide is not None:
            return self.global_guide(*args, **kwargs)
        if self._global_guide_fn is not None:
            return self._global_guide_fn[0](*args, **kwargs) or {}
        return {}

    def _split(self, flat: Tensor, site: _LocalSite) -> Tensor:
        """One site's block of a ``[batch, latent_dim]`` tensor, in the site's own layout."""
        block = (
            flat if site.stop - site.start == flat.shape[-1] else flat[..., site.start : site.stop]
        )
        if len(site.shape) != 1:
            block = block.reshape(block.shape[:-1] + site.shape)
        if site.position != 0:
            block = block.movedim(flat.dim() - 2, flat.dim() - 2 + site.position)
        return block

    def _global_call(self, method: str, *args, **kwargs) -> dict[str, Tensor]:
        guide = self.global_guide
        if guide is None:
            return {}
        if isinstance(guide, AutoGuide) and guide.prototype_trace is None:
            with poutine.block():
                self(*args, **kwargs)  # creates the global guide's plates and parameters
        return dict(getattr(guide, method)(*args, **kwargs))


class AutoAmortizedNormal(AutoAmortizedGuide):
    r"""Amortized mean-field Normal guide: an encoder maps each datapoint to a diagonal
    Normal over all its local latent sites, in unconstrained space.

    Local sites with a constrained support are sampled as
    :math:`z = T(u),\ u \sim \mathcal{N}(\mu(x), \sigma(x))` with :math:`T` =
    ``biject_to(support)``. Sites are sampled one by one, so
    :class:`~pyro.infer.TraceMeanField_ELBO` can use analytic KL divergences. Global
    sites go to ``global_guide`` (default: :class:`~pyro.infer.autoguide.AutoNormal`).

    Arguments:
        model: A Pyro model with a vectorized plate over datapoints.
        local_plate: Name of that plate.
        encoder: An ``nn.Module`` mapping a ``[batch, ...]`` context to ``(loc, scale)``,
            each ``[batch, D]`` with D the total unconstrained size of the local sites.
            Defaults to an :class:`~pyro_amortized.encoders.MLPEncoder`; it is built on
            the first call, with an observed-mask input when the context has NaNs.
        context: See :class:`AutoAmortizedGuide`.
        hidden_dims: Hidden widths of the default encoder.
        init_scale: Initial posterior scale.
        global_guide: Guide for the global sites.
        create_plates: As in :class:`~pyro.infer.autoguide.AutoGuide`.

    Example:
        >>> def model(x):
        ...     with pyro.plate("data", x.shape[0]):
        ...         z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
        ...         pyro.sample("x", dist.Normal(z, 1.0).to_event(1), obs=x)
        >>> guide = AutoAmortizedNormal(model, hidden_dims=(16,))
        >>> guide(torch.randn(5, 2))["z"].shape
        torch.Size([5, 2])

    References:
        Auto-Encoding Variational Bayes (Kingma and Welling, 2014).
        Stochastic Backpropagation and Approximate Inference in Deep Generative Models
        (Rezende, Mohamed and Wierstra, 2014).
    """

    family = "normal"
    _checked_networks = ("encoder",)

    def __init__(
        self,
        model: Callable,
        *,
        local_plate: str = "data",
        encoder: nn.Module | None = None,
        context: ContextSpec = None,
        hidden_dims: Sequence[int] = (200, 200),
        init_scale: float = 0.1,
        global_guide: Callable | None = None,
        create_plates: Callable | None = None,
    ):
        if encoder is not None and not isinstance(encoder, nn.Module):
            raise ValueError(
                f"encoder must be an nn.Module returning (loc, scale), got {encoder!r}"
            )
        hidden_dims = tuple(hidden_dims)
        if not all(isinstance(h, int) and h > 0 for h in hidden_dims):
            raise ValueError(f"hidden_dims must be positive ints, got {hidden_dims}")
        super().__init__(
            model,
            local_plate=local_plate,
            context=context,
            global_guide=global_guide,
            init_scale=init_scale,
            create_plates=create_plates,
        )
        self.hidden_dims = hidden_dims
        self._default_encoder = encoder is None
        if encoder is not None:
            self.encoder = encoder

    def _setup_encoder(self, context: Tensor) -> None:
        if self._default_encoder:
            self._build_default_encoder(context, self.hidden_dims)
            return
        loc, scale = self.encoder(self._encoder_input(context))
        expected = (context.shape[0], self._latent_dim)
        if tuple(loc.shape) != expected or tuple(scale.shape) != expected:
            sizes = ", ".join(f"'{s.name}': {s.stop - s.start}" for s in self._local_sites)
            raise ValueError(
                f"AutoAmortizedNormal: the encoder returned loc {tuple(loc.shape)} and scale "
                f"{tuple(scale.shape)}; expected {expected}, one column per unconstrained local "
                f"latent ({sizes})"
            )

    def _encode(self, context: Tensor) -> tuple[Tensor, Tensor]:
        context = self._encoder_input(context)
        encoder = self._network("encoder")
        if (
            is_validation_enabled()
            and context.is_floating_point()
            and not getattr(encoder, "observed_mask", False)
            and torch.isnan(context).any()
        ):
            raise ValueError(
                f"AutoAmortizedNormal: the context rows of plate '{self.local_plate}' contain NaN "
                "but the encoder takes no observed-mask. Call the guide first on data that "
                "shows the missing entries (the default encoder then adds a mask input), or "
                "pass an encoder with observed_mask=True."
            )
        return encoder(context)

    def _site_distribution(self, site: _LocalSite, loc: Tensor, scale: Tensor):
        base = _normal(self._split(loc, site), self._split(scale, site))
        if site.event_dim:
            base = base.to_event(site.event_dim)
        if site.transform is None:
            return base
        return dist.TransformedDistribution(base, [site.transform])

    def _sample_sites(self, call: GuideCall, output: EncoderOutput) -> dict[str, Tensor]:
        result = dict(call.values)
        for site in self._local_sites:
            if len(site.frames) == 1 and site.scale == 1.0:
                # the common site, directly in the local plate: no ExitStack to build
                with call.plates[site.frames[0].name]:
                    result[site.name] = pyro.sample(
                        site.name, self._site_distribution(site, output.loc, output.scale)
                    )
                continue
            with ExitStack() as stack:
                for frame in site.frames:
                    stack.enter_context(call.plates[frame.name])
                if site.scale != 1.0:
                    stack.enter_context(poutine.scale(scale=site.scale))
                result[site.name] = pyro.sample(
                    site.name, self._site_distribution(site, output.loc, output.scale)
                )
        return result

    def local_distribution(self, output: EncoderOutput) -> dist.Distribution:
        return dist.Normal(output.loc, output.scale).to_event(1)

    def site_posteriors(self, *args, **kwargs) -> dict[str, torch.distributions.Distribution]:
        """The posterior of every local site for a model call's datapoints: the mean-field
        factors of :meth:`posterior`, each mapped to its site's support.

        Returns:
            A dict from local site name to its distribution, with the local plate's
            dimension in the place the model gives it.
        """
        output = self.encoder_output(*args, **kwargs)
        return {
            site.name: self._site_distribution(site, output.loc, output.scale)
            for site in self._local_sites
        }

    def encode(self, *args, **kwargs) -> dict[str, torch.distributions.Distribution]:
        """Deprecated name of :meth:`site_posteriors`."""
        warnings.warn(
            "AutoAmortizedNormal.encode() is deprecated and will be removed in the next "
            "release; use guide.site_posteriors(*args) (the same), or guide.posterior(*args), "
            "which every amortized guide answers",
            FutureWarning,
            stacklevel=2,
        )
        return self.site_posteriors(*args, **kwargs)

    def _median_latent(self, output: EncoderOutput) -> Tensor:
        return output.loc

    def _local_quantiles(self, output: EncoderOutput, q: Tensor) -> dict[str, Tensor]:
        result = {}
        for site in self._local_sites:
            site_loc, site_scale = self._split(output.loc, site), self._split(output.scale, site)
            q_site = q.reshape((-1,) + (1,) * site_loc.dim())
            values = dist.Normal(site_loc, site_scale).icdf(q_site)
            result[site.name] = values if site.transform is None else site.transform(values)
        return result
