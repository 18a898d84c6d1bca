import dataclasses
import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

from valleys import data
from valleys.data import idx


def write_idx(path: Path, array: np.ndarray, magic: int, compress: bool = True) -> None:
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    raw = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if compress else raw)


def write_set(folder: Path, n_train=12, n_test=5, compress=True, seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train_images": rng.integers(0, 256, (n_train, 28, 28)),
        "train_labels": rng.integers(0, 10, n_train),
        "test_images": rng.integers(0, 256, (n_test, 28, 28)),
        "test_labels": rng.integers(0, 10, n_test),
    }
    for key, a in arrays.items():
        magic = idx.IMAGES_MAGIC if key.endswith("images") else idx.LABELS_MAGIC
        name = idx.FILES[key] + (".gz" if compress else "")
        write_idx(folder / name, a, magic, compress)
    return arrays


@pytest.mark.parametrize("compress", [True, False])
def test_reads_mnist_files_from_the_root(tmp_path, compress):
    arrays = write_set(tmp_path / "mnist", compress=compress)
    ds = data.get("mnist", root=tmp_path)
    assert ds.name == "mnist" and ds.num_outputs == 10
    assert ds.x_train.shape == (12, 1, 28, 28) and ds.x_test.shape == (5, 1, 28, 28)
    assert ds.x_train.dtype == torch.float32 and ds.y_train.dtype == torch.int64
    expected = torch.from_numpy(arrays["train_images"]).float()[:, None] / 255
    assert torch.equal(ds.x_train, expected)
    assert ds.y_test.tolist() == arrays["test_labels"].tolist()
    flat = data.get("mnist", root=tmp_path, flatten=True, preprocess="none")
    assert flat.x_train.shape == (12, 784) and float(flat.x_train.max()) > 1


def test_missing_files_one_line_naming_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        data.get("mnist", root=tmp_path)
    msg = str(err.value)
    assert "\n" not in msg and str(tmp_path / "mnist") in msg
    assert "train-images-idx3-ubyte.gz" in msg and "download=True" in msg


def test_fashion_message_mentions_debian(tmp_path):
    # the real family also searches /usr/share/datasets; point that search elsewhere
    family = dataclasses.replace(idx.FASHION_MNIST, system_dirs=(tmp_path / "sys",))
    with pytest.raises(FileNotFoundError) as err:
        idx.locate(family, tmp_path)
    msg = str(err.value)
    assert "\n" not in msg and "apt-get install dataset-fashion-mnist" in msg
    assert str(tmp_path / "fashion-mnist") in msg and str(tmp_path / "sys") in msg


def test_bad_magic_and_truncation(tmp_path):
    folder = tmp_path / "mnist"
    write_set(folder)
    write_idx(folder / "train-labels-idx1-ubyte.gz", np.zeros(12), idx.IMAGES_MAGIC - 1)
    with pytest.raises(ValueError, match=r"magic number 2050, expected 2049") as err:
        data.get("mnist", root=tmp_path)
    assert "\n" not in str(err.value) and str(folder) in str(err.value)

    write_set(folder)
    path = folder / "t10k-images-idx3-ubyte.gz"
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw[:-10]))
    with pytest.raises(ValueError, match=r"5×28×28 = 3920 bytes.*found 3910"):
        data.get("mnist", root=tmp_path)

    write_set(folder)
    path.write_bytes(gzip.compress(raw)[:100])
    with pytest.raises(ValueError, match="bad gzip data"):
        data.get("mnist", root=tmp_path)


def test_label_count_and_range_checked(tmp_path):
    folder = tmp_path / "mnist"
    write_set(folder)
    write_idx(folder / "train-labels-idx1-ubyte.gz", np.zeros(11), idx.LABELS_MAGIC)
    with pytest.raises(ValueError, match="11 labels for 12 images"):
        data.get("mnist", root=tmp_path)
    write_idx(folder / "train-labels-idx1-ubyte.gz", np.full(12, 10), idx.LABELS_MAGIC)
    with pytest.raises(ValueError, match=r"label 10 outside 0..9"):
        data.get("mnist", root=tmp_path)


@pytest.mark.skipif(
    not idx.DEBIAN_FASHION_MNIST.is_dir(),
    reason="Debian's Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)",
)
def test_debian_fashion_mnist(tmp_path):
    ds = data.get("fashion_mnist", root=tmp_path)  # empty root: found in /usr/share/datasets
    assert ds.info["source"] == str(idx.DEBIAN_FASHION_MNIST)
    assert ds.x_train.shape == (60000, 1, 28, 28) and ds.x_test.shape == (10000, 1, 28, 28)
    assert int(ds.y_train.min()) == 0 and int(ds.y_train.max()) == 9
    assert torch.bincount(ds.y_train).tolist() == [6000] * 10
    assert torch.bincount(ds.y_test).tolist() == [1000] * 10
    assert ds.y_train[:10].tolist() == [9, 0, 0, 3, 0, 2, 7, 2, 5, 5]
    # the well-known training pixel statistics: mean 0.2860, std 0.3530
    mean = float(ds.x_train.double().mean())
    assert abs(mean - 72.94035223214286 / 255) < 1e-7  # float32 pixels
    assert abs(float(ds.x_train.double().std()) - 0.3530) < 1e-4
    assert ds.info["classes"][9] == "Ankle boot"
