"""load_run: a trained model and its dataset rebuilt from a run directory or checkpoint."""

from __future__ import annotations

import pytest
import torch
from trainkit import make_cfg, records

from valleys.train import load_run, loop


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("restore") / "run"
    loop.train(make_cfg(path, "run.max_steps=6"))
    return path


def test_load_run_rebuilds_the_trained_model_and_its_data(run_dir):
    run = load_run(run_dir, device="cpu")
    assert run.run_dir == run_dir and run.checkpoint == run_dir / "checkpoint.pt"
    assert run.step == 6 and run.task == "classification"
    assert run.dataset.name == "digits" and run.dataset.x_train.shape[0] == 1437
    saved = torch.load(run.checkpoint, weights_only=True)["model"]
    for key, value in run.model.state_dict().items():
        assert torch.equal(value, saved[key]), key
    assert not run.model.training
    x, y = run.dataset.x_test, run.dataset.y_test
    final = records(run_dir, "eval")[-1]
    got = loop.evaluate(run.model, x, y, task=run.task)
    assert got["loss"] == pytest.approx(final["test_loss"], rel=1e-6)
    loss = run.loss_fn(run.model(x), y)
    assert loss.item() == pytest.approx(got["loss"], rel=1e-5)


def test_load_run_from_a_checkpoint_file(run_dir):
    run = load_run(run_dir / "checkpoint.pt", device="cpu")
    assert run.run_dir == run_dir and run.config.model.name == "mlp"


def test_load_run_errors_are_one_line(tmp_path):
    with pytest.raises(FileNotFoundError, match="Not a run directory or checkpoint"):
        load_run(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match=r"No checkpoint\.pt"):
        load_run(tmp_path)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="Unreadable checkpoint"):
        load_run(bad)
