"""Cost of a SAM step against a step of its base optimizer.

SAM (``valleys.optim.SAM``) makes two forward/backward passes per step on the same batch and
moves the weights to w + ε̂ and back, so a step should cost a little over two base steps. The
script times, on one model and one fixed batch, a full training step (zero grads, forward,
cross-entropy, backward, optimizer step) of SGD with momentum, SAM around it and ASAM
(``adaptive=True``), in short alternating segments (order swapped every round, so that all
see the same machine noise), and reports the median step time of each and its ratio to the
base optimizer's. The ratio minus 2 is SAM's own overhead (the ascent step and the copies).

    python benchmarks/sam_step.py                     # LeNet-5-like CNN, batch 128, 1 thread
    python benchmarks/sam_step.py --model mlp --batch-size 1000
    python benchmarks/sam_step.py --device cuda
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

from valleys import optim


def make_model(kind: str) -> nn.Module:
    """SGN's architecture_1 (6-16-120-84, 28×28 inputs) or a 784-256-256-10 MLP."""
    if kind == "mlp":
        return nn.Sequential(
            nn.Flatten(),
            nn.Linear(784, 256),
            nn.ReLU(),
            nn.Linear(256, 256),
            nn.ReLU(),
            nn.Linear(256, 10),
        )
    return nn.Sequential(
        nn.Conv2d(1, 6, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(256, 120),
        nn.ReLU(),
        nn.Linear(120, 84),
        nn.ReLU(),
        nn.Linear(84, 10),
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="cnn", choices=("cnn", "mlp"))
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--segment", type=int, default=10, help="steps per timed segment")
    parser.add_argument("--rounds", type=int, default=15, help="timed rounds")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (default: 1)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch_size, 1, 28, 28, generator=gen).to(device)
    y = torch.randint(0, 10, (args.batch_size,), generator=gen).to(device)

    entries = {
        "sgd(momentum 0.9)": ("sgd", {"lr": 0.01, "momentum": 0.9}),
        "sam(sgd)": ("sam", {"lr": 0.01, "momentum": 0.9, "rho": 0.05}),
        "asam(sgd)": ("sam", {"lr": 0.01, "momentum": 0.9, "rho": 0.5, "adaptive": True}),
    }
    steps: dict[str, Callable[[], None]] = {}
    for name, (entry, hparams) in entries.items():
        torch.manual_seed(0)
        model = make_model(args.model).to(device)
        opt = optim.get(entry, model.parameters(), **hparams)

        def closure(model=model, opt=opt) -> torch.Tensor:
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss

        if optim.spec(entry).needs_closure:
            steps[name] = lambda opt=opt, closure=closure: opt.step(closure)
        else:
            steps[name] = lambda opt=opt, closure=closure: (closure(), opt.step())

    def segment(step: Callable[[], None]) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(args.segment):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return (time.perf_counter() - start) / args.segment

    for step in steps.values():  # warm-up
        segment(step)
    times: dict[str, list[float]] = {k: [] for k in steps}
    order = list(steps)
    for r in range(args.rounds):
        for name in order if r % 2 == 0 else order[::-1]:
            times[name].append(segment(steps[name]))
    base = statistics.median(times[order[0]])
    print(
        f"{args.model}, batch {args.batch_size}, {args.rounds} rounds of {args.segment} steps, "
        f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    print(f"| optimizer | ms/step | × {order[0]} |")
    print("|---|---:|---:|")
    for name, ts in times.items():
        t = statistics.median(ts)
        print(f"| {name} | {1000 * t:.2f} | {t / base:.2f} |")


if __name__ == "__main__":
    main()
