r"""The per-datapoint optimizer: a separate posterior for every datapoint, in one program.

Cremer et al.'s :math:`q^*` (:func:`optimize_local`), Kim et al.'s and Krishnan et al.'s
refinement (:func:`~pyro_amortized.refinement.refine` and
:class:`~pyro_amortized.SemiAmortizedGuide`) and the inference gaps
(:func:`~pyro_amortized.diagnostics.inference_gaps`) are presets of one loop,
:func:`run_per_datapoint`: batched ``[N, ...]`` parameter tables, one row per datapoint,
moved by :class:`PerDatapointOptimizer` (Adam or SGD with per-row step counts, per-row
gradient clipping) for a number of steps or until each row's patience runs out. A flow
gets its own network weights per datapoint, stacked ``[N, in, out]`` and applied with one
batched matrix product.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import pyro
import torch
from pyro import poutine
from pyro.nn import ConditionalAutoRegressiveNN, ConditionalDenseNN
from pyro.poutine.subsample_messenger import _Subsample
from torch import Tensor, nn
from tqdm import tqdm

from .checks import check_count, check_counts, check_probability, check_rate, options_from, renamed
from .devices import fork_rng
from .flows import AutoAmortizedIAF, AutoAmortizedRealNVP
from .guides import AutoAmortizedGuide, AutoAmortizedNormal
from .objectives import Trace_IWELBO

__all__ = [
    "FAMILIES",
    "INITS",
    "OPTIMIZERS",
    "FixedGlobals",
    "LocalFit",
    "LocalOptions",
    "PerDatapointOptimizer",
    "PerDatapointRun",
    "clip_rows",
    "fit_local",
    "fix_globals",
    "optimize_local",
    "per_datapoint_guide",
    "run_per_datapoint",
]

#: The families of per-datapoint posterior: a diagonal Normal, Cremer et al.'s auxiliary
#: flow (:class:`~pyro_amortized.AutoAmortizedRealNVP`) and an inverse autoregressive
#: flow (:class:`~pyro_amortized.AutoAmortizedIAF`); each guide's ``family`` is one.
FAMILIES = ("normal", "flow", "iaf")
#: Where a per-datapoint posterior starts: the encoder's output, or a standard Normal.
INITS = ("encoder", "prior")
#: The per-datapoint optimizers.
OPTIMIZERS = ("adam", "sgd")
_FLOW_CLASSES = {"flow": AutoAmortizedRealNVP, "iaf": AutoAmortizedIAF}


@dataclass(frozen=True)
class LocalOptions:
    r"""The options of a per-datapoint fit (:func:`optimize_local`, and
    :func:`~pyro_amortized.diagnostics.inference_gaps`'s ``local_options``), validated.

    Arguments:
        family: ``"normal"``, ``"flow"`` or ``"iaf"``.
        init: ``"encoder"`` or ``"prior"``: where each datapoint's posterior starts.
        num_particles: Draws per step.
        lr: Adam's learning rate. On 50 binarized-MNIST test images of the VAE in
            ``docs/``, 3e-3 gave higher bounds than 1e-2 for every family (by 0.1 nats for
            the Normal, 0.6 for the auxiliary flow and 1.3 for the IAF) and than 1e-3 for
            the flow.
        max_steps: Cap on the steps.
        patience: Steps without a higher running-average bound before a datapoint stops.
            Scale it with ``1 / lr``: at 3e-3, 200 steps stopped some datapoints of a
            linear-Gaussian model 0.06 nats short of their optimum, 400 within 0.01.
        num_transforms: Flow steps of a flow family that does not copy the guide's.
        flow_hidden_dims: Hidden widths of such a flow's networks; defaults to one layer
            of ``max(50, D)`` units (D the latent dimension; an autoregressive network
            needs at least D).
    """

    family: str = "normal"
    init: str = "encoder"
    num_particles: int = 10
    lr: float = 3e-3
    max_steps: int = 5000
    patience: int = 500
    num_transforms: int = 2
    flow_hidden_dims: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        self.check(type(self).__name__)
        if self.flow_hidden_dims is not None:
            object.__setattr__(self, "flow_hidden_dims", tuple(self.flow_hidden_dims))

    def check(self, owner: str) -> None:
        """Raise a ``ValueError`` naming ``owner`` for the first invalid option."""
        if self.family not in FAMILIES:
            raise ValueError(f"{owner}: family must be one of {FAMILIES}, got {self.family!r}")
        if self.init not in INITS:
            raise ValueError(f"{owner}: init must be 'encoder' or 'prior', got {self.init!r}")
        check_counts(
            owner,
            num_particles=self.num_particles,
            max_steps=self.max_steps,
            patience=self.patience,
            num_transforms=self.num_transforms,
        )
        check_rate(owner, "lr", self.lr)
        if self.flow_hidden_dims is not None:
            for width in self.flow_hidden_dims:
                check_count(owner, "flow_hidden_dims", width)


class FixedGlobals(NamedTuple):
    """A model and guide with the global latents fixed (see :func:`fix_globals`)."""

    model: Callable
    guide: Callable
    local_plate: str | None  # None: no plate over datapoints (nothing was fixed)
    values: dict[str, Tensor]  # the fixed globals ({} without any)


class LocalFit(NamedTuple):
    """The per-datapoint posteriors of :func:`optimize_local`."""

    model: Callable  # the model, with the globals fixed
    guide: Callable  # a guide sampling each datapoint's own posterior (globals fixed)
    steps: Tensor  # [N] each datapoint's number of steps


class PerDatapointRun(NamedTuple):
    """What :func:`run_per_datapoint` leaves: the parameters and every step's bounds."""

    params: list[Tensor]  # [N, ...] each, after the last step
    bounds: Tensor  # [steps taken, N] each step's bound of each datapoint
    steps: Tensor  # [N] each datapoint's number of steps


def optimize_local(
    model: Callable,
    guide: AutoAmortizedGuide,
    *args,
    family: str = LocalOptions.family,
    init: str = LocalOptions.init,
    num_particles: int = LocalOptions.num_particles,
    lr: float = LocalOptions.lr,
    max_steps: int = LocalOptions.max_steps,
    patience: int = LocalOptions.patience,
    num_transforms: int = LocalOptions.num_transforms,
    flow_hidden_dims: Sequence[int] | None = LocalOptions.flow_hidden_dims,
    progress: bool = True,
    **kwargs,
) -> LocalFit:
    r"""The best posterior of a family for each datapoint, :math:`q^*(z \mid x_i)`.

    Every datapoint gets its own posterior over the guide's joint unconstrained local
    latent, free of the encoder, optimized by Adam on the datapoint's own ELBO estimate
    (``num_particles`` draws a step). All datapoints move in one batched tensor program;
    Adam's moments and step counts are per datapoint, and a datapoint stops once the
    running average of its bound (an exponential average over about 20 steps) has not
    risen for ``patience`` steps. Globals are fixed at the guide's median.

    The families:

    - ``"normal"``: a diagonal Normal, :math:`q^*_{\mathrm{FFG}}`;
    - ``"flow"``: Cremer et al.'s auxiliary flow, :math:`q^*_{\mathrm{AF}}`
      (:class:`~pyro_amortized.AutoAmortizedRealNVP` with one set of network weights per
      datapoint);
    - ``"iaf"``: an inverse autoregressive flow
      (:class:`~pyro_amortized.AutoAmortizedIAF`, likewise).

    With ``init="encoder"`` the base Normal starts at the encoder's output. A flow of
    the guide's own family starts as the guide's flow for that datapoint, its encoder
    context folded into each network's first bias, so that :math:`q^*` starts as
    :math:`q` exactly; any other flow starts as the identity (its networks' last layers
    at zero), so :math:`q^*` starts as the encoder's Normal. With ``init="prior"``
    the base is a standard Normal and the flow the identity.

    Arguments:
        model: The model (called with all its datapoints at once).
        guide: An amortized guide; its encoder gives the start and its sites the layout.
        *args: The model's arguments.
        family, init, num_particles, lr, max_steps, patience, num_transforms, flow_hidden_dims:
            See :class:`LocalOptions`.
        progress: Show a ``tqdm`` progress bar (on stderr).
        **kwargs: The model's keyword arguments.

    Returns:
        A :class:`LocalFit`: the model and a guide for the optimized posteriors (both
        with the globals fixed), and each datapoint's number of steps.

    References:
        Inference Suboptimality in Variational Autoencoders (Cremer, Li and Duvenaud, 2018).
    """
    if "num_flows" in kwargs:  # the old name, which the model does not take
        num_transforms = renamed(
            "optimize_local", "num_flows", "num_transforms", kwargs.pop("num_flows")
        )
    options = options_from(
        LocalOptions,
        "optimize_local",
        dict(
            family=family,
            init=init,
            num_particles=num_particles,
            lr=lr,
            max_steps=max_steps,
            patience=patience,
            num_transforms=num_transforms,
            flow_hidden_dims=flow_hidden_dims,
        ),
    )
    if not isinstance(guide, AutoAmortizedGuide):
        raise ValueError(
            f"optimize_local: the guide ({type(guide).__name__}) is not an AutoAmortizedGuide"
        )
    fixed = fix_globals(model, guide, args, kwargs)
    return fit_local(fixed, guide, args, kwargs, options, progress=progress)


def fit_local(
    fixed: FixedGlobals,
    guide: AutoAmortizedGuide,
    args: tuple,
    kwargs: Mapping,
    options: LocalOptions,
    *,
    progress: bool = True,
) -> LocalFit:
    """:func:`optimize_local` on a model whose globals :func:`fix_globals` already fixed."""
    local_guide, params = per_datapoint_guide(
        fixed.model,
        guide,
        args,
        kwargs,
        local_plate=fixed.local_plate,
        family=options.family,
        init=options.init,
        num_transforms=options.num_transforms,
        flow_hidden_dims=options.flow_hidden_dims,
    )
    if fixed.values:
        local_guide = poutine.condition(local_guide, data=fixed.values)
    elbo = Trace_IWELBO(options.num_particles, local_plate=fixed.local_plate)

    def bound(_: list[Tensor]) -> Tensor:  # the parameters move in place, in the guide
        return elbo.log_weights(fixed.model, local_guide, *args, **kwargs).mean_log_weight()

    run = run_per_datapoint(
        bound,
        PerDatapointOptimizer(params, lr=options.lr),
        num_steps=options.max_steps,
        patience=options.patience,
        progress=progress,
        desc=f"local q*_{options.family}",
    )
    return LocalFit(fixed.model, local_guide, run.steps.long())


def run_per_datapoint(
    bound: Callable[[list[Tensor]], Tensor],
    optimizer: PerDatapointOptimizer,
    *,
    num_steps: int,
    patience: int | None = None,
    unrolled: bool = False,
    on_first_step: Callable[[list[Tensor]], None] | None = None,
    progress: bool = False,
    desc: str = "per datapoint",
) -> PerDatapointRun:
    r"""The per-datapoint loop: ``num_steps`` steps of ``optimizer`` up ``bound``.

    Each step evaluates ``bound(params)``, each datapoint's ``[N]`` objective to
    maximize at the current ``[N, ...]`` parameters, and steps every row on the
    gradient of its own entry (the rows are independent: the gradient of the sum).

    Arguments:
        bound: The per-datapoint objective, a function of the parameters.
        optimizer: Holds the parameters and the per-row optimizer state.
        num_steps: Steps (the cap, with ``patience``).
        patience: With a number, a row stops once the running average of its bound (an
            exponential average over about 20 steps) has not risen for that many steps;
            the loop ends when every row has stopped. ``None``: every row takes every step.
        unrolled: Steps out of place and keeps the graph through them (SA-VAE), so the
            final parameters are differentiable in the starting ones and in whatever
            ``bound`` depends on; otherwise the parameters move in place, as leaves.
        on_first_step: Called with the first step's gradients, before that step.
        progress: Show a ``tqdm`` progress bar (on stderr).
        desc: The progress bar's label.

    Returns:
        A :class:`PerDatapointRun`.
    """
    params = list(optimizer.params)
    N = optimizer.num_rows
    device = params[0].device
    active = None if patience is None else torch.ones(N, dtype=torch.bool, device=device)
    since = torch.zeros(N, dtype=torch.long, device=device)
    average = best = None
    bounds = []
    with tqdm(total=num_steps, desc=desc, unit="step", disable=not progress) as bar:
        for step in range(num_steps):
            if unrolled and optimizer.max_grad_norm is not None:
                for t in params:  # Kim et al. clip what flows back into each step too
                    t.register_hook(_ClipRows(optimizer.max_grad_norm))
            value = bound(params)
            objective = value.sum() if active is None else (value * active).sum()
            grads = torch.autograd.grad(-objective, params, create_graph=unrolled)
            if step == 0 and on_first_step is not None:
                on_first_step(grads)
            if unrolled:
                params = optimizer.update(params, grads)
            else:
                optimizer.step(grads, active)
            bounds.append(value.detach())
            bar.update()
            if active is None:
                continue
            with torch.no_grad():
                value = value.detach()
                average = value if average is None else 0.95 * average + 0.05 * value
                improved = average > best if best is not None else torch.ones_like(active)
                best = average if best is None else torch.where(improved, average, best)
                since = torch.where(improved, torch.zeros_like(since), since + 1)
                active &= since < patience
            bar.set_postfix(active=int(active.sum()))
            if not active.any():
                break
    stacked = torch.stack(bounds) if bounds else params[0].new_zeros(0, N)
    return PerDatapointRun(params, stacked, optimizer.steps)


def per_datapoint_guide(
    model: Callable,
    guide: AutoAmortizedGuide,
    args: tuple,
    kwargs: Mapping,
    *,
    local_plate: str,
    family: str,
    init: str = "encoder",
    num_transforms: int = 1,
    flow_hidden_dims: Sequence[int] | None = None,
) -> tuple[Callable, list[nn.Parameter]]:
    """A guide of ``family`` with one posterior per datapoint, and its ``[N, ...]`` parameters.

    The parameters come base first: the ``[N, D]`` loc and log scale of each datapoint's
    base Normal, then a flow's per-datapoint network weights. A flow of ``guide``'s own
    family copies ``guide``'s flow (``num_transforms`` and ``flow_hidden_dims`` are then
    unused); see :func:`optimize_local` for where each posterior starts. The guide runs in
    a parameter store of its own: its parameters are optimized directly, never by SVI.
    """
    with torch.no_grad():
        # the encoder's base Normal over the joint local latent (a flow guide's, before its flow)
        out = guide.encoder_output(*args, **kwargs)
    loc, scale = out.loc, out.scale
    if init == "prior":
        loc, scale = torch.zeros_like(loc), torch.ones_like(scale)
    N, D = loc.shape
    rows = torch.arange(N, dtype=loc.dtype, device=loc.device).unsqueeze(-1)
    table = _RowTable(loc, scale, context=family != "normal")
    options = {"local_plate": local_plate, "encoder": table, "context": lambda *a, **k: rows}
    if family == "normal":
        local = AutoAmortizedNormal(model, **options)
        return _OwnParamStore(local), list(table.parameters())
    cls = _FLOW_CLASSES[family]
    copy = init == "encoder" and guide.family == family
    if copy:
        architecture = guide.architecture()
    else:
        hidden = (max(50, D),) if flow_hidden_dims is None else tuple(flow_hidden_dims)
        architecture = {"num_transforms": num_transforms, "flow_hidden_dims": hidden}
    local = cls(model, context_dim=1, **options, **architecture)
    with pyro.get_param_store().scope():
        local.setup(*args, **kwargs)
    if copy:
        # the guide's networks at each datapoint's own encoder context
        sources, context = guide.conditional_networks(), out.context.detach()
    else:
        sources, context = local.conditional_networks(), rows.new_zeros(N, 1)
    params = list(table.parameters())
    for (owner, name), (source, _) in zip(local.conditional_networks(), sources, strict=True):
        per_row = _PerRowNetwork(getattr(source, name), context)
        setattr(owner, name, per_row)
        params += list(per_row.parameters())
    return _OwnParamStore(local), params


class _OwnParamStore:
    """Calls a guide in a parameter store of its own, created afresh for every call.

    A per-datapoint guide is a Pyro module, whose networks Pyro would register in the
    global parameter store under the guide's name: they would linger there (hundreds of
    megabytes for a flow) and clash with a later ``fit`` resuming from a checkpoint. Its
    parameters are optimized directly, so it never needs the store.
    """

    def __init__(self, guide: AutoAmortizedGuide):
        self.guide = guide

    def __call__(self, *args, **kwargs):
        with pyro.get_param_store().scope():
            return self.guide(*args, **kwargs)

    def __getattr__(self, name: str):
        if name == "guide":  # not set yet (e.g. while copying)
            raise AttributeError(name)
        return getattr(self.guide, name)


class PerDatapointOptimizer:
    """Adam or SGD (with momentum) on ``[N, ...]`` parameters, one row per datapoint.

    Each row has its own step count (Adam's bias correction), moves only while it is
    active, and with ``max_grad_norm`` has its gradient (over all parameters) clipped to
    that norm: the datapoints' optimizations are independent, as if each ran alone.
    :meth:`step` and :meth:`update` take gradients of the loss to minimize.

    Arguments:
        params: The ``[N, ...]`` tensors, all with the same first dimension N.
        optimizer: ``"adam"`` or ``"sgd"``.
        lr: The learning rate.
        momentum: SGD's momentum (``optimizer="sgd"`` only), in [0, 1).
        max_grad_norm: Clip each row's gradient to this norm (``None``: no clipping).
    """

    def __init__(
        self,
        params: Sequence[Tensor],
        *,
        optimizer: str = "adam",
        lr: float,
        momentum: float = 0.0,
        max_grad_norm: float | None = None,
    ):
        owner = type(self).__name__
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"{owner}: optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
        check_rate(owner, "lr", lr)
        check_probability(owner, "momentum", momentum, high=False)
        check_rate(owner, "max_grad_norm", max_grad_norm, optional=True)
        self.params, self.optimizer, self.lr = list(params), optimizer, lr
        self.momentum, self.max_grad_norm = momentum, max_grad_norm
        self.num_rows = self.params[0].shape[0]
        first = self.params[0]
        self.steps = torch.zeros(self.num_rows, dtype=first.dtype, device=first.device)
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params] if optimizer == "adam" else None

    @torch.no_grad()
    def step(self, grads: Sequence[Tensor], active: Tensor | None = None) -> None:
        """One step in place on the optimizer's own parameters (all rows when ``active``
        is None)."""
        for p, new in zip(self.params, self.update(self.params, grads, active), strict=True):
            p.copy_(new)

    def update(
        self, params: Sequence[Tensor], grads: Sequence[Tensor], active: Tensor | None = None
    ) -> list[Tensor]:
        r"""The parameters after one step, computed out of place; the state moves on.

        Differentiable in ``params`` and ``grads`` (SA-VAE's unrolled steps), except for
        the clipping factor, which counts as a constant as in Kim et al.'s implementation.
        Adam divides by :math:`\sqrt{\hat v + \epsilon^2}` rather than torch's
        :math:`\sqrt{\hat v} + \epsilon` (the same to within :math:`\epsilon`): the
        derivative of :math:`\sqrt{\hat v}` is infinite where a gradient is exactly zero,
        which sent an MNIST SA-VAE to NaN after 13 epochs.
        """
        if self.max_grad_norm is not None:
            grads = clip_rows(grads, self.max_grad_norm)
        self.steps = self.steps + (1 if active is None else active)
        beta1, beta2, eps = 0.9, 0.999, 1e-8
        new = []
        for i, (p, g) in enumerate(zip(params, grads, strict=True)):
            if self.optimizer == "adam":
                m = beta1 * self.m[i] + (1 - beta1) * g
                v = beta2 * self.v[i] + (1 - beta2) * g * g
                c1 = _per_row((1 - beta1**self.steps).clamp_min(1e-12), p)
                c2 = _per_row((1 - beta2**self.steps).clamp_min(1e-12), p)
                update = self.lr * (m / c1) / (v / c2 + eps**2).sqrt()
            else:  # torch.optim.SGD's momentum: m <- mu m + g, p <- p - lr m
                m, v = self.momentum * self.m[i] + g, None
                update = self.lr * m
            if active is not None:
                mask = _per_row(active, p)
                m = torch.where(mask, m, self.m[i])
                v = None if v is None else torch.where(mask, v, self.v[i])
                update = torch.where(mask, update, torch.zeros_like(update))
            self.m[i] = m
            if v is not None:
                self.v[i] = v
            new.append(p - update)
        return new


def _per_row(x: Tensor, like: Tensor) -> Tensor:
    """A per-row ``[N]`` tensor shaped to broadcast against ``like``, ``[N, ...]``."""
    return x.view(x.shape + (1,) * (like.dim() - 1))


def clip_rows(tensors: Sequence[Tensor], max_norm: float) -> list[Tensor]:
    """``[N, ...]`` tensors with each row (over all the tensors) clipped to ``max_norm``.

    The factor counts as a constant: gradients flow through the clipped tensors as
    through a rescaling, as in Kim et al.'s implementation.
    """
    N = tensors[0].shape[0]
    norm = sum(t.detach().pow(2).reshape(N, -1).sum(-1) for t in tensors).sqrt()
    factor = (max_norm / norm.clamp_min(1e-12)).clamp(max=1.0)
    return [t * _per_row(factor, t) for t in tensors]


class _ClipRows:
    """Backward hook clipping each datapoint's (row's) gradient to ``max_norm``."""

    __slots__ = ("max_norm",)

    def __init__(self, max_norm: float):
        self.max_norm = max_norm

    def __call__(self, grad: Tensor) -> Tensor:
        return clip_rows([grad], self.max_norm)[0]


class _RowTable(nn.Module):
    """A diagonal Normal per datapoint, looked up by row number: a non-amortized encoder.

    With ``context=True`` it returns the row numbers as the context ``h`` too, for the
    per-datapoint networks of a flow (:class:`_PerRowNetwork`) to pick their weights by.
    """

    def __init__(self, loc: Tensor, scale: Tensor, *, context: bool = False):
        super().__init__()
        self.loc = nn.Parameter(loc.detach().clone())
        self.log_scale = nn.Parameter(scale.detach().log())
        self.context = context

    def forward(self, rows: Tensor) -> tuple[Tensor, ...]:
        i = rows[..., 0].long()
        out = (self.loc[i], self.log_scale[i].exp())
        return out + (rows,) if self.context else out


class _PerRowNetwork(nn.Module):
    r"""Copies, one per datapoint, of a conditional network with its context fixed.

    Takes Pyro's :class:`~pyro.nn.ConditionalDenseNN` or
    :class:`~pyro.nn.ConditionalAutoRegressiveNN` and contexts ``[N, C]``; row :math:`n`
    computes what the network computes at context :math:`h_n` (folded into the first
    layer's bias), from weights of its own. Called as the network is, with the row
    numbers as the context; the weights are stacked ``[N, in, out]`` and every layer is
    one batched matrix product. An autoregressive network keeps its masks.
    """

    def __init__(self, net: nn.Module, context: Tensor):
        super().__init__()
        if not isinstance(net, (ConditionalDenseNN, ConditionalAutoRegressiveNN)):
            raise TypeError(f"no per-datapoint copy of {type(net).__name__}")
        if getattr(net, "skip_layer", None) is not None:
            raise TypeError("no per-datapoint copy of a network with skip connections")
        N, C = context.shape
        self.weights, self.biases = nn.ParameterList(), nn.ParameterList()
        self.masked = []  # per layer: whether it has a mask (buffer ``mask{i}``)
        with torch.no_grad():
            for i, layer in enumerate(net.layers):
                mask = getattr(layer, "mask", None)
                weight = layer.weight if mask is None else layer.weight * mask
                bias = layer.bias.expand(N, -1)
                if i == 0:  # the context comes first in the network's input
                    bias = bias + context.to(weight) @ weight[:, :C].T
                    weight = weight[:, C:]
                    mask = None if mask is None else mask[:, C:]
                self.weights.append(nn.Parameter(weight.T.expand(N, -1, -1).clone()))
                self.biases.append(nn.Parameter(bias.clone()))
                self.masked.append(mask is not None)
                if mask is not None:
                    self.register_buffer(f"mask{i}", mask.T.to(weight))
        self.f = net.f
        self.autoregressive = isinstance(net, ConditionalAutoRegressiveNN)
        self.input_dim = net.input_dim
        self.output_multiplier = net.output_multiplier
        self.count_params = net.count_params
        self.param_slices = net.param_slices
        self.all_ones = getattr(net, "all_ones", False)
        if self.autoregressive:
            self.register_buffer("permutation", net.permutation.clone())

    def get_permutation(self) -> Tensor:
        return self.permutation

    def forward(self, x: Tensor, context: Tensor) -> Tensor | tuple[Tensor, ...]:
        rows = context[..., 0].long()
        # all rows in order (the usual call): no gather, which would copy every weight
        every_row = rows.shape[0] == self.weights[0].shape[0] and torch.equal(
            rows, torch.arange(len(rows), device=rows.device)
        )
        h = x
        last = len(self.weights) - 1
        for i, (weight, bias) in enumerate(zip(self.weights, self.biases, strict=True)):
            if self.masked[i]:
                # the product, not a masked copy, so that masked weights get no gradient
                weight = weight * getattr(self, f"mask{i}")
            if not every_row:
                weight, bias = weight[rows], bias[rows]
            h = torch.einsum("...ni,nio->...no", h, weight) + bias
            if i < last:
                h = self.f(h)
        return self._shape(h)

    def _shape(self, h: Tensor) -> Tensor | tuple[Tensor, ...]:
        """The output split into parameters, as Pyro's network splits it."""
        if self.output_multiplier == 1 or (self.count_params == 1 and not self.autoregressive):
            return h
        if not self.autoregressive:
            return tuple(h[..., s] for s in self.param_slices)
        h = h.reshape(h.shape[:-1] + (self.output_multiplier, self.input_dim))
        if self.count_params == 1:
            return h
        if self.all_ones:
            return torch.unbind(h, dim=-2)
        return tuple(h[..., s, :] for s in self.param_slices)


def fix_globals(
    model: Callable,
    guide: Callable,
    args: tuple,
    kwargs: Mapping,
    *,
    owner: str = "optimize_local",
    local_plate: str | None = None,
) -> FixedGlobals:
    """Model and guide with the global latents fixed at the guide's median.

    The local plate is the one :class:`~pyro_amortized.Trace_IWELBO` finds (``local_plate``
    or the guide's, else found in the traces). Model and guide come back unchanged when
    there are no globals, or no local plate (every latent is then the trace's own).

    Arguments:
        model: The model.
        guide: Its guide, with a ``median(*args, **kwargs)`` when the model has globals.
        args: The model's arguments.
        kwargs: The model's keyword arguments.
        owner: The function named in error messages.
        local_plate: The plate over datapoints (None: the guide's, or found).

    Returns:
        A :class:`FixedGlobals`.
    """
    probe = Trace_IWELBO(1, local_plate=local_plate or getattr(guide, "local_plate", None))
    local_plate = probe.find_local_plate(model, guide, *args, **kwargs)  # draws nothing
    if local_plate is None:
        return FixedGlobals(model, guide, None, {})
    values = _global_medians(guide, local_plate, args, kwargs, owner)
    if values:
        model = poutine.condition(model, data=values)
        # fixed, the globals are the model's observations; the guide only reads them
        guide = poutine.block(poutine.condition(guide, data=values), hide=list(values))
    return FixedGlobals(model, guide, local_plate, values)


def _global_medians(guide: Callable, local: str, args, kwargs, owner: str) -> dict[str, Tensor]:
    """The guide's median of every latent site outside the local plate ({} without any)."""
    with poutine.block(), fork_rng(args):
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
            f"{owner}: the model has global latent sites ({', '.join(names)}) "
            f"and the guide ({type(guide).__name__}) has no median() to fix them at"
        )
    medians = guide.median(*args, **kwargs)
    return {name: medians[name] for name in names}
