"""The training loop: passes, budgets, evaluation, BN refresh, EMA, non-finite loss, AMP."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from trainkit import make_cfg, records

from valleys import data, schedules
from valleys.train import checkpoint as ckpt
from valleys.train import loop


def test_entropy_sgd_makes_langevin_steps_passes_per_step(tmp_path):
    result = loop.train(
        make_cfg(
            tmp_path,
            "optim.name=entropy_sgd",
            "optim.langevin_steps=3",
            "run.max_steps=4",
            "run.log_every_steps=1",
        )
    )
    spe = 1437 // 32
    assert (result.step, result.passes) == (4, 12)
    train = records(tmp_path, "train")
    assert [r["passes"] for r in train] == [3, 6, 9, 12]
    for r in train:
        assert r["effective_epochs"] == pytest.approx(r["passes"] / spe)
        assert r["epoch"] == pytest.approx(r["step"] / spe)
        assert r["samples"] == r["passes"] * 32
        assert set(r["stats"]) >= {"grad_norm", "gamma", "drift_norm", "cosine"}


def test_seeds_make_runs_reproducible(tmp_path):
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        loop.train(
            make_cfg(
                tmp_path / name,
                "run.max_steps=6",
                "run.log_every_steps=2",
                f"run.seed={seed}",
                "optim.name=entropy_sgd",
                "optim.langevin_steps=2",
            )
        )
    assert records(tmp_path / "a") == records(tmp_path / "b")
    assert records(tmp_path / "a") != records(tmp_path / "c")


def test_single_pass_optimizers_make_one_pass_per_step(tmp_path):
    result = loop.train(make_cfg(tmp_path, "optim.name=vsgd", "run.max_steps=5"))
    assert (result.step, result.passes) == (5, 5)
    assert records(tmp_path, "end")[0]["passes"] == 5


def test_epoch_budget_stops_after_its_steps(tmp_path):
    result = loop.train(make_cfg(tmp_path, "run.max_epochs=1.5", "run.eval_at_start=false"))
    assert result.step == math.ceil(1.5 * (1437 // 32)) == 66
    assert result.reason == "max_epochs"
    assert result.epoch == pytest.approx(1.5, abs=1 / 44)


def test_the_first_budget_reached_stops_the_run(tmp_path):
    result = loop.train(make_cfg(tmp_path, "run.max_epochs=3", "run.max_steps=10"))
    assert (result.step, result.reason) == (10, "max_steps")


class _FakeClock:
    """Training time advanced by the model itself: every training forward costs 0.125 s."""

    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t

    def tick(self, module, args):
        if module.training:
            self.t += 0.125
        else:
            self.t += 10.0  # evaluation: must not count as training time


def _clocked_model(clock):
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))
    model.register_forward_pre_hook(clock.tick)
    return model


def test_time_budget_stops_on_training_time_and_drives_the_schedule(tmp_path, monkeypatch):
    clock = _FakeClock()
    monkeypatch.setattr(loop, "_now", clock)
    cfg = make_cfg(
        tmp_path,
        "run.max_seconds=1.0",
        "run.log_every_steps=1",
        "run.eval_every_steps=3",
        "optim.lr=0.5",
        "schedule.name=knee",
        "schedule.progress=time",
        "schedule.total_steps=1000",
        "schedule.explore_steps=25%",
    )
    result = loop.train(cfg, model=_clocked_model(clock))
    # 8 steps of 0.125 s fill the 1 s budget; the evaluations' 10 s are not training time
    assert (result.step, result.reason, result.train_time_s) == (8, "max_seconds", 1.0)
    train = records(tmp_path, "train", clock=True)
    assert [r["train_time_s"] for r in train] == [0.125 * k for k in range(1, 9)]
    # step k runs at the lr of the elapsed fraction (k - 1) / 8 of the budget
    expected = [
        0.5
        * schedules.factor(
            "knee", schedules.virtual_step((k - 1) / 8, 1000), total_steps=1000, explore_steps=250
        )
        for k in range(1, 9)
    ]
    assert [r["lr"] for r in train] == pytest.approx(expected)
    assert expected[0] == 0.5 and expected[-1] == pytest.approx(0.5 * (1 - 625 / 750))
    # the schedule's clock spans the budget: at the end of the budget it reaches its end
    assert (
        schedules.factor(
            "knee",
            schedules.virtual_step(result.train_time_s / 1.0, 1000),
            total_steps=1000,
            explore_steps=250,
        )
        == 0.0
    )
    assert records(tmp_path, "end", clock=True)[0]["train_time_s"] == 1.0


def test_evaluation_matches_a_direct_computation(tmp_path):
    loop.train(
        make_cfg(
            tmp_path,
            "run.max_steps=6",
            "data.eval_batch_size=7",
            "run.eval_train=true",
            "optim.lr=0.3",
        )
    )
    final = records(tmp_path, "eval")[-1]
    ds = data.get("digits")
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))
    model.load_state_dict(ckpt.load(tmp_path / "checkpoint.pt")["model"])
    with torch.no_grad():
        for split, x, y in (("test", ds.x_test, ds.y_test), ("train", ds.x_train, ds.y_train)):
            out = model(x)
            assert final[f"{split}_loss"] == pytest.approx(F.cross_entropy(out, y).item(), rel=1e-6)
            assert final[f"{split}_accuracy"] == (out.argmax(1) == y).sum().item() / len(y)


def test_regression_reports_mse(tmp_path):
    loop.train(make_cfg(tmp_path, "data.name=diabetes", "run.max_steps=5"))
    final = records(tmp_path, "eval")[-1]
    ds = data.get("diabetes")
    model = nn.Sequential(nn.Flatten(), nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 1))
    model.load_state_dict(ckpt.load(tmp_path / "checkpoint.pt")["model"])
    with torch.no_grad():
        direct = F.mse_loss(model(ds.x_test), ds.y_test).item()
    assert final["test_mse"] == final["test_loss"] == pytest.approx(direct, rel=1e-6)
    assert "test_accuracy" not in final


def _bn_net():
    return nn.Sequential(
        nn.Linear(5, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Dropout(0.5), nn.Linear(4, 3)
    )


def test_bn_refresh_recomputes_statistics_and_leaves_the_rest_alone():
    torch.manual_seed(0)
    net = _bn_net()
    x = torch.randn(40, 5)
    net.eval()
    net[3].train()  # a mixed state that must come back as it was
    weights = {k: v.clone() for k, v in net.named_parameters()}
    bn = net[1]
    assert loop.refresh_batchnorm(net, x, batch_size=64)
    with torch.no_grad():
        pre = net[0](x)
    assert torch.allclose(bn.running_mean, pre.mean(0), atol=1e-6)
    assert torch.allclose(bn.running_var, pre.var(0, unbiased=True), atol=1e-6)
    assert all(torch.equal(v, weights[k]) for k, v in net.named_parameters())
    assert [m.training for m in net.modules()] == [False, False, False, False, True, False]
    assert bn.momentum == 0.1
    # uneven batches: the mean is still the set's, the variance the size-weighted batch mean
    loop.refresh_batchnorm(net, x, batch_size=15)
    with torch.no_grad():
        variances = [pre[i : i + 15].var(0) * len(pre[i : i + 15]) for i in (0, 15, 30)]
    assert torch.allclose(bn.running_mean, pre.mean(0), atol=1e-6)
    assert torch.allclose(bn.running_var, sum(variances) / 40, atol=1e-6)
    assert not loop.refresh_batchnorm(nn.Linear(5, 3), x)


def test_bn_refresh_runs_before_each_evaluation(tmp_path):
    ds = data.get("digits")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 10))
    loop.train(make_cfg(tmp_path, "run.max_steps=5", "run.bn_refresh=true"), model=model)
    with torch.no_grad():
        pre = model[0](ds.x_train)
    assert torch.allclose(model[1].running_mean, pre.mean(0), atol=1e-5)
    assert model.training


def test_weight_ema_against_a_hand_computation():
    p = nn.Parameter(torch.tensor([1.0, -2.0]))
    ema = loop.WeightEMA([p], decay=0.9)
    history = [p.detach().clone()]
    for value in ([3.0, 0.0], [-1.0, 5.0], [2.0, 2.0]):
        with torch.no_grad():
            p.copy_(torch.tensor(value))
        ema.update([p])
        history.append(p.detach().clone())
    w0, w1, w2, w3 = history
    hand = 0.9**3 * w0 + 0.1 * (0.9**2 * w1 + 0.9 * w2 + w3)
    assert torch.allclose(ema.shadow[0], hand, atol=1e-6)
    assert ema.num_updates == 3


def test_ema_weights_are_evaluated_and_checkpointed(tmp_path):
    loop.train(make_cfg(tmp_path, "run.max_steps=6", "run.ema_decay=0.5", "optim.lr=0.5"))
    state = ckpt.load(tmp_path / "checkpoint.pt")
    assert state["ema"]["num_updates"] == 6
    final = records(tmp_path, "eval")[-1]
    ds = data.get("digits")
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))
    model.load_state_dict(state["model"])
    loop.WeightEMA(list(model.parameters()), 0.5).copy_to(list(model.parameters()))
    with torch.no_grad():
        for p, s in zip(model.parameters(), state["ema"]["shadow"], strict=True):
            p.copy_(s)
        out = model(ds.x_test)
    assert final["ema_test_loss"] == pytest.approx(F.cross_entropy(out, ds.y_test).item(), rel=1e-6)
    assert final["ema_test_loss"] != final["test_loss"]


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    ckpt.save(path, {"step": 1, "w": torch.ones(3)})
    good = path.read_bytes()

    def torn_save(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", torn_save)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save(path, {"step": 2, "w": torch.zeros(3)})
    assert path.read_bytes() == good
    assert ckpt.load(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]  # no temp file left


class _NaNAfter(nn.Module):
    """An MLP whose output turns NaN from its ``n``-th training forward on."""

    def __init__(self, n):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))
        self.n, self.calls = n, 0

    def forward(self, x):
        out = self.net(x)
        if self.training:
            self.calls += 1
            if self.calls >= self.n:
                out = out * float("nan")
        return out


def test_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    cfg = make_cfg(tmp_path, "run.max_steps=20", "run.checkpoint_every_steps=5")
    with pytest.raises(loop.TrainingError, match=r"loss became nan at step 8.*step 5"):
        loop.train(cfg, model=_NaNAfter(8))
    state = ckpt.load(tmp_path / "checkpoint.pt")
    assert state["step"] == 5 and not state["finished"]
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    end = records(tmp_path)[-1]
    assert (end["kind"], end["reason"], end["step"]) == ("end", "non-finite loss", 8)


def test_closure_draws_a_fresh_batch_per_call_unless_same_batch():
    model = nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    drawn = []

    def next_batch():
        drawn.append(len(drawn))
        return torch.full((4, 2), float(len(drawn))), torch.zeros(4, 1)

    for same, expected in ((False, 3), (True, 1)):
        drawn.clear()
        c = loop.make_closure(model, F.mse_loss, next_batch, opt, same_batch=same)
        c.begin_step()
        for _ in range(3):
            c()
        assert (len(drawn), c.calls) == (expected, 3)
        c.begin_step()
        c()
        assert len(drawn) == expected + 1


class _Overflow(nn.Module):
    """Logits ×1e30 on the ``n``-th training forward: the scaled fp16 loss overflows."""

    def __init__(self, n):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
        self.n, self.calls = n, 0

    def forward(self, x):
        out = self.net(x)
        if self.training:
            self.calls += 1
            if self.calls == self.n:
                out = out.float() * 1e30
        return out


def test_fp16_skips_a_multi_pass_step_whose_gradients_overflowed(tmp_path):
    cfg = make_cfg(
        tmp_path,
        "run.amp=fp16",
        "run.max_steps=2",
        "optim.name=entropy_sgd",
        "optim.langevin_steps=3",
    )
    trainer = loop.Trainer(cfg, model=_Overflow(2))  # the 2nd of the 3 passes of step 1
    before = [p.detach().clone() for p in trainer.params]
    _, skipped = trainer.train_step()
    assert skipped and trainer.skipped_steps == 1 and trainer.passes == 3
    assert all(torch.equal(p, b) for p, b in zip(trainer.params, before, strict=True))
    assert trainer.optimizer.state_dict()["state"] == {}
    assert trainer.scaler.scale == 2.0**15
    _, skipped = trainer.train_step()
    assert not skipped
    assert not all(torch.equal(p, b) for p, b in zip(trainer.params, before, strict=True))


def test_fp16_skips_a_single_pass_step_whose_gradients_overflowed(tmp_path):
    cfg = make_cfg(tmp_path, "run.amp=fp16", "run.max_steps=2", "optim.name=adam")
    trainer = loop.Trainer(cfg, model=_Overflow(1))
    before = [p.detach().clone() for p in trainer.params]
    _, skipped = trainer.train_step()
    assert skipped and trainer.optimizer.state_dict()["state"] == {}
    assert all(torch.equal(p, b) for p, b in zip(trainer.params, before, strict=True))
    _, skipped = trainer.train_step()
    assert not skipped


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_mixed_precision_runs(tmp_path, amp):
    result = loop.train(
        make_cfg(
            tmp_path, f"run.amp={amp}", "run.max_steps=10", "optim.lr=0.1", "optim.momentum=0.9"
        )
    )
    assert result.step == 10
    assert math.isfinite(records(tmp_path, "train")[-1]["loss"])
    assert result.final_eval["test_accuracy"] > 0.2


def test_compiled_model_trains_and_checkpoints_plain_weights(tmp_path):
    result = loop.train(
        make_cfg(tmp_path, "run.compile=true", "run.compile_backend=eager", "run.max_steps=3")
    )
    assert result.step == 3
    keys = ckpt.load(tmp_path / "checkpoint.pt")["model"].keys()
    assert not any(k.startswith("_orig_mod") for k in keys)


def test_run_directory_contents(tmp_path):
    loop.train(make_cfg(tmp_path, "run.max_steps=3", "run.tensorboard=true"))
    names = {p.name for p in tmp_path.iterdir()}
    assert {"config.yaml", "env.json", "metrics.jsonl", "checkpoint.pt", "tb"} <= names
    assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "tb").iterdir())
    import json

    env = json.loads((tmp_path / "env.json").read_text())
    assert {"python", "torch", "valleys"} <= set(env["versions"])
    assert env["device"] == "cpu" and env["threads"] >= 1
    assert env["segments"][0]["start_step"] == 0
    assert "optim:\n  name: sgd\n  lr: 0.001" in (tmp_path / "config.yaml").read_text()


def test_tensorboard_is_optional(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name.startswith("torch.utils.tensorboard"):
            raise ImportError("No module named 'tensorboard'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    result = loop.train(make_cfg(tmp_path, "run.max_steps=2", "run.tensorboard=true"))
    assert result.step == 2
    assert not (tmp_path / "tb").exists()
