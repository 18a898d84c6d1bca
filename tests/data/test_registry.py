from pathlib import Path

import pytest
import torch

from valleys import data
from valleys.data import Dataset, Split, digits


def test_names_and_descriptions():
    expected = {
        "digits",
        "mnist1d",
        "sine10",
        "sine100",
        "diabetes",
        "mnist",
        "fashion_mnist",
        "cifar10",
        "cifar100",
        "tinyimagenet",
    }
    assert set(data.names()) == expected
    for name in data.names():
        assert data.describe(name)


def test_unknown_name_suggests_the_closest():
    with pytest.raises(
        ValueError, match=r"Unknown dataset: 'fashion-mnist' \(did you mean 'fashion_mnist'"
    ):
        data.get("fashion-mnist")


def test_unknown_option_and_bad_arguments():
    with pytest.raises(ValueError, match=r"Unknown option for dataset 'digits': 'flaten'.*flatten"):
        data.get("digits", flaten=False)
    with pytest.raises(ValueError, match="Invalid seed"):
        data.get("sine10", seed=-1)
    with pytest.raises(ValueError, match="Invalid download"):
        data.get("sine10", download="yes")
    with pytest.raises(ValueError, match="Invalid preprocess"):
        data.get("digits", preprocess="whiten")


def test_data_root_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv("VALLEYS_DATA", raising=False)
    assert data.data_root() == Path.home() / ".cache" / "valleys"
    monkeypatch.setenv("VALLEYS_DATA", str(tmp_path / "env"))
    assert data.data_root() == tmp_path / "env"
    assert data.data_root(tmp_path / "arg") == tmp_path / "arg"
    assert data.data_root("~/x") == Path.home() / "x"


def test_registry_digits_matches_the_module_and_split_alias():
    a = data.get("digits", seed=3)
    b = digits.load(seed=3)
    assert Split is Dataset and isinstance(a, Dataset)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    assert a.name == "digits" and a.task == "classification" and a.num_outputs == 10
    assert a.input_shape == (64,)
    img = data.get("digits", flatten=False)
    assert img.input_shape == (1, 8, 8)


def test_dataset_checks_to_and_num_classes():
    x, y = torch.zeros(4, 2), torch.zeros(4, 1)
    ds = Dataset("toy", "regression", x, y, x[:2], y[:2], 1, {"a": 1})
    moved = ds.to("cpu")
    assert moved is not ds and moved.info == {"a": 1} and moved.input_shape == (2,)
    with pytest.raises(AttributeError, match="regression"):
        _ = ds.num_classes
    with pytest.raises(ValueError, match="Invalid task"):
        Dataset("toy", "ranking", x, y, x, y, 1)
    with pytest.raises(ValueError, match="same number of rows"):
        Dataset("toy", "regression", x, y[:3], x, y, 1)
    with pytest.raises(ValueError, match="same per-sample shape"):
        Dataset("toy", "regression", x, y, torch.zeros(4, 3), y, 1)
