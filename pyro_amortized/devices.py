r"""Where a call's tensors live: the data's device decides, as in Pyro.

The guides, objectives and diagnostics create their tensors on the device of the data
they are called with, never on a default device; these two helpers say which device that
is and fork the random streams the data's draws use.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

__all__ = ["data_device", "fork_rng"]


def data_device(args: Sequence, kwargs: Mapping | None = None) -> torch.device | None:
    """The device of the first tensor among a call's arguments, then its keyword
    arguments; ``None`` when there is none."""
    for value in (*args, *(kwargs or {}).values()):
        if isinstance(value, Tensor):
            return value.device
    return None


def fork_rng(args: Sequence):
    """``torch.random.fork_rng`` over the CPU's stream and, when a tensor among ``args``
    is on a GPU, that GPU's: draws made inside leave the global streams as they were."""
    cuda = [a.device for a in args if isinstance(a, Tensor) and a.device.type == "cuda"][:1]
    return torch.random.fork_rng(devices=cuda)
