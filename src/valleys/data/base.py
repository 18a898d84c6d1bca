"""The in-memory split every dataset loader returns."""

from __future__ import annotations

from typing import NamedTuple

import torch


class Split(NamedTuple):
    """A dataset held as tensors: inputs ``x_*`` (float) and targets ``y_*`` (class indices
    for classification, floats for regression)."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    @property
    def num_classes(self) -> int:
        """Number of classes (targets are ``0..C-1``)."""
        return int(torch.cat([self.y_train, self.y_test]).max()) + 1

    def to(self, device: torch.device | str) -> Split:
        """The same split with every tensor moved to ``device``."""
        return Split(*(t.to(device) for t in self))
