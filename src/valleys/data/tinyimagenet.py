"""TinyImageNet-200 from its official folder tree (100,000 train / 10,000 val RGB images of
3×64×64, 200 classes).

Layout of ``<root>/tiny-imagenet-200/`` (as unpacked from ``tiny-imagenet-200.zip``)::

    wnids.txt                         the 200 WordNet ids, one per line
    words.txt                         (optional) wnid <tab> human-readable names
    train/<wnid>/images/*.JPEG        500 images per class
    val/images/*.JPEG                 10,000 images
    val/val_annotations.txt           file <tab> wnid <tab> box coordinates

Class ``k`` is the k-th wnid in sorted order (the order an image-folder reader gives). The
official test images carry no labels, so the labelled validation split serves as the test
split, as in VSGD's experiments. Decoding 110,000 JPEGs (Pillow, a few threads) takes a while,
so the decoded uint8 arrays are cached in ``<root>/cache/tinyimagenet-<key>.npz`` (about
1.35 GB) after the first read; the key hashes the file list, sizes and annotation files, so a
changed folder is decoded again.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from valleys import _validate as check
from valleys.data.base import Dataset, cache_dir, cached, digest, malformed, not_found
from valleys.data.download import Remote, fetch_and_extract
from valleys.data.preprocess import prepare_images

FOLDER = "tiny-imagenet-200"
REMOTE = Remote(
    "tiny-imagenet-200.zip",
    ("http://cs231n.stanford.edu/tiny-imagenet-200.zip",),
    md5="90528d7ca1a48142e341f4ef8d21d0de",
)
_EXPECTED = "wnids.txt, train/<wnid>/images/*.JPEG, val/images/*.JPEG and val/val_annotations.txt"
_IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")


def _is_image(name: str) -> bool:
    return name.lower().endswith(_IMAGE_SUFFIXES)


def _read_wnids(folder: Path) -> list[str]:
    path = folder / "wnids.txt"
    wnids = [w.strip() for w in path.read_text().splitlines() if w.strip()]
    if not wnids:
        raise malformed(path, "no WordNet ids")
    if len(set(wnids)) != len(wnids):
        raise malformed(path, "repeated WordNet ids")
    return sorted(wnids)


def _train_files(folder: Path, wnids: list[str]) -> tuple[list[Path], list[int]]:
    paths, labels = [], []
    for k, wnid in enumerate(wnids):
        images = folder / "train" / wnid / "images"
        if not images.is_dir():
            raise malformed(folder / "wnids.txt", f"class {wnid} has no folder {images}")
        names = sorted(e.name for e in os.scandir(images) if e.is_file() and _is_image(e.name))
        if not names:
            raise malformed(images / "_", f"no images for class {wnid}")
        paths += [images / n for n in names]
        labels += [k] * len(names)
    return paths, labels


def _val_files(folder: Path, wnids: list[str]) -> tuple[list[Path], list[int]]:
    path = folder / "val" / "val_annotations.txt"
    index = {w: k for k, w in enumerate(wnids)}
    paths, labels = [], []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) < 2 or parts[1] not in index:
            raise malformed(path, f"line {lineno} {line!r} does not name a file and a known wnid")
        paths.append(folder / "val" / "images" / parts[0])
        labels.append(index[parts[1]])
    if not paths:
        raise malformed(path, "no annotations")
    return paths, labels


def _decode(path: Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB")).transpose(2, 0, 1)
    except FileNotFoundError:
        raise malformed(path, "listed in the annotations but missing") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise malformed(path, f"cannot decode the image ({err})") from None


def decode_images(paths: list[Path], workers: int | None = None) -> np.ndarray:
    """Decode images to one uint8 ``(N, 3, H, W)`` array (all must share one size), in
    ``workers`` threads (Pillow releases the GIL while decoding)."""
    try:
        import PIL  # noqa: F401
    except ImportError:
        raise ImportError("TinyImageNet needs Pillow: pip install pillow") from None
    workers = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(workers) as pool:
        images = list(pool.map(_decode, paths))
    shape = images[0].shape
    for path, im in zip(paths, images, strict=True):
        if im.shape != shape:
            raise malformed(
                path, f"image of {im.shape[1]}×{im.shape[2]} among {shape[1]}×{shape[2]}"
            )
    return np.stack(images)


def _fingerprint(folder: Path, paths: list[Path]) -> str:
    listing = "\n".join(f"{p.relative_to(folder)} {p.stat().st_size}" for p in paths)
    return digest(
        (folder / "wnids.txt").read_bytes(),
        (folder / "val" / "val_annotations.txt").read_bytes(),
        listing,
    )


def locate(root: Path, download: bool = False) -> Path:
    """``<root>/tiny-imagenet-200`` once it holds the expected tree (downloaded and unpacked
    first with ``download``), else a one-line ``FileNotFoundError``."""
    folder = Path(root) / FOLDER
    needed = (folder / "wnids.txt", folder / "train", folder / "val" / "val_annotations.txt")

    def complete() -> bool:
        return all(p.exists() for p in needed)

    if not complete() and download:
        fetch_and_extract(REMOTE, Path(root))
    if not complete():
        raise not_found(
            "TinyImageNet-200",
            [folder],
            _EXPECTED,
            f"the archive is {REMOTE.urls[0]}, unpacked in {Path(root)}",
        )
    return folder


def read_arrays(
    root: Path, download: bool = False, use_cache: bool = True
) -> dict[str, np.ndarray]:
    """The decoded arrays ``x_train``, ``y_train``, ``x_test``, ``y_test`` (uint8 images,
    int64 labels) and ``wnids``, from the cache when it matches the folder."""
    folder = locate(root, download)
    wnids = _read_wnids(folder)
    train_paths, train_labels = _train_files(folder, wnids)
    val_paths, val_labels = _val_files(folder, wnids)

    def make() -> dict[str, np.ndarray]:
        return {
            "x_train": decode_images(train_paths),
            "y_train": np.asarray(train_labels, dtype=np.int64),
            "x_test": decode_images(val_paths),
            "y_test": np.asarray(val_labels, dtype=np.int64),
            "wnids": np.asarray(wnids),
        }

    if not use_cache:
        return make()
    key = _fingerprint(folder, train_paths + val_paths)
    path = cache_dir(Path(root)) / f"tinyimagenet-{key}.npz"
    return cached(path, ("x_train", "y_train", "x_test", "y_test", "wnids"), make)


def _class_names(folder: Path, wnids: list[str]) -> list[str]:
    words = folder / "words.txt"
    names = {}
    if words.is_file():
        for line in words.read_text(errors="replace").splitlines():
            wnid, _, text = line.partition("\t")
            names[wnid.strip()] = text.strip()
    return [names.get(w, w) for w in wnids]


def load(
    root: Path,
    *,
    download: bool = False,
    preprocess: str = "scale",
    mean=None,
    std=None,
    flatten: bool = False,
    cache: bool = True,
) -> Dataset:
    """Read TinyImageNet-200 as float32 ``(N, 3, 64, 64)`` images (``(N, 12288)`` with
    ``flatten``) preprocessed as ``preprocess`` says, int64 labels; the validation split is the
    test split. ``cache=False`` decodes the JPEGs without reading or writing the cache."""
    flatten = check.flag("flatten", flatten)
    cache = check.flag("cache", cache)
    root = Path(root)
    arrays = read_arrays(root, download, use_cache=cache)
    xtr, xte, info = prepare_images(
        arrays["x_train"], arrays["x_test"], preprocess=preprocess, mean=mean, std=std, root=root
    )
    if flatten:
        xtr, xte = xtr.flatten(1), xte.flatten(1)
    wnids = [str(w) for w in arrays["wnids"]]
    info.update(source=str(root / FOLDER), wnids=wnids, classes=_class_names(root / FOLDER, wnids))
    return Dataset(
        "tinyimagenet",
        "classification",
        xtr,
        torch.from_numpy(arrays["y_train"]),
        xte,
        torch.from_numpy(arrays["y_test"]),
        len(wnids),
        info,
    )
