import numpy as np
import pytest
import torch

from valleys import data
from valleys.data import preprocess
from valleys.data.preprocess import gcn_zca, prepare_images


def raw_images(n, c=3, h=4, w=4, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, c, h, w), dtype=np.uint8)


def numpy_gcn_zca(train: np.ndarray, test: np.ndarray):
    """The pipeline written out directly with numpy's SVD, as the reference."""

    def gcn(a):
        d = a.reshape(len(a), -1).astype(np.float64)
        d = d - d.mean(1, keepdims=True)
        return d / np.maximum(d.std(1, ddof=1, keepdims=True), 1e-8)

    d = gcn(train)
    m = d.mean(0)
    _, s, vt = np.linalg.svd((d - m) / np.sqrt(len(d) - 1), full_matrices=True)
    s = np.concatenate([s, np.zeros(vt.shape[0] - len(s))])
    w = vt.T @ np.diag(1 / (s + 1e-5)) @ vt
    return (d - m) @ w, (gcn(test) - m) @ w, s, vt


def test_gcn_zca_matches_numpy_and_whitens():
    tr, te = raw_images(300), raw_images(50, seed=1)
    a, b = gcn_zca(torch.from_numpy(tr), torch.from_numpy(te))
    assert a.shape == (300, 3, 4, 4) and a.dtype == torch.float32
    ref_a, ref_b, s, vt = numpy_gcn_zca(tr, te)
    np.testing.assert_allclose(a.reshape(300, -1).numpy(), ref_a, atol=2e-4, rtol=1e-4)
    np.testing.assert_allclose(b.reshape(50, -1).numpy(), ref_b, atol=2e-4, rtol=1e-4)
    # whitened training covariance: identity on the retained subspace (singular values well
    # above the 1e-5 regulariser), zero along the direction GCN removes (the constant image)
    out = a.reshape(300, -1).double().numpy()
    cov = np.cov(out, rowvar=False)
    keep = vt[s > 1e-3]
    assert len(keep) == 47  # 48 pixels minus the constant direction
    np.testing.assert_allclose(keep @ cov @ keep.T, np.eye(47), atol=1e-3)
    ones = np.ones(48) / np.sqrt(48)
    assert abs(ones @ cov @ ones) < 1e-6


def test_gcn_floors_the_std_of_constant_images():
    tr = np.concatenate([raw_images(20), np.full((1, 3, 4, 4), 7, np.uint8)])
    a, b = gcn_zca(torch.from_numpy(tr), torch.from_numpy(tr[-1:]))
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    row = preprocess.gcn(torch.full((1, 5), 3.0, dtype=torch.float64))
    assert torch.equal(row, torch.zeros(1, 5, dtype=torch.float64))


def test_zca_is_cached_by_data_hash(tmp_path, monkeypatch):
    tr, te = raw_images(60), raw_images(10, seed=1)
    a, b, info = prepare_images(tr, te, preprocess="gcn_zca", root=tmp_path)
    assert info == {"preprocess": "gcn_zca"}
    files = list((tmp_path / "cache").glob("zca-*.npz"))
    assert len(files) == 1
    with np.load(files[0]) as f:
        assert f["w"].shape == (48, 48) and f["mean"].shape == (48,)
    monkeypatch.setattr(preprocess, "zca_fit", lambda d: pytest.fail("refitted"))
    a2, b2, _ = prepare_images(tr, te, preprocess="gcn_zca", root=tmp_path)
    assert torch.equal(a, a2) and torch.equal(b, b2)
    # other training data: another key, so a new fit
    monkeypatch.undo()
    prepare_images(raw_images(60, seed=5), te, preprocess="gcn_zca", root=tmp_path)
    assert len(list((tmp_path / "cache").glob("zca-*.npz"))) == 2


def test_scale_normalize_standardize():
    tr, te = raw_images(40, c=2), raw_images(8, c=2, seed=1)
    a, b, _ = prepare_images(tr, te, preprocess="scale")
    assert torch.equal(a, torch.from_numpy(tr).float() / 255)

    a, b, info = prepare_images(tr, te, preprocess="normalize")
    per_channel = a.transpose(0, 1).reshape(2, -1).double()
    assert torch.allclose(per_channel.mean(1), torch.zeros(2, dtype=torch.float64), atol=1e-6)
    assert torch.allclose(
        per_channel.std(1, correction=0), torch.ones(2, dtype=torch.float64), atol=1e-5
    )
    assert len(info["mean"]) == 2 and len(info["std"]) == 2

    a, b, info = prepare_images(tr, te, preprocess="normalize", mean=(0.5, 0.25), std=(0.5, 0.25))
    expected = (
        torch.from_numpy(te).float() / 255 - torch.tensor([0.5, 0.25]).view(1, 2, 1, 1)
    ) / torch.tensor([0.5, 0.25]).view(1, 2, 1, 1)
    assert torch.allclose(b, expected, atol=1e-6) and info["mean"] == [0.5, 0.25]

    a, b, _ = prepare_images(tr, te, preprocess="standardize")
    assert torch.allclose(a.mean((2, 3)), torch.zeros(40, 2), atol=1e-5)
    assert torch.allclose(a.std((2, 3), correction=0), torch.ones(40, 2), atol=1e-4)


def test_bad_preprocess_arguments():
    tr = raw_images(4)
    with pytest.raises(ValueError, match="Invalid preprocess: 'zca'"):
        prepare_images(tr, tr, preprocess="zca")
    with pytest.raises(ValueError, match="only used with preprocess='normalize'"):
        prepare_images(tr, tr, preprocess="scale", mean=(0.5,) * 3, std=(0.5,) * 3)
    with pytest.raises(ValueError, match="give both or neither"):
        prepare_images(tr, tr, preprocess="normalize", mean=(0.5,) * 3)
    with pytest.raises(ValueError, match="one value per channel"):
        prepare_images(tr, tr, preprocess="normalize", mean=(0.5,), std=(0.5,) * 3)
    with pytest.raises(ValueError, match="Invalid std"):
        prepare_images(tr, tr, preprocess="normalize", mean=(0.5,) * 3, std=(0.5, 0, 1))


def test_digits_through_every_method(tmp_path):
    for method in preprocess.METHODS:
        ds = data.get("digits", root=tmp_path, flatten=False, preprocess=method)
        assert ds.x_train.shape == (1437, 1, 8, 8) and ds.x_train.dtype == torch.float32
        assert torch.isfinite(ds.x_train).all() and ds.info["preprocess"] == method
