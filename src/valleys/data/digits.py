"""scikit-learn's bundled handwritten digits (1797 images of 8×8 pixels, values 0..16, 10 classes).

The set ships inside scikit-learn (no download) and has no official split, so a seeded
stratified split is fixed here: the same ``seed`` always gives the same train/test partition.
"""

from __future__ import annotations

import torch

from valleys import _validate as check
from valleys.data.base import Split


def load(seed: int = 0, test_frac: float = 0.2, flatten: bool = True) -> Split:
    """Load digits with pixels scaled to [0, 1] and a stratified ``test_frac`` test split.

    Inputs are ``(N, 64)`` when ``flatten`` else ``(N, 1, 8, 8)``, float32; targets int64.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    seed = check.count("seed", seed)
    test_frac = check.interval("test_frac", test_frac, 0.0, 1.0, low_open=True, high_open=True)
    bunch = load_digits()
    x_tr, x_te, y_tr, y_te = train_test_split(
        bunch.data, bunch.target, test_size=test_frac, stratify=bunch.target, random_state=seed
    )
    shape = (-1, 64) if flatten else (-1, 1, 8, 8)

    def inputs(a) -> torch.Tensor:
        return torch.as_tensor(a, dtype=torch.float32).div_(16.0).reshape(shape)

    def targets(a) -> torch.Tensor:
        return torch.as_tensor(a, dtype=torch.int64)

    return Split(inputs(x_tr), targets(y_tr), inputs(x_te), targets(y_te))
