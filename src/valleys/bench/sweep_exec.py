"""Running a sweep: the state of each run directory, worker processes (or Ray), post-run
analyses, overall progress and ``sweep.json``.

Each run trains in a worker process with ``run.threads`` torch threads (one by default), so
``workers × threads`` should not exceed the cores. A run whose ``metrics.jsonl`` ends with an
``end`` record for the same budgets is complete and skipped; an interrupted run (no closing
``end`` record) or a complete one whose budgets changed is resumed from its checkpoint with
``run.resume=true``, which the training loop makes bit-identical on the CPU. A run directory
that holds a run of another configuration stops the sweep before anything starts. A run that
diverges is complete (its ``end`` record says ``non-finite loss``); a run that fails with an
error is reported and the others go on.

Analyses named in the spec (``sharpness``, ``hessian_top``, ``surface``) run in the worker on
the final checkpoint through :mod:`valleys.bench.analyze` and :mod:`valleys.bench.analyze_hessian`,
appending to the run's ``landscape.jsonl``; one already recorded at the final step is not
repeated; one whose function this version lacks is skipped with a message.
"""

from __future__ import annotations

import fnmatch
import json
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from valleys.bench.sweep import (
    Job,
    Spec,
    default_out,
    expand,
    load_spec,
    read_yaml,
    write_manifest,
)
from valleys.train import config as C

__all__ = [
    "ANALYSES",
    "SweepResult",
    "analysis_function",
    "run",
    "run_state",
    "unavailable",
]

BUDGET_KEYS = ("max_steps", "max_epochs", "max_seconds")

# analysis name -> (module, function, kind of the record it appends, fixed options)
ANALYSES: dict[str, tuple[str, str, str, dict[str, Any]]] = {
    "sharpness": ("valleys.bench.analyze", "sharpness", "sharpness", {}),
    "hessian_top": ("valleys.bench.analyze_hessian", "hessian", "hessian", {"analyses": ["top"]}),
    "surface": ("valleys.bench.analyze", "surface", "surface", {}),
}


# ---------------------------------------------------------------------------------------------
# state of a run directory


def last_record(path: Path) -> dict[str, Any] | None:
    """The last complete record of a ``metrics.jsonl`` (None when there is none)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - 65536))
            tail = f.read()
    except OSError:
        return None
    lines = [ln for ln in tail.splitlines() if ln.strip()]
    if not lines or not tail.endswith(b"\n"):
        return None
    try:
        return json.loads(lines[-1])
    except ValueError:
        return None


def _conflicts(expected: Mapping[str, Any], saved: Mapping[str, Any], prefix: str = "") -> list:
    out = []
    for key, value in expected.items():
        path = f"{prefix}{key}"
        if path in C.ALLOWED_ON_RESUME or key not in saved:
            continue
        if isinstance(value, Mapping) and isinstance(saved[key], Mapping):
            out.extend(_conflicts(value, saved[key], path + "."))
        elif isinstance(value, str) and (value.endswith("%") or value == "epoch"):
            continue  # resolved into steps in the saved configuration
        elif value != saved[key]:
            out.append((path, saved[key], value))
    return out


def run_state(job: Job) -> tuple[str, str]:
    """``(state, detail)`` of the job's directory: ``"new"``, ``"complete"`` (its
    ``metrics.jsonl`` ends with an ``end`` record for the same budgets), ``"resume"`` (an
    interrupted run, or a complete one whose budgets changed) or ``"conflict"`` (it holds a run
    of another configuration; detail names the first difference)."""
    d = job.dir
    if not (d / "config.yaml").is_file() and not (d / "checkpoint.pt").is_file():
        return "new", ""
    saved: dict[str, Any] = {}
    if (d / "config.yaml").is_file():
        try:
            saved = read_yaml(d / "config.yaml", "Run configuration") or {}
        except ValueError:
            saved = {}
        diff = _conflicts(job.config, saved)
        if diff:
            key, old, new = diff[0]
            return "conflict", f"{key}: {old!r} there, {new!r} in the sweep"
    last = last_record(d / "metrics.jsonl")
    if last is None or last.get("kind") != "end":
        return "resume", "interrupted"
    if last.get("reason") == "non-finite loss":
        return "complete", "diverged"
    run_cfg = saved.get("run", {})
    if any(run_cfg.get(k) != job.config["run"].get(k) for k in BUDGET_KEYS):
        return "resume", "budget changed"
    return "complete", str(last.get("reason", ""))


def _fraction(job: Job) -> float:
    """How far the job's run is towards its budget, from its last record (0 to 1)."""
    last = last_record(job.dir / "metrics.jsonl")
    if not last:
        return 0.0
    if last.get("kind") == "end":
        return 1.0
    r = job.config["run"]
    parts = [
        last.get(key, 0) / r[budget]
        for key, budget in (("step", "max_steps"), ("epoch", "max_epochs"))
        if r.get(budget)
    ]
    if r.get("max_seconds"):
        parts.append(last.get("train_time_s", 0) / r["max_seconds"])
    return min(0.99, max(parts, default=0.0))


# ---------------------------------------------------------------------------------------------
# analyses


def analysis_function(name: str) -> Callable[..., Any] | None:
    """The function behind analysis ``name``, with the analysis's fixed options bound (None
    when the name is not in :data:`ANALYSES` or this version lacks the function)."""
    import functools
    import importlib

    if name not in ANALYSES:
        return None
    module, function, _, fixed = ANALYSES[name]
    fn = getattr(importlib.import_module(module), function, None)
    if fn is None:
        return None
    return functools.partial(fn, **fixed) if fixed else fn


def unavailable(name: str) -> str:
    """Why analysis ``name`` cannot run here (one line)."""
    if name not in ANALYSES:
        return f"unknown analysis {name!r} (known: {', '.join(ANALYSES)})"
    module, function, _, _ = ANALYSES[name]
    return f"this version of valleys has no {module}.{function}"


def _analyses_done(job: Job, analyses: Sequence[tuple[str, dict]]) -> list[str]:
    """Names of the analyses already recorded for the run's final checkpoint."""
    from valleys.bench.analyze import read_records

    last = last_record(job.dir / "metrics.jsonl") or {}
    try:
        records = read_records(job.dir)
    except ValueError:
        return []
    kinds = {r.get("kind") for r in records if r.get("step") == last.get("step")}
    return [name for name, _ in analyses if ANALYSES[name][2] in kinds]


def _run_analyses(job: Job, analyses: Sequence[tuple[str, dict]]) -> list[str]:
    notes = []
    done = set(_analyses_done(job, analyses))
    for name, kwargs in analyses:
        fn = analysis_function(name)
        if fn is None or name in done:
            continue
        options = {"progress": False, "plots": False, "device": job.config["run"]["device"]}
        try:
            fn(job.dir, **{**options, **kwargs})
        except Exception as err:  # an analysis failing must not lose the run
            first = str(err).strip().splitlines()[0] if str(err).strip() else ""
            notes.append(f"analysis {name} failed: {type(err).__name__}: {first}")
    return notes


# ---------------------------------------------------------------------------------------------
# one run (in a worker process)


def work(job: Job, state: str, analyses: Sequence[tuple[str, dict]]) -> dict[str, Any]:
    """Train (or resume) one job and run its analyses; returns a plain status record."""
    import torch

    from valleys.train.loop import TrainingError, train

    started = time.perf_counter()
    torch.set_num_threads(max(1, int(job.config["run"]["threads"])))
    status, message = "skipped", ""
    if state != "complete":
        cfg = C.from_dict(job.config)
        cfg.run.resume = state == "resume"
        try:
            result = train(cfg)
            status, message = "done", result.reason
        except TrainingError as err:
            status, message = "diverged", str(err)
        except Exception as err:  # reported with the others; the sweep goes on
            first = str(err).strip().splitlines()[0] if str(err).strip() else ""
            status, message = "failed", f"{type(err).__name__}: {first}"
    elif (last_record(job.dir / "metrics.jsonl") or {}).get("reason") == "non-finite loss":
        status = "diverged"
    notes = []
    if status in ("done", "skipped") and analyses:
        notes = _run_analyses(job, analyses)
    return {
        "id": job.id,
        "status": status,
        "message": message,
        "notes": notes,
        "seconds": time.perf_counter() - started,
    }


# ---------------------------------------------------------------------------------------------
# the sweep


@dataclass
class SweepResult:
    """What a sweep did: the folder, the status of every run it looked at."""

    out: Path
    spec: Spec
    jobs: list[Job]
    results: list[dict[str, Any]] = field(default_factory=list)

    def count(self, status: str) -> int:
        return sum(r["status"] == status for r in self.results)

    @property
    def failed(self) -> list[dict[str, Any]]:
        return [r for r in self.results if r["status"] == "failed"]


def run(
    path: str | Path,
    *,
    full: bool = False,
    out: str | Path | None = None,
    workers: int | None = None,
    threads: int = 1,
    overrides: Sequence[str] = (),
    only: Sequence[str] = (),
    ray: str | None = None,
    analyses: bool = True,
    progress: bool = True,
    dry_run: bool = False,
    echo: Callable[[str], None] = print,
) -> SweepResult:
    """Expand the sweep file at ``path`` and run what is not complete.

    ``workers`` processes (default: cores // threads, or 1 when the runs use a GPU; 1 runs in
    this process) each train one run at a time with ``threads`` torch threads; ``ray`` (a
    cluster address, or ``"auto"``) runs them as Ray tasks instead (``pip install ray``; the
    run folders must be on a filesystem every node sees).
    ``only`` keeps the runs whose name matches one of its glob patterns; ``overrides``
    (``key=value``) apply to every run. ``dry_run`` lists the runs and their state only.
    """
    from valleys import _validate as check

    threads = check.count("threads", threads, 1)
    spec = load_spec(path, full=full)
    jobs = expand(spec, out, overrides=overrides, threads=threads)
    out_dir = Path(out) if out is not None else default_out(spec)
    selected = [j for j in jobs if not only or any(fnmatch.fnmatch(j.id, p) for p in only)]
    if not selected:
        raise ValueError(f"No run of {path} matches --only {' '.join(only)} (see --dry-run)")
    states = {j.id: run_state(j) for j in selected}
    result = SweepResult(out_dir, spec, jobs)
    if dry_run:
        for j in selected:
            state, detail = states[j.id]
            echo(f"  {state:<9} {j.id}" + (f"  ({detail})" if detail else ""))
        return result
    for j in selected:
        state, detail = states[j.id]
        if state == "conflict":
            raise ValueError(
                f"Run directory {j.dir} holds a run of another configuration ({detail}); "
                "remove it or pass another --out"
            )
    chosen = []
    if analyses:
        for name, kwargs in spec.analyses:
            if analysis_function(name) is None:
                echo(f"analysis {name!r} skipped: {unavailable(name)}")
            else:
                chosen.append((name, kwargs))
    write_manifest(spec, jobs, out_dir, " ".join(sys.argv))
    todo = [
        j
        for j in selected
        if states[j.id][0] != "complete" or len(_analyses_done(j, chosen)) < len(chosen)
    ]
    skipped = len(selected) - len(todo)
    echo(
        f"sweep {spec.name}: {len(selected)} runs in {out_dir} ({skipped} complete, "
        f"{len(todo)} to run)"
    )
    result.results.extend(
        {"id": j.id, "status": "skipped", "message": "", "notes": [], "seconds": 0.0}
        for j in selected
        if j not in todo
    )
    if not todo:
        return result
    payloads = [(j, states[j.id][0], chosen) for j in todo]
    if ray is not None:
        executor = _RayExecutor(ray, threads)
    else:
        n = check.count("workers", workers or _default_workers(todo, threads), 1)
        executor = _PoolExecutor(n) if n > 1 else _InlineExecutor()
    result.results.extend(_drive(executor, payloads, progress, echo))
    return result


def _default_workers(jobs: Sequence[Job], threads: int) -> int:
    """cores // threads on the CPU; one on a GPU, so that runs timed there do not share it."""
    import torch

    devices = {str(j.config["run"]["device"]) for j in jobs}
    if any(d.startswith("cuda") for d in devices) or (
        "auto" in devices and torch.cuda.is_available()
    ):
        return 1
    return max(1, (os.cpu_count() or 1) // threads)


def _drive(executor: Any, payloads: list, progress: bool, echo: Callable) -> list[dict]:
    from valleys.bench.analyze import ProgressBar

    by_id = {p[0].id: p[0] for p in payloads}
    bar = ProgressBar(len(payloads), progress, "run")
    results: list[dict[str, Any]] = []
    say = echo
    if bar.bar is not None:
        bar.bar.bar_format = (
            "{l_bar}{bar}| {n:.1f}/{total_fmt} runs [{elapsed}<{remaining}{postfix}]"
        )
        say = bar.bar.write
    executor.submit_all(payloads)
    try:
        while len(results) < len(payloads):
            for res in executor.poll(1.0):
                results.append(res)
                by_id.pop(res["id"], None)
                extra = f": {res['message']}" if res["status"] in ("failed", "diverged") else ""
                say(f"  {res['status']:<8} {res['id']} ({res['seconds']:.0f} s){extra}")
                for note in res["notes"]:
                    say(f"           {note}")
            if bar.bar is not None:
                bar.bar.n = len(results) + sum(_fraction(j) for j in by_id.values())
                bar.bar.set_postfix_str(
                    f"done {len(results)}, failed {sum(r['status'] == 'failed' for r in results)}",
                    refresh=False,
                )
                bar.bar.refresh()
    except KeyboardInterrupt:
        executor.stop()
        say("interrupted: each run keeps its last checkpoint; the same command resumes the sweep")
        raise
    finally:
        bar.close()
    executor.close()
    return results


class _PoolExecutor:
    """Worker processes (spawned: a fresh interpreter each, whatever torch's state here)."""

    def __init__(self, workers: int):
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        self.pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
        self.futures: dict[Any, str] = {}

    def submit_all(self, payloads: list) -> None:
        for job, state, analyses in payloads:
            self.futures[self.pool.submit(work, job, state, analyses)] = job.id

    def poll(self, timeout: float) -> list[dict[str, Any]]:
        from concurrent.futures import FIRST_COMPLETED, wait

        done, _ = wait(list(self.futures), timeout=timeout, return_when=FIRST_COMPLETED)
        out = []
        for fut in done:
            job_id = self.futures.pop(fut)
            try:
                out.append(fut.result())
            except Exception as err:  # the worker process itself died
                message = f"{type(err).__name__}: {err}"
                out.append(_failure(job_id, message))
        return out

    def stop(self) -> None:
        processes = list(getattr(self.pool, "_processes", {}).values())
        self.pool.shutdown(wait=False, cancel_futures=True)
        for p in processes:  # the runs keep their last checkpoint; the next sweep resumes them
            p.terminate()

    def close(self) -> None:
        self.pool.shutdown()


class _InlineExecutor:
    """One run at a time in this process (``workers=1``): no process start-up, and errors and
    debuggers behave as in a plain script."""

    def __init__(self) -> None:
        self.queue: list = []

    def submit_all(self, payloads: list) -> None:
        self.queue = list(payloads)

    def poll(self, timeout: float) -> list[dict[str, Any]]:
        import torch

        if not self.queue:
            return []
        threads = torch.get_num_threads()
        try:
            return [work(*self.queue.pop(0))]
        finally:
            torch.set_num_threads(threads)

    def stop(self) -> None:
        self.queue = []

    def close(self) -> None:
        pass


class _RayExecutor:
    """Ray tasks of ``threads`` CPUs each on the cluster at ``address``."""

    def __init__(self, address: str, threads: int):
        try:
            import ray
        except ImportError:
            raise ValueError(
                "--ray needs Ray, which is not installed: pip install 'valleys[ray]' (or run "
                "without --ray on this machine's cores)"
            ) from None
        self.ray = ray
        ray.init(address=address, ignore_reinit_error=True, log_to_driver=False)
        self.remote = ray.remote(num_cpus=threads, max_retries=0)(work)
        self.refs: dict[Any, str] = {}

    def submit_all(self, payloads: list) -> None:
        for job, state, analyses in payloads:
            self.refs[self.remote.remote(job, state, analyses)] = job.id

    def poll(self, timeout: float) -> list[dict[str, Any]]:
        done, _ = self.ray.wait(list(self.refs), num_returns=1, timeout=timeout)
        out = []
        for ref in done:
            job_id = self.refs.pop(ref)
            try:
                out.append(self.ray.get(ref))
            except Exception as err:
                out.append(_failure(job_id, f"{type(err).__name__}: {err}"))
        return out

    def stop(self) -> None:
        for ref in self.refs:
            self.ray.cancel(ref, force=True)

    def close(self) -> None:
        pass


def _failure(job_id: str, message: str) -> dict[str, Any]:
    first = message.strip().splitlines()[0] if message.strip() else message
    return {"id": job_id, "status": "failed", "message": first, "notes": [], "seconds": 0.0}
