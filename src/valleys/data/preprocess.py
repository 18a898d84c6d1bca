"""Image preprocessing, applied once to whole tensors when a dataset is loaded.

Every image family stores raw pixels ``(N, C, H, W)`` (uint8, or small integers for digits)
and hands them to ``prepare_images`` with the ``preprocess`` option the user chose:

``"scale"`` (default)
    pixels divided by their maximum value (255; 16 for digits), so in [0, 1].
``"normalize"``
    scaled to [0, 1], then ``(x − mean_c) / std_c`` per channel ``c``. ``mean`` and ``std``
    are given (in [0, 1] units, e.g. CIFAR-100's ``(0.5071, 0.4867, 0.4408)`` and
    ``(0.2675, 0.2565, 0.2761)``) or, when left out, fitted on the training images.
``"standardize"``
    per-image, per-channel standardisation: each channel of each image minus its mean over
    (H, W), divided by its std over (H, W) (ddof 0, floored at 1e-8). SGN's convolutional
    experiments (Gargiani et al. 2020) use this.
``"gcn_zca"``
    Entropy-SGD's CIFAR pipeline (Chaudhari et al. 2017, ``process_cifar.py``): global
    contrast normalisation of each image over all its C·H·W values (subtract the image mean,
    divide by the image std with ddof=1 floored at 1e-8), then ZCA whitening fitted on the
    training images: with ``D`` the (N, C·H·W) normalised training matrix, ``m`` its column
    mean and ``(D − m) / sqrt(N − 1) = V diag(S) Uᵀ`` its SVD (``U`` is D×D),
    ``W = U diag(1 / (S + 1e-5)) Uᵀ``; train and test become ``(x − m) W``. The fitted
    ``m`` and ``W`` are cached in ``<data root>/cache`` under a hash of the training pixels.
``"none"``
    the raw pixel values as float32.

The output is float32 ``(N, C, H, W)`` in every case.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from valleys import _validate as check
from valleys.data.base import cache_dir as _cache_dir
from valleys.data.base import digest, load_npz, save_npz

METHODS = ("scale", "normalize", "standardize", "gcn_zca", "none")

#: Floor on a std before dividing by it (GCN's ``min_divisor``).
STD_FLOOR = 1e-8
#: Added to the singular values before inverting them in ZCA.
ZCA_EPS = 1e-5
#: Rows processed at once in the GCN/ZCA passes: bounds the float64 working memory.
_CHUNK = 4096


def _as_tensor(x: np.ndarray | torch.Tensor) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x))


def scale(x: torch.Tensor, max_value: float) -> torch.Tensor:
    """Pixels divided by ``max_value``, as float32."""
    return x.to(torch.float32).div_(float(max_value))


def channel_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std (ddof 0) of ``(N, C, H, W)`` images, computed in float64."""
    c = x.shape[1]
    flat = x.transpose(0, 1).reshape(c, -1).to(torch.float64)
    return flat.mean(1), flat.std(1, correction=0)


def normalize(
    x: torch.Tensor, mean: Sequence[float] | torch.Tensor, std: Sequence[float] | torch.Tensor
) -> torch.Tensor:
    """``(x − mean_c) / std_c`` per channel of float ``(N, C, H, W)`` images."""
    c = x.shape[1]
    m = torch.as_tensor(mean, dtype=torch.float64).reshape(-1)
    s = torch.as_tensor(std, dtype=torch.float64).reshape(-1)
    if m.numel() != c or s.numel() != c:
        check.fail(
            "mean/std",
            (tuple(m.tolist()), tuple(s.tolist())),
            f"expected one value per channel ({c})",
        )
    if bool((s <= 0).any()):
        check.fail("std", tuple(s.tolist()), "every channel's std must be > 0")
    m = m.to(x.dtype).reshape(1, c, 1, 1)
    s = s.to(x.dtype).reshape(1, c, 1, 1)
    return (x - m) / s


def standardize(x: torch.Tensor) -> torch.Tensor:
    """Per-image, per-channel standardisation over (H, W), float32 out."""
    x = x.to(torch.float32)
    mean = x.mean(dim=(2, 3), keepdim=True)
    std = x.std(dim=(2, 3), keepdim=True, correction=0).clamp_min_(STD_FLOOR)
    return (x - mean) / std


def gcn(x: torch.Tensor) -> torch.Tensor:
    """Global contrast normalisation of each row of ``(N, D)`` (float64 in, float64 out):
    minus the row mean, divided by the row std (ddof 1) floored at ``STD_FLOOR``."""
    x = x - x.mean(1, keepdim=True)
    return x / x.std(1, keepdim=True, correction=1).clamp_min(STD_FLOOR)


def zca_fit(d: torch.Tensor, eps: float = ZCA_EPS) -> tuple[torch.Tensor, torch.Tensor]:
    """The ZCA mean ``m`` and matrix ``W = U diag(1/(S + eps)) Uᵀ`` of the rows of ``d``.

    ``S`` are the singular values of ``(d − m) / sqrt(N − 1)`` and ``U`` its right singular
    vectors, obtained here from the symmetric eigendecomposition of the covariance
    ``(d − m)ᵀ(d − m) / (N − 1) = U S² Uᵀ`` (a D×D problem instead of an N×D SVD; the
    directions absent from the data get ``S = 0``, as with a full SVD). Computed in float64,
    reading ``d`` in chunks so that an (N, D) float64 copy is never made.
    """
    n, dim = d.shape
    if n < 2:
        check.fail("ZCA training set", tuple(d.shape), "needs at least 2 samples")
    mean = torch.zeros(dim, dtype=torch.float64)
    for i in range(0, n, _CHUNK):
        mean += gcn(d[i : i + _CHUNK].to(torch.float64)).sum(0)
    mean /= n
    cov = torch.zeros(dim, dim, dtype=torch.float64)
    for i in range(0, n, _CHUNK):
        c = gcn(d[i : i + _CHUNK].to(torch.float64)) - mean
        cov.addmm_(c.T, c)
    cov /= n - 1
    evals, u = torch.linalg.eigh(cov)
    s = evals.clamp_min(0).sqrt()
    w = (u / (s + eps)) @ u.T
    return mean, (w + w.T) / 2  # exactly symmetric, so (x − m) W equals W (x − m)


def zca_apply(d: torch.Tensor, mean: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """GCN then ``(x − m) W`` on the rows of ``d``, in float64 chunks, float32 out."""
    out = torch.empty(d.shape, dtype=torch.float32)
    for i in range(0, d.shape[0], _CHUNK):
        out[i : i + _CHUNK] = (gcn(d[i : i + _CHUNK].to(torch.float64)) - mean) @ w
    return out


def gcn_zca(
    x_train: torch.Tensor, x_test: torch.Tensor, cache: Path | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """GCN + ZCA (see the module docstring) on raw ``(N, C, H, W)`` images; the fitted mean
    and W are cached in folder ``cache`` (when given) keyed by a hash of ``x_train``."""
    shape = x_train.shape[1:]
    d_train = x_train.reshape(x_train.shape[0], -1)
    d_test = x_test.reshape(x_test.shape[0], -1)
    fitted = None
    path = None
    if cache is not None:
        key = digest(d_train.numpy(), f"gcn_zca std_floor={STD_FLOOR} eps={ZCA_EPS}")
        path = cache / f"zca-{key}.npz"
        fitted = load_npz(path, ("mean", "w"))
    if fitted is None:
        mean, w = zca_fit(d_train)
        if path is not None:
            save_npz(path, mean=mean.numpy(), w=w.numpy())
    else:
        mean, w = torch.from_numpy(fitted["mean"]), torch.from_numpy(fitted["w"])
    return (
        zca_apply(d_train, mean, w).reshape(-1, *shape),
        zca_apply(d_test, mean, w).reshape(-1, *shape),
    )


def prepare_images(
    x_train: np.ndarray | torch.Tensor,
    x_test: np.ndarray | torch.Tensor,
    *,
    preprocess: str = "scale",
    max_value: float = 255.0,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    root: Path | None = None,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Apply ``preprocess`` (one of ``METHODS``) to raw ``(N, C, H, W)`` train/test pixels.

    Returns float32 train and test images and a plain-data record of what was done (the
    mean/std actually used by ``"normalize"``). ``root`` is the data root, whose ``cache/``
    holds the fitted ZCA; None disables that cache.
    """
    check.choice("preprocess", preprocess, METHODS)
    if (mean is not None or std is not None) and preprocess != "normalize":
        check.fail("mean/std", (mean, std), "only used with preprocess='normalize'")
    if (mean is None) != (std is None):
        check.fail("mean/std", (mean, std), "give both or neither")
    if mean is not None:
        mean = [check.real("mean", v) for v in np.atleast_1d(np.asarray(mean, dtype=object))]
        std = [check.positive("std", v) for v in np.atleast_1d(np.asarray(std, dtype=object))]
    xtr, xte = _as_tensor(x_train), _as_tensor(x_test)
    if xtr.ndim != 4 or xte.ndim != 4:
        check.fail("images", (tuple(xtr.shape), tuple(xte.shape)), "expected (N, C, H, W)")
    info: dict[str, Any] = {"preprocess": preprocess}
    if preprocess == "none":
        return xtr.to(torch.float32), xte.to(torch.float32), info
    if preprocess == "gcn_zca":
        cache = None if root is None else _cache_dir(root)
        a, b = gcn_zca(xtr, xte, cache)
        return a, b, info
    a, b = scale(xtr, max_value), scale(xte, max_value)
    if preprocess == "standardize":
        return standardize(a), standardize(b), info
    if preprocess == "normalize":
        if mean is None:
            m, s = channel_stats(a)
        else:
            m = torch.as_tensor(mean, dtype=torch.float64)
            s = torch.as_tensor(std, dtype=torch.float64)
        a, b = normalize(a, m, s), normalize(b, m, s)
        info.update(mean=[float(v) for v in m.reshape(-1)], std=[float(v) for v in s.reshape(-1)])
    return a, b, info
