"""``valleys hessian``: the Hessian analysis subcommand (kept apart from :mod:`valleys.cli`,
which registers it, to keep that file short)."""

from __future__ import annotations

import argparse
from typing import Any

from valleys.cli import _add_data_arguments, _data_options, _print_analysis, _table

DESCRIPTION = (
    "Spectral diagnostics of the Hessian of the full loss (mean over the selected samples, "
    "eval mode, parameters only) of a trained run, from Hessian-vector products: the top-k "
    "eigenvalues by Lanczos (or power iteration), the trace by Hutchinson's estimator with "
    "a confidence interval, the spectral density by stochastic Lanczos quadrature, and for "
    "small models (--analysis dense) the dense Hessian and all its eigenvalues (Entropy-SGD's "
    "Fig. 1: --batches 128 --batch-size 32). Appends a record to RUN/landscape.jsonl and a "
    "histogram/density plot to RUN/plots/. Unset options take the library's defaults (k 1, "
    "tol 1e-6, 100 trace probes, 10 density probes of 60 Lanczos steps, chunks of 64 columns)."
)


def add_parser(sub: Any) -> None:
    """Register ``hessian`` on the subcommand parsers ``sub``."""
    p = sub.add_parser("hessian", help="Hessian eigenvalues, trace and density of a run")
    p.description = DESCRIPTION
    p.add_argument("path", metavar="RUN_OR_CHECKPOINT", help="run directory or checkpoint file")
    p.add_argument(
        "--analysis",
        action="append",
        choices=("top", "trace", "density", "dense"),
        help="an analysis to run (repeatable, run in order; default: top, trace and density)",
    )
    p.add_argument("-k", "--top-k", type=int, dest="k", help="top eigenvalues (default 1)")
    p.add_argument("--method", choices=("lanczos", "power"), help="top-k solver (lanczos)")
    p.add_argument("--tol", type=float, help="relative residual tolerance of top-k (1e-6)")
    p.add_argument("--iterations", type=int, help="most Lanczos steps / power iterations for top-k")
    p.add_argument("--trace-samples", type=int, help="Hutchinson probes (default 100)")
    p.add_argument("--density-probes", type=int, help="SLQ probes (default 10)")
    p.add_argument("--lanczos-steps", type=int, help="Lanczos steps per SLQ probe (60)")
    p.add_argument("--sigma", type=float, help="density broadening (default 1%% of the span)")
    p.add_argument("--chunk-size", type=int, help="dense: columns per batched product (64)")
    p.add_argument(
        "--dtype",
        choices=("float32", "float64"),
        help="dense: matrix precision (float64 up to 16,384 parameters, else float32)",
    )
    p.add_argument(
        "--no-cache",
        action="store_true",
        help="recompute each batch's forward pass for every product (less memory, slower)",
    )
    _add_data_arguments(p, "samples per batch (default: the run's data.eval_batch_size)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    """The ``hessian`` subcommand."""
    from valleys.bench.analyze_hessian import DEFAULT_ANALYSES, hessian

    out = hessian(
        args.path,
        analyses=args.analysis or DEFAULT_ANALYSES,
        k=args.k,
        method=args.method,
        tol=args.tol,
        iterations=args.iterations,
        trace_samples=args.trace_samples,
        density_probes=args.density_probes,
        lanczos_steps=args.lanczos_steps,
        sigma=args.sigma,
        chunk_size=args.chunk_size,
        dtype=args.dtype,
        cache=not args.no_cache,
        **_data_options(args),
    )
    record = out.record
    r = record["result"]
    data = record["data"]
    print(
        f"valleys hessian: {r['parameters']:,} parameters, {data['samples']} {data['split']} "
        f"samples in batches of {data['eval_batch_size']}; {record['seconds']:.1f} s"
    )
    rows = []
    if "top" in r:
        top = r["top"]
        values = ", ".join(f"{v:.6g}" for v in top["eigenvalues"])
        state = "converged" if top["converged"] else "NOT converged"
        rows.append(("top eigenvalues", values))
        rows.append(("", f"{top['method']}, {top['iterations']} iterations, {state}"))
    if "trace" in r:
        t = r["trace"]
        ci = f"{100 * t['confidence']:g}% CI {t['ci_low']:.6g} .. {t['ci_high']:.6g}"
        rows.append(("trace", f"{t['estimate']:.6g} ± {t['stderr']:.2g}  ({ci})"))
    if "density" in r:
        d = r["density"]
        m1, m2 = d["moments"]
        rows.append(("density", f"{len(d['nodes'])} nodes; tr(H)/n {m1:.4g}, tr(H²)/n {m2:.4g}"))
    if "dense" in r:
        s = r["dense"]
        rows.append(("spectrum", f"{s['min']:.6g} .. {s['max']:.6g}  ({s['dtype']})"))
        rows.append(("", f"{s['negative']:,} negative, {s['near_zero']:,} near zero"))
        rows.append(("eigenvalues", s["eigenvalues_file"]))
    print(_table(rows))
    _print_analysis(out)
