"""Bad input, across the library and the CLI: one table, one row per mistake.

Each row says how to make the mistake (a library call, or the argv of ``valleys``), what must
come of it (the exception type, or the CLI's exit status) and a pattern that the message must
match: the problem (the argument and its value, the unknown name...) and the fix (the valid
range, the closest valid name, the setting to change). Every message is one line. From the CLI
it is the only line on stderr, with no traceback and no warning. Files already in the working
folder (a finished run, data files, config files) are byte-identical afterwards, and a failed
command adds none, except a diverging run, which keeps what it wrote up to its last good
checkpoint.

The CLI rows run in this process, which sees what a user would (stderr, the exit status, an
exception escaping ``main`` as the traceback it would print); a few of them run again in a real
process at the end.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import math
import re
import shutil
import struct
import subprocess
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from valleys import cli, data, models, optim, schedules
from valleys.data.base import Dataset
from valleys.train import TrainingError, loop
from valleys.train import config as C

# a short digits run; the default model (MLP 64-128-10) unless a row names another
BASE = (
    "data.batch_size=32",
    "run.max_steps=3",
    "run.threads=1",
    "run.tensorboard=false",
    "run.progress=false",
)
# the finished run every folder may hold as ``done/`` (see ``_done``)
DONE = (*BASE, "model.widths=[16]", "run.max_steps=4", "run.checkpoint_every_steps=2")
TEMPLATE: dict[str, Path] = {}


@dataclass(frozen=True)
class Row:
    """``run``: a library call given the row's folder, or the argv of ``valleys``;
    ``expect``: the exception type, or the exit status; ``message``: a regex searched in the
    message; ``setup``: prepares the folder; ``writes``: the failed command may add files."""

    id: str
    run: Callable[[Path], Any] | tuple[str, ...]
    expect: type[BaseException] | int
    message: str
    setup: Callable[[Path], None] | None = None
    writes: bool = False


# ---------------------------------------------------------------------------------------------
# what the rows need


def _param() -> list[nn.Parameter]:
    return [nn.Parameter(torch.zeros(3))]


def _opt(name: str, **hp: Any) -> Callable[[Path], Any]:
    if getattr(optim.spec(name), "takes_model", False):
        return lambda _: optim.get(name, nn.Linear(3, 2), loss_fn="cross_entropy", **hp)
    return lambda _: optim.get(name, _param(), **hp)


def _cfg(*overrides: str, run_dir: str = "run") -> C.Config:
    return C.load([], [*BASE, f"run.dir={run_dir}", *overrides])


def _dataset(x_train, y_train, x_test, y_test, task="classification", k=2) -> Dataset:
    return Dataset("tiny", task, x_train, y_train, x_test, y_test, k)


def _empty_dataset() -> Dataset:
    return _dataset(
        torch.zeros(0, 4),
        torch.zeros(0, dtype=torch.long),
        torch.zeros(3, 4),
        torch.zeros(3, dtype=torch.long),
    )


def _nan_dataset() -> Dataset:
    x = torch.randn(40, 4)
    x[7, 2] = math.nan
    return _dataset(
        x, torch.zeros(40, dtype=torch.long), torch.randn(8, 4), torch.zeros(8, dtype=torch.long)
    )


def _huge_targets() -> Dataset:
    # finite data whose squared error overflows float32: the loss is inf at the first step
    y = torch.full((64, 1), 1e30)
    return _dataset(torch.randn(64, 3), y, torch.randn(8, 3), y[:8], task="regression", k=1)


def _idx(path: Path, magic: int, dims: tuple[int, ...], compress: bool = True) -> None:
    raw = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in dims)
    raw += bytes(math.prod(dims))
    path.write_bytes(gzip.compress(raw) if compress else raw)


IDX = {
    "train-images-idx3-ubyte": (2051, (6, 28, 28)),
    "train-labels-idx1-ubyte": (2049, (6,)),
    "t10k-images-idx3-ubyte": (2051, (4, 28, 28)),
    "t10k-labels-idx1-ubyte": (2049, (4,)),
}


def _mnist(kind: str) -> Callable[[Path], None]:
    """MNIST files under ``<folder>/data/mnist``: valid but tiny, except as ``kind`` says."""

    def setup(folder: Path) -> None:
        root = folder / "data" / "mnist"
        root.mkdir(parents=True)
        for name, (magic, dims) in IDX.items():
            if kind == "empty" and name.startswith("train"):
                dims = (0, *dims[1:])
            _idx(root / f"{name}.gz", magic, dims)
        spoiled = root / "train-images-idx3-ubyte.gz"
        if kind == "gzip":
            spoiled.write_bytes(spoiled.read_bytes()[:30])
        elif kind == "magic":
            _idx(spoiled, 2049, (6, 28, 28))
        elif kind == "short":
            raw = gzip.decompress(spoiled.read_bytes())
            spoiled.write_bytes(gzip.compress(raw[:-100]))

    return setup


def _cifar_junk(folder: Path) -> None:
    root = folder / "data" / "cifar-10-batches-py"
    root.mkdir(parents=True)
    for name in [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta"]:
        (root / name).write_bytes(b"\x80\x04junk")


def _write(name: str, text: str) -> Callable[[Path], None]:
    return lambda folder: (folder / name).write_text(text)


def _done(folder: Path) -> None:
    shutil.copytree(TEMPLATE["done"], folder / "done")


def _done_truncated(folder: Path) -> None:
    _done(folder)
    path = folder / "done" / "checkpoint.pt"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _resume_done(*overrides: str) -> tuple[str, ...]:
    return ("train", *DONE, "run.dir=done", "run.resume=true", *overrides)


def _train(*overrides: str) -> tuple[str, ...]:
    return ("train", *BASE, "run.dir=run", *overrides)


def _train_model(model: nn.Module, dataset: Dataset | None = None, *overrides: str):
    return lambda _: loop.train(_cfg(*overrides), model=model, dataset=dataset)


# ---------------------------------------------------------------------------------------------
# the table

LIBRARY = [
    # optimizers: every registry entry, through the registry
    Row(
        "sgd-negative-lr", _opt("sgd", lr=-0.1), ValueError, r"^Invalid lr: -0\.1 \(must be >= 0\)"
    ),
    Row(
        "sgd-lr-of-wrong-type",
        _opt("sgd", lr="fast"),
        ValueError,
        r"Invalid lr: 'fast' \(expected a real number\)",
    ),
    Row(
        "sgd-negative-momentum",
        _opt("sgd", momentum=-0.5),
        ValueError,
        r"Invalid momentum: -0\.5 \(must be >= 0\)",
    ),
    Row(
        "nesterov-without-momentum",
        _opt("nesterov", momentum=0.0),
        ValueError,
        r"Invalid momentum: 0\.0 \(Nesterov momentum needs momentum > 0.*set momentum",
    ),
    Row(
        "adam-beta-above-one",
        _opt("adam", betas=(1.5, 0.999)),
        ValueError,
        r"Invalid betas\[0\]: 1\.5 \(must lie in \[0\.0, 1\.0\)\)",
    ),
    Row(
        "adam-one-beta",
        _opt("adam", betas=(0.9,)),
        ValueError,
        r"Invalid betas: \(0\.9,\) \(expected two numbers in \[0, 1\)",
    ),
    Row(
        "adam-lr-none",
        _opt("adam", lr=None),
        ValueError,
        r"Invalid lr: None \(expected a real number\)",
    ),
    Row(
        "adamw-negative-eps",
        _opt("adamw", eps=-1e-8),
        ValueError,
        r"Invalid eps: -1e-08 \(must be >= 0\)",
    ),
    Row(
        "adamw-no-parameters",
        lambda _: optim.get("adamw", []),
        ValueError,
        r"Invalid params: optimizer 'adamw' got no parameters \(pass model\.parameters\(\)",
    ),
    Row(
        "entropy-sgd-fractional-steps",
        _opt("entropy_sgd", langevin_steps=2.5),
        ValueError,
        r"Invalid langevin_steps: 2\.5 \(expected an integer >= 0\)",
    ),
    Row(
        "entropy-sgd-nan-scope",
        _opt("entropy_sgd", scope=math.nan),
        ValueError,
        r"Invalid scope: nan \(must be finite\)",
    ),
    Row(
        "entropy-sgd-momentum-one",
        _opt("entropy_sgd", momentum=1.0),
        ValueError,
        r"Invalid momentum: 1\.0 \(must lie in \[0\.0, 1\.0\)\)",
    ),
    Row(
        "entropy-sgd-misspelt-variant",
        _opt("entropy_sgd", variant="papr"),
        ValueError,
        r"Invalid variant: 'papr' \(expected one of .*did you mean 'paper'\?",
    ),
    Row(
        "vsgd-tau1-zero",
        _opt("vsgd", tau1=0.0),
        ValueError,
        r"Invalid tau1: 0\.0 \(must lie in \(0\.0, 1\.0\]\)",
    ),
    Row(
        "vsgd-infinite-lr",
        _opt("vsgd", lr=math.inf),
        ValueError,
        r"Invalid lr: inf \(must be finite\)",
    ),
    Row(
        "vsgd-ghattg-zero",
        _opt("vsgd", ghattg=0.0),
        ValueError,
        r"Invalid ghattg: 0\.0 \(must be > 0\)",
    ),
    Row(
        "sam-negative-rho",
        _opt("sam", rho=-0.1),
        ValueError,
        r"Invalid rho: -0\.1 \(must be >= 0\)",
    ),
    Row(
        "sam-multi-pass-base",
        _opt("sam", base="entropy_sgd"),
        ValueError,
        r"Invalid base: 'entropy_sgd' \(.*choose one of sgd",
    ),
    Row(
        "sam-base-negative-lr",
        _opt("sam", base="adam", lr=-1.0),
        ValueError,
        r"Invalid lr: -1\.0 \(must be >= 0\)",
    ),
    Row(
        "unknown-optimizer",
        lambda _: optim.get("adma", _param()),
        ValueError,
        r"Unknown optimizer: 'adma' \(did you mean 'adam'\?",
    ),
    Row(
        "unknown-hyperparameter",
        _opt("sgd", lrr=0.1),
        ValueError,
        r"Unknown hyperparameter of optimizer 'sgd': 'lrr' \(did you mean 'lr'\?",
    ),
    # schedules
    Row(
        "cosine-zero-steps",
        lambda _: schedules.cosine(1, peak_lr=0.1, total_steps=0),
        ValueError,
        r"Invalid total_steps: 0 \(must be an integer >= 1\)",
    ),
    Row(
        "cosine-negative-peak",
        lambda _: schedules.cosine(1, peak_lr=-0.1, total_steps=10),
        ValueError,
        r"Invalid peak_lr: -0\.1 \(must be > 0\)",
    ),
    Row(
        "knee-explores-past-the-end",
        lambda _: schedules.knee(1, peak_lr=0.1, total_steps=10, explore_steps=20),
        ValueError,
        r"Invalid warmup_steps \+ explore_steps: 20 \(must be <= total_steps = 10",
    ),
    Row(
        "linear-step-zero",
        lambda _: schedules.linear(0, peak_lr=0.1, total_steps=10),
        ValueError,
        r"Invalid step: 0 \(must be >= 1: steps are 1-based",
    ),
    Row(
        "piecewise-values-count",
        lambda _: schedules.piecewise(1, values=[0.1], boundaries=[5]),
        ValueError,
        r"Invalid values: \[0\.1\] \(expected len\(boundaries\) \+ 1 = 2 values\)",
    ),
    Row(
        "step-decay-zero-gamma",
        lambda _: schedules.step_decay(1, lr=0.1, step_size=10, gamma=0),
        ValueError,
        r"Invalid gamma: 0 \(must be > 0\)",
    ),
    Row(
        "inverse-sqrt-no-warmup",
        lambda _: schedules.inverse_sqrt(1, peak_lr=0.1, warmup_steps=0),
        ValueError,
        r"Invalid warmup_steps: 0 \(must be an integer >= 1\)",
    ),
    Row(
        "one-cycle-pct-above-one",
        lambda _: schedules.one_cycle(1, peak_lr=0.1, total_steps=10, pct_start=1.5),
        ValueError,
        r"Invalid pct_start: 1\.5 \(must lie in \[0\.0, 1\.0\]\)",
    ),
    Row(
        "one-cycle-misspelt-anneal",
        lambda _: schedules.one_cycle(1, peak_lr=0.1, total_steps=10, anneal="cosine"),
        ValueError,
        r"Invalid anneal: 'cosine' \(.*did you mean 'cos'\?",
    ),
    Row(
        "unknown-schedule",
        lambda _: schedules.attach(torch.optim.SGD(_param(), lr=0.1), "cosin", total_steps=10),
        ValueError,
        r"Unknown schedule: 'cosin' \(did you mean 'cosine'\?",
    ),
    # data
    Row(
        "unknown-dataset",
        lambda _: data.get("mnits"),
        ValueError,
        r"Unknown dataset: 'mnits' \(did you mean 'mnist'\?",
    ),
    Row(
        "unknown-dataset-option",
        lambda _: data.get("digits", flaten=True),
        ValueError,
        r"Unknown option for dataset 'digits': 'flaten' \(did you mean 'flatten'\?",
    ),
    Row(
        "digits-test-fraction",
        lambda _: data.get("digits", test_frac=1.5),
        ValueError,
        r"Invalid test_frac: 1\.5 \(must lie in \(0\.0, 1\.0\)\)",
    ),
    Row(
        "mnist-missing",
        lambda f: data.get("mnist", root=f / "nowhere"),
        FileNotFoundError,
        r"MNIST not found in .*nowhere/mnist .*: pass download=True",
    ),
    Row(
        "mnist-bad-gzip",
        lambda f: data.get("mnist", root=f / "data"),
        ValueError,
        r"Malformed data file .*train-images-idx3-ubyte\.gz: bad gzip data .*delete it and pass "
        r"download=True",
        _mnist("gzip"),
    ),
    Row(
        "mnist-wrong-magic",
        lambda f: data.get("mnist", root=f / "data"),
        ValueError,
        r"Malformed data file .*: IDX magic number 2049, expected 2051 .*delete it",
        _mnist("magic"),
    ),
    Row(
        "mnist-truncated",
        lambda f: data.get("mnist", root=f / "data"),
        ValueError,
        r"Malformed data file .*: header says 6×28×28 = 4704 bytes .*found 4604 .*delete it",
        _mnist("short"),
    ),
    Row(
        "cifar-corrupt-pickle",
        lambda f: data.get("cifar10", root=f / "data"),
        ValueError,
        r"Malformed data file .*data_batch_1: not a CIFAR pickle .*delete it",
        _cifar_junk,
    ),
    # models
    Row(
        "unknown-model",
        lambda _: models.get("resnet", (3, 32, 32), 10),
        ValueError,
        r"Unknown model: 'resnet' \(did you mean 'resnet18'\?",
    ),
    Row(
        "lenet-on-tiny-images",
        lambda _: models.get("lenet", (1, 4, 4), 10),
        ValueError,
        r"Invalid input_shape: \(1, 4, 4\) \(lenet takes images shaped \(C, H, W\) with H, W >= "
        r"\d+: choose another model",
    ),
    Row(
        "resnet-on-vectors",
        lambda _: models.get("resnet18", (64,), 10),
        ValueError,
        r"Invalid input_shape: \(64,\) \(resnet18 takes images .*data\.flatten=false",
    ),
    Row(
        "mlp-zero-width",
        lambda _: models.get("mlp", (64,), 10, widths=[0]),
        ValueError,
        r"Invalid widths\[0\]: 0 \(must be an integer >= 1\)",
    ),
    Row(
        "mlp-misspelt-activation",
        lambda _: models.get("mlp", (64,), 10, activation="rleu"),
        ValueError,
        r"Invalid activation: 'rleu' \(.*did you mean 'relu'\?",
    ),
    Row(
        "no-outputs",
        lambda _: models.get("mlp", (64,), 0),
        ValueError,
        r"Invalid num_outputs: 0 \(must be an integer >= 1\)",
    ),
    # training
    Row(
        "model-for-other-inputs",
        _train_model(nn.Linear(3, 10)),
        ValueError,
        r"Model does not fit the data: mat1 and mat2 .*inputs shaped \(64,\) and 10 outputs: "
        r"build the model",
    ),
    Row(
        "model-with-other-outputs",
        _train_model(nn.Sequential(nn.Flatten(), nn.Linear(64, 5))),
        ValueError,
        r"Model does not fit the data: it maps \(2, 64\) to \(2, 5\) \(dataset 'digits'",
    ),
    Row(
        "checkpoint-of-another-model",
        lambda f: loop.train(
            C.load([], [*DONE, f"run.dir={f / 'done'}", "run.resume=true"]),
            model=nn.Sequential(nn.Flatten(), nn.Linear(64, 10)),
        ),
        ValueError,
        r"Cannot resume .*done: its checkpoint does not fit this run \(Error\(s\) in loading "
        r"state_dict.*Unexpected key.*size mismatch.*\); resume it with the model .* or start a "
        r"new run\.dir",
        _done,
    ),
    Row(
        "empty-dataset",
        lambda _: loop.train(_cfg(), dataset=_empty_dataset()),
        ValueError,
        r"Empty dataset 'tiny': its train split has no samples; .*check its files and data options",
    ),
    Row(
        "nan-in-the-data",
        lambda _: loop.train(_cfg(), dataset=_nan_dataset()),
        ValueError,
        r"Invalid dataset 'tiny': its train split holds NaN or infinite values; .*clean the data",
    ),
    Row(
        "nan-loss",
        lambda _: loop.train(_cfg("optim.lr=1e30")),
        TrainingError,
        r"Training diverged: the loss became nan at step \d+ .*last good checkpoint is .*\(step "
        r"0\) \(lower optim\.lr",
        writes=True,
    ),
    Row(
        "inf-loss",
        lambda _: loop.train(_cfg(), dataset=_huge_targets()),
        TrainingError,
        r"Training diverged: the loss became inf at step 1 .*\(lower optim\.lr",
        writes=True,
    ),
    Row(
        "evaluate-nothing",
        lambda _: loop.evaluate(
            nn.Linear(3, 2),
            torch.zeros(0, 3),
            torch.zeros(0, dtype=torch.long),
            task="classification",
        ),
        ValueError,
        r"Invalid x: shape \(0, 3\) \(evaluate needs at least one sample\)",
    ),
    # configuration
    Row(
        "config-override-without-value",
        lambda _: C.load([], ["run.max_steps"]),
        ValueError,
        r"Malformed override: 'run\.max_steps' \(expected key=value",
    ),
    Row(
        "config-unknown-key",
        lambda _: C.load([], ["run.max_step=3"]),
        ValueError,
        r"did you mean 'max_steps'\?",
    ),
    Row(
        "config-malformed-file",
        lambda f: C.load([f / "bad.yaml"]),
        ValueError,
        r"Malformed YAML in .*bad\.yaml at line \d+, column \d+: .*\(fix the syntax there\)",
        _write("bad.yaml", "optim:\n  lr: [1,\n"),
    ),
]

if "sgn" in optim.names():
    LIBRARY += [
        Row(
            "sgn-negative-lr",
            _opt("sgn", lr=-1.0),
            ValueError,
            r"Invalid lr: -1\.0 \(must be >= 0\)",
        ),
        Row(
            "sgn-from-parameters",
            lambda _: optim.get("sgn", _param(), loss_fn="mse"),
            ValueError,
            r"Invalid params for optimizer 'sgn': it is built from the model",
        ),
        Row(
            "sgn-torch-gradscaler",
            lambda _: optim.get("sgn", nn.Linear(3, 2), loss_fn="cross_entropy").step(
                torch.randn(4, 3), torch.tensor([0, 1, 0, 1]), scaler=torch.amp.GradScaler("cpu")
            ),
            ValueError,
            r"Invalid scaler: 'GradScaler' \(SGN scales its own passes: .*LossScaler",
        ),
    ]

CLI = [
    # names
    Row(
        "cli-unknown-optimizer",
        _train("optim.name=entropy-sgd"),
        2,
        r"Unknown optimizer: 'entropy-sgd' \(did you mean 'entropy_sgd'\?",
    ),
    Row(
        "cli-unknown-model",
        _train("model.name=lenett"),
        2,
        r"Unknown model: 'lenett' \(did you mean 'lenet'\?",
    ),
    Row(
        "cli-unknown-dataset",
        _train("data.name=digit"),
        2,
        r"Unknown dataset: 'digit' \(did you mean 'digits'\?",
    ),
    Row(
        "cli-unknown-schedule",
        _train("schedule.name=cosin"),
        2,
        r"Unknown schedule: 'cosin' \(did you mean 'cosine'\?",
    ),
    Row(
        "cli-unknown-section",
        _train("optimizer.lr=0.1"),
        2,
        r"Unknown config section \(in the overrides\): 'optimizer' \(did you mean 'optim'\?",
    ),
    Row(
        "cli-unknown-hyperparameter",
        _train("optim.lrr=0.1"),
        2,
        r"Unknown hyperparameter of optimizer 'sgd': 'lrr' \(did you mean 'lr'\?",
    ),
    Row(
        "cli-misspelt-choice",
        _train("run.amp=bf61"),
        2,
        r"Invalid run\.amp: 'bf61' \(expected one of 'bf16', 'fp16'; did you mean 'bf16'\?",
    ),
    Row(
        "cli-misspelt-compile-backend",
        _train("run.compile=true", "run.compile_backend=indcutor"),
        2,
        r"Invalid run\.compile_backend: 'indcutor' \(expected one of .*did you mean 'inductor'\?",
    ),
    # overrides and YAML
    Row(
        "cli-override-without-value",
        _train("run.seed"),
        2,
        r"Malformed override: 'run\.seed' \(expected key=value, e\.g\. optim\.lr=0\.1\)",
    ),
    Row(
        "cli-override-without-section",
        _train("seed=1"),
        2,
        r"Malformed override: 'seed=1' \(a key names a section and a field",
    ),
    Row(
        "cli-override-unclosed-list",
        _train("model.widths=[16"),
        2,
        r"Malformed override: 'model\.widths=\[16' \(.*close its brackets",
    ),
    Row(
        "cli-malformed-yaml",
        ("train", "--config", "bad.yaml", *BASE),
        2,
        r"Malformed YAML in bad\.yaml at line 3, column 1: .*\(fix the syntax there\)",
        _write("bad.yaml", "optim:\n  lr: 0.1\n\tmomentum: 0.9\n"),
    ),
    Row(
        "cli-duplicate-yaml-key",
        ("train", "--config", "dup.yaml", *BASE),
        2,
        r"Malformed YAML in dup\.yaml at line 3.*duplicate key lr",
        _write("dup.yaml", "optim:\n  lr: 0.1\n  lr: 0.2\n"),
    ),
    Row(
        "cli-yaml-list",
        ("train", "--config", "list.yaml", *BASE),
        2,
        r"Invalid config file list\.yaml: expected a mapping of sections at the top",
        _write("list.yaml", "- optim\n- run\n"),
    ),
    Row(
        "cli-config-missing",
        ("train", "--config", "nope.yaml", *BASE),
        2,
        r"Config file not found: nope\.yaml \(check the path\)",
    ),
    Row(
        "cli-config-is-a-folder",
        ("train", "--config", ".", *BASE),
        2,
        r"Invalid config file \.: it is a folder \(pass a YAML file\)",
    ),
    Row(
        "cli-comparison-file",
        ("train", "--config", "cmp.yaml", *BASE),
        2,
        r"cmp\.yaml is a comparison file .*run it with `valleys demo",
        _write("cmp.yaml", "base: {}\nvariants:\n  a: {}\n"),
    ),
    Row(
        "cli-unknown-option",
        ("train", "--bogus", *BASE),
        2,
        r"unrecognized arguments: --bogus \(see valleys --help\)",
    ),
    # types and ranges
    Row(
        "cli-steps-not-a-number",
        _train("run.max_steps=three"),
        2,
        r"Invalid run\.max_steps: 'three' \(expected an integer\)",
    ),
    Row(
        "cli-threads-fractional",
        _train("run.threads=1.5"),
        2,
        r"Invalid run\.threads: 1\.5 \(expected an integer\)",
    ),
    Row(
        "cli-resume-not-a-bool",
        _train("run.resume=maybe"),
        2,
        r"Invalid run\.resume: 'maybe' \(expected true or false\)",
    ),
    Row(
        "cli-widths-not-a-list",
        _train("model.widths=16"),
        2,
        r"Invalid model\.widths: 16 \(expected a list\)",
    ),
    Row(
        "cli-no-budget",
        ("train", "run.dir=run", "run.progress=false"),
        2,
        r"No budget: set run\.max_steps, run\.max_epochs or run\.max_seconds",
    ),
    Row(
        "cli-batch-larger-than-the-data",
        _train("data.batch_size=5000"),
        2,
        r"Invalid data\.batch_size: 5000 \(larger than the 1437 training samples; lower it",
    ),
    Row("cli-sgd-negative-lr", _train("optim.lr=-1"), 2, r"Invalid lr: -1\.0 \(must be >= 0\)"),
    Row(
        "cli-adam-one-beta",
        _train("optim.name=adam", "optim.betas=[0.9]"),
        2,
        r"Invalid betas: \(0\.9,\) \(expected two numbers in \[0, 1\)",
    ),
    Row(
        "cli-nesterov-without-momentum",
        _train("optim.name=nesterov", "optim.momentum=0"),
        2,
        r"Invalid momentum: 0\.0 \(Nesterov momentum needs momentum > 0",
    ),
    Row(
        "cli-entropy-sgd-negative-noise",
        _train("optim.name=entropy_sgd", "optim.noise=-1"),
        2,
        r"Invalid noise: -1\.0 \(must be >= 0\)",
    ),
    Row(
        "cli-vsgd-tau2-above-one",
        _train("optim.name=vsgd", "optim.tau2=1.5"),
        2,
        r"Invalid tau2: 1\.5 \(must lie in \(0\.0, 1\.0\]\)",
    ),
    Row(
        "cli-warmup-longer-than-the-run",
        _train("schedule.name=cosine", "schedule.warmup_steps=100"),
        2,
        r"Invalid warmup_steps: 100 \(must be <= total_steps = 3\)",
    ),
    Row(
        "cli-time-schedule-without-time",
        _train("schedule.progress=time"),
        2,
        r"Invalid schedule\.progress: 'time' \(it needs a time budget: set run\.max_seconds\)",
    ),
    Row(
        "cli-cuda-device-missing",
        _train("run.device=cuda:7"),
        2,
        r"Invalid run\.device: 'cuda:7' \(",
    ),
    # data
    Row(
        "cli-mnist-missing",
        _train("data.name=mnist", "data.root=nowhere"),
        2,
        r"MNIST not found in nowhere/mnist .*pass download=True \(CLI: `valleys train "
        r"data\.download=true`\)",
    ),
    Row(
        "cli-mnist-corrupt",
        _train("data.name=mnist", "data.root=data"),
        2,
        r"Malformed data file data/mnist/train-images-idx3-ubyte\.gz: bad gzip data .*delete it "
        r"and pass download=True",
        _mnist("gzip"),
    ),
    Row(
        "cli-mnist-empty",
        _train("data.name=mnist", "data.root=data"),
        2,
        r"Empty dataset 'mnist': its train split has no samples \(read from data/mnist\)",
        _mnist("empty"),
    ),
    Row(
        "cli-cifar-corrupt",
        _train("data.name=cifar10", "data.root=data"),
        2,
        r"Malformed data file data/cifar-10-batches-py/data_batch_1: not a CIFAR pickle",
        _cifar_junk,
    ),
    # model against data
    Row(
        "cli-lenet-on-flat-digits",
        _train("model.name=lenet"),
        2,
        r"Invalid input_shape: \(64,\) \(lenet takes images shaped \(C, H, W\); "
        r".*data\.flatten=false",
    ),
    Row(
        "cli-lenet-on-small-images",
        _train("model.name=lenet", "data.flatten=false"),
        2,
        r"Invalid input_shape: \(1, 8, 8\) \(lenet takes images .* H, W >= \d+: choose another "
        r"model",
    ),
    Row(
        "cli-augment-flat-digits",
        _train("data.augment={pad: 1}"),
        2,
        r"Invalid data\.augment: \{'pad': 1\} \(random crops and flips need images, .*set "
        r"data\.flatten=false",
    ),
    # run directories and checkpoints
    Row(
        "cli-run-exists",
        ("train", *DONE, "run.dir=done"),
        2,
        r"Run directory done already holds a run \(finished\); set run\.resume=true",
        _done,
    ),
    Row(
        "cli-checkpoint-of-another-model",
        _resume_done("model.widths=[32]"),
        2,
        r"Cannot resume done: its checkpoint was written with another configuration "
        r"\(model\.widths: \[16\] -> \[32\]\).*use a new run\.dir",
        _done,
    ),
    Row(
        "cli-truncated-checkpoint",
        _resume_done(),
        2,
        r"Unreadable checkpoint done/checkpoint\.pt: .*\(the file is truncated, damaged or not a "
        r"checkpoint; .*restore it from a copy",
        _done_truncated,
    ),
    Row(
        "cli-foreign-checkpoint",
        _resume_done(),
        2,
        r"Unreadable checkpoint done/checkpoint\.pt: not a valleys checkpoint \(format 1; "
        r".*start again in a new run\.dir\)",
        lambda f: (_done(f), torch.save({"w": torch.ones(2)}, f / "done" / "checkpoint.pt")),
    ),
    Row(
        "cli-resume-without-dir",
        ("train", *BASE, "run.resume=true"),
        2,
        r"Invalid run\.resume: true \(it needs run\.dir",
    ),
    Row(
        "cli-run-dir-is-a-file",
        _train("run.dir=notes.txt"),
        2,
        r"Invalid run\.dir: 'notes\.txt' \(it is a file\)",
        _write("notes.txt", "mine"),
    ),
    Row(
        "cli-run-dir-under-a-file",
        _train("run.dir=notes.txt/run"),
        2,
        r"Invalid run\.dir: 'notes\.txt/run' \(notes\.txt is a file, not a folder",
        _write("notes.txt", "mine"),
    ),
    Row(
        "cli-run-dir-holds-other-files",
        _train("run.dir=mine"),
        2,
        r"Invalid run\.dir: 'mine' \(it exists and holds other files; a run needs a new or empty "
        r"directory\)",
        lambda f: ((f / "mine").mkdir(), (f / "mine" / "notes.txt").write_text("mine")),
    ),
    # diverging runs: exit 1, the last good checkpoint kept
    Row(
        "cli-nan-loss",
        _train("optim.lr=1e30"),
        1,
        r"^valleys train: Training diverged: the loss became nan at step \d+ in run; .*last good "
        r"checkpoint is run/checkpoint\.pt \(step 0\) \(lower optim\.lr",
        writes=True,
    ),
    Row(
        "cli-inf-loss",
        _train("data.name=sine10", "optim.lr=10", "run.max_steps=200"),
        1,
        r"^valleys train: Training diverged: the loss became (inf|nan) at step \d+ in run; "
        r".*\(lower optim\.lr",
        writes=True,
    ),
    # other commands
    Row(
        "cli-plot-not-a-run",
        ("plot", "nowhere"),
        2,
        r"Not a run directory \(no metrics\.jsonl\): nowhere",
    ),
    Row(
        "cli-plot-malformed-metrics",
        ("plot", "broken"),
        2,
        r"Malformed record in broken/metrics\.jsonl, line 2",
        lambda f: (
            (f / "broken").mkdir(),
            (f / "broken" / "metrics.jsonl").write_text('{"kind": "train"}\n{oops\n'),
        ),
    ),
    Row(
        "cli-demo-unknown-variant",
        ("demo", "--epochs", "1", "entropy-sgd"),
        2,
        r"Unknown variant .*'entropy-sgd' \(did you mean 'entropy_sgd'\?",
    ),
    Row(
        "cli-demo-epochs-not-a-number",
        ("demo", "--epochs", "x"),
        2,
        r"argument --epochs: invalid float value: 'x' \(see valleys demo --help\)",
    ),
]

ROWS = LIBRARY + CLI


# ---------------------------------------------------------------------------------------------
# the checks


@pytest.fixture(scope="module", autouse=True)
def _finished_run(tmp_path_factory):
    """The finished run that ``_done`` copies into a row's folder (trained once)."""
    path = tmp_path_factory.mktemp("template") / "done"
    loop.train(C.load([], [*DONE, f"run.dir={path}"]))
    TEMPLATE["done"] = path


def _digests(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _cli(argv: tuple[str, ...]) -> tuple[int, list[str]]:
    """Exit status and stderr lines of ``valleys argv`` in this process; warnings count as
    the stderr lines they would print, an escaping exception as the traceback it would be."""
    err = io.StringIO()
    with (
        contextlib.redirect_stderr(err),
        contextlib.redirect_stdout(io.StringIO()),
        warnings.catch_warnings(record=True) as caught,
    ):
        warnings.simplefilter("always")
        try:
            code = cli.main(list(argv))
        except SystemExit as exit_:  # argparse's own errors
            code = exit_.code
        except BaseException as exc:  # it would be a traceback
            pytest.fail(f"valleys {' '.join(argv)} ends in a traceback: {exc!r}")
    lines = err.getvalue().splitlines() + [f"warning: {w.message}" for w in caught]
    return code, lines


def test_the_table_is_large_and_covers_every_optimizer():
    assert len(ROWS) >= 40
    assert len({r.id for r in ROWS}) == len(ROWS)
    assert sum(isinstance(r.run, tuple) for r in ROWS) >= 20
    covered = {r.id.split("-")[0] for r in LIBRARY} | {r.id.split("-")[1] for r in CLI}
    for name in optim.names():
        assert name.split("_")[0] in covered, f"no bad-input row for optimizer {name!r}"


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_bad_input(row: Row, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    if row.setup is not None:
        row.setup(tmp_path)
    before = _digests(tmp_path)
    if isinstance(row.run, tuple):
        code, lines = _cli(row.run)
        assert code == row.expect, lines
        assert len(lines) == 1, lines
        line = lines[0]
        assert line.startswith(("valleys: error: ", f"valleys {row.run[0]}: ")), line
        assert "Traceback" not in line
        assert re.search(row.message, line), line
    else:
        with pytest.raises(row.expect) as info:
            row.run(tmp_path)
        message = str(info.value)
        assert len(message.strip().splitlines()) == 1, message
        assert re.search(row.message, message), message
    after = _digests(tmp_path)
    assert {k: after.get(k) for k in before} == before  # nothing already written changed
    if not row.writes:
        assert after.keys() == before.keys()  # and the failed command wrote nothing


def test_a_diverging_run_keeps_its_last_good_checkpoint(tmp_path):
    cfg = _cfg("optim.lr=1e30", "run.checkpoint_every_steps=1", run_dir=str(tmp_path / "run"))
    with pytest.raises(TrainingError, match=r"last good checkpoint is .* \(step 1\)"):
        loop.train(cfg)
    from valleys.train import checkpoint as ckpt

    state = ckpt.load(tmp_path / "run" / "checkpoint.pt")
    assert state["step"] == 1
    assert all(torch.isfinite(t).all() for t in state["model"].values())


def test_overrides_may_follow_the_config_option(tmp_path, capsys):
    (tmp_path / "a.yaml").write_text("optim: {name: adam}\n")
    args = ["train", "run.max_steps=3", "--config", str(tmp_path / "a.yaml"), "optim.lr=0.5"]
    assert cli.main([*args, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "name: adam" in out and "lr: 0.5" in out and "max_steps: 3" in out


REAL = ["cli-mnist-corrupt", "cli-nan-loss"]  # test_cli runs config errors in a process


def test_cli_rows_in_a_real_process(tmp_path):
    """The same one line and exit status from ``python -m valleys`` itself."""
    rows = {r.id: r for r in CLI}
    procs = {}
    for name in REAL:
        row, folder = rows[name], tmp_path / name
        folder.mkdir()
        if row.setup is not None:
            row.setup(folder)
        procs[name] = subprocess.Popen(
            [sys.executable, "-m", "valleys", *row.run],
            cwd=folder,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    for name, proc in procs.items():
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == rows[name].expect, err
        assert "Traceback" not in err
        lines = err.strip().splitlines()
        assert len(lines) == 1, lines
        assert re.search(rows[name].message, lines[0]), lines[0]
