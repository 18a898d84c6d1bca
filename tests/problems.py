"""Tiny float64 problems shared by the test suite (importable as ``problems``)."""

from __future__ import annotations

from collections.abc import Callable

import torch


def least_squares(
    n: int = 32, d: int = 5, *, seed: int = 0, dtype: torch.dtype = torch.float64
) -> tuple[torch.Tensor, torch.Tensor]:
    """A well-conditioned regression problem ``(X, y)`` with ``y = X w* + noise``."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen, dtype=dtype)
    w = torch.randn(d, generator=gen, dtype=dtype)
    y = x @ w + 0.1 * torch.randn(n, generator=gen, dtype=dtype)
    return x, y


def tiny_classifier(seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.nn.Module:
    """A 4-8-3 tanh MLP."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).to(
        dtype
    )


def classification_data(
    n: int = 64, *, seed: int = 0, dtype: torch.dtype = torch.float64
) -> tuple[torch.Tensor, torch.Tensor]:
    """Three Gaussian blobs in 4-D, labels 0..2."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    centres = torch.tensor([[2.0, 0, 0, 0], [0, 2.0, 0, 0], [0, 0, 2.0, 0]], dtype=dtype)
    x = centres[y] + 0.7 * torch.randn(n, 4, generator=gen, dtype=dtype)
    return x, y


def batch_closure(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int = 16,
    *,
    seed: int = 0,
) -> Callable[[], torch.Tensor]:
    """A closure that zeroes grads, draws a fresh mini-batch (with replacement, from its own
    seeded generator) and returns the cross-entropy loss with gradients."""
    gen = torch.Generator().manual_seed(seed)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        idx = torch.randint(0, x.shape[0], (batch_size,), generator=gen)
        loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
        loss.backward()
        return loss

    return closure
