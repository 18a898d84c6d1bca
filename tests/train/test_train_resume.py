"""Resuming a run gives bit-identical metrics and weights on the CPU."""

from __future__ import annotations

import hashlib

import pytest
import torch
from trainkit import make_cfg, records

from valleys.train import checkpoint as ckpt
from valleys.train import loop

OPTIMIZERS = {
    "sgd": ["optim.lr=0.1", "optim.momentum=0.9"],
    "adam": ["optim.lr=0.01"],
    "entropy_sgd": ["optim.langevin_steps=3", "optim.lr=1.0"],
    "vsgd": ["optim.lr=0.05"],
}
COMMON = ["run.eval_every_steps=7", "run.log_every_steps=3"]


def _cfg(path, steps, name, *extra, model="mlp"):
    return make_cfg(
        path,
        f"run.max_steps={steps}",
        f"optim.name={name}",
        *COMMON,
        *OPTIMIZERS[name],
        *extra,
        model=model,
    )


def _weights(path):
    return ckpt.load(path / "checkpoint.pt")["model"]


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_stop_and_resume_is_bit_identical(tmp_path, name):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    loop.train(_cfg(whole, 20, name))
    first = loop.train(_cfg(parts, 10, name))
    assert first.step == 10 and first.reason == "max_steps"
    second = loop.train(_cfg(parts, 20, name, "run.resume=true"))
    assert second.step == 20
    assert records(parts) == records(whole)
    assert len(records(whole, "eval")) == 4  # steps 0, 7, 14 and the final one at 20
    # the training-time clock goes on from where the first segment stopped
    times = [r["train_time_s"] for r in records(parts, clock=True)]
    assert times == sorted(times) and second.train_time_s > first.train_time_s
    a, b = _weights(whole), _weights(parts)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # the first segment's closing records (eval at step 10, end) were moved aside, not lost
    moved = (parts / "metrics.superseded.jsonl").read_text().splitlines()
    assert any('"step": 10' in line and '"kind": "end"' in line for line in moved)


def test_resume_after_a_crash_from_the_periodic_checkpoint(tmp_path, monkeypatch):
    whole, crashed = tmp_path / "whole", tmp_path / "crashed"
    extra = ["run.checkpoint_every_steps=5", "run.ema_decay=0.9"]
    loop.train(_cfg(whole, 16, "entropy_sgd", *extra))

    original = loop.Trainer._log_train

    def crash_at_12(self):
        if self.step == 12:
            raise KeyboardInterrupt  # the process dies after writing records for step 12
        return original(self)

    monkeypatch.setattr(loop.Trainer, "_log_train", crash_at_12)
    with pytest.raises(KeyboardInterrupt):
        loop.train(_cfg(crashed, 16, "entropy_sgd", *extra))
    monkeypatch.setattr(loop.Trainer, "_log_train", original)
    assert ckpt.load(crashed / "checkpoint.pt")["step"] == 10
    loop.train(_cfg(crashed, 16, "entropy_sgd", *extra, "run.resume=true"))
    assert records(crashed) == records(whole)
    assert torch.equal(
        ckpt.load(crashed / "checkpoint.pt")["ema"]["shadow"][0],
        ckpt.load(whole / "checkpoint.pt")["ema"]["shadow"][0],
    )


def test_a_finished_run_is_not_overwritten(tmp_path):
    loop.train(_cfg(tmp_path, 4, "sgd"))
    before = {p.name: _digest(p) for p in tmp_path.iterdir() if p.is_file()}
    with pytest.raises(ValueError, match=r"already holds a run \(finished\).*run\.resume=true"):
        loop.train(_cfg(tmp_path, 4, "sgd"))
    # resuming a finished run with the same budget does nothing
    result = loop.train(_cfg(tmp_path, 4, "sgd", "run.resume=true"))
    assert result.step == 4
    assert {p.name: _digest(p) for p in tmp_path.iterdir() if p.is_file()} == before


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("model.widths=[32]", r"model\.widths: \[16\] -> \[32\]"),
        ("optim.momentum=0.5", r"optim\.momentum: 0\.9 -> 0\.5"),
    ],
)
def test_a_checkpoint_from_another_config_is_refused(tmp_path, change, message):
    loop.train(_cfg(tmp_path, 4, "sgd"))
    before = {p.name: _digest(p) for p in tmp_path.iterdir() if p.is_file()}
    with pytest.raises(ValueError, match="Cannot resume .*another configuration.*" + message):
        loop.train(_cfg(tmp_path, 8, "sgd", change, "run.resume=true"))
    assert {p.name: _digest(p) for p in tmp_path.iterdir() if p.is_file()} == before


def test_a_checkpoint_that_does_not_fit_the_model_is_refused(tmp_path):
    loop.train(_cfg(tmp_path, 4, "sgd"))
    before = _digest(tmp_path / "checkpoint.pt")
    other = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    with pytest.raises(ValueError, match="checkpoint does not fit this run"):
        loop.train(_cfg(tmp_path, 8, "sgd", "run.resume=true"), model=other)
    assert _digest(tmp_path / "checkpoint.pt") == before


def test_resume_needs_a_checkpoint_and_a_run_dir(tmp_path):
    (tmp_path / "config.yaml").write_text("run: {}\n")
    with pytest.raises(ValueError, match=r"has no checkpoint\.pt"):
        loop.train(_cfg(tmp_path, 4, "sgd", "run.resume=true"))
    with pytest.raises(ValueError, match=r"run\.resume: true .*needs run\.dir"):
        loop.train(_cfg(None, 4, "sgd", "run.resume=true"))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="holds other files"):
        loop.train(_cfg(tmp_path / "other", 4, "sgd"))


def test_resume_with_augmentation_dropout_batchnorm_and_replacement_sampling(tmp_path):
    extra = [
        "data.flatten=false",
        "data.augment={pad: 1, flip: true}",
        "data.sampling=replacement",
        "model.name=mnistfc",
        "model.width=32",
        "model.variant=python",  # BN and input dropout too
        "run.bn_refresh=true",
        "run.ema_decay=0.8",
        "run.eval_every_steps=4",
    ]
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    loop.train(_cfg(whole, 12, "entropy_sgd", *extra, model="mnistfc"))
    loop.train(_cfg(parts, 6, "entropy_sgd", *extra, model="mnistfc"))
    loop.train(_cfg(parts, 12, "entropy_sgd", *extra, "run.resume=true", model="mnistfc"))
    assert records(parts) == records(whole)
    a, b = _weights(whole), _weights(parts)
    assert all(torch.equal(a[k], b[k]) for k in a)
