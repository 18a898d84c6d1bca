"""The ``valleys`` command line. Each subcommand calls one library function.

Bad input ends with a one-line message on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _cmd_demo(args: argparse.Namespace) -> None:
    import torch

    from valleys.train import demo

    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"digits, 64-128-10 MLP, {args.epochs:g} epochs of passes per optimizer", flush=True)
    results = demo.run(
        args.optimizers or None,
        epochs=args.epochs,
        seed=args.seed,
        progress=lambda r: print(f"  done {r.optimizer} in {r.seconds:.1f}s", flush=True),
    )
    print()
    print(demo.format_table(results))


def _cmd_list(args: argparse.Namespace) -> None:
    from valleys import optim, schedules

    print("optimizers:")
    for name in optim.names():
        print(f"  {name:<12} {optim.spec(name).summary}")
    print("schedules:")
    for name in schedules.names():
        print(f"  {name}")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``valleys`` command."""
    from valleys import __version__

    parser = argparse.ArgumentParser(
        prog="valleys", description="Landscape-aware optimizers and loss-landscape diagnostics."
    )
    parser.add_argument("--version", action="version", version=f"valleys {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="compare every optimizer on scikit-learn's digits")
    p.add_argument("--epochs", type=float, default=30.0, help="passes over the data per run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("optimizers", nargs="*", help="registry names (default: all)")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("list", help="list optimizers and schedules")
    p.set_defaults(func=_cmd_list)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``valleys`` console script."""
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"valleys {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0
