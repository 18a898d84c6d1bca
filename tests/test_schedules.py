"""Schedules: hand-derived boundary values, equality with torch's schedulers (ours are 1-based in
optimizer steps, torch's are 0-based in ``last_epoch``), validation, the time-fraction mapping and
the LambdaLR adapter (per-group ratios, exact resume from state_dicts)."""

import io
import math
import warnings

import pytest
import torch

from valleys import schedules as S

# One valid set of hyperparameters per registered schedule; T = 20 where it applies.
T = 20
EXAMPLES = {
    "constant": {"lr": 0.05},
    "cosine": {"peak_lr": 0.1, "total_steps": T, "warmup_steps": 4, "final_lr": 1e-3},
    "inverse_sqrt": {"peak_lr": 0.1, "warmup_steps": 4},
    "knee": {"peak_lr": 0.1, "total_steps": T, "warmup_steps": 2, "explore_steps": 8},
    "linear": {"peak_lr": 0.1, "total_steps": T, "warmup_steps": 3, "final_lr": 0.01},
    "one_cycle": {"peak_lr": 0.1, "total_steps": T, "pct_start": 0.25},
    "piecewise": {"boundaries": [2, 4], "values": [0.1, 0.02, 0.004], "steps_per_unit": 3},
    "step_decay": {"lr": 0.1, "step_size": 6, "gamma": 0.5},
}
PEAK = {"constant": 0.05, "step_decay": 0.1, "piecewise": 0.1}  # others: peak_lr = 0.1


def torch_lrs(make, n, lr=1.0):
    """lr used by optimizer steps 1..n under a torch scheduler stepped after each step."""
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    sched = make(opt)
    out = []
    for _ in range(n):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def ours(fn, n, **kw):
    return [fn(k, **kw) for k in range(1, n + 1)]


# ----------------------------------------------------------------------------- knee


def test_knee_boundaries():
    kw = {"peak_lr": 0.2, "total_steps": 100, "warmup_steps": 10, "explore_steps": 40}
    expected = {
        1: 0.02,  # warm-up: 0.2 * 1/10
        5: 0.1,
        10: 0.2,  # warm-up ends at the peak
        11: 0.2,  # explore
        50: 0.2,  # explore ends (W + E)
        51: 0.2 * (1 - 1 / 50),  # first decay step, D = 50
        75: 0.1,
        99: 0.2 / 50,
        100: 0.0,  # 0 exactly at total_steps
        101: 0.0,
        10_000: 0.0,
    }
    for s, lr in expected.items():
        assert S.knee(s, **kw) == pytest.approx(lr, abs=1e-15), s


def test_knee_edge_cases():
    # no warm-up: the explore phase starts at step 1
    assert S.knee(1, peak_lr=1.0, total_steps=10, explore_steps=5) == 1.0
    # no warm-up and no explore: the first step already decays (as in the original)
    assert S.knee(1, peak_lr=1.0, total_steps=10) == pytest.approx(0.9)
    # D = 0: peak through W + E = T, then 0 (the original divides by zero here)
    kw = {"peak_lr": 1.0, "total_steps": 5, "warmup_steps": 2, "explore_steps": 3}
    assert ours(S.knee, 7, **kw) == [0.5, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0]
    # all warm-up
    assert S.knee(4, peak_lr=1.0, total_steps=4, warmup_steps=4) == 1.0
    assert S.knee(5, peak_lr=1.0, total_steps=4, warmup_steps=4) == 0.0


def test_knee_decay_is_torch_linear_one_step_ahead():
    # Knee reaches 0 at step T, torch-style linear at step T + 1.
    for s in range(1, 30):
        assert S.knee(s, peak_lr=1.0, total_steps=T) == pytest.approx(
            S.linear(s + 1, peak_lr=1.0, total_steps=T), abs=1e-15
        )


# ----------------------------------------------------------------------------- baselines


def test_constant():
    assert S.constant(1, lr=0.3) == 0.3
    assert S.constant(10**9, lr=0.3) == 0.3


def test_step_decay_boundaries_and_torch():
    kw = {"lr": 1.0, "step_size": 3, "gamma": 0.5}
    assert ours(S.step_decay, 8, **kw) == [1, 1, 1, 0.5, 0.5, 0.5, 0.25, 0.25]
    ref = torch_lrs(lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=7, gamma=0.3), 40, 0.2)
    assert ours(S.step_decay, 40, lr=0.2, step_size=7, gamma=0.3) == pytest.approx(ref, rel=1e-12)


def test_piecewise_lua_entropy_sgd_table():
    # cifarconv Entropy-SGD: epochs [1,3] -> 1, [4,6] -> 0.2, [7,12] -> 0.04; 10 steps per epoch
    kw = {"boundaries": [3, 6], "values": [1.0, 0.2, 0.04], "steps_per_unit": 10}
    expected = {1: 1.0, 30: 1.0, 31: 0.2, 60: 0.2, 61: 0.04, 120: 0.04, 10**6: 0.04}
    for s, lr in expected.items():
        assert S.piecewise(s, **kw) == lr, s
    # boundaries in steps (steps_per_unit = 1) and real-valued units
    assert [S.piecewise(s, boundaries=[2], values=[3.0, 4.0]) for s in (1, 2, 3)] == [3, 3, 4]
    assert S.piecewise(3, boundaries=[2.5], values=[3.0, 4.0], steps_per_unit=1) == 4.0


def test_piecewise_reproduces_tf_piecewise_constant_exactly():
    def tf_piecewise_constant(x, boundaries, values):  # TF's documented rule
        for b, v in zip(boundaries, values, strict=False):
            if x <= b:
                return v
        return values[-1]

    epochs = [4, 8, 12, 16, 20, 24]
    values = [0.4, 0.16, 0.032, 0.0064, 1.28e-3, 2.56e-4, 5.12e-5]
    tf_b = [390 * e for e in epochs]
    exact = [b + 1 for b in tf_b]  # TF evaluates at global_step = s - 1
    for s in range(1, 390 * 25, 7):
        ref = tf_piecewise_constant(s - 1, tf_b, values)
        assert S.piecewise(s, boundaries=exact, values=values) == ref
    for b in tf_b:  # the epoch form switches one step earlier than TF, and only there
        for s in (b, b + 2):
            ref = tf_piecewise_constant(s - 1, tf_b, values)
            assert S.piecewise(s, boundaries=epochs, values=values, steps_per_unit=390) == ref
        assert S.piecewise(b + 1, boundaries=epochs, values=values, steps_per_unit=390) != (
            tf_piecewise_constant(b, tf_b, values)
        )


def test_piecewise_as_steplr_and_multisteplr():
    table = {"boundaries": [10, 20], "values": [0.1, 0.05, 0.025]}
    for s in range(1, 31):  # VSGD: x0.5 every N steps, here N = 10
        assert S.piecewise(s, **table) == pytest.approx(
            S.step_decay(s, lr=0.1, step_size=10, gamma=0.5), rel=1e-15
        )
    ref = torch_lrs(
        lambda o: torch.optim.lr_scheduler.MultiStepLR(o, milestones=[10, 20], gamma=0.5), 30, 0.1
    )
    assert ours(S.piecewise, 30, **table) == pytest.approx(ref, rel=1e-12)


def test_cosine_boundaries():
    kw = {"peak_lr": 1.0, "total_steps": 4}
    assert ours(S.cosine, 6, **kw) == pytest.approx([1.0, (1 + 2**-0.5) / 2, 0.5, 0.1464466, 0, 0])
    kw = {"peak_lr": 1.0, "total_steps": 6, "warmup_steps": 2, "final_lr": 0.1}
    got = ours(S.cosine, 8, **kw)
    # warm-up 0.5, 1; decay starts at the peak on step W + 1; p = 2/4 on step 5; final at T + 1
    assert got[:3] == [0.5, 1.0, 1.0]
    assert got[4] == pytest.approx(0.1 + 0.9 * 0.5)
    assert got[6:] == pytest.approx([0.1, 0.1])
    assert S.cosine(3, peak_lr=1.0, total_steps=3, warmup_steps=3) == 1.0  # all warm-up
    assert S.cosine(4, peak_lr=1.0, total_steps=3, warmup_steps=3, final_lr=0.2) == 0.2


def test_cosine_equals_torch():
    lrs = torch_lrs(lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T, 0.01), T + 1, 0.5)
    mine = ours(S.cosine, T + 1, peak_lr=0.5, total_steps=T, final_lr=0.01)
    assert mine == pytest.approx(lrs, rel=1e-12)
    assert mine[-1] == 0.01  # final_lr at step T + 1

    def warm_then_cos(o):
        lin = torch.optim.lr_scheduler.LinearLR(o, 1 / 4, 1.0, total_iters=3)
        cos = torch.optim.lr_scheduler.CosineAnnealingLR(o, T - 4, 0.01)
        return torch.optim.lr_scheduler.SequentialLR(o, [lin, cos], milestones=[4])

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # SequentialLR's internal step(0) deprecation warning
        lrs = torch_lrs(warm_then_cos, T + 1, 0.5)
    kw = {"peak_lr": 0.5, "total_steps": T, "warmup_steps": 4, "final_lr": 0.01}
    assert ours(S.cosine, T + 1, **kw) == pytest.approx(lrs, rel=1e-12)


def test_linear_boundaries_and_torch():
    kw = {"peak_lr": 1.0, "total_steps": 4, "final_lr": 0.2}
    assert ours(S.linear, 6, **kw) == pytest.approx([1.0, 0.8, 0.6, 0.4, 0.2, 0.2])
    lrs = torch_lrs(lambda o: torch.optim.lr_scheduler.LinearLR(o, 1.0, 0.1, T), T + 5, 0.5)
    kw = {"peak_lr": 0.5, "total_steps": T, "final_lr": 0.05}
    assert ours(S.linear, T + 5, **kw) == pytest.approx(lrs, rel=1e-12)
    # warm-up = LinearLR(1/W, 1, W - 1), then LinearLR decay from the peak
    w = 5
    warm = torch_lrs(lambda o: torch.optim.lr_scheduler.LinearLR(o, 1 / w, 1.0, w - 1), w, 0.5)
    decay = torch_lrs(lambda o: torch.optim.lr_scheduler.LinearLR(o, 1.0, 0.0, T - w), T - w, 0.5)
    got = ours(S.linear, T, peak_lr=0.5, total_steps=T, warmup_steps=w)
    assert got == pytest.approx(warm + decay, rel=1e-12, abs=1e-15)


@pytest.mark.parametrize(
    "total, pct, anneal, div, final_div",
    [
        (100, 0.3, "cos", 25.0, 1e4),
        (37, 0.25, "linear", 10.0, 100.0),
        (10, 0.5, "cos", 5.0, 3.0),
        (7, 0.0, "cos", 25.0, 1e4),
        (1, 0.3, "linear", 25.0, 1e4),
    ],
)
def test_one_cycle_equals_torch(total, pct, anneal, div, final_div):
    def make(o):
        return torch.optim.lr_scheduler.OneCycleLR(
            o, max_lr=0.4, total_steps=total, pct_start=pct, anneal_strategy=anneal,
            div_factor=div, final_div_factor=final_div, cycle_momentum=False, three_phase=False,
        )  # fmt: skip

    kw = {"peak_lr": 0.4, "total_steps": total, "pct_start": pct, "anneal": anneal}
    mine = ours(S.one_cycle, total, div_factor=div, final_div_factor=final_div, **kw)
    assert mine == pytest.approx(torch_lrs(make, total), rel=1e-12)


def test_one_cycle_boundaries():
    kw = {"peak_lr": 1.0, "total_steps": 100}  # pct 0.3: peak at step 30
    assert S.one_cycle(1, **kw) == pytest.approx(1 / 25, rel=1e-12)
    assert S.one_cycle(30, **kw) == pytest.approx(1.0, rel=1e-12)
    assert S.one_cycle(100, **kw) == pytest.approx(1 / 25 / 1e4, rel=1e-12)
    assert S.one_cycle(101, **kw) == S.one_cycle(10**6, **kw) == 1 / 25 / 1e4
    # where torch divides by zero (pct_start * T = 1) the first step is the peak
    assert S.one_cycle(1, peak_lr=1.0, total_steps=10, pct_start=0.1) == 1.0


def test_inverse_sqrt_boundaries():
    kw = {"peak_lr": 1.0, "warmup_steps": 4}
    assert [S.inverse_sqrt(s, **kw) for s in (1, 2, 4, 5, 16, 100)] == pytest.approx(
        [0.25, 0.5, 1.0, math.sqrt(4 / 5), 0.5, 0.2]
    )


def test_scope_unchanged():
    assert S.scope(0, 0.03, 1e-3) == 0.03
    assert S.scope(2, 0.03, 1e-3) == pytest.approx(0.03 * 1.001**2)
    with pytest.raises(ValueError, match="Invalid step"):
        S.scope(-1, 0.03, 1e-3)


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize("name", sorted(EXAMPLES))
@pytest.mark.parametrize("step", [0, -1, 0.5, float("nan"), float("inf"), "3", None, True])
def test_every_schedule_rejects_bad_steps(name, step):
    with pytest.raises(ValueError, match=r"^Invalid step: .*\)$"):
        S.get(name)(step, **EXAMPLES[name])


BAD = [
    (S.knee, {"peak_lr": 1.0, "total_steps": 0}, "total_steps"),
    (S.knee, {"peak_lr": 0.0, "total_steps": 5}, "peak_lr"),
    (S.knee, {"peak_lr": float("nan"), "total_steps": 5}, "peak_lr"),
    (S.knee, {"peak_lr": 1.0, "total_steps": 5, "warmup_steps": -1}, "warmup_steps"),
    (S.knee, {"peak_lr": 1.0, "total_steps": 5, "explore_steps": 2.5}, "explore_steps"),
    (
        S.knee,
        {"peak_lr": 1.0, "total_steps": 10, "warmup_steps": 4, "explore_steps": 7},
        r"warmup_steps \+ explore_steps: 11 \(must be <= total_steps = 10",
    ),
    (S.cosine, {"peak_lr": 1.0, "total_steps": 10, "warmup_steps": 11}, "warmup_steps"),
    (S.cosine, {"peak_lr": 1.0, "total_steps": 10, "final_lr": -0.1}, "final_lr"),
    (S.linear, {"peak_lr": 1.0, "total_steps": 10, "warmup_steps": 11}, "warmup_steps"),
    (S.linear, {"peak_lr": 1.0, "total_steps": True}, "total_steps"),
    (S.one_cycle, {"peak_lr": 1.0, "total_steps": 10, "pct_start": 1.5}, "pct_start"),
    (S.one_cycle, {"peak_lr": 1.0, "total_steps": 10, "div_factor": 0}, "div_factor"),
    (S.one_cycle, {"peak_lr": 1.0, "total_steps": 10, "final_div_factor": -1}, "final_div"),
    (S.one_cycle, {"peak_lr": 1.0, "total_steps": 10, "anneal": "exp"}, "anneal"),
    (S.inverse_sqrt, {"peak_lr": 1.0, "warmup_steps": 0}, "warmup_steps"),
    (S.constant, {"lr": -1.0}, "lr"),
    (S.step_decay, {"lr": 1.0, "step_size": 0, "gamma": 0.5}, "step_size"),
    (S.step_decay, {"lr": 1.0, "step_size": 2, "gamma": 0.0}, "gamma"),
    (S.piecewise, {"boundaries": [2], "values": [1.0]}, r"values: \[1.0\] \(expected len"),
    (
        S.piecewise,
        {"boundaries": [2, 2], "values": [1, 2, 3]},
        r"boundaries: \[2, 2\] \(must be strictly",
    ),
    (S.piecewise, {"boundaries": [0], "values": [1, 2]}, "boundaries"),
    (S.piecewise, {"boundaries": [1], "values": [1, -2]}, "values"),
    (S.piecewise, {"boundaries": [1], "values": [1, "a"]}, r"values\[1\]"),
    (S.piecewise, {"boundaries": "12", "values": [1, 2, 3]}, "boundaries"),
    (S.piecewise, {"boundaries": [1], "values": [1, 2], "steps_per_unit": 0}, "steps_per_unit"),
]


@pytest.mark.parametrize("fn, kw, msg", BAD)
def test_invalid_hyperparameters(fn, kw, msg):
    with pytest.raises(ValueError, match="^Invalid " + msg) as err:
        fn(1, **kw)
    assert "\n" not in str(err.value)


# ----------------------------------------------------------------------------- registry


def test_registry():
    assert S.names() == tuple(sorted(S.SCHEDULES)) == tuple(sorted(EXAMPLES))
    assert S.get("knee") is S.knee
    with pytest.raises(ValueError, match=r"did you mean 'cosine'.*one_cycle"):
        S.get("cosin")
    with pytest.raises(ValueError, match="Unknown schedule: 3"):
        S.get(3)
    for name, fn in S.SCHEDULES.items():  # one-step-per-call pure functions returning floats
        assert isinstance(fn(1, **EXAMPLES[name]), float)
        assert fn.__doc__


# ----------------------------------------------------------------------------- time budgets


def test_at_fraction_knee():
    kw = {"total_steps": 1000, "peak_lr": 0.1, "explore_steps": 500}
    assert S.at_fraction("knee", 0.5, **kw) == 0.1
    assert S.at_fraction("knee", 1.0, **kw) == 0.0
    assert S.at_fraction("knee", 0.75, **kw) == pytest.approx(0.05)
    assert S.at_fraction(S.knee, 1.2, **kw) == 0.0  # past the budget


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_at_fraction_samples_the_step_schedule(name):
    kw = dict(EXAMPLES[name])
    total = kw.pop("total_steps", T)
    fn = S.get(name)
    for k in range(1, total + 3):
        direct = fn(k, **EXAMPLES[name])
        assert S.at_fraction(name, k / total, total_steps=total, **kw) == pytest.approx(
            direct, rel=1e-12, abs=1e-15
        )
    # fraction 0 (and anything below 1/T) is step 1
    assert S.at_fraction(name, 0.0, total_steps=total, **kw) == fn(1, **EXAMPLES[name])


def test_at_fraction_between_steps_and_validation():
    kw = {"total_steps": 10, "peak_lr": 1.0}
    assert S.at_fraction("linear", 0.55, **kw) == pytest.approx(0.55)  # virtual step 5.5
    assert S.virtual_step(0.0, 10) == 1.0
    assert S.virtual_step(0.37, 100) == 37.0
    with pytest.raises(ValueError, match="Invalid fraction"):
        S.virtual_step(-0.1, 10)
    with pytest.raises(ValueError, match="Invalid fraction"):
        S.at_fraction("knee", float("nan"), **kw)
    with pytest.raises(ValueError, match="Invalid total_steps"):
        S.virtual_step(0.5, 0)


# ----------------------------------------------------------------------------- factor / adapter


def test_factor_rules():
    kw = {"total_steps": 10, "warmup_steps": 2}
    assert S.factor("cosine", 1, **kw) == 0.5  # peak_lr defaults to 1
    assert S.factor("cosine", 1, peak_lr=0.2, **kw) == pytest.approx(0.5)
    assert S.factor("step_decay", 4, lr=0.3, step_size=3, gamma=0.1) == pytest.approx(0.1)
    table = {"boundaries": [1], "values": [0.4, 0.1]}
    assert S.factor("piecewise", 2, **table) == 0.25  # value / values[0]
    assert S.factor(lambda s: 1 / s, 4) == 0.25  # a plain callable returns the factor
    with pytest.raises(ValueError, match=r"^Invalid values\[0\]: 0.0"):
        S.factor("piecewise", 1, boundaries=[1], values=[0.0, 0.1])
    with pytest.raises(ValueError, match=r"^Invalid lr: 0\.0"):
        S.factor("constant", 1, lr=0.0)
    with pytest.raises(ValueError, match="Invalid schedule"):
        S.factor(42, 1)


def run(opt, sched, n, grad=None):
    """lrs of param group 0.. used inside optimizer steps 1..n (and step k's param deltas)."""
    seen = []
    for _ in range(n):
        for group in opt.param_groups:
            for p in group["params"]:
                p.grad = torch.ones_like(p) if grad is None else grad(p)
        seen.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    return seen


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_attach_kth_step_uses_schedule_k(name):
    opt = torch.optim.SGD([torch.zeros(2, requires_grad=True)], lr=PEAK.get(name, 0.1))
    sched = S.attach(opt, name, **EXAMPLES[name])
    fn = S.get(name)
    seen = run(opt, sched, T + 10)
    for k, (lr,) in enumerate(seen, start=1):
        assert lr == pytest.approx(fn(k, **EXAMPLES[name]), rel=1e-12, abs=1e-18), k


def test_attach_lr_is_used_inside_the_step(float64_default):
    p = torch.zeros(1, requires_grad=True)
    opt = torch.optim.SGD([p], lr=0.1)
    kw = {"total_steps": 12, "warmup_steps": 2, "explore_steps": 4}
    sched = S.attach(opt, S.knee, **kw)  # the function object works like its name
    for k in range(1, 16):
        before = p.detach().clone()
        p.grad = torch.ones_like(p)
        opt.step()
        sched.step()
        assert (before - p.detach()).item() == pytest.approx(
            S.knee(k, peak_lr=0.1, **kw), abs=1e-15
        )


def test_attach_keeps_group_ratios():
    a, b = torch.zeros(1, requires_grad=True), torch.zeros(1, requires_grad=True)
    opt = torch.optim.SGD([{"params": [a], "lr": 0.1}, {"params": [b], "lr": 0.01}], lr=0.5)
    kw = {"total_steps": T, "warmup_steps": 3, "explore_steps": 7}
    seen = run(opt, S.attach(opt, "knee", **kw), T + 3)
    for k, (lr_a, lr_b) in enumerate(seen, start=1):
        assert lr_a == pytest.approx(S.knee(k, peak_lr=0.1, **kw), rel=1e-12, abs=1e-18)
        assert lr_a == pytest.approx(10 * lr_b, rel=1e-12, abs=1e-18)
    assert seen[9][0] == pytest.approx(0.1) and seen[9][1] == pytest.approx(0.01)  # explore


def test_attach_peak_lr_only_fixes_units():
    def lrs(**extra):
        opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.3)
        return [lr for (lr,) in run(opt, S.attach(opt, "cosine", total_steps=10, **extra), 12)]

    assert lrs() == pytest.approx(lrs(peak_lr=7.0), rel=1e-15)
    assert lrs(final_lr=0.1) == pytest.approx(lrs(peak_lr=2.0, final_lr=0.2))
    assert lrs(final_lr=0.1)[-1] == pytest.approx(0.03)


def _model_and_opt():
    torch.manual_seed(0)
    w = torch.randn(3, requires_grad=True)
    v = torch.randn(2, requires_grad=True)
    opt = torch.optim.SGD(
        [{"params": [w], "lr": 0.1}, {"params": [v], "lr": 0.02}], lr=0.1, momentum=0.9
    )
    return (w, v), opt


def _grad(p):
    return torch.sin(p.detach() * 3.0) + 0.1


@pytest.mark.parametrize("name", ["knee", "piecewise", "one_cycle"])
def test_attach_resume_is_exact(name):
    kw = EXAMPLES[name]
    (w, v), opt = _model_and_opt()
    sched = S.attach(opt, name, **kw)
    full = run(opt, sched, 25, _grad)
    final = [w.detach().clone(), v.detach().clone()]

    (w, v), opt = _model_and_opt()
    sched = S.attach(opt, name, **kw)
    first = run(opt, sched, 7, _grad)
    buf = io.BytesIO()
    torch.save({"opt": opt.state_dict(), "sched": sched.state_dict()}, buf)
    saved = [w.detach().clone(), v.detach().clone()]

    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)  # the scheduler state is plain data
    (w, v), opt = _model_and_opt()
    with torch.no_grad():
        w.copy_(saved[0])
        v.copy_(saved[1])
    sched = S.attach(opt, name, **kw)
    opt.load_state_dict(ckpt["opt"])
    sched.load_state_dict(ckpt["sched"])
    rest = run(opt, sched, 18, _grad)
    assert first + rest == full  # exact
    assert torch.equal(w, final[0]) and torch.equal(v, final[1])


def test_attach_custom_callable_state_is_plain():
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.5)
    sched = S.attach(opt, lambda s, half_life: 0.5 ** (s / half_life), half_life=2)
    seen = run(opt, sched, 4)
    assert [x for (x,) in seen] == pytest.approx([0.5 * 0.5 ** (k / 2) for k in range(1, 5)])
    buf = io.BytesIO()
    torch.save(sched.state_dict(), buf)  # a lambda is never pickled
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    assert state["last_epoch"] == 4
    assert state["lr_lambdas"][0] == {"name": None, "kwargs": {"half_life": 2}, "reference": 1.0}


def test_attach_validates_before_touching_the_optimizer():
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.5)
    with pytest.raises(ValueError, match="Invalid warmup_steps"):
        S.attach(opt, "cosine", total_steps=5, warmup_steps=6)
    with pytest.raises(ValueError, match="Unknown schedule"):
        S.attach(opt, "cosinus", total_steps=5)
    with pytest.raises(ValueError, match="Invalid step"):
        S.attach(opt, "cosine", total_steps=5, step=3)
    with pytest.raises(ValueError, match=r"Invalid values\[0\]"):
        S.attach(opt, "piecewise", boundaries=[1], values=[0, 1])
    assert opt.param_groups[0]["lr"] == 0.5 and "initial_lr" not in opt.param_groups[0]
