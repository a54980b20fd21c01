r"""Per-datapoint posteriors: a separate, non-amortized posterior for every datapoint.

:func:`optimize_local` fits one posterior of a family to each datapoint on its own
(Cremer et al.'s :math:`q^*`), all datapoints in one batched tensor program: a diagonal
Normal per datapoint, or a normalizing flow whose every network has its own weights per
datapoint (stacked ``[N, in, out]`` and applied with one batched matrix product).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pyro
import torch
from pyro import poutine
from pyro.nn import ConditionalAutoRegressiveNN, ConditionalDenseNN
from pyro.poutine.subsample_messenger import _Subsample
from torch import Tensor, nn
from tqdm import tqdm

from .flows import AutoAmortizedFlow, AutoAmortizedIAF
from .guides import AutoAmortizedGuide, AutoAmortizedNormal
from .objectives import Trace_IWELBO

__all__ = ["FAMILIES", "optimize_local"]

#: The families of per-datapoint posterior: a diagonal Normal, Cremer et al.'s auxiliary
#: flow (:class:`~pyro_amortized.AutoAmortizedFlow`) and an inverse autoregressive flow
#: (:class:`~pyro_amortized.AutoAmortizedIAF`).
FAMILIES = ("normal", "flow", "iaf")
_FLOW_CLASSES = {"flow": AutoAmortizedFlow, "iaf": AutoAmortizedIAF}


def optimize_local(
    model: Callable,
    guide: AutoAmortizedGuide,
    *args,
    family: str = "normal",
    init: str = "encoder",
    num_particles: int = 10,
    lr: float = 3e-3,
    max_steps: int = 5000,
    patience: int = 500,
    num_flows: int = 2,
    flow_hidden_dims: Sequence[int] | None = None,
    progress: bool = True,
    **kwargs,
) -> tuple[Callable, Callable, Tensor]:
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
      (:class:`~pyro_amortized.AutoAmortizedFlow` with one set of network weights per
      datapoint);
    - ``"iaf"``: an inverse autoregressive flow
      (:class:`~pyro_amortized.AutoAmortizedIAF`, likewise).

    With ``init="encoder"`` the base Normal starts at the encoder's output. A flow of
    the guide's own class starts as the guide's flow for that datapoint, its encoder
    context folded into each network's first bias, so that :math:`q^*` starts as
    :math:`q` exactly; any other flow starts as the identity (its networks' last layers
    at zero), so :math:`q^*` starts as the encoder's Normal. With ``init="prior"``
    the base is a standard Normal and the flow the identity.

    Arguments:
        model: The model (called with all its datapoints at once).
        guide: An amortized guide; its encoder gives the start and its sites the layout.
        *args: The model's arguments.
        family: ``"normal"``, ``"flow"`` or ``"iaf"``.
        init: ``"encoder"`` or ``"prior"``: where each datapoint's posterior starts.
        num_particles: Draws per step.
        lr: Adam's step size. On 50 binarized-MNIST test images of the README's VAE, 3e-3
            gave higher bounds than 1e-2 for every family (by 0.1 nats for the Normal, 0.6
            for the auxiliary flow and 1.3 for the IAF) and than 1e-3 for the flow.
        max_steps: Cap on the steps.
        patience: Steps without a higher running-average bound before a datapoint stops.
            Scale it with ``1 / lr``: at 3e-3, 200 steps stopped some datapoints of a
            linear-Gaussian model 0.06 nats short of their optimum, 400 within 0.01.
        num_flows: Flow steps of a flow family that does not copy the guide's.
        flow_hidden_dims: Hidden widths of such a flow's networks; defaults to one layer
            of ``max(50, D)`` units (D the latent dimension; an autoregressive network
            needs at least D).
        progress: Show a ``tqdm`` progress bar (on stderr).
        **kwargs: The model's keyword arguments.

    Returns:
        ``(model, local_guide, steps)``: the model and a guide for the optimized
        posteriors (both with the globals fixed), and each datapoint's number of steps.

    References:
        Inference Suboptimality in Variational Autoencoders (Cremer, Li and Duvenaud, 2018).
    """
    _check_local_options(
        "optimize_local", family, init, num_particles, lr, max_steps, patience, num_flows
    )
    if not isinstance(guide, AutoAmortizedGuide):
        raise ValueError(
            f"optimize_local: the guide ({type(guide).__name__}) is not an AutoAmortizedGuide"
        )
    model, _, local_plate, globals_ = _fix_globals(model, guide, args, kwargs)
    return _optimize_local(
        model,
        guide,
        args,
        kwargs,
        local_plate=local_plate,
        globals_=globals_,
        family=family,
        init=init,
        num_particles=num_particles,
        lr=lr,
        max_steps=max_steps,
        patience=patience,
        num_flows=num_flows,
        flow_hidden_dims=flow_hidden_dims,
        progress=progress,
    )


def _optimize_local(
    model: Callable,
    guide: AutoAmortizedGuide,
    args,
    kwargs,
    *,
    local_plate: str,
    globals_: dict[str, Tensor],
    family: str,
    init: str,
    num_particles: int,
    lr: float,
    max_steps: int,
    patience: int,
    num_flows: int,
    flow_hidden_dims: Sequence[int] | None,
    progress: bool,
) -> tuple[Callable, Callable, Tensor]:
    """:func:`optimize_local` with its options checked and the globals already fixed."""
    local_guide, params = _local_guide(
        model, guide, args, kwargs, local_plate, family, init, num_flows, flow_hidden_dims
    )
    if globals_:
        local_guide = poutine.condition(local_guide, data=globals_)
    elbo = Trace_IWELBO(num_particles, local_plate=local_plate)
    optimizer = _PerDatapointOptimizer(params, "adam", lr)
    N = optimizer.num_rows
    active = torch.ones(N, dtype=torch.bool, device=params[0].device)
    average = best = None
    since = torch.zeros(N, dtype=torch.long, device=params[0].device)
    with tqdm(total=max_steps, desc=f"local q*_{family}", unit="step", disable=not progress) as bar:
        for _ in range(max_steps):
            bound = elbo.log_weights(model, local_guide, *args, **kwargs).log_w.mean(0)
            grads = torch.autograd.grad(-(bound * active).sum(), params)
            with torch.no_grad():
                optimizer.step(grads, active)
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
    return model, local_guide, optimizer.steps.long()


def _local_guide(
    model: Callable,
    guide: AutoAmortizedGuide,
    args,
    kwargs,
    local_plate: str,
    family: str,
    init: str,
    num_flows: int,
    flow_hidden_dims: Sequence[int] | None,
) -> tuple[_OwnParamStore, list[nn.Parameter]]:
    """A guide of ``family`` with one posterior per datapoint, and its ``[N, ...]`` parameters."""
    with torch.no_grad():
        # the encoder's base Normal over the joint local latent (a flow guide's, before its flow)
        out = guide._encode(guide._get_context(None, args, kwargs))
    loc, scale = out[0], out[1]
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
    copy = init == "encoder" and type(guide) is cls
    if copy:
        architecture = guide._architecture()
    else:
        hidden = (max(50, D),) if flow_hidden_dims is None else tuple(flow_hidden_dims)
        steps = "num_flows" if cls is AutoAmortizedFlow else "num_transforms"
        architecture = {steps: num_flows, "flow_hidden_dims": hidden}
    local = cls(model, context_dim=1, **options, **architecture)
    with pyro.get_param_store().scope():
        local._setup_prototype(*args, **kwargs)
    if copy:
        # the guide's networks at each datapoint's own encoder context
        sources, context = guide._conditional_networks(), out[2].detach()
    else:
        sources, context = local._conditional_networks(), rows.new_zeros(N, 1)
    params = list(table.parameters())
    for (owner, name), (source, _) in zip(local._conditional_networks(), sources, strict=True):
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


class _PerDatapointOptimizer:
    """Adam or SGD (with momentum) on ``[N, ...]`` parameters, one row per datapoint.

    Each row has its own step count (Adam's bias correction), moves only while it is
    active, and with ``max_grad_norm`` has its gradient (over all parameters) clipped to
    that norm: the datapoints' optimizations are independent, as if each ran alone.
    ``step`` takes gradients of the loss to minimize.
    """

    def __init__(
        self,
        params: list[Tensor],
        optimizer: str,
        lr: float,
        *,
        momentum: float = 0.0,
        max_grad_norm: float | None = None,
    ):
        self.params, self.optimizer, self.lr = params, optimizer, lr
        self.momentum, self.max_grad_norm = momentum, max_grad_norm
        self.num_rows = params[0].shape[0]
        self.steps = torch.zeros(self.num_rows, dtype=params[0].dtype, device=params[0].device)
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params] if optimizer == "adam" else None

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
            grads = _clip_rows(grads, self.max_grad_norm)
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


def _clip_rows(tensors: Sequence[Tensor], max_norm: float) -> list[Tensor]:
    """``[N, ...]`` tensors with each row (over all the tensors) clipped to ``max_norm``.

    The factor counts as a constant: gradients flow through the clipped tensors as
    through a rescaling, as in Kim et al.'s implementation.
    """
    N = tensors[0].shape[0]
    norm = sum(t.detach().pow(2).reshape(N, -1).sum(-1) for t in tensors).sqrt()
    factor = (max_norm / norm.clamp_min(1e-12)).clamp(max=1.0)
    return [t * _per_row(factor, t) for t in tensors]


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


def _check_counts(owner: str, **values) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{owner}: {name} must be an int >= 1, got {value!r}")


def _check_local_options(
    owner: str,
    family: str,
    init: str,
    num_particles: int,
    lr: float,
    max_steps: int,
    patience: int,
    num_flows: int,
) -> None:
    """The options of the per-datapoint optimization (:func:`optimize_local`)."""
    if family not in FAMILIES:
        raise ValueError(f"{owner}: family must be one of {FAMILIES}, got {family!r}")
    if init not in ("encoder", "prior"):
        raise ValueError(f"{owner}: init must be 'encoder' or 'prior', got {init!r}")
    _check_counts(
        owner,
        num_particles=num_particles,
        max_steps=max_steps,
        patience=patience,
        num_flows=num_flows,
    )
    if not lr > 0:
        raise ValueError(f"{owner}: lr must be > 0, got {lr!r}")


def _fix_globals(
    model: Callable,
    guide: Callable,
    args,
    kwargs,
    owner: str = "optimize_local",
    local_plate: str | None = None,
):
    """Model and guide with the global latents fixed at the guide's median.

    Returns ``(model, guide, local_plate, globals)``; model and guide come back unchanged
    when there are no globals, or no local plate (every latent is then the trace's own).
    """
    probe = Trace_IWELBO(1, local_plate=local_plate or getattr(guide, "local_plate", None))
    local_plate = probe.find_local_plate(model, guide, *args, **kwargs)  # draws nothing
    if local_plate is None:
        return model, guide, None, {}
    globals_ = _global_medians(guide, local_plate, args, kwargs, owner)
    if globals_:
        model = poutine.condition(model, data=globals_)
        # fixed, the globals are the model's observations; the guide only reads them
        guide = poutine.block(poutine.condition(guide, data=globals_), hide=list(globals_))
    return model, guide, local_plate, globals_


def _global_medians(guide: Callable, local: str, args, kwargs, owner: str) -> dict[str, Tensor]:
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
            f"{owner}: the model has global latent sites ({', '.join(names)}) "
            f"and the guide ({type(guide).__name__}) has no median() to fix them at"
        )
    medians = guide.median(*args, **kwargs)
    return {name: medians[name] for name in names}


def _family(guide: Callable, owner: str) -> str:
    """The family of an amortized guide: ``"normal"``, ``"flow"`` or ``"iaf"``."""
    if isinstance(guide, AutoAmortizedNormal):
        return "normal"
    for family, cls in _FLOW_CLASSES.items():
        if isinstance(guide, cls):
            return family
    raise ValueError(
        f"{owner}: the guide ({type(guide).__name__}) is not an AutoAmortizedNormal, "
        "AutoAmortizedFlow or AutoAmortizedIAF"
    )
