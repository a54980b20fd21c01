r"""Log-densities with the parameters stopped, and path gradients of flows.

The ``"stl"`` and ``"dreg"`` estimators of :class:`~pyro_amortized.Trace_IWELBO` need
:math:`\log q(z; \bar\phi)`, the guide's log-density with its parameters stopped, as a
function of the sampled :math:`z`: its value and its gradient
:math:`\nabla_z \log q(z; \bar\phi)`, through which the sample's own dependence on
:math:`\phi` carries the path gradient. :func:`stop_distribution` gives such a
distribution for any guide distribution built from tensors.

For a normalizing flow :math:`z = T_L \circ \dots \circ T_1(u)`, evaluating
:math:`\log q(z)` the usual way inverts the flow, and an inverse autoregressive step
inverts one variable at a time: one network pass per latent dimension, in sequence.
The sample's pre-images :math:`x_0 = u, x_1, \dots, x_L = z` are known from the forward
pass, and Vaitl et al.'s recursion carries the gradient forward through them instead,

.. math::

    a_0 = \nabla_u \log q_0(u), \qquad
    a_l = J_l^{-\top} \big(a_{l-1} - \nabla_{x_{l-1}} \log |\det J_l(x_{l-1})|\big),

with :math:`J_l` the Jacobian of :math:`T_l` at :math:`x_{l-1}` and
:math:`a_L = \nabla_z \log q(z)`. A step whose inverse is one pass (a coupling, a
permutation, an elementwise map) applies :math:`J_l^{-\top}` as a vector-Jacobian product
of its inverse. For Pyro's :class:`~pyro.distributions.transforms.AffineAutoregressive`
the Jacobian is the diagonal of scales :math:`S` plus a part :math:`P` that is strictly
triangular in the autoregressive order, so :math:`J^\top w = c` is solved by
:math:`w \leftarrow S^{-1}(c - P^\top w)`, each sweep one vector-Jacobian product of the
network. The masks make :math:`P^\top` nilpotent, so the sweeps reach the
back-substitution's answer after at most D of them, and in practice after far
fewer (:func:`flow_path_sweeps` counts them): they stop when what is left to move, as
the rate of the last two sweeps predicts it, is below 4 ulps of each row's largest
entry, that is, at float precision.
"""

from __future__ import annotations

import functools
import itertools
import types

import pyro.distributions as dist
import torch
from pyro.distributions import Delta
from pyro.distributions.transforms import AffineAutoregressive
from pyro.nn import ConditionalAutoRegressiveNN
from torch import Tensor, nn
from torch.distributions import Distribution, TransformedDistribution
from torch.distributions.transforms import Transform, _InverseTransform
from torch.distributions.utils import _sum_rightmost
from torch.nn import functional as F

__all__ = ["StoppedFlow", "flow_path_sweeps", "stop_distribution"]


def stop_distribution(fn: Distribution, site: str) -> Distribution:
    """``fn`` with every parameter detached: log q(z; stop_gradient(phi)) as a function of z
    (what the STL and DReG estimators evaluate; ``site`` names the site in errors).

    A ``Delta`` is kept as it is: its log-density (the Jacobian of a reparameterization,
    as in Pyro's autoguides) depends on parameters only through the sampled values. A
    :class:`~torch.distributions.TransformedDistribution` becomes a :class:`StoppedFlow`,
    which evaluates its own samples without inverting the flow.
    """
    if isinstance(fn, Delta):
        return fn
    if isinstance(fn, TransformedDistribution) and (
        type(fn).log_prob is TransformedDistribution.log_prob
    ):
        return StoppedFlow(fn, site)
    new = object.__new__(type(fn))
    new.__dict__.update({k: _stop_value(v, site) for k, v in vars(fn).items()})
    return new


class StoppedFlow(dist.TransformedDistribution):
    r"""A flow with its parameters stopped that evaluates its own samples by their path.

    ``log_prob(z)`` of a ``z`` the flow has just drawn (the last step's cache holds it)
    has the value of :math:`\log q(z)` and the gradient :math:`\nabla_z \log q(z)` with
    the parameters stopped, from the recursion in this module's notes: no inverse of an
    autoregressive step. Any other value is evaluated the usual way, by inverting the
    stopped flow.

    Arguments:
        flow: The flow, as the guide drew from it (its transforms' caches intact).
        site: The sample site's name, for error messages.

    References:
        Fast and Unified Path Gradient Estimators for Normalizing Flows (Vaitl, Winkler,
        Richter and Kessel, 2024).
    """

    def __init__(self, flow: TransformedDistribution, site: str):
        self.source = flow
        self.site = site
        # Stopped copies of the steps, their caches empty but on: a step inverted below
        # then meets its own pre-image again in log_abs_det_jacobian, without a second pass.
        super().__init__(
            stop_distribution(flow.base_dist, site),
            [_stop_transform(t, site, cache=True) for t in flow.transforms],
            validate_args=False,
        )

    def log_prob(self, value: Tensor) -> Tensor:
        if torch.jit.is_tracing():
            # a graph would record neither the gradients taken here with autograd, nor
            # the sweeps' number, nor the stopped networks' torch.func calls
            raise ValueError(
                f"Trace_IWELBO: jit=True cannot take estimator='stl' or 'dreg' with the flow "
                f"of guide site '{self.site}': its stopped log-density is not a fixed graph. "
                "Use jit=False, or estimator='iwae'."
            )
        chain = _cached_chain(self.source, value)
        if chain is None:
            return super().log_prob(value)
        log_q, grad = _path(self, chain, value.requires_grad and torch.is_grad_enabled())[:2]
        if grad is None:
            return log_q
        event_dim = len(self.event_shape)
        # the value of log q, and grad_z log q as the gradient w.r.t. the sample
        return log_q + _sum_rightmost(grad * (value - value.detach()), event_dim)


def flow_path_sweeps(flow: TransformedDistribution, value: Tensor) -> list[int]:
    """How many sweeps each autoregressive step of ``flow`` takes to solve for the path
    gradient at ``value``, a sample the flow has just drawn (0 for the other steps)."""
    chain = _cached_chain(flow, value)
    if chain is None:
        raise ValueError("flow_path_sweeps: value is not the flow's last sample")
    return _path(StoppedFlow(flow, "flow"), chain, True)[2]


def _cached_chain(flow: TransformedDistribution, value: Tensor) -> list[Tensor] | None:
    """The pre-images ``[x_0, ..., x_L = value]`` from the steps' caches, detached; None
    when the last step did not produce ``value``. A step without a cache (torch's
    default) is inverted, which is one pass for the steps that keep none."""
    y = value
    chain = [value.detach()]
    for i, t in enumerate(reversed(flow.transforms)):
        # torch keeps a cached step's last (input, output) there; Pyro's flows cache one
        x_old, y_old = getattr(t, "_cached_x_y", (None, None))
        if y_old is y:
            x = x_old
        elif i == 0:
            return None
        else:
            with torch.no_grad():
                x = _stop_transform(t, "flow").inv(y)
        chain.append(x.detach())
        y = x
    return chain[::-1]


def _path(stopped: StoppedFlow, chain: list[Tensor], with_grad: bool):
    """``(log q(z), grad_z log q(z) or None, sweeps per step)`` along a cached chain."""
    steps = stopped.transforms
    # event dims as TransformedDistribution.log_prob counts them, from the output back
    event_dims = []
    event_dim = len(stopped.event_shape)
    for t in reversed(steps):
        event_dim += t.domain.event_dim - t.codomain.event_dim
        event_dims.append(event_dim - t.domain.event_dim)
    event_dims.reverse()
    base = stopped.base_dist
    base_dim = event_dim - len(base.event_shape)
    sweeps = []
    with torch.enable_grad() if with_grad else torch.no_grad():
        u = chain[0].requires_grad_(with_grad)
        log_q = _sum_rightmost(base.log_prob(u), base_dim)
        a = torch.autograd.grad(log_q.sum(), u)[0] if with_grad else None
        log_q = log_q.detach()
        for t, x, y, dim in zip(steps, chain[:-1], chain[1:], event_dims, strict=True):
            if isinstance(t, AffineAutoregressive):
                a, ladj, n = _autoregressive_pull(t, x, a)
            else:
                a, ladj, n = _inverse_pull(t, y, a)
            log_q = log_q - _sum_rightmost(ladj, dim)
            sweeps.append(n)
    return log_q, a, sweeps


def _inverse_pull(t: Transform, y: Tensor, a: Tensor | None):
    """``J^{-T}(a - grad log|det J|)`` as the vector-Jacobian product of the inverse."""
    y = y.detach().requires_grad_(a is not None)
    x = t.inv(y)
    ladj = t.log_abs_det_jacobian(x, y)
    if a is None:
        return None, ladj.detach(), 0
    # grad_y of [a . x(y) - log|det J|(x(y))]: the chain rule through the inverse
    (pulled,) = torch.autograd.grad((a * x).sum() - ladj.sum(), y)
    return pulled, ladj.detach(), 0


def _autoregressive_pull(t: AffineAutoregressive, x: Tensor, a: Tensor | None):
    """``J^{-T}(a - grad log|det J|)`` for an affine autoregressive step, by sweeps."""
    made = _made_forward(t.arn, x)
    if made is None:  # any other network: its vector-Jacobian products by autograd
        x = x.detach().requires_grad_(a is not None)
        mean, raw = t.arn(x)
    else:
        mean, raw, made_vjp = made
    if t.stable:
        logit = raw + t.sigmoid_bias
        scale, log_scale = torch.sigmoid(logit), F.logsigmoid(logit)
    else:
        # Pyro's clamp, which keeps the gradient where it clips
        log_scale = raw + (raw.clamp(t.log_scale_min_clip, t.log_scale_max_clip) - raw).detach()
        scale = torch.exp(log_scale)
    ladj = log_scale.sum(-1)
    if a is None:
        return None, ladj.detach(), 0
    # y = scale(x) * x + mean(x). Holding x fixed where it multiplies the scale leaves P,
    # the strictly triangular part of dy/dx (its diagonal is `scale`), and the fixed point
    # w = (a - grad log|det J| - P^T w) / scale takes both gradients in one pass a sweep.
    x_fixed = x.detach()
    if made is None:
        if t.stable:
            off = scale * x_fixed + (1 - scale) * mean
        else:
            off = scale * x_fixed + mean
        ones = torch.ones_like(ladj)

        def vjp(w):
            return torch.autograd.grad((off, ladj), x, (w, ones), retain_graph=True)[0]

    else:
        # the same products through the network's two heads, written out
        scale, mean = scale.detach(), mean.detach()
        if t.stable:
            d_mean, d_raw, d_ladj = 1 - scale, scale * (1 - scale) * (x_fixed - mean), 1 - scale
        else:
            d_mean, d_raw, d_ladj = None, scale * x_fixed, 1.0

        def vjp(w):
            return made_vjp(w if d_mean is None else d_mean * w, d_raw * w + d_ladj)

    scale = scale.detach()
    tol = 4 * torch.finfo(scale.dtype).eps
    w = a / scale
    previous = None
    for sweep in range(1, x.shape[-1] + 1):  # exact after D sweeps, P^T being nilpotent
        new = (a - vjp(w)) / scale
        # each row's move, relative to its largest entry
        moved = (new - w).abs().amax(-1) / new.abs().amax(-1).clamp_min(torch.finfo(w.dtype).tiny)
        if previous is not None:
            # The sweeps contract the error by about r = moved / previous, so what is left
            # after this one is about moved * r / (1 - r): stop when that is below 4 ulps.
            left = torch.where(moved < previous, moved * moved / (previous - moved), moved)
            if (left <= tol).all():
                return new, ladj.detach(), sweep
        elif (moved <= tol).all():
            return new, ladj.detach(), sweep
        w, previous = new, moved
    return new, ladj.detach(), sweep


def _made_forward(arn, x: Tensor):
    """``(mean, raw scale, vjp)`` of Pyro's conditional MADE at ``x``, by hand, or None
    when ``arn`` is not one (a stopped ``ConditionalAutoRegressiveNN`` with ReLU, no skip
    layer and the two heads of an affine step).

    ``vjp(g_mean, g_raw)`` is the gradient w.r.t. ``x`` of ``g_mean . mean + g_raw . raw``:
    three products with the masked weights, against autograd's four (its first layer
    also differentiates the context) and its graph.
    """
    if not (
        isinstance(arn, functools.partial)
        and isinstance(arn.func, _StoppedCall)
        and not arn.args
        and set(arn.keywords) == {"context"}
    ):
        return None
    net = arn.func.module
    if (
        type(net) is not ConditionalAutoRegressiveNN
        or type(net.f) is not nn.ReLU
        or net.skip_layer is not None
        or net.output_multiplier != 2
        or not net.all_ones
        or any(layer.bias is None for layer in net.layers)
    ):
        return None
    state = arn.func.state
    weights = [
        state[f"layers.{i}.weight"] * state[f"layers.{i}.mask"] for i in range(len(net.layers))
    ]
    biases = [state[f"layers.{i}.bias"] for i in range(len(net.layers))]
    context = arn.keywords["context"]
    context = context.expand(x.shape[:-1] + context.shape[-1:])
    width = context.shape[-1]
    with torch.no_grad():
        h = torch.cat([context, x], dim=-1)
        active = []
        for weight, bias in zip(weights[:-1], biases[:-1], strict=True):
            pre = F.linear(h, weight, bias)
            active.append(pre > 0)
            h = pre.clamp_min(0)
        out = F.linear(h, weights[-1], biases[-1])
    mean, raw = out.reshape(x.shape[:-1] + (2, x.shape[-1])).unbind(-2)
    first = weights[0][:, width:]  # the columns of x; the context's need no gradient

    def vjp(g_mean: Tensor, g_raw: Tensor) -> Tensor:
        g = torch.cat([g_mean, g_raw], dim=-1) @ weights[-1]
        for weight, mask in zip(weights[-2:0:-1], active[:0:-1], strict=True):
            g = (g * mask) @ weight
        return (g * active[0]) @ first

    return mean, raw, vjp


def _stop_transform(transform: Transform, site: str, cache: bool = False) -> Transform:
    """A copy of ``transform`` whose parameters are detached and whose cache is empty (and
    off unless ``cache``).

    The cache must start empty: a cached inverse hands back the pre-image tensor itself,
    and the gradient would then skip the sampled value on its way to the guide's
    parameters.
    """
    if isinstance(transform, _InverseTransform):
        return _stop_transform(transform._inv, site, cache).inv
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
        state["_cache_size"] = min(state["_cache_size"], 1) if cache else 0
        state["_cached_x_y"] = (None, None)
    state["_inv"] = None
    return new


def _stop_value(value, site: str):
    if isinstance(value, Tensor):
        return value.detach()
    if isinstance(value, Distribution):
        return stop_distribution(value, site)
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
