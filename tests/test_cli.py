import json
import subprocess
import sys

import pytest

from valleys import cli, data, models, optim, schedules

FAST = [
    "data.batch_size=32",
    "model.widths=[16]",
    "run.threads=1",
    "run.tensorboard=false",
]


def _valleys(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "valleys", *args],
        capture_output=True,
        text=True,
        check=False,
        cwd=cwd,
    )


def test_list_shows_optimizers_models_datasets_and_schedules(capsys):
    assert cli.main(["list"]) == 0
    out = capsys.readouterr().out
    for heading in ("optimizers:", "models:", "datasets:", "schedules:"):
        assert heading in out
    for name in [*optim.names(), *models.names(), *data.names(), *schedules.names()]:
        assert name in out


def test_demo_runs_and_prints_a_table(capsys, tmp_path):
    out_dir = tmp_path / "demo"
    assert cli.main(["demo", "--epochs", "2", "--out", str(out_dir), "sgd", "vsgd"]) == 0
    out = capsys.readouterr().out
    lines = [line.split() for line in out.splitlines()]
    rows = {row[0]: row for row in lines if row and row[0] in ("sgd", "vsgd")}
    assert set(rows) == {"sgd", "vsgd"}
    for row in rows.values():
        accuracy = float(row[5].rstrip("%"))
        assert 50.0 < accuracy <= 100.0  # 2 epochs already separate the digits
    assert (out_dir / "sgd" / "metrics.jsonl").is_file()
    assert (out_dir / "plots" / "curves_vs_passes.svg").is_file()
    assert str(out_dir) in out


def test_train_end_to_end(tmp_path):
    run = tmp_path / "run"
    proc = _valleys(
        "train",
        "optim.name=entropy_sgd",
        "optim.langevin_steps=2",
        "run.max_steps=12",
        "run.eval_every_steps=6",
        f"run.dir={run}",
        "run.tensorboard=true",
        *FAST[:3],
    )
    assert proc.returncode == 0, proc.stderr
    assert "max_steps reached" in proc.stdout
    assert "test accuracy" in proc.stdout and "effective epochs" in proc.stdout
    for name in ("config.yaml", "env.json", "metrics.jsonl", "checkpoint.pt", "tb"):
        assert (run / name).exists(), name
    end = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert (end["kind"], end["step"], end["passes"]) == ("end", 12, 24)
    assert "step" in proc.stderr  # the progress bar

    assert cli.main(["plot", str(run)]) == 0
    for axis in ("steps", "epochs", "passes", "seconds"):
        for fmt in ("png", "svg"):
            assert (run / f"curves_vs_{axis}.{fmt}").is_file()


def test_train_from_a_yaml_file_with_dry_run(tmp_path, capsys):
    path = tmp_path / "exp.yaml"
    path.write_text("optim: {name: adam, lr: 0.01}\nrun: {max_steps: 3}\n")
    assert cli.main(["train", "--config", str(path), "--dry-run", "run.seed=5"]) == 0
    out = capsys.readouterr().out
    assert "name: adam" in out and "seed: 5" in out and "max_steps: 3" in out


def test_plot_of_several_runs_needs_out(tmp_path, capsys):
    runs = []
    for name in ("a", "b"):
        assert (
            cli.main(
                [
                    "train",
                    f"run.dir={tmp_path / name}",
                    "run.max_steps=3",
                    "run.progress=false",
                    *FAST,
                ]
            )
            == 0
        )
        runs.append(str(tmp_path / name))
    capsys.readouterr()
    assert cli.main(["plot", *runs]) == 2
    assert "pass an output folder" in capsys.readouterr().err
    assert cli.main(["plot", *runs, "--out", str(tmp_path / "cmp")]) == 0
    assert (tmp_path / "cmp" / "curves_vs_steps.png").is_file()


def _one_line_error(capsys, args, status=2):
    assert cli.main(args) == status
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_a_diverging_run_exits_1_with_one_line(tmp_path, capsys):
    args = ["train", f"run.dir={tmp_path}", "run.max_steps=50", "optim.lr=1e30", *FAST]
    line = _one_line_error(capsys, [*args, "run.progress=false"], status=1)
    assert line.startswith("valleys train: Training diverged")


BAD_INPUT = [
    (["demo", "--epochs", "1", "entropy-sgd"], "Unknown variant"),
    (
        ["train", "run.max_steps=3", "optim.name=entropy-sgd"],
        "Unknown optimizer: 'entropy-sgd' (did you mean 'entropy_sgd'?",
    ),
    (["train", "run.max_steps=3", "optim.lrr=1"], "did you mean 'lr'?"),
    (["train", "run.max_steps=3", "run.max_step=3"], "did you mean 'max_steps'?"),
    (["train", "run.max_steps=3", "run.seed"], "Malformed override: 'run.seed'"),
    (["train", "run.max_steps=three"], "Invalid run.max_steps: 'three'"),
    (["train", "--config", "missing.yaml"], "Config file not found: missing.yaml"),
    (["train", "--config", "bad.yaml"], "Malformed YAML in bad.yaml at line"),
    (["train", "run.max_steps=3", "data.name=mnist", "data.root=nowhere"], "MNIST not found"),
    (["train", "run.max_steps=3", "run.device=cuda:7"], "Invalid run.device"),
    (["plot", "nowhere"], "Not a run directory"),
]


@pytest.mark.parametrize(("args", "expected"), BAD_INPUT)
def test_bad_input_is_one_line(tmp_path, monkeypatch, capsys, args, expected):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad.yaml").write_text("optim:\n  lr: [1,\n")
    line = _one_line_error(capsys, args)
    assert line.startswith(f"valleys {args[0]}: error: ")
    assert expected in line
    assert list(tmp_path.iterdir()) == [tmp_path / "bad.yaml"]  # nothing was written


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["train", "run.max_steps=3", "optim.lrr=1"], "did you mean 'lr'?"),
        (["train", "--config", "bad.yaml"], "Malformed YAML in bad.yaml at line"),
        (["train", "--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_bad_input_exits_2_without_traceback(tmp_path, args, expected):
    (tmp_path / "bad.yaml").write_text("optim:\n  lr: [1,\n")
    proc = _valleys(*args, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert expected in lines[0]


def test_a_run_directory_is_not_overwritten_by_the_cli(tmp_path, capsys):
    args = ["train", f"run.dir={tmp_path}", "run.max_steps=3", "run.progress=false", *FAST]
    assert cli.main(args) == 0
    before = (tmp_path / "metrics.jsonl").read_bytes()
    capsys.readouterr()
    assert "already holds a run (finished)" in _one_line_error(capsys, args)
    assert (tmp_path / "metrics.jsonl").read_bytes() == before
