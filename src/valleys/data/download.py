"""Downloading and unpacking dataset archives, only when the user asks (``download=True``).

A download streams into a temporary file next to its destination, shows its progress on
stderr, is checked against the published checksum and only then renamed into place, so that an
interrupted or corrupted transfer never leaves a file that looks complete. Archives unpack into
a temporary folder first and move into the data root when complete. The URLs and checksums live
in each dataset family's module as ``Remote`` records.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO

_BLOCK = 1 << 20


@dataclass(frozen=True)
class Remote:
    """A file to download: its name in the data root, the URLs to try in order and its
    published checksum (MD5 where that is all the publisher gives, else SHA-256)."""

    filename: str
    urls: tuple[str, ...]
    md5: str | None = None
    sha256: str | None = None

    def __post_init__(self) -> None:
        if not self.urls:
            raise ValueError(f"Invalid Remote {self.filename!r}: no URL")
        if self.md5 is None and self.sha256 is None:
            raise ValueError(f"Invalid Remote {self.filename!r}: no checksum to verify against")

    @property
    def checksum(self) -> tuple[str, str]:
        """(algorithm, expected hex digest), preferring SHA-256."""
        if self.sha256 is not None:
            return "sha256", self.sha256.lower()
        return "md5", str(self.md5).lower()


def file_hash(path: Path, algorithm: str) -> str:
    """Hex digest of a file's contents."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_BLOCK), b""):
            h.update(block)
    return h.hexdigest()


def verified(path: Path, remote: Remote) -> bool:
    """Whether ``path`` exists and matches ``remote``'s checksum."""
    algorithm, expected = remote.checksum
    return path.is_file() and file_hash(path, algorithm) == expected


class _Progress:
    """A one-line progress bar on stderr, redrawn at most a few times a second."""

    def __init__(self, name: str, total: int | None, stream: IO[str] | None) -> None:
        self.name, self.total, self.stream = name, total, stream
        self.done = 0
        self._last = 0.0

    def update(self, n: int, final: bool = False) -> None:
        self.done += n
        now = time.monotonic()
        if self.stream is None or (not final and now - self._last < 0.2):
            return
        self._last = now
        mb = self.done / 1e6
        if self.total:
            frac = min(1.0, self.done / self.total)
            bar = "#" * int(30 * frac)
            text = f"{self.name} [{bar:<30}] {100 * frac:5.1f}% {mb:.1f}/{self.total / 1e6:.1f} MB"
        else:
            text = f"{self.name} {mb:.1f} MB"
        self.stream.write("\r" + text + ("\n" if final else ""))
        self.stream.flush()


def fetch(remote: Remote, folder: Path, *, progress: bool = True, timeout_s: float = 60.0) -> Path:
    """Download ``remote`` into ``folder`` (created if needed) and return its path.

    A file already there with the right checksum is kept. Raises ``ConnectionError`` with
    one line when no URL can be reached (e.g. offline) and ``ValueError`` when the download
    does not match the published checksum; in both cases nothing is left behind.
    """
    folder = Path(folder)
    dest = folder / remote.filename
    if verified(dest, remote):
        return dest
    folder.mkdir(parents=True, exist_ok=True)
    algorithm, expected = remote.checksum
    failures = []
    for url in remote.urls:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{remote.filename}.", suffix=".part", dir=folder)
        tmp = Path(tmp_name)
        try:
            h = hashlib.new(algorithm)
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout_s) as r:
                length = r.headers.get("Content-Length")
                bar = _Progress(
                    remote.filename,
                    int(length) if length and length.isdigit() else None,
                    sys.stderr if progress else None,
                )
                for block in iter(lambda r=r: r.read(_BLOCK), b""):
                    out.write(block)
                    h.update(block)
                    bar.update(len(block))
                bar.update(0, final=True)
            got = h.hexdigest()
            if got != expected:
                raise ValueError(
                    f"Checksum mismatch for {remote.filename} downloaded from {url}: {algorithm} "
                    f"{got}, expected {expected} (nothing was kept in {folder}; try again, or "
                    "download the file by hand into that folder)"
                )
            os.replace(tmp, dest)
            return dest
        except (urllib.error.URLError, OSError) as err:
            reason = getattr(err, "reason", None) or err
            failures.append(f"{url}: {reason}")
        finally:
            tmp.unlink(missing_ok=True)
    raise ConnectionError(
        f"Could not download {remote.filename} ({'; '.join(failures)}); if this machine is "
        f"offline, fetch the file elsewhere and copy it into {folder}"
    )


def _inside(base: Path, name: str) -> bool:
    target = (base / name).resolve()
    return target == base or base in target.parents


def extract(archive: Path, folder: Path) -> list[Path]:
    """Unpack a ``.tar.gz``/``.tgz``/``.tar`` or ``.zip`` archive into ``folder``.

    Members that would land outside ``folder`` (absolute paths, ``..``, links) are refused.
    The archive unpacks into a temporary folder beside the destination; its top-level entries
    then replace any of the same name in ``folder``. Returns those entries.
    """
    archive, folder = Path(archive), Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".extract-", dir=folder))
    base = staging.resolve()
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as z:
                for name in z.namelist():
                    if not _inside(base, name):
                        raise ValueError(f"Unsafe path {name!r} in archive {archive}")
                z.extractall(staging)
        else:
            with tarfile.open(archive) as t:
                members = t.getmembers()
                for m in members:
                    if not (m.isfile() or m.isdir()) or not _inside(base, m.name):
                        raise ValueError(f"Unsafe or unsupported member {m.name!r} in {archive}")
                if hasattr(tarfile, "data_filter"):  # Python >= 3.11.4 (and 3.10.12)
                    t.extractall(staging, members=members, filter="data")
                else:
                    t.extractall(staging, members=members)
        moved = []
        for entry in sorted(staging.iterdir()):
            target = folder / entry.name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            elif target.exists() or target.is_symlink():
                target.unlink()
            os.replace(entry, target)
            moved.append(target)
        return moved
    except (tarfile.TarError, zipfile.BadZipFile, EOFError) as err:
        raise ValueError(
            f"Malformed archive {archive}: {err} (delete it and pass download=True again)"
        ) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def fetch_and_extract(remote: Remote, folder: Path, *, progress: bool = True) -> list[Path]:
    """Download an archive into ``folder`` (unless already there and verified), unpack it there."""
    return extract(fetch(remote, folder, progress=progress), folder)
