"""`valleys hessian` end to end on a tiny digits run (a 64-16-10 MLP, 1,210 weights): the
record appended to landscape.jsonl, the eigenvalue file, PNG + SVG plots, the checkpoint
untouched, one-line errors with exit 2."""

import json

import numpy as np
import pytest
from trainkit import make_cfg

from valleys import cli
from valleys.bench import analyze
from valleys.train import loop


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("hessian")
    loop.train(make_cfg(root / "a", "run.max_steps=30", "optim.lr=0.1"))
    return root / "a"


def test_all_four_analyses_agree_and_are_recorded(run, capsys):
    before = (run / "checkpoint.pt").read_bytes()
    argv = ["hessian", str(run), "--analysis", "top", "--analysis", "trace"]
    argv += ["--analysis", "density", "--analysis", "dense", "-k", "3", "--tol", "1e-4"]
    argv += ["--trace-samples", "30", "--density-probes", "2", "--lanczos-steps", "12"]
    argv += ["--samples", "200", "--batch-size", "100", "--seed", "1"]
    assert cli.main(argv) == 0
    out, err = capsys.readouterr()
    assert "top eigenvalues" in out and "landscape.jsonl" in out and "hvp" in err
    record = analyze.read_records(run, "hessian")[-1]
    assert record["args"]["analyses"] == ["top", "trace", "density", "dense"]
    assert record["args"]["top"] == {"k": 3, "tol": 1e-4}
    assert record["data"]["samples"] == 200 and record["data"]["eval_batch_size"] == 100
    r = record["result"]
    assert r["parameters"] == 1210
    dense = r["dense"]
    ev = np.load(run / dense["eigenvalues_file"])
    assert ev.shape == (1210,) and dense["dtype"] == "float64" and np.all(np.diff(ev) >= 0)
    assert dense["count"] == 1210 and sum(dense["histogram"]["counts"]) == 1210
    assert dense["batch_size"] == 512  # the 200 samples in one batch (same mean, fewer traces)
    top = r["top"]
    assert top["converged"] and top["eigenvalues"] == sorted(top["eigenvalues"], reverse=True)
    np.testing.assert_allclose(top["eigenvalues"], ev[::-1][:3], rtol=1e-3)
    trace = r["trace"]
    assert trace["ci_low"] <= dense["trace"] <= trace["ci_high"]
    assert r["density"]["num_probes"] == 2 and len(r["density"]["nodes"]) == 24
    assert sorted(p.rsplit(".", 1)[1] for p in record["plots"]) == ["png", "svg"]
    for rel in record["plots"]:
        assert (run / rel).stat().st_size > 0
    assert (run / "checkpoint.pt").read_bytes() == before


def test_default_analyses_without_plots(run):
    argv = ["hessian", str(run), "--samples", "100", "--trace-samples", "5"]
    argv += ["--density-probes", "1", "--lanczos-steps", "5", "--no-plots", "--no-progress"]
    assert cli.main(argv) == 0
    lines = (run / "landscape.jsonl").read_text().splitlines()
    record = json.loads(lines[-1])
    assert record["kind"] == "hessian" and "plots" not in record
    assert set(record["result"]) == {"parameters", "top", "trace", "density"}
    assert record["result"]["top"]["tol"] == 1e-6  # the library's default


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--analysis", "dense", "--trace-samples", "5"], "without the 'trace' analysis"),
        (["-k", "0"], "Invalid k"),
        (["--analysis", "dense", "--chunk-size", "0"], "Invalid chunk_size"),
        (["--analysis", "trace", "--trace-samples", "1"], "Invalid samples"),
        (["--samples", "0"], "Invalid samples"),
    ],
)
def test_bad_input_is_a_one_line_error(run, capsys, args, message):
    records = run / "landscape.jsonl"
    before = records.read_bytes() if records.exists() else None
    assert cli.main(["hessian", str(run), *args, "--no-progress", "--no-plots"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert (records.read_bytes() if records.exists() else None) == before


def test_missing_run_is_a_one_line_error(tmp_path, capsys):
    assert cli.main(["hessian", str(tmp_path / "nope"), "--no-progress"]) == 2
    assert "Not a run directory or checkpoint" in capsys.readouterr().err
