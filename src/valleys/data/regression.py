"""Small tabular regression sets.

``diabetes``: scikit-learn's bundled diabetes data (Efron et al. 2004): 442 patients, 10
baseline features (age, sex, BMI, blood pressure, six serum measurements), target a measure of
disease progression one year later (25..346). There is no official split; a seeded random one
is fixed here.

Boston housing, used by SGN's experiments, is not provided: scikit-learn removed it (1.2)
because one of its features was constructed from the proportion of Black residents under an
assumption of racial self-segregation, an ethically problematic feature; diabetes takes its
place as the small real regression set.
"""

from __future__ import annotations

import numpy as np
import torch

from valleys import _validate as check
from valleys.data.base import Dataset


def diabetes(*, seed: int = 0, test_frac: float = 0.2) -> Dataset:
    """The diabetes set with a seeded ``test_frac`` test split, float32 features ``(N, 10)`` and
    targets ``(N, 1)``.

    Features are standardised with the training split's mean and std (ddof 0): the raw
    measurements are used (``load_diabetes(scaled=False)``), not scikit-learn's pre-scaled
    copy, whose scaling used all 442 rows. The target is standardised the same way,
    ``y' = (y − mean_train) / std_train``; ``info["target_mean"]`` and ``info["target_std"]``
    undo it (an MSE on ``y'`` times ``target_std²`` is the MSE in the original units).
    """
    from sklearn.datasets import load_diabetes
    from sklearn.model_selection import train_test_split

    seed = check.count("seed", seed)
    test_frac = check.interval("test_frac", test_frac, 0.0, 1.0, low_open=True, high_open=True)
    bunch = load_diabetes(scaled=False)
    x_tr, x_te, y_tr, y_te = train_test_split(
        bunch.data.astype(np.float64),
        bunch.target.astype(np.float64).reshape(-1, 1),
        test_size=test_frac,
        random_state=seed,
    )
    x_mean, x_std = x_tr.mean(0), x_tr.std(0)
    y_mean, y_std = float(y_tr.mean()), float(y_tr.std())

    def t(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a.astype(np.float32))

    return Dataset(
        "diabetes",
        "regression",
        t((x_tr - x_mean) / x_std),
        t((y_tr - y_mean) / y_std),
        t((x_te - x_mean) / x_std),
        t((y_te - y_mean) / y_std),
        1,
        {
            "features": list(bunch.feature_names),
            "target_mean": y_mean,
            "target_std": y_std,
            "seed": seed,
        },
    )
