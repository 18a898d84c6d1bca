"""SGN's damping rules and hyperparameter checks (pure functions; :mod:`valleys.optim.sgn`
re-exports the public ones)."""

from __future__ import annotations

import math
from typing import Any

from valleys import _validate as check

__all__ = ["DAMPING_SCHEDULES", "scheduled_damping", "trust_region_update", "validated"]

DAMPING_SCHEDULES = ("const", "linear", "cos")


def scheduled_damping(
    step: int, initial: float, minimum: float, schedule: str, steps: int
) -> float:
    """The damping ρ_t of step ``step`` (1, 2, …) when the trust region is off.

    ``"const"``: ρ_0. ``"linear"``: ``max(ρ_0 + (ρ_min − ρ_0)(t − 1)/(K − 1), ρ_min)``, reaching
    ρ_min at step K (at once when K = 1). ``"cos"``: ``ρ_0 cos(π t / (2K))``, replaced by ρ_min
    when below it or when t > K.
    """
    if schedule == "const":
        return initial
    if schedule == "linear":
        if steps <= 1:
            return minimum
        return max(initial + (minimum - initial) * (step - 1) / (steps - 1), minimum)
    if schedule == "cos":
        value = initial * math.cos(math.pi * step / (2 * steps))
        return minimum if value < minimum or step > steps else value
    raise ValueError(
        f"Invalid damping_schedule: {schedule!r} (expected one of {DAMPING_SCHEDULES})"
    )


def trust_region_update(damping: float, ratio: float, minimum: float) -> float:
    """ρ after a step whose actual/predicted decrease ratio is ``ratio``: ×1.5 below 1/4,
    ×2/3 above 3/4 (not below ``minimum``), unchanged otherwise or for a NaN ratio."""
    if ratio < 0.25:
        return 1.5 * damping
    if ratio > 0.75:
        return max(damping * 2.0 / 3.0, minimum)
    return damping


def validated(hp: dict[str, Any]) -> dict[str, Any]:
    return {
        "lr": check.nonneg("lr", hp["lr"]),
        "damping": check.nonneg("damping", hp["damping"]),
        "damping_min": check.nonneg("damping_min", hp["damping_min"]),
        "trust_region": check.flag("trust_region", hp["trust_region"]),
        "damping_schedule": check.choice(
            "damping_schedule", hp["damping_schedule"], DAMPING_SCHEDULES
        ),
        "damping_schedule_steps": check.count(
            "damping_schedule_steps", hp["damping_schedule_steps"], 1
        ),
        "cg_max_iters": check.count("cg_max_iters", hp["cg_max_iters"], 1),
        "cg_warmup_iters": check.count("cg_warmup_iters", hp["cg_warmup_iters"], 1),
        "cg_warmup_steps": check.count("cg_warmup_steps", hp["cg_warmup_steps"]),
        "cg_tol": check.nonneg("cg_tol", hp["cg_tol"]),
        "precondition": check.flag("precondition", hp["precondition"]),
        "precond_exponent": check.interval("precond_exponent", hp["precond_exponent"], 0.0, 1.0),
        "momentum": check.interval("momentum", hp["momentum"], 0.0, 1.0, high_open=True),
        "line_search": check.flag("line_search", hp["line_search"]),
        "ls_c": check.interval("ls_c", hp["ls_c"], 0.0, 1.0, low_open=True, high_open=True),
        "ls_factor": check.interval(
            "ls_factor", hp["ls_factor"], 0.0, 1.0, low_open=True, high_open=True
        ),
        "ls_max_iters": check.count("ls_max_iters", hp["ls_max_iters"]),
        "faithful": check.flag("faithful", hp["faithful"]),
    }
