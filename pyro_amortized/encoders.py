r"""Encoders: networks that map each datapoint's context to posterior parameters."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = ["EncoderOutput", "MLPEncoder"]


class EncoderOutput(NamedTuple):
    r"""What an amortized guide's encoder gives for a batch of datapoints.

    The base Normal :math:`\mathcal{N}(\mu(x_i), \sigma(x_i))` over each datapoint's
    joint unconstrained local latent, and for a flow guide the vector :math:`h(x_i)` that
    conditions the flow's steps.
    """

    loc: Tensor  # [batch, D]
    scale: Tensor  # [batch, D], positive
    context: Tensor | None = None  # [batch, context_dim] for a flow guide, else None

    def detach(self) -> EncoderOutput:
        """The same output cut from the graph."""
        return EncoderOutput(*(None if t is None else t.detach() for t in self))


def _softplus_inverse(y: float) -> float:
    return y + math.log(-math.expm1(-y))


class MLPEncoder(nn.Module):
    r"""A multilayer perceptron returning the location and scale of a diagonal Normal.

    The last layer has ``2 * output_dim`` units: the first half is the location, the
    second half goes through a softplus to give a positive scale. The scale head starts
    at zero weight with a bias such that every initial scale equals ``init_scale``, so a
    fresh guide begins as a narrow posterior around the network's initial locations
    (as Pyro's ``AutoNormal`` begins around its initial locations).

    When ``observed_mask=True`` the context may contain NaNs (missing answers): the
    network then sees the context with NaNs replaced by zeros, concatenated with the
    0/1 mask of observed entries, so "missing" and "zero" stay distinguishable.

    Arguments:
        input_dim: Number of context features per datapoint.
        output_dim: Number of latent dimensions :math:`D`.
        hidden_dims: Widths of the hidden layers.
        activation: Activation module class placed after every hidden layer.
        init_scale: Initial posterior scale.
        observed_mask: Whether contexts may hold NaNs for missing entries.
        context_dim: When positive, the last layer has ``context_dim`` more units, returned
            as a third output ``h``: the context that conditions a flow guide's steps.

    Returns:
        ``forward(context)`` returns ``(loc, scale)``, each of shape ``[batch, D]``, and
        with ``context_dim > 0`` also ``h`` of shape ``[batch, context_dim]``.

    Example:
        >>> encoder = MLPEncoder(784, 50, hidden_dims=(200, 200))
        >>> loc, scale = encoder(torch.rand(3, 784))
        >>> loc.shape, scale.shape
        (torch.Size([3, 50]), torch.Size([3, 50]))
    """

    def __init__(
        self,
        input_dim: int,
        output_dim: int,
        hidden_dims: Sequence[int] = (200, 200),
        *,
        activation: type[nn.Module] = nn.Tanh,
        init_scale: float = 0.1,
        observed_mask: bool = False,
        context_dim: int = 0,
    ):
        super().__init__()
        if input_dim < 1 or output_dim < 1:
            raise ValueError(
                f"MLPEncoder needs input_dim >= 1 and output_dim >= 1, got {input_dim} and {output_dim}"
            )
        if not init_scale > 0:
            raise ValueError(f"MLPEncoder needs init_scale > 0, got {init_scale}")
        if not isinstance(context_dim, int) or context_dim < 0:
            raise ValueError(f"MLPEncoder needs an int context_dim >= 0, got {context_dim!r}")
        self.input_dim = input_dim
        self.output_dim = output_dim
        self.observed_mask = observed_mask
        self.context_dim = context_dim

        layers: list[nn.Module] = []
        width = 2 * input_dim if observed_mask else input_dim
        for hidden in hidden_dims:
            layers += [nn.Linear(width, hidden), activation()]
            width = hidden
        self.hidden = nn.Sequential(*layers)
        self.head = nn.Linear(width, 2 * output_dim + context_dim)
        with torch.no_grad():
            self.head.weight[output_dim : 2 * output_dim].zero_()
            self.head.bias[output_dim : 2 * output_dim].fill_(_softplus_inverse(init_scale))

    def forward(self, context: Tensor) -> tuple[Tensor, ...]:
        if self.observed_mask:
            observed = ~torch.isnan(context)
            context = torch.cat([context.nan_to_num(0.0), observed.to(context.dtype)], dim=-1)
        out = self.head(self.hidden(context))
        if not self.context_dim:
            loc, raw_scale = out.chunk(2, dim=-1)
            return loc, F.softplus(raw_scale)
        D = self.output_dim
        return out[..., :D], F.softplus(out[..., D : 2 * D]), out[..., 2 * D :]
