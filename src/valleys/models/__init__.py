"""Models of the papers, built from the dataset's input shape and number of classes."""

from valleys.models.mlp import mlp

__all__ = ["mlp"]
