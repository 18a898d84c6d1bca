"""Datasets held as tensors (see ``Split``)."""

from valleys.data.base import Split

__all__ = ["Split"]
