"""Mixed precision and torch.compile for every optimizer of the registry: bf16/fp16 runs train,
an fp16 overflow in any scaled pass of a step skips the whole step, loss scaling is exact where
the arithmetic allows it, and a compiled model trains like the plain one."""

from __future__ import annotations

import contextlib
import copy
import math
import shutil
import warnings

import pytest
import torch
from torch import nn
from trainkit import make_cfg, records

from valleys import curvature, optim
from valleys.optim import SGN
from valleys.train import checkpoint as ckpt
from valleys.train import loop

NAMES = optim.names()

# settings that make a few steps of each optimizer decrease the digits loss, and cheap
SETTINGS: dict[str, tuple[str, ...]] = {
    "sgd": ("optim.lr=0.1",),
    "nesterov": ("optim.lr=0.05",),
    "adam": ("optim.lr=0.01",),
    "adamw": ("optim.lr=0.01",),
    "entropy_sgd": ("optim.langevin_steps=3",),
    "vsgd": ("optim.lr=0.1",),
    "sam": ("optim.lr=0.1",),
    "sgn": ("optim.cg_max_iters=2", "optim.cg_warmup_iters=2", "optim.momentum=0.5"),
}


def cfg_for(name, run_dir, *extra):
    return make_cfg(run_dir, f"optim.name={name}", *SETTINGS.get(name, ()), *extra)


def passes_per_step(name):
    """Passes of one step through the model: Entropy-SGD's L, SAM's 2, SGN's gradient and
    CG products (2 here) before its trial losses; 1 for single-pass optimizers."""
    return {"entropy_sgd": 3, "sam": 2, "sgn": 3}.get(name, 1)


def same(a, b):
    """Nested state dicts equal, tensors bit for bit."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return a == b or (a != a and b != b)  # NaN statistics compare equal


def weights(trainer):
    return [p.detach().clone() for p in trainer.params]


# ---------------------------------------------------------------------------------------------
# (a) bf16 and fp16 train every optimizer


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
@pytest.mark.parametrize("name", NAMES)
def test_mixed_precision_trains_every_optimizer(tmp_path, name, amp):
    result = loop.train(cfg_for(name, tmp_path, f"run.amp={amp}", "run.max_steps=10"))
    evals = records(tmp_path, "eval")
    train = records(tmp_path, "train")
    assert result.step == 10
    assert all(math.isfinite(r["loss"]) for r in train)
    assert math.isfinite(evals[-1]["test_loss"])
    assert evals[-1]["test_loss"] < evals[0]["test_loss"]
    if amp == "fp16":
        assert train[-1]["skipped_steps"] < 10 and train[-1]["loss_scale"] >= 2.0**10


# ---------------------------------------------------------------------------------------------
# (b) an overflow in any scaled pass skips the whole step


class Overflow(nn.Module):
    """A 64-16-10 MLP whose logits are multiplied by 1e30 on one chosen training forward pass
    (counted from :meth:`arm`): in fp16 they overflow, and so do the pass's loss, gradient or
    GGN product."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))
        self.calls, self.at = 0, None

    def arm(self, k):
        self.at = self.calls + k

    def forward(self, x):
        out = self.net(x)
        if self.training:
            self.calls += 1
            if self.calls == self.at:  # inf in fp16, in the forward pass or its tangent
                out = out * 1e30
        return out


def overflow_trainer(tmp_path, name):
    trainer = loop.Trainer(
        cfg_for(name, tmp_path, "run.amp=fp16", "run.max_steps=4"), model=Overflow()
    )
    trainer.scaler.scale = 2.0**8  # low enough that only the injected pass overflows
    if name == "sgn":  # eager products: every pass, each CG product included, runs forward()
        trainer.optimizer.curvature_method = "jvp"
    return trainer


CASES = sorted({(n, k) for n in NAMES for k in (1, passes_per_step(n))})


@pytest.mark.parametrize(("name", "k"), CASES)
def test_fp16_overflow_in_any_pass_skips_the_whole_step(tmp_path, name, k):
    trainer = overflow_trainer(tmp_path, name)
    model = trainer.model
    _, skipped = trainer.train_step()  # a normal step first: the state is not empty
    assert not skipped
    before, state = weights(trainer), copy.deepcopy(trainer.optimizer.state_dict())
    scale, calls = trainer.scaler.scale, model.calls
    model.arm(k)
    _, skipped = trainer.train_step()
    assert model.calls >= calls + k  # the armed pass ran
    assert skipped and trainer.skipped_steps == 1
    assert all(torch.equal(p, b) for p, b in zip(trainer.params, before, strict=True))
    assert same(trainer.optimizer.state_dict(), state)
    assert trainer.scaler.scale == scale / 2
    _, skipped = trainer.train_step()
    assert not skipped and trainer.scaler.scale == scale / 2
    assert not all(torch.equal(p, b) for p, b in zip(trainer.params, before, strict=True))


def test_sgn_fp16_a_non_finite_trial_loss_is_backtracked_not_skipped(tmp_path):
    trainer = overflow_trainer(tmp_path, "sgn")
    trainer.train_step()
    scale = trainer.scaler.scale
    trainer.model.arm(1 + 2 + 1)  # gradient, 2 CG products, then the first trial loss
    _, skipped = trainer.train_step()
    stats = trainer.optimizer.stats()
    assert not skipped and trainer.scaler.scale == scale
    assert stats["skipped"] == 0 and stats["ls_iters"] >= 1


def test_sgn_fp16_skips_when_the_traced_products_overflow(tmp_path):
    trainer = loop.Trainer(cfg_for("sgn", tmp_path, "run.amp=fp16", "run.max_steps=3"))
    trainer.train_step()
    before, state = weights(trainer), copy.deepcopy(trainer.optimizer.state_dict())
    trainer.scaler.scale = 2.0**40  # s·∂ℓ/∂z overflows fp16 in the traced gradient pass
    _, skipped = trainer.train_step()
    assert skipped and trainer.optimizer.found_inf and trainer.scaler.scale == 2.0**39
    assert all(torch.equal(p, b) for p, b in zip(trainer.params, before, strict=True))
    assert same(trainer.optimizer.state_dict(), state)
    assert trainer.optimizer.stats()["skipped"] == 1


# ---------------------------------------------------------------------------------------------
# (c) loss scaling is exact: in float32 a power-of-two scale changes no bit


@pytest.mark.parametrize("name", NAMES)
def test_loss_scaling_in_float32_is_bit_exact(tmp_path, name):
    # one trainer after the other: each seeds the global RNG (Langevin noise) when built
    plain = loop.Trainer(cfg_for(name, tmp_path / "plain", "run.max_steps=3"))
    losses = [plain.train_step()[0] for _ in range(3)]
    scaled = loop.Trainer(cfg_for(name, tmp_path / "scaled", "run.amp=fp16", "run.max_steps=3"))
    scaled.autocast = None  # the scaler alone: every pass in float32
    scaled.closure.autocast = contextlib.nullcontext
    for loss in losses:
        scaled_loss, skipped = scaled.train_step()
        assert not skipped and torch.equal(scaled_loss, loss)
    assert scaled.scaler.scale == 2.0**16
    for p, q in zip(plain.params, scaled.params, strict=True):
        assert torch.equal(p, q)
    assert same(plain.optimizer.state_dict(), scaled.optimizer.state_dict())


@pytest.mark.parametrize("method", ["traced", "jvp"])
def test_scaled_ggn_products_equal_unscaled_ones(method):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))
    x, y = torch.randn(32, 8), torch.randint(0, 3, (32,))
    v = [torch.randn_like(p) * 1e-6 for p in model.parameters()]
    ref = curvature.ggn_fn(model, "cross_entropy", x, y, method=method)
    for s in (2.0**16, 2.0**-3):
        sc = curvature.ggn_fn(model, "cross_entropy", x, y, method=method, loss_scale=s)
        assert torch.equal(sc.loss, ref.loss)
        assert all(torch.equal(a, b) for a, b in zip(sc.grad, ref.grad, strict=True))
        assert all(torch.equal(a, b) for a, b in zip(sc(v), ref(v), strict=True))
    with torch.autocast("cpu", dtype=torch.float16):
        half = curvature.ggn_fn(model, "cross_entropy", x, y, method=method, loss_scale=2.0**12)
    # fp16 forward passes, float32 losses and master values: close to the float32 products
    assert half.loss.dtype == torch.float32 and half.outputs.dtype == torch.float16
    for a, b in zip(half(v), ref(v), strict=True):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2 * float(b.abs().max()))
    for a, b in zip(half.grad, ref.grad, strict=True):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2 * float(b.abs().max()))


def test_ggn_products_keep_the_precision_they_were_made_in():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))
    x, y = torch.randn(32, 8), torch.randint(0, 3, (32,))
    v = [torch.randn_like(p) for p in model.parameters()]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = curvature.ggn_fn(model, "cross_entropy", x, y, method="traced")
    full = curvature.ggn_fn(model, "cross_entropy", x, y, method="traced")  # not the bf16 trace
    assert low.outputs.dtype == torch.bfloat16 and full.outputs.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):  # a region around later calls changes nothing
        inside = full(v), full.loss_at(full.params)
    outside = full(v), full.loss_at(full.params)
    assert all(torch.equal(a, b) for a, b in zip(inside[0], outside[0], strict=True))
    assert torch.equal(inside[1], outside[1]) and torch.equal(outside[1], full.loss)
    assert not torch.equal(low(v)[0], full(v)[0])


# ---------------------------------------------------------------------------------------------
# (d) torch.compile


@pytest.mark.parametrize("name", NAMES)
def test_compiled_model_trains_like_the_plain_one(tmp_path, name):
    runs = {}
    for compiled in (False, True):
        extra = ("run.compile=true", "run.compile_backend=eager") if compiled else ()
        run_dir = tmp_path / str(compiled)
        result = loop.train(cfg_for(name, run_dir, "run.max_steps=4", *extra))
        assert result.step == 4
        runs[compiled] = ckpt.load(run_dir / "checkpoint.pt")["model"]
    assert runs[True].keys() == runs[False].keys()
    assert not any(k.startswith("_orig_mod") for k in runs[True])
    for key in runs[False]:
        torch.testing.assert_close(runs[True][key], runs[False][key], rtol=1e-5, atol=1e-6)


def test_inductor_compiled_model_trains_like_the_plain_one(tmp_path):
    pytest.importorskip("torch._inductor")
    if not any(shutil.which(cxx) for cxx in ("g++", "clang++", "c++")):
        pytest.skip("inductor compiles C++ on the CPU: no C++ compiler here")
    runs = {}
    for compiled in (False, True):
        extra = ("run.compile=true", "run.compile_backend=inductor") if compiled else ()
        loop.train(cfg_for("adam", tmp_path / str(compiled), "run.max_steps=3", *extra))
        runs[compiled] = ckpt.load(tmp_path / str(compiled) / "checkpoint.pt")["model"]
    for key in runs[False]:
        torch.testing.assert_close(runs[True][key], runs[False][key], rtol=1e-4, atol=1e-5)


def test_sgn_given_a_compiled_model_uses_the_plain_module():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))
    twin = copy.deepcopy(net)
    x, y = torch.randn(32, 8), torch.randint(0, 3, (32,))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no fall-back to eager products
        a = SGN(torch.compile(net, backend="eager"), "cross_entropy", cg_max_iters=2)
        b = SGN(twin, "cross_entropy", cg_max_iters=2)
        assert a.model is net
        for _ in range(2):
            assert torch.equal(a.step(x, y), b.step(x, y))
    for p, q in zip(net.parameters(), twin.parameters(), strict=True):
        assert torch.equal(p, q)


def test_sgn_library_use_with_autocast_and_a_scaler():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))
    x, y = torch.randn(64, 8), torch.randint(0, 3, (64,))
    scaler = loop.LossScaler(init_scale=2.0**24)
    opt = SGN(net, "cross_entropy", cg_max_iters=3)
    half = lambda: torch.autocast("cpu", dtype=torch.float16)  # noqa: E731
    losses, skipped = [], []
    for _ in range(12):
        losses.append(float(opt.step(x, y, autocast=half, scaler=scaler)))
        skipped.append(opt.found_inf)
        scaler.update(opt.found_inf)
    assert skipped[0] and not all(skipped)  # 2^24 overflows, a smaller scale does not
    assert scaler.scale < 2.0**24 and opt.state[opt.param_groups[0]["params"][0]]["step"] > 0
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
