"""Numerical helpers of the example models: softplus's inverse, log(1 - exp(x)), Gauss-Hermite."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

__all__ = ["gauss_hermite", "log1mexp", "softplus_inverse"]


def softplus_inverse(y: float) -> float:
    r"""The ``x`` with ``softplus(x) = y``, for ``y > 0``: where a parameter passed through
    a softplus starts.

    Arguments:
        y: The softplus's value.

    Returns:
        :math:`\log(e^y - 1)`, in double precision.
    """
    return y + math.log(-math.expm1(-y))


def log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x < 0, accurate at both ends; each branch sees only inputs it is
    finite on, so no NaN leaks into the gradient.

    Arguments:
        x: Negative values.

    Returns:
        ``log(1 - exp(x))``, elementwise.

    References:
        Accurately Computing log(1 - exp(-|a|)) (Maechler, 2012).
    """
    near = x > -math.log(2)
    return torch.where(
        near,
        torch.log(-torch.expm1(torch.where(near, x, -1.0))),
        torch.log1p(-torch.exp(torch.where(near, -1.0, x))),
    )


def gauss_hermite(num_nodes: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Nodes and weights of E[f(Z)], Z ~ N(0, 1) (probabilists' Gauss-Hermite).

    Arguments:
        num_nodes: How many nodes.
        dtype: Their dtype.

    Returns:
        ``(nodes, weights)``, each ``[num_nodes]``; the weights sum to 1.
    """
    nodes, weights = np.polynomial.hermite_e.hermegauss(num_nodes)
    weights = weights / weights.sum()
    return torch.tensor(nodes, dtype=dtype), torch.tensor(weights, dtype=dtype)
