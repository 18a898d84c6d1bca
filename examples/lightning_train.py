"""Train a valleys model with any valleys optimizer under PyTorch Lightning.

    pip install "valleys[lightning]"
    python examples/lightning_train.py --optim sgn --steps 100
    python examples/lightning_train.py --optim sam --set lr=0.1 --set rho=0.05
    python examples/lightning_train.py --optim entropy_sgd --set langevin_steps=5
    python examples/lightning_train.py --optim adam --set lr=0.01 --precision bf16-mixed

Which optimizers can use Lightning's automatic optimization
-----------------------------------------------------------
In automatic optimization Lightning calls ``optimizer.step(closure)``. Its closure runs
``training_step`` on the batch Lightning drew for this step, zeroes the gradients,
backpropagates and returns the (detached) loss, as often as the optimizer calls it, and always
on that one batch. That is valleys' closure contract for every optimizer that evaluates one
batch per step (``same_batch`` or a single pass in the registry):

* sgd, nesterov, adam, adamw, vsgd call it once: automatic optimization.
* SAM calls it twice on the same batch (at w, then at w + ε̂): automatic optimization.
* Entropy-SGD calls it ``langevin_steps`` times and needs a *fresh* batch each time; Lightning's
  closure would evaluate one batch L times. Manual optimization: the loader hands out L·B
  samples per step and the module's closure walks through them, B at a time.
* SGN takes no loss closure: it needs the batch itself (``step(inputs, targets)``) and makes
  its gradient, GGN products and trial losses from the model on its own. Manual optimization,
  stepping the optimizer that Lightning wraps (``self.optimizers().optimizer``).

Precision
---------
``32-true`` and ``bf16-mixed`` work for every optimizer (SGN's passes follow the autocast
region Lightning runs ``training_step`` in). With ``16-mixed`` Lightning's GradScaler calls
the closure once itself and then steps without it, which SAM and Entropy-SGD cannot use: they
are refused. Single-pass optimizers then use Lightning's GradScaler; SGN uses valleys'
:class:`~valleys.train.loop.LossScaler` (its passes are out of GradScaler's reach) and skips a
step whose gradient or any GGN product overflowed. On the CPU Lightning runs ``16-mixed`` as
bf16. For fp16 with every optimizer use the workbench instead:
``valleys train optim.name=entropy_sgd run.amp=fp16``.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
import yaml
from torch.utils.data import DataLoader, TensorDataset

from valleys import data, models, optim
from valleys.train.evaluate import LOSS_NAMES, evaluate, loss_function
from valleys.train.loop import LossScaler

PRECISIONS = ("32-true", "bf16-mixed", "16-mixed")


def automatic(name: str) -> bool:
    """Whether optimizer ``name`` can run under Lightning's automatic optimization: it takes a
    loss closure and evaluates one batch per step (see the module docstring)."""
    entry = optim.spec(name)
    return not entry.takes_model and (not entry.needs_closure or entry.same_batch)


def passes_per_batch(name: str, hparams: dict[str, Any]) -> int:
    """Mini-batches one step consumes: Entropy-SGD's ``langevin_steps``, else 1."""
    if name != "entropy_sgd":
        return 1
    return int(hparams.get("langevin_steps", optim.spec(name).hyperparameters()["langevin_steps"]))


class ValleysModule(L.LightningModule):
    """A model trained by a valleys optimizer from the registry, named by ``optim_name``."""

    def __init__(
        self,
        model: torch.nn.Module,
        task: str,
        optim_name: str,
        optim_hparams: dict[str, Any],
        batch_size: int,
    ) -> None:
        super().__init__()
        self.model = model
        self.task = task
        self.loss_fn = loss_function(task)
        self.optim_name = optim_name
        self.optim_hparams = dict(optim_hparams)
        self.batch_size = batch_size
        self.automatic_optimization = automatic(optim_name)
        self.scaler: LossScaler | None = None  # SGN under fp16 (see on_fit_start)
        self.losses: list[float] = []  # the loss at the weights before each step
        self.skipped = 0  # SGN steps skipped for an fp16 overflow
        self.max_steps: int | None = None
        self._recorded = -1

    def on_fit_start(self) -> None:
        # fp16 (16-mixed on a GPU; Lightning runs it as bf16 on the CPU) keeps a GradScaler
        # in the precision plugin; SGN's own passes are out of its reach: valleys' scaler
        fp16 = getattr(self.trainer.precision_plugin, "scaler", None) is not None
        if fp16 and optim.spec(self.optim_name).takes_model:
            self.scaler = LossScaler()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if optim.spec(self.optim_name).takes_model:
            loss = LOSS_NAMES[self.task]
            return optim.get(self.optim_name, self.model, loss_fn=loss, **self.optim_hparams)
        return optim.get(self.optim_name, self.model.parameters(), **self.optim_hparams)

    def _record(self, loss: torch.Tensor, batch_idx: int) -> None:
        if batch_idx != self._recorded:  # SAM evaluates each batch twice: keep the first
            self._recorded = batch_idx
            self.losses.append(float(loss))
            self.log("train_loss", loss.detach(), prog_bar=True)

    def training_step(self, batch: Sequence[torch.Tensor], batch_idx: int) -> Any:
        x, y = batch
        if self.automatic_optimization:
            loss = self.loss_fn(self.model(x), y)
            self._record(loss, batch_idx)
            return loss
        opt = self.optimizers()
        if optim.spec(self.optim_name).takes_model:  # SGN: the batch, not a closure
            sgn = opt.optimizer
            loss = sgn.step(x, y, scaler=self.scaler)
            if self.scaler is not None:
                self.scaler.update(sgn.found_inf)
                self.skipped += int(sgn.found_inf)
        else:  # Entropy-SGD: a fresh part of the L·B samples for every closure call
            chunks = iter(zip(x.split(self.batch_size), y.split(self.batch_size), strict=True))

            def closure() -> torch.Tensor:
                xb, yb = next(chunks)
                opt.zero_grad()
                value = self.loss_fn(self.model(xb), yb)
                self.manual_backward(value)
                return value.detach()

            loss = opt.step(closure=closure)
        self._record(loss, batch_idx)
        return None

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # SGN steps the raw optimizer, which Lightning's global_step does not count
        if self.max_steps is not None and len(self.losses) >= self.max_steps:
            self.trainer.should_stop = True


def build(
    data_name: str = "digits", model_name: str = "mlp", seed: int = 0, **model_kwargs: Any
) -> tuple[Any, torch.nn.Module]:
    """The dataset and a freshly initialised model for it (seeded)."""
    dataset = data.get(data_name, seed=seed)
    torch.manual_seed(seed)
    model = models.get(model_name, dataset.input_shape, dataset.num_outputs, **model_kwargs)
    return dataset, model


def train_loader(dataset: Any, batch_size: int, seed: int) -> DataLoader:
    """Shuffled training batches of ``batch_size`` (whole batches only), seeded."""
    return DataLoader(
        TensorDataset(dataset.x_train, dataset.y_train),
        batch_size=batch_size,
        shuffle=True,
        drop_last=True,
        generator=torch.Generator().manual_seed(seed),
    )


def run(
    optim_name: str,
    hparams: dict[str, Any] | None = None,
    *,
    steps: int = 50,
    batch_size: int = 32,
    precision: str = "32-true",
    data_name: str = "digits",
    model_name: str = "mlp",
    model_kwargs: dict[str, Any] | None = None,
    seed: int = 0,
    accelerator: str = "auto",
    progress: bool = True,
) -> dict[str, Any]:
    """Train for ``steps`` optimizer steps; returns the module and the test loss before and
    after (``test_loss_before``, ``test_loss``, plus ``test_accuracy`` for classification)."""
    hparams = dict(hparams or {})
    optim.spec(optim_name)  # an unknown name fails here, in one line
    if precision not in PRECISIONS:
        raise ValueError(f"Invalid precision: {precision!r} (expected one of {PRECISIONS})")
    entry = optim.spec(optim_name)
    if precision == "16-mixed" and entry.needs_closure and not entry.takes_model:
        raise ValueError(
            f"Invalid precision: '16-mixed' with optimizer {optim_name!r} (Lightning's "
            "GradScaler calls the closure once and steps without it): use bf16-mixed, or "
            f"valleys train optim.name={optim_name} run.amp=fp16"
        )
    dataset, model = build(data_name, model_name, seed, **(model_kwargs or {}))
    per_step = batch_size * passes_per_batch(optim_name, hparams)
    loader = train_loader(dataset, per_step, seed)
    if len(loader) == 0:
        raise ValueError(
            f"Invalid batch_size: {batch_size} ({per_step} samples per step, more than the "
            f"{dataset.x_train.shape[0]} training samples): lower it"
        )
    module = ValleysModule(model, dataset.task, optim_name, hparams, batch_size)
    module.max_steps = steps
    before = evaluate(model, dataset.x_test, dataset.y_test, task=dataset.task)
    trainer = L.Trainer(
        accelerator=accelerator,
        devices=1,
        precision=precision,
        max_epochs=math.ceil(steps / len(loader)),
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=progress,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, loader)
    device = next(model.parameters()).device
    after = evaluate(model, dataset.x_test.to(device), dataset.y_test.to(device), task=dataset.task)
    return {
        "module": module,
        "test_loss_before": before["loss"],
        **{f"test_{k}": v for k, v in after.items()},
    }


def _value(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    return key, yaml.safe_load(value)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--optim", default="sgd", choices=optim.names())
    parser.add_argument(
        "--set",
        type=_value,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an optimizer hyperparameter, e.g. --set lr=0.1 (repeatable)",
    )
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--precision", default="32-true", choices=PRECISIONS)
    parser.add_argument("--data", default="digits", choices=data.names())
    parser.add_argument("--model", default="mlp", choices=models.names())
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        out = run(
            args.optim,
            dict(args.set),
            steps=args.steps,
            batch_size=args.batch_size,
            precision=args.precision,
            data_name=args.data,
            model_name=args.model,
            seed=args.seed,
        )
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    mode = "automatic" if automatic(args.optim) else "manual"
    print(
        f"{args.optim} ({mode} optimization, {args.precision}): {len(out['module'].losses)} steps"
    )
    print(f"test loss {out['test_loss_before']:.4f} -> {out['test_loss']:.4f}")
    if "test_accuracy" in out:
        print(f"test accuracy {100 * out['test_accuracy']:.2f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
