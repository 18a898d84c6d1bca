"""Data-parallel training runs for ``test_ddp.py``: the jobs, and the worker that runs them.

Run as a script under ``torchrun`` (``python -m torch.distributed.run --nproc_per_node=2
tests/train/ddpkit.py SPEC.json``), each process joins the gloo group once and runs every job
of the spec in order — one start-up for all of them — saving its own parameters and results to
``<out>/<job>.rank<r>.pt``; the test runs the same jobs in one process and compares.

Models are float64 (the 64-16-10 MLP on digits without BatchNorm or dropout), so that the only
differences between N processes and one are the orders of floating-point sums.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

from valleys import data, distributed, models
from valleys import optim as optim_registry
from valleys.train import config as C
from valleys.train import train

STEPS = 6
COMMON = (
    "data.batch_size=64",  # the global batch: 32 per process with 2
    f"run.max_steps={STEPS}",
    "run.log_every_steps=3",
    "run.eval_every_steps=3",
    "run.progress=false",
    "run.tensorboard=false",
    "run.threads=1",
)

# Hyperparameters that make a few steps move the weights visibly; an optimizer missing here
# runs with its defaults.
HPARAMS: dict[str, tuple[str, ...]] = {
    "sgd": ("optim.lr=0.2", "optim.momentum=0.9"),
    "nesterov": ("optim.lr=0.2",),
    "adam": ("optim.lr=0.01",),
    "adamw": ("optim.lr=0.01", "optim.weight_decay=0.1"),
    "entropy_sgd": ("optim.lr=0.5", "optim.langevin_steps=3"),
    "vsgd": ("optim.lr=0.05",),
    "sam": ("optim.lr=0.2", "optim.rho=0.1"),
    "sgn": ("optim.cg_max_iters=3", "optim.damping=0.01"),
}


def optimizer_overrides(name: str) -> list[str]:
    """The overrides of the run of optimizer ``name``."""
    return [*COMMON, f"optim.name={name}", *HPARAMS.get(name, ())]


def jobs(root: Path) -> list[dict[str, Any]]:
    """Every job, in the order the worker runs them (run directories under ``root``)."""
    out: list[dict[str, Any]] = []
    for name in optim_registry.names():
        out.append({"name": name, "overrides": optimizer_overrides(name)})
    # a last batch of each epoch split 19/18 (1437 = 7·200 + 37), augmented images, TensorBoard
    out.append(
        {
            "name": "uneven",
            "images": True,
            "overrides": [
                *optimizer_overrides("sgd"),
                "data.batch_size=200",
                "data.drop_last=false",
                "data.augment={pad: 1}",
                "run.max_steps=9",
                "run.tensorboard=true",
            ],
        }
    )
    # stopped after 3 steps, a copy kept at that point, then resumed to STEPS
    part = [*optimizer_overrides("entropy_sgd"), "run.max_steps=3"]
    out.append({"name": "part", "dir": "resume", "overrides": part, "copy_to": "resume_at3"})
    rest = [*optimizer_overrides("entropy_sgd"), "run.resume=true"]
    out.append({"name": "rest", "dir": "resume", "overrides": rest})
    # a time budget: rank 0's clock decides for every rank
    timed = [*optimizer_overrides("sgd"), "run.max_steps=null", "run.max_seconds=0.5"]
    out.append({"name": "timed", "overrides": timed})
    # fp16 with loss scaling: every pass averaged before the inf check, one skip decision
    for name in ("sam", "sgn"):
        amp = [*optimizer_overrides(name), "run.amp=fp16"]
        out.append({"name": f"fp16_{name}", "overrides": amp})
    # a directory that already holds a run: rank 0 finds out, every rank raises its error
    taken = [*optimizer_overrides("sgd"), "run.max_steps=1"]
    out.append({"name": "taken", "dir": "sgd", "overrides": taken, "expect_error": True})
    out.append({"name": "landscape", "landscape": True})
    out.append({"name": "fsdp", "fsdp": True})
    # the command line's train (valleys.cli.main, as `torchrun -m valleys train` runs it)
    cli = ["train", *optimizer_overrides("adam"), "run.max_steps=2"]
    out.append({"name": "cli", "argv": cli})
    # the command line's landscape diagnostics on that run: 8 batches shared out to 2 ranks
    data = ["--samples", "400", "--batch-size", "50", "--no-progress"]
    hessian = [
        "hessian",
        "{dir}",
        "--analysis",
        "top",
        "--analysis",
        "trace",
        "--trace-samples",
        "4",
        *data,
    ]
    sharp = ["sharpness", "{dir}", "--steps", "3", "--objective", "full", "--no-plots", *data]
    out.append({"name": "cli_landscape", "dir": "cli", "argvs": [hessian, sharp]})
    for job in out:
        job["dir"] = str(root / job.get("dir", job["name"]))
    return out


def digits(images: bool = False) -> data.Dataset:
    """digits in float64 (flattened, or ``(N, 1, 8, 8)`` images)."""
    ds = data.get("digits", flatten=not images)
    return dataclasses.replace(ds, x_train=ds.x_train.double(), x_test=ds.x_test.double())


def model_for(ds: data.Dataset) -> torch.nn.Module:
    """The 64-16-10 ReLU MLP in float64, initialised from seed 0."""
    torch.manual_seed(0)
    return models.get("mlp", ds.input_shape, ds.num_outputs, widths=[16]).double()


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    """Run one job in this process (one rank of several, or alone); returns what to compare."""
    if job.get("landscape"):
        return landscape_values()
    if job.get("fsdp"):
        return fsdp_values()
    if "argv" in job:
        return run_cli([*job["argv"], f"run.dir={job['dir']}"])
    if "argvs" in job:  # commands on the job's run directory
        argvs = [[a.replace("{dir}", job["dir"]) for a in argv] for argv in job["argvs"]]
        outputs = [run_cli(argv) for argv in argvs]
        from valleys.bench.analyze import read_records  # rank 0 wrote them

        records = read_records(job["dir"]) if distributed.is_main() else None
        return {"outputs": outputs, "records": records}
    ds = digits(job.get("images", False))
    model = model_for(ds)
    cfg = C.load([], [*job["overrides"], f"run.dir={job['dir']}"])
    if job.get("expect_error"):
        try:
            train(cfg, dataset=ds, model=model)
        except ValueError as err:
            return {"error": str(err)}
        return {"error": None}
    result = train(cfg, dataset=ds, model=model)
    return {
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "step": result.step,
        "final_eval": result.final_eval,
    }


def run_cli(argv: list[str]) -> dict[str, Any]:
    """``valleys.cli.main(argv)`` with what it printed."""
    from valleys import cli

    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = cli.main(argv)
    return {"code": code, "stdout": stdout.getvalue(), "stderr": stderr.getvalue()}


def landscape_values() -> dict[str, Any]:
    """Full-dataset loss, gradient, a Hessian-vector product, the top Hessian eigenvalue and
    Keskar sharpness of the untrained model on digits' test split in batches of 50 (360
    samples: 8 batches, the last one of 10)."""
    from valleys.data.loader import eval_batches
    from valleys.landscape import HessianOperator, keskar_sharpness, top_eigen
    from valleys.landscape.common import full_loss, full_loss_and_grad
    from valleys.train.evaluate import loss_function

    ds = digits()
    model = model_for(ds)
    loss_fn = loss_function("classification")

    def batches():
        return eval_batches(ds.x_test, ds.y_test, 50)

    params = list(model.parameters())
    value = full_loss(model, loss_fn, batches, accuracy=True)
    loss, grad = full_loss_and_grad(model, loss_fn, batches, params)
    v = [torch.ones_like(p) / p.numel() for p in params]
    hv = HessianOperator(model, loss_fn, batches)(v)
    top = top_eigen(model, loss_fn, batches, k=1, tol=1e-8, seed=0)
    sharp = keskar_sharpness(model, loss_fn, batches, epsilon=1e-3, steps=3, objective="full")
    one = [(ds.x_test[:50], ds.y_test[:50])]  # fewer batches than ranks: rank 1 adds zeros
    alone = full_loss(model, loss_fn, one).loss
    hv_one = HessianOperator(model, loss_fn, one)(v)
    return {
        "loss": value.loss,
        "accuracy": value.accuracy,
        "count": value.count,
        "grad_loss": loss,
        "grad": grad,
        "hv": hv,
        "top": torch.as_tensor(top.eigenvalues),
        "sharpness": torch.as_tensor(sharp.sharpness),
        "loss_one_batch": alone,
        "hv_one_batch": hv_one,
    }


def fsdp_values() -> dict[str, Any]:
    """Each registry optimizer on an FSDP2-sharded float64 MLP (``fully_shard`` per layer),
    3 steps with each rank on half of a global batch, against the same steps of the
    replicated model on the whole batch (Entropy-SGD without noise: DTensor draws its own).
    Returns ``{name: max |difference|}``, or the error message of what refuses it."""
    import torch.nn.functional as F
    from torch.distributed.fsdp import fully_shard

    from valleys.landscape.common import full_loss

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 10, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (64,), generator=gen)
    rows = distributed.shard_rows(64)
    hparams = {"entropy_sgd": {"langevin_steps": 2, "noise": 0.0}, "sam": {"lr": 0.1}}

    def mlp() -> torch.nn.Module:
        torch.manual_seed(1)
        return torch.nn.Sequential(
            torch.nn.Linear(10, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3)
        ).double()

    out: dict[str, Any] = {}
    for name in [*optim_registry.names(), "landscape"]:
        sharded, whole = mlp(), mlp()
        for layer in (sharded[0], sharded[2]):
            fully_shard(layer)
        fully_shard(sharded)
        try:
            if name == "landscape":
                full_loss(sharded, F.cross_entropy, [(x, y)])
                continue
            if optim_registry.spec(name).takes_model:
                optim_registry.get(name, sharded, loss_fn="cross_entropy")
                continue
            opts = [
                optim_registry.get(name, m.parameters(), **hparams.get(name, {}))
                for m in (sharded, whole)
            ]
        except ValueError as err:
            out[name] = str(err)
            continue
        batches = ((x[rows], y[rows]), (x, y))
        for opt, model, (xb, yb) in zip(opts, (sharded, whole), batches, strict=True):

            def closure(opt=opt, model=model, xb=xb, yb=yb) -> torch.Tensor:
                opt.zero_grad()
                loss = F.cross_entropy(model(xb), yb)
                loss.backward()
                return loss

            for _ in range(3):
                if optim_registry.spec(name).needs_closure:
                    opt.step(closure)
                else:
                    closure()
                    opt.step()
        out[name] = max(
            float((p.full_tensor() - q).abs().max())
            for p, q in zip(sharded.parameters(), whole.parameters(), strict=True)
        )
    return out


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    out = Path(spec["out"])
    distributed.init("cpu")
    rank = distributed.rank()
    for job in spec["jobs"]:
        values = run_job(job)
        torch.save(values, out / f"{job['name']}.rank{rank}.pt")
        if job.get("copy_to") and distributed.is_main():
            shutil.copytree(job["dir"], Path(job["dir"]).with_name(job["copy_to"]))
        distributed.barrier()
    distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
