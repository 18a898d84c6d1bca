"""Learning-rate and coupling schedules as pure functions of progress.

Step convention
---------------
Every learning-rate schedule here is a pure function ``f(step, **hyperparameters) -> float``
returning the learning rate used by the ``step``-th call of ``optimizer.step()``, counted from 1:
``step = 1`` is the first optimizer step. torch's schedulers count ``last_epoch`` from 0
instead, and the k-th optimizer step runs with ``last_epoch = k - 1``; so
``ours(k) == torch(last_epoch=k-1)`` wherever both define the same schedule (the docstrings
name the torch equivalent, and the tests check it step by step). ``step`` may also be a real
number >= 1 (a *virtual step*), which is how time budgets are served (see :func:`at_fraction`).

Two end-of-schedule conventions coexist, each kept from its reference:

* :func:`knee` follows the paper's code: the linear decay reaches 0 *at* step ``total_steps``.
* :func:`cosine`, :func:`linear` follow torch's ``CosineAnnealingLR``/``LinearLR``: the decay starts
  at the peak on the first step after warm-up and reaches ``final_lr`` one step *after*
  ``total_steps`` (so the last step of the run still has a non-zero, tiny lr);
  :func:`one_cycle` follows ``OneCycleLR``, which reaches its minimum at step ``total_steps``.

After ``total_steps`` every schedule holds its end value (torch's cosine would rise again and
``OneCycleLR`` would raise).

Time budgets
------------
A run limited by wall-clock time maps the elapsed fraction ``f`` of its budget to the virtual step
``max(1, f * total_steps)`` (:func:`virtual_step`) and evaluates the schedule there
(:func:`at_fraction`). At ``f = k / total_steps`` this is exactly the lr of step ``k`` of a
step-based run, so a time-budgeted run follows the same curve; ``total_steps`` (and the other
``*_steps`` arguments) are then only the resolution of the virtual clock.

Attaching to an optimizer
-------------------------
:func:`attach` wraps a schedule in ``torch.optim.lr_scheduler.LambdaLR`` so that its position is
saved by the scheduler's own ``state_dict``. Each param group's lr (as given to the optimizer) is
the schedule's peak; the schedule is applied as a relative factor (:func:`factor`), so per-group
lr ratios are kept.
"""

from __future__ import annotations

import bisect
import inspect
import itertools
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from valleys import _validate as check

__all__ = [
    "SCHEDULES",
    "at_fraction",
    "attach",
    "constant",
    "cosine",
    "factor",
    "get",
    "inverse_sqrt",
    "knee",
    "linear",
    "names",
    "one_cycle",
    "piecewise",
    "scope",
    "step_decay",
    "virtual_step",
]

Schedule = Callable[..., float]


def scope(step: int, scope: float, scope_growth: float) -> float:
    """Entropy-SGD's scoping γ_k = γ_0 · (1 + γ_1)^k (Chaudhari et al. 2017, §4.3).

    ``step`` is k, the number of outer steps already taken (0-based), ``scope`` is γ_0 and
    ``scope_growth`` is γ_1. The paper's CIFAR-10 setting is γ_0 = 0.03, γ_1 = 1e-3.
    """
    k = check.count("step", step)
    g0 = check.nonneg("scope", scope)
    g1 = check.nonneg("scope_growth", scope_growth)
    return g0 * (1.0 + g1) ** k


# ---------------------------------------------------------------------------------------------
# validation helpers


def _step(step: Any) -> float:
    s = check.real("step", step)
    if s < 1:
        check.fail(
            "step", step, "must be >= 1: steps are 1-based, step 1 is the first optimizer.step()"
        )
    return s


def _warmup(warmup_steps: Any, total_steps: int) -> int:
    w = check.count("warmup_steps", warmup_steps)
    if w > total_steps:
        check.fail("warmup_steps", warmup_steps, f"must be <= total_steps = {total_steps}")
    return w


def _reals(name: str, values: Any) -> list[float]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        check.fail(name, values, "expected a list of real numbers")
    return [check.real(f"{name}[{i}]", v) for i, v in enumerate(values)]


# ---------------------------------------------------------------------------------------------
# schedules


def knee(
    step: float,
    *,
    peak_lr: float,
    total_steps: int,
    warmup_steps: int = 0,
    explore_steps: int = 0,
) -> float:
    """Knee (explore-exploit) schedule of Iyer et al., JMLR 2023 ("Wide-minima Density Hypothesis
    and the Explore-Exploit Learning Rate Schedule"), as in their ``KneeLRScheduler``.

    With s = ``step``, η = ``peak_lr``, W = ``warmup_steps``, E = ``explore_steps``,
    T = ``total_steps`` and D = T − W − E decay steps::

        lr(s) = η · s / W                      s ≤ W            (linear warm-up)
              = η                              W < s ≤ W + E    (explore)
              = max(0, η · (1 − (s − W − E)/D))  s > W + E       (linear exploit to 0)

    The decay reaches 0 exactly at s = T and stays 0 after it (so the T-th step itself runs with
    lr 0, as in the original; with W = E = 0 the peak is never used). Unlike the original, D = 0
    is allowed (the lr is 0 after W + E) and the schedule works per param group via
    :func:`attach`. The paper recommends E = 50 % of the budget.
    """
    s = _step(step)
    peak = check.positive("peak_lr", peak_lr)
    total = check.count("total_steps", total_steps, 1)
    w = check.count("warmup_steps", warmup_steps)
    e = check.count("explore_steps", explore_steps)
    if w + e > total:
        check.fail(
            "warmup_steps + explore_steps",
            w + e,
            f"must be <= total_steps = {total}; got warmup_steps={w}, explore_steps={e}",
        )
    if s <= w:
        return peak * s / w
    if s <= w + e:
        return peak
    d = total - w - e
    if d == 0:
        return 0.0
    return max(0.0, peak * (1.0 - (s - w - e) / d))


def constant(step: float, *, lr: float) -> float:
    """A constant learning rate: lr(s) = ``lr`` (torch: no scheduler, or ``ConstantLR`` with
    ``factor=1``)."""
    _step(step)
    return check.nonneg("lr", lr)


def piecewise(
    step: float,
    *,
    boundaries: Sequence[float],
    values: Sequence[float],
    steps_per_unit: float = 1.0,
) -> float:
    """Piecewise-constant learning rate.

    ``boundaries`` b_0 < b_1 < … < b_{n−1} are in units of ``steps_per_unit`` optimizer steps
    (1 for boundaries given in steps; the number of steps per epoch for boundaries given in
    epochs); ``values`` v_0 … v_n has one more entry. With u = s / ``steps_per_unit`` (step s
    lies in epoch ⌈u⌉)::

        lr(s) = v_0    if u ≤ b_0
              = v_i    if b_{i−1} < u ≤ b_i
              = v_n    if u > b_{n−1}

    i.e. v_i is used up to and including (epoch) b_i. Examples:

    * Entropy-SGD Lua tables (epoch ranges [1,3]→1, [4,6]→0.2, [7,12]→0.04, first match wins):
      ``boundaries=[3, 6], values=[1, 0.2, 0.04], steps_per_unit=<steps per epoch>``.
    * TF port: ``boundaries=[4, 8, 12, 16, 20, 24]`` (epochs), ``steps_per_unit=390``. TF's
      ``piecewise_constant`` is evaluated at ``global_step = s − 1``, so it switches one step
      later than this; exact TF is ``boundaries=[390 * b + 1 for b in …]`` with
      ``steps_per_unit=1``.
    * torch ``StepLR(step_size=N, gamma=g)`` / ``MultiStepLR(milestones=[N, 2N])``:
      ``boundaries=[N, 2N], values=[lr, lr * g, lr * g**2]`` (the same as :func:`step_decay`).
    """
    s = _step(step)
    b = _reals("boundaries", boundaries)
    v = _reals("values", values)
    spu = check.positive("steps_per_unit", steps_per_unit)
    if len(v) != len(b) + 1:
        check.fail("values", list(values), f"expected len(boundaries) + 1 = {len(b) + 1} values")
    if any(x < 0 for x in v):
        check.fail("values", list(values), "every value must be >= 0")
    if b and b[0] <= 0:
        check.fail("boundaries", list(boundaries), "must be > 0")
    if any(b1 <= b0 for b0, b1 in itertools.pairwise(b)):
        check.fail("boundaries", list(boundaries), "must be strictly increasing")
    return v[bisect.bisect_left([x * spu for x in b], s)]


def step_decay(step: float, *, lr: float, step_size: int, gamma: float) -> float:
    """Step decay, torch's ``StepLR(step_size, gamma)`` stepped once per optimizer step::

        lr(s) = lr · gamma^⌊(s − 1) / step_size⌋

    (torch at ``last_epoch = s − 1``). VSGD's experiments: ``gamma=0.5, step_size=10_000``.
    """
    s = _step(step)
    base = check.nonneg("lr", lr)
    size = check.count("step_size", step_size, 1)
    g = check.positive("gamma", gamma)
    return base * g ** math.floor((s - 1) / size)


def _decay_progress(s: float, warmup: int, total: int) -> float:
    """Fraction of the post-warm-up decay done at step s > W, torch's 0-based convention."""
    d = total - warmup
    if d == 0:
        return 1.0
    return min(1.0, max(0.0, (s - warmup - 1) / d))


def cosine(
    step: float,
    *,
    peak_lr: float,
    total_steps: int,
    warmup_steps: int = 0,
    final_lr: float = 0.0,
) -> float:
    """Linear warm-up, then cosine annealing from ``peak_lr`` to ``final_lr`` (Loshchilov &
    Hutter 2017, without restarts).

    With η = ``peak_lr``, η_f = ``final_lr``, W = ``warmup_steps``, T = ``total_steps``::

        lr(s) = η · s / W                                   s ≤ W
              = η_f + (η − η_f) · (1 + cos(π p)) / 2,       p = min(1, (s − W − 1)/(T − W))

    torch: for W = 0 this is ``CosineAnnealingLR(T_max=T, eta_min=η_f)``; with warm-up it is
    ``SequentialLR([LinearLR(1/W, 1, total_iters=W−1), CosineAnnealingLR(T−W, η_f)],
    milestones=[W])``: the peak is used at steps W and W + 1, and η_f is reached at step T + 1
    (held afterwards).
    """
    s = _step(step)
    peak = check.positive("peak_lr", peak_lr)
    total = check.count("total_steps", total_steps, 1)
    w = _warmup(warmup_steps, total)
    final = check.nonneg("final_lr", final_lr)
    if s <= w:
        return peak * s / w
    p = _decay_progress(s, w, total)
    return final + (peak - final) * (1.0 + math.cos(math.pi * p)) / 2.0


def linear(
    step: float,
    *,
    peak_lr: float,
    total_steps: int,
    warmup_steps: int = 0,
    final_lr: float = 0.0,
) -> float:
    """Linear warm-up, then linear decay from ``peak_lr`` to ``final_lr``::

        lr(s) = η · s / W                      s ≤ W
              = η + (η_f − η) · p,             p = min(1, (s − W − 1)/(T − W))

    torch: for W = 0 this is ``LinearLR(start_factor=1, end_factor=η_f/η, total_iters=T)``; the
    warm-up is ``LinearLR(1/W, 1, total_iters=W−1)``. η_f is reached at step T + 1. (For a decay
    that reaches its end *at* step T, as in the Knee paper, use :func:`knee` with
    ``explore_steps=0``.)
    """
    s = _step(step)
    peak = check.positive("peak_lr", peak_lr)
    total = check.count("total_steps", total_steps, 1)
    w = _warmup(warmup_steps, total)
    final = check.nonneg("final_lr", final_lr)
    if s <= w:
        return peak * s / w
    p = _decay_progress(s, w, total)
    return peak + (final - peak) * p


def one_cycle(
    step: float,
    *,
    peak_lr: float,
    total_steps: int,
    pct_start: float = 0.3,
    div_factor: float = 25.0,
    final_div_factor: float = 1e4,
    anneal: str = "cos",
) -> float:
    """1cycle policy (Smith & Topin 2018), the lr of torch's ``OneCycleLR(max_lr=peak_lr,
    total_steps, pct_start, anneal_strategy=anneal, div_factor, final_div_factor,
    three_phase=False)`` at every step.

    With η = ``peak_lr``, η_0 = η / ``div_factor``, η_min = η_0 / ``final_div_factor``,
    e = s − 1 and e_1 = ``pct_start`` · T − 1::

        lr(s) = A(η_0, η, e / e_1)                          e ≤ e_1
              = A(η, η_min, (e − e_1) / (T − 1 − e_1))      e_1 < e ≤ T − 1
              = η_min                                       s > T

    where A(a, b, p) = b + (a − b)(1 + cos π p)/2 (``anneal="cos"``) or a + (b − a) p
    (``"linear"``). The peak is at step ``pct_start · T``, η_min at step T and after it (torch
    extrapolates the anneal at step T + 1 and raises beyond). Where torch divides by zero
    (e_1 = 0, i.e. ``pct_start · T = 1``) the first step gets η.
    Momentum cycling is not part of this function.
    """
    s = _step(step)
    peak = check.positive("peak_lr", peak_lr)
    total = check.count("total_steps", total_steps, 1)
    pct = check.interval("pct_start", pct_start, 0.0, 1.0)
    div = check.positive("div_factor", div_factor)
    final_div = check.positive("final_div_factor", final_div_factor)
    how = check.choice("anneal", anneal, ("cos", "linear"))
    initial = peak / div
    lowest = initial / final_div
    if s > total:
        return lowest
    e = s - 1.0
    e1 = float(pct * total) - 1.0
    if e <= e1:
        start, end, p = initial, peak, (e / e1 if e1 > 0 else 1.0)
    else:
        start, end, p = peak, lowest, (e - e1) / (total - 1 - e1)
    if how == "cos":
        return end + (start - end) / 2.0 * (math.cos(math.pi * p) + 1.0)
    return (end - start) * p + start


def inverse_sqrt(step: float, *, peak_lr: float, warmup_steps: int) -> float:
    """Linear warm-up then inverse-square-root decay (Vaswani et al. 2017; fairseq's
    ``inverse_sqrt``)::

        lr(s) = η · min(s / W, sqrt(W / s))

    i.e. η·s/W up to the peak η at s = W, then η·sqrt(W/s). W = ``warmup_steps`` >= 1. No torch
    scheduler equivalent.
    """
    s = _step(step)
    peak = check.positive("peak_lr", peak_lr)
    w = check.count("warmup_steps", warmup_steps, 1)
    if s <= w:
        return peak * s / w
    return peak * math.sqrt(w / s)


# ---------------------------------------------------------------------------------------------
# registry

SCHEDULES: dict[str, Schedule] = {
    "constant": constant,
    "cosine": cosine,
    "inverse_sqrt": inverse_sqrt,
    "knee": knee,
    "linear": linear,
    "one_cycle": one_cycle,
    "piecewise": piecewise,
    "step_decay": step_decay,
}
"""Learning-rate schedules by name. (:func:`scope` is a coupling schedule, not listed here.)"""

# which keyword holds each schedule's peak: the reference lr that :func:`factor` divides by
_PEAK_ARG = {
    "constant": "lr",
    "cosine": "peak_lr",
    "inverse_sqrt": "peak_lr",
    "knee": "peak_lr",
    "linear": "peak_lr",
    "one_cycle": "peak_lr",
    "step_decay": "lr",
}


def names() -> tuple[str, ...]:
    """The registered schedule names, sorted."""
    return tuple(sorted(SCHEDULES))


def get(name: str) -> Schedule:
    """The schedule registered as ``name``; ``ValueError`` naming the valid ones otherwise."""
    if isinstance(name, str) and name in SCHEDULES:
        return SCHEDULES[name]
    raise check.unknown("schedule", name, names())


def _resolve(schedule: str | Schedule) -> tuple[str | None, Schedule]:
    """(registry name or None, function) for a name or a callable."""
    if isinstance(schedule, str):
        return schedule, get(schedule)
    if not callable(schedule):
        check.fail("schedule", schedule, "expected a schedule name or a callable")
    for key, fn in SCHEDULES.items():
        if fn is schedule:
            return key, fn
    return None, schedule


# ---------------------------------------------------------------------------------------------
# time budgets


def virtual_step(fraction: float, total_steps: int) -> float:
    """The virtual step ``max(1, fraction · total_steps)`` at which a schedule is evaluated when
    ``fraction`` of a wall-clock budget has elapsed.

    ``fraction = k / total_steps`` gives step k exactly. Fractions above 1 are allowed (a last
    step that starts just after the budget) and give the schedule's after-the-end value.
    """
    f = check.nonneg("fraction", fraction)
    total = check.count("total_steps", total_steps, 1)
    return max(1.0, f * total)


def _takes(fn: Schedule, name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return True
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def at_fraction(
    schedule: str | Schedule, fraction: float, *, total_steps: int, **kwargs: Any
) -> float:
    """The lr of ``schedule`` when ``fraction`` of a time budget has elapsed:
    ``schedule(virtual_step(fraction, total_steps), total_steps=total_steps, **kwargs)``.

    ``total_steps`` is passed on to schedules that take it and otherwise only sets the scale of
    the virtual clock (e.g. for :func:`inverse_sqrt`, whose ``warmup_steps`` is then in the same
    virtual units). Examples: ``at_fraction("knee", 0.5, total_steps=1000, peak_lr=0.1,
    explore_steps=500) == 0.1`` and at fraction 1.0 it is 0. For cosine/linear, fraction 1 gives
    the lr of a step-based run's last step, one step short of ``final_lr``; choose a fine
    ``total_steps`` (say 10**6) to make the curve effectively continuous.
    """
    _, fn = _resolve(schedule)
    s = virtual_step(fraction, total_steps)
    if _takes(fn, "total_steps"):
        kwargs["total_steps"] = total_steps
    return fn(s, **kwargs)


# ---------------------------------------------------------------------------------------------
# relative factor and the LambdaLR adapter


def _relative(
    name: str | None, fn: Schedule, kwargs: dict[str, Any]
) -> tuple[dict[str, Any], float]:
    """(kwargs with the peak filled in, reference lr that the schedule is divided by)."""
    kwargs = dict(kwargs)
    if name in _PEAK_ARG:
        kwargs.setdefault(_PEAK_ARG[name], 1.0)
    fn(1, **kwargs)  # validates the hyperparameters
    if name in _PEAK_ARG:
        what, ref = _PEAK_ARG[name], float(kwargs[_PEAK_ARG[name]])
    elif name == "piecewise":
        what, ref = "values[0]", float(kwargs["values"][0])
    else:
        return kwargs, 1.0
    if ref <= 0:
        check.fail(what, ref, "must be > 0 to use the schedule as a factor of each group's lr")
    return kwargs, ref


def factor(schedule: str | Schedule, step: float, **kwargs: Any) -> float:
    """The multiplier :func:`attach` applies to each param group's lr at ``step``.

    * Schedules with a peak argument (``peak_lr``: knee, cosine, linear, one_cycle,
      inverse_sqrt; ``lr``: constant, step_decay): ``schedule(step) / peak``. If the peak is not
      given it is 1, so every other lr argument (``final_lr``) is then relative to the peak.
    * ``piecewise``: ``value / values[0]``: an absolute table can be pasted as is; the group
      lr plays the role of ``values[0]``.
    * Any other callable: its return value is the factor itself.

    So a group whose lr equals the schedule's peak (or ``values[0]``) gets exactly the absolute
    schedule, and groups with other lrs keep their ratios to it.
    """
    name, fn = _resolve(schedule)
    kwargs, ref = _relative(name, fn, kwargs)
    return fn(step, **kwargs) / ref


def _plain(value: Any) -> Any:
    """Python scalars and lists, so that the scheduler's state_dict loads with weights_only."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "tolist"):  # numpy arrays and scalars, tensors
        return value.tolist()
    return value


class _Factor:
    """LambdaLR's λ: epoch i (0-based) ↦ factor(schedule, i + 1, **kwargs).

    LambdaLR's state_dict copies ``__dict__`` of callable objects; keeping only the name, the
    hyperparameters and the reference there (the function sits in a slot) makes that state
    plain data, loadable with ``torch.load(weights_only=True)`` and never pickling user code.
    """

    __slots__ = ("__dict__", "_fn")

    def __init__(self, name: str | None, fn: Schedule, kwargs: dict[str, Any], ref: float):
        self._fn = fn
        self.name = name
        self.kwargs = kwargs
        self.reference = ref

    def __call__(self, epoch: int) -> float:
        fn = self._fn if self.name is None else SCHEDULES[self.name]
        return fn(epoch + 1, **self.kwargs) / self.reference


def attach(
    optimizer: torch.optim.Optimizer, schedule: str | Schedule, **kwargs: Any
) -> torch.optim.lr_scheduler.LambdaLR:
    """Drive ``optimizer``'s learning rates by ``schedule`` through ``LambdaLR``.

    Contract: call ``scheduler.step()`` after each ``optimizer.step()``; the k-th
    ``optimizer.step()`` (k = 1, 2, …) then runs with ``group["lr"] = base · factor(k)`` for
    every group, where ``base`` is the group's lr when attached (LambdaLR's ``initial_lr``) and
    ``factor`` is :func:`factor` (λ(last_epoch) = factor(last_epoch + 1), since LambdaLR starts
    at last_epoch 0). Give each group its peak lr, e.g. ``SGD(params, lr=0.1)`` with
    ``attach(opt, "knee", total_steps=T, explore_steps=T // 2)`` (``peak_lr`` may be left out;
    if given it only fixes the units of the other lr arguments). For ``piecewise`` give the
    group lr ``values[0]``.

    The position (``last_epoch``) and the hyperparameters are saved by
    ``scheduler.state_dict()`` as plain data. To resume, rebuild the optimizer and the scheduler
    the same way, then call ``optimizer.load_state_dict`` and ``scheduler.load_state_dict``.
    """
    name, fn = _resolve(schedule)
    if "step" in kwargs:
        check.fail(
            "step", kwargs["step"], "attach takes hyperparameters only; LambdaLR counts steps"
        )
    kwargs, ref = _relative(name, fn, {k: _plain(v) for k, v in kwargs.items()})
    return torch.optim.lr_scheduler.LambdaLR(optimizer, _Factor(name, fn, kwargs, ref))
