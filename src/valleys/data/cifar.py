"""CIFAR-10 and CIFAR-100 from the official "python version" pickles (50,000 train / 10,000
test RGB images of 3×32×32).

* CIFAR-10: ``<root>/cifar-10-batches-py/`` holding ``data_batch_1`` … ``data_batch_5`` and
  ``test_batch``, each a pickled dict with ``b"data"`` (10,000 × 3072 uint8: the 1024 red,
  then green, then blue values of each image, rows top to bottom) and ``b"labels"`` (0..9);
  ``batches.meta`` (optional) names the classes.
* CIFAR-100: ``<root>/cifar-100-python/`` holding ``train`` and ``test`` with ``b"data"``,
  ``b"fine_labels"`` (0..99) and ``b"coarse_labels"`` (0..19); ``meta`` (optional) names them.

The pickles are read with an unpickler that only rebuilds numpy arrays and plain containers,
so a tampered file cannot run code. With ``download=True`` the official archive is fetched into
the data root, checked against its published MD5 and unpacked there.
"""

from __future__ import annotations

import importlib
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from valleys import _validate as check
from valleys.data.base import Dataset, malformed, not_found
from valleys.data.download import Remote, fetch_and_extract
from valleys.data.preprocess import prepare_images


@dataclass(frozen=True)
class CifarFamily:
    """One CIFAR variant: its folder, pickle files, label keys and archive."""

    name: str
    title: str
    folder: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    meta_file: str
    label_keys: dict[str, tuple[bytes, bytes, int]]  # option -> (labels key, names key, count)
    remote: Remote


CIFAR10 = CifarFamily(
    "cifar10",
    "CIFAR-10",
    "cifar-10-batches-py",
    tuple(f"data_batch_{i}" for i in range(1, 6)),
    ("test_batch",),
    "batches.meta",
    {"fine": (b"labels", b"label_names", 10)},
    Remote(
        "cifar-10-python.tar.gz",
        ("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",),
        md5="c58f30108f718f92721af3b95e74349a",
    ),
)

CIFAR100 = CifarFamily(
    "cifar100",
    "CIFAR-100",
    "cifar-100-python",
    ("train",),
    ("test",),
    "meta",
    {
        "fine": (b"fine_labels", b"fine_label_names", 100),
        "coarse": (b"coarse_labels", b"coarse_label_names", 20),
    },
    Remote(
        "cifar-100-python.tar.gz",
        ("https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",),
        md5="eb9058c3a382ffc7106e4002c42a8d85",
    ),
)

# What the official pickles (Python 2 cPickle of numpy arrays) and pickles written by newer
# numpy need to rebuild their arrays; anything else is refused.
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}


class _ArrayUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        if module.startswith("numpy.core."):  # numpy 2 moved numpy.core to numpy._core
            try:
                return getattr(importlib.import_module("numpy._core" + module[10:]), name)
            except (ImportError, AttributeError):
                pass
        return super().find_class(module, name)


def read_pickle(path: Path) -> dict:
    """The dict in one CIFAR pickle (keys as bytes, as written by Python 2)."""
    try:
        with open(path, "rb") as f:
            obj = _ArrayUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as err:
        raise malformed(path, f"not a CIFAR pickle ({err})") from None
    if not isinstance(obj, dict):
        raise malformed(path, f"expected a pickled dict, found {type(obj).__name__}")
    return obj


def _read_split(
    folder: Path, files: tuple[str, ...], label_key: bytes, num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    for fname in files:
        path = folder / fname
        batch = read_pickle(path)
        if b"data" not in batch or label_key not in batch:
            keys = sorted(
                k.decode(errors="replace") if isinstance(k, bytes) else str(k) for k in batch
            )
            raise malformed(path, f"expected keys b'data' and {label_key!r}, found {keys}")
        data = np.asarray(batch[b"data"])
        labels = np.asarray(batch[label_key])
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise malformed(path, f"data is {data.dtype} {data.shape}, expected uint8 (n, 3072)")
        if labels.ndim != 1 or len(labels) != len(data):
            raise malformed(path, f"{labels.size} labels for {len(data)} images")
        if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
            raise malformed(path, f"labels outside 0..{num_classes - 1}")
        xs.append(data.reshape(-1, 3, 32, 32))
        ys.append(labels.astype(np.int64))
    return np.concatenate(xs), np.concatenate(ys)


def _class_names(folder: Path, meta_file: str, names_key: bytes, count: int) -> list[str]:
    path = folder / meta_file
    if path.is_file():
        meta = read_pickle(path)
        names = meta.get(names_key)
        if isinstance(names, list) and len(names) == count:
            return [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    return [str(i) for i in range(count)]


def locate(family: CifarFamily, root: Path, download: bool = False) -> Path:
    """The family's folder under ``root`` once it holds every pickle (downloaded and unpacked
    first with ``download``), else a one-line ``FileNotFoundError``."""
    folder = Path(root) / family.folder
    needed = family.train_files + family.test_files
    if not all((folder / f).is_file() for f in needed) and download:
        fetch_and_extract(family.remote, Path(root))
    missing = [f for f in needed if not (folder / f).is_file()]
    if missing:
        raise not_found(
            family.title,
            [folder],
            ", ".join(needed)
            + (f" (missing: {', '.join(missing)})" if len(missing) < len(needed) else ""),
            f"the archive is {family.remote.urls[0]}, unpacked in {Path(root)}",
        )
    return folder


def load(
    family: CifarFamily,
    root: Path,
    *,
    download: bool = False,
    labels: str = "fine",
    preprocess: str = "scale",
    mean=None,
    std=None,
    flatten: bool = False,
) -> Dataset:
    """Read ``family`` (``CIFAR10`` or ``CIFAR100``) as float32 ``(N, 3, 32, 32)`` images
    (``(N, 3072)`` with ``flatten``) preprocessed as ``preprocess`` says (see
    ``valleys.data.preprocess``), int64 labels. For CIFAR-100, ``labels`` picks the 100 fine
    or the 20 coarse classes."""
    labels = check.choice("labels", labels, tuple(family.label_keys))
    flatten = check.flag("flatten", flatten)
    folder = locate(family, Path(root), download)
    label_key, names_key, count = family.label_keys[labels]
    x_tr, y_tr = _read_split(folder, family.train_files, label_key, count)
    x_te, y_te = _read_split(folder, family.test_files, label_key, count)
    xtr, xte, info = prepare_images(
        x_tr, x_te, preprocess=preprocess, max_value=255.0, mean=mean, std=std, root=Path(root)
    )
    if flatten:
        xtr, xte = xtr.flatten(1), xte.flatten(1)
    info.update(
        source=str(folder),
        labels=labels,
        classes=_class_names(folder, family.meta_file, names_key, count),
    )
    return Dataset(
        family.name,
        "classification",
        xtr,
        torch.from_numpy(y_tr),
        xte,
        torch.from_numpy(y_te),
        count,
        info,
    )
