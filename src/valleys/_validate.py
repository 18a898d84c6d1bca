"""Argument validation shared by the library (optimizers, schedules, diagnostics).

Each check raises ``ValueError("Invalid <name>: <value> (<what is expected>)")`` so that a user
sees in one line which argument is wrong and what range it must lie in.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterable
from typing import Any, NoReturn


def fail(name: str, value: Any, expected: str) -> NoReturn:
    """Raise the project's one-line ``ValueError`` for argument ``name``."""
    raise ValueError(f"Invalid {name}: {value!r} ({expected})")


def real(name: str, value: Any) -> float:
    """Return ``value`` as a float, rejecting bools, non-numbers, NaN and infinities."""
    if isinstance(value, (bool, str, bytes)):
        fail(name, value, "expected a real number")
    try:  # ints, floats, numpy scalars and one-element tensors
        value = float(value)
    except (TypeError, ValueError, RuntimeError):
        fail(name, value, "expected a real number")
    if not math.isfinite(value):
        fail(name, value, "must be finite")
    return value


def nonneg(name: str, value: Any) -> float:
    """A finite real ``>= 0``."""
    v = real(name, value)
    if v < 0:
        fail(name, value, "must be >= 0")
    return v


def positive(name: str, value: Any) -> float:
    """A finite real ``> 0``."""
    v = real(name, value)
    if v <= 0:
        fail(name, value, "must be > 0")
    return v


def interval(
    name: str,
    value: Any,
    low: float,
    high: float,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """A finite real in the interval from ``low`` to ``high`` (closed unless told otherwise)."""
    v = real(name, value)
    below = v <= low if low_open else v < low
    above = v >= high if high_open else v > high
    if below or above:
        lo = "(" if low_open else "["
        hi = ")" if high_open else "]"
        fail(name, value, f"must lie in {lo}{low}, {high}{hi}")
    return v


def count(name: str, value: Any, minimum: int = 0) -> int:
    """An integer ``>= minimum`` (bools rejected)."""
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            fail(name, value, f"expected an integer >= {minimum}")
    if value < minimum:
        fail(name, value, f"must be an integer >= {minimum}")
    return int(value)


def flag(name: str, value: Any) -> bool:
    """A bool."""
    if not isinstance(value, bool):
        fail(name, value, "expected True or False")
    return value


def choice(name: str, value: Any, choices: Iterable[str]) -> str:
    """One string out of ``choices``."""
    options = tuple(choices)
    if value not in options:
        close = difflib.get_close_matches(str(value), [str(c) for c in options], n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        fail(name, value, "expected one of " + ", ".join(repr(c) for c in options) + hint)
    return value


def unknown(what: str, value: Any, valid: Iterable[str]) -> ValueError:
    """The error for a name that is not one of ``valid``, suggesting the closest one.

    Returned (not raised) so callers can ``raise unknown(...) from None``.
    """
    options = [str(v) for v in valid]
    close = difflib.get_close_matches(str(value), options, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return ValueError(f"Unknown {what}: {value!r} ({hint}valid: {', '.join(options)})")
