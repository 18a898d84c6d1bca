"""Sweeps: a spec file expanded into named training runs, run in parallel, resumable.

A sweep spec (``configs/sweeps/<name>.yaml``) describes tasks × optimizers × hyperparameter
grid × budgets × seeds::

    name: sgn_fashion                       # default: the file's stem
    description: SGD against SGN on Fashion-MNIST (one line for the report)
    base: [../experiments/sgn_fashion_conv.yaml]   # config files, relative to this file
    config:                                 # overrides of every run (config sections)
      run: {max_seconds: 60, eval_every_epochs: 1, tensorboard: false}
    tasks: {fashion: {}}                    # optional: task name -> overrides
    optimizers:                             # label -> overrides + grid
      sgd:
        optim: {name: sgd, momentum: 0.0}
        grid: {optim.lr: [0.001, 0.01, 0.1, 1.0]}   # product of the lists; or a list of points
      sgn:
        optim: {name: sgn}
        grid: {optim.cg_max_iters: [2, 3, 5, 10]}
    budgets: {short: {run: {max_epochs: 50}}}   # optional: name -> overrides (separate runs)
    seeds: [0, 1, 2]                        # run.seed of each repetition
    fallbacks:                              # optional: tried in order when data is missing
      - {data: {name: fashion_mnist}}
    analyses:                               # optional: run on each final model
      - {name: sharpness, steps: 200, samples: 2000}
      - hessian_top
    report: {times: [20, 60], metric: test_accuracy}   # defaults of `valleys report`
    full:                                   # merged over the spec by --full (GPU scale)
      config: {run: {max_seconds: 150}}
      seeds: [0, 1, 2, 3, 4]

Overrides are merged in this order: base files, ``config``, the task, its fallback (when
used), the optimizer, the budget, the grid point, then ``run.seed``, the run directory and the
command line's ``key=value`` items. Setting a section's ``name`` to another value than it had
drops that section's open keys (an optimizer's hyperparameters, a schedule's arguments, a
dataset's options) so that ``optim: {name: sgd}`` over an SGN base does not inherit SGN's
damping; ``optim: {name: sam, base: nesterov}`` over a ``nesterov`` section keeps its lr,
momentum and weight decay for the base. Mappings in ``full`` are merged key by key; lists
and ``grid`` replace.

Runs are named ``[<task>/][<budget>/]<optimizer>[-<key>=<value>...]/seed<seed>`` under the
sweep folder (default ``runs/sweeps/<name>``, ``-full`` appended with ``--full``), which also
holds ``sweep.json``: the spec as run and every run's coordinates. :func:`run_sweep` runs them
(see :mod:`valleys.bench.sweep_exec`): runs whose ``metrics.jsonl`` ends with an ``end``
record are skipped, interrupted ones are resumed from their checkpoint.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from valleys import _validate as check
from valleys.train import config as C

__all__ = [
    "MANIFEST",
    "Job",
    "Spec",
    "default_out",
    "expand",
    "load_spec",
    "parse_overrides",
    "run_sweep",
    "write_manifest",
]

MANIFEST = "sweep.json"

KEYS = (
    "name",
    "description",
    "base",
    "config",
    "tasks",
    "optimizers",
    "budgets",
    "seeds",
    "fallbacks",
    "analyses",
    "report",
    "full",
)
SECTION_NAMES = ("data", "model", "optim", "schedule")  # sections whose `name` selects a builder


@dataclass
class Spec:
    """A loaded sweep spec (``full`` already applied when asked for)."""

    path: Path
    name: str
    description: str
    base: list[Path]
    config: dict[str, Any]
    tasks: dict[str, dict[str, Any]]
    optimizers: dict[str, tuple[dict[str, Any], list[dict[str, Any]]]]
    budgets: dict[str, dict[str, Any]]
    seeds: list[int]
    fallbacks: list[dict[str, Any]]
    analyses: list[tuple[str, dict[str, Any]]]
    report: dict[str, Any]
    full: bool
    raw: dict[str, Any] = field(default_factory=dict)


@dataclass
class Job:
    """One run of a sweep: its coordinates and its full configuration (plain data)."""

    id: str
    dir: Path
    task: str
    optimizer: str
    label: str  # the configuration: optimizer and grid point
    params: dict[str, Any]
    budget: str
    seed: int
    config: dict[str, Any]
    note: str = ""  # e.g. which data fallback was used

    def describe(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["dir"] = str(self.dir)
        del out["config"]
        return out


# ---------------------------------------------------------------------------------------------
# the spec file


def _merge(a: Any, b: Any) -> Any:
    """``b`` merged over ``a``: mappings key by key, anything else replaced."""
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        out = dict(a)
        for k, v in b.items():
            out[k] = _merge(a[k], v) if k in a else copy.deepcopy(v)
        return out
    return copy.deepcopy(b)


def _mapping(where: str, value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ValueError(f"Invalid {where}: {value!r} (expected a mapping)")
    return {str(k): v for k, v in value.items()}


def read_yaml(path: str | Path, what: str = "Sweep file") -> Any:
    """A YAML file as plain data, read like the config files (OmegaConf's loader: ``1e-3`` is
    a number); one-line errors."""
    import yaml
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path} (check the path)")
    try:
        return OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ValueError(f"Malformed YAML in {path}{where}: {problem} (fix the syntax)") from None
    except OmegaConfBaseException as err:
        raise ValueError(f"Invalid {path}: {str(err).splitlines()[0]}") from None


def _grid_points(where: str, grid: Any) -> list[dict[str, Any]]:
    """A grid (``{key: [values]}``: the product; or a list of ``{key: value}`` points)."""
    if grid is None:
        return [{}]
    if isinstance(grid, Mapping):
        keys = [str(k) for k in grid]
        lists = []
        for k in keys:
            values = grid[k]
            if not isinstance(values, list) or not values:
                raise ValueError(f"Invalid {where}.{k}: {values!r} (expected a non-empty list)")
            lists.append(values)
        return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*lists)]
    if isinstance(grid, list) and grid and all(isinstance(p, Mapping) for p in grid):
        return [{str(k): v for k, v in p.items()} for p in grid]
    raise ValueError(
        f"Invalid {where}: {grid!r} (expected {{key: [values]}} or a list of {{key: value}})"
    )


def load_spec(path: str | Path, *, full: bool = False) -> Spec:
    """Read and check a sweep spec; with ``full`` its ``full`` section is merged over it."""
    path = Path(path)
    raw = read_yaml(path)
    if not isinstance(raw, Mapping):
        raise ValueError(f"Invalid sweep file {path}: expected a mapping (name, optimizers...)")
    raw = dict(raw)
    for key in raw:
        if key not in KEYS:
            raise check.unknown(f"key of sweep file {path}", key, KEYS)
    full_part = _mapping(f"{path}: full", raw.get("full"))
    for key in full_part:
        if key not in KEYS or key in ("name", "full"):
            raise check.unknown(f"key of {path}: full", key, [k for k in KEYS if k != "full"])
    spec = dict(raw)
    if full:
        for key, value in full_part.items():
            replace = key in ("seeds", "base", "fallbacks", "analyses")
            spec[key] = value if replace else _merge(spec.get(key) or {}, value)
        for label, entry in _mapping("full.optimizers", full_part.get("optimizers")).items():
            if isinstance(entry, Mapping) and "grid" in entry:  # a grid is replaced, not merged
                spec["optimizers"][label]["grid"] = copy.deepcopy(entry["grid"])
    where = str(path)
    base = spec.get("base") or []
    base = [base] if isinstance(base, str) else base
    if not isinstance(base, list):
        raise ValueError(f"Invalid {where}: base: {base!r} (expected a list of config files)")
    optimizers = {}
    for label, entry in _mapping(f"{where}: optimizers", spec.get("optimizers")).items():
        entry = _mapping(f"{where}: optimizers.{label}", entry)
        points = _grid_points(f"{where}: optimizers.{label}.grid", entry.pop("grid", None))
        optimizers[label] = (entry, points)
    if not optimizers:
        raise ValueError(f"Invalid sweep file {where}: it has no optimizers")
    seeds = spec.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds:
        raise ValueError(f"Invalid {where}: seeds: {seeds!r} (expected a list such as [0, 1, 2])")
    seeds = [check.count("seeds", s) for s in seeds]
    fallbacks = spec.get("fallbacks") or []
    if not isinstance(fallbacks, list):
        raise ValueError(f"Invalid {where}: fallbacks: {fallbacks!r} (expected a list)")
    analyses = []
    for item in spec.get("analyses") or []:
        if isinstance(item, str):
            analyses.append((item, {}))
        elif isinstance(item, Mapping) and "name" in item:
            analyses.append((str(item["name"]), {k: v for k, v in item.items() if k != "name"}))
        else:
            raise ValueError(f"Invalid {where}: analyses item {item!r} (a name or {{name: ...}})")
    return Spec(
        path=path,
        name=str(spec.get("name") or path.stem),
        description=str(spec.get("description") or ""),
        base=[(path.parent / str(b)).resolve() for b in base],
        config=_mapping(f"{where}: config", spec.get("config")),
        tasks={
            k: _mapping(f"{where}: tasks.{k}", v)
            for k, v in _mapping(f"{where}: tasks", spec.get("tasks")).items()
        },
        optimizers=optimizers,
        budgets={
            k: _mapping(f"{where}: budgets.{k}", v)
            for k, v in _mapping(f"{where}: budgets", spec.get("budgets")).items()
        },
        seeds=seeds,
        fallbacks=[_mapping(f"{where}: fallbacks item", f) for f in fallbacks],
        analyses=analyses,
        report=_mapping(f"{where}: report", spec.get("report")),
        full=full,
        raw=spec,
    )


# ---------------------------------------------------------------------------------------------
# expansion


def _fixed(section: str) -> set[str]:
    cls = C.SECTIONS[section]
    return {f.name for f in dataclasses.fields(cls) if not f.metadata.get("extra")}


def _wraps(new: Any, values: Mapping[str, Any], old: Any) -> bool:
    """Whether optimizer ``new`` wraps ``old`` (``sam`` with ``base`` = ``old``)."""
    from valleys import optim

    if new not in optim.names() or not optim.spec(new).wraps:
        return False
    return values.get("base", optim.spec(new).hyperparameters().get("base")) == old


def _overlay(cfg: dict[str, Any], overrides: Mapping[str, Any], source: str) -> dict[str, Any]:
    """``overrides`` (config sections) merged over the plain config ``cfg``; a new ``name``
    of a section drops its open keys, except that an optimizer wrapping the previous one
    (``sam`` around it) keeps them for its base."""
    out = copy.deepcopy(cfg)
    for section, values in overrides.items():
        if section not in C.SECTIONS:
            raise check.unknown(f"config section (in {source})", section, C.SECTIONS)
        values = _mapping(f"{source}: {section}", values)
        current = out.setdefault(section, {})
        old, new = current.get("name"), values.get("name", current.get("name"))
        if section in SECTION_NAMES and new != old:
            keep = section == "optim" and _wraps(new, values, old)
            fixed = _fixed(section)
            current = {k: v for k, v in current.items() if k in fixed or keep}
        out[section] = _merge(current, values)
    return out


def _set_dotted(cfg: dict[str, Any], key: str, value: Any, source: str) -> None:
    parts = key.split(".")
    if len(parts) < 2 or parts[0] not in C.SECTIONS:
        raise ValueError(
            f"Invalid key {key!r} in {source} (expected section.key, e.g. optim.lr; sections: "
            f"{', '.join(C.SECTIONS)})"
        )
    node = cfg.setdefault(parts[0], {})
    for part in parts[1:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ValueError(f"Invalid key {key!r} in {source} ({part} is not a mapping)")
    node[parts[-1]] = copy.deepcopy(value)


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """``key=value`` command-line items as ``{dotted key: value}`` (values read as YAML, as
    ``valleys train`` reads them)."""
    import yaml
    from omegaconf import OmegaConf

    out = {}
    for item in items:
        key, sep, _ = str(item).partition("=")
        if not sep or not key.strip():
            raise ValueError(
                f"Malformed override: {item!r} (expected key=value, e.g. run.device=cuda)"
            )
        try:
            node = OmegaConf.to_container(OmegaConf.from_dotlist([str(item)]))
        except (yaml.YAMLError, ValueError) as err:
            raise ValueError(f"Malformed override: {item!r} ({err}; the value is YAML)") from None
        for part in key.strip().split("."):
            node = node[part]
        out[key.strip()] = node
    return out


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        text = f"{value:g}"
    elif isinstance(value, (list, tuple)):
        text = "-".join(_fmt(v) for v in value)
    else:
        text = str(value)
    return re.sub(r"[^A-Za-z0-9.+-]", "_", text)


def _label(optimizer: str, point: Mapping[str, Any]) -> str:
    """``sgd-lr=0.1``: the optimizer and its grid point (keys shortened to their last part
    when that is unambiguous)."""
    short = [k.rsplit(".", 1)[-1] for k in point]
    names = short if len(set(short)) == len(short) else list(point)
    parts = [f"{n}={_fmt(v)}" for n, v in zip(names, point.values(), strict=True)]
    return "-".join([optimizer, *parts])


_DATA_FOUND: dict[str, str | None] = {}


def _data_missing(data: Mapping[str, Any]) -> str | None:
    """Why the dataset of a ``data`` section cannot be loaded here (None: it can)."""
    key = json.dumps(data, sort_keys=True, default=str)
    if key not in _DATA_FOUND:
        from valleys.train.restore import build_dataset

        try:
            build_dataset(C.from_dict({"data": dict(data)}))
            _DATA_FOUND[key] = None
        except FileNotFoundError as err:
            _DATA_FOUND[key] = str(err).splitlines()[0]
    return _DATA_FOUND[key]


def expand(
    spec: Spec,
    out: str | Path | None = None,
    *,
    overrides: Sequence[str] = (),
    threads: int = 1,
    check_data: bool = True,
) -> list[Job]:
    """The runs of ``spec`` in the folder ``out`` (default ``runs/sweeps/<name>[-full]``), in
    seed-major order (every configuration's first seed first), each configuration validated
    (names, keys, types) without loading data or building models. ``check_data`` loads each
    task's dataset once to apply ``fallbacks`` when it is missing."""
    out = Path(out) if out is not None else default_out(spec)
    cli = parse_overrides(overrides)
    base_cfg = C.to_dict(C.load(spec.base)) if spec.base else C.to_dict(C.Config())
    base_cfg = _overlay(base_cfg, spec.config, f"{spec.path}: config")
    tasks = spec.tasks or {"": {}}
    budgets = spec.budgets or {"": {}}
    jobs: list[Job] = []
    for seed in spec.seeds:
        for task, task_over in tasks.items():
            task_cfg = _overlay(base_cfg, task_over, f"{spec.path}: tasks.{task}")
            note = ""
            if check_data:
                task_cfg, note = _with_fallback(spec, task_cfg, task, cli)
            for optimizer, (opt_over, points) in spec.optimizers.items():
                opt_cfg = _overlay(task_cfg, opt_over, f"{spec.path}: optimizers.{optimizer}")
                for budget, budget_over in budgets.items():
                    b_cfg = _overlay(opt_cfg, budget_over, f"{spec.path}: budgets.{budget}")
                    b_cfg["run"]["threads"] = b_cfg["run"].get("threads") or threads
                    for point in points:
                        jobs.append(
                            _job(spec, out, b_cfg, task, optimizer, budget, point, seed, cli, note)
                        )
    return jobs


def _with_fallback(
    spec: Spec, cfg: dict[str, Any], task: str, cli: Mapping[str, Any]
) -> tuple[dict[str, Any], str]:
    """``cfg`` when its dataset loads here, else the first fallback whose dataset does (with
    the command line's ``data.*`` overrides applied to both); a one-line error if none."""

    def probe(c: dict[str, Any]) -> str | None:
        c = copy.deepcopy(c)
        for key, value in cli.items():
            if key.startswith("data."):
                _set_dotted(c, key, value, "the overrides")
        return None if c["data"].get("download") else _data_missing(c["data"])

    missing = probe(cfg)
    if missing is None:
        return cfg, ""
    for i, fallback in enumerate(spec.fallbacks):
        candidate = _overlay(cfg, fallback, f"{spec.path}: fallbacks[{i}]")
        if probe(candidate) is None:
            note = (
                f"data {candidate['data']['name']!r} instead of {cfg['data']['name']!r} (missing)"
            )
            return candidate, note
    raise FileNotFoundError(f"{spec.path}, task {task or spec.name!r}: {missing}")


def _job(spec, out, cfg, task, optimizer, budget, point, seed, cli, note) -> Job:
    cfg = copy.deepcopy(cfg)
    where = f"{spec.path}: optimizers.{optimizer}.grid"
    for key, value in point.items():
        _set_dotted(cfg, key, value, where)
    label = _label(optimizer, point)
    rel = "/".join(p for p in (task, budget, label, f"seed{seed}") if p)
    cfg["run"]["seed"] = seed
    cfg["run"]["dir"] = str(out.resolve() / rel)
    cfg["run"]["progress"] = False
    cfg["run"]["resume"] = False
    for key, value in cli.items():
        _set_dotted(cfg, key, value, "the overrides")
    try:
        cfg = C.to_dict(C.validate(C.from_dict(cfg)))
    except ValueError as err:
        raise ValueError(f"{spec.path}: run {rel}: {err}") from None
    return Job(rel, out / rel, task, optimizer, label, dict(point), budget, seed, cfg, note)


def default_out(spec: Spec) -> Path:
    """``runs/sweeps/<name>`` (``<name>-full`` at full scale)."""
    return Path("runs") / "sweeps" / (spec.name + ("-full" if spec.full else ""))


def write_manifest(spec: Spec, jobs: Sequence[Job], out: Path, command: str = "") -> Path:
    """``<out>/sweep.json``: the spec as run and every run's coordinates."""
    from datetime import datetime, timezone

    from valleys.train.checkpoint import write_atomic

    data = {
        "name": spec.name,
        "description": spec.description,
        "spec_file": str(spec.path),
        "full": spec.full,
        "command": command,
        "written": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "spec": spec.raw,
        "report": spec.report,
        "analyses": [{"name": n, **kw} for n, kw in spec.analyses],
        "runs": [{**j.describe(), "dir": j.id} for j in jobs],
    }
    out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(data, indent=1, default=str) + "\n"
    write_atomic(out / MANIFEST, lambda f: f.write(text.encode()))
    return out / MANIFEST


def run_sweep(path: str | Path, **kwargs: Any) -> Any:
    """Expand and run the sweep file at ``path``: see :func:`valleys.bench.sweep_exec.run`."""
    from valleys.bench import sweep_exec

    return sweep_exec.run(path, **kwargs)
