"""Sweeps: expansion of a spec into runs, parallel runs on digits, skipping complete runs,
resuming interrupted ones, analyses, the CLI."""

from __future__ import annotations

import math
import sys

import pytest
import yaml
from trainkit import records

from valleys import cli
from valleys.bench import sweep as S
from valleys.bench import sweep_exec
from valleys.train import config as C
from valleys.train import loop

TINY = {
    "config": {
        "data": {"name": "digits", "batch_size": 32},
        "model": {"name": "mlp", "widths": [16]},
        "optim": {"name": "entropy_sgd", "langevin_steps": 2},
        "run": {
            "max_steps": 6,
            "eval_every_steps": 3,
            "log_every_steps": 3,
            "tensorboard": False,
        },
    },
    "optimizers": {
        "sgd": {"optim": {"name": "sgd", "momentum": 0.5}, "grid": {"optim.lr": [0.1]}},
        "sam": {"optim": {"name": "sam", "lr": 0.1, "rho": 0.05}},
    },
    "seeds": [0, 1],
}


def _spec(tmp_path, name="tiny", **changes):
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({**TINY, **changes}, sort_keys=False))
    return path


def test_expansion_names_order_and_configurations(tmp_path):
    spec = S.load_spec(
        _spec(
            tmp_path,
            optimizers={
                "sgd": {
                    "optim": {"name": "sgd"},
                    "grid": {"optim.lr": [0.1, 0.5], "run.seed": [7]},
                },
                "es": {"grid": [{"optim.langevin_steps": 3}, {"optim.langevin_steps": 5}]},
            },
            budgets={"short": {"run": {"max_steps": 4}}, "long": {}},
            full={"seeds": [0, 1, 2], "optimizers": {"sgd": {"grid": {"optim.lr": [1.0]}}}},
        )
    )
    jobs = S.expand(spec, tmp_path / "out")
    assert len(jobs) == 2 * (2 + 2) * 2  # seeds x (grid points) x budgets
    assert [j.id for j in jobs[:4]] == [
        "short/sgd-lr=0.1-seed=7/seed0",
        "short/sgd-lr=0.5-seed=7/seed0",
        "long/sgd-lr=0.1-seed=7/seed0",
        "long/sgd-lr=0.5-seed=7/seed0",
    ]
    assert all(j.seed == 0 for j in jobs[:8]) and all(j.seed == 1 for j in jobs[8:])
    first = jobs[0].config
    assert first["optim"] == {"name": "sgd", "lr": 0.1}  # entropy_sgd's keys dropped
    assert first["run"]["seed"] == 0  # the repetition's seed wins over the grid
    assert (first["run"]["max_steps"], jobs[2].config["run"]["max_steps"]) == (4, 6)
    assert first["run"]["threads"] == 1 and first["run"]["progress"] is False
    assert first["run"]["dir"] == str((tmp_path / "out" / jobs[0].id).resolve())
    wrapped = S._overlay(first, {"optim": {"name": "sam", "base": "sgd"}}, "test")
    assert wrapped["optim"] == {"name": "sam", "base": "sgd", "lr": 0.1}  # kept for the base
    es = [j for j in jobs if j.optimizer == "es"]
    assert es[0].label == "es-langevin_steps=3" and es[0].config["optim"]["name"] == "entropy_sgd"
    full = S.expand(S.load_spec(spec.path, full=True), overrides=["run.device=cpu"])
    assert len(full) == 3 * (1 + 2) * 2 and full[0].dir.parts[:3] == ("runs", "sweeps", "tiny-full")
    assert {j.config["optim"].get("lr") for j in full if j.optimizer == "sgd"} == {1.0}
    assert full[0].config["run"]["device"] == "cpu"


def test_data_fallbacks_and_errors(tmp_path):
    missing = {"data": {"name": "mnist", "root": str(tmp_path / "no-data"), "flatten": True}}
    path = _spec(tmp_path, tasks={"m": missing}, fallbacks=[{"data": {"name": "digits"}}])
    jobs = S.expand(S.load_spec(path), tmp_path / "out")
    assert jobs[0].config["data"]["name"] == "digits" and "flatten" not in jobs[0].config["data"]
    assert "instead of 'mnist'" in jobs[0].note
    with pytest.raises(ValueError, match=r"Unknown key of sweep file .*did you mean 'seeds'"):
        S.load_spec(_spec(tmp_path, "a", seed=[1]))
    with pytest.raises(ValueError, match="expected a non-empty list"):
        S.load_spec(_spec(tmp_path, "b", optimizers={"sgd": {"grid": {"optim.lr": 0.1}}}))
    bad = _spec(tmp_path, "c", optimizers={"sgd": {"optim": {"name": "sgd", "lrr": 1}}})
    with pytest.raises(ValueError, match=r"run sgd/seed0: Unknown hyperparameter.*'lr'"):
        S.expand(S.load_spec(bad))


def test_a_sweep_runs_in_parallel_skips_complete_runs_and_resumes_interrupted_ones(tmp_path):
    path, out = _spec(tmp_path), tmp_path / "out"
    said = []
    result = sweep_exec.run(path, out=out, workers=2, progress=False, echo=said.append)
    assert sorted(r["status"] for r in result.results) == ["done"] * 4
    assert (out / "sweep.json").is_file() and "4 to run" in said[0]
    runs = {j.id: j for j in result.jobs}
    assert set(runs) == {"sgd-lr=0.1/seed0", "sam/seed0", "sgd-lr=0.1/seed1", "sam/seed1"}
    assert records(out / "sam/seed0", "end")[0]["passes"] == 12  # two passes per SAM step
    before = {k: (out / k / "metrics.jsonl").read_bytes() for k in runs}

    again = sweep_exec.run(path, out=out, workers=2, progress=False, echo=said.append)
    assert [r["status"] for r in again.results] == ["skipped"] * 4
    assert all((out / k / "metrics.jsonl").read_bytes() == v for k, v in before.items())

    # interrupt one run: train it for 3 of its 6 steps, then drop its closing record, as
    # when the process is killed after the checkpoint of step 3
    job = runs["sgd-lr=0.1/seed0"]
    uninterrupted = records(job.dir)
    for f in job.dir.iterdir():
        f.unlink()
    cfg = C.from_dict(job.config)
    cfg.run.max_steps = 3
    loop.train(cfg)
    lines = (job.dir / "metrics.jsonl").read_text().splitlines(keepends=True)
    (job.dir / "metrics.jsonl").write_text("".join(lines[:-1]))
    assert sweep_exec.run_state(job) == ("resume", "interrupted")
    third = sweep_exec.run(path, out=out, workers=1, progress=False, echo=said.append)
    assert sorted(r["status"] for r in third.results) == ["done", "skipped", "skipped", "skipped"]
    assert records(job.dir) == uninterrupted  # bit-identical continuation on the CPU

    listed = []
    sweep_exec.run(path, out=out, dry_run=True, echo=listed.append)
    assert all(line.split()[0] == "complete" for line in listed)


def test_analyses_report_and_cli(tmp_path, capsys):
    path = _spec(
        tmp_path,
        optimizers={"sgd": {"optim": {"name": "sgd"}}},
        seeds=[0],
        analyses=[{"name": "sharpness", "steps": 3, "samples": 64}, "hessian_top", "bogus"],
    )
    out = tmp_path / "out"
    argv = ["sweep", str(path), "--out", str(out), "--workers", "1", "--no-progress"]
    assert cli.main([*argv, "--report"]) == 0
    text = capsys.readouterr().out
    assert "analysis 'bogus' skipped: unknown analysis" in text
    assert "1 done" in text and (out / "report" / "report.html").is_file()
    from valleys.bench.analyze import read_records

    kinds = [r["kind"] for r in read_records(out / "sgd" / "seed0")]
    assert sorted(kinds) == ["hessian", "sharpness"]
    (top,) = read_records(out / "sgd" / "seed0", "hessian")
    values = top["result"]["top"]["eigenvalues"]
    assert values and all(math.isfinite(v) for v in values)
    report = (out / "report" / "report.md").read_text()
    assert "λ_max" in report
    assert cli.main(argv) == 0
    assert "1 skipped" in capsys.readouterr().out  # analyses already recorded are not repeated
    assert cli.main([*argv[:2], "optim.lr=0.5", *argv[2:]]) == 2
    assert "holds a run of another configuration (optim.lr" in capsys.readouterr().err


def test_ray_is_optional_and_its_absence_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)
    path = _spec(tmp_path, seeds=[0])
    assert cli.main(["sweep", str(path), "--out", str(tmp_path / "o"), "--ray", "auto"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--ray needs Ray" in err
