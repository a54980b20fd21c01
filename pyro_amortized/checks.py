r"""Validation of hyperparameters: one message per kind of option, naming its owner.

Every public function and class of the package checks its options with these, so that a
count, a probability or a rate is refused the same way everywhere (``True`` is not a
count, ``nan`` is not a rate) with a :class:`ValueError` that names the function, the
argument and what to pass instead.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Mapping
from typing import TypeVar

import torch

__all__ = [
    "check_bool",
    "check_count",
    "check_counts",
    "check_device",
    "check_finite",
    "check_probability",
    "check_rate",
    "options_from",
    "renamed",
]

_Options = TypeVar("_Options")


def check_count(
    owner: str, name: str, value: object, *, minimum: int = 1, optional: bool = False
) -> int | None:
    """``value`` if it is an ``int`` (not a ``bool``) of at least ``minimum``; with
    ``optional`` also ``None``.

    Raises:
        ValueError: ``"{owner}: {name} must be an int >= {minimum}, got {value!r}"``
            (``"must be None or an int >= ..."`` with ``optional``).
    """
    if optional and value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        what = "None or an int" if optional else "an int"
        raise ValueError(f"{owner}: {name} must be {what} >= {minimum}, got {value!r}")
    return value


def check_counts(owner: str, *, minimum: int = 1, **values: object) -> None:
    """:func:`check_count` on every keyword argument (its name is the option's)."""
    for name, value in values.items():
        check_count(owner, name, value, minimum=minimum)


def check_rate(owner: str, name: str, value: object, *, optional: bool = False) -> float | None:
    """``value`` as a float if it is a finite real number > 0 (a learning rate, a norm, a
    scale); with ``optional`` also ``None``.

    Raises:
        ValueError: ``"{owner}: {name} must be > 0 (a finite number), got {value!r}"``.
    """
    if optional and value is None:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or not value > 0
    ):
        what = "None or > 0" if optional else "> 0"
        raise ValueError(f"{owner}: {name} must be {what} (a finite number), got {value!r}")
    return float(value)


def check_probability(
    owner: str, name: str, value: object, *, low: bool = True, high: bool = True
) -> float:
    """``value`` as a float if it lies in [0, 1]; ``low=False`` or ``high=False`` leave
    out 0 or 1 (a momentum lies in [0, 1)).

    Raises:
        ValueError: ``"{owner}: {name} must be in [0, 1], got {value!r}"`` (with the
            brackets of the interval asked for).
    """
    ok = (
        not isinstance(value, bool)
        and isinstance(value, (int, float))
        and (0 <= value if low else 0 < value)
        and (value <= 1 if high else value < 1)
    )
    if not ok:
        interval = ("[" if low else "(") + "0, 1" + ("]" if high else ")")
        raise ValueError(f"{owner}: {name} must be in {interval}, got {value!r}")
    return float(value)


def options_from(cls: type[_Options], owner: str, values: Mapping | _Options | None) -> _Options:
    """An options dataclass from a mapping of its fields, its errors naming ``owner``.

    The dataclass validates itself in ``__post_init__`` through a method
    ``check(owner)``; built here from the values a function was given, its messages
    name that function (``"refine: lr must be > 0"``) rather than the dataclass. An
    instance of ``cls`` comes back as it is, and ``None`` gives the defaults.

    Raises:
        ValueError: an unknown field (the message lists the known ones), or an invalid value.
    """
    if values is None:
        values = {}
    if isinstance(values, cls):
        return values
    if not isinstance(values, Mapping):
        raise ValueError(
            f"{owner}: options must be a {cls.__name__} or a dict of its fields, got {values!r}"
        )
    fields = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(f"{owner}: {cls.__name__} has no {unknown}; it takes {sorted(fields)}")
    options = object.__new__(cls)
    for field in dataclasses.fields(cls):
        default = field.default
        if default is dataclasses.MISSING and field.default_factory is not dataclasses.MISSING:
            default = field.default_factory()
        object.__setattr__(options, field.name, values.get(field.name, default))
    options.check(owner)
    return cls(**values)


def renamed(owner: str, old: str, new: str, value: object) -> object:
    """``value``, passed under the deprecated name ``old``, after a ``FutureWarning`` that
    names ``new``."""
    warnings.warn(
        f"{owner}: {old}= is deprecated and will be removed in the next release; pass {new}=",
        FutureWarning,
        stacklevel=3,
    )
    return value


def check_bool(owner: str, name: str, value: object) -> bool:
    """``value`` if it is a ``bool``.

    Raises:
        ValueError: ``"{owner}: {name} must be a bool, got {value!r}"``.
    """
    if not isinstance(value, bool):
        raise ValueError(f"{owner}: {name} must be a bool, got {value!r}")
    return value


def check_finite(owner: str, name: str, value: object) -> float:
    """``value`` as a float if it is a finite real number (not a ``bool``), of any sign.

    Raises:
        ValueError: ``"{owner}: {name} must be a finite number, got {value!r}"``.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{owner}: {name} must be a finite number, got {value!r}")
    return float(value)


def check_device(
    owner: str, name: str, value: object, *, optional: bool = False
) -> torch.device | None:
    """``value`` as a ``torch.device`` if it is one, or a string naming one (``"cpu"``,
    ``"cuda"``, ``"cuda:1"``) that this machine has; with ``optional`` also ``None``.

    Raises:
        ValueError: ``"{owner}: {name} must be a torch.device or a device string such as
            'cpu' or 'cuda', got {value!r}"``, or the device is not on this machine (a
            CUDA device without CUDA, an index past the last GPU).
    """
    if optional and value is None:
        return None
    what = "None, " if optional else ""
    try:
        if not isinstance(value, (str, torch.device)):
            raise TypeError
        device = torch.device(value)
    except (TypeError, RuntimeError):
        raise ValueError(
            f"{owner}: {name} must be {what}a torch.device or a device string such as 'cpu' "
            f"or 'cuda', got {value!r}"
        ) from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(
                f"{owner}: {name}={value!r} but this machine has no CUDA device "
                "(torch.cuda.is_available() is False)"
            )
        if device.index is not None and device.index >= count:
            raise ValueError(
                f"{owner}: {name}={value!r} but this machine has {count} CUDA device(s)"
            )
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"{owner}: {name}={value!r} but MPS is not available on this machine")
    return device
