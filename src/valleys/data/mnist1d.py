"""MNIST-1D (Greydanus 2020): 10 classes of one-dimensional signals of length 40, 4,000 train
and 1,000 test, generated offline by the PyPI package ``mnist1d``.

With its default arguments (generator seed 42) ``mnist1d.data.make_dataset`` reproduces the
published data set exactly; its published baselines are logistic regression 32%, MLP 68%,
CNN 94% test accuracy. The package's ``get_dataset`` may try to download, so only
``make_dataset`` is called here. Generation takes a few seconds, so the arrays are cached in
``<root>/cache/mnist1d-<key>.npz``, the key hashing the generator's arguments.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch

from valleys import _validate as check
from valleys.data.base import Dataset, cache_dir, cached, digest

#: The generator seed of the published data set.
PUBLISHED_SEED = 42


def _generate(args: dict) -> dict[str, np.ndarray]:
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError:
        raise ImportError("MNIST-1D needs the mnist1d package: pip install mnist1d") from None
    full = get_dataset_args()
    for k, v in args.items():
        setattr(full, k, v)
    # make_dataset reseeds numpy's and Python's global generators; put them back afterwards
    # so that loading data does not change the randomness of the caller's program.
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        d = make_dataset(full)
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    return {
        "x_train": np.asarray(d["x"], dtype=np.float32),
        "y_train": np.asarray(d["y"], dtype=np.int64),
        "x_test": np.asarray(d["x_test"], dtype=np.float32),
        "y_test": np.asarray(d["y_test"], dtype=np.int64),
    }


def load(
    root: Path | None = None,
    *,
    data_seed: int = PUBLISHED_SEED,
    shuffle_seq: bool = False,
    flatten: bool = True,
) -> Dataset:
    """MNIST-1D as float32 ``(N, 40)`` inputs (``(N, 1, 40)`` without ``flatten``, for 1-D
    convolutions) and int64 labels 0..9.

    ``data_seed`` is the generator's seed (42 gives the published set); ``shuffle_seq``
    permutes the 40 positions with one fixed permutation (the package's spatial-shuffle
    variant). ``root`` is the data root for the cache (None: no cache).
    """
    data_seed = check.count("data_seed", data_seed)
    shuffle_seq = check.flag("shuffle_seq", shuffle_seq)
    flatten = check.flag("flatten", flatten)
    args = {"seed": data_seed, "shuffle_seq": shuffle_seq}
    keys = ("x_train", "y_train", "x_test", "y_test")
    if root is None:
        arrays = _generate(args)
    else:
        key = digest(json.dumps(args, sort_keys=True))
        arrays = cached(cache_dir(Path(root)) / f"mnist1d-{key}.npz", keys, lambda: _generate(args))
    shape = (-1, 40) if flatten else (-1, 1, 40)
    return Dataset(
        "mnist1d",
        "classification",
        torch.from_numpy(arrays["x_train"]).reshape(shape),
        torch.from_numpy(arrays["y_train"]),
        torch.from_numpy(arrays["x_test"]).reshape(shape),
        torch.from_numpy(arrays["y_test"]),
        10,
        {"data_seed": data_seed, "shuffle_seq": shuffle_seq},
    )
