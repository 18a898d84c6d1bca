"""Every registry model against the shared contract: shapes, gradients, determinism, errors."""

import pytest
import torch

from valleys import models

# name -> (the dataset shape it is meant for, a cheaper shape for the backward pass, kwargs that
# keep the backward pass cheap on a CPU)
CASES = {
    "mlp": ((1, 28, 28), (1, 28, 28), {}),
    "mnistfc": ((1, 28, 28), (1, 28, 28), {}),
    "lenet": ((1, 28, 28), (1, 28, 28), {}),
    "lenet_small": ((1, 28, 28), (1, 28, 28), {}),
    "sgn_conv_fashion": ((1, 28, 28), (1, 28, 28), {}),
    "sgn_conv_cifar": ((3, 32, 32), (3, 32, 32), {}),
    "allcnn": ((3, 32, 32), (3, 16, 16), {}),
    "vgg16_bn": ((3, 32, 32), (3, 32, 32), {}),
    "vgg19_bn": ((3, 32, 32), (3, 32, 32), {}),
    "resnet18": ((3, 32, 32), (3, 8, 8), {}),
    "wrn": ((3, 32, 32), (3, 16, 16), {"depth": 10, "widen_factor": 2, "dropout": 0.3}),
    "convmixer": ((3, 32, 32), (3, 16, 16), {}),
    "resnext18": ((3, 32, 32), (3, 8, 8), {}),
    "cnn1d": ((40,), (40,), {}),
}


def test_every_registry_entry_has_a_case():
    assert sorted(CASES) == sorted(models.names())


@pytest.mark.parametrize("name", sorted(CASES))
def test_forward_backward_and_eval(name):
    _, shape, kwargs = CASES[name]
    torch.manual_seed(0)
    model = models.get(name, shape, 7, **kwargs)
    out = model(torch.randn(2, *shape))
    assert out.shape == (2, 7)
    torch.nn.functional.cross_entropy(out, torch.tensor([0, 6])).backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all(), pname
    model.eval()  # BatchNorm running statistics and dropout off: a batch of one works
    with torch.no_grad():
        single = torch.randn(1, *shape)
        assert torch.equal(model(single), model(single))


@pytest.mark.parametrize("name", sorted(CASES))
def test_parameters_are_deterministic(name):
    shape, _, kwargs = CASES[name]
    torch.manual_seed(1)
    a = models.get(name, shape, 10, **kwargs)
    torch.manual_seed(1)
    b = models.get(name, shape, 10, **kwargs)
    assert models.param_count(a) == models.param_count(b) > 0
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb
        assert torch.equal(va, vb), ka


@pytest.mark.parametrize("name", sorted(CASES))
def test_default_model_forward_at_dataset_size(name):
    # the registry defaults (WRN-28-10 included), forward only
    shape, _, _ = CASES[name]
    model = models.get(name, shape, 100).eval()
    with torch.no_grad():
        assert model(torch.randn(2, *shape)).shape == (2, 100)


def test_unknown_name_suggests_the_closest():
    with pytest.raises(ValueError, match="did you mean 'resnet18'") as err:
        models.get("resnet81", (3, 32, 32), 10)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="Unknown model"):
        models.spec("vgg")


@pytest.mark.parametrize(
    ("name", "kwargs", "match"),
    [
        ("lenet", {"dropuot": 0.1}, "did you mean 'dropout'"),
        ("wrn", {"width": 4}, "valid: depth, widen_factor, dropout, block"),
        ("sgn_conv_cifar", {"width": 4}, "takes none"),
    ],
)
def test_unknown_kwargs_name_the_valid_ones(name, kwargs, match):
    shape, _, _ = CASES[name]
    with pytest.raises(ValueError, match=match) as err:
        models.get(name, shape, 10, **kwargs)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("name", "shape", "match"),
    [
        ("lenet", (784,), r"lenet takes images shaped \(C, H, W\)"),
        ("lenet", (1, 20, 20), "H, W >= 22"),
        ("lenet_small", (1, 12, 12), "H, W >= 16"),
        ("sgn_conv_fashion", (1, 15, 28), "H, W >= 16"),
        ("sgn_conv_cifar", (3, 16, 16), "H, W >= 18"),
        ("allcnn", (3, 32), r"\(C, H, W\)"),
        ("vgg16_bn", (1, 28, 28), "H, W >= 32"),
        ("vgg19_bn", (3, 32, 16), "H, W >= 32"),
        ("resnet18", (64,), r"\(C, H, W\)"),
        ("wrn", (40,), r"\(C, H, W\)"),
        ("convmixer", (3, 1, 1), "H, W >= 2"),
        ("resnext18", (1, 40), r"\(C, H, W\)"),
        ("cnn1d", (1, 28, 28), r"\(L,\) or \(C, L\)"),
        ("cnn1d", (2,), "L >= 3"),
    ],
)
def test_impossible_input_shapes_are_rejected(name, shape, match):
    with pytest.raises(ValueError, match=match) as err:
        models.get(name, shape, 10)
    assert str(err.value).startswith("Invalid input_shape")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("shape", "outputs", "match"),
    [
        (28, 10, "non-empty tuple"),
        ((), 10, "non-empty tuple"),
        ((1, 0, 28), 10, r"input_shape\[1\]"),
        ((1, 28, 28), 0, "num_outputs"),
    ],
)
def test_bad_shapes_and_output_counts(shape, outputs, match):
    with pytest.raises(ValueError, match=match):
        models.get("mlp", shape, outputs)


@pytest.mark.parametrize(
    ("name", "kwargs", "match"),
    [
        ("mlp", {"widths": 5}, "widths"),
        ("mlp", {"activation": "swish"}, "activation"),
        ("mnistfc", {"variant": "torch"}, "variant"),
        ("lenet", {"dropout": 1.0}, "dropout"),
        ("lenet_small", {"init_std": -0.1}, "init_std"),
        ("allcnn", {"channels": (96,)}, "channels"),
        ("resnet18", {"width": 0}, "width"),
        ("wrn", {"depth": 27}, "depth: 27 .must be 6n"),
        ("wrn", {"block": "preact"}, "block"),
        ("convmixer", {"patch_size": 0}, "patch_size"),
        ("resnext18", {"depth": 10}, "depth"),
        ("cnn1d", {"channels": 2.5}, "channels"),
    ],
)
def test_bad_kwarg_values(name, kwargs, match):
    shape, _, _ = CASES[name]
    with pytest.raises(ValueError, match=f"Invalid {match}"):
        models.get(name, shape, 10, **kwargs)


def test_spec_lists_kwargs_with_defaults():
    assert models.spec("wrn").kwargs() == {
        "depth": 28,
        "widen_factor": 10,
        "dropout": 0.0,
        "block": "standard",
    }
    assert models.spec("vgg16_bn").kwargs() == {}
    assert models.names()[0] == "mlp"
