"""Cost of SGN's curvature products and steps, in gradients, on an MLP and LeNets at batch 128.

For each model (in train mode, float32) and one fixed batch, the script times every
measurement once per round, in a random order, round after round so that all of them share
the machine's noise, and reports the median of each and its ratio to the median gradient:

* ``gradient``: ``zero_grad``, forward, cross-entropy, ``backward`` with autograd (an SGD
  step's work apart from its update): the unit;
* ``GGN-vp (method)``: one GGN-vector product inside CG, for each method of
  ``valleys.curvature.ggn_fn`` ("traced": the default, "jvp": torch.func jvp + cached vjp,
  "linearize": torch.func.linearize + cached vjp), on the linearisation of one step;
* ``GGN setup (method)``: what a step pays once for it (forward, loss, gradient, and the
  linearisation: per-point graph, vjp, or linearize's trace);
* ``HVP (method)`` and ``HVP setup (method)``: the same for ``valleys.curvature.hvp_fn``
  ("traced" and "reverse": double backward on a ``create_graph`` gradient);
* ``SGN step, k CG``: a whole ``SGN.step`` with exactly k CG iterations (trust region and
  line search on: the defaults), for the traced and the jvp products, each from the same
  weights; its mean number of passes over the batch is printed beside it.

On the CPU with one thread the clock is the process's CPU time, which other jobs on a shared
machine disturb far less than elapsed time (``--clock wall`` for elapsed time).

    python benchmarks/sgn_curvature.py                      # 1 thread, mlp, lenet, lenet5
    python benchmarks/sgn_curvature.py --models mlp --rounds 30 --threads 2

Models: ``mlp`` 784-256-256-10 ReLU; ``lenet`` the registry's LeNet (Entropy-SGD's
mnistconv: conv 20@5 → pool → conv 50@5 → pool → FC 500, with BatchNorm and dropout);
``lenet5`` the registry's ``sgn_conv_fashion`` (SGN's LeNet-5-like architecture_1).
"""

from __future__ import annotations

import argparse
import copy
import platform
import random
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from valleys import curvature, models
from valleys.optim import SGN

MODELS = {
    "mlp": (lambda: models.get("mlp", (784,), 10, widths=[256, 256]), (784,)),
    "lenet": (lambda: models.get("lenet", (1, 28, 28), 10), (1, 28, 28)),
    "lenet5": (lambda: models.get("sgn_conv_fashion", (1, 28, 28), 10), (1, 28, 28)),
}
GGN_METHODS = ("traced", "jvp", "linearize")
HVP_METHODS = ("traced", "reverse")
CG_ITERS = (1, 3, 10)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


Task = tuple[Callable[[], object] | None, Callable[[], object]]  # (untimed preparation, timed)


def measure(
    tasks: dict[str, Task], rounds: int, device: torch.device, clock: Callable[[], float]
) -> dict[str, float]:
    """Median seconds of each task over ``rounds`` rounds (after one warm-up round). Each
    round runs every task once, in a fresh random order, so that no measurement always
    follows the same one (a large allocation or a cold cache left by its predecessor)."""
    order = list(tasks)
    for prepare, run in tasks.values():
        if prepare is not None:
            prepare()
        run()
    rng = random.Random(0)
    times: dict[str, list[float]] = {name: [] for name in tasks}
    for _ in range(rounds):
        rng.shuffle(order)
        for name in order:
            prepare, run = tasks[name]
            if prepare is not None:
                prepare()
            _sync(device)
            start = clock()
            run()
            _sync(device)
            times[name].append(clock() - start)
    return {name: statistics.median(times[name]) for name in tasks}


def tasks_for(model_name: str, batch_size: int, device: torch.device):
    build, shape = MODELS[model_name]
    torch.manual_seed(0)
    model = build().to(device).train()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch_size, *shape, generator=gen).to(device)
    y = torch.randint(0, 10, (batch_size,), generator=gen).to(device)
    params = list(curvature.trainable_parameters(model).values())

    def gradient() -> None:
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()

    tasks: dict[str, Task] = {"gradient": (None, gradient)}
    passes: dict[str, list[float]] = {}

    def products(factory, method: str, label: str) -> None:
        with torch.no_grad():
            prod = factory(model, "cross_entropy", x, y, method=method)
        vectors = [[torch.randn_like(p) for p in params] for _ in range(2)]
        state = {"i": 0}

        def product() -> None:
            state["i"] ^= 1
            with torch.no_grad():
                prod(vectors[state["i"]])

        def setup() -> None:
            with torch.no_grad():
                factory(model, "cross_entropy", x, y, method=method)

        tasks[f"{label}-vp ({method})" if label == "GGN" else f"HVP ({method})"] = (None, product)
        tasks[f"{label} setup ({method})"] = (None, setup)

    for method in GGN_METHODS:
        products(curvature.ggn_fn, method, "GGN")
    for method in HVP_METHODS:
        products(curvature.hvp_fn, method, "HVP")

    start = copy.deepcopy(model.state_dict())
    for method in ("traced", "jvp"):
        for k in CG_ITERS:
            own = copy.deepcopy(model)
            # cg_tol=0: exactly k iterations; every timed step starts from the same weights and
            # optimizer state (repeated steps on one batch would otherwise solve it)
            opt = SGN(own, "cross_entropy", cg_max_iters=k, cg_warmup_steps=0, cg_tol=0.0)
            opt.curvature_method = method
            fresh = copy.deepcopy(opt.state_dict())
            label = f"SGN step, {k} CG ({method})"
            passes[label] = []

            def reset(own=own, opt=opt, fresh=fresh) -> None:
                own.load_state_dict(start)
                opt.load_state_dict(fresh)

            def step(opt=opt, label=label) -> None:
                opt.step(x, y)
                passes[label].append(opt.stats()["passes"])

            tasks[label] = (reset, step)
    return tasks, passes


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=21, help="timed rounds")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (default: 1)")
    parser.add_argument(
        "--clock",
        choices=("auto", "cpu", "wall"),
        default="auto",
        help="cpu: this process's CPU time (robust to other jobs on a shared machine; the "
        "default on the CPU with one thread), wall: elapsed time (the default otherwise)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    use_cpu = args.clock == "cpu" or (
        args.clock == "auto" and device.type == "cpu" and args.threads == 1
    )
    clock = time.process_time if use_cpu else time.perf_counter
    warnings.filterwarnings("ignore", category=UserWarning)  # linearize's const-folding note
    print(
        f"torch {torch.__version__}, Python {platform.python_version()}, {device}, "
        f"{torch.get_num_threads()} thread(s), batch {args.batch_size}, {args.rounds} rounds, "
        f"{'CPU' if use_cpu else 'wall'} clock"
    )
    for name in args.models:
        tasks, passes = tasks_for(name, args.batch_size, device)
        medians = measure(tasks, args.rounds, device, clock)
        unit = medians["gradient"]
        print(f"\n### {name}: gradient {1e3 * unit:.2f} ms\n")
        print("| measurement | ms | × gradient | passes/step |")
        print("|---|---:|---:|---:|")
        for label, seconds in medians.items():
            seen = passes.get(label)
            shown = f"{statistics.mean(seen):.1f}" if seen else ""
            print(f"| {label} | {1e3 * seconds:.2f} | {seconds / unit:.2f} | {shown} |")


if __name__ == "__main__":
    main()
