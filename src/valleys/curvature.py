r"""Curvature-vector products of a model's loss on a batch: GGN and Hessian, as matvecs.

For a model ``z = f(x; θ)`` (outputs of shape ``(B, …)``), a loss ``ℓ(z, y)`` reduced by its
mean, ``J = ∂z/∂θ`` and ``H_ℓ = ∂²ℓ/∂z²``:

* :func:`ggn_fn` returns ``v ↦ G v = Jᵀ H_ℓ J v``, the generalised Gauss–Newton product
  (SGN's curvature; positive semi-definite for convex losses);
* :func:`hvp_fn` returns ``v ↦ H v = ∇²_θ ℓ(f(x; θ), y) v``, the Hessian product.

Both return a :class:`Products` object: callable on a vector (a sequence of tensors shaped
like the parameters, in the order of ``params``), holding the loss, the gradient and the
outputs at the point as by-products of the same forward pass, and able to evaluate the loss
of the same batch at other parameter values (:meth:`Products.loss_at`). The matvecs plug into
:func:`valleys.linalg.cg` and :func:`valleys.linalg.lanczos`; :func:`averaged` turns a
factory into a matvec over a whole dataset (per-sample-weighted mean over batches).

Losses
------
``loss`` is ``"cross_entropy"`` (softmax cross-entropy over class logits ``(B, C)`` with
integer labels; ``H_ℓ u = (p ⊙ u − p <p, u>)/B`` per sample, ``p = softmax(z)``), ``"mse"``
(``mean((z − y)²)`` over all ``N`` entries, ``H_ℓ = 2/N·I``; ``y`` is reshaped to ``z``'s shape
when only the shapes differ, e.g. ``(B, 1)`` against ``(B,)``), the equivalent
``nn.CrossEntropyLoss()``/``nn.MSELoss()`` modules and ``F.cross_entropy``/``F.mse_loss``
functions (closed forms), or any other callable ``loss(z, y) -> scalar``, whose output-space
derivatives then come from autograd (:func:`output_loss`).

How the products are computed (``method``)
------------------------------------------
* ``"traced"``: the whole product (forward with forward-mode tangents, loss, ``H_ℓ``, the
  two backward passes) is traced once per model, input signature and train/eval modes with
  fake tensors, then split (:mod:`valleys._linearize`) into a part run once per factory call
  (forward, loss, gradient, and what the derivatives need) and the part linear in ``v``, run
  per product. A GGN product then costs about one gradient (a tangent pass and a backward
  pass on stored activations, without recomputing the forward), and the factory call about
  one gradient too. The trace is cached per model (:func:`clear_cache` after changing module
  attributes that the trace froze, such as a dropout probability or BatchNorm momentum); it
  takes about 0.1–0.3 s for small networks and about 10 s for a ResNet-18 on a CPU, once per
  input signature (a smaller last batch is a second signature). The saved values take about
  the memory of autograd's saved activations.
* ``"jvp"`` (GGN): ``torch.func.vjp`` once per factory call (giving loss, gradient and the
  reverse-mode function), then one ``torch.func.jvp`` per product (recomputing the forward)
  followed by the cached VJP. ``"linearize"`` (GGN): ``torch.func.linearize`` once per factory
  call, then its linear function per product; it re-traces at every call (tens of gradients).
* ``"reverse"`` (Hessian): the gradient with ``create_graph=True`` once, then one
  double-backward per product.
* ``"auto"`` (default): ``"traced"``, falling back with a warning to ``"jvp"`` (GGN) or
  ``"reverse"`` (Hessian) when the model cannot be traced (data-dependent Python control
  flow, ``.item()`` in ``forward``, non-tensor outputs).

Mixed precision
---------------
A factory called inside ``torch.autocast`` fixes that precision for the whole object: its
forward passes (the trace, every product, :meth:`Products.loss_at`) run under autocast to
the same dtype wherever they are later called, and a factory called outside autocast runs
them in the model's precision even inside an autocast region (the trace cache keys on the
precision). The loss and its output-space derivatives ``∂ℓ/∂z``, ``H_ℓ u`` are computed in
float32 with autocast off; ``grad``, the products and the loss come back in the
parameters' dtype (float32 master values for CG and line searches).

fp16 needs loss scaling (``ggn_fn(..., loss_scale=s)``). Scaling the loss by ``s`` scales
``∂ℓ/∂z`` and ``H_ℓ`` by ``s`` and leaves ``J`` alone: ``Jᵀ (s H_ℓ) J v = s G v``, linear in
``s`` only through ``H_ℓ``. So the scale enters the backward vectors alone, ``s ∂ℓ/∂z`` and
``s w`` with ``w = H_ℓ J v`` (entries ``∝ 1/B`` that an fp16 backward pass would flush to
zero), never the forward tangent ``J v`` (which it could overflow). As ``w``'s size depends
on ``v``, it is first moved by a power of two into the binade of ``∂ℓ/∂z``, so that one
scale, tuned by the caller on overflows, suits the gradient and every product; ``v`` is
likewise moved so that its max-norm lies in [1/2, 1) before the tangent pass. The shifts and
``s`` are divided out of the results: with a power-of-two ``s`` nothing is rounded beyond
the unscaled computation (float32 without autocast: bit-identical). An overflow shows as
inf/NaN in the gradient or the product whose pass overflowed; the caller checks.

BatchNorm and dropout
---------------------
The products are those of the function the model computes in its current mode; nothing here
switches modes. In train mode BatchNorm normalises with the batch statistics, which depend
on θ and are differentiated through. Running statistics are never updated by the products or
by :meth:`Products.loss_at`; with ``update_buffers=True`` the one forward pass of the factory
call updates them exactly once (what a training step does; SGN uses this), otherwise the
buffers stay as they were (the eager methods spend one more forward pass on that update,
since torch.func transforms refuse in-place buffer updates). Dropout (any random operation)
draws its masks once per factory
call: the torch RNG state (CPU, and the model's CUDA device) is recorded before the first
forward pass and restored before every later one, so every product and every
:meth:`Products.loss_at` of the call uses the same masks, and the RNG afterwards stands where
one forward pass leaves it.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import partial
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor, nn
from torch.func import functional_call

from valleys import _validate as check
from valleys._linearize import SplitGraph
from valleys._objective import (
    CrossEntropy,
    MeanSquaredError,
    Objective,
    OutputLoss,
    output_loss,
    trainable_parameters,
)
from valleys._precision import binade, master, scale_tensor, scaled_seed, unit_tangent, unseed

__all__ = [
    "CrossEntropy",
    "MeanSquaredError",
    "OutputLoss",
    "Products",
    "averaged",
    "clear_cache",
    "ggn_fn",
    "hvp_fn",
    "output_loss",
    "trainable_parameters",
]

GGN_METHODS = ("auto", "traced", "jvp", "linearize")
HVP_METHODS = ("auto", "traced", "reverse")


class Products:
    """A curvature matrix of one batch objective at one point, as a matvec.

    Calling it on ``v`` (tensors shaped like the parameters, in the order of ``params``)
    returns the product as a list of tensors. Attributes, from the factory call's forward
    pass: ``loss`` (0-d, detached), ``grad`` (list of tensors), ``outputs`` (the model's
    outputs ``z``), ``names`` (parameter names), ``params`` (the point), ``method`` (the method
    used) and ``products`` (number of products so far). The products are those of the point
    as it was at the factory call as long as the parameter tensors are not changed in place
    (the stored values may be views of them): build a new one after an update.

    ``reduce`` (data parallelism, e.g. :func:`valleys.distributed.mean_reducer`): each process
    holds its part of the batch, and ``loss`` with ``grad``, every product and every
    :meth:`loss_at` are reduced by it (one collective each), so that they are those of the
    global batch on every process (``outputs`` stay this process's).
    """

    def __init__(
        self,
        objective: Objective,
        loss: Tensor,
        grad: Sequence[Tensor],
        outputs: Tensor,
        product: Callable[[list[Tensor]], list[Tensor]],
        method: str,
        reduce: Callable[[Sequence[Tensor]], list[Tensor]] | None = None,
    ) -> None:
        self._objective = objective
        self._product = product
        self._reduce = reduce
        if reduce is not None:
            *grad, loss = reduce([*grad, loss])
        self.loss = loss
        self.grad = list(grad)
        self.outputs = outputs
        self.names = objective.names
        self.params = objective.values
        self.method = method
        self.products = 0

    def __call__(self, v: Sequence[Tensor]) -> list[Tensor]:
        if len(v) != len(self.params):
            raise ValueError(f"Invalid vector: {len(v)} tensors for {len(self.params)} parameters")
        self.products += 1
        with torch.no_grad():
            out = self._product(list(v))
            return out if self._reduce is None else self._reduce(out)

    def loss_at(self, params: Sequence[Tensor]) -> Tensor:
        """The loss of the same batch at parameter values ``params`` (same order), with the
        same dropout masks and without touching BatchNorm buffers; 0-d, no graph."""
        value = self._objective.loss_at(params)
        return value if self._reduce is None else self._reduce([value])[0]


# ---------------------------------------------------------------------------------------------
# traced products


_CACHE: weakref.WeakKeyDictionary[nn.Module, dict[Any, SplitGraph | None]] = (
    weakref.WeakKeyDictionary()
)


def clear_cache(model: nn.Module | None = None) -> None:
    """Forget the traced products of ``model`` (of every model if ``None``)."""
    if model is None:
        _CACHE.clear()
    else:
        _CACHE.pop(model, None)


def _signature(t: Tensor) -> tuple:
    return (tuple(t.shape), t.dtype, t.device)


def _key(kind: str, obj: Objective) -> tuple:
    return (
        kind,
        obj.loss.key,
        tuple(obj.names),
        tuple(_signature(v) for v in obj.values),
        tuple((n, _signature(t)) for n, t in obj.constants(True).items()),
        _signature(obj.x),
        _signature(obj.y),
        tuple(m.training for m in obj.model.modules()),
        obj.precision,
    )


def _zeros_for(grads: Sequence[Tensor | None], like: Sequence[Tensor]) -> list[Tensor]:
    return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, like, strict=True)]


def _ggn_trace(obj: Objective, scaled: bool = False) -> Callable:
    n, const_names = len(obj.names), list(obj.constants(True))
    k = 3 if scaled else 2  # x, y (and the loss scale) after the constants

    def fn(primals: list[Tensor], tangents: list[Tensor]):
        ps, consts, (x, y, *scale) = primals[:n], primals[n:-k], primals[-k:]
        leaves = [p.detach().requires_grad_(True) for p in ps]
        with torch.enable_grad():
            with fwAD.dual_level(), obj.autocast():
                duals = [fwAD.make_dual(p, t) for p, t in zip(leaves, tangents, strict=True)]
                mapping = {
                    **dict(zip(obj.names, duals, strict=True)),
                    **dict(zip(const_names, consts, strict=True)),
                }
                z, u = fwAD.unpack_dual(functional_call(obj.model, mapping, (x,)))
            zd = z.detach()
            zm = master(zd)
            u = torch.zeros_like(zm) if u is None else master(u)
            value, dz = obj.loss.value_and_grad(zm, y)
            w = obj.loss.hvp(zm, y, u)
            if scaled:  # the loss scale enters the two backward passes only (see ggn_fn)
                w, shift = scaled_seed(w, binade(dz), scale[0])
                dz = dz * scale[0]
            grads = torch.autograd.grad(z, leaves, dz, retain_graph=True, allow_unused=True)
            prods = torch.autograd.grad(z, leaves, w, allow_unused=True)
        grads, prods = _zeros_for(grads, ps), _zeros_for(prods, ps)
        if scaled:
            grads, prods = [g / scale[0] for g in grads], unseed(prods, shift, scale[0])
        return [value, zd, *grads], prods

    return fn


def _hvp_trace(obj: Objective) -> Callable:
    n, const_names = len(obj.names), list(obj.constants(True))

    def fn(primals: list[Tensor], tangents: list[Tensor]):
        ps, consts = primals[:n], primals[n:-2]
        x, y = primals[-2], primals[-1]
        leaves = [p.detach().requires_grad_(True) for p in ps]
        with torch.enable_grad():
            mapping = {
                **dict(zip(obj.names, leaves, strict=True)),
                **dict(zip(const_names, consts, strict=True)),
            }
            with obj.autocast():
                z = functional_call(obj.model, mapping, (x,))
            value = obj.loss.value(master(z), y)
            grads = _zeros_for(
                torch.autograd.grad(value, leaves, create_graph=True, allow_unused=True), ps
            )
            live = [i for i, g in enumerate(grads) if g.requires_grad]
            prods: list[Tensor | None] = [None] * n
            if live:
                out = torch.autograd.grad(
                    [grads[i] for i in live],
                    leaves,
                    [tangents[i] for i in live],
                    allow_unused=True,
                )
                prods = list(out)
        detached = [g.detach() for g in grads]
        return [value.detach(), z.detach(), *detached], _zeros_for(prods, ps)

    return fn


def _traced(
    kind: str,
    obj: Objective,
    update_buffers: bool,
    strict: bool,
    reduce: Any = None,
    loss_scale: float | None = None,
) -> Products | None:
    """Products from the cached split trace; ``None`` if the model cannot be traced (and
    ``strict`` is off). The trace holds the autocast casts of the objective's precision; it
    is made and run with autocast off, so that an enclosing region cannot cast twice."""
    graphs = _CACHE.setdefault(obj.model, {})
    scaled = loss_scale is not None
    key = _key(f"{kind}-scaled" if scaled else kind, obj)
    extra = [scale_tensor(loss_scale, obj.device)] if scaled else []
    if key not in graphs:
        make = partial(_ggn_trace, scaled=scaled) if kind == "ggn" else _hvp_trace
        examples = [*obj.values, *obj.constants(False).values(), obj.x, obj.y, *extra]
        tangents = [torch.zeros_like(v) for v in obj.values]
        try:
            with obj.rng.preserved(), obj.exact():
                graphs[key] = SplitGraph(make(obj), examples, tangents)
        except Exception as err:
            if strict:
                raise
            warnings.warn(
                f"valleys.curvature: cannot trace {type(obj.model).__name__} for {kind} "
                f"products ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
                "using the eager torch.func products instead",
                RuntimeWarning,
                stacklevel=3,
            )
            graphs[key] = None
    graph = graphs[key]
    if graph is None:
        return None
    primals = [*obj.values, *obj.constants(update_buffers).values(), obj.x, obj.y, *extra]
    with torch.no_grad(), obj.rng.first(), obj.exact():
        outputs, saved = graph.primal(primals)
    n = len(obj.values)
    loss, z, grad = outputs[0], outputs[1], outputs[2 : 2 + n]

    def product(v: list[Tensor]) -> list[Tensor]:
        with obj.exact():
            return graph.tangent(saved, v)

    return Products(
        obj, loss, grad, z, unit_tangent(product) if scaled else product, "traced", reduce
    )


# ---------------------------------------------------------------------------------------------
# eager products


def _ggn_eager(
    obj: Objective,
    method: str,
    update_buffers: bool,
    reduce: Any = None,
    loss_scale: float | None = None,
) -> Products:
    values = tuple(obj.values)

    def f(*ps: Tensor) -> Tensor:
        return obj.call(ps)

    with obj.rng.first():
        z, vjp_fn = torch.func.vjp(f, *values)
    if update_buffers and obj.tracks_statistics:  # one more forward pass, for the statistics
        with torch.no_grad(), obj.rng.replay():
            obj.call(values, update_buffers=True)
    z = z.detach()
    zm = master(z)
    with obj.exact():
        value, dz = obj.loss.value_and_grad(zm, obj.y)
    scale = None if loss_scale is None else scale_tensor(loss_scale, obj.device)
    with torch.no_grad():
        if scale is None:
            grad = list(vjp_fn(dz))
        else:  # the loss scale enters the backward passes only (see ggn_fn)
            like = binade(dz)
            grad = [g / scale for g in vjp_fn(dz * scale)]
    if method == "linearize":
        with obj.rng.replay():
            _, linear = torch.func.linearize(f, *values)

        def tangent(v: list[Tensor]) -> Tensor:
            with obj.rng.replay():  # the graph may redraw dropout masks: the same ones
                return linear(*v)

    else:

        def tangent(v: list[Tensor]) -> Tensor:
            with obj.rng.replay():
                return torch.func.jvp(f, values, tuple(v))[1]

    def product(v: list[Tensor]) -> list[Tensor]:
        u = master(tangent(v))
        with obj.exact():
            w = obj.loss.hvp(zm, obj.y, u)
            if scale is None:
                return list(vjp_fn(w))
            w, shift = scaled_seed(w, like, scale)
            return unseed(vjp_fn(w), shift, scale)

    if scale is not None:
        product = unit_tangent(product)
    return Products(obj, value.detach(), grad, z, product, method, reduce)


def _hvp_eager(obj: Objective, update_buffers: bool, reduce: Any = None) -> Products:
    values = tuple(obj.values)
    leaves = [v.detach().requires_grad_(True) for v in values]
    with torch.enable_grad(), obj.rng.first():
        z = obj.call(leaves, update_buffers=update_buffers)
        value = obj.loss.value(master(z), obj.y)
        grads = _zeros_for(
            torch.autograd.grad(value, leaves, create_graph=True, allow_unused=True), values
        )
    live = [i for i, g in enumerate(grads) if g.requires_grad]

    def product(v: list[Tensor]) -> list[Tensor]:
        if not live:
            return [torch.zeros_like(p) for p in values]
        with torch.enable_grad():
            out = torch.autograd.grad(
                [grads[i] for i in live],
                leaves,
                [v[i] for i in live],
                retain_graph=True,
                allow_unused=True,
            )
        return _zeros_for(out, values)

    return Products(
        obj,
        value.detach(),
        [g.detach() for g in grads],
        z.detach(),
        product,
        "reverse",
        reduce,
    )


# ---------------------------------------------------------------------------------------------
# factories


def ggn_fn(
    model: nn.Module,
    loss: Any,
    inputs: Tensor,
    targets: Tensor,
    *,
    params: Mapping[str, Tensor] | None = None,
    method: str = "auto",
    update_buffers: bool = False,
    reduce: Callable[[Sequence[Tensor]], list[Tensor]] | None = None,
    loss_scale: float | None = None,
) -> Products:
    r"""The GGN products ``v ↦ Jᵀ H_ℓ J v`` of ``loss(model(inputs), targets)`` at ``params``.

    ``params`` maps parameter names to the values at which to linearise (default: the
    model's trainable parameters as they are); other parameters and buffers keep the
    model's values. ``method``: see the module docstring (``"auto"``, ``"traced"``, ``"jvp"``,
    ``"linearize"``). ``update_buffers``: let this call's forward pass update BatchNorm
    running statistics once. ``reduce``: average loss, gradient, products and trial losses
    over processes holding parts of the batch (see :class:`Products`). The call costs one
    forward and one backward pass (loss and gradient come with it); each product about one
    more gradient's worth with ``"traced"``.

    ``loss_scale`` (fp16, see "Mixed precision" in the module docstring): the backward passes
    carry ``s·∂ℓ/∂z`` and ``s·H_ℓ J v``; ``grad`` and the products come back divided by
    ``s``, with inf/NaN wherever a pass overflowed (the caller checks).
    """
    check.choice("method", method, GGN_METHODS)
    obj = Objective(model, loss, inputs, targets, params)
    if loss_scale is not None:
        check.positive("loss_scale", loss_scale)
    if method in ("auto", "traced"):
        out = _traced(
            "ggn",
            obj,
            update_buffers,
            strict=method == "traced",
            reduce=reduce,
            loss_scale=loss_scale,
        )
        if out is not None:
            return out
        method = "jvp"
    return _ggn_eager(obj, method, update_buffers, reduce, loss_scale)


def hvp_fn(
    model: nn.Module,
    loss: Any,
    inputs: Tensor,
    targets: Tensor,
    *,
    params: Mapping[str, Tensor] | None = None,
    method: str = "auto",
    update_buffers: bool = False,
    reduce: Callable[[Sequence[Tensor]], list[Tensor]] | None = None,
) -> Products:
    r"""The Hessian products ``v ↦ ∇²_θ ℓ v`` of ``loss(model(inputs), targets)`` at
    ``params``; arguments as :func:`ggn_fn` (``method``: ``"auto"``, ``"traced"``,
    ``"reverse"``)."""
    check.choice("method", method, HVP_METHODS)
    obj = Objective(model, loss, inputs, targets, params)
    if method in ("auto", "traced"):
        out = _traced("hvp", obj, update_buffers, strict=method == "traced", reduce=reduce)
        if out is not None:
            return out
        method = "reverse"
    return _hvp_eager(obj, update_buffers, reduce)


def averaged(
    factory: Callable[[Tensor, Tensor], Callable[[Sequence[Tensor]], Sequence[Tensor]]],
    batches: Iterable[tuple[Tensor, Tensor]] | Callable[[], Iterable[tuple[Tensor, Tensor]]],
) -> Callable[[Sequence[Tensor]], list[Tensor]]:
    r"""A matvec over a whole dataset: ``v ↦ Σ_b n_b C_b v / Σ_b n_b``.

    ``factory(inputs, targets)`` builds the products of one batch (e.g.
    ``lambda x, y: hvp_fn(model, "cross_entropy", x, y)``); ``C_b`` is its matrix and ``n_b``
    the batch's number of samples (``len(targets)``), so that with mean-reduced batch losses
    the result is the product with the curvature of the per-sample mean loss over the dataset,
    a smaller last batch included. ``batches`` is a re-iterable collection of
    ``(inputs, targets)`` pairs or a callable returning a fresh iterable; it is iterated once
    per product, rebuilding each batch's factory (only one batch's activations are held at a
    time). Sums are kept in the vectors' dtype.
    """

    def matvec(v: Sequence[Tensor]) -> list[Tensor]:
        source = batches() if callable(batches) else batches
        total: list[Tensor] | None = None
        count = 0
        for x, y in source:
            n = int(y.shape[0])
            out = list(factory(x, y)(v))
            if total is None:
                total = [o * n for o in out]
            else:
                torch._foreach_add_(total, out, alpha=n)
            count += n
        if total is None:
            raise ValueError("Invalid batches: empty (the dataset has no batch)")
        return [t / count for t in total]

    return matvec
