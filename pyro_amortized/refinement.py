r"""Semi-amortized inference: gradient steps on each datapoint's posterior, from the encoder.

"There's no reason why we can't use a recognition network to initialize q, then take a few
steps of SVI." :func:`refine` does that for every datapoint at once: the encoder's output
(a flow guide's base Normal) becomes one free (loc, scale) per datapoint, and a fixed
number of Adam or SGD steps on each datapoint's own bound move it, the model held fixed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from pyro import poutine
from torch import Tensor
from tqdm import tqdm

from .guides import AutoAmortizedGuide
from .local import _check_counts, _family, _fix_globals, _local_guide, _PerDatapointOptimizer
from .objectives import Trace_IWELBO

__all__ = ["Refined", "refine"]

OPTIMIZERS = ("adam", "sgd")
# refine's options besides num_steps, with their defaults
REFINE_DEFAULTS = {
    "step_size": 2e-2,
    "optimizer": "adam",
    "momentum": 0.0,
    "num_particles": 1,
    "estimator": "iwae",
    "max_grad_norm": None,
}


class Refined(NamedTuple):
    """The refined posteriors of :func:`refine`."""

    model: Callable  # the model, with any globals fixed at the guide's median
    guide: Callable  # a guide sampling every datapoint's refined posterior
    loc: Tensor  # [N, D] refined base loc over the joint unconstrained local latent
    scale: Tensor  # [N, D] refined base scale
    bounds: Tensor  # [num_steps, N] each step's estimate of each datapoint's ELBO


def refine(
    guide: AutoAmortizedGuide,
    model: Callable,
    *args,
    num_steps: int = 20,
    step_size: float = 2e-2,
    optimizer: str = "adam",
    momentum: float = 0.0,
    num_particles: int = 1,
    estimator: str = "iwae",
    max_grad_norm: float | None = None,
    progress: bool = False,
    **kwargs,
) -> Refined:
    r"""Refine an amortized guide's posteriors with ``num_steps`` gradient steps per datapoint.

    Each datapoint's posterior starts at the encoder's output and takes ``num_steps``
    steps of Adam or SGD on its own ELBO estimate (``num_particles`` draws a step); all
    datapoints move together in one batched tensor program, and each datapoint's steps
    are exactly those it would take alone. Only the per-datapoint (loc, scale) move: the
    model's parameters, the encoder's and a flow's networks are held fixed (a flow guide
    keeps its flow, at each datapoint's own context, on top of the refined base Normal).
    Globals are fixed at the guide's median.

    Arguments:
        guide: An amortized guide.
        model: The model (called with all its datapoints at once).
        *args: The model's arguments.
        num_steps: Gradient steps per datapoint.
        step_size: The optimizer's learning rate. On 500 binarized-MNIST test images of a
            VAE trained 30 epochs with the ELBO, Adam with 10 draws a step recovered 75%,
            85%, 86% and 84% of the amortization gap in 20 steps at 1e-2, 2e-2, 3e-2 and
            5e-2, and 97%, 96%, 94% and 89% in 100 steps.
        optimizer: ``"adam"`` or ``"sgd"``.
        momentum: SGD's momentum (``optimizer="sgd"`` only).
        num_particles: Draws of each step's ELBO estimate.
        estimator: ``"iwae"`` (the reparameterized gradient) or ``"stl"`` (sticking the
            landing: zero variance once the posterior is exact).
        max_grad_norm: Clip each datapoint's gradient to this norm (``None``: no clipping).
        progress: Show a ``tqdm`` progress bar (on stderr).
        **kwargs: The model's keyword arguments.

    Returns:
        A :class:`Refined`: the model and a guide for the refined posteriors (both with the
        globals fixed), the refined base parameters and every step's bound estimates.

    References:
        Inference Suboptimality in Variational Autoencoders (Cremer, Li and Duvenaud, 2018).
        Semi-Amortized Variational Autoencoders (Kim, Wiseman, Miller, Sontag and Rush, 2018).
        On the Challenges of Learning with Inference Networks on Sparse, High-dimensional
        Data (Krishnan, Liang and Hoffman, 2018).
    """
    if not isinstance(guide, AutoAmortizedGuide):
        raise ValueError(f"refine: the guide ({type(guide).__name__}) is not an AutoAmortizedGuide")
    _check_refine_options(
        "refine",
        num_steps=num_steps,
        step_size=step_size,
        optimizer=optimizer,
        momentum=momentum,
        num_particles=num_particles,
        estimator=estimator,
        max_grad_norm=max_grad_norm,
    )
    model, _, local_plate, globals_ = _fix_globals(model, guide, args, kwargs, "refine")
    family = _family(guide, "refine")
    local_guide, params = _local_guide(
        model, guide, args, kwargs, local_plate, family, "encoder", 1, None
    )
    base = params[:2]  # the table's loc and log scale; a flow's networks stay the guide's
    if globals_:
        local_guide = poutine.condition(local_guide, data=globals_)
    elbo = Trace_IWELBO(num_particles, local_plate=local_plate)
    step = _PerDatapointOptimizer(
        base, optimizer, step_size, momentum=momentum, max_grad_norm=max_grad_norm
    )
    active = torch.ones(step.num_rows, dtype=torch.bool, device=base[0].device)
    bounds = []
    for _ in tqdm(range(num_steps), desc="refine", unit="step", disable=not progress):
        terms = elbo._collect(model, local_guide, args, kwargs, stopped=estimator == "stl")
        bound = (terms.model_local - terms.guide_local).mean(0)
        grads = torch.autograd.grad(-bound.sum(), base)
        step.step(grads, active)
        bounds.append(bound.detach())
    N = step.num_rows
    bounds = torch.stack(bounds) if bounds else base[0].new_zeros(0, N)
    loc, log_scale = (p.detach() for p in base)
    return Refined(model, local_guide, loc, log_scale.exp(), bounds)


def _check_refine_options(
    owner: str,
    *,
    num_steps: int,
    step_size: float,
    optimizer: str,
    momentum: float,
    num_particles: int,
    estimator: str,
    max_grad_norm: float | None,
) -> None:
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 0:
        raise ValueError(f"{owner}: num_steps must be an int >= 0, got {num_steps!r}")
    _check_counts(owner, num_particles=num_particles)
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"{owner}: optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    if not step_size > 0:
        raise ValueError(f"{owner}: step_size must be > 0, got {step_size!r}")
    if not 0 <= momentum < 1:
        raise ValueError(f"{owner}: momentum must be in [0, 1), got {momentum!r}")
    if momentum and optimizer != "sgd":
        raise ValueError(f"{owner}: momentum is SGD's; pass optimizer='sgd' or momentum=0")
    if estimator not in ("iwae", "stl"):
        raise ValueError(f"{owner}: estimator must be 'iwae' or 'stl', got {estimator!r}")
    if max_grad_norm is not None and not max_grad_norm > 0:
        raise ValueError(f"{owner}: max_grad_norm must be None or > 0, got {max_grad_norm!r}")
