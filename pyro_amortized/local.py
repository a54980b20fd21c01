"""Deprecated: the per-datapoint optimizer is :mod:`pyro_amortized.perdatapoint`."""

import warnings

from .perdatapoint import FAMILIES, optimize_local

__all__ = ["FAMILIES", "optimize_local"]

warnings.warn(
    "pyro_amortized.local is deprecated and will be removed in the next release; import "
    "optimize_local from pyro_amortized.perdatapoint",
    FutureWarning,
    stacklevel=2,
)
