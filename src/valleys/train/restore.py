"""Rebuild a run's dataset and model from its configuration, and a trained model from a run
directory or checkpoint file, for analyses that come after training (sharpness, surfaces,
Hessians)::

    from valleys.train import load_run

    run = load_run("runs/digits-mlp-sgd-20250101-120000")   # or .../checkpoint.pt
    run.model, run.dataset, run.loss_fn, run.run_dir, run.step

The dataset comes from the configuration saved in the checkpoint (the same name, options and
seed, so the same split), the weights from the checkpoint's model state.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from valleys.train import checkpoint as ckpt
from valleys.train import config as C

__all__ = ["LoadedRun", "build_dataset", "build_model", "load_run"]


def build_dataset(cfg: C.Config) -> Any:
    """The ``valleys.data.Dataset`` that ``cfg.data`` names (on the CPU)."""
    from valleys import data as data_registry

    d = cfg.data
    return data_registry.get(d.name, root=d.root, seed=d.seed, download=d.download, **d.options)


def build_model(cfg: C.Config, dataset: Any) -> nn.Module:
    """The model that ``cfg.model`` names, shaped for ``dataset`` (freshly initialised from
    the global generator; seed it first for reproducible weights)."""
    from valleys import models as model_registry

    return model_registry.get(
        cfg.model.name, dataset.input_shape, dataset.num_outputs, **cfg.model.kwargs
    )


@dataclass
class LoadedRun:
    """A trained model with the dataset and loss it was trained on.

    ``model`` is on ``device`` in eval mode with the checkpoint's weights and buffers;
    ``dataset`` is on ``device``; ``run_dir`` is the folder holding the checkpoint, where
    analyses write their records and plots.
    """

    run_dir: Path
    checkpoint: Path
    config: C.Config
    model: nn.Module
    dataset: Any
    step: int
    device: torch.device

    @property
    def task(self) -> str:
        return self.dataset.task

    @property
    def loss_fn(self) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """The training loss (mean-reduced cross-entropy or MSE)."""
        from valleys.train.evaluate import loss_function

        return loss_function(self.task)


def checkpoint_path(path: str | Path) -> Path:
    """``path`` itself when it is a file, ``path/checkpoint.pt`` when it is a run directory;
    a one-line ``FileNotFoundError`` otherwise."""
    from valleys.train.loop import CHECKPOINT

    path = Path(path)
    if path.is_dir():
        if not (path / CHECKPOINT).is_file():
            raise FileNotFoundError(
                f"No {CHECKPOINT} in {path} (give a run directory that finished or saved a "
                "checkpoint, or a checkpoint file)"
            )
        return path / CHECKPOINT
    if not path.exists():
        raise FileNotFoundError(f"Not a run directory or checkpoint file: {path}")
    return path


def load_run(path: str | Path, *, device: str | torch.device = "auto") -> LoadedRun:
    """The model of a run directory (its ``checkpoint.pt``) or of a checkpoint file, with the
    dataset rebuilt from the configuration saved in the checkpoint.

    ``device``: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda:1"``… Raises a one-line
    ``FileNotFoundError`` for a missing path or missing data and ``ValueError`` for a file
    that is not a valleys checkpoint or whose weights do not fit the model it names.
    """
    from valleys.train.loop import select_device

    file = checkpoint_path(path)
    state = ckpt.load(file)
    if not isinstance(state.get("config"), dict) or "model" not in state:
        raise ValueError(f"Unreadable checkpoint {file}: it holds no config or model state")
    cfg = C.from_dict(state["config"])
    dev = select_device(device) if isinstance(device, str) else torch.device(device)
    dataset = build_dataset(cfg)
    model = build_model(cfg, dataset)
    try:
        model.load_state_dict(state["model"])
    except (RuntimeError, KeyError, TypeError) as err:
        first = str(err).strip().splitlines()[0]
        raise ValueError(
            f"Checkpoint {file} does not fit model {cfg.model.name!r} ({first})"
        ) from None
    model.to(dev).eval()
    return LoadedRun(
        run_dir=file.parent,
        checkpoint=file,
        config=cfg,
        model=model,
        dataset=dataset.to(dev),
        step=int(state.get("step", 0)),
        device=dev,
    )
