import dataclasses
import hashlib
import io
import pickle
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest

from valleys.data import cifar, download, idx
from valleys.data.download import Remote, extract, fetch


def source(tmp_path: Path, payload: bytes = b"valleys" * 1000) -> tuple[Path, str]:
    src = tmp_path / "server" / "file.bin"
    src.parent.mkdir(parents=True, exist_ok=True)
    src.write_bytes(payload)
    return src, src.as_uri()


def test_fetch_file_url_with_md5_and_sha256(tmp_path, capsys):
    src, url = source(tmp_path)
    data = src.read_bytes()
    for kw in (
        {"md5": hashlib.md5(data).hexdigest()},
        {"sha256": hashlib.sha256(data).hexdigest()},
    ):
        dest_dir = tmp_path / f"root-{next(iter(kw))}"
        path = fetch(Remote("file.bin", (url,), **kw), dest_dir)
        assert path == dest_dir / "file.bin" and path.read_bytes() == data
        assert [p.name for p in dest_dir.iterdir()] == ["file.bin"]  # no temp file left
    assert "file.bin" in capsys.readouterr().err  # progress on stderr


def test_verified_file_is_not_fetched_again(tmp_path, monkeypatch):
    src, url = source(tmp_path)
    remote = Remote("file.bin", (url,), md5=hashlib.md5(src.read_bytes()).hexdigest())
    fetch(remote, tmp_path / "root", progress=False)
    monkeypatch.setattr(download.urllib.request, "urlopen", lambda *a, **k: pytest.fail("fetched"))
    fetch(remote, tmp_path / "root", progress=False)


def test_checksum_mismatch_keeps_nothing(tmp_path):
    _, url = source(tmp_path)
    with pytest.raises(ValueError, match=r"Checksum mismatch for file\.bin.*expected 0000") as err:
        fetch(Remote("file.bin", (url,), md5="0" * 32), tmp_path / "root", progress=False)
    assert "\n" not in str(err.value)
    assert list((tmp_path / "root").iterdir()) == []


def test_unreachable_tries_every_url_then_one_line(tmp_path):
    src, url = source(tmp_path)
    missing = (tmp_path / "nope.bin").as_uri()
    remote = Remote("file.bin", (missing, url), md5=hashlib.md5(src.read_bytes()).hexdigest())
    assert fetch(remote, tmp_path / "a", progress=False).is_file()  # second URL works
    with pytest.raises(ConnectionError, match=r"Could not download file\.bin") as err:
        fetch(Remote("file.bin", (missing,), md5="0" * 32), tmp_path / "b", progress=False)
    assert "\n" not in str(err.value) and str(tmp_path / "b") in str(err.value)
    assert list((tmp_path / "b").iterdir()) == []


def test_remote_needs_url_and_checksum():
    with pytest.raises(ValueError, match="no URL"):
        Remote("x", (), md5="0")
    with pytest.raises(ValueError, match="no checksum"):
        Remote("x", ("file:///x",))


def test_extract_tar_and_zip_and_refuse_escapes(tmp_path):
    tgz = tmp_path / "a.tar.gz"
    with tarfile.open(tgz, "w:gz") as t:
        info = tarfile.TarInfo("top/inner.txt")
        info.size = 5
        t.addfile(info, io.BytesIO(b"hello"))
    (tmp_path / "out" / "top").mkdir(parents=True)
    (tmp_path / "out" / "top" / "stale.txt").write_text("old")
    assert extract(tgz, tmp_path / "out") == [tmp_path / "out" / "top"]
    assert (tmp_path / "out" / "top" / "inner.txt").read_text() == "hello"
    assert not (tmp_path / "out" / "top" / "stale.txt").exists()

    zp = tmp_path / "b.zip"
    with zipfile.ZipFile(zp, "w") as z:
        z.writestr("ztop/x.txt", "zip")
    extract(zp, tmp_path / "out")
    assert (tmp_path / "out" / "ztop" / "x.txt").read_text() == "zip"

    evil = tmp_path / "evil.tar"
    with tarfile.open(evil, "w") as t:
        info = tarfile.TarInfo("../escaped.txt")
        info.size = 1
        t.addfile(info, io.BytesIO(b"x"))
    with pytest.raises(ValueError, match="Unsafe"):
        extract(evil, tmp_path / "out")
    assert not (tmp_path / "escaped.txt").exists()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["top", "ztop"]

    (tmp_path / "broken.tar.gz").write_bytes(b"\x1f\x8b garbage")
    with pytest.raises(ValueError, match="Malformed archive"):
        extract(tmp_path / "broken.tar.gz", tmp_path / "out")


def test_cifar10_download_end_to_end(tmp_path):
    """download=True with the archive served from a file:// URL in the real layout."""
    staging = tmp_path / "server" / "cifar-10-batches-py"
    staging.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (2, 3072), dtype=np.uint8), b"labels": [1, 2]}
        (staging / name).write_bytes(pickle.dumps(batch, protocol=2))
    archive = tmp_path / "server" / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as t:
        t.add(staging, arcname="cifar-10-batches-py")
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    family = dataclasses.replace(
        cifar.CIFAR10, remote=Remote(archive.name, (archive.as_uri(),), md5=md5)
    )
    root = tmp_path / "root"
    with pytest.raises(FileNotFoundError):
        cifar.load(family, root)
    ds = cifar.load(family, root, download=True)
    assert ds.x_train.shape == (10, 3, 32, 32) and ds.y_test.tolist() == [1, 2]
    assert (root / "cifar-10-python.tar.gz").is_file()


def test_idx_download_end_to_end(tmp_path):
    import gzip

    server = tmp_path / "server"
    server.mkdir()
    remotes = []
    for key, name in idx.FILES.items():
        n = 3
        shape = (n, 28, 28) if key.endswith("images") else (n,)
        magic = idx.IMAGES_MAGIC if key.endswith("images") else idx.LABELS_MAGIC
        header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in shape)
        blob = gzip.compress(header + np.ones(shape, np.uint8).tobytes())
        (server / f"{name}.gz").write_bytes(blob)
        remotes.append(
            Remote(
                f"{name}.gz", ((server / f"{name}.gz").as_uri(),), md5=hashlib.md5(blob).hexdigest()
            )
        )
    family = dataclasses.replace(idx.MNIST, remotes=tuple(remotes))
    ds = idx.load(family, tmp_path / "root", download=True)
    assert ds.x_train.shape == (3, 1, 28, 28)
    assert sorted(p.name for p in (tmp_path / "root" / "mnist").iterdir()) == sorted(
        f"{n}.gz" for n in idx.FILES.values()
    )


def test_published_checksums_are_well_formed():
    remotes = [
        *idx.MNIST.remotes,
        *idx.FASHION_MNIST.remotes,
        cifar.CIFAR10.remote,
        cifar.CIFAR100.remote,
    ]
    from valleys.data import tinyimagenet

    remotes.append(tinyimagenet.REMOTE)
    for r in remotes:
        algorithm, digest = r.checksum
        assert algorithm == "md5" and len(digest) == 32 and int(digest, 16) >= 0
        assert all(u.startswith(("http://", "https://")) for u in r.urls)
