"""`valleys report` on a synthetic sweep folder: numbers, files, HTML with embedded SVG."""

from __future__ import annotations

import json

import pytest

from benchkit import write_manifest, write_run
from valleys import cli
from valleys.bench import report


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    runs = []
    for task, shift in (("easy", 0.1), ("hard", 0.0)):
        for opt, speed in (("sgd", 1.0), ("fast", 2.0)):
            for seed in (0, 1, 2):
                rid = f"{task}/{opt}/seed{seed}"
                acc = [0.1, 0.4 + shift + 0.01 * seed, 0.6 + shift + 0.01 * seed]
                curve = [(10 * i, 4.0 * i / speed, a) for i, a in enumerate(acc)]
                sharp = [{"kind": "sharpness", "step": 20, "result": {"sharpness": 1.0 + seed}}]
                write_run(root / rid, curve, reason="max_steps", landscape=sharp)
                runs.append({"id": rid, "task": task, "optimizer": opt, "label": opt, "seed": seed})
    runs.append({"id": "easy/sgd/seed9", "task": "easy", "optimizer": "sgd", "label": "sgd"})
    return write_manifest(root, runs, {"times": [4.0], "epochs": [1.0], "targets": 0.45})


def test_report_numbers_and_files(sweep, tmp_path):
    out = report.build(sweep, tmp_path / "rep", formats=("svg",))
    easy = out.summary["groups"]["easy"]["configurations"]
    # sgd on "easy": after 4 s the second evaluation, 0.5 + 0.01·seed
    after = easy["sgd"]["after 4 s"]
    assert after["n"] == 3 and after["mean"] == pytest.approx(0.51)
    assert after["std"] == pytest.approx(0.01)
    assert easy["fast"]["after 4 s"]["mean"] == pytest.approx(0.71)  # twice as fast
    assert easy["sgd"]["time_to_target"]["mean"] == pytest.approx(4.0)
    assert easy["fast"]["time_to_target"]["mean"] == pytest.approx(2.0)
    assert easy["sgd"]["sharpness"]["mean"] == pytest.approx(2.0)
    hard = out.summary["groups"]["hard"]["configurations"]
    assert hard["sgd"]["time_to_target"]["mean"] == pytest.approx(8.0)  # 0.6 reached at 8 s
    profile = out.summary["profile"]["profile"]
    assert profile["fast"][0] == 1.0 and profile["sgd"][0] == 0.0
    md = out.markdown.read_text()
    assert "| sgd | 51.00 ± 1.00 [±2.48] (1 e) |" in md
    assert "1 not started" in md and "Machines and versions" in md
    page = out.html.read_text()
    assert page.count("<svg") == len(out.figures) and "<table>" in page
    names = {f.name for f in out.figures}
    expected = {"easy-curves-vs-seconds.svg", "easy-hist-sharpness.svg", "performance-profile.svg"}
    assert expected <= names
    assert json.loads((out.dir / "summary.json").read_text())["name"] == "synthetic"


def test_report_cli_and_its_errors(sweep, tmp_path, capsys):
    small = tmp_path / "small"
    write_run(small / "a", [(0, 0.0, 0.1), (10, 1.0, 0.5)], reason="max_steps")
    write_manifest(small, [{"id": "a", "optimizer": "sgd", "label": "sgd"}])
    assert cli.main(["report", str(small), "--out", str(tmp_path / "r"), "--times", "2"]) == 0
    assert "report.html" in capsys.readouterr().out
    assert (tmp_path / "r" / "report.md").is_file()
    assert cli.main(["report", str(tmp_path / "nowhere")]) == 2
    assert "no sweep.json" in capsys.readouterr().err
    with pytest.raises(ValueError, match="Unknown report option"):
        report.build(sweep, tmp_path / "x", time=[1])
