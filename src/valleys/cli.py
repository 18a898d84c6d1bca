"""The ``valleys`` command line. Each subcommand calls one library function.

Bad input ends with a one-line message on stderr and exit status 2, never a traceback; a
training run that diverges ends with a one-line message and exit status 1.

Under ``torchrun`` (``WORLD_SIZE > 1``) ``valleys train`` runs data-parallel and the landscape
diagnostics (``hessian``, ``sharpness``, ``surface``) share out their batches (see
``docs/distributed.md``); only rank 0 prints and writes, and every rank exits with the same
status.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, NoReturn

if TYPE_CHECKING:
    from valleys.bench.analyze import Analysis


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
        if _main_rank():
            print(config.to_yaml(cfg), end="")
        return
    result = loop.train(cfg)
    if _main_rank():
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


def _print_analysis(out: Analysis) -> None:
    from pathlib import Path

    record, files = out.record, out.files
    run_dir = Path(record["checkpoint"]).parent
    print(f"appended record {record['index']} to {run_dir / 'landscape.jsonl'}")
    if files:
        stems = sorted({str(f.with_suffix("")) for f in files})
        suffixes = ",".join(sorted({f.suffix.lstrip(".") for f in files}))
        for stem in stems:
            print(f"plots: {stem}.{{{suffixes}}}")


def _data_options(args: argparse.Namespace) -> dict:
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    return {
        "split": args.split,
        "samples": args.samples,
        "batches": args.batches,
        "batch_size": args.batch_size,
        "seed": args.seed,
        "device": args.device,
        "progress": not args.no_progress,
        "plots": not args.no_plots,
    }


def _cmd_sharpness(args: argparse.Namespace) -> None:
    from valleys.bench import analyze

    out = analyze.sharpness(
        args.path,
        method=args.method,
        epsilon=args.epsilon,
        lr=args.lr,
        steps=args.steps,
        momentum=args.momentum,
        objective=args.objective,
        eval_every=args.eval_every,
        max_iterations=args.max_iterations,
        **_data_options(args),
    )
    r = out.record["result"]
    data = out.record["data"]
    print(
        f"valleys sharpness: {r['method']}, epsilon {r['epsilon']:g}, {r['steps']} "
        f"{'iterations' if r['method'] == 'lbfgsb' else 'steps'}, {data['samples']} "
        f"{data['split']} samples"
    )
    print(
        _table(
            [
                ("sharpness", f"{r['sharpness']:.6g}"),
                ("f(x)", f"{r['f0']:.6g}"),
                ("max f(x+z)", f"{r['fmax']:.6g}  (at {r['best_step']})"),
                ("final f(x+z)", f"{r['final']:.6g}"),
                ("full-loss evaluations", str(r["evaluations"])),
            ]
        )
    )
    _print_analysis(out)


def _cmd_surface(args: argparse.Namespace) -> None:
    from valleys.bench import analyze

    out = analyze.surface(
        args.path,
        dims=args.dims,
        points=args.points,
        span=args.range,
        to=args.to,
        buffers=args.buffers,
        normalization=args.normalization,
        ignore_bias_bn=False if args.include_bias_bn else None,
        **_data_options(args),
    )
    record = out.record
    loss = record["result"]["loss"]
    flat = [v for row in loss for v in (row if isinstance(row, list) else [row])]
    finite = [v for v in flat if v is not None]
    low = f"{min(finite):.6g}" if finite else "nan"
    high = f"{max(finite):.6g}" if finite else "nan"
    print(
        f"valleys surface: {record['mode']}, {len(flat)} points on "
        f"{record['data']['samples']} {record['data']['split']} samples; loss {low} .. {high}"
    )
    _print_analysis(out)


def _cmd_sweep(args: argparse.Namespace) -> int:
    from valleys.bench import report, sweep_exec

    result = sweep_exec.run(
        args.spec,
        full=args.full,
        out=args.out,
        workers=args.workers,
        threads=args.threads,
        overrides=args.overrides,
        only=args.only or (),
        ray=args.ray,
        analyses=not args.no_analyses,
        progress=not args.no_progress,
        dry_run=args.dry_run,
    )
    if args.dry_run:
        return 0
    states = ("done", "skipped", "diverged", "failed")
    counts = ", ".join(f"{result.count(s)} {s}" for s in states if result.count(s))
    print(f"valleys sweep: {counts or 'nothing to do'}; runs in {result.out}")
    if args.report:
        built = report.build(result.out)
        print(f"report: {built.markdown} and {built.html}")
    else:
        print(f"report: valleys report {result.out}")
    if result.failed:
        names = ", ".join(r["id"] for r in result.failed[:5])
        more = f" and {len(result.failed) - 5} more" if len(result.failed) > 5 else ""
        print(f"valleys sweep: {len(result.failed)} runs failed ({names}{more})", file=sys.stderr)
        return 1
    return 0


def _cmd_report(args: argparse.Namespace) -> None:
    from valleys.bench import report

    options = {
        "metric": args.metric,
        "times": args.times,
        "epochs": args.epochs,
        "effective_epochs": args.effective_epochs,
        "targets": args.target,
        "target_axis": args.target_axis,
    }
    built = report.build(args.sweep_dir, args.out, **{k: v for k, v in options.items() if v})
    print(f"valleys report: {built.markdown}, {built.html} ({len(built.figures)} figure files)")


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


def _add_data_arguments(p: argparse.ArgumentParser, batch_help: str) -> None:
    """The options every landscape analysis shares: which samples, batches, device."""
    p.add_argument(
        "--split", choices=("train", "test"), default="train", help="data split (default train)"
    )
    p.add_argument("--samples", type=int, help="use N samples of the split (seeded subset)")
    p.add_argument("--batches", type=int, help="use at most N batches' worth of samples")
    p.add_argument("--batch-size", type=int, help=batch_help)
    p.add_argument("--seed", type=int, default=0, help="subset, batches and directions (0)")
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda:1...")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-plots", action="store_true", help="write the record only")


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

    p = sub.add_parser(
        "sharpness",
        help="Keskar sharpness of a trained run",
        description=(
            "Keskar epsilon-sharpness 100 (max f(x+z) - f(x)) / (1 + f(x)) over the box "
            "|z_i| <= epsilon (|x_i| + 1), f the full loss on the run's training split (eval "
            "mode, parameters only), by projected gradient ascent or L-BFGS-B. Appends a record "
            "to RUN/landscape.jsonl and plots to RUN/plots/. Unset options take the library's "
            "defaults (epsilon 1e-4, lr 1e-3, 1000 steps, plain SGD, 10 L-BFGS-B iterations)."
        ),
    )
    p.add_argument("path", metavar="RUN_OR_CHECKPOINT", help="run directory or checkpoint file")
    p.add_argument("--method", choices=("ascent", "lbfgsb"), default="ascent")
    p.add_argument("--epsilon", type=float, help="relative box radius (default 1e-4)")
    p.add_argument("--lr", type=float, help="ascent learning rate (default 1e-3)")
    p.add_argument("--steps", type=int, help="ascent steps (default 1000)")
    p.add_argument("--momentum", type=float, help="momentum of the ascent SGD (default 0)")
    p.add_argument(
        "--objective",
        choices=("batch", "full"),
        help="what each ascent step climbs: a mini-batch loss (default) or the full loss",
    )
    p.add_argument(
        "--eval-every", type=int, help="full-loss evaluation every N ascent steps (batch)"
    )
    p.add_argument("--max-iterations", type=int, help="L-BFGS-B iterations (default 10)")
    _add_data_arguments(p, "mini-batch size of the ascent (default: the run's data.batch_size)")
    p.set_defaults(func=_cmd_sharpness)

    p = sub.add_parser(
        "surface",
        help="1-D/2-D loss surface or interpolation of a trained run",
        description=(
            "The loss along one (--dims 1) or two (--dims 2) filter-normalised random "
            "directions through the run's weights (Li et al. 2018), or with --to the linear "
            "interpolation from this run's weights (0) to another checkpoint's (1). Appends a "
            "record to RUN/landscape.jsonl and a curve or contour plot to RUN/plots/."
        ),
    )
    p.add_argument("path", metavar="RUN_OR_CHECKPOINT", help="run directory or checkpoint file")
    p.add_argument("--dims", type=int, choices=(1, 2), default=1)
    p.add_argument("--points", type=int, default=21, help="grid points per axis (default 21)")
    p.add_argument(
        "--range",
        type=float,
        nargs=2,
        metavar=("LOW", "HIGH"),
        help="coordinate range per axis (default -1 1; -0.5 1.5 with --to)",
    )
    p.add_argument("--to", metavar="OTHER", help="interpolate to this run directory/checkpoint")
    p.add_argument(
        "--buffers",
        choices=("nearest", "start", "end", "interpolate"),
        help="BatchNorm statistics along an interpolation (default nearest)",
    )
    p.add_argument(
        "--normalization",
        choices=("filter", "layer", "none"),
        help="direction normalisation (default filter)",
    )
    p.add_argument(
        "--include-bias-bn",
        action="store_true",
        help="give biases and BatchNorm parameters a direction (their own values, as Li et al.)",
    )
    _add_data_arguments(p, "evaluation batch size (default: the run's data.eval_batch_size)")
    p.set_defaults(func=_cmd_surface)

    from valleys.cli_hessian import add_parser as add_hessian_parser

    add_hessian_parser(sub)

    p = sub.add_parser(
        "sweep",
        help="run a sweep (optimizers x grid x seeds x budgets) in parallel, resumably",
        description=(
            "Expand a sweep file (configs/sweeps/*.yaml) into runs under runs/sweeps/<name> and "
            "train them in worker processes; complete runs are skipped and interrupted ones "
            "resumed, so the same command continues a sweep. key=value items override every run."
        ),
    )
    p.add_argument("spec", metavar="SWEEP_FILE", help="sweep file (e.g. configs/sweeps/knee.yaml)")
    p.add_argument("--full", action="store_true", help="the file's full (paper, GPU) scale")
    p.add_argument("--out", help="sweep folder (default runs/sweeps/<name>[-full])")
    p.add_argument("--workers", type=int, help="parallel runs (default: cores / threads)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run (default 1)")
    p.add_argument(
        "--only", action="append", metavar="GLOB", help="runs whose name matches (repeatable)"
    )
    p.add_argument("--ray", metavar="ADDRESS", help="run on a Ray cluster (auto, host:port)")
    p.add_argument("--no-analyses", action="store_true", help="skip the file's analyses")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--dry-run", action="store_true", help="list the runs and their state")
    p.add_argument("--report", action="store_true", help="write the report afterwards")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.set_defaults(func=_cmd_sweep)

    p = sub.add_parser(
        "report",
        help="tables, figures and an HTML page of a sweep folder",
        description=(
            "Mean ± std and 95% CI over seeds of the metric after T seconds, N epochs and N "
            "effective epochs, the best and final metric, the time to a target, sharpness; "
            "curves with seed bands, histograms, schedules, performance profiles. Options "
            "default to the sweep file's report: section."
        ),
    )
    p.add_argument("sweep_dir", metavar="SWEEP_DIR", help="folder written by valleys sweep")
    p.add_argument("--out", help="output folder (default SWEEP_DIR/report)")
    p.add_argument("--metric", help="e.g. test_accuracy, test_loss, test_mse")
    p.add_argument("--times", type=float, nargs="+", metavar="S", help="training seconds")
    p.add_argument("--epochs", type=float, nargs="+", metavar="N", help="epochs")
    p.add_argument("--effective-epochs", type=float, nargs="+", metavar="N", help="passes")
    p.add_argument("--target", type=float, help="target metric for time-to-target")
    p.add_argument("--target-axis", choices=("seconds", "epochs", "effective_epochs", "steps"))
    p.set_defaults(func=_cmd_report)

    p = sub.add_parser("list", help="list optimizers, models, datasets and schedules")
    p.set_defaults(func=_cmd_list)
    return parser


#: the subcommands that run under torchrun: training (data-parallel) and the landscape
#: diagnostics (each rank evaluates its share of the batches; rank 0 writes)
PARALLEL_COMMANDS = ("train", "hessian", "sharpness", "surface")


def _main_rank() -> bool:
    """Whether this process prints: rank 0 of a torchrun launch, or the only process."""
    return os.environ.get("RANK", "0") in ("", "0")


def _error(message: str) -> None:
    if _main_rank():  # the other ranks of a launch fail alike, silently
        print(message, file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``valleys`` console script."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        # argparse hands back the key=value items that follow an option (`valleys train
        # --config a.yaml optim.lr=0.1`) as unknown: they are overrides like those before it
        if args.command in ("train", "sweep") and not any(i.startswith("-") for i in extra):
            args.overrides = [*args.overrides, *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    world = os.environ.get("WORLD_SIZE", "1")
    if args.command not in PARALLEL_COMMANDS and world not in ("", "0", "1"):
        _error(
            f"valleys {args.command}: error: runs in one process, but WORLD_SIZE={world} "
            f"(under torchrun only {', '.join(PARALLEL_COMMANDS)} run; start this one with "
            "`valleys` or `python -m valleys`)"
        )
        return 2
    quiet = not _main_rank() and args.command != "train"  # train silences its own ranks
    try:
        with contextlib.redirect_stdout(io.StringIO()) if quiet else contextlib.nullcontext():
            code = args.func(args)
    except (ValueError, FileNotFoundError) as err:
        message = " ".join(str(err).split("\n"))
        _error(f"valleys {args.command}: error: {message}")
        return 2
    except OSError as err:  # the system refused a file operation: permissions, disk full...
        what = f"{err.strerror}: {err.filename}" if err.strerror and err.filename else str(err)
        _error(
            f"valleys {args.command}: error: {what} (check the path, its permissions and the "
            "free space)"
        )
        return 2
    except KeyboardInterrupt:
        _error("interrupted")
        return 130
    except RuntimeError as err:
        from valleys.train.loop import TrainingError

        if not isinstance(err, TrainingError):
            raise
        _error(f"valleys {args.command}: {err}")
        return 1
    return int(code or 0)
