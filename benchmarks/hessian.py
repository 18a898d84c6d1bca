"""Speed of the Hessian diagnostics on Entropy-SGD's Hessian LeNet (``lenet_small``, 47,658
weights) and 4,096 Fashion-MNIST training images (MNIST's stand-in: same 1×28×28 shape, so
the same model; MNIST itself is not available offline).

* ``top``: the top Hessian eigenvalue by Lanczos to a relative error of 1e-3, in units of
  the time of one full-data gradient (reference: a long Lanczos run);
* ``dense``: the dense Hessian and its full spectrum (float32), wall time and peak memory,
  with a progress log (columns per second) for extrapolating a run that is stopped early;
* ``accuracy``: float32 against float64 eigenvalues of the same dense Hessian, for a model
  small enough to do both (an MLP with a few thousand weights).

The network is first trained briefly (SGD with momentum, seeded) so that the Hessian is that
of a trained model rather than of the initialisation::

    .venv/bin/python benchmarks/hessian.py top --threads 1        # the default part
    nohup .venv/bin/python benchmarks/hessian.py dense --out /tmp/dense > /tmp/dense.log 2>&1 &
    .venv/bin/python benchmarks/hessian.py accuracy
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from valleys import data, models
from valleys.landscape import common, hessian, hessian_dense


def trained(name: str, samples: int, epochs: float, seed: int, **kwargs):
    """``(model, x, y)``: ``name`` trained for ``epochs`` on Fashion-MNIST (batch 64, SGD lr
    0.02, momentum 0.9), in eval mode, and the first ``samples`` of a seeded permutation of
    the training set."""
    torch.manual_seed(seed)
    ds = data.get("fashion_mnist")
    model = models.get(name, tuple(ds.x_train.shape[1:]), ds.num_outputs, **kwargs)
    opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    gen = torch.Generator().manual_seed(seed)
    steps = int(epochs * ds.x_train.shape[0] / 64)
    order = torch.randperm(ds.x_train.shape[0], generator=gen)
    for step in range(steps):
        idx = order[(step * 64) % len(order) :][:64]
        loss = F.cross_entropy(model(ds.x_train[idx]), ds.y_train[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    keep = torch.randperm(ds.x_train.shape[0], generator=gen)[:samples].sort().values
    x, y = ds.x_train[keep], ds.y_train[keep]
    model.eval()
    return model, x, y


def _batches(x: torch.Tensor, y: torch.Tensor, size: int) -> list:
    return [(x[i : i + size], y[i : i + size]) for i in range(0, x.shape[0], size)]


#: The clock of the ``top`` timings (set in ``main``).
CLOCK = [time.perf_counter]


def _now() -> float:
    return CLOCK[0]()


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def top(args: argparse.Namespace) -> dict:
    model, x, y = trained("lenet_small", args.samples, args.epochs, args.seed)
    batches = _batches(x, y, args.batch_size)
    params = list(model.parameters())
    loss, _ = common.full_loss_and_grad(model, F.cross_entropy, batches, params)
    times = []
    for _ in range(args.repeats):
        t = _now()
        common.full_loss_and_grad(model, F.cross_entropy, batches, params)
        times.append(_now() - t)
    grad_s = statistics.median(times)
    clock = "CPU" if CLOCK[0] is time.process_time else "wall"
    print(f"full loss {float(loss):.4f}; one full-data gradient {grad_s:.3f} {clock} s (median)")

    t = _now()
    ref = hessian.top_eigen(
        model, F.cross_entropy, batches, tol=1e-9, max_iters=args.reference_steps, seed=99
    )
    ref_s = _now() - t
    lam = float(ref.eigenvalues[0])
    print(
        f"reference: λ_max = {lam:.8g} after {ref.iterations} Lanczos steps "
        f"(residual {float(ref.residuals[0]):.2e}, {ref_s:.1f} s, first call: includes tracing)"
    )
    rows = []
    for tol in args.tols:
        for seed in range(args.runs):
            t = _now()
            r = hessian.top_eigen(model, F.cross_entropy, batches, tol=tol, seed=seed)
            seconds = _now() - t
            err = abs(float(r.eigenvalues[0]) - lam) / abs(lam)
            rows.append(
                {
                    "tol": tol,
                    "seed": seed,
                    "eigenvalue": float(r.eigenvalues[0]),
                    "relative_error": err,
                    "steps": r.iterations,
                    "products": r.products,
                    "seconds": seconds,
                    "gradients": seconds / grad_s,
                }
            )
            print(
                f"tol {tol:g} seed {seed}: λ = {float(r.eigenvalues[0]):.8g}, rel. error "
                f"{err:.1e}, {r.iterations} steps, {seconds:.2f} s = {seconds / grad_s:.1f} "
                "gradients",
                flush=True,
            )
    return {
        "clock": clock,
        "gradient_s": grad_s,
        "reference": lam,
        "reference_steps": ref.iterations,
        "runs": rows,
    }


def dense(args: argparse.Namespace) -> dict:
    model, x, y = trained("lenet_small", args.samples, args.epochs, args.seed)
    size = args.batch_size
    batches = _batches(x, y, size)
    n = sum(p.numel() for p in model.parameters())
    total = n * len(batches)
    started = time.perf_counter()
    last = [started]

    def progress(done: int) -> None:
        now = time.perf_counter()
        if now - last[0] >= args.log_every or done == total:
            last[0] = now
            rate = done / (now - started)
            print(
                f"{now - started:8.0f} s  {done}/{total} column-batches ({100 * done / total:.2f}%)"
                f"  {rate:.1f}/s  eta {(total - done) / rate:.0f} s  peak {_peak_gib():.2f} GiB",
                flush=True,
            )

    print(f"lenet_small: {n} weights, {x.shape[0]} samples in {len(batches)} batches", flush=True)
    result = hessian_dense.dense_spectrum(
        model,
        F.cross_entropy,
        batches,
        dtype=torch.float32,
        chunk_size=args.chunk_size,
        progress=progress,
    )
    ev = result.eigenvalues
    out = {
        "weights": n,
        "samples": int(x.shape[0]),
        "batch_size": size,
        "chunk_size": args.chunk_size,
        "threads": torch.get_num_threads(),
        "seconds_hessian": result.seconds_hessian,
        "seconds_eigvalsh": result.seconds_eigvalsh,
        "seconds_total": time.perf_counter() - started,
        "peak_gib": _peak_gib(),
        "cpu_seconds": _cpu_s(),
        "zero_rows": result.zero_rows,
        "min": float(ev[0]),
        "max": float(ev[-1]),
        "negative": int((ev < 0).sum()),
        "trace": float(ev.sum()),
    }
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        np.save(Path(args.out) / "eigenvalues.npy", ev.numpy())
    return out


def accuracy(args: argparse.Namespace) -> dict:
    model, x, y = trained("mlp", args.samples, args.epochs, args.seed, widths=[6])
    n = sum(p.numel() for p in model.parameters())
    double = copy.deepcopy(model).double()
    h = hessian_dense.dense_hessian(double, F.cross_entropy, _batches(x.double(), y, 1024))
    exact = torch.linalg.eigvalsh(h)
    norm = float(exact.abs().max())
    solver = hessian_dense.eigvalsh(h.float().contiguous(), overwrite=True).double()
    single = hessian_dense.dense_spectrum(
        model, F.cross_entropy, _batches(x, y, args.batch_size), dtype=torch.float32
    ).eigenvalues
    out = {
        "weights": n,
        "norm": norm,
        "solver_max_abs_error": float((solver - exact).abs().max()),
        "float32_max_abs_error": float((single - exact).abs().max()),
    }
    print(
        f"mlp: {n} weights; ‖H‖ = {norm:.4g}; float32 solver on the float64 matrix: max abs "
        f"error {out['solver_max_abs_error']:.2e}; float32 products, matrix and solver: "
        f"{out['float32_max_abs_error']:.2e}"
    )
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("part", nargs="?", default="top", choices=("top", "dense", "accuracy"))
    p.add_argument(
        "--clock",
        choices=("cpu", "wall"),
        help="top: cpu (this process's CPU time, robust to other jobs; the default with one "
        "thread) or wall",
    )
    p.add_argument("--samples", type=int, default=4096)
    p.add_argument("--epochs", type=float, default=1.0, help="training epochs first (1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3, help="gradient timings (median)")
    p.add_argument("--reference-steps", type=int, default=120)
    p.add_argument("--tols", type=float, nargs="+", default=[1e-2, 1e-3])
    p.add_argument("--runs", type=int, default=3, help="Lanczos runs (seeds) per tolerance")
    p.add_argument("--batch-size", type=int, default=512, help="samples per batch (512)")
    p.add_argument("--chunk-size", type=int, default=64, help="dense: columns per vmap call")
    p.add_argument("--log-every", type=float, default=60.0, help="dense: seconds between logs")
    p.add_argument("--out", help="folder for the JSON result (and eigenvalues.npy)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    use_cpu = args.clock == "cpu" or (args.clock is None and args.threads == 1)
    CLOCK[0] = time.process_time if use_cpu else time.perf_counter
    print(f"torch {torch.__version__}, {args.threads} threads; {' '.join(sys.argv[1:])}")
    result = {"top": top, "dense": dense, "accuracy": accuracy}[args.part](args)
    print(json.dumps(result, indent=1, default=lambda v: None if math.isnan(v) else v))
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / f"hessian-{args.part}.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
