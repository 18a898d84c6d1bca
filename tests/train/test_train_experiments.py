"""Every experiment file under configs/experiments loads and validates without training:
names resolve in their registries, keys are arguments of what they feed, the schedule resolves
against the dataset's size, and the model builds (on the meta device) for the dataset's
shapes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from valleys import models
from valleys.train import config as C

EXPERIMENTS = Path(__file__).resolve().parents[2] / "configs" / "experiments"

# training-set size, image shape and classes of each dataset, without reading it
SHAPES = {
    "digits": (1437, (1, 8, 8), 10),
    "mnist": (60000, (1, 28, 28), 10),
    "fashion_mnist": (60000, (1, 28, 28), 10),
    "cifar10": (50000, (3, 32, 32), 10),
    "cifar100": (50000, (3, 32, 32), 100),
    "tinyimagenet": (100000, (3, 64, 64), 200),
}


def _configs(path: Path) -> dict[str, C.Config]:
    text = path.read_text()
    if text.lstrip().startswith("base:") or "\nvariants:" in text:
        return C.load_variants(path)
    return {path.stem: C.load([path])}


FILES = sorted(EXPERIMENTS.glob("*.yaml"))


def test_the_seeds_experiments_are_there():
    names = {p.stem for p in FILES}
    assert {
        "digits_compare",
        "entropy_sgd_lenet",
        "entropy_sgd_mnistfc",
        "entropy_sgd_allcnn_cifar10",
        "entropy_sgd_wrn_cifar10_tf",
        "sgn_mnist_mlp",
        "sgn_fashion_conv",
        "sgn_cifar_conv",
        "vsgd_cifar100_vgg16",
        "vsgd_tinyimagenet_vgg19",
    } <= names


@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
def test_experiment_validates(path):
    for name, cfg in _configs(path).items():
        cfg = C.validate(cfg)
        n, shape, classes = SHAPES[cfg.data.name]
        if cfg.data.options.get("flatten"):
            shape = (int(torch.tensor(shape).prod()),)
        resolved = C.resolve(cfg, num_train=n)
        assert C.from_dict(C.to_dict(resolved)) == resolved, name
        with torch.device("meta"):
            model = models.get(cfg.model.name, shape, classes, **resolved.model.kwargs)
        out = model(torch.empty(2, *shape, device="meta"))
        assert tuple(out.shape) == (2, classes), name
