import math

import numpy as np
import pytest
import torch

from valleys import _validate as check


@pytest.mark.parametrize("bad", [True, "0.1", None, [1.0], float("nan"), math.inf])
def test_real_rejects_non_numbers_and_non_finite(bad):
    with pytest.raises(ValueError, match=r"^Invalid lr: "):
        check.real("lr", bad)


def test_real_accepts_numeric_scalars():
    assert check.real("x", 3) == 3.0
    assert check.real("x", np.float32(0.5)) == 0.5
    assert check.real("x", torch.tensor(0.25)) == 0.25


def test_ranges_and_messages():
    assert check.nonneg("a", 0) == 0.0
    with pytest.raises(ValueError, match=r"Invalid a: -1 \(must be >= 0\)"):
        check.nonneg("a", -1)
    with pytest.raises(ValueError, match=r"must be > 0"):
        check.positive("b", 0.0)
    assert check.interval("m", 0.0, 0.0, 1.0, high_open=True) == 0.0
    with pytest.raises(ValueError, match=r"must lie in \[0.0, 1.0\)"):
        check.interval("m", 1.0, 0.0, 1.0, high_open=True)
    with pytest.raises(ValueError, match=r"must lie in \(0.0, 1.0\]"):
        check.interval("m", 0.0, 0.0, 1.0, low_open=True)


def test_count_flag_choice():
    assert check.count("n", 3) == 3
    assert check.count("n", 4.0) == 4
    for bad in (2.5, True, -1, "3"):
        with pytest.raises(ValueError, match="Invalid n"):
            check.count("n", bad)
    with pytest.raises(ValueError, match="must be an integer >= 1"):
        check.count("n", 0, 1)
    assert check.flag("f", False) is False
    with pytest.raises(ValueError, match="expected True or False"):
        check.flag("f", 1)
    assert check.choice("v", "a", ("a", "b")) == "a"
    with pytest.raises(ValueError, match="expected one of 'a', 'b'"):
        check.choice("v", "c", ("a", "b"))


def test_unknown_suggests_closest():
    err = check.unknown("optimizer", "adamw2", ["sgd", "adam", "adamw"])
    assert str(err) == "Unknown optimizer: 'adamw2' (did you mean 'adamw'? valid: sgd, adam, adamw)"
    assert "did you mean" not in str(check.unknown("optimizer", "zzz", ["sgd"]))
