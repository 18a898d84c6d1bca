"""scikit-learn's bundled handwritten digits (1797 images of 8×8 pixels, values 0..16, 10 classes).

The set ships inside scikit-learn (no download) and has no official split, so a seeded
stratified split is fixed here: the same ``seed`` always gives the same train/test partition.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from valleys import _validate as check
from valleys.data.base import Dataset
from valleys.data.preprocess import prepare_images


def load(
    seed: int = 0,
    test_frac: float = 0.2,
    flatten: bool = True,
    *,
    preprocess: str = "scale",
    mean=None,
    std=None,
    root: Path | None = None,
) -> Dataset:
    """Load digits with a stratified ``test_frac`` test split; by default pixels scaled to
    [0, 1] (divided by 16), other ``preprocess`` methods as in ``valleys.data.preprocess``.

    Inputs are ``(N, 64)`` when ``flatten`` else ``(N, 1, 8, 8)``, float32; targets int64.
    ``root`` is only used for the GCN/ZCA cache.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    seed = check.count("seed", seed)
    test_frac = check.interval("test_frac", test_frac, 0.0, 1.0, low_open=True, high_open=True)
    flatten = check.flag("flatten", flatten)
    bunch = load_digits()
    x_tr, x_te, y_tr, y_te = train_test_split(
        bunch.data, bunch.target, test_size=test_frac, stratify=bunch.target, random_state=seed
    )

    def pixels(a: np.ndarray) -> np.ndarray:
        return a.astype(np.uint8).reshape(-1, 1, 8, 8)  # values are the integers 0..16

    xtr, xte, info = prepare_images(
        pixels(x_tr),
        pixels(x_te),
        preprocess=preprocess,
        max_value=16.0,
        mean=mean,
        std=std,
        root=root,
    )
    if flatten:
        xtr, xte = xtr.flatten(1), xte.flatten(1)

    def targets(a) -> torch.Tensor:
        return torch.as_tensor(a, dtype=torch.int64)

    info["seed"] = seed
    return Dataset("digits", "classification", xtr, targets(y_tr), xte, targets(y_te), 10, info)
