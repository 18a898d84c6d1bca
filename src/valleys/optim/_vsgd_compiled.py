"""VSGD's step compiled with ``torch.compile``: one fused loop per (flattened) tensor, for
``VSGD(implementation="compiled")``. Falls back to the foreach kernels where it cannot apply.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from valleys.optim._vsgd_kernels import _Constants, _foreach_update


def _fused_update(p: Tensor, g: Tensor, mug: Tensor, bg: Tensor, bhg: Tensor, sc: Any) -> None:
    """One step for t ≥ 2 on 1-D tensors, for ``torch.compile``, which turns it into a single
    loop that reads p, ĝ, μ, bg, bhg once and writes p, μ, bg, bhg once.

    ``sc`` holds the scalars (lr, 1 − lr·wd, 1/(2a), 2γ, 2K_gγ, eps, ρ1, ρ2): a 1-D float64 CPU
    tensor or a tuple of floats. They enter only through tensor arithmetic (no ``alpha=`` or
    ``weight=`` arguments), so dynamo keeps them symbolic instead of compiling a graph for
    every new ρ. The algebra uses two divisions instead of four, since a cancels in
    s_ĝ/(s_g + s_ĝ) = bhg/(bg + bhg) = β1 and σ² = s_g s_ĝ/(s_g + s_ĝ) = bg·β1/(2a): the
    results differ from the reference by rounding only.
    """
    lr, decay, inv_pa2, prior_g, prior_hg, eps, rho1, rho2 = (sc[i] for i in range(8))
    w = 1.0 / (bg + bhg)
    beta = bhg * w
    mu = g * (bg * w) + mug * beta
    var = bg * beta * inv_pa2
    d_g = mu - mug
    d_hg = mu - g
    bg.copy_(bg + rho1 * (var + prior_g + d_g * d_g - bg))
    bhg.copy_(bhg + rho2 * (var + prior_hg + d_hg * d_hg - bhg))
    mug.copy_(mu)
    p.copy_(p * decay - lr * (mu / (torch.sqrt(var + mu * mu) + eps)))


_compiled: Callable[..., None] | None = None
_compile_error: str | None = None

# Below this many elements a tensor shares one compiled call with the other small tensors of
# its bucket, through copies into concatenated buffers: a call costs ~30 µs of Python, as much
# as moving ~20k elements through memory three times over.
_BATCH_BELOW = 16384


def _get_compiled() -> Callable[..., None]:
    global _compiled
    if _compiled is None:
        _compiled = torch.compile(_fused_update, dynamic=True, fullgraph=True)
    return _compiled


def _disable_compiled(err: Exception) -> None:
    """Record that compiling failed (for the whole process) and warn once."""
    global _compile_error
    _compile_error = f"{type(err).__name__}: {err}".strip().splitlines()[0]
    warnings.warn(
        f"VSGD(implementation='compiled'): torch.compile failed ({_compile_error}); "
        "using implementation='foreach' instead",
        RuntimeWarning,
        stacklevel=7,
    )


def _is_dense(t: Tensor) -> bool:
    """Whether ``t`` covers a gap-free block of its storage with no element twice (contiguous,
    channels-last or any other permutation of a contiguous layout)."""
    dims = sorted((s, n) for s, n in zip(t.stride(), t.shape, strict=True) if n != 1)
    expected = 1
    for stride, size in dims:
        if stride != expected:
            return False
        expected *= size
    return True


def _flat(t: Tensor) -> Tensor:
    """A 1-D alias of a dense tensor's storage block, in memory order.

    Built with ``set_`` rather than ``view``, so that it is not a view: dynamo would guard on
    the shape of a view's base and compile one graph per parameter rank.
    """
    return torch.empty(0, dtype=t.dtype, device=t.device).set_(
        t.untyped_storage(), t.storage_offset(), (t.numel(),), (1,)
    )


def _aliases(p: Tensor, mug: Tensor, bg: Tensor, bhg: Tensor) -> tuple[Tensor, ...] | None:
    """1-D aliases of p, mug, bg, bhg in memory order, or None where the compiled path cannot
    take the tensor (empty, not a dense block, or state laid out unlike p)."""
    layout = p.stride()
    if p.numel() == 0 or not _is_dense(p) or any(s.stride() != layout for s in (mug, bg, bhg)):
        return None
    return tuple(_flat(x) for x in (p, mug, bg, bhg))


@dataclass
class _Batch:
    """Concatenated copies of the small tensors of one bucket, kept from step to step."""

    key: tuple  # the members' alias keys the buffers were built for
    targets: tuple[list[Tensor], ...]  # 1-D aliases of p, mug, bg, bhg of each member
    buffers: tuple[Tensor, ...]  # p, ĝ, mug, bg, bhg concatenated
    pieces: tuple[list[Tensor], ...]  # the p, mug, bg, bhg buffers split back per member

    @classmethod
    def build(cls, key: tuple, flats: list[tuple[Tensor, ...]]) -> _Batch:
        targets = tuple(list(x) for x in zip(*flats, strict=True))
        sizes = [x.numel() for x in targets[0]]
        like = targets[0][0]
        buffers = tuple(like.new_empty(sum(sizes)) for _ in range(5))
        pieces = tuple(list(torch.split(buffers[k], sizes)) for k in (0, 2, 3, 4))
        return cls(key, targets, buffers, pieces)

    def run(self, gs: list[Tensor], scalars: Any) -> None:
        """Gather, one compiled call, scatter back; writes nothing if compiling fails."""
        p, g, mug, bg, bhg = self.buffers
        torch.cat(self.targets[0], out=p)
        torch.cat(gs, out=g)
        torch.cat(self.targets[1], out=mug)
        torch.cat(self.targets[2], out=bg)
        torch.cat(self.targets[3], out=bhg)
        _get_compiled()(p, g, mug, bg, bhg, scalars)
        for targets, pieces in zip(self.targets, self.pieces, strict=True):
            torch._foreach_copy_(targets, pieces)


class _CompiledPath:
    """The fused step for t ≥ 2: one compiled call per large tensor and one for all the small
    tensors of a bucket together; ``_foreach_update`` for t = 1, for tensors it cannot take,
    and for everything once compiling has failed.

    It caches, outside the optimizer state (so none of it is saved), the 1-D aliases of each
    parameter and its state (rebuilt whenever a data pointer or the layout changes) and the
    concatenation buffers of the small tensors. That saves most of the Python work per tensor
    and step, which matters on CPU, where a step of a ResNet-18 takes ~15 ms.
    """

    def __init__(self) -> None:
        self.aliases: MutableMapping[Tensor, tuple] = WeakIdKeyDictionary()
        self.batches: dict[tuple, _Batch] = {}

    def update(
        self,
        ps: list[Tensor],
        gs: list[Tensor],
        mugs: list[Tensor],
        bgs: list[Tensor],
        bhgs: list[Tensor],
        t: int,
        c: _Constants,
        rho: tuple[float, float],
        bucket: tuple,
    ) -> None:
        if t == 1 or _compile_error is not None:
            # the first step has its own constants and runs once: not worth a graph
            _foreach_update(ps, gs, mugs, bgs, bhgs, t, c, rho)
            return
        scalars: Any = (c.lr, c.decay, 1.0 / c.pa2, c.prior_g, c.prior_hg, c.eps, *rho)
        if ps[0].device.type == "cpu":
            # one tensor costs one guard per call instead of eight float conversions; on an
            # accelerator the floats stay floats (a CPU tensor there would mean a transfer)
            scalars = torch.tensor(scalars, dtype=torch.float64)
        eager: list[int] = []
        calls: list[tuple[list[int], Any]] = []
        small: list[int] = []
        small_g: list[Tensor] = []
        small_flats: list[tuple[Tensor, ...]] = []
        small_keys: list[tuple] = []
        for i, (p, g, mug, bg, bhg) in enumerate(zip(ps, gs, mugs, bgs, bhgs, strict=True)):
            key = (p.data_ptr(), p.shape, p.stride(), mug.data_ptr(), bg.data_ptr(), bhg.data_ptr())
            entry = self.aliases.get(p)
            if entry is None or entry[0] != key:
                entry = (key, _aliases(p, mug, bg, bhg))
                self.aliases[p] = entry
            flats = entry[1]
            if flats is None:
                eager.append(i)
                continue
            if g.stride() != key[2]:
                g = torch.empty_like(p).copy_(g)  # ĝ in p's memory order
            if p.numel() >= _BATCH_BELOW:
                calls.append(([i], (flats[0], _flat(g), *flats[1:])))
            else:
                small.append(i)
                small_g.append(g.view(-1) if g.is_contiguous() else _flat(g))
                small_flats.append(flats)
                small_keys.append(key)
        if len(small) == 1 and small_flats[0][0].numel() == 1:
            eager += small  # sizes 0 and 1 are specialised: one element would cost a graph
        elif small:
            batch = self.batches.get(bucket)
            if batch is None or batch.key != tuple(small_keys):
                batch = _Batch.build(tuple(small_keys), small_flats)
                self.batches[bucket] = batch
            calls.append((small, batch))
        for k, (_, args) in enumerate(calls):
            try:
                if isinstance(args, _Batch):
                    args.run(small_g, scalars)
                else:
                    _get_compiled()(*args, scalars)
            except Exception as err:  # a compiler or backend that is missing or broken
                _disable_compiled(err)
                eager += [i for indices, _ in calls[k:] for i in indices]
                break
        if eager:
            lists = ([x[i] for i in eager] for x in (ps, gs, mugs, bgs, bhgs))
            _foreach_update(*lists, t, c, rho)
