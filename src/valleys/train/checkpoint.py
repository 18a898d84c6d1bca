"""Atomic checkpoint files and the RNG states a bit-identical resume needs.

:func:`save` writes to a temporary file in the same folder, flushes and ``fsync``s it, then
renames it over the target (``os.replace`` is atomic on POSIX and Windows) and ``fsync``s the
folder. A crash at any point leaves either the previous checkpoint or the new one, never a torn
file; a failed write removes its temporary file.

Checkpoints hold plain data and tensors only, so :func:`load` reads them with
``torch.load(weights_only=True)``: loading one never runs code from the file.

Test hook: with the environment variable ``VALLEYS_TEST_CHECKPOINT_PAUSE_S`` set, :func:`save`
sleeps that many seconds between writing the temporary file and renaming it, so that a test can
kill the process inside a checkpoint write. Nothing else reads it.
"""

from __future__ import annotations

import os
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["get_rng_state", "load", "save", "set_rng_state", "stale_temporaries", "write_atomic"]

FORMAT = 1

# The test hook of the module docstring.
PAUSE_ENV = "VALLEYS_TEST_CHECKPOINT_PAUSE_S"


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # Windows cannot open folders; the rename is durable enough there
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(path: str | Path, write: Any) -> None:
    """Create or replace ``path`` atomically; ``write(file)`` writes the content to a binary
    file object."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def stale_temporaries(folder: str | Path) -> list[Path]:
    """Temporary files that :func:`write_atomic` left in ``folder`` when its process was killed
    before the rename (``.<name>.<random>.tmp``); nothing reads them."""
    return sorted(p for p in Path(folder).glob(".*.tmp") if p.is_file())


def save(path: str | Path, state: dict[str, Any]) -> None:
    """Write ``state`` (plain data and tensors) to ``path`` atomically."""

    def write(f: Any) -> None:
        torch.save({"format": FORMAT, **state}, f)
        pause = os.environ.get(PAUSE_ENV)
        if pause:  # the test hook (see the module docstring)
            f.flush()
            time.sleep(float(pause))

    write_atomic(path, write)


def load(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save` (tensors on the CPU)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint not found: {path}")
    fix = "it was left as it is: restore it from a copy, or start again in a new run.dir"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a foreign or damaged file: say which, in one line
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(
            f"Unreadable checkpoint {path}: {first.rstrip('.')} (the file is truncated, damaged "
            f"or not a checkpoint; {fix})"
        ) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(
            f"Unreadable checkpoint {path}: not a valleys checkpoint (format {FORMAT}; {fix})"
        )
    return state


def get_rng_state() -> dict[str, Any]:
    """The global generators: torch (CPU and every initialised CUDA device), Python's
    ``random`` and NumPy's legacy global generator, as checkpointable data."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`get_rng_state` returned."""
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
