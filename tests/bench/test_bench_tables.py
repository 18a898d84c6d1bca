"""Aggregation of run records against hand computations on synthetic metrics files."""

from __future__ import annotations

import math

import pytest

from benchkit import write_run
from valleys.bench import tables as T

# evaluations at (step, seconds, accuracy); 10 steps per epoch, 2 passes per step
CURVE = [(0, 0.0, 0.1), (10, 4.0, 0.5), (20, 8.0, 0.7), (30, 12.0, 0.8), (40, 16.0, 0.75)]


def test_value_at_reads_the_last_evaluation_at_or_before_the_budget(tmp_path):
    run = T.load_run(write_run(tmp_path / "r", CURVE, reason="max_steps", run={"max_steps": 40}))
    assert T.value_at(run, "test_accuracy", "seconds", 9.0) == (0.7, 8.0)
    assert T.value_at(run, "test_accuracy", "seconds", 8.0) == (0.7, 8.0)
    assert T.value_at(run, "test_accuracy", "epochs", 2.5) == (0.7, 2.0)
    assert T.value_at(run, "test_accuracy", "effective_epochs", 6.0) == (0.8, 6.0)
    assert T.value_at(run, "test_accuracy", "steps", 40) == (0.75, 40.0)
    assert T.value_at(run, "test_accuracy", "seconds", 16.5) is None  # the run stopped at 16 s
    assert T.value_at(run, "epoch", "seconds", 13.0) == (3.0, 12.0)  # epochs reached by then


def test_an_evaluation_within_one_step_after_the_budget_counts(tmp_path):
    # the step that crossed 16 s ended at 16.3 s; one step is 16.3 / 40 = 0.4075 s
    curve = [*CURVE[:-1], (40, 16.3, 0.75)]
    run = T.load_run(write_run(tmp_path / "r", curve, run={"max_seconds": 16.0}))
    assert T.one_step(run, "seconds") == pytest.approx(0.4075)
    assert T.value_at(run, "test_accuracy", "seconds", 16.0) == (0.75, 16.3)
    assert T.value_at(run, "test_accuracy", "seconds", 15.9) == (0.75, 16.3)
    assert T.value_at(run, "test_accuracy", "seconds", 15.8) == (0.8, 12.0)
    # an evaluation due every 0.5 epochs lands on the first step past the boundary
    spe = 1875
    late = [(0, 0.0, 0.1), (938, 30.0, 0.7), (1875, 60.0, 0.8)]
    run = T.load_run(write_run(tmp_path / "e", late, reason="max_epochs", spe=spe))
    assert T.value_at(run, "test_accuracy", "epochs", 0.5) == (0.7, 938 / spe)


def test_diverged_and_unfinished_runs(tmp_path):
    run = T.load_run(write_run(tmp_path / "d", CURVE[:3], end=(25, 10.0), reason="non-finite loss"))
    assert run.diverged
    assert T.value_at(run, "test_accuracy", "seconds", 9.0) == (0.7, 8.0)
    value, at = T.value_at(run, "test_accuracy", "seconds", 10.0)
    assert math.isnan(value) and at == 10.0
    assert math.isnan(T.final(run, "test_accuracy"))
    unfinished = T.load_run(write_run(tmp_path / "u", CURVE, reason=None))
    assert not unfinished.complete
    assert T.value_at(unfinished, "test_accuracy", "seconds", 4.0) is None


def test_best_final_and_time_to_target(tmp_path):
    run = T.load_run(write_run(tmp_path / "r", CURVE, reason="max_steps"))
    assert T.best(run, "test_accuracy") == 0.8
    assert T.final(run, "test_accuracy") == 0.75
    assert T.time_to_target(run, "test_accuracy", 0.7) == 8.0
    assert T.time_to_target(run, "test_accuracy", 0.7, "epochs") == 2.0
    assert T.time_to_target(run, "test_accuracy", 0.9) is None
    mse = T.load_run(
        write_run(tmp_path / "m", [(0, 0.0, 1.0), (5, 1.0, 0.2), (9, 2.0, 0.3)], metric="test_mse")
    )
    assert mse.task_kind == "regression"
    assert T.best(mse, "test_mse") == 0.2
    assert T.time_to_target(mse, "test_mse", 0.25) == 1.0


def test_landscape_records_of_the_final_model(tmp_path):
    records = [
        {"kind": "sharpness", "step": 10, "result": {"sharpness": 9.0}},
        {"kind": "sharpness", "step": 40, "result": {"sharpness": 2.5}},
        {"kind": "hessian", "step": 40, "result": {"top": {"eigenvalues": [3.0, 7.5, 1.0]}}},
    ]
    run = T.load_run(write_run(tmp_path / "r", CURVE, reason="max_steps", landscape=records))
    assert T.sharpness(run) == 2.5
    assert T.top_eigenvalue(run) == 7.5


def test_stat_mean_std_and_t_interval_by_hand():
    s = T.stat([0.80, 0.84, 0.86, None, math.nan])
    mean = (0.80 + 0.84 + 0.86) / 3
    std = math.sqrt(((0.80 - mean) ** 2 + (0.84 - mean) ** 2 + (0.86 - mean) ** 2) / 2)
    assert (s.n, s.missing, s.diverged) == (3, 1, 1)
    assert s.mean == pytest.approx(mean)
    assert s.std == pytest.approx(std)
    assert s.ci95 == pytest.approx(4.302652729911275 * std / math.sqrt(3))  # t(0.975, 2)
    assert T.t_quantile(1) == pytest.approx(12.706204736174698)
    assert T.t_quantile(30) == pytest.approx(2.042272456301238)
    one = T.stat([0.5])
    assert (one.n, one.mean, one.std) == (1, 0.5, 0.0) and math.isnan(one.ci95)
    assert T.stat([]).n == 0


def test_performance_profile_on_a_hand_example():
    costs = {
        "a": {"t1": 1.0, "t2": 4.0, "t3": None},
        "b": {"t1": 2.0, "t2": 2.0, "t3": 5.0},
        "c": {"t1": 3.0, "t2": math.inf, "t3": 10.0},
    }
    # best per task: t1 1 (a), t2 2 (b), t3 5 (b); ratios a: 1, 2, inf; b: 2, 1, 1; c: 3, inf, 2
    prof = T.performance_profile(costs, [1.0, 1.5, 2.0, 3.0, 100.0])
    assert prof["a"] == pytest.approx([1 / 3, 1 / 3, 2 / 3, 2 / 3, 2 / 3])
    assert prof["b"] == pytest.approx([2 / 3, 2 / 3, 1.0, 1.0, 1.0])
    assert prof["c"] == pytest.approx([0.0, 0.0, 1 / 3, 2 / 3, 2 / 3])
