"""MNIST and Fashion-MNIST from their gzip'd IDX files (60,000 train / 10,000 test, 1×28×28).

IDX is big-endian: an image file starts with the magic number 2051, then the image count, rows
and columns (16 header bytes), then one unsigned byte per pixel; a label file starts with 2049
and the count (8 header bytes), then one byte per label. Files may be gzip'd (``.gz``, as
published) or not.

Where the files are looked for, in order:

* MNIST: ``<root>/mnist/``.
* Fashion-MNIST: ``<root>/fashion-mnist/``, then ``/usr/share/datasets/fashion-mnist/``
  (Debian's ``apt-get install dataset-fashion-mnist``).

With ``download=True`` missing files are fetched into ``<root>/mnist/`` or
``<root>/fashion-mnist/`` and checked against the published MD5 checksums.
"""

from __future__ import annotations

import gzip
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from valleys import _validate as check
from valleys.data.base import Dataset, malformed, not_found
from valleys.data.download import Remote, fetch
from valleys.data.preprocess import prepare_images

IMAGES_MAGIC = 2051
LABELS_MAGIC = 2049

FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


@dataclass(frozen=True)
class IdxFamily:
    """One IDX dataset: its folder name in the data root, other folders to search, the
    published files and their checksums, and its class names."""

    name: str
    title: str
    folder: str
    system_dirs: tuple[Path, ...]
    remotes: tuple[Remote, ...]
    classes: tuple[str, ...]
    hint: str = ""


_MNIST_MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
)
_MNIST_MD5 = {
    "train_images": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train_labels": "d53e105ee54ea40749a09fcbcd1e9432",
    "test_images": "9fb629c4189551a2d022fa330f9573f3",
    "test_labels": "ec29112dd5afa0611ce80d1b7f02629c",
}
_FASHION_MIRRORS = ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",)
_FASHION_MD5 = {
    "train_images": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train_labels": "25c81989df183df01b3e8a0aad5dffbe",
    "test_images": "bef4ecab320f06d8554ea6380940ec79",
    "test_labels": "bb300cfdad3c16e7a12a480ee83cd310",
}


def _remotes(mirrors: tuple[str, ...], md5: dict[str, str]) -> tuple[Remote, ...]:
    return tuple(
        Remote(f"{FILES[k]}.gz", tuple(m + f"{FILES[k]}.gz" for m in mirrors), md5=md5[k])
        for k in FILES
    )


MNIST = IdxFamily(
    "mnist",
    "MNIST",
    "mnist",
    (),
    _remotes(_MNIST_MIRRORS, _MNIST_MD5),
    tuple(str(i) for i in range(10)),
)

#: Debian's ``dataset-fashion-mnist`` package installs the published files here.
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")

FASHION_MNIST = IdxFamily(
    "fashion_mnist",
    "Fashion-MNIST",
    "fashion-mnist",
    (DEBIAN_FASHION_MNIST,),
    _remotes(_FASHION_MIRRORS, _FASHION_MD5),
    (
        "T-shirt/top",
        "Trouser",
        "Pullover",
        "Dress",
        "Coat",
        "Sandal",
        "Shirt",
        "Sneaker",
        "Bag",
        "Ankle boot",
    ),
    hint="on Debian/Ubuntu: apt-get install dataset-fashion-mnist",
)


def _read_bytes(path: Path) -> bytes:
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as err:
            raise malformed(path, f"bad gzip data ({err})") from None
    return raw


def read_idx(path: Path, magic: int) -> np.ndarray:
    """The uint8 array in IDX file ``path`` (gzip'd or not): ``(n, rows, cols)`` for images
    (``magic`` 2051), ``(n,)`` for labels (2049). The header and the size are validated."""
    path = Path(path)
    data = _read_bytes(path)
    ndim = {IMAGES_MAGIC: 3, LABELS_MAGIC: 1}[magic]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise malformed(path, f"{len(data)} bytes, shorter than the {header}-byte IDX header")
    found = int.from_bytes(data[:4], "big")
    if found != magic:
        kind = "image" if magic == IMAGES_MAGIC else "label"
        raise malformed(path, f"IDX magic number {found}, expected {magic} (an IDX {kind} file)")
    dims = tuple(int(v) for v in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    size = int(np.prod(dims))
    if len(data) - header != size:
        shape = "×".join(map(str, dims))
        raise malformed(
            path,
            f"header says {shape} = {size} bytes after the {header}-byte header, "
            f"found {len(data) - header}",
        )
    # a writable copy, so that torch.from_numpy can share it without a read-only warning
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims).copy()


def _find(folder: Path) -> dict[str, Path] | None:
    """The four files in ``folder`` (``.gz`` preferred), or None if any is missing."""
    found = {}
    for key, name in FILES.items():
        for candidate in (folder / f"{name}.gz", folder / name):
            if candidate.is_file():
                found[key] = candidate
                break
        else:
            return None
    return found


def locate(family: IdxFamily, root: Path, download: bool = False) -> dict[str, Path]:
    """Paths of the family's four files: the first folder holding all of them, else (with
    ``download``) fetched into ``<root>/<folder>``, else a one-line ``FileNotFoundError``."""
    own = root / family.folder
    searched = (own, *family.system_dirs)
    for folder in searched:
        files = _find(folder)
        if files is not None:
            return files
    if download:
        for remote in family.remotes:
            fetch(remote, own)
        files = _find(own)
        assert files is not None
        return files
    raise not_found(
        family.title,
        searched,
        ", ".join(f"{n}.gz" for n in FILES.values()),
        family.hint,
    )


def load(
    family: IdxFamily,
    root: Path,
    *,
    download: bool = False,
    preprocess: str = "scale",
    mean=None,
    std=None,
    flatten: bool = False,
) -> Dataset:
    """Read ``family`` (``MNIST`` or ``FASHION_MNIST``) as float32 ``(N, 1, 28, 28)`` images
    (``(N, 784)`` with ``flatten``) preprocessed as ``preprocess`` says, int64 labels."""
    flatten = check.flag("flatten", flatten)
    files = locate(family, Path(root), download)
    arrays = {}
    for key, path in files.items():
        arrays[key] = read_idx(path, IMAGES_MAGIC if key.endswith("images") else LABELS_MAGIC)
    for part in ("train", "test"):
        n_img, n_lab = len(arrays[f"{part}_images"]), len(arrays[f"{part}_labels"])
        if n_img != n_lab:
            raise malformed(
                files[f"{part}_labels"], f"{n_lab} labels for {n_img} images in the {part} split"
            )
        if n_lab and int(arrays[f"{part}_labels"].max()) >= len(family.classes):
            raise malformed(
                files[f"{part}_labels"],
                f"label {int(arrays[f'{part}_labels'].max())} outside 0..{len(family.classes) - 1}",
            )
    x_tr, x_te, info = prepare_images(
        arrays["train_images"][:, None],
        arrays["test_images"][:, None],
        preprocess=preprocess,
        max_value=255.0,
        mean=mean,
        std=std,
        root=Path(root),
    )
    if flatten:
        x_tr, x_te = x_tr.flatten(1), x_te.flatten(1)
    info.update(source=str(files["train_images"].parent), classes=list(family.classes))
    return Dataset(
        family.name,
        "classification",
        x_tr,
        torch.from_numpy(arrays["train_labels"].astype(np.int64)),
        x_te,
        torch.from_numpy(arrays["test_labels"].astype(np.int64)),
        len(family.classes),
        info,
    )
