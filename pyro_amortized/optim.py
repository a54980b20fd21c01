"""A :class:`~pyro.optim.PyroOptim` that steps every parameter with one torch optimizer,
and Pyro's ``ClippedAdam`` with a learning rate decaying from a start to an end value."""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable, Iterable
from typing import Any

import pyro
from pyro.optim import PyroOptim
from torch import Tensor
from torch.optim import Adam as _TorchAdam
from torch.optim import AdamW as _TorchAdamW
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler, ReduceLROnPlateau

from .checks import check_count, check_rate

__all__ = ["Adam", "AdamW", "JointOptim", "decaying_adam"]

OptimArgs = dict | Callable[..., dict]


def _same(a: Any, b: Any) -> bool:
    # Tensors (a tensor lr, say) only match themselves: `==` on them is elementwise.
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return a is b
    return type(a) is type(b) and a == b


class JointOptim(PyroOptim):
    r"""Drop-in :class:`~pyro.optim.PyroOptim` holding one torch optimizer for all parameters.

    :class:`~pyro.optim.PyroOptim` builds one torch optimizer per parameter tensor and steps
    them one after the other, which costs a fixed overhead per tensor and step. This class
    gives each new tensor the optimizer options PyroOptim would give it and places it in a
    parameter group of a single optimizer (tensors with identical options share a group),
    so one ``step()`` updates everything. For optimizers whose update of a tensor only
    depends on that tensor (Adam, AdamW, SGD, RMSprop, Adagrad, ...) the trajectory is the
    one of PyroOptim.

    As in PyroOptim only the parameters passed to a call are stepped: the others keep their
    value and optimizer state. After a step the stepped parameters' gradients are ``None``
    (PyroOptim leaves zeros), as after torch's ``zero_grad()``. Saved states are keyed by param-store name in PyroOptim's
    format, so the two load each other's states; state for a parameter is applied when a
    tensor of that name first appears (as in PyroOptim, not to a tensor already held).

    Arguments:
        optim_constructor: A :class:`torch.optim.Optimizer` class (or a callable building
            one from a list of tensors and keyword arguments). Learning-rate schedulers are
            not supported: use :class:`pyro.optim.PyroLRScheduler`.
        optim_args: Keyword arguments of the optimizer, or a callable returning them for a
            parameter, called as in PyroOptim: ``f(name)`` with the ``nn.Module``-style
            name, or ``f(module_name, param_name)``.
        clip_args: ``{"clip_norm": ..., "clip_value": ...}`` applied to each tensor's own
            gradient before stepping (as in PyroOptim), or a callable
            ``f(module_name, param_name)`` returning such a dict.

    Attributes:
        optimizer: The torch optimizer, ``None`` before the first step.

    Example:
        >>> pyro.clear_param_store()
        >>> def model(x):
        ...     loc = pyro.sample("loc", dist.Normal(0.0, 10.0))
        ...     with pyro.plate("data", len(x)):
        ...         pyro.sample("x", dist.Normal(loc, 1.0), obs=x)
        >>> guide = pyro.infer.autoguide.AutoNormal(model)
        >>> optim = JointOptim(torch.optim.Adam, {"lr": 0.01})
        >>> svi = pyro.infer.SVI(model, guide, optim, pyro.infer.Trace_ELBO())
        >>> loss = svi.step(torch.randn(10))
        >>> [len(group["params"]) for group in optim.optimizer.param_groups]
        [2]
    """

    def __init__(
        self,
        optim_constructor: Callable[..., Optimizer],
        optim_args: OptimArgs,
        clip_args: OptimArgs | None = None,
    ) -> None:
        if inspect.isclass(optim_constructor) and issubclass(
            optim_constructor, (LRScheduler, ReduceLROnPlateau)
        ):
            raise ValueError(
                f"JointOptim does not support learning-rate schedulers such as "
                f"{optim_constructor.__name__}: use pyro.optim.PyroLRScheduler instead"
            )
        # PyroOptim only asserts these, which vanishes under `python -O`.
        if not (isinstance(optim_args, dict) or callable(optim_args)):
            raise ValueError(
                f"optim_args must be a dict or a callable returning one, "
                f"got {type(optim_args).__name__}"
            )
        if not (clip_args is None or isinstance(clip_args, dict) or callable(clip_args)):
            raise ValueError(
                f"clip_args must be None, a dict or a callable returning one, "
                f"got {type(clip_args).__name__}"
            )
        super().__init__(optim_constructor, optim_args, clip_args)
        self.optimizer: Optimizer | None = None
        # Keyed by id(): hashing a Tensor goes through Python, and ids stay valid because
        # the optimizer keeps every tensor it holds alive.
        self._params: dict[int, Tensor] = {}
        self._clips: dict[int, Callable[[Tensor], None]] = {}

    def __call__(self, params: Iterable[Tensor], *args: Any, **kwargs: Any) -> None:
        """Do one optimization step of ``params``; ``args`` and ``kwargs`` go to ``step()``."""
        current = {id(p): p for p in params}
        if not current:
            return
        for key, p in current.items():
            if key not in self._params:
                self._add(p)
            clip = self._clips.get(key)
            if clip is not None:
                clip(p)
        # Torch optimizers skip tensors whose grad is None. A held tensor missing from this
        # step still carries the zeroed grad SVI left on it, which would move it through
        # Adam's momentum (and weight decay); PyroOptim would not step it at all.
        hidden = [
            (p, p.grad)
            for key, p in self._params.items()
            if key not in current and p.grad is not None
        ]
        for p, _ in hidden:
            p.grad = None
        try:
            self.optimizer.step(*args, **kwargs)
        finally:
            for p, grad in hidden:
                p.grad = grad
        # As torch's zero_grad(set_to_none=True): SVI then skips refilling every gradient
        # with zeros, and the next backward writes the gradients instead of adding to them.
        for p in current.values():
            p.grad = None

    def _add(self, p: Tensor) -> None:
        # Build the optimizer PyroOptim would build for this tensor alone: its param group
        # has the constructor's defaults filled in, and loading a pending state into it
        # casts the state and restores the saved options exactly as PyroOptim does.
        single = self._get_optim(p)
        if not isinstance(single, Optimizer):
            raise ValueError(
                f"optim_constructor must build a torch.optim.Optimizer, got "
                f"{type(single).__name__}; for schedulers use pyro.optim.PyroLRScheduler"
            )
        name = pyro.get_param_store().param_name(p)
        pending = self._state_waiting_to_be_consumed.pop(name, None)
        if pending is not None:
            single.load_state_dict(pending)
        if self.optimizer is None:
            self.optimizer = single
        else:
            options = {k: v for k, v in single.param_groups[0].items() if k != "params"}
            for group in self.optimizer.param_groups:
                if group.keys() - {"params"} == options.keys() and all(
                    _same(group[k], v) for k, v in options.items()
                ):
                    group["params"].append(p)
                    break
            else:
                self.optimizer.add_param_group({"params": [p], **options})
            if p in single.state:
                self.optimizer.state[p] = single.state[p]
        self._params[id(p)] = p
        clip = self._get_grad_clip(p)
        if clip is not None:
            self._clips[id(p)] = clip

    def clear(self) -> None:
        """Forget every tensor and its optimizer state.

        PyroOptim applies a state given to :meth:`set_state` only to tensors it has not
        seen; after ``clear()`` the next step treats every tensor as new, so a loaded
        checkpoint's state takes effect.
        """
        self.optim_objs.clear()
        self.grad_clip.clear()
        self.optimizer = None
        self._params.clear()
        self._clips.clear()

    def get_state(self) -> dict:
        """Return ``{param name: state}``, each state as a one-tensor optimizer's ``state_dict()``.

        Unlike PyroOptim, states set with :meth:`set_state` and not yet consumed are kept,
        and the state tensors are copies, not the live buffers.
        """
        state = dict(self._state_waiting_to_be_consumed)
        if self.optimizer is None:
            return state
        store = pyro.get_param_store()
        for group in self.optimizer.param_groups:
            options = {k: v for k, v in group.items() if k != "params"}
            for p in group["params"]:
                saved = self.optimizer.state.get(p)
                state[store.param_name(p)] = {
                    "state": {} if saved is None else {0: copy.deepcopy(saved)},
                    "param_groups": [{**options, "params": [0]}],
                }
        return state


def Adam(optim_args: OptimArgs, clip_args: OptimArgs | None = None) -> JointOptim:
    """:class:`JointOptim` of :class:`torch.optim.Adam`."""
    return JointOptim(_TorchAdam, optim_args, clip_args)


def AdamW(optim_args: OptimArgs, clip_args: OptimArgs | None = None) -> JointOptim:
    """:class:`JointOptim` of :class:`torch.optim.AdamW`."""
    return JointOptim(_TorchAdamW, optim_args, clip_args)


def decaying_adam(lr: float, *, final_lr: float, steps: int) -> pyro.optim.ClippedAdam:
    """Pyro's ``ClippedAdam`` whose learning rate decays geometrically from ``lr`` to
    ``final_lr`` over ``steps`` steps (its ``lrd = (final_lr / lr) ** (1 / steps)``), so
    the last iterates of a stochastic optimization settle.

    Raises:
        ValueError: Unless ``lr`` and ``final_lr`` are finite, ``0 < final_lr <= lr``, and
            ``steps`` is an int ``>= 1``.
    """
    lr = check_rate("decaying_adam", "lr", lr)
    final_lr = check_rate("decaying_adam", "final_lr", final_lr)
    if final_lr > lr:
        raise ValueError(
            f"decaying_adam needs 0 < final_lr <= lr, got lr={lr} and final_lr={final_lr}"
        )
    try:
        check_count("decaying_adam", "steps", steps)
    except ValueError:
        # the wording its callers (and tests) know
        raise ValueError(f"decaying_adam needs an int steps >= 1, got {steps!r}") from None
    return pyro.optim.ClippedAdam({"lr": lr, "lrd": (final_lr / lr) ** (1 / steps)})
