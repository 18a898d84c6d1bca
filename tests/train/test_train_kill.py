"""Fault tolerance: ``valleys train`` killed with SIGKILL at random points (during start-up,
between steps, inside checkpoint writes) resumes every time with ``run.resume=true``, loses at
most one checkpoint interval per kill, and ends with the metrics and weights of an uninterrupted
run. A damaged or foreign checkpoint is refused in one line and left as it is.

The kills are driven from here: two chains of killed and resumed processes run side by side
(while this process trains the uninterrupted reference), each chain watching its run directory
(the last record of ``metrics.jsonl``, the temporary file of a checkpoint write) to decide when
to kill. The checkpoint writer's test hook (``VALLEYS_TEST_CHECKPOINT_PAUSE_S``, see
``valleys.train.checkpoint``) holds each write open between the temporary file and the rename so
that a kill can land inside it.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from trainkit import records

from valleys.train import checkpoint as ckpt
from valleys.train import config as C
from valleys.train import loop

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL (POSIX)")

STEPS = 150
EVERY = 5  # run.checkpoint_every_steps: the most a kill may cost
ARGS = [
    "data.batch_size=32",
    "model.widths=[16]",
    "optim.name=entropy_sgd",  # Langevin noise and a closure: RNG and multi-pass state resume
    "optim.langevin_steps=2",
    "optim.lr=0.5",
    f"run.max_steps={STEPS}",
    f"run.checkpoint_every_steps={EVERY}",
    "run.log_every_steps=1",  # the last record tells how far a killed process got
    "run.eval_every_steps=20",
    "run.threads=1",
    "run.tensorboard=false",
    "run.progress=false",
]
PAUSE_S = 0.3  # how long the hook holds a checkpoint write open
TIMEOUT_S = 60.0

# Each chain: the kinds of its kills, in order, then a last segment that runs to the end.
# "early": after a random delay from the start (imports, data, the first writes);
# "step": once the run has logged a random step of the next few intervals;
# "write": inside the first checkpoint write at or after such a step.
CHAINS = {
    "a": ["early", "step", "early", "step", "step"],
    "b": ["write", "early", "write", "step", "write"],
}


def _start(run_dir: Path, *extra: str, pause: bool = False) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the processes share the machine
    env.pop(ckpt.PAUSE_ENV, None)
    if pause:
        env[ckpt.PAUSE_ENV] = str(PAUSE_S)
    return subprocess.Popen(
        [sys.executable, "-m", "valleys", "train", *ARGS, f"run.dir={run_dir}", *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )


def _last_step(run_dir: Path) -> int | None:
    """The step of the last complete record of ``metrics.jsonl`` (None before the first)."""
    try:
        with open(run_dir / "metrics.jsonl", "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 4096))
            tail = f.read()
    except OSError:
        return None
    lines = tail.split(b"\n")[:-1]  # what follows the last newline is a record being written
    for line in reversed(lines):
        try:
            return int(json.loads(line)["step"])
        except (ValueError, KeyError):
            continue
    return None


def _checkpoint_step(run_dir: Path) -> int | None:
    path = run_dir / "checkpoint.pt"
    return int(ckpt.load(path)["step"]) if path.exists() else None


def _wait(proc: subprocess.Popen, ready, deadline: float) -> bool:
    """Poll until ``ready()`` (True) or the process ends (False)."""
    while proc.poll() is None:
        if ready():
            return True
        if time.monotonic() > deadline:
            raise AssertionError("the run neither reached its kill point nor ended")
        time.sleep(0.002)
    return False


def _kill_point(kind: str, run_dir: Path, target: int, delay: float):
    """When to kill: a predicate polled while the process runs."""
    started = time.monotonic()

    def ready() -> bool:
        if kind == "early":
            return time.monotonic() - started > delay
        if (_last_step(run_dir) or 0) < target:
            return False
        return kind == "step" or any(run_dir.glob(".checkpoint.pt.*.tmp"))

    return ready


def _kill_chain(run_dir: Path, kinds: list[str], rng: random.Random, log: list[dict]) -> None:
    resume: tuple[str, ...] = ()
    for kind in kinds:
        # records after the checkpoint stay until the next process cuts them off: the target
        # lies beyond them, so that only the new process can reach it
        start = max(_checkpoint_step(run_dir) or 0, _last_step(run_dir) or 0)
        target, delay = start + rng.randint(1, 2 * EVERY), rng.uniform(0.2, 2.0)
        proc = _start(run_dir, *resume, pause=kind == "write")
        try:
            ready = _kill_point(kind, run_dir, target, delay)
            landed = _wait(proc, ready, time.monotonic() + TIMEOUT_S)
            if landed:
                proc.send_signal(signal.SIGKILL)
            _, err = proc.communicate(timeout=TIMEOUT_S)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert landed, f"the run ended before its {kind} kill: {err.decode()[-2000:]}"
        assert proc.returncode == -signal.SIGKILL
        # what the killed process had reached, and what the next one resumes from
        reached = _last_step(run_dir)
        in_write = any(run_dir.glob(".checkpoint.pt.*.tmp"))
        saved = _checkpoint_step(run_dir)  # loads the whole file: never torn
        if kind == "write":
            assert in_write, "the kill missed the checkpoint write"
            assert saved is not None
        if reached is not None:
            assert saved is not None and saved <= reached
            assert reached - saved <= EVERY, (kind, reached, saved)
        log.append({"kind": kind, "reached": reached, "checkpoint": saved})
        resume = ("run.resume=true",)
    proc = _start(run_dir, *resume)
    out, err = proc.communicate(timeout=TIMEOUT_S)
    assert proc.returncode == 0, err.decode()[-2000:]
    assert b"max_steps reached" in out


def _strip(rs: list[dict]) -> list[dict]:
    """Records without clock-dependent fields (``*_s``, which covers ``samples_per_s``)."""
    return [{k: v for k, v in r.items() if not k.endswith("_s")} for r in rs]


def test_killed_runs_resume_to_the_uninterrupted_result(tmp_path):
    whole = tmp_path / "whole"
    logs: dict[str, list[dict]] = {name: [] for name in CHAINS}
    errors: list[BaseException] = []

    def run_chain(name: str) -> None:
        try:
            _kill_chain(tmp_path / name, CHAINS[name], random.Random(f"kill-{name}"), logs[name])
        except BaseException as err:  # reported by the main thread
            errors.append(err)

    threads = [threading.Thread(target=run_chain, args=(name,)) for name in CHAINS]
    for t in threads:
        t.start()
    try:  # the uninterrupted reference: in this process, while the chains run
        loop.train(C.load([], [*ARGS, f"run.dir={whole}"]))
    finally:
        for t in threads:
            t.join()
    if errors:
        raise errors[0]

    assert sum(len(log) for log in logs.values()) >= 10
    assert sum(e["kind"] == "write" for e in logs["b"]) == 3
    expected = records(whole)
    assert expected[-1]["kind"] == "end" and expected[-1]["step"] == STEPS
    final = ckpt.load(whole / "checkpoint.pt")["model"]
    for name in CHAINS:
        run_dir = tmp_path / name
        assert _strip(records(run_dir, clock=True)) == _strip(expected), name
        weights = ckpt.load(run_dir / "checkpoint.pt")["model"]
        assert weights.keys() == final.keys()
        for key in final:
            assert torch.equal(weights[key], final[key]), (name, key)
        assert not list(run_dir.glob(".*.tmp"))  # the killed writes' temporaries were removed


def _digests(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _foreign_tensors(path: Path) -> None:
    torch.save({"weights": torch.randn(3, 4), "step": 7}, path)


def _text(path: Path) -> None:
    path.write_text("not a checkpoint\n")


def test_a_damaged_or_foreign_checkpoint_is_refused_and_kept(tmp_path):
    damage = {"truncated": _truncate, "foreign": _foreign_tensors, "text": _text}
    procs = {}
    for name, spoil in damage.items():
        run_dir = tmp_path / name
        loop.train(C.load([], [*ARGS, f"run.dir={run_dir}", "run.max_steps=4"]))
        spoil(run_dir / "checkpoint.pt")
        procs[name] = (run_dir, _digests(run_dir), _start(run_dir, "run.resume=true"))
    for name, (run_dir, before, proc) in procs.items():
        _, err = proc.communicate(timeout=TIMEOUT_S)
        lines = err.decode().strip().splitlines()
        assert proc.returncode == 2, (name, lines)
        assert len(lines) == 1 and "Traceback" not in err.decode(), lines
        assert lines[0].startswith(f"valleys train: error: Unreadable checkpoint {run_dir}"), lines
        assert "restore it from a copy, or start again in a new run.dir" in lines[0]
        assert _digests(run_dir) == before, name  # nothing written, nothing lost


def test_a_kill_inside_the_first_checkpoint_write_leaves_a_fresh_start(tmp_path):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    args = [*ARGS, "run.max_steps=12"]
    loop.train(C.load([], [*args, f"run.dir={whole}"]))
    killed.mkdir()  # what the kill left: the directory and a torn temporary file
    (killed / ".checkpoint.pt.k1ll3d.tmp").write_bytes(b"half a checkpoint")
    loop.train(C.load([], [*args, f"run.dir={killed}", "run.resume=true"]))
    assert records(killed) == records(whole)
    assert not list(killed.glob(".*.tmp"))


def test_a_kill_before_the_closing_records_is_finished_on_resume(tmp_path):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    args = [*ARGS, "run.max_steps=12"]
    loop.train(C.load([], [*args, f"run.dir={whole}"]))
    loop.train(C.load([], [*args, f"run.dir={killed}"]))
    # the final checkpoint was written, then the process died inside its closing records
    offset = ckpt.load(killed / "checkpoint.pt")["metrics_offset"]
    path = killed / "metrics.jsonl"
    path.write_bytes(path.read_bytes()[: offset + 25])
    result = loop.train(C.load([], [*args, f"run.dir={killed}", "run.resume=true"]))
    assert result.step == 12 and result.reason == "max_steps"
    assert records(killed) == records(whole)
