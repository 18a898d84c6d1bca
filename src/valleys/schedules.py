"""Learning-rate and coupling schedules as pure functions of progress."""

from __future__ import annotations

from valleys import _validate as check


def scope(step: int, scope: float, scope_growth: float) -> float:
    """Entropy-SGD's scoping γ_k = γ_0 · (1 + γ_1)^k (Chaudhari et al. 2017, §4.3).

    ``step`` is k, the number of outer steps already taken (0-based), ``scope`` is γ_0 and
    ``scope_growth`` is γ_1. The paper's CIFAR-10 setting is γ_0 = 0.03, γ_1 = 1e-3.
    """
    k = check.count("step", step)
    g0 = check.nonneg("scope", scope)
    g1 = check.nonneg("scope_growth", scope_growth)
    return g0 * (1.0 + g1) ** k
