import subprocess
import sys

from valleys import cli, optim, schedules


def test_list_shows_every_optimizer_and_schedule(capsys):
    assert cli.main(["list"]) == 0
    out = capsys.readouterr().out
    for name in [*optim.names(), *schedules.names()]:
        assert name in out


def test_demo_runs_and_prints_a_table(capsys):
    assert cli.main(["demo", "--epochs", "2", "sgd", "vsgd"]) == 0
    out = capsys.readouterr().out
    lines = [line.split() for line in out.splitlines()]
    rows = {row[0]: row for row in lines if row and row[0] in ("sgd", "vsgd", "nesterov+knee")}
    assert set(rows) == {"sgd", "vsgd", "nesterov+knee"}
    for row in rows.values():
        accuracy = float(row[5].rstrip("%"))
        assert 50.0 < accuracy <= 100.0  # 2 epochs already separate the digits


def test_bad_input_is_one_line_without_traceback():
    proc = subprocess.run(
        [sys.executable, "-m", "valleys", "demo", "--epochs", "1", "entropy-sgd"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "valleys demo: error: Unknown optimizer: 'entropy-sgd' (did you mean 'entropy_sgd'? "
        "valid: " + ", ".join(optim.names()) + ")"
    ]
