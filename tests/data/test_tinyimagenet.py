from pathlib import Path

import numpy as np
import pytest
import torch

from valleys import data
from valleys.data import tinyimagenet

PIL = pytest.importorskip("PIL")
from PIL import Image  # noqa: E402

# solid colours survive JPEG compression nearly exactly
COLOURS = {"n02": (200, 30, 30), "n01": (30, 200, 30), "n03": (30, 30, 200)}


def write_tree(root: Path, per_class: int = 3, size: int = 64) -> Path:
    folder = root / "tiny-imagenet-200"
    (folder / "val" / "images").mkdir(parents=True)
    # wnids.txt is not sorted; class k is the k-th wnid in sorted order
    (folder / "wnids.txt").write_text("n02\nn01\nn03\n")
    (folder / "words.txt").write_text("n01\tone\nn02\ttwo\nn03\tthree\nn04\tfour\n")
    for wnid, colour in COLOURS.items():
        images = folder / "train" / wnid / "images"
        images.mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (size, size), colour).save(images / f"{wnid}_{i}.JPEG")
        (folder / "train" / wnid / f"{wnid}_boxes.txt").write_text("")
    lines = []
    for i, wnid in enumerate(["n03", "n01", "n02", "n01"]):
        Image.new("RGB", (size, size), COLOURS[wnid]).save(
            folder / "val" / "images" / f"val_{i}.JPEG"
        )
        lines.append(f"val_{i}.JPEG\t{wnid}\t0\t0\t10\t10")
    # one greyscale image, which must come out as RGB
    Image.new("L", (size, size), 128).save(folder / "val" / "images" / "val_4.JPEG")
    lines.append("val_4.JPEG\tn02\t0\t0\t10\t10")
    (folder / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return folder


def test_reads_the_tree_and_caches(tmp_path, monkeypatch):
    write_tree(tmp_path)
    ds = data.get("tinyimagenet", root=tmp_path, preprocess="none")
    assert ds.num_outputs == 3 and ds.info["wnids"] == ["n01", "n02", "n03"]
    assert ds.info["classes"] == ["one", "two", "three"]
    assert ds.x_train.shape == (9, 3, 64, 64) and ds.x_test.shape == (5, 3, 64, 64)
    assert ds.y_train.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert ds.y_test.tolist() == [2, 0, 1, 0, 1]
    for i, label in enumerate(ds.y_train.tolist()):
        colour = torch.tensor(COLOURS[ds.info["wnids"][label]], dtype=torch.float32)
        assert torch.allclose(ds.x_train[i].mean((1, 2)), colour, atol=3)
    assert torch.allclose(ds.x_test[4], torch.full((3, 64, 64), 128.0), atol=2)
    assert len(list((tmp_path / "cache").glob("tinyimagenet-*.npz"))) == 1

    monkeypatch.setattr(tinyimagenet, "decode_images", lambda paths: pytest.fail("decoded"))
    again = data.get("tinyimagenet", root=tmp_path, preprocess="none")
    assert torch.equal(again.x_train, ds.x_train) and torch.equal(again.y_test, ds.y_test)
    scaled = data.get("tinyimagenet", root=tmp_path, flatten=True)
    assert scaled.x_train.shape == (9, 3 * 64 * 64) and float(scaled.x_train.max()) <= 1


def test_changed_folder_is_decoded_again(tmp_path):
    folder = write_tree(tmp_path)
    data.get("tinyimagenet", root=tmp_path)
    Image.new("RGB", (64, 64), COLOURS["n01"]).save(folder / "train" / "n01" / "images" / "x.JPEG")
    ds = data.get("tinyimagenet", root=tmp_path)
    assert ds.x_train.shape[0] == 10
    assert len(list((tmp_path / "cache").glob("tinyimagenet-*.npz"))) == 2


def test_missing_and_malformed(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        data.get("tinyimagenet", root=tmp_path)
    msg = str(err.value)
    assert "\n" not in msg and str(tmp_path / "tiny-imagenet-200") in msg
    assert "wnids.txt" in msg and "val_annotations.txt" in msg

    folder = write_tree(tmp_path)
    with open(folder / "val" / "val_annotations.txt", "a") as f:
        f.write("val_9.JPEG\tn99\t0\t0\t1\t1\n")
    with pytest.raises(ValueError, match=r"line 6 .* does not name a file and a known wnid"):
        data.get("tinyimagenet", root=tmp_path)


def test_undecodable_and_odd_sized_images(tmp_path):
    folder = write_tree(tmp_path)
    bad = folder / "train" / "n03" / "images" / "n03_1.JPEG"
    bad.write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match=r"n03_1\.JPEG: cannot decode the image"):
        data.get("tinyimagenet", root=tmp_path, cache=False)
    Image.new("RGB", (32, 32), (0, 0, 0)).save(bad, format="JPEG")
    with pytest.raises(ValueError, match="image of 32×32 among 64×64"):
        data.get("tinyimagenet", root=tmp_path, cache=False)
    assert not (tmp_path / "cache").exists()


def test_decode_images_stacks_uint8(tmp_path):
    paths = []
    for i in range(3):
        p = tmp_path / f"{i}.png"
        Image.fromarray(np.full((5, 7, 3), i * 10, np.uint8)).save(p)
        paths.append(p)
    arr = tinyimagenet.decode_images(paths, workers=2)
    assert arr.dtype == np.uint8 and arr.shape == (3, 3, 5, 7)
    assert arr[:, 0, 0, 0].tolist() == [0, 10, 20]
