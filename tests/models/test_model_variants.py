"""Layer orders, variants and initialisations that the registry entries document."""

import math

import pytest
import torch
from torch import nn

from valleys import models


def layer_types(model, *types):
    return [type(m) for m in model.modules() if isinstance(m, types)]


def test_lenet_lua_and_python_layer_orders():
    lua = models.get("lenet", (1, 28, 28), 10)
    py = models.get("lenet", (1, 28, 28), 10, variant="python")
    C, R, P, B, D = nn.Conv2d, nn.ReLU, nn.MaxPool2d, nn.BatchNorm2d, nn.Dropout
    assert [type(m) for m in lua[:5]] == [C, R, P, B, D]
    assert [type(m) for m in py[:5]] == [C, B, R, P, D]
    assert nn.BatchNorm1d not in layer_types(lua, nn.Module)
    assert nn.BatchNorm1d in layer_types(py, nn.Module)


def test_mnistfc_lua_and_python_layer_orders():
    lua = models.get("mnistfc", (1, 28, 28), 10)
    py = models.get("mnistfc", (1, 28, 28), 10, variant="python")
    F, L, R, B, D = nn.Flatten, nn.Linear, nn.ReLU, nn.BatchNorm1d, nn.Dropout
    assert [type(m) for m in lua[:5]] == [F, L, R, B, D]
    assert [type(m) for m in py[:6]] == [F, D, L, B, R, D]
    assert py[1].p == 0.2
    with_input = models.get("mnistfc", (1, 28, 28), 10, input_dropout=0.2)
    assert isinstance(with_input[1], D) and with_input[1].p == 0.2
    no_input = models.get("mnistfc", (1, 28, 28), 10, variant="python", input_dropout=0)
    assert isinstance(no_input[1], L)


def test_lenet_small_original_init():
    torch.manual_seed(0)
    model = models.get("lenet_small", (1, 28, 28), 10, init_std=0.1)
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert flat.std().item() == pytest.approx(0.1, rel=0.05)
    assert abs(flat.mean().item()) < 0.005


def test_allcnn_dropouts_and_final_conv():
    model = models.get("allcnn", (3, 32, 32), 10)
    drops = [m.p for m in model.modules() if isinstance(m, nn.Dropout)]
    assert drops == [0.2, 0.5, 0.5]
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [c.kernel_size[0] for c in convs] == [3] * 8 + [1]
    assert [c.stride[0] for c in convs] == [1, 1, 2, 1, 1, 2, 1, 1, 1]
    assert convs[-1].out_channels == 10
    # MNIST-sized inputs go through too (global pooling)
    mnist_sized = models.get("allcnn", (1, 28, 28), 10, dropout=0.0)
    assert mnist_sized(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_vgg_he_init():
    torch.manual_seed(0)
    model = models.get("vgg16_bn", (3, 32, 32), 100)
    last_conv = [m for m in model.modules() if isinstance(m, nn.Conv2d)][-1]
    assert last_conv.weight.std().item() == pytest.approx(math.sqrt(2 / (9 * 512)), rel=0.02)
    assert torch.count_nonzero(last_conv.bias) == 0
    head = model[-1]
    assert isinstance(head, nn.Linear) and head.in_features == 512
    assert head.weight.std().item() == pytest.approx(0.01, rel=0.05)


def test_wrn_blocks_and_dropout():
    small = models.get("wrn", (3, 32, 32), 10, depth=16, widen_factor=2, dropout=0.3)
    assert len(small.blocks) == 3 * 2
    assert all(m.p == 0.3 for m in small.modules() if isinstance(m, nn.Dropout))
    tf = models.get("wrn", (3, 32, 32), 10, depth=16, widen_factor=1, block="tf_port")
    # the TF port projects on the first block of every group, even where widths agree (16→16)
    assert [b.project is not None for b in tf.blocks] == [True, False] * 3
    tf(torch.randn(2, 3, 16, 16)).sum().backward()
    assert all(p.grad is not None for p in tf.parameters())


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
def test_convmixer_even_kernel_and_tiny_imagenet_size():
    model = models.get("convmixer", (3, 64, 64), 200, dim=16, depth=2, kernel_size=4)
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 200)


def test_resnext_depth_sets_bottlenecks_per_stage():
    assert len(models.get("resnext18", (3, 32, 32), 10).blocks) == 3
    deep = models.get("resnext18", (3, 32, 32), 10, depth=29, cardinality=2, widen_factor=1)
    assert len(deep.blocks) == 9
    groups = [m.groups for m in deep.modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert groups == [2] * 9


def test_cnn1d_inputs():
    model = models.get("cnn1d", (40,), 10)
    assert model(torch.randn(3, 40)).shape == (3, 10)
    two_channels = models.get("cnn1d", (2, 40), 10)
    assert two_channels(torch.randn(3, 2, 40)).shape == (3, 10)
    assert two_channels[0].in_channels == 2
