"""The shared landscape helpers: batches, the weighted full loss and its gradient, eval mode,
parameter stand-ins that leave the model untouched."""

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from problems import classification_data, tiny_classifier
from valleys.landscape import common


def _batches(x, y, b):
    return [(x[i : i + b], y[i : i + b]) for i in range(0, x.shape[0], b)]


def test_full_loss_weights_a_smaller_last_batch_by_its_size():
    x, y = classification_data(50)
    model = tiny_classifier()
    value = common.full_loss(model, F.cross_entropy, _batches(x, y, 16), accuracy=True)
    with torch.no_grad():
        out = model(x)
    assert value.count == 50
    assert value.loss.dtype == torch.float64
    torch.testing.assert_close(value.loss, F.cross_entropy(out, y), rtol=1e-12, atol=0)
    expected = (out.argmax(1) == y).double().mean()
    torch.testing.assert_close(value.accuracy, expected)


@pytest.mark.parametrize("kind", ["list", "callable", "generator"])
def test_batches_may_be_a_collection_a_callable_or_a_one_shot_iterator(kind):
    x, y = classification_data(40)
    model = tiny_classifier()
    pairs = _batches(x, y, 16)
    batches = {
        "list": pairs,
        "callable": lambda: iter(pairs),
        "generator": (p for p in pairs),
    }[kind]
    source = common.batch_source(batches)
    first = common.full_loss(model, F.cross_entropy, source).loss
    second = common.full_loss(model, F.cross_entropy, source).loss  # a second pass works too
    assert first == second
    torch.testing.assert_close(first, F.cross_entropy(model(x), y).detach().double())


def test_as_stream_cycles_collections_and_reads_iterators_as_they_are():
    pairs = [(torch.zeros(2), torch.zeros(2)), (torch.ones(3), torch.ones(3))]
    stream = common.as_stream(pairs)
    sizes = [next(stream)[1].shape[0] for _ in range(5)]
    assert sizes == [2, 3, 2, 3, 2]
    one_shot = iter(pairs)
    assert common.as_stream(one_shot) is one_shot
    with pytest.raises(ValueError, match="batches"):
        next(common.as_stream([]))


def test_full_loss_and_grad_equals_the_gradient_of_the_whole_data_loss():
    x, y = classification_data(37)
    model = tiny_classifier()
    params = list(model.parameters())
    loss, grads = common.full_loss_and_grad(model, F.cross_entropy, _batches(x, y, 10), params)
    whole = F.cross_entropy(model(x), y)
    expected = torch.autograd.grad(whole, params)
    torch.testing.assert_close(loss, whole.detach())
    for g, e in zip(grads, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)
    assert all(p.grad is None for p in params)  # nothing written into .grad


def test_call_with_stands_in_for_parameters_without_writing_them():
    model = tiny_classifier()
    x, _ = classification_data(8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    zeros = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    out = common.call_with(model, zeros, x)
    assert torch.equal(out, torch.zeros_like(out))
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_eval_mode_restores_each_modules_flag():
    model = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5), nn.BatchNorm1d(2))
    model.train()
    model[1].eval()
    with common.eval_mode(model):
        assert not any(m.training for m in model.modules())
    assert [m.training for m in model.modules()] == [True, True, False, True]


def test_trainable_parameters_selects_and_checks():
    model = tiny_classifier()
    model[0].bias.requires_grad_(False)
    assert list(common.trainable_parameters(model)) == ["0.weight", "2.weight", "2.bias"]
    assert list(common.trainable_parameters(model, [model[2].bias])) == ["2.bias"]
    with pytest.raises(ValueError, match="Invalid params"):
        common.trainable_parameters(model, [torch.zeros(3)])


def test_dataset_mean_of_tensor_lists_and_empty_batches():
    pairs = [(None, torch.zeros(1)), (None, torch.zeros(3))]
    one = [torch.tensor(1.0), torch.tensor([2.0])]
    two = [torch.tensor(5.0), torch.tensor([6.0])]
    values = iter([one, two])
    mean, n = common.dataset_mean(lambda x, y: next(values), pairs)
    assert n == 4
    torch.testing.assert_close(mean[0], torch.tensor(4.0))
    torch.testing.assert_close(mean[1], torch.tensor([5.0]))
    with pytest.raises(ValueError, match="no samples"):
        common.dataset_mean(lambda x, y: torch.tensor(1.0), [])
