"""The ``valleys`` command line. Each subcommand calls one library function.

Bad input ends with a one-line message on stderr and exit status 2, never a traceback; a
training run that diverges ends with a one-line message and exit status 1.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import NoReturn


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage block), like every other error of the CLI."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _table(rows: Sequence[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k.ljust(width)}  {v}" for k, v in rows)


def _cmd_demo(args: argparse.Namespace) -> None:
    from valleys.train import demo

    budget = "the file's" if args.epochs is None else f"{args.epochs:g}"
    print(
        f"digits, MLP 64-128-10, {budget} epochs of passes per optimizer "
        f"({args.config or demo.DEFAULT_CONFIG})",
        flush=True,
    )
    report = demo.run(
        args.optimizers or None,
        epochs=args.epochs,
        seed=args.seed,
        threads=args.threads,
        out=args.out,
        config=args.config,
        progress=lambda r: print(f"  done {r.optimizer} in {r.seconds:.1f}s", flush=True),
    )
    print()
    print(demo.format_table(report.results))
    print()
    print(f"runs:  {report.out}/<variant>  (metrics.jsonl, config.yaml, checkpoint.pt, tb/)")
    print(f"plots: {report.out}/plots/curves_vs_{{steps,epochs,passes,seconds}}.{{png,svg}}")


def _cmd_train(args: argparse.Namespace) -> None:
    from valleys.train import config, loop

    cfg = config.load(args.config or [], args.overrides)
    if args.dry_run:
        cfg = config.validate(cfg)
        print(config.to_yaml(cfg), end="")
        return
    result = loop.train(cfg)
    print(f"valleys train: {result.reason} reached")
    print(_table(result.summary()))


def _cmd_plot(args: argparse.Namespace) -> None:
    from pathlib import Path

    from valleys.bench import plots

    for run in args.runs:
        if not (Path(run) / "metrics.jsonl").is_file():
            raise FileNotFoundError(f"Not a run directory (no metrics.jsonl): {run}")
    written = plots.plot_runs(args.runs, args.out)
    folder = written[0].parent if written else args.out
    print(f"wrote {len(written)} files to {folder}")


def _cmd_list(args: argparse.Namespace) -> None:
    from valleys import data, models, optim, schedules

    print("optimizers:")
    for name in optim.names():
        print(f"  {name:<16} {optim.spec(name).summary}")
    print("models:")
    for name in models.names():
        print(f"  {name:<16} {models.spec(name).summary}")
    print("datasets:")
    for name in data.names():
        print(f"  {name:<16} {data.describe(name)}")
    print("schedules:")
    for name in schedules.names():
        print(f"  {name}")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``valleys`` command."""
    from valleys import __version__

    parser = _Parser(
        prog="valleys", description="Landscape-aware optimizers and loss-landscape diagnostics."
    )
    parser.add_argument("--version", action="version", version=f"valleys {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser(
        "train",
        help="train one configuration into a run directory",
        description=(
            "Train a configuration: code defaults, then each --config YAML file, then "
            "key=value overrides (e.g. optim.name=entropy_sgd optim.langevin_steps=5 "
            "run.max_epochs=5). Sections: data, model, optim, schedule, run."
        ),
    )
    p.add_argument(
        "--config", action="append", metavar="FILE", help="YAML file (repeatable, merged in order)"
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="check the configuration (names and keys) and print it, without training",
    )
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("plot", help="plot loss/metric curves of run directories")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run directories")
    p.add_argument("--out", help="output folder (default: the run directory, for one run)")
    p.set_defaults(func=_cmd_plot)

    p = sub.add_parser("demo", help="compare optimizers on scikit-learn's digits")
    p.add_argument("--epochs", type=float, default=None, help="epochs of passes per optimizer")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--threads", type=int, default=None, help="torch threads")
    p.add_argument("--out", help="folder for the runs (default: runs/demo-<time>)")
    p.add_argument("--config", help="comparison file (default: digits_compare.yaml)")
    p.add_argument("optimizers", nargs="*", help="variants of the comparison (default: all)")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("list", help="list optimizers, models, datasets and schedules")
    p.set_defaults(func=_cmd_list)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``valleys`` console script."""
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError) as err:
        message = " ".join(str(err).split("\n"))
        print(f"valleys {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except RuntimeError as err:
        from valleys.train.loop import TrainingError

        if not isinstance(err, TrainingError):
            raise
        print(f"valleys {args.command}: {err}", file=sys.stderr)
        return 1
    return 0
