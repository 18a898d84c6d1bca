"""Speed of one optimizer step on ResNet-18-shaped parameters, against a memory-bandwidth floor.

Every optimizer gets its own copy of the same ~11.2M float32 parameters (the 62 tensors of the
CIFAR ResNet-18: convolutions, BatchNorm weights and biases, the classifier) with fixed random
gradients. After a warm-up (which includes any compilation) the script times one step of each
optimizer in turn, round after round, so that all of them share the machine's noise, and
reports the median.

An elementwise optimizer step is memory-bound. Its floor is the bytes it must move (each
parameter-sized tensor read or written once: Adam reads p, g, m, v and writes p, m, v = 7;
VSGD reads p, g, mug, bg, bhg and writes p, mug, bg, bhg = 9) divided by the machine's copy
bandwidth, measured as the median time of ``dst.copy_(src)`` over the same number of
elements, counted as 2·size·4 bytes. A copy into another buffer also reads the destination
lines before writing them (write-allocate) while an in-place update does not, so the script
also reports an in-place floor from ``x.add_(y)`` (3·size·4 bytes: read x, y, write x).

    python benchmarks/optim_step.py                 # one CPU thread
    python benchmarks/optim_step.py --threads 2
    python benchmarks/optim_step.py --device cuda
    python benchmarks/optim_step.py --diagnose      # adds compiled single-buffer kernels

To add an optimizer, append an ``Entry`` to ``ENTRIES``.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from valleys.optim._vsgd_compiled import _fused_update
from valleys.optim.vsgd import VSGD


class Steppable(Protocol):
    def step(self) -> Any: ...


@dataclass(frozen=True)
class Entry:
    """One optimizer under test: a factory over the parameter list (gradients already set)
    and the number of parameter-sized tensors one step must read or write at least once."""

    name: str
    factory: Callable[[list[torch.nn.Parameter]], Steppable]
    tensors_moved: int


ENTRIES: list[Entry] = [
    Entry("Adam(fused=True)", lambda ps: torch.optim.Adam(ps, lr=1e-3, fused=True), 7),
    Entry("Adam(foreach=True)", lambda ps: torch.optim.Adam(ps, lr=1e-3, foreach=True), 7),
    Entry("VSGD(reference)", lambda ps: VSGD(ps, implementation="reference"), 9),
    Entry("VSGD(foreach)", lambda ps: VSGD(ps, implementation="foreach"), 9),
    Entry("VSGD(compiled)", lambda ps: VSGD(ps, implementation="compiled"), 9),
]


class FlatKernel:
    """A diagnostic, not an optimizer: one compiled elementwise kernel over single flat
    buffers of the total size, i.e. a step with no per-tensor overhead at all."""

    def __init__(self, params: list[torch.nn.Parameter], fn: Callable, tensors: int) -> None:
        numel = sum(p.numel() for p in params)
        like = params[0]
        gen = torch.Generator().manual_seed(0)
        self.buffers = [
            (torch.rand(numel, generator=gen) + 0.1).to(like.device) for _ in range(tensors)
        ]
        self.scalars = torch.tensor(
            (1e-3, 1.0, 1 / (1 + 1e-4), 2e-8, 6e-7, 1e-8, 0.5, 0.4), dtype=torch.float64
        )
        if like.device.type != "cpu":
            self.scalars = tuple(self.scalars.tolist())
        self.fn = torch.compile(fn, dynamic=True, fullgraph=True)

    @torch.no_grad()
    def step(self) -> None:
        self.fn(*self.buffers, self.scalars)


def _move7(p, g, m, v, sc):  # reads 4 tensors, writes 3 in place, no arithmetic to speak of
    m.copy_(m + g)
    v.copy_(v + g)
    p.copy_(p + m + v)


def _move9(p, g, mug, bg, bhg, sc):  # reads 5, writes 4
    mug.copy_(mug + g)
    bg.copy_(bg + g)
    bhg.copy_(bhg + g)
    p.copy_(p + mug + bg + bhg)


DIAGNOSTICS: list[Entry] = [
    Entry("[diag] move 7 tensors, 1 buffer", lambda ps: FlatKernel(ps, _move7, 4), 7),
    Entry("[diag] move 9 tensors, 1 buffer", lambda ps: FlatKernel(ps, _move9, 5), 9),
    Entry("[diag] VSGD kernel, 1 buffer", lambda ps: FlatKernel(ps, _fused_update, 5), 9),
]


def resnet18_shapes(num_classes: int = 10) -> list[tuple[int, ...]]:
    """Parameter shapes of the CIFAR ResNet-18 (3×3 stem, four stages of two basic blocks)."""
    shapes: list[tuple[int, ...]] = [(64, 3, 3, 3), (64,), (64,)]
    width_in = 64
    for width, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        for block in range(2):
            c_in = width_in if block == 0 else width
            bn = [(width,), (width,)]
            shapes += [(width, c_in, 3, 3), *bn, (width, width, 3, 3), *bn]
            if block == 0 and (stride != 1 or c_in != width):
                shapes += [(width, c_in, 1, 1), *bn]  # projection shortcut
        width_in = width
    shapes += [(num_classes, 512), (num_classes,)]
    return shapes


def make_params(
    shapes: list[tuple[int, ...]], device: torch.device, seed: int
) -> tuple[list[torch.nn.Parameter], list[list[torch.Tensor]]]:
    """Parameters (with ``.grad`` set) and two sets of gradients to alternate between: with a
    gradient that never changed, μ would converge to it and the state to numbers unlike
    those of training (down to subnormals, which are slow)."""
    gen = torch.Generator().manual_seed(seed)
    params = [
        torch.nn.Parameter(torch.randn(s, generator=gen).mul_(0.05).to(device)) for s in shapes
    ]
    grads = [[torch.randn(s, generator=gen).mul_(1e-2).to(device) for s in shapes] for _ in "ab"]
    for p, g in zip(params, grads[0], strict=True):
        p.grad = g
    return params, grads


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


class Bandwidth:
    """Copy and in-place bandwidth (bytes per second) over ``numel`` float32 elements."""

    def __init__(self, numel: int, device: torch.device) -> None:
        self.numel, self.device = numel, device
        self.x = torch.randn(numel, device=device)
        self.y = torch.randn(numel, device=device)
        self.copy_times: list[float] = []
        self.inplace_times: list[float] = []

    def measure(self, reps: int = 3) -> None:
        for _ in range(reps):
            self.copy_times.append(timed(lambda: self.x.copy_(self.y), self.device))
            self.inplace_times.append(timed(lambda: self.x.add_(self.y), self.device))

    @property
    def copy(self) -> float:
        return 2 * self.numel * 4 / statistics.median(self.copy_times)

    @property
    def inplace(self) -> float:
        return 3 * self.numel * 4 / statistics.median(self.inplace_times)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (default: 1)")
    parser.add_argument("--rounds", type=int, default=20, help="timed rounds (default: 20)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (default: 3)")
    parser.add_argument("--only", nargs="*", help="entries whose name has one of these")
    parser.add_argument(
        "--diagnose", action="store_true", help="add compiled single-buffer kernels (no overhead)"
    )
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    shapes = resnet18_shapes()
    numel = sum(torch.Size(s).numel() for s in shapes)
    entries = ENTRIES + (DIAGNOSTICS if args.diagnose else [])
    if args.only:
        entries = [e for e in entries if any(o in e.name for o in args.only)]

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()
    print(f"torch {torch.__version__} on {where}, {torch.get_num_threads()} thread(s)")
    print(f"{len(shapes)} tensors, {numel / 1e6:.2f}M float32 parameters\n")

    runs = []
    for i, entry in enumerate(entries):
        params, grads = make_params(shapes, device, seed=i)
        opt = entry.factory(params)
        start = time.perf_counter()
        for _ in range(args.warmup):
            opt.step()
        sync(device)
        print(f"warm-up {entry.name}: {time.perf_counter() - start:.1f} s")
        runs.append((entry, opt, [], params, grads))

    bandwidth = Bandwidth(numel, device)
    for r in range(args.rounds):
        for _entry, opt, times, params, grads in runs:
            for p, g in zip(params, grads[r % 2], strict=True):
                p.grad = g
            times.append(timed(opt.step, device))
        bandwidth.measure()
    print(
        f"\nbandwidth: copy {bandwidth.copy / 1e9:.1f} GB/s (dst.copy_(src), 2·size·4 bytes), "
        f"in place {bandwidth.inplace / 1e9:.1f} GB/s (x.add_(y), 3·size·4 bytes)\n"
    )
    baseline = statistics.median(runs[0][2])
    print(
        f"| optimizer | tensors moved | ms/step | × {runs[0][0].name} "
        "| copy floor ms | × copy floor | in-place floor ms | × in-place floor |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for entry, _opt, times, _params, _grads in runs:
        median = statistics.median(times)
        volume = entry.tensors_moved * numel * 4
        floor_copy, floor_inplace = volume / bandwidth.copy, volume / bandwidth.inplace
        print(
            f"| {entry.name} | {entry.tensors_moved} | {median * 1e3:.1f} "
            f"| {median / baseline:.2f} | {floor_copy * 1e3:.1f} | {median / floor_copy:.2f} "
            f"| {floor_inplace * 1e3:.1f} | {median / floor_inplace:.2f} |"
        )


if __name__ == "__main__":
    main()
