"""Every suite shipped in configs/sweeps/ expands, at both scales, into runs whose
configurations validate (nothing is trained and no data is loaded)."""

from __future__ import annotations

from pathlib import Path

import pytest

from valleys.bench import report, sweep, sweep_exec

SUITES = Path(__file__).resolve().parents[2] / "configs" / "sweeps"
EXPECTED = {
    "sgn_fashion",
    "sgn_regression",
    "sgn_mlp",
    "entropy_sgd_lenet",
    "vsgd",
    "knee",
    "sam",
}


def test_the_suites_are_shipped():
    assert {p.stem for p in SUITES.glob("*.yaml")} >= EXPECTED


@pytest.mark.parametrize("full", [False, True], ids=["cpu", "full"])
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_suite_expands_and_validates(name, full):
    spec = sweep.load_spec(SUITES / f"{name}.yaml", full=full)
    assert spec.name == name and spec.description
    jobs = sweep.expand(spec, check_data=False)
    ids = [j.id for j in jobs]
    assert len(ids) == len(set(ids))
    assert len(spec.seeds) >= 2  # a spread over seeds at either scale
    configurations = {(j.task, j.budget, j.label) for j in jobs}
    assert len(jobs) == len(configurations) * len(spec.seeds)
    for name_, _ in spec.analyses:
        assert name_ in sweep_exec.ANALYSES
    assert set(spec.report) <= set(report.OPTIONS)
    if not full:
        # each run sets a budget; the CPU scale keeps runs short
        for j in jobs:
            r = j.config["run"]
            assert r["max_seconds"] or r["max_epochs"] or r["max_steps"]
            assert r["max_seconds"] is None or r["max_seconds"] <= 60


def test_sam_is_the_flat_minima_baseline_of_entropy_sgd_and_knee():
    for name in ("entropy_sgd_lenet", "knee"):
        spec = sweep.load_spec(SUITES / f"{name}.yaml")
        assert any(o.get("optim", {}).get("name") == "sam" for o, _ in spec.optimizers.values())
