import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from valleys import data
from valleys.data import cifar


def dump(path: Path, obj) -> None:
    # protocol 2, as the published (Python 2) pickles; byte-string keys as they have
    path.write_bytes(pickle.dumps(obj, protocol=2))


def write_cifar10(root: Path, per_batch=4, seed=0) -> dict:
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    out = {"x": [], "y": []}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        x = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        y = rng.integers(0, 10, per_batch).tolist()
        dump(
            folder / name,
            {
                b"batch_label": name.encode(),
                b"labels": y,
                b"data": x,
                b"filenames": [b"f.png"] * per_batch,
            },
        )
        out["x"].append(x)
        out["y"].append(y)
    names = [
        b"airplane",
        b"automobile",
        b"bird",
        b"cat",
        b"deer",
        b"dog",
        b"frog",
        b"horse",
        b"ship",
        b"truck",
    ]
    dump(folder / "batches.meta", {b"label_names": names, b"num_vis": 3072})
    return out


def test_cifar10_layout_and_values(tmp_path):
    written = write_cifar10(tmp_path)
    ds = data.get("cifar10", root=tmp_path, preprocess="none")
    assert ds.name == "cifar10" and ds.num_outputs == 10
    assert ds.x_train.shape == (20, 3, 32, 32) and ds.x_test.shape == (4, 3, 32, 32)
    assert ds.y_train.dtype == torch.int64
    assert ds.y_train.tolist() == [v for batch in written["y"][:5] for v in batch]
    # row layout: 1024 red values, then green, then blue, each row-major 32×32
    first = written["x"][0][0]
    assert float(ds.x_train[0, 0, 0, 0]) == first[0]
    assert float(ds.x_train[0, 0, 0, 1]) == first[1]
    assert float(ds.x_train[0, 0, 1, 0]) == first[32]
    assert float(ds.x_train[0, 1, 0, 0]) == first[1024]
    assert float(ds.x_train[0, 2, 31, 31]) == first[3071]
    assert ds.info["classes"][9] == "truck"
    scaled = data.get("cifar10", root=tmp_path)
    assert torch.allclose(scaled.x_train, ds.x_train / 255)


def test_cifar100_fine_and_coarse(tmp_path):
    rng = np.random.default_rng(1)
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    for name, n in (("train", 6), ("test", 3)):
        dump(
            folder / name,
            {
                b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                b"fine_labels": rng.integers(0, 100, n).tolist(),
                b"coarse_labels": rng.integers(0, 20, n).tolist(),
            },
        )
    fine = data.get("cifar100", root=tmp_path)
    coarse = data.get("cifar100", root=tmp_path, labels="coarse")
    assert fine.num_outputs == 100 and coarse.num_outputs == 20
    assert fine.x_train.shape == (6, 3, 32, 32) and fine.x_test.shape == (3, 3, 32, 32)
    assert int(coarse.y_train.max()) < 20
    with pytest.raises(ValueError, match="Invalid labels"):
        data.get("cifar100", root=tmp_path, labels="medium")
    with pytest.raises(ValueError, match="Invalid labels"):
        data.get("cifar10", root=tmp_path, labels="coarse")


def test_missing_cifar_one_line(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        data.get("cifar10", root=tmp_path)
    msg = str(err.value)
    assert "\n" not in msg and str(tmp_path / "cifar-10-batches-py") in msg
    assert "data_batch_1" in msg and "test_batch" in msg and "download=True" in msg
    write_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match=r"missing: data_batch_3\)"):
        data.get("cifar10", root=tmp_path)


def test_malformed_pickles(tmp_path):
    write_cifar10(tmp_path)
    folder = tmp_path / "cifar-10-batches-py"
    dump(folder / "test_batch", {b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]})
    with pytest.raises(
        ValueError, match=r"Malformed data file .*test_batch: data is uint8 \(2, 100\)"
    ):
        data.get("cifar10", root=tmp_path)
    dump(folder / "test_batch", {b"pixels": np.zeros((2, 3072), np.uint8)})
    with pytest.raises(ValueError, match="expected keys b'data' and b'labels'"):
        data.get("cifar10", root=tmp_path)
    (folder / "test_batch").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="not a CIFAR pickle"):
        data.get("cifar10", root=tmp_path)


class _Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_pickles_that_would_run_code_are_refused(tmp_path):
    path = tmp_path / "batch"
    dump(path, {b"data": _Evil()})
    with pytest.raises(ValueError, match=r"refusing to load (__builtin__|builtins)\.print"):
        cifar.read_pickle(path)
