r"""Amortized autoguides: an encoder maps each datapoint to the posterior of its local latents."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from typing import NamedTuple

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.distributions.transforms import biject_to
from pyro.infer.autoguide import AutoGuide, AutoNormal
from pyro.poutine.indep_messenger import CondIndepStackFrame
from pyro.poutine.util import is_validation_enabled
from torch import Tensor, nn
from torch.distributions.transforms import ComposeTransform, IndependentTransform, Transform

from .encoders import MLPEncoder

__all__ = ["AutoAmortizedGuide", "AutoAmortizedNormal"]

ContextSpec = int | str | Callable[..., Tensor] | None


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


def _is_identity(transform: Transform) -> bool:
    while isinstance(transform, IndependentTransform):
        transform = transform.base_transform
    return isinstance(transform, ComposeTransform) and not transform.parts


def _model_signature(model: Callable) -> inspect.Signature | None:
    # PyroModule.__call__ takes (*args, **kwargs); the model's own arguments are forward's.
    if isinstance(model, nn.Module):
        model = model.forward
    try:
        return inspect.signature(model)
    except (TypeError, ValueError):
        return None


class AutoAmortizedGuide(AutoGuide):
    r"""Base class of the amortized autoguides: site discovery, plates and context.

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
    """

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
        # set by a SemiAmortizedGuide while it calls this guide: see _encode_plate
        self._refiner: Callable | None = None

    @property
    def latent_dim(self) -> int:
        """Total unconstrained size of the local sites per datapoint (0 before the first call)."""
        return self._latent_dim

    # ----------------------------------------------------------------- setup
    def _setup_prototype(self, *args, **kwargs) -> None:
        super()._setup_prototype(*args, **kwargs)
        frame = self._find_local_frame(*args, **kwargs)
        self._local_frame = frame

        local_names = []
        start = 0
        for name, site in self.prototype_trace.iter_stochastic_nodes():
            if frame not in site["cond_indep_stack"]:
                continue
            fn = site["fn"]
            if fn.support.is_discrete or not fn.has_rsample:
                kind = "discrete" if fn.support.is_discrete else "not reparameterizable"
                raise ValueError(
                    f"{type(self).__name__}: latent site '{name}' inside plate "
                    f"'{self.local_plate}' is {kind} ({type(fn).__name__}); amortized guides "
                    "need continuous, reparameterizable local latents. Marginalize it in the "
                    "model or move it out of the plate."
                )
            for other in site["cond_indep_stack"]:
                if other.name != frame.name and (other.full_size or other.size) != other.size:
                    raise ValueError(
                        f"{type(self).__name__}: local site '{name}' sits in subsampled plate "
                        f"'{other.name}' nested in '{self.local_plate}'; only the local plate "
                        "itself may be subsampled."
                    )
            transform = biject_to(fn.support)
            unconstrained = transform.inv(site["value"].detach())
            if _is_identity(transform):
                transform = None
            event_dim = fn.event_dim + unconstrained.dim() - site["value"].dim()
            position = unconstrained.dim() - event_dim + frame.dim
            if position < 0 or unconstrained.shape[position] != frame.size:
                raise ValueError(
                    f"{type(self).__name__}: site '{name}' has shape {tuple(site['value'].shape)}, "
                    f"which has no dimension of size {frame.size} at plate '{frame.name}' "
                    f"dim {frame.dim}"
                )
            shape = unconstrained.movedim(position, 0).shape[1:]
            stop = start + shape.numel()
            frames = tuple(f for f in site["cond_indep_stack"] if f.vectorized)
            self._local_sites.append(
                _LocalSite(name, start, stop, shape, position, event_dim, transform, frames)
            )
            local_names.append(name)
            start = stop
        self._latent_dim = start
        if not self._local_sites:
            raise ValueError(
                f"{type(self).__name__}: plate '{self.local_plate}' holds no latent site, so "
                "there is nothing to amortize; use an ordinary autoguide such as AutoNormal."
            )

        self._locate_subsample(frame, args, kwargs)
        self._locate_context(args, kwargs)
        context = self._raw_context(args, kwargs)
        self._check_rows(context.shape[0], frame.full_size or frame.size, frame.size)
        self._setup_encoder(self._select_rows(context, None, args, kwargs))

        global_guide = self._global_guide_arg
        has_globals = any(
            frame not in site["cond_indep_stack"]
            for _, site in self.prototype_trace.iter_stochastic_nodes()
        )
        if global_guide is None and has_globals:
            global_guide = AutoNormal(
                poutine.block(self.model, hide=local_names), init_scale=self.init_scale
            )
        if isinstance(global_guide, nn.Module):
            self.global_guide = global_guide
        elif global_guide is not None:
            self._global_guide_fn = (global_guide,)  # plain callables are not submodules

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
        device = next((a.device for a in args if isinstance(a, Tensor)), None)
        probe = torch.arange(1, device=device)
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
        encoder = MLPEncoder(
            context[0].numel(),
            self._latent_dim,
            hidden_dims,
            init_scale=self.init_scale,
            observed_mask=observed_mask,
            context_dim=context_dim,
        )
        self.encoder = encoder.to(dtype=dtype, device=context.device)

    def _encoder_input(self, context: Tensor) -> Tensor:
        """The context as the default encoder takes it: floating, one flat row per datapoint.

        A user's encoder gets the context as it is.
        """
        if not self._default_encoder:
            return context
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
        plate is sized from this call's context, not from the first call's.
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
        return {"size": rows, "subsample_size": min(frame.size, rows)}

    def _create_plates(self, *args, **kwargs) -> dict:
        if self.master is not None:
            return super()._create_plates(*args, **kwargs)
        return self._make_plates(self._raw_context(args, kwargs).shape[0], args, kwargs)

    def _make_plates(self, rows: int, args, kwargs) -> dict:
        if self.create_plates is not None:
            plates = self.create_plates(*args, **kwargs)
            plates = [plates] if isinstance(plates, pyro.plate) else list(plates)
            self.plates = {p.name: p for p in plates}
        else:
            self.plates = {}
        for name, frame in sorted(self._prototype_frames.items()):
            if name in self.plates:
                continue
            if name == self.local_plate:
                plate_args = self._local_plate_args(rows, args, kwargs)
            else:
                plate_args = {"size": frame.full_size or frame.size, "subsample_size": frame.size}
            self.plates[name] = pyro.plate(name, dim=frame.dim, **plate_args)
        return self.plates

    def _select_rows(self, context: Tensor, plate: pyro.plate | None, args, kwargs) -> Tensor:
        """The context rows of the datapoints in ``plate`` (of the call's indices if None)."""
        rows = context.shape[0]
        if plate is None:
            if self._subsample_location is not None:
                indices = self._fetch(self._subsample_location, args, kwargs)
                if indices is not None and rows != len(indices):
                    context = context.index_select(0, indices)
            return context
        if plate.subsample_size < plate.size and rows == plate.size:
            return context.index_select(0, plate.indices)
        if rows != plate.subsample_size:
            self._check_rows(rows, plate.size, plate.subsample_size)
        return context

    def _encode_plate(
        self, context: Tensor, plate: pyro.plate, globals_: dict[str, Tensor], args, kwargs
    ) -> tuple[Tensor, ...]:
        """The encoder's output for the datapoints of ``plate`` (``globals_``: this call's
        global values); a :class:`~pyro_amortized.SemiAmortizedGuide` wrapping the guide
        refines it here."""

        def encode() -> tuple[Tensor, ...]:
            return self._encode(self._select_rows(context, plate, args, kwargs))

        if self._refiner is None:
            return encode()
        return self._refiner(encode, plate, globals_)

    def _get_context(self, plate: pyro.plate | None, args, kwargs) -> Tensor:
        return self._select_rows(self._raw_context(args, kwargs), plate, args, kwargs)

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
        encoder = self.encoder
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
        base = dist.Normal(self._split(loc, site), self._split(scale, site))
        if site.event_dim:
            base = base.to_event(site.event_dim)
        if site.transform is None:
            return base
        return dist.TransformedDistribution(base, [site.transform])

    def forward(self, *args, **kwargs) -> dict[str, Tensor]:
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        context = self._raw_context(args, kwargs)
        plates = self._make_plates(context.shape[0], args, kwargs)
        result = self._global_sample(*args, **kwargs)
        plate = plates[self.local_plate]
        loc, scale = self._encode_plate(context, plate, result, args, kwargs)
        for site in self._local_sites:
            with ExitStack() as stack:
                for frame in site.frames:
                    stack.enter_context(plates[frame.name])
                result[site.name] = pyro.sample(
                    site.name, self._site_distribution(site, loc, scale)
                )
        return result

    def encode(self, *args, **kwargs) -> dict[str, torch.distributions.Distribution]:
        """The posterior of every local site for the datapoints in the model's arguments.

        Returns:
            A dict from local site name to its distribution, with the local plate's
            dimension in the place the model gives it.
        """
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        loc, scale = self._encode(self._get_context(None, args, kwargs))
        return {site.name: self._site_distribution(site, loc, scale) for site in self._local_sites}

    @torch.no_grad()
    def median(self, *args, **kwargs) -> dict[str, Tensor]:
        """Posterior median of every latent site (locals per datapoint, and globals)."""
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        result = self._global_call("median", *args, **kwargs)
        loc, _ = self._encode(self._get_context(None, args, kwargs))
        for site in self._local_sites:
            median = self._split(loc, site)
            result[site.name] = median if site.transform is None else site.transform(median)
        return result

    @torch.no_grad()
    def quantiles(self, quantiles: Sequence[float] | Tensor, *args, **kwargs) -> dict[str, Tensor]:
        """Posterior quantiles of every latent site; each result has a leading quantile dim."""
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        result = self._global_call("quantiles", quantiles, *args, **kwargs)
        loc, scale = self._encode(self._get_context(None, args, kwargs))
        q = torch.as_tensor(quantiles, dtype=loc.dtype, device=loc.device)
        for site in self._local_sites:
            site_loc, site_scale = self._split(loc, site), self._split(scale, site)
            q_site = q.reshape((-1,) + (1,) * site_loc.dim())
            values = dist.Normal(site_loc, site_scale).icdf(q_site)
            result[site.name] = values if site.transform is None else site.transform(values)
        return result
