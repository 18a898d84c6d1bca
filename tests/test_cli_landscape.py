"""`valleys sharpness` and `valleys surface` end to end on tiny digits runs: records appended
to landscape.jsonl, PNG + SVG plots, checkpoints untouched, one-line errors with exit 2."""

import json
import subprocess
import sys

import pytest
from trainkit import make_cfg

from valleys import cli
from valleys.bench import analyze
from valleys.train import loop


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("landscape")
    loop.train(make_cfg(root / "a", "run.max_steps=8", "optim.lr=0.1"))
    loop.train(make_cfg(root / "b", "run.max_steps=16", "optim.lr=0.1"))
    loop.train(make_cfg(root / "narrow", "run.max_steps=2", "model.widths=[8]"))
    return root


def _records(run):
    return [json.loads(line) for line in (run / "landscape.jsonl").read_text().splitlines()]


def _plots_exist(run, record):
    assert sorted(p.rsplit(".", 1)[1] for p in record["plots"]) == ["png", "svg"]
    for rel in record["plots"]:
        assert (run / rel).is_file() and (run / rel).stat().st_size > 0


def test_sharpness_ascent_appends_a_record_and_plots(runs, tmp_path, capsys):
    run = tmp_path / "a"
    run.mkdir()
    (run / "checkpoint.pt").write_bytes((runs / "a" / "checkpoint.pt").read_bytes())
    before = (run / "checkpoint.pt").read_bytes()
    argv = ["sharpness", str(run), "--steps", "30", "--samples", "300", "--seed", "3"]
    assert cli.main([*argv, "--epsilon", "1e-3", "--lr", "0.01", "--momentum", "0.5"]) == 0
    out, err = capsys.readouterr()
    assert "sharpness" in out and "landscape.jsonl" in out and "step" in err  # progress bar
    assert cli.main([*argv, "--no-plots", "--no-progress"]) == 0
    first, second = _records(run)
    assert (first["kind"], first["index"], second["index"]) == ("sharpness", 1, 2)
    assert first["data"] == {
        "split": "train",
        "samples": 300,
        "of": 1437,
        "batch_size": 32,
        "eval_batch_size": 1024,
        "seed": 3,
    }
    assert first["args"] == {
        "method": "ascent",
        "epsilon": 1e-3,
        "lr": 0.01,
        "steps": 30,
        "momentum": 0.5,
    }
    r = first["result"]
    assert r["sharpness"] >= 0 and r["fmax"] >= r["final"] and r["steps"] == 30
    assert r["info"]["optimizer_kwargs"] == {"momentum": 0.5}
    assert len(r["history"]) == 31  # 300 samples: the full loss after every step
    assert first["step"] == 8 and first["checkpoint"].endswith("checkpoint.pt")
    _plots_exist(run, first)
    assert "plots" not in second and second["result"]["epsilon"] == 1e-4  # library default
    assert (run / "checkpoint.pt").read_bytes() == before


def test_sharpness_lbfgsb_on_the_test_split(runs, capsys):
    method = ["--method", "lbfgsb", "--max-iterations", "3"]
    data = ["--split", "test", "--batches", "2", "--batch-size", "50", "--no-progress"]
    assert cli.main(["sharpness", str(runs / "a"), *method, *data]) == 0
    record = analyze.read_records(runs / "a", "sharpness")[-1]
    assert record["data"]["split"] == "test" and record["data"]["samples"] == 100
    assert record["result"]["method"] == "lbfgsb" and record["result"]["steps"] <= 3
    _plots_exist(runs / "a", record)
    assert "lbfgsb" in capsys.readouterr().out


def test_surface_line_plane_and_interpolation(runs, capsys):
    run = runs / "b"
    common = ["--points", "5", "--samples", "200", "--no-progress"]
    assert cli.main(["surface", str(run), *common]) == 0
    plane = ["--dims", "2", "--range", "-0.5", "0.5", "--normalization", "layer"]
    assert cli.main(["surface", str(run), *plane, "--include-bias-bn", *common]) == 0
    assert cli.main(["surface", str(run), "--to", str(runs / "a"), *common]) == 0
    line, plane, interp = _records(run)[-3:]
    assert [r["mode"] for r in (line, plane, interp)] == ["line", "plane", "interpolation"]
    assert line["result"]["alphas"] == [-1.0, -0.5, 0.0, 0.5, 1.0]
    assert len(line["result"]["loss"]) == 5 and len(line["result"]["accuracy"]) == 5
    assert len(plane["result"]["loss"]) == 5 and len(plane["result"]["loss"][0]) == 5
    assert plane["result"]["betas"] == [-0.5, -0.25, 0.0, 0.25, 0.5]
    assert plane["args"]["normalization"] == "layer" and plane["args"]["ignore_bias_bn"] is False
    assert interp["result"]["alphas"] == [-0.5, 0.0, 0.5, 1.0, 1.5]
    # the centre of a line and the start of an interpolation are the run's own loss
    assert line["result"]["loss"][2] == pytest.approx(interp["result"]["loss"][1], rel=1e-6)
    assert plane["result"]["loss"][2][2] == pytest.approx(line["result"]["loss"][2], rel=1e-6)
    for record in (line, plane, interp):
        _plots_exist(run, record)
    assert "landscape-" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["sharpness", "{tmp}/missing"], "Not a run directory or checkpoint"),
        (["sharpness", "{tmp}"], "No checkpoint.pt"),
        (["sharpness", "{a}", "--method", "lbfgsb", "--steps", "5"], "Invalid steps"),
        (["sharpness", "{a}", "--max-iterations", "5"], "Invalid max_iterations"),
        (["sharpness", "{a}", "--epsilon", "-1", "--steps", "1"], "Invalid epsilon"),
        (["surface", "{a}", "--dims", "2", "--to", "{b}"], "one-dimensional"),
        (["surface", "{a}", "--range", "1", "-1"], "Invalid span"),
        (["surface", "{a}", "--points", "0"], "Invalid points"),
        (["surface", "{a}", "--to", "{narrow}", "--points", "2"], "Invalid end"),
        (["surface", "{a}", "--buffers", "end"], "Invalid buffers"),
        (["surface", "{a}", "--samples", "0"], "Invalid samples"),
    ],
)
def test_bad_input_is_a_one_line_error(runs, tmp_path, capsys, args, message):
    paths = {"tmp": tmp_path, "a": runs / "a", "b": runs / "b", "narrow": runs / "narrow"}
    argv = [a.format(**paths) for a in args] + ["--no-progress", "--no-plots"]
    records = runs / "a" / "landscape.jsonl"
    before = records.read_bytes() if records.exists() else None
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert (records.read_bytes() if records.exists() else None) == before


def test_bad_input_exits_2_without_a_traceback_in_a_subprocess(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "valleys", "surface", str(tmp_path / "nope")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
