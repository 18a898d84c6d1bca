"""Datasets held as tensors, by name.

    from valleys import data
    ds = data.get("fashion_mnist", preprocess="standardize")   # a ``Dataset``
    data.names()                                                # every registered name

Built in (no files needed): ``digits``, ``mnist1d``, ``sine10``, ``sine100``, ``diabetes``.
Read from the data root (see ``data_root``): ``mnist``, ``fashion_mnist``, ``cifar10``,
``cifar100``, ``tinyimagenet``; ``download=True`` fetches them there (checksummed) when they
are missing. ``seed`` draws the split (digits, diabetes) or the points (sine) of the sets that
have no official split and is ignored by the others. Image sets take ``preprocess`` (see
``valleys.data.preprocess``), ``mean``/``std`` (with ``"normalize"``) and ``flatten``; each
family's ``load`` documents its other options. ``valleys.data.loader`` cuts batches.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from valleys import _validate as check
from valleys.data import cifar, digits, idx, mnist1d, regression, synthetic, tinyimagenet
from valleys.data.base import Dataset, Split, data_root


@dataclass(frozen=True)
class Entry:
    """A registered dataset: a one-line description and a builder taking
    ``(root, seed, download, **options)``; ``options`` are the keyword options it accepts."""

    name: str
    summary: str
    build: Callable[..., Dataset]
    options: tuple[str, ...]


def _options(fn: Callable, skip: tuple[str, ...]) -> tuple[str, ...]:
    params = inspect.signature(fn).parameters.values()
    return tuple(p.name for p in params if p.name not in skip)


_REGISTRY: dict[str, Entry] = {}


def _register(name: str, summary: str, build: Callable[..., Dataset], options: tuple[str, ...]):
    _REGISTRY[name] = Entry(name, summary, build, options)


_register(
    "digits",
    "scikit-learn digits, 1437/360 × 1×8×8 (flattened to 64 by default), 10 classes, seeded split",
    lambda root, seed, download, **o: digits.load(seed=seed, root=root, **o),
    _options(digits.load, ("seed", "root")),
)
_register(
    "mnist1d",
    "MNIST-1D, 4000/1000 × 40, 10 classes, generated offline (published set)",
    lambda root, seed, download, **o: mnist1d.load(root, **o),
    _options(mnist1d.load, ("root",)),
)
for _f in (10, 100):
    _register(
        f"sine{_f}",
        f"y = sin({_f}x) + N(0, 0.01²), x ~ U(−1, 1), 7000/3000 × 1, regression, seeded draw",
        lambda root, seed, download, _f=_f, **o: synthetic.sine(_f, seed=seed, **o),
        _options(synthetic.sine, ("frequency", "seed")),
    )
_register(
    "diabetes",
    "scikit-learn diabetes, 353/89 × 10, standardised, regression, seeded split",
    lambda root, seed, download, **o: regression.diabetes(seed=seed, **o),
    _options(regression.diabetes, ("seed",)),
)
for _fam in (idx.MNIST, idx.FASHION_MNIST):
    _register(
        _fam.name,
        f"{_fam.title}, 60000/10000 × 1×28×28, 10 classes (gzip IDX files)",
        lambda root, seed, download, _fam=_fam, **o: idx.load(_fam, root, download=download, **o),
        _options(idx.load, ("family", "root", "download")),
    )
for _fam, _n in ((cifar.CIFAR10, 10), (cifar.CIFAR100, 100)):
    _register(
        _fam.name,
        f"{_fam.title}, 50000/10000 × 3×32×32, {_n} classes (python pickles)",
        lambda root, seed, download, _fam=_fam, **o: cifar.load(_fam, root, download=download, **o),
        _options(cifar.load, ("family", "root", "download")),
    )
_register(
    "tinyimagenet",
    "TinyImageNet-200, 100000/10000 (val) × 3×64×64, 200 classes (JPEG folder tree)",
    lambda root, seed, download, **o: tinyimagenet.load(root, download=download, **o),
    _options(tinyimagenet.load, ("root", "download")),
)


def names() -> list[str]:
    """Every registered dataset name."""
    return list(_REGISTRY)


def describe(name: str) -> str:
    """A one-line description of dataset ``name`` (sizes, shapes, source)."""
    return _entry(name).summary


def _entry(name: str) -> Entry:
    if name not in _REGISTRY:
        raise check.unknown("dataset", name, names()) from None
    return _REGISTRY[name]


def get(
    name: str,
    *,
    root: str | Path | None = None,
    seed: int = 0,
    download: bool = False,
    **options,
) -> Dataset:
    """Load dataset ``name`` as a ``Dataset`` on the CPU (move it with ``.to(device)``).

    ``root`` overrides the data root (see ``data_root``); ``download=True`` fetches missing
    files of the sets read from disk; ``options`` go to the family's loader (unknown ones
    are rejected with the list of valid ones).
    """
    entry = _entry(name)
    for key in options:
        if key not in entry.options:
            raise check.unknown(f"option for dataset {name!r}", key, entry.options)
    seed = check.count("seed", seed)
    download = check.flag("download", download)
    return entry.build(data_root(root), seed, download, **options)


__all__ = ["Dataset", "Split", "data_root", "describe", "get", "names"]
