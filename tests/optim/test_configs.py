"""configs/optim/<name>.yaml: one per registry entry, each building its optimizer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from valleys import optim

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "optim"


@pytest.mark.parametrize("name", optim.names())
def test_config_builds_its_optimizer(name):
    path = CONFIGS / f"{name}.yaml"
    assert path.is_file(), f"add {path.relative_to(CONFIGS.parents[1])}"
    hparams = yaml.safe_load(path.read_text())
    entry = optim.spec(name)
    accepted = entry.hyperparameters()
    assert set(hparams) <= set(accepted)
    if "betas" in hparams:
        hparams["betas"] = tuple(hparams["betas"])
    if entry.takes_model:  # built from a model and its loss (SGN)
        opt = optim.get(name, torch.nn.Linear(2, 1), loss_fn="mse", **hparams)
    else:
        opt = optim.get(name, [torch.nn.Parameter(torch.zeros(2))], **hparams)
    group = opt.param_groups[0]
    for key, value in hparams.items():
        assert group[key] == value, key
    if entry.cls.__module__.startswith("valleys."):
        # valleys' own optimizers: the file spells out the constructor defaults, no other values
        assert hparams == accepted
