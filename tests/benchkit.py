"""Synthetic run directories and sweep folders for the bench tests (no training)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def write_run(
    d: Path,
    evals: list[tuple[float, float, float]],
    *,
    metric: str = "test_accuracy",
    end: tuple[float, float] | None = None,
    reason: str = "max_seconds",
    run: dict[str, Any] | None = None,
    spe: int = 10,
    landscape: list[dict[str, Any]] | None = None,
) -> Path:
    """A run directory whose evaluations are ``(step, train_time_s, metric value)``; epochs
    are step / ``spe`` and each step makes two passes. ``end`` is ``(step, train_time_s)``
    (default: the last evaluation's); ``reason=None`` leaves the run unfinished."""
    d.mkdir(parents=True, exist_ok=True)
    lines = []
    for step, t, value in evals:
        counters = _counters(step, t, spe)
        lines.append({"kind": "train", **counters, "lr": 0.1, "loss": 1.0 / (1 + step)})
        lines.append({"kind": "eval", **counters, "lr": 0.1, metric: value, "test_loss": 1.0})
    if reason is not None:
        step, t = end if end is not None else evals[-1][:2]
        lines.append({"kind": "end", **_counters(step, t, spe), "reason": reason})
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    cfg = {"run": {"max_steps": None, "max_epochs": None, "max_seconds": None, **(run or {})}}
    (d / "config.yaml").write_text(json.dumps(cfg))  # JSON is YAML
    env = {
        "device": "cpu",
        "cpu": "x86_64",
        "threads": 1,
        "platform": "Linux",
        "versions": {"python": "3.11", "torch": "2.x", "valleys": "0.1.0"},
        "git": {"commit": "0123456789abcdef", "dirty": False},
    }
    (d / "env.json").write_text(json.dumps(env))
    if landscape:
        (d / "landscape.jsonl").write_text("".join(json.dumps(r) + "\n" for r in landscape))
    return d


def _counters(step: float, t: float, spe: int) -> dict[str, Any]:
    return {
        "step": step,
        "epoch": step / spe,
        "passes": 2 * step,
        "effective_epochs": 2 * step / spe,
        "train_time_s": t,
    }


def write_manifest(root: Path, runs: list[dict[str, Any]], report: dict | None = None) -> Path:
    """``sweep.json`` listing ``runs`` (id, task, optimizer, label, budget, seed; dir = id)."""
    entries = [
        {"task": "", "budget": "", "note": "", "params": {}, **r, "dir": r["id"]} for r in runs
    ]
    manifest = {
        "name": "synthetic",
        "description": "hand-written runs",
        "spec_file": "none.yaml",
        "full": False,
        "command": "test",
        "report": report or {},
        "runs": entries,
    }
    (root / "sweep.json").write_text(json.dumps(manifest))
    return root
