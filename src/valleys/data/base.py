"""The in-memory dataset every loader returns, the data root, and the one-line data errors."""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from valleys import _validate as check

TASKS = ("classification", "regression")

#: Environment variable naming the data root (see ``data_root``).
ROOT_ENV = "VALLEYS_DATA"

#: How a user gets missing data, appended to every "not found" message.
HOW_TO_GET = (
    "pass download=True (CLI: `valleys train data.download=true`), put the files there, "
    f"or point root= or {ROOT_ENV} at a data root that has them"
)


@dataclass
class Dataset:
    """A dataset held as tensors.

    ``x_*`` are float inputs: images ``(N, C, H, W)`` float32 (``(N, C·H·W)`` when flattened),
    feature vectors ``(N, D)``. ``y_*`` are int64 class indices ``0..num_outputs-1`` for
    ``task="classification"``, float targets ``(N, k)`` for ``task="regression"``.
    ``num_outputs`` is the number of classes, or the regression output dimension ``k``.
    ``info`` holds plain data about where the set came from and what was done to it (the
    preprocessing, class names, target scaling) so that results can be interpreted.
    """

    name: str
    task: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_outputs: int
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check.choice("task", self.task, TASKS)
        self.num_outputs = check.count("num_outputs", self.num_outputs, 1)
        for part in ("train", "test"):
            x, y = getattr(self, f"x_{part}"), getattr(self, f"y_{part}")
            if x.shape[0] != y.shape[0]:
                check.fail(
                    f"{self.name} {part} split",
                    (tuple(x.shape), tuple(y.shape)),
                    "inputs and targets must have the same number of rows",
                )
        if self.x_train.shape[1:] != self.x_test.shape[1:]:
            check.fail(
                f"{self.name} input shapes",
                (tuple(self.x_train.shape), tuple(self.x_test.shape)),
                "train and test inputs must have the same per-sample shape",
            )

    @property
    def input_shape(self) -> tuple[int, ...]:
        """The shape of one input, ``x_train.shape[1:]``."""
        return tuple(self.x_train.shape[1:])

    @property
    def num_classes(self) -> int:
        """``num_outputs`` for a classification set (kept for code written against ``Split``)."""
        if self.task != "classification":
            raise AttributeError(f"{self.name!r} is a regression dataset: it has no classes")
        return self.num_outputs

    def to(self, device: torch.device | str) -> Dataset:
        """The same dataset with every tensor moved to ``device``."""
        moved = {
            f.name: getattr(self, f.name).to(device)
            for f in fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }
        return replace(self, info=dict(self.info), **moved)

    def __repr__(self) -> str:
        return (
            f"Dataset({self.name!r}, {self.task}, train {tuple(self.x_train.shape)}, "
            f"test {tuple(self.x_test.shape)}, num_outputs={self.num_outputs})"
        )


#: The name this class had before the registry existed; the same class.
Split = Dataset


def data_root(root: str | Path | None = None) -> Path:
    """The folder datasets are read from, downloaded to and cached in.

    The first of: the ``root`` argument; the environment variable ``VALLEYS_DATA``;
    ``~/.cache/valleys``. The folder is not created here. Each family keeps its files in the
    subfolder its official archive unpacks to (``cifar-10-batches-py/``, ``tiny-imagenet-200/``,
    ``mnist/``, ``fashion-mnist/``) and derived arrays in ``cache/``. Fashion-MNIST is also
    found in ``/usr/share/datasets/fashion-mnist`` (Debian's ``dataset-fashion-mnist``) when
    the root does not have it.
    """
    if root is None:
        root = os.environ.get(ROOT_ENV) or Path.home() / ".cache" / "valleys"
    return Path(root).expanduser()


def cache_dir(root: Path) -> Path:
    """Where derived arrays (generated sets, decoded images, fitted whitening) are cached."""
    return root / "cache"


def not_found(
    what: str, where: Iterable[Path], expected: str, extra: str = ""
) -> FileNotFoundError:
    """The one-line error for data that is missing: what, where it was looked for, which files
    were expected and how to get them."""
    places = " or ".join(str(p) for p in where)
    tail = f"; {extra}" if extra else ""
    return FileNotFoundError(
        f"{what} not found in {places} (expected {expected}): {HOW_TO_GET}{tail}"
    )


def malformed(path: Path, problem: str) -> ValueError:
    """The one-line error for a data file that exists but cannot be read."""
    return ValueError(
        f"Malformed data file {path}: {problem} (in {path.parent}; delete it and pass "
        "download=True, or replace it with the original file)"
    )


def digest(*arrays: np.ndarray | bytes | str) -> str:
    """A short stable hash of arrays (contents, dtype, shape), bytes and strings, used as a
    cache key."""
    h = hashlib.sha256()
    for a in arrays:
        if isinstance(a, str):
            a = a.encode()
        if isinstance(a, np.ndarray):
            h.update(f"{a.dtype.str}{a.shape}".encode())
            a = np.ascontiguousarray(a).data
        h.update(a)
        h.update(b"\0")
    return h.hexdigest()[:16]


def save_npz(path: Path, **arrays: np.ndarray) -> bool:
    """Write ``arrays`` to ``path`` atomically (temp file in the same folder, then rename).

    Returns False, writing nothing, when the folder cannot be written: a cache is an
    optimisation, so a read-only data root only costs the recomputation.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    except OSError:
        return False
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return True


def load_npz(path: Path, keys: Iterable[str]) -> dict[str, np.ndarray] | None:
    """The arrays in a cache file, or None when it is absent, unreadable or lacks a key."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in keys}
    except (OSError, ValueError, KeyError):
        return None


def cached(path: Path, keys: Iterable[str], make: Callable[[], dict[str, np.ndarray]]):
    """The arrays cached at ``path``, computed by ``make`` and saved there on a miss."""
    keys = tuple(keys)
    arrays = load_npz(path, keys)
    if arrays is None:
        arrays = make()
        save_npz(path, **arrays)
    return arrays
