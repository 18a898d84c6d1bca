"""Trace a curvature product once and split it into a per-point part and a per-product part.

:mod:`valleys.curvature` computes products ``v ↦ Cv`` (GGN, Hessian) whose work divides into
what depends only on the point (parameters, batch): the forward pass, the loss, the gradient,
the activations and masks that the derivatives need; and what is linear in ``v``: a
tangent pass and a backward pass. :class:`SplitGraph` traces the whole product once with
fake tensors (``make_fx``, no real computation), then cuts the graph in two:

* ``primal(primals) -> (outputs, saved)``: every node that does not depend on ``v``, run once
  per point (per SGN step). ``saved`` are the values the second part reads.
* ``tangent(saved, tangents) -> outputs``: the nodes that depend on ``v``, run per product.

This is what ``torch.func.linearize`` does per call, except that the trace is made once per
model and input signature rather than at every point (tracing costs tens of gradients), the
per-point part also yields the loss and gradient (no second forward), and products by zero
tangents (the inputs carry none) are removed before the cut, so that e.g. the first layer's
tangent is one matrix product, not two. Random operations (dropout masks) fall in the
per-point part: every product of one point uses the same masks.

Tracing with fake tensors fails on data-dependent Python control flow (``if x.sum() > 0``),
where a real trace would silently freeze one branch; the callers then fall back to eager
``torch.func`` products.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx as fx
from torch import Tensor
from torch.utils import _pytree as pytree

aten = torch.ops.aten
prims = torch.ops.prims

__all__ = ["SplitGraph", "UnsplittableError"]


class UnsplittableError(RuntimeError):
    """The traced product cannot be split safely (the per-product part would write into
    values shared between products)."""


def _overloads(*packets: Any) -> frozenset:
    out = set()
    for packet in packets:
        if isinstance(packet, torch._ops.OpOverload):
            out.add(packet)
            continue
        for name in packet.overloads():
            out.add(getattr(packet, name))
    return frozenset(out)


# Ops that create zeros.
_ZERO_SOURCES = _overloads(aten._efficientzerotensor, aten.zeros, aten.zeros_like, aten.new_zeros)
# Ops whose result is zero when their first argument is: views, copies, casts, and maps that
# are linear in the first argument (gradients through activations, pooling, gathers).
_ZERO_FIRST = _overloads(
    aten.alias,
    aten.detach,
    aten.view.default,
    aten._unsafe_view,
    aten.reshape,
    aten.expand,
    aten.t,
    aten.transpose,
    aten.permute,
    aten.unsqueeze,
    aten.squeeze,
    aten.clone,
    aten._to_copy,
    aten.contiguous,
    aten.slice,
    aten.select,
    aten.neg,
    aten.sum,
    aten.mean,
    aten.threshold_backward,
    aten.gather,
    aten.div,
    aten.mul.Scalar,
    aten.max_pool2d_with_indices_backward,
    aten.avg_pool2d_backward,
    aten.native_dropout_backward,
    prims.convert_element_type,
)
# Ops that are zero when either of their first two arguments is (bilinear maps).
_ZERO_EITHER = _overloads(aten.mm, aten.bmm, aten.mul.Tensor, prims.mul)
_ADDS = _overloads(aten.add.Tensor, prims.add)
_SUBS = _overloads(aten.sub.Tensor)


def _written_args(node: fx.Node) -> list[fx.Node]:
    """The argument nodes that ``node`` writes into (in-place and ``out=`` operations)."""
    target = node.target
    schema = getattr(target, "_schema", None)
    if schema is None:
        return []
    out = []
    for i, arg in enumerate(schema.arguments):
        info = arg.alias_info
        if info is None or not info.is_write:
            continue
        value = node.args[i] if i < len(node.args) else node.kwargs.get(arg.name)
        out.extend(a for a in pytree.tree_leaves(value) if isinstance(a, fx.Node))
    return out


def _same_layout(a: Any, b: fx.Node) -> bool:
    va, vb = getattr(a, "meta", {}).get("val"), b.meta.get("val")
    if not isinstance(va, Tensor) or not isinstance(vb, Tensor):
        return False
    return va.shape == vb.shape and va.dtype == vb.dtype and va.stride() == vb.stride()


def _replace_by(graph: fx.Graph, node: fx.Node, other: Any) -> None:
    """Replace ``node`` (``other + 0``) by ``other``, broadcast to its shape if need be."""
    if _same_layout(other, node):
        node.replace_all_uses_with(other)
        return
    vo, vn = getattr(other, "meta", {}).get("val"), node.meta.get("val")
    if not isinstance(vo, Tensor) or not isinstance(vn, Tensor) or vo.dtype != vn.dtype:
        return
    try:
        torch.broadcast_shapes(vo.shape, vn.shape)
    except RuntimeError:
        return
    if torch.broadcast_shapes(vo.shape, vn.shape) != vn.shape:
        return
    with graph.inserting_before(node):
        expanded = graph.call_function(aten.expand.default, (other, list(vn.shape)))
    expanded.meta["val"] = vo.expand(vn.shape)
    node.replace_all_uses_with(expanded)


_NO_OPS = _overloads(aten.alias.default, aten.detach.default)
_RESHAPES = _overloads(aten.view.default, aten._unsafe_view.default, aten.reshape.default)


def simplify(graph: fx.Graph) -> None:
    """Remove operations that do nothing on values nobody writes into: ``alias``,
    ``detach`` (the graphs run without autograd), ``t(t(x))`` and reshapes to the same
    layout. Each costs a Python call per product."""
    written = {a for n in graph.nodes for a in _written_args(n)}
    for node in list(graph.nodes):
        if node.op != "call_function" or node in written:
            continue
        arg = node.args[0] if node.args else None
        if not isinstance(arg, fx.Node) or arg in written:
            continue
        if node.target in _NO_OPS or (node.target in _RESHAPES and _same_layout(arg, node)):
            node.replace_all_uses_with(arg)
        elif node.target is aten.t.default and arg.target is aten.t.default:
            inner = arg.args[0]
            if isinstance(inner, fx.Node) and inner not in written:
                node.replace_all_uses_with(inner)
    graph.eliminate_dead_code()


def drop_zeros(graph: fx.Graph) -> None:
    """Remove computations on tensors known to be zero (zero tangents), in place."""
    written = {a for n in graph.nodes for a in _written_args(n)}
    zero: set[fx.Node] = set()
    for node in list(graph.nodes):
        if node.op != "call_function" or node in written:
            continue
        target, args = node.target, node.args
        if (
            target in _ZERO_SOURCES
            or (target in _ZERO_FIRST and args and args[0] in zero)
            or (target in _ZERO_EITHER and any(a in zero for a in args[:2]))
        ):
            zero.add(node)
        elif target is aten.convolution.default and (args[0] in zero or args[1] in zero):
            if args[2] is None or args[2] in zero:
                zero.add(node)
        elif (target in _ADDS or target in _SUBS) and len(args) >= 2:
            a, b = args[0], args[1]
            alpha = node.kwargs.get("alpha", 1)
            if a in zero and b in zero:
                zero.add(node)
            elif b in zero:
                _replace_by(graph, node, a)
            elif a in zero and target in _ADDS and alpha == 1:
                _replace_by(graph, node, b)
    for node in zero:
        if not node.users or node.target in _ZERO_SOURCES:
            continue
        val = node.meta["val"]
        with graph.inserting_before(node):
            fresh = graph.call_function(
                aten.zeros.default,
                (list(val.shape),),
                {"dtype": val.dtype, "device": val.device},
            )
        fresh.meta["val"] = val
        node.replace_all_uses_with(fresh)
    graph.eliminate_dead_code()


class SplitGraph:
    """``fn(primals, tangents) -> (primal_outputs, tangent_outputs)`` traced once and split.

    ``fn`` takes two lists of tensors and returns two lists of tensors; the first list of
    outputs must not depend on ``tangents`` and the second must be linear in them. The
    example arguments fix the signature (shapes, dtypes, devices); call :meth:`primal`
    once per point and :meth:`tangent` per product, with arguments of that signature.
    """

    def __init__(
        self,
        fn: Callable[[list[Tensor], list[Tensor]], tuple[list[Tensor], list[Tensor]]],
        primals: Sequence[Tensor],
        tangents: Sequence[Tensor],
    ) -> None:
        from torch.fx.experimental.proxy_tensor import make_fx

        count: list[int] = []

        def flat(ps: list[Tensor], ts: list[Tensor]) -> list[Tensor]:
            a, b = fn(ps, ts)
            count.append(len(a))
            return [*a, *b]

        traced = make_fx(flat, tracing_mode="fake")(list(primals), list(tangents))
        graph = traced.graph
        drop_zeros(graph)
        simplify(graph)
        placeholders = [n for n in graph.nodes if n.op == "placeholder"]
        n_primal = len(primals)
        tangent_in = placeholders[n_primal:]
        output = next(n for n in graph.nodes if n.op == "output")
        outs = list(pytree.tree_leaves(output.args[0]))
        first, second = outs[: count[0]], outs[count[0] :]
        self.num_outputs = (len(first), len(second))

        dep: set[fx.Node] = set(tangent_in)
        for node in graph.nodes:
            if node.op != "placeholder" and any(a in dep for a in node.all_input_nodes):
                dep.add(node)
        dep.discard(output)
        if any(isinstance(n, fx.Node) and n in dep for n in first):
            raise UnsplittableError("a per-point output depends on the tangents")
        for node in dep:
            if any(a not in dep for a in _written_args(node)):
                raise UnsplittableError(
                    f"the per-product part writes into a shared value ({node.target})"
                )

        saved: list[fx.Node] = []
        seen: set[fx.Node] = set()

        def save(node: fx.Node) -> None:
            if node not in seen:
                seen.add(node)
                saved.append(node)

        for node in graph.nodes:
            if node in dep and node.op != "placeholder":
                for a in node.all_input_nodes:
                    if a not in dep:
                        save(a)
        for node in second:
            if isinstance(node, fx.Node) and node not in dep:
                save(node)

        g1 = fx.Graph()
        env1: dict[fx.Node, fx.Node] = {}
        for node in graph.nodes:
            if node in dep or node.op == "output":
                continue
            env1[node] = g1.node_copy(node, lambda a: env1[a])
        g1.output(([env1[n] for n in first], [env1[n] for n in saved]))
        g1.eliminate_dead_code()

        g2 = fx.Graph()
        env2: dict[fx.Node, fx.Node] = {}
        for i, node in enumerate(saved):
            env2[node] = g2.placeholder(f"saved_{i}")
        for node in tangent_in:
            env2[node] = g2.placeholder(node.name)
        for node in graph.nodes:
            if node in dep and node.op != "placeholder":
                env2[node] = g2.node_copy(node, lambda a: env2[a])
        g2.output([env2[n] for n in second])
        g2.eliminate_dead_code()

        self._primal = fx.GraphModule(traced, g1)
        self._tangent = fx.GraphModule(traced, g2)
        self.num_saved = len(saved)

    def primal(self, primals: Sequence[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """The per-point outputs and the values saved for :meth:`tangent`."""
        outputs, saved = self._primal(*primals)
        return list(outputs), list(saved)

    def tangent(self, saved: Sequence[Tensor], tangents: Sequence[Tensor]) -> list[Tensor]:
        """The per-product outputs for ``tangents`` at the point ``saved`` came from."""
        return list(self._tangent(*saved, *tangents))
