"""The sine regression task of SGN's experiments (Gargiani et al. 2020):
``y = sin(f·x) + ε`` with ``x ~ U(−1, 1)`` and ``ε ~ N(0, 0.01²)``, frequency ``f`` 10 or 100,
7,000 training and 3,000 test points. SGN's own files are one draw of this; here the draw is
made from ``seed``, so the same seed always gives the same data.
"""

from __future__ import annotations

import numpy as np
import torch

from valleys import _validate as check
from valleys.data.base import Dataset


def sine(
    frequency: float,
    *,
    seed: int = 0,
    n_train: int = 7000,
    n_test: int = 3000,
    noise_std: float = 0.01,
) -> Dataset:
    """Points of ``sin(frequency·x)`` plus Gaussian noise: inputs and targets float32 ``(N, 1)``.

    ``n_train + n_test`` points are drawn at once from ``numpy.random.default_rng(seed)``
    (x first, then the noise) and the first ``n_train`` are the training split.
    """
    frequency = check.positive("frequency", frequency)
    seed = check.count("seed", seed)
    n_train = check.count("n_train", n_train, 1)
    n_test = check.count("n_test", n_test, 1)
    noise_std = check.nonneg("noise_std", noise_std)
    rng = np.random.default_rng(seed)
    n = n_train + n_test
    x = rng.uniform(-1.0, 1.0, size=(n, 1))
    y = np.sin(frequency * x) + noise_std * rng.standard_normal((n, 1))
    x_t = torch.from_numpy(x.astype(np.float32))
    y_t = torch.from_numpy(y.astype(np.float32))
    name = f"sine{frequency:g}"
    return Dataset(
        name,
        "regression",
        x_t[:n_train],
        y_t[:n_train],
        x_t[n_train:],
        y_t[n_train:],
        1,
        {"frequency": frequency, "noise_std": noise_std, "seed": seed},
    )
