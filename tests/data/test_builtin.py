import random

import numpy as np
import pytest
import torch

from valleys import data
from valleys.data import mnist1d


def test_mnist1d_is_the_published_set_and_cached(tmp_path, monkeypatch):
    pytest.importorskip("mnist1d")
    np.random.seed(123)
    random.seed(123)
    before = (np.random.random(), random.random())
    np.random.seed(123)
    random.seed(123)
    ds = data.get("mnist1d", root=tmp_path)
    # generation must not disturb the caller's global generators
    assert (np.random.random(), random.random()) == before
    assert ds.x_train.shape == (4000, 40) and ds.x_test.shape == (1000, 40)
    assert ds.x_train.dtype == torch.float32 and ds.y_train.dtype == torch.int64
    assert ds.num_outputs == 10 and set(ds.y_train.tolist()) == set(range(10))
    # the published set is standardised over all 5000 signals
    allx = torch.cat([ds.x_train, ds.x_test]).double()
    assert abs(float(allx.mean())) < 1e-3 and abs(float(allx.std()) - 1) < 1e-2
    assert ds.y_train[:10].tolist() == [2, 6, 4, 5, 6, 6, 6, 0, 3, 1]
    cached = list((tmp_path / "cache").glob("mnist1d-*.npz"))
    assert len(cached) == 1
    # second load comes from the cache, without generating
    monkeypatch.setattr(mnist1d, "_generate", lambda args: pytest.fail("regenerated"))
    again = data.get("mnist1d", root=tmp_path, flatten=False)
    assert again.x_train.shape == (4000, 1, 40)
    assert torch.equal(again.x_train.flatten(1), ds.x_train)


@pytest.mark.parametrize("freq", [10, 100])
def test_sine(freq):
    ds = data.get(f"sine{freq}", seed=1)
    assert ds.name == f"sine{freq}" and ds.task == "regression" and ds.num_outputs == 1
    assert ds.x_train.shape == (7000, 1) and ds.y_train.shape == (7000, 1)
    assert ds.x_test.shape == (3000, 1) and ds.y_test.shape == (3000, 1)
    assert ds.x_train.dtype == torch.float32
    x = torch.cat([ds.x_train, ds.x_test]).double()
    y = torch.cat([ds.y_train, ds.y_test]).double()
    assert float(x.min()) >= -1 and float(x.max()) <= 1
    noise = y - torch.sin(freq * x)
    assert abs(float(noise.std()) - 0.01) < 5e-4 and abs(float(noise.mean())) < 5e-4
    same = data.get(f"sine{freq}", seed=1)
    other = data.get(f"sine{freq}", seed=2)
    assert torch.equal(same.x_train, ds.x_train) and not torch.equal(other.x_train, ds.x_train)


def test_diabetes_standardised_with_train_statistics():
    ds = data.get("diabetes", seed=0)
    assert ds.task == "regression" and ds.num_outputs == 1
    assert ds.x_train.shape == (353, 10) and ds.x_test.shape == (89, 10)
    assert ds.y_train.shape == (353, 1) and ds.y_test.shape == (89, 1)
    x = ds.x_train.double()
    assert torch.allclose(x.mean(0), torch.zeros(10, dtype=torch.float64), atol=1e-5)
    assert torch.allclose(x.std(0, correction=0), torch.ones(10, dtype=torch.float64), atol=1e-5)
    y = ds.y_train.double()
    assert abs(float(y.mean())) < 1e-5 and abs(float(y.std(correction=0)) - 1) < 1e-5
    # the recorded scaling recovers the original targets (disease progression 25..346)
    raw = (
        torch.cat([ds.y_train, ds.y_test]).double() * ds.info["target_std"] + ds.info["target_mean"]
    )
    assert abs(float(raw.min()) - 25) < 1e-3 and abs(float(raw.max()) - 346) < 1e-3
    assert not torch.equal(data.get("diabetes", seed=1).y_test, ds.y_test)
