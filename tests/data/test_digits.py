import torch

from valleys.data import digits


def test_split_is_stratified_seeded_and_scaled():
    a = digits.load(seed=0)
    b = digits.load(seed=0)
    c = digits.load(seed=1)
    assert a.x_train.shape == (1437, 64) and a.x_test.shape == (360, 64)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    assert not torch.equal(a.y_test, c.y_test)
    assert a.x_train.dtype == torch.float32 and a.y_train.dtype == torch.int64
    assert float(a.x_train.min()) == 0.0 and float(a.x_train.max()) == 1.0
    assert a.num_classes == 10
    # stratified: every class holds the same share of the test split (±1 sample)
    counts = torch.bincount(a.y_test, minlength=10)
    assert int(counts.max() - counts.min()) <= 2


def test_image_shape_and_bad_arguments():
    s = digits.load(flatten=False)
    assert s.x_train.shape[1:] == (1, 8, 8)
    for bad in ({"test_frac": 0.0}, {"test_frac": 1.5}, {"seed": -1}):
        try:
            digits.load(**bad)
        except ValueError as err:
            assert "Invalid" in str(err)
        else:
            raise AssertionError(bad)
