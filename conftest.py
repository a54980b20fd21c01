"""Names that the docstring examples (run as doctests) may use without importing."""

import pyro
import pyro.distributions as dist
import pytest
import torch


@pytest.fixture(autouse=True)
def _doctest_names(doctest_namespace):
    doctest_namespace.update(torch=torch, pyro=pyro, dist=dist)
