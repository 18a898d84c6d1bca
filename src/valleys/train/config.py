"""Run configuration: dataclasses, loaded with OmegaConf from code defaults, YAML files and
``key=value`` overrides (in that order, later ones win).

Schema
------
Five sections. Every key equals the argument it feeds::

    data:      name, root, download, seed, <dataset options>   -> valleys.data.get(name, ...)
               batch_size, sampling, drop_last, augment         -> valleys.data.loader.BatchStream
               eval_batch_size                                  -> evaluation batches
    model:     name, <model kwargs>                             -> valleys.models.get(name, ...)
    optim:     name, <hyperparameters>                          -> valleys.optim.get(name, ...)
    schedule:  name, progress, <schedule arguments>             -> valleys.schedules.<name>
    run:       seed, device, budgets, evaluation, checkpoints, logging (see :class:`RunConfig`)

``data``, ``model``, ``optim`` and ``schedule`` are *open* sections: besides their fixed keys
they take, flattened, the keyword arguments of what they build (``optim.langevin_steps=5``,
``model.widths=[64,64]``, ``schedule.explore_steps=500``). These are checked against the
constructor's signature: an unknown key is a one-line ``ValueError`` naming the valid ones and
the closest match. ``run`` is closed (its keys are the fields of :class:`RunConfig`).

The resolved configuration (:func:`resolve`) fills in every default of the optimizer, model
and schedule from their signatures, so the ``config.yaml`` a run saves lists every value used;
defaults themselves live only in the signatures (library) and in the dataclasses below
(harness).

Comparison files
----------------
A YAML file may instead hold ``base:`` (a configuration) and ``variants:`` (name ->
overrides of ``base``), e.g. ``configs/experiments/digits_compare.yaml``. :func:`load_variants`
returns one configuration per variant; :func:`load` refuses such a file.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import math
import re
import typing
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from valleys import _validate as check

__all__ = [
    "ALLOWED_ON_RESUME",
    "Config",
    "DataConfig",
    "ModelConfig",
    "OptimConfig",
    "RunConfig",
    "ScheduleConfig",
    "config_diff",
    "from_dict",
    "load",
    "load_variants",
    "resolve",
    "to_dict",
    "to_yaml",
    "validate",
]

# A required argument (no default) in a signature.
REQUIRED = inspect.Parameter.empty


@dataclass
class DataConfig:
    """Dataset and batches. Dataset-specific options of ``valleys.data.get`` go flattened into
    this section (held in ``options``)."""

    name: str = "digits"
    root: str | None = None  # data folder; None: $VALLEYS_DATA or ~/.cache/valleys
    download: bool = False
    seed: int = 0  # seed of the dataset's own split/generation (not the batch order)
    batch_size: int = 128
    sampling: str = "shuffle"  # "shuffle" (epochs without replacement) or "replacement"
    drop_last: bool = True
    augment: dict[str, Any] | None = None  # keyword arguments of valleys.data.loader.Augment
    eval_batch_size: int = 1024
    options: dict[str, Any] = field(default_factory=dict, metadata={"extra": True})


@dataclass
class ModelConfig:
    """Model name; its keyword arguments go flattened into this section (held in ``kwargs``)."""

    name: str = "mlp"
    kwargs: dict[str, Any] = field(default_factory=dict, metadata={"extra": True})


@dataclass
class OptimConfig:
    """Optimizer registry name; its hyperparameters go flattened into this section."""

    name: str = "sgd"
    hparams: dict[str, Any] = field(default_factory=dict, metadata={"extra": True})


@dataclass
class ScheduleConfig:
    """Learning-rate schedule of ``valleys.schedules``, applied as a factor of each param
    group's lr (the optimizer's ``lr`` is the peak).

    ``progress="steps"``: the schedule is a function of the optimizer step (through
    ``schedules.attach``). ``progress="time"``: of the elapsed fraction of the time budget
    ``run.max_seconds`` (``schedules.virtual_step``); ``total_steps`` is then only the
    resolution of the virtual clock (default 10,000), and the other ``*_steps`` arguments are
    in the same virtual units.

    Arguments of the schedule function go flattened into this section. ``total_steps``, when
    the function takes it and it is not given, is the step budget. ``steps_per_unit: epoch``
    (``piecewise``) means boundaries in epochs. Any other ``*_steps`` argument may be a share of
    ``total_steps`` written as a percentage (``explore_steps: 50%``).
    """

    name: str = "constant"
    progress: str = "steps"
    kwargs: dict[str, Any] = field(default_factory=dict, metadata={"extra": True})


@dataclass
class RunConfig:
    """How the run is driven, evaluated, saved and logged.

    Budgets: the run stops at the first one reached of ``max_steps``, ``max_epochs`` (one epoch
    is ``N // batch_size`` optimizer steps) and ``max_seconds`` (training time: evaluation,
    logging and checkpointing excluded). At least one is required.
    """

    dir: str | None = None  # run directory; None: runs/<data>-<model>-<optim>-<timestamp>
    resume: bool = False  # continue the run in `dir` from its checkpoint (see valleys.train)
    seed: int = 0
    device: str = "auto"  # "auto" (cuda if available), "cpu", "cuda", "cuda:1", ...
    threads: int = 0  # torch CPU threads; 0 keeps torch's default
    deterministic: bool = False  # torch.use_deterministic_algorithms (+ cuDNN deterministic)
    max_steps: int | None = None
    max_epochs: float | None = None
    max_seconds: float | None = None
    eval_every_steps: int | None = None
    eval_every_epochs: float | None = None
    eval_at_start: bool = True  # evaluate before the first step
    eval_train: bool = False  # also evaluate on the whole (unaugmented) training set
    log_every_steps: int = 10
    checkpoint_every_steps: int | None = None  # None: only at the end
    bn_refresh: bool = False  # recompute BatchNorm statistics on the train set before eval
    bn_refresh_batch_size: int = 1024
    ema_decay: float | None = None  # evaluate an EMA of the weights too (TF port: 0.999)
    amp: str | None = None  # None, "bf16" (autocast) or "fp16" (autocast + loss scaling)
    compile: bool = False  # torch.compile the model for training
    compile_backend: str = "inductor"
    progress: bool = True  # progress bar on stderr
    tensorboard: bool = True  # TensorBoard scalars in <dir>/tb (if tensorboard is installed)


@dataclass
class Config:
    """A whole run: ``data``, ``model``, ``optim``, ``schedule``, ``run``."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    run: RunConfig = field(default_factory=RunConfig)


SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "model": ModelConfig,
    "optim": OptimConfig,
    "schedule": ScheduleConfig,
    "run": RunConfig,
}

# Keys that may differ between a run and its resumption: budgets and how the process runs,
# nothing that changes the trajectory of the first steps.
ALLOWED_ON_RESUME = frozenset(
    {
        "run.dir",
        "run.resume",
        "run.max_steps",
        "run.max_epochs",
        "run.max_seconds",
        "run.device",
        "run.threads",
        "run.progress",
        "run.tensorboard",
        "run.checkpoint_every_steps",
    }
)

AMP_MODES = ("bf16", "fp16")
PROGRESS_MODES = ("steps", "time")
SAMPLING_MODES = ("shuffle", "replacement")
TIME_RESOLUTION_STEPS = 10_000


# ---------------------------------------------------------------------------------------------
# helpers


def _extra_field(cls: type) -> str | None:
    for f in dataclasses.fields(cls):
        if f.metadata.get("extra"):
            return f.name
    return None


def _fixed_fields(cls: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if not f.metadata.get("extra")]


def _unknown(what: str, key: str, valid: Iterable[str]) -> ValueError:
    options = sorted(str(v) for v in valid)
    close = difflib.get_close_matches(str(key), options, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return ValueError(f"Unknown {what}: {key!r} ({hint}valid: {', '.join(options)})")


def _type_name(tp: Any) -> str:
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """``value`` converted to the annotated type ``tp`` or a one-line ``ValueError``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _coerce(key, value, inner[0])
        return value
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"Invalid {key}: {value!r} (expected true or false)")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"Invalid {key}: {value!r} (expected an integer)")
        if isinstance(value, float) and not value.is_integer():
            raise ValueError(f"Invalid {key}: {value!r} (expected an integer)")
        return int(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"Invalid {key}: {value!r} (expected a number)")
        if not math.isfinite(value):
            raise ValueError(f"Invalid {key}: {value!r} (must be finite)")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ValueError(f"Invalid {key}: {value!r} (expected a string)")
        return value
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise ValueError(f"Invalid {key}: {value!r} (expected a mapping of key: value)")
        return dict(value)
    return value


def _like_default(key: str, value: Any, default: Any) -> Any:
    """Coerce a constructor keyword to the type of its default (where the default tells)."""
    if default is REQUIRED or default is None or value is None:
        return value
    if isinstance(default, bool):
        return _coerce(key, value, bool)
    if isinstance(default, int):
        # an int default often stands for a real (e.g. eps=0): accept any number, keep ints
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"Invalid {key}: {value!r} (expected a number)")
        return value
    if isinstance(default, float):
        return _coerce(key, value, float)
    if isinstance(default, str):
        return _coerce(key, value, str)
    if isinstance(default, tuple):
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
            raise ValueError(f"Invalid {key}: {value!r} (expected a list)")
        return tuple(value)
    return value


def _plain(value: Any) -> Any:
    """Plain YAML-able data: tuples become lists."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


# ---------------------------------------------------------------------------------------------
# dict <-> dataclasses


def from_dict(raw: Mapping[str, Any]) -> Config:
    """A :class:`Config` from nested plain data (flattened open sections), keys and types
    checked. Missing keys keep their defaults."""
    if not isinstance(raw, Mapping):
        raise ValueError(f"Invalid configuration: {raw!r} (expected a mapping of sections)")
    for section in raw:
        if section not in SECTIONS:
            raise _unknown("config section", section, SECTIONS)
    sections = {}
    for name, cls in SECTIONS.items():
        values = raw.get(name) or {}
        if not isinstance(values, Mapping):
            raise ValueError(
                f"Invalid {name}: {values!r} (expected a mapping of keys, e.g. {name}.name: ...)"
            )
        hints = typing.get_type_hints(cls)
        fixed = {f.name for f in _fixed_fields(cls)}
        extra = _extra_field(cls)
        kwargs: dict[str, Any] = {}
        extras: dict[str, Any] = {}
        for key, value in values.items():
            key = str(key)
            if key in fixed:
                kwargs[key] = _coerce(f"{name}.{key}", value, hints[key])
            elif extra is not None:
                extras[key] = _plain(value)
            else:
                raise _unknown(f"key of {name}", key, fixed)
        if extra is not None:
            kwargs[extra] = extras
        sections[name] = cls(**kwargs)
    return Config(**sections)


def to_dict(cfg: Config) -> dict[str, Any]:
    """Nested plain data with the open sections flattened (the YAML form)."""
    out: dict[str, Any] = {}
    for name in SECTIONS:
        section = getattr(cfg, name)
        values: dict[str, Any] = {}
        for f in dataclasses.fields(section):
            if f.metadata.get("extra"):
                values.update(_plain(getattr(section, f.name)))
            else:
                values[f.name] = _plain(getattr(section, f.name))
        out[name] = values
    return out


def to_yaml(cfg: Config) -> str:
    """The configuration as YAML text."""
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.create(to_dict(cfg)))


def config_diff(a: Mapping[str, Any], b: Mapping[str, Any], prefix: str = "") -> dict[str, tuple]:
    """``{dotted key: (value in a, value in b)}`` for every key whose values differ."""
    out: dict[str, tuple] = {}
    for key in sorted(set(a) | set(b), key=str):
        va, vb = a.get(key, "<absent>"), b.get(key, "<absent>")
        path = f"{prefix}{key}"
        if isinstance(va, Mapping) and isinstance(vb, Mapping):
            out.update(config_diff(va, vb, path + "."))
        elif va != vb:
            out[path] = (va, vb)
    return out


# ---------------------------------------------------------------------------------------------
# loading


def _yaml_error(source: str, err: Exception) -> ValueError:
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return ValueError(f"Malformed YAML in {source}{where}: {problem} (fix the syntax there)")


def _omegaconf_error(source: str, err: Exception) -> ValueError:
    first = str(err).splitlines()[0] if str(err) else type(err).__name__
    key = getattr(err, "full_key", None)
    where = f" ({key})" if key else ""
    return ValueError(f"Invalid configuration in {source}{where}: {first}")


def _load_file(path: str | Path) -> Any:
    import yaml
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    p = Path(path)
    if p.is_dir():
        raise ValueError(f"Invalid config file {p}: it is a folder (pass a YAML file)")
    if not p.is_file():
        raise FileNotFoundError(f"Config file not found: {p} (check the path)")
    try:
        node = OmegaConf.load(p)
    except yaml.YAMLError as err:
        raise _yaml_error(str(p), err) from None
    except OmegaConfBaseException as err:
        raise _omegaconf_error(str(p), err) from None
    from omegaconf import DictConfig

    if not isinstance(node, DictConfig):
        raise ValueError(f"Invalid config file {p}: expected a mapping of sections at the top")
    return node


_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


def _parse_overrides(overrides: Sequence[str]) -> Any:
    import yaml
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    for item in overrides:
        key, sep, _ = str(item).partition("=")
        if not sep:
            raise ValueError(
                f"Malformed override: {item!r} (expected key=value, e.g. optim.lr=0.1)"
            )
        if not _KEY.match(key.strip()):
            raise ValueError(f"Malformed override key: {key!r} in {item!r} (expected a.b=value)")
        if "." not in key:
            raise ValueError(
                f"Malformed override: {item!r} (a key names a section and a field, e.g. "
                f"run.max_steps=100; sections: {', '.join(SECTIONS)})"
            )
    try:
        return OmegaConf.from_dotlist([str(o) for o in overrides])
    except yaml.YAMLError as err:
        for item in overrides:  # name the override at fault rather than a line of the list
            try:
                OmegaConf.from_dotlist([str(item)])
            except yaml.YAMLError as one:
                problem = getattr(one, "problem", None) or str(one).splitlines()[0]
                raise ValueError(
                    f"Malformed override: {item!r} ({problem}; a value is YAML: close its "
                    "brackets, e.g. [1, 2], and quote text with special characters)"
                ) from None
        raise _yaml_error("the overrides", err) from None
    except OmegaConfBaseException as err:
        raise _omegaconf_error("the overrides", err) from None


def _defaults_node() -> Any:
    from omegaconf import OmegaConf

    return OmegaConf.create(to_dict(Config()))


def _merge(nodes: Sequence[tuple[str, Any]]) -> dict[str, Any]:
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    merged = _defaults_node()
    for source, node in nodes:
        for section in node:
            if section not in SECTIONS:
                raise _unknown(f"config section (in {source})", section, SECTIONS)
        try:
            merged = OmegaConf.merge(merged, node)
        except OmegaConfBaseException as err:
            raise _omegaconf_error(source, err) from None
    try:
        return OmegaConf.to_container(merged, resolve=True)
    except OmegaConfBaseException as err:
        raise _omegaconf_error("the configuration", err) from None


def load(files: Sequence[str | Path] = (), overrides: Sequence[str] = ()) -> Config:
    """Defaults, then each YAML file in order, then ``key=value`` overrides; keys and types
    checked (names and constructor arguments are checked by :func:`validate`)."""
    nodes = []
    for path in files:
        node = _load_file(path)
        if "variants" in node or "base" in node:
            raise ValueError(
                f"{path} is a comparison file (base + variants): run it with `valleys demo "
                f"--config {path}` or load it with valleys.train.config.load_variants"
            )
        nodes.append((str(path), node))
    if overrides:
        nodes.append(("the overrides", _parse_overrides(overrides)))
    return from_dict(_merge(nodes))


def load_variants(
    path: str | Path, overrides: Sequence[str] = (), only: Sequence[str] = ()
) -> dict[str, Config]:
    """The configurations of a comparison file: ``base`` merged with each variant, then the
    ``overrides``. ``only`` selects variants by name (in the file's order otherwise)."""
    from omegaconf import OmegaConf

    node = _load_file(path)
    for key in node:
        if key not in ("base", "variants"):
            raise _unknown(f"key of comparison file {path}", key, ("base", "variants"))
    variants = node.get("variants")
    if not variants:
        raise ValueError(f"Invalid comparison file {path}: it has no variants")
    names = [str(k) for k in variants]
    for name in only:
        if name not in names:
            raise _unknown(f"variant of {path}", name, names)
    base = node.get("base") or OmegaConf.create({})
    extra = [("the overrides", _parse_overrides(overrides))] if overrides else []
    out = {}
    for name in names:
        if only and name not in only:
            continue
        out[name] = from_dict(
            _merge([(f"{path} base", base), (f"{path} variant {name}", variants[name]), *extra])
        )
    return out


# ---------------------------------------------------------------------------------------------
# validation and resolution against the registries


def _signature_defaults(fn: Any, skip: Iterable[str]) -> tuple[dict[str, Any], bool]:
    """({keyword: default or REQUIRED}, takes **kwargs) of a callable."""
    params = inspect.signature(fn).parameters
    skip = set(skip)
    out = {}
    var_kw = False
    for p in params.values():
        if p.kind is p.VAR_KEYWORD:
            var_kw = True
        elif p.kind is not p.VAR_POSITIONAL and p.name not in skip:
            out[p.name] = p.default
    return out, var_kw


def _check_kwargs(
    what: str, prefix: str, given: Mapping[str, Any], accepted: Mapping[str, Any]
) -> dict:
    out = {}
    for key, value in given.items():
        if key not in accepted:
            if not accepted:
                raise ValueError(f"Unknown {what}: {key!r} (it takes none)")
            raise _unknown(what, key, accepted)
        out[key] = _like_default(f"{prefix}.{key}", value, accepted[key])
    return out


def _dataset_options(name: str) -> dict[str, Any]:
    """The dataset-specific keyword options of ``valleys.data.get(name, ...)`` (their
    defaults live in the dataset's loader, so they are not filled in here)."""
    from valleys import data

    entry = data._entry(name)  # the registry entry; raises the unknown-dataset error
    return {key: None for key in entry.options}


_PERCENT = re.compile(r"^\s*(\d+(\.\d*)?|\.\d+)\s*%\s*$")


def _is_percent(key: str, value: Any) -> bool:
    """``"50%"`` for a ``*_steps`` schedule argument: that share of ``total_steps``."""
    return (
        key.endswith("_steps")
        and key != "total_steps"
        and isinstance(value, str)
        and bool(_PERCENT.match(value))
    )


def _schedule_kwargs(name: str) -> dict[str, Any]:
    from valleys import schedules

    fn = schedules.get(name)
    accepted, _ = _signature_defaults(fn, ("step",))
    return accepted


def _check_compile_backend(name: Any) -> None:
    """A backend torch.compile knows (the list needs torch._dynamo: only with run.compile)."""
    import torch

    every = torch.compiler.list_backends(exclude_tags=())
    if name not in every:
        usual = sorted(set(torch.compiler.list_backends()) | ({"eager", "aot_eager"} & set(every)))
        check.choice("run.compile_backend", name, usual)


def validate(cfg: Config) -> Config:
    """Check every name against its registry and every key against the signature it feeds,
    without loading data or building anything large. Returns ``cfg`` with the flattened
    arguments coerced to the types of their defaults. Raises a one-line ``ValueError``."""
    from valleys import data, models, optim

    cfg = from_dict(to_dict(cfg))  # a copy: the caller's object is left as it is
    d, r = cfg.data, cfg.run
    if d.name not in data.names():
        raise check.unknown("dataset", d.name, data.names())
    d.options = _check_kwargs(
        f"option of dataset {d.name!r}", "data", d.options, _dataset_options(d.name)
    )
    if d.augment is not None:
        from valleys.data.loader import Augment

        accepted, _ = _signature_defaults(Augment.__init__, ("self",))
        d.augment = _check_kwargs("argument of data.augment", "data.augment", d.augment, accepted)
    check.count("data.batch_size", d.batch_size, 1)
    check.count("data.eval_batch_size", d.eval_batch_size, 1)
    check.choice("data.sampling", d.sampling, SAMPLING_MODES)

    entry = models.spec(cfg.model.name)
    cfg.model.kwargs = _check_kwargs(
        f"kwarg of model {cfg.model.name!r}", "model", cfg.model.kwargs, entry.kwargs()
    )

    ospec = optim.spec(cfg.optim.name)
    accepted = ospec.accepted(cfg.optim.hparams)
    cfg.optim.hparams = _check_kwargs(
        f"hyperparameter of optimizer {cfg.optim.name!r}", "optim", cfg.optim.hparams, accepted
    )
    s = cfg.schedule
    check.choice("schedule.progress", s.progress, PROGRESS_MODES)
    accepted = _schedule_kwargs(s.name)
    per_epoch = s.kwargs.get("steps_per_unit") == "epoch"
    percents = {k: v for k, v in s.kwargs.items() if _is_percent(k, v)}
    given = {
        k: v
        for k, v in s.kwargs.items()
        if k not in percents and not (per_epoch and k == "steps_per_unit")
    }
    s.kwargs = _check_kwargs(f"argument of schedule {s.name!r}", "schedule", given, accepted)
    for key in percents:
        if key not in accepted:
            raise _unknown(f"argument of schedule {s.name!r}", key, accepted)
    s.kwargs.update(percents)
    if per_epoch:
        s.kwargs["steps_per_unit"] = "epoch"
    missing = [
        k
        for k, v in accepted.items()
        if v is REQUIRED and k not in s.kwargs and k not in ("total_steps", "peak_lr", "lr")
    ]
    if missing:
        raise ValueError(
            f"Missing argument of schedule {s.name!r}: {', '.join(missing)} (set "
            + ", ".join(f"schedule.{m}=..." for m in missing)
            + ")"
        )
    if s.progress == "time" and r.max_seconds is None:
        raise ValueError(
            "Invalid schedule.progress: 'time' (it needs a time budget: set run.max_seconds)"
        )

    if r.max_steps is None and r.max_epochs is None and r.max_seconds is None:
        raise ValueError(
            "No budget: set run.max_steps, run.max_epochs or run.max_seconds (the run stops "
            "at the first one reached)"
        )
    if r.max_steps is not None:
        check.count("run.max_steps", r.max_steps, 1)
    if r.max_epochs is not None:
        check.positive("run.max_epochs", r.max_epochs)
    if r.max_seconds is not None:
        check.positive("run.max_seconds", r.max_seconds)
    if r.eval_every_steps is not None:
        check.count("run.eval_every_steps", r.eval_every_steps, 1)
    if r.eval_every_epochs is not None:
        check.positive("run.eval_every_epochs", r.eval_every_epochs)
    check.count("run.log_every_steps", r.log_every_steps, 1)
    if r.checkpoint_every_steps is not None:
        check.count("run.checkpoint_every_steps", r.checkpoint_every_steps, 1)
    check.count("run.bn_refresh_batch_size", r.bn_refresh_batch_size, 1)
    check.count("run.threads", r.threads, 0)
    check.count("run.seed", r.seed, 0)
    if r.ema_decay is not None:
        check.interval("run.ema_decay", r.ema_decay, 0.0, 1.0, high_open=True)
    if r.amp is False:  # YAML's `off`
        r.amp = None
    if r.amp is not None:
        check.choice("run.amp", r.amp, AMP_MODES)
    r.compile = check.flag("run.compile", r.compile)
    if r.compile:
        _check_compile_backend(r.compile_backend)
    if r.device != "auto" and not re.match(r"^(cpu|cuda|mps)(:\d+)?$", r.device):
        check.fail("run.device", r.device, "expected auto, cpu, cuda or cuda:<index>")
    if r.resume and not r.dir:
        raise ValueError("Invalid run.resume: true (it needs run.dir, the run to continue)")
    return cfg


def steps_per_epoch(num_train: int, batch_size: int, drop_last: bool = True) -> int:
    """Optimizer steps in one epoch: ``N // B`` (``ceil(N / B)`` without ``drop_last``)."""
    n = num_train // batch_size if drop_last else -(-num_train // batch_size)
    if n < 1:
        raise ValueError(
            f"Invalid data.batch_size: {batch_size} (larger than the {num_train} training "
            "samples; lower it or set data.drop_last=false)"
        )
    return n


def step_budget(cfg: Config, spe: int) -> int | None:
    """The number of optimizer steps the step/epoch budgets allow (None: time only)."""
    r = cfg.run
    budgets = []
    if r.max_steps is not None:
        budgets.append(int(r.max_steps))
    if r.max_epochs is not None:
        budgets.append(max(1, math.ceil(r.max_epochs * spe - 1e-9)))
    return min(budgets) if budgets else None


def resolve(cfg: Config, *, num_train: int) -> Config:
    """The configuration as it is run: every optimizer, model and schedule default filled in
    from the signatures, ``total_steps`` and ``steps_per_unit: epoch`` made concrete. Needs
    the training-set size ``num_train``. Validates first."""
    from valleys import models, optim

    cfg = validate(cfg)
    spe = steps_per_epoch(num_train, cfg.data.batch_size, cfg.data.drop_last)

    cfg.optim.hparams = _plain(
        {**optim.spec(cfg.optim.name).accepted(cfg.optim.hparams), **cfg.optim.hparams}
    )
    cfg.model.kwargs = _plain({**models.spec(cfg.model.name).kwargs(), **cfg.model.kwargs})

    s = cfg.schedule
    accepted = _schedule_kwargs(s.name)
    kw = dict(s.kwargs)
    if kw.get("steps_per_unit") == "epoch":
        kw["steps_per_unit"] = spe
    if "total_steps" in accepted and "total_steps" not in kw:
        if s.progress == "time":
            kw["total_steps"] = TIME_RESOLUTION_STEPS
        else:
            budget = step_budget(cfg, spe)
            if budget is None:
                raise ValueError(
                    f"Missing schedule.total_steps (schedule {s.name!r} with progress "
                    "'steps' and only a time budget: set schedule.total_steps, or "
                    "schedule.progress=time)"
                )
            kw["total_steps"] = budget
    for key, value in list(kw.items()):
        if _is_percent(key, value):
            if "total_steps" not in kw:
                raise ValueError(
                    f"Invalid schedule.{key}: {value!r} (a percentage needs total_steps, which "
                    f"schedule {s.name!r} does not take)"
                )
            share = float(value.strip().rstrip("%")) / 100.0
            kw[key] = round(share * kw["total_steps"])
    for key, default in accepted.items():
        if key not in kw and default is not REQUIRED:
            kw[key] = default
    s.kwargs = _plain(kw)
    _check_peak(cfg)
    return cfg


def _check_peak(cfg: Config) -> None:
    """The optimizer's lr is the schedule's peak: a different peak in the schedule section is
    an error rather than a silent rescaling."""
    lr = cfg.optim.hparams.get("lr")
    kw = cfg.schedule.kwargs
    name = cfg.schedule.name
    peak_key = {"constant": "lr", "step_decay": "lr", "piecewise": None}.get(name, "peak_lr")
    if name == "piecewise":
        values = kw.get("values") or []
        peak, label = (values[0] if values else None), "schedule.values[0]"
    else:
        peak, label = kw.get(peak_key), f"schedule.{peak_key}"
    if peak is None or lr is None:
        return
    if not math.isclose(float(peak), float(lr), rel_tol=1e-12):
        raise ValueError(
            f"Invalid {label}: {peak!r} (differs from optim.lr = {lr!r}; the optimizer's lr is "
            f"the schedule's peak: set {label} to it or leave it out)"
        )
