"""Helpers shared by the training tests: small, fast configurations on digits."""

from __future__ import annotations

import json
from pathlib import Path

from valleys.train import config as C

FAST = (
    "data.batch_size=32",
    "model.widths=[16]",
    "run.progress=false",
    "run.tensorboard=false",
    "run.threads=1",
)


def make_cfg(run_dir: Path | None, *overrides: str, model: str = "mlp") -> C.Config:
    """A digits configuration writing to ``run_dir``, with ``overrides`` applied last; the
    default model is a 64-16-10 MLP."""
    items = [f for f in FAST if model == "mlp" or not f.startswith("model.")]
    if run_dir is not None:
        items.append(f"run.dir={run_dir}")
    return C.load([], [*items, *overrides])


def records(run_dir: Path, kind: str | None = None, *, clock: bool = False) -> list[dict]:
    """metrics.jsonl records; without ``clock`` the clock-dependent ``*_s`` fields are dropped."""
    out = []
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if kind is None or r["kind"] == kind:
            out.append(r if clock else {k: v for k, v in r.items() if not k.endswith("_s")})
    return out
