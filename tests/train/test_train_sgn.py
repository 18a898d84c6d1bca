"""SGN driven by the workbench: built from the model and the task's loss, one batch per step,
every pass counted, bit-identical resume (mixed precision and compile: test_precision.py)."""

from __future__ import annotations

import pytest
import torch
from trainkit import make_cfg, records

from valleys import cli
from valleys.train import checkpoint as ckpt
from valleys.train import loop

SGN = ("optim.name=sgn", "optim.cg_max_iters=2", "optim.cg_warmup_iters=3", "run.log_every_steps=1")


@pytest.mark.parametrize(
    ("dataset", "metric"), [("digits", "test_accuracy"), ("diabetes", "test_mse")]
)
def test_sgn_trains_on_classification_and_regression(tmp_path, dataset, metric):
    result = loop.train(make_cfg(tmp_path, *SGN, f"data.name={dataset}", "run.max_steps=6"))
    train = records(tmp_path, "train")
    evals = records(tmp_path, "eval")
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]
    # passes: the gradient, each CG product and each trial loss, all on the step's batch
    assert result.passes == sum(int(r["stats"]["passes"]) for r in train)
    assert all(r["stats"]["passes"] >= 1 + r["stats"]["cg_iters"] + 1 for r in train)
    assert {"damping", "alpha", "cg_iters", "cg_residual", "ls_iters", "tr_ratio"} <= set(
        train[0]["stats"]
    )
    assert evals[-1]["test_loss"] < evals[0]["test_loss"]
    assert metric in evals[-1]


def test_sgn_resume_is_bit_identical(tmp_path):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    common = (*SGN, "optim.momentum=0.5", "run.eval_every_steps=3")
    loop.train(make_cfg(whole, *common, "run.max_steps=8"))
    loop.train(make_cfg(parts, *common, "run.max_steps=4"))
    loop.train(make_cfg(parts, *common, "run.max_steps=8", "run.resume=true"))
    assert records(parts) == records(whole)
    a = ckpt.load(whole / "checkpoint.pt")["model"]
    b = ckpt.load(parts / "checkpoint.pt")["model"]
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_valleys_train_optim_sgn_from_the_command_line(tmp_path, capsys):
    args = ["train", *SGN, "run.max_steps=3", f"run.dir={tmp_path}", "run.progress=false"]
    assert cli.main([*args, "run.tensorboard=false", "data.batch_size=32"]) == 0
    assert "max_steps reached" in capsys.readouterr().out
