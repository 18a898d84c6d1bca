"""The training loop: one closure for every optimizer, budgets, evaluation, checkpoints.

``train(cfg)`` runs a :class:`~valleys.train.config.Config` into a run directory and returns a
:class:`RunResult`. The pieces are usable on their own and re-exported here:
:func:`make_closure` and :class:`LossScaler` (:mod:`valleys.train.closure`), :func:`evaluate`,
:func:`refresh_batchnorm` and :class:`WeightEMA` (:mod:`valleys.train.evaluate`).

Steps, passes, epochs
---------------------
A *step* is one ``optimizer.step``. A *pass* is one call of the closure: one forward and one
backward pass on one mini-batch. SGD, Adam, VSGD… make one pass per step; Entropy-SGD makes
``langevin_steps`` (each on a fresh batch); SGN counts every pass over its one batch of the
step: the gradient, each CG product and each trial loss of its line search. ``epoch`` is
steps / steps per epoch (``N // B``, the Lua code's definition: an Entropy-SGD "epoch"
consumes L batches per step) and
``effective_epochs`` is passes / steps per epoch, the data actually processed; both are
reported with the training time so that optimizers can be compared per step, per pass and
per second.

Run directory and resuming
--------------------------
``run.dir`` receives ``config.yaml`` (the resolved configuration), ``env.json``,
``metrics.jsonl`` (see :mod:`valleys.train.log`), ``checkpoint.pt`` and ``tb/`` (TensorBoard).
A directory that already holds a run is never overwritten: starting a run there is an error
unless ``run.resume=true``, which continues it from ``checkpoint.pt``. Resuming restores the
model, the optimizer, the scheduler, the loss scaler, the EMA, the batch stream (permutation,
position, generators), the global RNGs (torch CPU and CUDA, Python, NumPy), the counters and
the training time, so that on the CPU the resumed run is bit-identical to an uninterrupted one.
Only budgets and process settings (``config.ALLOWED_ON_RESUME``) may change; any other
difference from the checkpoint's configuration is an error before anything is written.
Records that the interrupted segment wrote after its last checkpoint move to
``metrics.superseded.jsonl``.

Mixed precision
---------------
``run.amp="bf16"`` runs forward and loss under ``torch.autocast(dtype=bfloat16)``.
``run.amp="fp16"`` adds dynamic loss scaling (:class:`LossScaler`): the closure multiplies the
loss by the scale, backpropagates, divides the gradients by it and records whether any was
inf/NaN, inside *every* call. A single-pass optimizer then steps only if the gradients are
finite. A multi-pass optimizer (Entropy-SGD) has already moved the weights inside its step, so
the loop snapshots weights and optimizer state before the step and restores them when any call
of the step produced non-finite gradients: the step is skipped as a whole. SGN computes its
passes itself, under the closure's ``autocast`` and with its ``scaler`` (the loss scale enters
the backward passes of its gradient and GGN products; see :class:`valleys.optim.SGN`), and
skips a step whose gradient or any CG product overflowed by itself, setting the closure's
``found_inf``. Either way the scale is halved on a skipped step and doubled after 2000 finite
ones (torch's GradScaler defaults).

Compilation
-----------
``run.compile=true`` trains through ``torch.compile(model)``; evaluation, EMA and checkpoints
use the plain module (its weights are the compiled one's), so checkpoints hold plain keys.
SGN is built from the plain module: its passes are its own traced graph of the model
(:mod:`valleys.curvature`), which cannot be traced through a dynamo-optimized module, so
compilation leaves SGN's steps as they are.
"""

from __future__ import annotations

import copy
import math
import os
import random
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from valleys import distributed, schedules
from valleys import optim as optim_registry
from valleys.train import checkpoint as ckpt
from valleys.train import config as C
from valleys.train import parallel
from valleys.train.checkpoint import write_atomic
from valleys.train.closure import Closure, LossScaler, make_closure
from valleys.train.evaluate import (
    LOSS_NAMES,
    WeightEMA,
    evaluate,
    loss_function,
    refresh_batchnorm,
)
from valleys.train.log import MetricsLog, Progress, TensorBoard, env_info, write_json

__all__ = [
    "Closure",
    "LossScaler",
    "RunResult",
    "TrainingError",
    "WeightEMA",
    "evaluate",
    "make_closure",
    "refresh_batchnorm",
    "select_device",
    "train",
]

CHECKPOINT = "checkpoint.pt"

# The clock of training time; tests replace it to make time budgets deterministic.
_now: Callable[[], float] = time.perf_counter


class TrainingError(RuntimeError):
    """The run could not go on (non-finite loss, loss-scale underflow); the message says what
    was kept."""


# ---------------------------------------------------------------------------------------------
# closure, loss scaling, EMA


def select_device(name: str) -> torch.device:
    """``"auto"`` → CUDA when available, else the CPU; otherwise the named device, checked."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"Invalid run.device: {name!r} (CUDA is not available here)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(
                f"Invalid run.device: {name!r} (only {torch.cuda.device_count()} CUDA devices)"
            )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"Invalid run.device: {name!r} (MPS is not available here)")
    return device


@dataclass
class RunResult:
    """What a run reached."""

    dir: Path
    step: int
    epoch: float
    passes: int
    effective_epochs: float
    train_time_s: float
    reason: str
    train_loss: float | None
    final_eval: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> list[tuple[str, str]]:
        """(label, value) rows for a summary table."""
        rows = [
            ("run dir", str(self.dir)),
            ("stopped by", self.reason),
            ("steps", str(self.step)),
            ("epochs", f"{self.epoch:.3f}"),
            ("passes", str(self.passes)),
            ("effective epochs", f"{self.effective_epochs:.3f}"),
            ("train time", f"{self.train_time_s:.2f} s"),
        ]
        if self.train_loss is not None:
            rows.append(("train loss (last log)", f"{self.train_loss:.4f}"))
        for key, value in self.final_eval.items():
            if key.startswith(("test_", "train_", "ema_")) and not key.endswith("_s"):
                shown = f"{100 * value:.2f}%" if key.endswith("accuracy") else f"{value:.4f}"
                rows.append((key.replace("_", " "), shown))
        return rows


def _default_dir(cfg: C.Config) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path("runs") / f"{cfg.data.name}-{cfg.model.name}-{cfg.optim.name}-{stamp}"
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return path


def _holds_run(path: Path) -> bool:
    return (path / "config.yaml").exists() or (path / CHECKPOINT).exists()


def _check_dataset(dataset: Any, cfg: C.Config) -> None:
    """One-line errors, before anything is written, for a dataset that no run can use."""
    name = dataset.name
    source = dataset.info.get("source") if isinstance(dataset.info, dict) else None
    where = f" (read from {source})" if source else ""
    for split in ("train", "test"):
        x, y = getattr(dataset, f"x_{split}"), getattr(dataset, f"y_{split}")
        if x.shape[0] == 0:
            raise ValueError(
                f"Empty dataset {name!r}: its {split} split has no samples{where}; a run needs "
                "samples to train and evaluate on: check its files and data options"
            )
        for t in (x, y):
            # one float64 sum rather than an isfinite mask the size of the set: finite
            # float32 values cannot overflow it, a NaN or inf anywhere makes it non-finite
            if t.is_floating_point() and not math.isfinite(float(t.sum(dtype=torch.float64))):
                raise ValueError(
                    f"Invalid dataset {name!r}: its {split} split holds NaN or infinite "
                    f"values{where}; training on them gives a non-finite loss: clean the data "
                    "or its preprocessing"
                )
    if cfg.data.augment and dataset.x_train.ndim != 4:
        raise ValueError(
            f"Invalid data.augment: {cfg.data.augment} (random crops and flips need images, "
            f"but dataset {name!r} gives inputs shaped {tuple(dataset.x_train.shape[1:])}: "
            "set data.flatten=false for an image set, or leave data.augment out)"
        )


@torch.no_grad()
def _check_fits(model: nn.Module, dataset: Any) -> None:
    """One forward pass of two training samples in eval mode (no buffer or RNG touched): a model
    built for other inputs or another number of outputs fails here, in one line, rather than
    inside the first step."""
    x, y = dataset.x_train[:2], dataset.y_train[:2]
    shape, k = tuple(dataset.x_train.shape[1:]), dataset.num_outputs
    fix = (
        f"dataset {dataset.name!r} has inputs shaped {shape} and {k} outputs: build the model "
        "for the dataset's input_shape and num_outputs"
    )
    was_training = model.training
    model.eval()
    try:
        out = model(x)
    except (RuntimeError, ValueError, TypeError, IndexError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"Model does not fit the data: {first} ({fix})") from None
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor):
        raise ValueError(f"Model does not fit the data: it returns {type(out).__name__} ({fix})")
    if dataset.task == "classification":
        fits = out.ndim == 2 and out.shape == (x.shape[0], k)
    else:
        fits = out.numel() == y.numel()
    if not fits:
        raise ValueError(
            f"Model does not fit the data: it maps {tuple(x.shape)} to {tuple(out.shape)} ({fix})"
        )


class _Timer:
    """Training time: accumulated between start() and stop(), CUDA-synchronised."""

    def __init__(self, device: torch.device, elapsed: float = 0.0):
        self.device = device
        self.elapsed = elapsed
        self._since: float | None = None

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def start(self) -> None:
        self.sync()
        self._since = _now()

    def stop(self) -> None:
        if self._since is not None:
            self.sync()
            self.elapsed += _now() - self._since
            self._since = None

    def read(self, sync: bool = True) -> float:
        if self._since is None:
            return self.elapsed
        if sync:
            self.sync()
        return self.elapsed + _now() - self._since


class Trainer:
    """One run. Build with a config, then :meth:`run`. See :func:`train`."""

    def __init__(
        self,
        cfg: C.Config,
        *,
        dataset: Any = None,
        model: nn.Module | None = None,
    ):
        from valleys.data.loader import Augment, BatchStream
        from valleys.train.restore import build_dataset, build_model

        cfg = C.validate(cfg)
        r = cfg.run
        # several processes (torchrun): join them; rank 0 alone names the run directory,
        # checks it and reads the checkpoint, for every rank
        self.device = distributed.init(select_device(r.device))
        self.world, self.main = distributed.world_size(), distributed.is_main()
        self.run_dir, saved = distributed.from_main(lambda: self._locate(cfg))

        # data
        if dataset is None:
            dataset = distributed.main_first(lambda: build_dataset(cfg))
        _check_dataset(dataset, cfg)
        self.dataset = dataset.to(self.device)
        self.task = dataset.task
        n = int(dataset.x_train.shape[0])
        self.spe = C.steps_per_epoch(n, cfg.data.batch_size, cfg.data.drop_last)
        parallel.check_batches(cfg, n, self.world)
        self.cfg = C.resolve(cfg, num_train=n)
        self.resolved = C.to_dict(self.cfg)
        if saved is not None:
            self._check_resumable(saved["config"])
        self.step_budget = C.step_budget(self.cfg, self.spe)

        # model, optimizer, schedule (seeded: the same config builds the same initial weights)
        torch.manual_seed(r.seed)
        random.seed(r.seed)
        np.random.seed(r.seed % 2**32)
        if model is None:
            model = build_model(self.cfg, dataset)
        self.model = model.to(self.device)
        _check_fits(self.model, self.dataset)
        self.train_model = self.model
        if r.compile:
            self.train_model = torch.compile(self.model, backend=r.compile_backend)
        spec = optim_registry.spec(cfg.optim.name)
        hparams = dict(cfg.optim.hparams)  # the user's values (validated), not the resolved
        if spec.takes_model:  # SGN: the plain model and the task's loss (see "Compilation")
            hparams["loss_fn"] = LOSS_NAMES[self.task]
            self.optimizer = optim_registry.get(cfg.optim.name, self.model, **hparams)
        else:
            self.optimizer = optim_registry.get(cfg.optim.name, self.model.parameters(), **hparams)
        self.needs_closure = spec.needs_closure
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]
        s = self.cfg.schedule
        self.scheduler = None
        if s.progress == "steps":
            self.scheduler = schedules.attach(self.optimizer, s.name, **s.kwargs)
        else:
            self._base_lrs = [g["lr"] for g in self.optimizer.param_groups]
            self._set_time_lr(0.0)

        self.autocast = None
        if r.amp is not None:
            dtype = torch.bfloat16 if r.amp == "bf16" else torch.float16
            device_type = self.device.type
            self.autocast = lambda: torch.autocast(device_type, dtype=dtype)
        self.scaler = LossScaler() if r.amp == "fp16" else None
        self.ema = WeightEMA(self.params, r.ema_decay) if r.ema_decay is not None else None
        self._ema_model = copy.deepcopy(self.model) if self.ema is not None else None

        augment = None
        if cfg.data.augment:
            augment = Augment(**{"seed": r.seed, **cfg.data.augment})
        self.stream = BatchStream(
            self.dataset.x_train,
            self.dataset.y_train,
            cfg.data.batch_size,
            seed=r.seed,
            sampling=cfg.data.sampling,
            drop_last=cfg.data.drop_last,
            augment=augment,
            shard=(distributed.rank(), self.world),
        )
        self.closure = make_closure(
            self.train_model,
            loss_function(self.task),
            self.stream.next,
            self.optimizer,
            same_batch=spec.same_batch,
            autocast=self.autocast,
            scaler=self.scaler,
            reduce=distributed.mean_reducer(lambda: self.stream.weight),
        )

        # counters
        self.step = 0
        self.passes_base = 0
        self.skipped_steps = 0
        self.timer = _Timer(self.device)
        self.wall_before = 0.0
        self._loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self._loss_count = 0
        self._interval = {"time": 0.0, "passes": 0}
        self.last_eval_step: int | None = None
        self.last_eval: dict[str, Any] = {}
        self.last_train_loss: float | None = None
        self.lr = self.optimizer.param_groups[0]["lr"]
        self.finished = False
        self.metrics_offset = 0
        self._resumed = saved is not None
        if saved is not None:
            self._load(saved)
        distributed.broadcast_module_(self.model)  # as DistributedDataParallel does

    # -- run directory -------------------------------------------------------------------

    def _locate(self, cfg: C.Config) -> tuple[Path, dict[str, Any] | None]:
        self.run_dir = Path(cfg.run.dir) if cfg.run.dir else _default_dir(cfg)
        return self.run_dir, self._check_dir(cfg)

    def _check_dir(self, cfg: C.Config) -> dict[str, Any] | None:
        """The checkpoint to resume from, or None for a fresh run; errors leave the directory
        untouched."""
        path = self.run_dir
        if path.exists() and not path.is_dir():
            raise ValueError(f"Invalid run.dir: {str(path)!r} (it is a file)")
        for parent in path.parents:
            if parent.exists() and not parent.is_dir():
                raise ValueError(
                    f"Invalid run.dir: {str(path)!r} ({parent} is a file, not a folder: "
                    "choose a run.dir elsewhere)"
                )
        if not _holds_run(path):
            stale = set(ckpt.stale_temporaries(path)) if path.is_dir() else set()
            if path.exists() and any(p not in stale for p in path.iterdir()):
                raise ValueError(
                    f"Invalid run.dir: {str(path)!r} (it exists and holds other files; a run "
                    "needs a new or empty directory)"
                )
            return None
        if not cfg.run.resume:
            state = "finished" if self._finished_marker(path) else "unfinished"
            raise ValueError(
                f"Run directory {path} already holds a run ({state}); set run.resume=true "
                "to continue it, or choose another run.dir"
            )
        if not (path / CHECKPOINT).exists():
            raise ValueError(
                f"Cannot resume {path}: it has no {CHECKPOINT} (the run stopped before its first "
                "checkpoint); start it again in a new run.dir"
            )
        return ckpt.load(path / CHECKPOINT)

    def _closing_records_written(self) -> bool:
        """Whether ``metrics.jsonl`` ends with a complete ``end`` record: a run killed after
        its final checkpoint but before that record is finished again on resume."""
        import json

        try:
            data = (self.run_dir / "metrics.jsonl").read_bytes()
            last = json.loads(data.splitlines()[-1]) if data.endswith(b"\n") else None
        except (OSError, IndexError, ValueError):
            return False
        return isinstance(last, dict) and last.get("kind") == "end"

    @staticmethod
    def _finished_marker(path: Path) -> bool:
        try:
            lines = (path / "metrics.jsonl").read_text().strip().splitlines()
        except OSError:
            return False
        return bool(lines) and '"kind": "end"' in lines[-1]

    def _check_resumable(self, saved: dict[str, Any]) -> None:
        diff = {
            k: v
            for k, v in C.config_diff(saved, self.resolved).items()
            if k not in C.ALLOWED_ON_RESUME
        }
        if diff:
            shown = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in list(diff.items())[:4])
            more = f" and {len(diff) - 4} more" if len(diff) > 4 else ""
            raise ValueError(
                f"Cannot resume {self.run_dir}: its checkpoint was written with another "
                f"configuration ({shown}{more}); only budgets and process settings may change "
                "on resume: use a new run.dir for a different run"
            )

    # -- state -----------------------------------------------------------------------------

    @property
    def passes(self) -> int:
        return self.passes_base + self.closure.calls

    def state_dict(self) -> dict[str, Any]:
        return {
            "config": self.resolved,
            "step": self.step,
            "passes": self.passes,
            "skipped_steps": self.skipped_steps,
            "train_time_s": self.timer.read(),
            "wall_time_s": self._wall(),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
            "scaler": None if self.scaler is None else self.scaler.state_dict(),
            "ema": None if self.ema is None else self.ema.state_dict(),
            "stream": self.stream.state_dict(),
            "rng": parallel.rng_state(self.device),
            "log": {
                "loss_sum": self._loss_sum.detach().cpu(),
                "loss_count": self._loss_count,
                "interval_time": self._interval["time"],
                "interval_passes": self._interval["passes"],
                "last_eval_step": self.last_eval_step,
                "last_eval": self.last_eval,
                "last_train_loss": self.last_train_loss,
                "lr": self.lr,
            },
            "metrics_offset": self.metrics_offset,
            "finished": self.finished,
        }

    def _load(self, state: dict[str, Any]) -> None:
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            if self.scheduler is not None:
                self.scheduler.load_state_dict(state["scheduler"])
            if self.scaler is not None:
                self.scaler.load_state_dict(state["scaler"])
            if self.ema is not None:
                self.ema.load_state_dict(state["ema"])
            self.stream.load_state_dict(state["stream"])
        except (RuntimeError, KeyError, ValueError, TypeError) as err:
            # torch's message spreads the mismatched keys over several lines
            shown = " ".join(str(err).split()) or type(err).__name__
            shown = shown if len(shown) <= 300 else shown[:297] + "..."
            raise ValueError(
                f"Cannot resume {self.run_dir}: its checkpoint does not fit this run ({shown}); "
                "resume it with the model and optimizer it was written with, or start a new "
                "run.dir"
            ) from None
        self.step = int(state["step"])
        self.passes_base = int(state["passes"])
        self.skipped_steps = int(state["skipped_steps"])
        self.timer.elapsed = float(state["train_time_s"])
        self.wall_before = float(state["wall_time_s"])
        log = state["log"]
        self._loss_sum = log["loss_sum"].to(self.device)
        self._loss_count = int(log["loss_count"])
        self._interval = {"time": log["interval_time"], "passes": log["interval_passes"]}
        self.last_eval_step = log["last_eval_step"]
        self.last_eval = dict(log["last_eval"])
        self.last_train_loss = log["last_train_loss"]
        self.lr = log["lr"]
        self.metrics_offset = int(state["metrics_offset"])
        self.finished = bool(state["finished"])
        self._rng = state["rng"]

    # -- helpers ---------------------------------------------------------------------------

    def _wall(self) -> float:
        return self.wall_before + (_now() - self._wall_start)

    def _set_time_lr(self, elapsed: float) -> None:
        s = self.cfg.schedule
        fraction = elapsed / float(self.cfg.run.max_seconds)
        total = int(s.kwargs.get("total_steps", C.TIME_RESOLUTION_STEPS))
        f = schedules.factor(s.name, schedules.virtual_step(fraction, total), **s.kwargs)
        for group, base in zip(self.optimizer.param_groups, self._base_lrs, strict=True):
            group["lr"] = base * f

    def _counters(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "epoch": self.step / self.spe,
            "passes": self.passes,
            "effective_epochs": self.passes / self.spe,
            "samples": self.passes * self.cfg.data.batch_size,
            "train_time_s": self.timer.read(),
            "wall_time_s": self._wall(),
        }

    def _budget_reason(self) -> str | None:
        r = self.cfg.run
        if self.step_budget is not None and self.step >= self.step_budget:
            if r.max_steps is not None and self.step >= r.max_steps:
                return "max_steps"
            return "max_epochs"
        if r.max_seconds is not None and self._clock() >= r.max_seconds:
            return "max_seconds"
        return None

    def _clock(self) -> float:
        """Training time; with several processes rank 0's, so that every rank takes the same
        time-based decisions (budget, learning rate) at the same step."""
        elapsed = self.timer.read()
        return distributed.broadcast_scalar(elapsed) if self.world > 1 else elapsed

    def _due(self, every_steps: int | None, every_epochs: float | None) -> bool:
        k = self.step
        if every_steps is not None and k % every_steps == 0:
            return True
        if every_epochs is not None:
            period = every_epochs * self.spe
            return math.floor(k / period + 1e-9) > math.floor((k - 1) / period + 1e-9)
        return False

    # -- one step --------------------------------------------------------------------------

    def _snapshot(self) -> tuple[list[torch.Tensor], dict[str, Any]]:
        return [p.detach().clone() for p in self.params], copy.deepcopy(self.optimizer.state_dict())

    def _restore(self, snap: tuple[list[torch.Tensor], dict[str, Any]]) -> None:
        with torch.no_grad():
            for p, saved in zip(self.params, snap[0], strict=True):
                p.copy_(saved)
        self.optimizer.load_state_dict(snap[1])

    def train_step(self) -> tuple[torch.Tensor, bool]:
        """One optimizer step; returns (loss of the step's first pass, skipped)."""
        c = self.closure
        c.begin_step()
        self.lr = self.optimizer.param_groups[0]["lr"]
        skipped = False
        if self.needs_closure:
            snap = self._snapshot() if self.scaler is not None else None
            loss = self.optimizer.step(c)
            if self.scaler is not None:
                skipped = bool(c.found_inf)
                if skipped:
                    self._restore(snap)
                self.scaler.update(skipped)
        else:
            loss = c()
            if self.scaler is not None:
                skipped = bool(c.found_inf)
                if not skipped:
                    self.optimizer.step()
                self.scaler.update(skipped)
            else:
                self.optimizer.step()
        if self.ema is not None and not skipped:
            self.ema.update(self.params)
        if self.scheduler is not None:
            with warnings.catch_warnings():
                # a skipped fp16 step did not call optimizer.step(): torch would warn
                warnings.simplefilter("ignore", UserWarning)
                self.scheduler.step()
        self.step += 1
        if skipped:
            self.skipped_steps += 1
        return loss, skipped

    # -- evaluation and records ------------------------------------------------------------

    def evaluate_now(self) -> dict[str, Any]:
        """Evaluate on the test split (and the train split with ``run.eval_train``), with the
        BatchNorm refresh and the EMA weights as configured."""
        r = self.cfg.run
        ds = self.dataset
        bs = self.cfg.data.eval_batch_size
        start = _now()
        out: dict[str, Any] = {}
        parallel.average_buffers_(self.model)
        views = [("", self.model)]
        if self.ema is not None:
            em = self._ema_model
            em.load_state_dict(self.model.state_dict())  # buffers (and weights, replaced next)
            self.ema.copy_to(list(em.parameters()))
            views.append(("ema_", em))
        for prefix, model in views:
            if r.bn_refresh:
                refresh_batchnorm(model, ds.x_train, r.bn_refresh_batch_size, self.autocast)
            splits = [("test", ds.x_test, ds.y_test)]
            if r.eval_train:
                splits.append(("train", ds.x_train, ds.y_train))
            for split, x, y in splits:
                values = parallel.evaluate(
                    model, x, y, task=self.task, batch_size=bs, autocast=self.autocast
                )
                for key, value in values.items():
                    out[f"{prefix}{split}_{key}"] = value
        out["eval_time_s"] = _now() - start
        return out

    def _metric_name(self) -> str:
        return "test_accuracy" if self.task == "classification" else "test_mse"

    def _log_train(self) -> dict[str, Any]:
        loss = float(self._loss_sum) / self._loss_count if self._loss_count else float("nan")
        self.last_train_loss = loss
        now = self.timer.read()
        passes = self.passes - self._interval["passes"]
        dt = now - self._interval["time"]
        samples_per_s = passes * self.cfg.data.batch_size / dt if dt > 0 else None
        stats = self.optimizer.stats() if hasattr(self.optimizer, "stats") else {}
        record = {
            "kind": "train",
            **self._counters(),
            "lr": self.lr,
            "loss": loss,
            "steps_in_mean": self._loss_count,
            "skipped_steps": self.skipped_steps,
            "samples_per_s": samples_per_s,
            "stats": stats,
        }
        if self.scaler is not None:
            record["loss_scale"] = self.scaler.scale
        self._loss_sum.zero_()
        self._loss_count = 0
        self._interval = {"time": now, "passes": self.passes}
        self.metrics.write(record)
        tb = {"train/loss": loss, "lr": self.lr}
        tb.update({f"optim/{k}": v for k, v in stats.items()})
        if samples_per_s is not None:
            tb["speed/samples_per_s"] = samples_per_s
        self.tb.scalars(self.step, tb)
        shown: dict[str, Any] = {"loss": loss}
        metric = self.last_eval.get(self._metric_name())
        if metric is not None:
            shown[self._metric_name().replace("test_", "test ")] = metric
        if samples_per_s:
            shown["samples/s"] = round(samples_per_s)
        self.progress.update(self.step, **shown)
        return record

    def _log_eval(self) -> dict[str, Any]:
        values = self.evaluate_now()
        record = {"kind": "eval", **self._counters(), "lr": self.lr, **values}
        self.last_eval = {k: v for k, v in record.items() if k != "kind"}
        self.last_eval_step = self.step
        self.metrics.write(record)
        self.tb.scalars(
            self.step,
            {
                k.replace("_", "/", 1): v
                for k, v in values.items()
                if k.startswith(("test_", "train_", "ema_")) and not k.endswith("_s")
            },
        )
        return record

    def _save_checkpoint(self) -> None:
        parallel.average_buffers_(self.model)
        if not self.main:  # rank 0 writes for all
            return
        self.metrics_offset = self.metrics.offset
        ckpt.save(self.run_dir / CHECKPOINT, self.state_dict())

    def _check_finite(self, loss: torch.Tensor | None) -> None:
        value = self._loss_sum if loss is None else loss
        if bool(torch.isfinite(value)):
            return
        shown = float(value)
        self.timer.stop()
        self._log_train()
        self.metrics.write(
            {"kind": "end", **self._counters(), "reason": "non-finite loss", "loss": shown}
        )
        path = self.run_dir / CHECKPOINT
        if self.main and path.exists():
            kept = f"the last good checkpoint is {path} (step {ckpt.load(path)['step']})"
        else:
            kept = "no checkpoint had been written yet"
        where = f"at step {self.step}" if loss is not None else f"by step {self.step}"
        raise TrainingError(
            f"Training diverged: the loss became {shown} {where} in {self.run_dir}; the run "
            f"stopped and {kept} (lower optim.lr or change the schedule)"
        )

    def _close(self) -> None:
        self.metrics.close()
        self.tb.close()
        self.progress.close()

    # -- the loop --------------------------------------------------------------------------

    def _open(self) -> None:
        r = self.cfg.run
        resumed = self._resumed
        if not self.main:  # the run directory is rank 0's: the others write nothing
            self.metrics = parallel.NullLog()
            if not resumed:
                self._save_checkpoint()  # its collective part (buffers), as rank 0 does
            self.tb = TensorBoard(self.run_dir / "tb", enabled=False)
            self.progress = Progress(None, enabled=False)
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for stale in ckpt.stale_temporaries(self.run_dir):  # from a process killed mid-write
            stale.unlink(missing_ok=True)
        self.metrics = MetricsLog(self.run_dir / "metrics.jsonl")
        if resumed:
            self.metrics.truncate_to(self.metrics_offset)
        else:
            # a checkpoint before anything else, so that a run killed at any later point can
            # be resumed (a kill before it leaves an empty directory: a fresh start)
            self._save_checkpoint()
        self.metrics.open()
        text = C.to_yaml(self.cfg)
        write_atomic(self.run_dir / "config.yaml", lambda f: f.write(text.encode()))
        env_path = self.run_dir / "env.json"
        env = env_info(self.device)
        segment = {
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "start_step": self.step,
            "world_size": self.world,
            "argv": env.pop("argv"),
        }
        if resumed and env_path.exists():
            import json

            try:
                previous = json.loads(env_path.read_text())
            except (OSError, ValueError):
                previous = {}
            segments = [*previous.get("segments", []), segment]
        else:
            segments = [segment]
        write_json(env_path, {**env, "segments": segments})
        purge = self.step + 1 if resumed else None
        self.tb = TensorBoard(self.run_dir / "tb", enabled=r.tensorboard, purge_step=purge)
        self.progress = Progress(self.step_budget, initial=self.step, enabled=r.progress)

    def run(self) -> RunResult:
        """Train until a budget is reached; see :func:`train`."""
        r = self.cfg.run
        self._wall_start = _now()
        if (
            self._resumed
            and self.finished
            and self._budget_reason() is not None
            and distributed.from_main(self._closing_records_written)
        ):
            return self._result(self._budget_reason() or "finished", self.last_eval)
        old_threads = torch.get_num_threads()
        old_deterministic = torch.are_deterministic_algorithms_enabled()
        if r.threads:
            torch.set_num_threads(r.threads)
        if r.deterministic:
            if self.device.type == "cuda":
                os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
                torch.backends.cudnn.benchmark = False
                torch.backends.cudnn.deterministic = True
            torch.use_deterministic_algorithms(True)
        self._open()
        try:
            if self._resumed:
                parallel.set_rng_state(self._rng, self.device)
            return self._loop()
        finally:
            self._close()
            torch.set_num_threads(old_threads)
            torch.use_deterministic_algorithms(old_deterministic)

    def _loop(self) -> RunResult:
        r = self.cfg.run
        # On the CPU a per-step check costs nothing; on an accelerator it would synchronise,
        # so the loss is checked at each record instead. fp16 skips non-finite steps itself.
        check_each_step = self.device.type == "cpu" and self.scaler is None
        self.finished = False  # a finished run resumed with a larger budget goes on
        if self.step == 0 and r.eval_at_start and self.last_eval_step is None:
            self._log_eval()
        reason = self._budget_reason()
        self.timer.start()
        while reason is None:
            if self.scheduler is None:
                self._set_time_lr(self._clock())
            loss, skipped = self.train_step()
            if not skipped:
                self._loss_sum += loss.double()
                self._loss_count += 1
                if check_each_step:
                    self._check_finite(loss)
            reason = self._budget_reason()
            due_log = self.step % r.log_every_steps == 0
            due_eval = self._due(r.eval_every_steps, r.eval_every_epochs)
            due_ckpt = bool(r.checkpoint_every_steps) and (
                self.step % r.checkpoint_every_steps == 0
            )
            if due_log or due_eval or due_ckpt:
                self.timer.stop()
                self._check_health(check_each_step)
                if due_log:
                    self._log_train()
                if due_eval:
                    self._log_eval()
                if due_ckpt:
                    self._save_checkpoint()
                self.timer.start()
        self.timer.stop()
        self._check_health(check_each_step)
        return self._finish(reason)

    def _check_health(self, checked_each_step: bool) -> None:
        if not checked_each_step and self._loss_count:
            self._check_finite(None)
        if self.scaler is not None and self.scaler.scale < 2.0**-24:
            self.metrics.write(
                {"kind": "end", **self._counters(), "reason": "loss scale underflow"}
            )
            raise TrainingError(
                f"Training diverged: the fp16 loss scale fell below 2^-24 by step {self.step} "
                f"(every step overflowed); {self.run_dir} keeps its last checkpoint"
            )

    def _finish(self, reason: str) -> RunResult:
        self.finished = True
        self._save_checkpoint()  # before the closing records: a resumed run supersedes them
        if self._loss_count:
            self._log_train()
        if self.last_eval_step != self.step:
            self._log_eval()
        self.metrics.write({"kind": "end", **self._counters(), "reason": reason})
        self._close()
        return self._result(reason, self.last_eval)

    def _result(self, reason: str, final_eval: dict[str, Any]) -> RunResult:
        return RunResult(
            dir=self.run_dir,
            step=self.step,
            epoch=self.step / self.spe,
            passes=self.passes,
            effective_epochs=self.passes / self.spe,
            train_time_s=self.timer.read(),
            reason=reason,
            train_loss=self.last_train_loss,
            final_eval=dict(final_eval),
        )


def train(cfg: C.Config, *, dataset: Any = None, model: nn.Module | None = None) -> RunResult:
    """Run ``cfg`` (see :mod:`valleys.train.config`) into its run directory.

    ``dataset`` (a ``valleys.data.Dataset``) and ``model`` replace what ``cfg.data`` and
    ``cfg.model`` would build, for library use and tests; the config then only labels them.
    Bad configuration, a run directory that already holds another run, or a checkpoint that
    does not fit raise ``ValueError`` before anything is written; missing data raises
    ``FileNotFoundError``; a diverging run raises :class:`TrainingError` after closing its
    logs, leaving its last good checkpoint.
    """
    return Trainer(cfg, dataset=dataset, model=model).run()
