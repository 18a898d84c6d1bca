"""Overhead of ``BatchStream`` against a bare loop over batches cut beforehand.

Both run the same training step (forward, cross-entropy, backward, SGD step) on the same model.
The baseline steps through a list of ``(x, y)`` batch tensors cut before the clock starts (the
least any loader can cost); the other draws each batch from a ``BatchStream`` (per-epoch
permutation, ``index_select`` of the on-device tensors). Time is taken over short segments of
``--segment`` steps that alternate between the kinds, the order swapped every round, so that
both see the same machine noise (a shared machine's bursts hit single segments, and medians
discard them). Reported: time per epoch of each kind (median step time × steps per epoch) and
the ratio stream / precut, both of the medians and as the median of the paired segment ratios.
With ``--augment`` the stream with ``Augment(pad=4, flip=True)`` is timed too; that is extra
work rather than overhead and is reported separately.

    python benchmarks/loader_overhead.py                     # Fashion-MNIST, small CNN
    python benchmarks/loader_overhead.py --model mlp
    python benchmarks/loader_overhead.py --dataset digits --model mlp --epochs 20
    python benchmarks/loader_overhead.py --device cuda --augment

Fashion-MNIST comes from the data root or Debian's ``dataset-fashion-mnist``; without it use
``--dataset digits``. On a shared machine ``--threads 1`` gives steadier figures.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from valleys import data
from valleys.data.loader import Augment, BatchStream


def make_model(kind: str, input_shape: tuple[int, ...], classes: int) -> nn.Module:
    """A small MLP or LeNet-like CNN for ``input_shape`` images."""
    c, h, w = input_shape
    if kind == "mlp":
        return nn.Sequential(
            nn.Flatten(), nn.Linear(c * h * w, 256), nn.ReLU(), nn.Linear(256, classes)
        )
    return nn.Sequential(
        nn.Conv2d(c, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * (h // 4) * (w // 4), classes),
    )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="fashion_mnist", choices=("fashion_mnist", "digits"))
    parser.add_argument("--model", default="cnn", choices=("cnn", "mlp"))
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--epochs", type=float, default=2.0, help="timed epochs per kind")
    parser.add_argument("--segment", type=int, default=25, help="steps per timed segment")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--augment", action="store_true")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    options = {"flatten": False} if args.dataset == "digits" else {}
    ds = data.get(args.dataset, **options).to(device)
    x, y = ds.x_train, ds.y_train
    n, b = x.shape[0], args.batch_size
    torch.manual_seed(0)
    model = make_model(args.model, ds.input_shape, ds.num_outputs).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step(xb: torch.Tensor, yb: torch.Tensor) -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(xb), yb).backward()
        opt.step()

    perm = torch.randperm(n, device=device)
    precut = [(x[perm[i : i + b]], y[perm[i : i + b]]) for i in range(0, n - b + 1, b)]
    steps = len(precut)
    stream = BatchStream(x, y, b, seed=0)
    augmented = BatchStream(x, y, b, seed=0, augment=Augment(pad=4, flip=True))
    assert stream.batches_per_epoch == steps

    def segment(source: Callable[[int], tuple[torch.Tensor, torch.Tensor]]) -> float:
        _sync(device)
        start = time.perf_counter()
        for i in range(args.segment):
            step(*source(i))
        _sync(device)
        return time.perf_counter() - start

    cursor = {"precut": 0}

    def next_precut(_: int) -> tuple[torch.Tensor, torch.Tensor]:
        i = cursor["precut"]
        cursor["precut"] = (i + 1) % steps
        return precut[i]

    sources: dict[str, Callable[[int], tuple[torch.Tensor, torch.Tensor]]] = {
        "precut": next_precut,
        "stream": lambda _: stream.next(),
    }
    if args.augment:
        sources["stream+augment"] = lambda _: augmented.next()
    for source in sources.values():  # warm-up: allocator, lazy initialisation
        segment(source)
    per_step: dict[str, list[float]] = {k: [] for k in sources}
    order = list(sources)
    rounds = max(1, round(args.epochs * steps / args.segment))
    for r in range(rounds):
        for kind in order if r % 2 == 0 else order[::-1]:
            per_step[kind].append(segment(sources[kind]) / args.segment)

    epoch = {k: statistics.median(v) * steps for k, v in per_step.items()}
    paired = {
        k: statistics.median(a / p for a, p in zip(v, per_step["precut"], strict=True))
        for k, v in per_step.items()
    }
    print(
        f"{args.dataset} n={n}, {args.model}, batch {b}, {steps} steps/epoch, "
        f"{rounds} rounds of {args.segment} steps per kind ({args.epochs:g} epochs each), "
        f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    for kind, t in epoch.items():
        total = sum(per_step[kind]) * args.segment
        print(f"  {kind:<15} {t:8.3f} s/epoch (median step x {steps}; {total:.1f} s timed)")
    print(
        f"BatchStream / precut = {epoch['stream'] / epoch['precut']:.3f} from the medians, "
        f"{paired['stream']:.3f} as the median of paired segment ratios"
    )
    if args.augment:
        print(
            f"BatchStream+Augment / precut = {epoch['stream+augment'] / epoch['precut']:.3f} "
            f"(paired {paired['stream+augment']:.3f}; augmentation is extra work, not overhead)"
        )


if __name__ == "__main__":
    main()
