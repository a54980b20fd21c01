import math

import pytest

from pyro_amortized.checks import (
    check_bool,
    check_count,
    check_counts,
    check_finite,
    check_probability,
    check_rate,
)


def test_a_count_is_an_int_of_at_least_its_minimum():
    assert check_count("f", "steps", 3) == 3
    assert check_count("f", "every", 0, minimum=0) == 0
    check_counts("f", steps=1, chunk_size=10)
    assert check_count("f", "patience", None, optional=True) is None
    assert check_count("f", "patience", 2, optional=True) == 2
    assert check_count("f", "patience", None, optional=True) is None


@pytest.mark.parametrize("value", [0, -1, True, False, 2.0, "3", None, math.inf])
def test_what_is_not_a_count_is_refused(value):
    with pytest.raises(ValueError, match=rf"f: steps must be an int >= 1, got {value!r}"):
        check_count("f", "steps", value)


def test_the_counts_are_named_in_their_messages():
    with pytest.raises(ValueError, match="g: chunk_size must be an int >= 1, got 0"):
        check_counts("g", num_samples=5, chunk_size=0)
    with pytest.raises(ValueError, match="g: every must be an int >= 0, got -1"):
        check_count("g", "every", -1, minimum=0)


@pytest.mark.parametrize("value", [0, True, 1.5, "2"])
def test_an_optional_count_is_none_or_a_count(value):
    message = f"f: patience must be None or an int >= 1, got {value!r}"
    with pytest.raises(ValueError, match=message):
        check_count("f", "patience", value, optional=True)
    with pytest.raises(ValueError, match=message):
        check_count("f", "patience", value, optional=True)
    with pytest.raises(ValueError, match="f: size must be None or an int >= 2, got 1"):
        check_count("f", "size", 1, minimum=2, optional=True)


def test_a_rate_is_a_finite_positive_number_returned_as_a_float():
    assert check_rate("f", "lr", 1) == 1.0 and isinstance(check_rate("f", "lr", 1), float)
    assert check_rate("f", "clip", None, optional=True) is None


@pytest.mark.parametrize("value", [0, 0.0, -1e-3, math.nan, math.inf, True, "0.1", None])
def test_what_is_not_a_rate_is_refused(value):
    with pytest.raises(ValueError, match=r"f: lr must be > 0 \(a finite number\), got "):
        check_rate("f", "lr", value)
    if value is not None:
        with pytest.raises(ValueError, match=r"f: lr must be None or > 0 \(a finite number\), got"):
            check_rate("f", "lr", value, optional=True)


def test_a_finite_number_may_have_any_sign():
    assert check_finite("f", "start", -2) == -2.0 and check_finite("f", "end", 0.5) == 0.5
    for value in (math.nan, -math.inf, True, "1", None):
        with pytest.raises(ValueError, match=r"f: start must be a finite number, got "):
            check_finite("f", "start", value)


def test_a_probability_lies_in_the_interval_asked_for():
    assert check_probability("f", "p", 0) == 0.0 and check_probability("f", "p", 1) == 1.0
    assert check_probability("f", "ratio", 1, low=False) == 1.0
    with pytest.raises(ValueError, match=r"f: ratio must be in \(0, 1\], got 0"):
        check_probability("f", "ratio", 0, low=False)
    with pytest.raises(ValueError, match=r"f: momentum must be in \[0, 1\), got 1"):
        check_probability("f", "momentum", 1, high=False)
    for value in (-0.1, 1.5, math.nan, True, "0.5"):
        with pytest.raises(ValueError, match=r"f: p must be in \[0, 1\], got "):
            check_probability("f", "p", value)


def test_a_bool_is_a_bool():
    assert check_bool("f", "flag", False) is False
    for value in (0, 1, "True", None):
        with pytest.raises(ValueError, match=f"f: flag must be a bool, got {value!r}"):
            check_bool("f", "flag", value)
