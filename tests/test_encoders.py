import math

import pytest
import torch

from pyro_amortized import MLPEncoder


def test_shapes_and_initial_scale():
    encoder = MLPEncoder(5, 3, hidden_dims=(7, 4), init_scale=0.25)
    loc, scale = encoder(torch.randn(6, 5))
    assert loc.shape == scale.shape == (6, 3)
    assert torch.allclose(scale, torch.full_like(scale, 0.25), atol=1e-6)


def test_no_hidden_layer_is_affine():
    encoder = MLPEncoder(4, 2, hidden_dims=())
    x = torch.randn(3, 4)
    loc, _ = encoder(x)
    weight, bias = encoder.head.weight[:2], encoder.head.bias[:2]
    assert torch.allclose(loc, x @ weight.T + bias)


def test_observed_mask_distinguishes_missing_from_zero():
    encoder = MLPEncoder(3, 2, hidden_dims=(8,), observed_mask=True)
    assert encoder.hidden[0].in_features == 6
    missing = torch.tensor([[1.0, math.nan, 2.0]])
    zero = torch.tensor([[1.0, 0.0, 2.0]])
    loc_missing, scale_missing = encoder(missing)
    loc_zero, _ = encoder(zero)
    assert torch.isfinite(loc_missing).all() and torch.isfinite(scale_missing).all()
    assert not torch.allclose(loc_missing, loc_zero)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(input_dim=0, output_dim=2), "input_dim"),
        (dict(input_dim=2, output_dim=0), "output_dim"),
        (dict(input_dim=2, output_dim=2, init_scale=0.0), "init_scale"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MLPEncoder(**kwargs)
