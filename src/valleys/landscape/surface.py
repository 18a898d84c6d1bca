"""Loss along lines and planes through the weights: 1-D curves and 2-D surfaces along
filter-normalised random directions, and linear interpolation between two weight sets.

Li, Xu, Taylor, Studer, Goldstein (2018), "Visualizing the Loss Landscape of Neural Nets":
a Gaussian direction ``d`` is rescaled filter by filter so that every filter of ``d`` has the
norm of the matching filter of the weights ``θ`` (for a weight tensor, a filter is one slice
along its first, output, dimension: a conv filter or the input weights of one output unit),
which makes curves comparable across networks whose weights differ in scale. One-dimensional
parameters (biases, BatchNorm scales and shifts) get a zero direction by default; Li et al.'s
``ignore='biasbn'`` off copies the parameter itself into the direction, as here with
``ignore_bias_bn=False``. Then::

    curve:        f(θ + α d)            for α in alphas
    surface:      f(θ + α d1 + β d2)    for α in alphas, β in betas
    interpolation f((1 − α) θ_A + α θ_B) (Goodfellow et al. 2015), α in alphas

``f`` is the full-dataset mean loss in eval mode (:func:`~valleys.landscape.common.full_loss`),
with the accuracy for classifiers. The model is evaluated through
``torch.func.functional_call``: its parameters, buffers and training flag are unchanged
afterwards. Results are NumPy arrays, copied from the device once at the end.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from valleys import _validate as check
from valleys.landscape.common import (
    Batches,
    LossFn,
    LossValue,
    batch_source,
    full_loss,
    offset_parameters,
    trainable_parameters,
)

__all__ = [
    "BUFFER_MODES",
    "NORMALIZATIONS",
    "Curve",
    "Surface",
    "interpolation",
    "loss_curve",
    "loss_surface",
    "random_direction",
]

NORMALIZATIONS = ("filter", "layer", "none")
BUFFER_MODES = ("nearest", "start", "end", "interpolate")


def _generator(seed: int | torch.Generator) -> torch.Generator:
    if isinstance(seed, torch.Generator):
        return seed
    return torch.Generator().manual_seed(check.count("seed", seed))


@torch.no_grad()
def random_direction(
    model: nn.Module,
    *,
    seed: int | torch.Generator = 0,
    params: Iterable[Tensor] | None = None,
    normalization: str = "filter",
    ignore_bias_bn: bool = True,
) -> dict[str, Tensor]:
    """A random direction ``{name: tensor}`` in the space of ``model``'s parameters.

    Entries are standard normal, drawn on the CPU from ``seed`` (an int, or a
    ``torch.Generator`` to draw several directions in turn) in ``named_parameters`` order, so
    a seed gives the same direction on every device. Each tensor ``d`` of a weight ``θ`` with
    two or more dimensions is then rescaled by ``normalization``:

    * ``"filter"`` (Li et al.): ``d[i] ← d[i] · ‖θ[i]‖ / ‖d[i]‖`` for every slice ``i`` along
      the first dimension;
    * ``"layer"``: ``d ← d · ‖θ‖ / ‖d‖`` for the whole tensor;
    * ``"none"``: left as drawn.

    One-dimensional parameters (biases, BatchNorm) get zeros with ``ignore_bias_bn`` (the
    default), else a copy of the parameter (Li et al.'s choice), except with ``"none"`` where
    they stay Gaussian. ``params`` restricts the direction to those parameters (default: all
    that require grad); the others are left out (a zero direction).
    """
    normalization = check.choice("normalization", normalization, NORMALIZATIONS)
    gen = _generator(seed)
    out = {}
    for name, p in trainable_parameters(model, params).items():
        d = torch.randn(p.shape, generator=gen, dtype=torch.float64)
        theta = p.detach().to(device="cpu", dtype=torch.float64)
        if normalization != "none":
            if p.dim() <= 1:
                d = torch.zeros_like(d) if ignore_bias_bn else theta.clone()
            elif normalization == "filter":
                dims = tuple(range(1, p.dim()))
                norms = torch.linalg.vector_norm(d, dim=dims, keepdim=True) + 1e-12
                d = d * (torch.linalg.vector_norm(theta, dim=dims, keepdim=True) / norms)
            else:
                d = d * (theta.norm() / (d.norm() + 1e-12))
        out[name] = d.to(device=p.device, dtype=p.dtype)
    return out


@dataclass
class Curve:
    """Loss (and accuracy) at the points ``alphas`` of a line."""

    alphas: np.ndarray
    loss: np.ndarray
    accuracy: np.ndarray | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain lists (for JSON)."""
        out: dict[str, Any] = {"alphas": self.alphas.tolist(), "loss": self.loss.tolist()}
        if self.accuracy is not None:
            out["accuracy"] = self.accuracy.tolist()
        return out


@dataclass
class Surface:
    """Loss (and accuracy) on a grid: ``loss[j, i]`` is at ``(alphas[i], betas[j])``, the
    layout ``matplotlib.contour(alphas, betas, loss)`` expects."""

    alphas: np.ndarray
    betas: np.ndarray
    loss: np.ndarray
    accuracy: np.ndarray | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain nested lists (for JSON)."""
        out: dict[str, Any] = {
            "alphas": self.alphas.tolist(),
            "betas": self.betas.tolist(),
            "loss": self.loss.tolist(),
        }
        if self.accuracy is not None:
            out["accuracy"] = self.accuracy.tolist()
        return out


def _grid(name: str, values: Sequence[float] | np.ndarray | Tensor) -> list[float]:
    if isinstance(values, Tensor):
        values = values.tolist()
    out = [check.real(f"{name} entry", v) for v in np.asarray(values, dtype=float).reshape(-1)]
    if not out:
        check.fail(name, [], "need at least one point")
    return out


def _check_direction(
    model: nn.Module, direction: Mapping[str, Tensor], what: str
) -> dict[str, Tensor]:
    named = dict(model.named_parameters())
    for name, d in direction.items():
        if name not in named:
            raise check.unknown(f"parameter name in {what}", name, named)
        if tuple(d.shape) != tuple(named[name].shape):
            check.fail(
                f"{what}[{name!r}]",
                tuple(d.shape),
                f"expected the parameter's shape {tuple(named[name].shape)}",
            )
    p0 = {n: named[n].detach() for n in direction}
    return p0


def _evaluate(
    points: Iterable[Callable[[], Mapping[str, Tensor]]],
    model: nn.Module,
    loss_fn: LossFn,
    batches: Batches,
    accuracy: bool,
    progress: Callable[[int], None] | None,
) -> tuple[np.ndarray, np.ndarray | None]:
    source = batch_source(batches)
    values: list[LossValue] = []
    with torch.no_grad():
        for k, params in enumerate(points, 1):
            values.append(full_loss(model, loss_fn, source, params(), accuracy=accuracy))
            if progress is not None:
                progress(k)
    loss = torch.stack([v.loss for v in values]).cpu().numpy()
    acc = None
    if accuracy:
        acc = torch.stack([v.accuracy for v in values]).cpu().numpy()  # type: ignore[misc]
    return loss, acc


def loss_curve(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Batches,
    direction: Mapping[str, Tensor],
    alphas: Sequence[float] | np.ndarray | Tensor,
    *,
    accuracy: bool = False,
    progress: Callable[[int], None] | None = None,
) -> Curve:
    """``f(θ + α d)`` for each ``α`` of ``alphas``: a :class:`Curve`.

    ``direction`` maps parameter names to tensors of their shapes (e.g. from
    :func:`random_direction`); parameters it leaves out stay at ``θ``. ``accuracy`` adds the
    accuracy (classifiers); ``progress(k)`` is called after the k-th point.
    """
    grid = _grid("alphas", alphas)
    base = _check_direction(model, direction, "direction")
    points = (lambda a=a: offset_parameters(base, (a, direction)) for a in grid)
    loss, acc = _evaluate(points, model, loss_fn, batches, accuracy, progress)
    return Curve(np.asarray(grid), loss, acc)


def loss_surface(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Batches,
    directions: tuple[Mapping[str, Tensor], Mapping[str, Tensor]],
    alphas: Sequence[float] | np.ndarray | Tensor,
    betas: Sequence[float] | np.ndarray | Tensor | None = None,
    *,
    accuracy: bool = False,
    progress: Callable[[int], None] | None = None,
) -> Surface:
    """``f(θ + α d1 + β d2)`` on the grid ``alphas × betas`` (``betas`` defaults to
    ``alphas``): a :class:`Surface` with ``loss[j, i]`` at ``(alphas[i], betas[j])``. Points
    are evaluated row by row (β outer); ``progress(k)`` is called after the k-th."""
    if len(directions) != 2:
        check.fail("directions", len(directions), "expected two directions")
    d1, d2 = directions
    a_grid = _grid("alphas", alphas)
    b_grid = a_grid if betas is None else _grid("betas", betas)
    base = _check_direction(model, d1, "directions[0]")
    base.update(_check_direction(model, d2, "directions[1]"))
    points = (
        lambda a=a, b=b: offset_parameters(base, (a, d1), (b, d2)) for b in b_grid for a in a_grid
    )
    loss, acc = _evaluate(points, model, loss_fn, batches, accuracy, progress)
    shape = (len(b_grid), len(a_grid))
    return Surface(
        np.asarray(a_grid),
        np.asarray(b_grid),
        loss.reshape(shape),
        None if acc is None else acc.reshape(shape),
    )


def _state_tensors(
    model: nn.Module, state: Mapping[str, Any] | None, what: str
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(parameters, buffers) of ``state`` (default: the model's own), checked against the
    model's names and shapes, on the model's devices and dtypes."""
    own_params = dict(model.named_parameters())
    own_buffers = dict(model.named_buffers())
    if state is None:
        return (
            {n: p.detach() for n, p in own_params.items()},
            {n: b for n, b in own_buffers.items()},
        )
    out: list[dict[str, Tensor]] = [{}, {}]
    for i, own in enumerate((own_params, own_buffers)):
        for name, ref in own.items():
            if name not in state:
                check.fail(what, f"missing {name!r}", "expected a state dict of this model")
            value = state[name]
            if not isinstance(value, Tensor) or tuple(value.shape) != tuple(ref.shape):
                shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                check.fail(f"{what}[{name!r}]", shape, f"expected shape {tuple(ref.shape)}")
            out[i][name] = value.detach().to(device=ref.device, dtype=ref.dtype)
    return out[0], out[1]


def interpolation(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Batches,
    start: Mapping[str, Any] | None,
    end: Mapping[str, Any],
    alphas: Sequence[float] | np.ndarray | Tensor,
    *,
    buffers: str = "nearest",
    accuracy: bool = False,
    progress: Callable[[int], None] | None = None,
) -> Curve:
    """``f((1 − α) θ_start + α θ_end)`` for each ``α`` of ``alphas`` (α outside [0, 1]
    extrapolates): a :class:`Curve`.

    ``start`` and ``end`` are state dicts of ``model`` (``start=None``: the model's current
    state). All parameters are interpolated; buffers (BatchNorm statistics) come from
    ``buffers``: ``"nearest"`` (``start`` for α ≤ 0.5, else ``end``), ``"start"``, ``"end"``
    or ``"interpolate"`` (floating-point buffers interpolated like the parameters, the others
    nearest).
    """
    buffers = check.choice("buffers", buffers, BUFFER_MODES)
    grid = _grid("alphas", alphas)
    p_a, b_a = _state_tensors(model, start, "start")
    p_b, b_b = _state_tensors(model, end, "end")
    delta = {n: p_b[n] - p_a[n] for n in p_a}

    def at(a: float) -> dict[str, Tensor]:
        params = offset_parameters(p_a, (a, delta))
        near = b_a if (buffers == "start" or (buffers != "end" and a <= 0.5)) else b_b
        for name, value in near.items():
            if buffers == "interpolate" and value.is_floating_point():
                value = torch.lerp(b_a[name], b_b[name], a)
            params[name] = value
        return params

    points = (lambda a=a: at(a) for a in grid)
    loss, acc = _evaluate(points, model, loss_fn, batches, accuracy, progress)
    return Curve(np.asarray(grid), loss, acc)
