import pyro
import pytest
import torch


@pytest.fixture(autouse=True)
def _fresh_state():
    """Every test starts from an empty param store, a fixed seed and float64 defaults off."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    dtype = torch.get_default_dtype()
    yield
    torch.set_default_dtype(dtype)
    pyro.clear_param_store()


@pytest.fixture
def float64():
    """float64 defaults for this test; ``_fresh_state`` restores the dtype after it."""
    torch.set_default_dtype(torch.float64)
