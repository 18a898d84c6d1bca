"""Training batches cut from tensors that stay on the device, and whole-batch augmentation.

``BatchStream`` is an endless source of training batches. The data set lives as two tensors on
the training device; a batch is an ``index_select`` of them with indices drawn by a seeded
``torch.Generator`` on that device, so no worker processes, no host-to-device copies and no
per-sample Python run between steps. Its ``state_dict`` records the exact position (the
current permutation, the offset in it and the generator states) so that a resumed run draws
bit-identical batches.

``Augment`` transforms a whole batch at once on the device: random crops from one zero-padded
copy of the batch (its sliding windows as an ``unfold`` view, one advanced index picking each
sample's window at its own offset) and horizontal flips chosen per sample with ``torch.where``.

Several processes (``shard=(rank, world)``, data parallelism): every process keeps the same
stream — the same seed, permutation and position — over the global batch of ``batch_size``
samples, and takes its contiguous part of each batch (``world`` parts whose sizes differ by at
most one). The union of the parts is the batch a single process would draw, augmented with the
same random draws, so that N processes together follow the single-process run, and a
checkpoint of the stream is the same on every process and for any number of them.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from valleys import _validate as check

SAMPLING = ("shuffle", "replacement")


def _device_generator(device: torch.device, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


class Augment:
    """Random crop with padding and random horizontal flip of ``(B, C, H, W)`` batches.

    Each sample of a batch is padded by ``pad`` pixels on every side with ``fill`` (zero by
    default; one value per channel is allowed, e.g. the value black takes after
    normalisation), then an ``H×W`` window at a uniformly drawn offset in ``0..2·pad`` is kept
    (torchvision's ``RandomCrop(H, padding=pad)``); with ``flip`` each sample is mirrored left to
    right with probability 1/2 (``RandomHorizontalFlip``). Randomness comes from the
    augmentation's own generator, seeded with ``seed`` and created on the first batch's device;
    per batch it draws the B row offsets and B column offsets (when ``pad > 0``), then the B
    flip bits (when ``flip``). ``state_dict`` holds that generator's state.
    """

    def __init__(
        self,
        pad: int = 4,
        flip: bool = True,
        *,
        seed: int = 0,
        fill: float | Sequence[float] = 0.0,
    ) -> None:
        self.pad = check.count("pad", pad)
        self.flip = check.flag("flip", flip)
        self.seed = check.count("seed", seed)
        if isinstance(fill, (int, float)) and not isinstance(fill, bool):
            self.fill: tuple[float, ...] = (check.real("fill", fill),)
        else:
            self.fill = tuple(check.real("fill", v) for v in fill)
            if not self.fill:
                check.fail("fill", fill, "expected a number or one number per channel")
        self._gen: torch.Generator | None = None
        self._pending: dict[str, Any] | None = None

    def _generator(self, device: torch.device) -> torch.Generator:
        if self._gen is None or self._gen.device != device:
            self._gen = _device_generator(device, self.seed)
            if self._pending is not None:
                if self._pending["device_type"] != device.type:
                    raise ValueError(
                        f"Augment state was saved on {self._pending['device_type']}, "
                        f"cannot continue it exactly on {device.type}"
                    )
                self._gen.set_state(self._pending["generator"])
                self._pending = None
        return self._gen

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.apply(x)

    def apply(self, x: torch.Tensor, start: int = 0, total: int | None = None) -> torch.Tensor:
        """Augment ``x``, rows ``start … start + len(x)`` of a batch of ``total`` samples
        (default: ``x`` is the whole batch): the random draws are those of the whole batch,
        of which the rows of ``x`` keep theirs (a process's part of a global batch)."""
        if x.ndim != 4:
            check.fail("batch", tuple(x.shape), "Augment expects images (B, C, H, W)")
        if not self.pad and not self.flip:
            return x
        b, c, h, w = x.shape
        total = b if total is None else total
        if not 0 <= start <= start + b <= total:
            check.fail("rows", (start, b, total), "the rows must lie within the batch")
        rows = slice(start, start + b)
        dev = x.device
        g = self._generator(dev)
        p = self.pad
        if p:
            offsets = torch.randint(0, 2 * p + 1, (2, total), generator=g, device=dev)[:, rows]
        if self.flip:
            flipped = torch.randint(
                0, 2, (total, 1, 1, 1), generator=g, device=dev, dtype=torch.bool
            )[rows]
        if p:
            if len(self.fill) not in (1, c):
                check.fail("fill", self.fill, f"expected one value or {c} (one per channel)")
            padded = x.new_empty(b, c, h + 2 * p, w + 2 * p)
            if len(self.fill) == 1:
                padded.fill_(self.fill[0])
            else:
                padded.copy_(torch.tensor(self.fill, dtype=x.dtype, device=dev).view(1, c, 1, 1))
            padded[:, :, p : p + h, p : p + w] = x
            # windows[i, :, r, s] is the H×W crop of sample i at offset (r, s), a view; one
            # advanced index per sample copies out the chosen window of each
            windows = padded.unfold(2, h, 1).unfold(3, w, 1)
            x = windows[torch.arange(b, device=dev), :, offsets[0], offsets[1]]
        if self.flip:
            x = torch.where(flipped, x.flip(3), x)
        return x

    def state_dict(self) -> dict[str, Any]:
        """Settings and generator state (None before the first batch)."""
        if self._gen is not None:
            gen = {"device_type": self._gen.device.type, "generator": self._gen.get_state()}
        else:
            gen = self._pending
        return {
            "pad": self.pad,
            "flip": self.flip,
            "seed": self.seed,
            "fill": self.fill,
            "state": gen,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where the augmentation that gave ``state`` stood."""
        for key in ("pad", "flip"):
            if state[key] != getattr(self, key):
                check.fail(
                    f"Augment state {key}", state[key], f"this Augment has {getattr(self, key)!r}"
                )
        self.seed = int(state["seed"])
        self.fill = tuple(state["fill"])
        saved = state["state"]
        self._gen = None
        self._pending = None if saved is None else dict(saved)

    def __repr__(self) -> str:
        return f"Augment(pad={self.pad}, flip={self.flip}, seed={self.seed})"


class BatchStream:
    """An endless stream of training batches from tensors ``x`` and ``y`` on one device.

    ``sampling="shuffle"``: each epoch draws a permutation of the ``n`` samples (``torch.randperm``
    with the stream's generator, on the data's device) and cuts it into consecutive batches of
    ``batch_size``; with ``drop_last`` the last ``n mod batch_size`` samples of each
    permutation are skipped, else the epoch ends with a smaller batch.
    ``sampling="replacement"``: every batch is ``batch_size`` indices drawn uniformly with
    replacement (Entropy-SGD's original sampling).
    ``augment`` (e.g. ``Augment(pad=4)``) is applied to every input batch.

    ``shard=(rank, world)``: this process is one of ``world`` sharing each batch (see the
    module docstring); ``batch_size`` is the global batch, a multiple of ``world``, and
    ``next()`` returns this rank's rows of it. ``weight`` is then ``world · n_rank / n_batch``
    for the last batch drawn (1 unless a smaller last batch of an epoch splits unevenly), the
    factor that makes the mean over ranks of per-rank means the mean over the batch. An
    ``augment`` other than :class:`Augment` sees only this rank's rows.

    ``next()`` returns ``(x_batch, y_batch)``; the stream is also an iterator. Progress:
    ``samples_drawn``, ``batches_drawn``, ``epochs = samples_drawn / n`` (global batches).
    """

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        batch_size: int,
        *,
        seed: int = 0,
        sampling: str = "shuffle",
        drop_last: bool = True,
        augment: Augment | None = None,
        shard: tuple[int, int] | None = None,
    ) -> None:
        if x.shape[0] != y.shape[0]:
            check.fail("x/y", (tuple(x.shape), tuple(y.shape)), "need the same number of rows")
        if x.device != y.device:
            check.fail("x/y devices", (str(x.device), str(y.device)), "must be the same device")
        self.n = int(x.shape[0])
        if self.n == 0:
            check.fail("x", tuple(x.shape), "empty data set")
        self.batch_size = check.count("batch_size", batch_size, 1)
        self.seed = check.count("seed", seed)
        self.sampling = check.choice("sampling", sampling, SAMPLING)
        self.drop_last = check.flag("drop_last", drop_last)
        if sampling == "shuffle" and drop_last and self.batch_size > self.n:
            check.fail("batch_size", batch_size, f"larger than the {self.n} samples with drop_last")
        if augment is not None and not callable(augment):
            check.fail("augment", augment, "expected an Augment (or a callable on batches)")
        rank, world = (0, 1) if shard is None else shard
        self.world = check.count("shard world size", world, 1)
        self.rank = check.count("shard rank", rank)
        if self.rank >= self.world:
            check.fail("shard", shard, "expected (rank, world) with 0 <= rank < world")
        if self.batch_size % self.world:
            check.fail(
                "batch_size",
                batch_size,
                f"the global batch is split evenly over {self.world} processes: use a "
                f"multiple of {self.world}",
            )
        self.weight = 1.0
        self.x, self.y, self.augment = x, y, augment
        self.device = x.device
        self._gen = _device_generator(self.device, self.seed)
        self._perm: torch.Tensor | None = None
        self._pos = 0
        self.samples_drawn = 0
        self.batches_drawn = 0
        self.epoch = 0  # permutations drawn so far ("shuffle")

    @property
    def epochs(self) -> float:
        """Samples drawn so far divided by the data set size."""
        return self.samples_drawn / self.n

    @property
    def batches_per_epoch(self) -> int:
        """Batches in one permutation (``n / batch_size`` on average with replacement)."""
        if self.drop_last or self.sampling == "replacement":
            return max(1, self.n // self.batch_size)
        return math.ceil(self.n / self.batch_size)

    def _indices(self) -> torch.Tensor:
        b = self.batch_size
        if self.sampling == "replacement":
            return torch.randint(0, self.n, (b,), generator=self._gen, device=self.device)
        need = b if self.drop_last else 1
        if self._perm is None or self._pos + need > self.n:
            self._perm = torch.randperm(self.n, generator=self._gen, device=self.device)
            self._pos = 0
            self.epoch += 1
        idx = self._perm[self._pos : self._pos + b]
        self._pos += idx.shape[0]
        return idx

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next training batch ``(x_batch, y_batch)`` (this rank's rows of it)."""
        idx = self._indices()
        total = int(idx.shape[0])
        start, local = 0, idx
        if self.world > 1:
            base, extra = divmod(total, self.world)
            start = self.rank * base + min(self.rank, extra)
            size = base + (1 if self.rank < extra else 0)
            local = idx[start : start + size]
            self.weight = self.world * size / total
        xb = self.x.index_select(0, local)
        yb = self.y.index_select(0, local)
        if self.augment is not None:
            if self.world > 1 and isinstance(self.augment, Augment):
                xb = self.augment.apply(xb, start, total)
            else:
                xb = self.augment(xb)
        self.samples_drawn += total
        self.batches_drawn += 1
        return xb, yb

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.next()

    def state_dict(self) -> dict[str, Any]:
        """The exact position: settings (checked on load), generator state, the current
        permutation (on the CPU) and the offset in it, the counters and the augmentation's
        state."""
        return {
            "n": self.n,
            "batch_size": self.batch_size,
            "sampling": self.sampling,
            "drop_last": self.drop_last,
            "seed": self.seed,
            "device_type": self.device.type,
            "generator": self._gen.get_state(),
            "perm": None if self._perm is None else self._perm.cpu(),
            "pos": self._pos,
            "samples_drawn": self.samples_drawn,
            "batches_drawn": self.batches_drawn,
            "epoch": self.epoch,
            "augment": None
            if self.augment is None or not hasattr(self.augment, "state_dict")
            else self.augment.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where the stream that gave ``state`` stood (same data size, batch
        size, sampling and device type required)."""
        for key in ("n", "batch_size", "sampling", "drop_last"):
            if state[key] != getattr(self, key):
                check.fail(
                    f"BatchStream state {key}",
                    state[key],
                    f"this stream has {getattr(self, key)!r}",
                )
        if state["device_type"] != self.device.type:
            check.fail(
                "BatchStream state device",
                state["device_type"],
                f"saved there, cannot continue it exactly on {self.device.type}",
            )
        if (state["augment"] is None) != (self.augment is None):
            check.fail(
                "BatchStream state augment",
                state["augment"] is not None,
                "the saved stream and this one must both augment or both not",
            )
        self.seed = state["seed"]
        self._gen.set_state(state["generator"])
        perm = state["perm"]
        self._perm = None if perm is None else perm.to(self.device)
        self._pos = int(state["pos"])
        self.samples_drawn = int(state["samples_drawn"])
        self.batches_drawn = int(state["batches_drawn"])
        self.epoch = int(state["epoch"])
        if self.augment is not None and state["augment"] is not None:
            self.augment.load_state_dict(state["augment"])

    def __repr__(self) -> str:
        return (
            f"BatchStream(n={self.n}, batch_size={self.batch_size}, sampling={self.sampling!r}, "
            f"drop_last={self.drop_last}, augment={self.augment!r}, epochs={self.epochs:.3f})"
        )


def eval_batches(
    x: torch.Tensor, y: torch.Tensor, batch_size: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Consecutive batches ``(x[i:i+b], y[i:i+b])`` in order, the last one smaller if need be
    (views, no copies)."""
    if x.shape[0] != y.shape[0]:
        check.fail("x/y", (tuple(x.shape), tuple(y.shape)), "need the same number of rows")
    batch_size = check.count("batch_size", batch_size, 1)

    def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for i in range(0, x.shape[0], batch_size):
            yield x[i : i + batch_size], y[i : i + batch_size]

    return batches()
