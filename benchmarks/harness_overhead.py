"""Overhead of the training harness (``valleys.train.train``) against a bare PyTorch loop.

Both train the same model (the registry's MLP, same initial weights) with the same optimizer
(SGD with momentum), batch size and data. The bare loop steps through batches cut before the
clock starts: zero the gradients, forward, cross-entropy, backward, ``opt.step()``, nothing
else. The harness runs ``valleys.train.train`` with its defaults for a research run: the
``BatchStream`` loader, the one closure, the schedule's ``LambdaLR``, loss accumulation and
the per-step finiteness check, a metrics record every ``--log-every`` steps, budget checks, a
checkpoint at the start and the end and a final evaluation; no progress bar or TensorBoard.

Its per-step cost is the *marginal* one: the wall time of a run of ``--steps`` + ``--short``
steps less that of a run of ``--short`` steps, over ``--steps`` (the fixed costs, namely the
set-up, the two checkpoints and the final evaluation, cancel and are reported apart). Rounds
alternate bare loop, short run and long run, so all three see the same machine noise;
medians over rounds are reported with the ratio harness / bare.

    python benchmarks/harness_overhead.py --threads 1                 # Fashion-MNIST MLP
    python benchmarks/harness_overhead.py --threads 1 --widths 1024 1024
    python benchmarks/harness_overhead.py --device cuda

Fashion-MNIST comes from the data root or Debian's ``dataset-fashion-mnist``; without it use
``--dataset digits``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from valleys import data, models
from valleys.train import config as C
from valleys.train import train


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="fashion_mnist", choices=("fashion_mnist", "digits"))
    p.add_argument("--widths", type=int, nargs="+", default=[256], help="MLP hidden widths")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=400, help="timed steps per round")
    p.add_argument("--short", type=int, default=20, help="steps of the short harness run")
    p.add_argument("--log-every", type=int, default=10, help="harness metrics record period")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    ds = data.get(args.dataset).to(device)
    x, y, b = ds.x_train, ds.y_train, args.batch_size
    hp = {"lr": 0.01, "momentum": 0.9}

    def fresh_model() -> torch.nn.Module:
        torch.manual_seed(0)
        return models.get("mlp", ds.input_shape, ds.num_outputs, widths=args.widths).to(device)

    gen = torch.Generator().manual_seed(0)
    order = torch.randperm(x.shape[0], generator=gen).to(device)
    precut = [(x[order[i : i + b]], y[order[i : i + b]]) for i in range(0, x.shape[0] - b + 1, b)]

    def bare() -> float:
        model = fresh_model()
        opt = torch.optim.SGD(model.parameters(), **hp)
        model.train()
        _sync(device)
        start = time.perf_counter()
        for i in range(args.steps):
            xb, yb = precut[i % len(precut)]
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(xb), yb).backward()
            opt.step()
        _sync(device)
        return time.perf_counter() - start

    def harness(steps: int, root: Path) -> float:
        cfg = C.load(
            [],
            [
                f"data.name={args.dataset}",
                f"data.batch_size={b}",
                "model.name=mlp",
                f"model.widths={args.widths}",
                "optim.name=sgd",
                f"optim.lr={hp['lr']}",
                f"optim.momentum={hp['momentum']}",
                f"run.max_steps={steps}",
                f"run.log_every_steps={args.log_every}",
                f"run.device={args.device}",
                "run.progress=false",
                "run.tensorboard=false",
                "run.eval_at_start=false",
                f"run.dir={root / f'run-{steps}-{time.monotonic_ns()}'}",
            ],
        )
        model = fresh_model()
        _sync(device)
        start = time.perf_counter()
        train(cfg, dataset=ds, model=model)
        _sync(device)
        return time.perf_counter() - start

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        bare()  # warm-up: allocator, kernels, the dataset's first touch
        harness(args.short, root)
        for r in range(args.rounds):
            t_bare = bare()
            t_short = harness(args.short, root)
            t_long = harness(args.short + args.steps, root)
            rows.append((t_bare, t_short, t_long))
            per_bare = 1e3 * t_bare / args.steps
            per_h = 1e3 * (t_long - t_short) / args.steps
            print(
                f"round {r + 1}: bare {per_bare:.3f} ms/step, harness {per_h:.3f} ms/step "
                f"(x{per_h / per_bare:.3f}); short run {t_short:.2f} s",
                flush=True,
            )
    per_bare = statistics.median(1e3 * t / args.steps for t, _, _ in rows)
    per_h = statistics.median(1e3 * (lg - sh) / args.steps for _, sh, lg in rows)
    paired = statistics.median((lg - sh) / t for t, sh, lg in rows)
    fixed = statistics.median(sh - args.short * per_h / 1e3 for _, sh, _ in rows)
    out = {
        "dataset": args.dataset,
        "widths": args.widths,
        "batch_size": b,
        "steps": args.steps,
        "log_every": args.log_every,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "bare_ms_per_step": per_bare,
        "harness_ms_per_step": per_h,
        "ratio_of_medians": per_h / per_bare,
        "ratio_paired_median": paired,
        "fixed_costs_s": fixed,
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
