"""What a run writes besides checkpoints: ``metrics.jsonl``, ``env.json``, TensorBoard scalars
and the progress bar.

``metrics.jsonl`` holds one JSON object per line, each with ``kind``:

* ``"train"``: every ``run.log_every_steps`` steps: ``loss`` (mean of the steps' mini-batch
  losses since the last record), ``lr``, ``samples_per_s`` and ``stats`` (the optimizer's
  ``stats()``);
* ``"eval"``: ``test_loss`` and ``test_accuracy`` (classification) or ``test_mse``
  (regression); ``train_*`` with ``run.eval_train``; ``ema_test_*`` with ``run.ema_decay``;
  ``eval_time_s``;
* ``"end"``: the last record, with ``reason`` (which budget stopped the run, or
  ``"non-finite loss"``).

Every record has ``step``, ``epoch`` (steps / steps per epoch), ``passes`` (forward/backward
passes, i.e. closure calls), ``effective_epochs`` (passes / steps per epoch), ``samples``
(passes × batch size), ``train_time_s`` (training only) and ``wall_time_s``. Fields that
depend on the clock end in ``_s``; all others are reproducible. Non-finite numbers are written
as ``null`` (strict JSON).
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from valleys.train.checkpoint import write_atomic

__all__ = [
    "MetricsLog",
    "Progress",
    "TensorBoard",
    "env_info",
    "read_metrics",
    "write_json",
]


def _clean(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return _clean(value.item())
    return value


def write_json(path: str | Path, data: Any) -> None:
    """Write ``data`` as indented JSON, atomically."""
    text = json.dumps(_clean(data), indent=2, sort_keys=False) + "\n"
    write_atomic(path, lambda f: f.write(text.encode()))


class MetricsLog:
    """Append-only ``metrics.jsonl`` writer, flushed after every record.

    :attr:`offset` (bytes written so far) goes into each checkpoint. On resume,
    :meth:`truncate_to` moves every record written after the checkpoint (the closing records
    of the previous segment, or steps lost in a crash) to ``metrics.superseded.jsonl`` and cuts
    the file there, so that ``metrics.jsonl`` reads as one uninterrupted run.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._file = None

    def open(self) -> MetricsLog:
        self._file = open(self.path, "ab")  # noqa: SIM115 - kept open for the whole run
        return self

    @property
    def offset(self) -> int:
        if self._file is not None:
            self._file.flush()
            return self._file.tell()
        return self.path.stat().st_size if self.path.exists() else 0

    def truncate_to(self, offset: int) -> int:
        """Cut the file at ``offset``, appending what followed to the superseded file; returns
        the number of bytes moved."""
        if not self.path.exists():
            return 0
        data = self.path.read_bytes()
        tail = data[offset:]
        if tail:
            with open(self.path.with_name("metrics.superseded.jsonl"), "ab") as f:
                f.write(tail)
                f.flush()
                os.fsync(f.fileno())
        with open(self.path, "r+b") as f:
            f.truncate(offset)
        return len(tail)

    def write(self, record: Mapping[str, Any]) -> None:
        assert self._file is not None, "open() first"
        line = json.dumps(_clean(record), allow_nan=False) + "\n"
        self._file.write(line.encode())
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def read_metrics(run_dir: str | Path, kind: str | None = None) -> list[dict[str, Any]]:
    """The records of ``<run_dir>/metrics.jsonl`` (those of one ``kind`` if given)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"No metrics.jsonl in {run_dir} (is it a valleys run directory?)")
    return read_jsonl(path, kind)


def read_jsonl(path: Path, kind: str | None = None) -> list[dict[str, Any]]:
    """The JSON records of ``path``, one per non-empty line (those whose ``kind`` is ``kind``
    if given); a malformed line is a one-line ``ValueError`` naming the file and line."""
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"Malformed record in {path}, line {n}: {err.msg}") from None
        if kind is None or record.get("kind") == kind:
            out.append(record)
    return out


class TensorBoard:
    """TensorBoard scalars under ``<run_dir>/tb``; does nothing if tensorboard is missing.

    On resume, ``purge_step`` makes TensorBoard hide the previous segment's events from that
    step on (they are written again).
    """

    def __init__(self, folder: str | Path, enabled: bool = True, purge_step: int | None = None):
        self.writer = None
        self.missing = False
        if not enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # the optional extra is not installed
            self.missing = True
            return
        self.writer = SummaryWriter(str(folder), purge_step=purge_step)

    def scalars(self, step: int, values: Mapping[str, Any]) -> None:
        if self.writer is None:
            return
        for key, value in values.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class Progress:
    """A tqdm progress bar on stderr (steps, loss, metric, samples/s); silent when disabled or
    when tqdm is missing."""

    def __init__(self, total: int | None, initial: int = 0, enabled: bool = True):
        self.bar = None
        if not enabled:
            return
        try:
            from tqdm.auto import tqdm
        except ImportError:
            return
        self.bar = tqdm(
            total=total,
            initial=initial,
            unit="step",
            file=sys.stderr,
            dynamic_ncols=True,
            leave=True,
        )

    def update(self, step: int, **postfix: Any) -> None:
        if self.bar is None:
            return
        self.bar.update(step - self.bar.n)
        shown = {k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in postfix.items()}
        self.bar.set_postfix(shown, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _git_commit() -> dict[str, Any] | None:
    root = Path(__file__).resolve().parents[3]
    if not (root / ".git").exists():
        return None
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "dirty": bool(dirty)}


def _versions() -> dict[str, str]:
    import numpy

    from valleys import __version__

    out = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "valleys": __version__,
    }
    for name in ("omegaconf", "tensorboard", "tqdm"):
        try:
            module = __import__(name)
            out[name] = getattr(module, "__version__", "?")
        except ImportError:
            pass
    return out


def env_info(device: torch.device) -> dict[str, Any]:
    """Versions, device, threads, git commit and command line of this process."""
    info: dict[str, Any] = {
        "versions": _versions(),
        "platform": platform.platform(),
        "device": str(device),
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "argv": list(sys.argv),
        "git": _git_commit(),
    }
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        info["cuda"] = {
            "name": torch.cuda.get_device_name(index),
            "capability": list(torch.cuda.get_device_capability(index)),
            "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(),
        }
    else:
        info["cpu"] = _cpu_name()
    info["cores"] = os.cpu_count()
    return info


def _cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux), else the processor or architecture."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
