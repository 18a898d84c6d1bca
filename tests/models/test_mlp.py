import pytest
import torch

from valleys.models import mlp


def test_parameter_count_and_shapes():
    model = mlp(64, 10, widths=(128, 32), activation="tanh")
    expected = (64 * 128 + 128) + (128 * 32 + 32) + (32 * 10 + 10)
    assert sum(p.numel() for p in model.parameters()) == expected
    assert model(torch.zeros(5, 1, 8, 8)).shape == (5, 10)
    assert isinstance(model[2], torch.nn.Tanh)


def test_sgn_sigmoid_mlp_and_bad_input():
    model = mlp(1, 1, widths=(20, 20, 20), activation="sigmoid")
    assert sum(p.numel() for p in model.parameters()) == 2 * 20 + 2 * 420 + 21
    with pytest.raises(ValueError, match="activation"):
        mlp(4, 2, activation="swish")
    with pytest.raises(ValueError, match=r"widths\[1\]"):
        mlp(4, 2, widths=(3, 0))
