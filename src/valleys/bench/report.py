"""The report of a sweep: markdown and a self-contained HTML page with the tables and figures,
and ``summary.json`` with every number, built from the sweep folder alone (``valleys report
SWEEP_DIR``; nothing is retrained).

Per task (and budget): the metric after each time / epoch / effective-epoch budget asked for
(mean ± std over seeds, the 95 % CI half-width in brackets, the epochs reached in
parentheses), the final and best metric, the time to the target, the sharpness and top Hessian
eigenvalue of the final models where analyses recorded them; curves with seed bands against
seconds, epochs and effective epochs; histograms across seeds; the learning-rate schedules.
Across tasks: performance profiles (Dolan & Moré 2002, as AlgoPerf). Last, the machines and
versions the runs recorded in ``env.json``.

Options come from the sweep file's ``report:`` section (kept in ``sweep.json``), overridden by
arguments: ``metric``, ``times`` (seconds), ``epochs``, ``effective_epochs`` (each a list, or
``{task: list}`` with an optional ``default``), ``targets`` (one number, or ``{task: number}``)
and ``target_axis`` (``seconds``, ``epochs``, ``effective_epochs``).
"""

from __future__ import annotations

import html
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from valleys.bench import plots
from valleys.bench import tables as T

__all__ = ["Report", "build"]

OPTIONS = ("metric", "times", "epochs", "effective_epochs", "targets", "target_axis")


@dataclass
class Report:
    """The files written and the numbers behind them."""

    dir: Path
    markdown: Path
    html: Path
    summary: dict[str, Any]
    figures: list[Path]


def _fmt(value: float, metric: str) -> str:
    if value is None or not math.isfinite(value):
        return "—"
    if "accuracy" in metric:
        return f"{100 * value:.2f}"
    return f"{value:.4g}"


def _cell(s: T.Stat, metric: str, extra: str = "") -> str:
    if s.n == 0:
        return "diverged" if s.diverged else "—"
    text = _fmt(s.mean, metric)
    if s.n > 1:
        text += f" ± {_fmt(s.std, metric)} [±{_fmt(s.ci95, metric)}]"
    if extra:
        text += f" {extra}"
    if s.diverged:
        text += f" ({s.diverged} diverged)"
    if s.missing:
        text += f" ({s.missing} n/a)"
    return text


def _slug(*parts: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", "-".join(p for p in parts if p)) or "sweep"


def _options(sweep: T.Sweep, given: dict[str, Any]) -> dict[str, Any]:
    opts = {k: v for k, v in (sweep.manifest.get("report") or {}).items() if k in OPTIONS}
    opts.update({k: v for k, v in given.items() if v is not None})
    for key in ("times", "epochs", "effective_epochs"):
        value = opts.get(key) or []
        if isinstance(value, dict):  # per task, with an optional "default"
            opts[key] = {str(k): [float(v) for v in vs or []] for k, vs in value.items()}
        else:
            opts[key] = [float(v) for v in value]
    opts.setdefault("target_axis", "seconds")
    return opts


def _points(opts: dict[str, Any], key: str, task: str) -> list[float]:
    value = opts[key]
    return value.get(task, value.get("default", [])) if isinstance(value, dict) else value


def _target(opts: dict[str, Any], task: str) -> float | None:
    targets = opts.get("targets")
    value = targets.get(task, targets.get("default")) if isinstance(targets, dict) else targets
    return None if value is None else float(value)


def _metric(opts: dict[str, Any], runs: Sequence[T.RunData]) -> str:
    if opts.get("metric"):
        return str(opts["metric"])
    kinds = {r.task_kind for r in runs}
    return "test_mse" if kinds == {"regression"} else "test_accuracy"


def _group_section(key, runs, opts, fig_dir, formats) -> tuple[list, dict, list[Path]]:
    """Blocks, numbers and figures of one (task, budget)."""
    task, budget, _ = key
    metric = _metric(opts, [r for rs in runs.values() for r in rs])
    title = " / ".join(p for p in (task, budget) if p)
    blocks: list[tuple] = [("h", 2, f"Task {title}" if title else "Results")]
    title = title or "all runs"
    up = T.higher_is_better(metric)
    unit = " (%)" if "accuracy" in metric else ""
    blocks.append(
        (
            "p",
            f"Metric: {metric}{unit}, {'higher' if up else 'lower'} is better. Cells: mean ± "
            "std over seeds [95 % CI half-width, t-distribution]; (e) epochs reached.",
        )
    )
    numbers: dict[str, Any] = {}
    budgets = [("seconds", x, f"after {x:g} s") for x in _points(opts, "times", task)]
    budgets += [("epochs", x, f"after {x:g} epochs") for x in _points(opts, "epochs", task)]
    budgets += [
        ("effective_epochs", x, f"after {x:g} eff. epochs")
        for x in _points(opts, "effective_epochs", task)
    ]
    target = _target(opts, task)
    axis = opts["target_axis"]
    if budgets:
        rows = []
        for label, rs in runs.items():
            row = [label]
            for ax, x, name in budgets:
                vals = [T.value_at(r, metric, ax, x) for r in rs]
                s = T.stat(None if v is None else v[0] for v in vals)
                ep = T.stat(
                    None if (v := T.value_at(r, "epoch", ax, x)) is None else v[0] for r in rs
                )
                extra = f"({ep.mean:.3g} e)" if ep.n and ax != "epochs" else ""
                row.append(_cell(s, metric, extra))
                numbers.setdefault(label, {})[name] = s.to_dict()
            rows.append(row)
        blocks.append(("table", ["configuration", *(b[2] for b in budgets)], rows))
    rows = []
    for label, rs in runs.items():
        fin = T.stat(T.final(r, metric) for r in rs)
        bst = T.stat(T.best(r, metric) for r in rs)
        ep = T.stat(r.end.get("epoch") if r.end else None for r in rs)
        eff = T.stat(r.end.get("effective_epochs") if r.end else None for r in rs)
        secs = T.stat(r.end.get("train_time_s") if r.end else None for r in rs)
        sharp = T.stat(T.sharpness(r) for r in rs)
        lam = T.stat(T.top_eigenvalue(r) for r in rs)
        row = [
            label,
            f"{sum(r.complete for r in rs)}/{len(rs)}",
            _cell(fin, metric),
            _cell(bst, metric),
        ]
        entry = numbers.setdefault(label, {})
        if target is not None:
            ttt = [T.time_to_target(r, metric, target, axis) for r in rs]
            tt = T.stat(ttt)
            row.append(f"{_cell(T.Stat(tt.n, tt.mean, tt.std, tt.ci95), 'x')} ({tt.n}/{len(rs)})")
            entry["time_to_target"] = tt.to_dict()
        row += [f"{ep.mean:.3g}", f"{eff.mean:.3g}", f"{secs.mean:.3g}"]
        row += [_cell(sharp, "x") if sharp.n else "—", _cell(lam, "x") if lam.n else "—"]
        rows.append(row)
        entry.update(
            final=fin.to_dict(),
            best=bst.to_dict(),
            epochs=ep.to_dict(),
            effective_epochs=eff.to_dict(),
            train_time_s=secs.to_dict(),
            sharpness=sharp.to_dict(),
            top_eigenvalue=lam.to_dict(),
            seeds=[r.seed for r in rs],
            diverged=sum(r.diverged for r in rs),
        )
    header = ["configuration", "runs", "final", "best"]
    if target is not None:
        header.append(f"{T.AXES[axis][2]} to {_fmt(target, metric)}")
    header += ["epochs", "eff. epochs", "train s", "sharpness", "λ_max"]
    blocks.append(("table", header, rows))

    figures: list[Path] = []
    slug = _slug(task, budget)
    for ax in ("seconds", "epochs", "effective_epochs"):
        key_, _, xlabel = T.AXES[ax]
        files = plots.plot_bands(
            runs,
            fig_dir / f"{slug}-curves-vs-{ax}",
            x=key_,
            xlabel=xlabel,
            metric=metric,
            title=title,
            formats=formats,
        )
        figures += files
        blocks.append(
            ("fig", files, f"Train loss and {metric} against {xlabel} (mean ± std over seeds)")
        )
    hists = [
        ("final", metric, {k: [T.final(r, metric) for r in rs] for k, rs in runs.items()}),
        (
            "sharpness",
            "Keskar sharpness",
            {k: [T.sharpness(r) for r in rs] for k, rs in runs.items()},
        ),
        (
            "hessian",
            "top Hessian eigenvalue",
            {k: [T.top_eigenvalue(r) for r in rs] for k, rs in runs.items()},
        ),
    ]
    for name, xlabel, values in hists:
        counts = [sum(v is not None and np.isfinite(v) for v in vs) for vs in values.values()]
        if any(c >= 2 for c in counts) or (name != "final" and any(counts)):
            files = plots.plot_histograms(
                values, fig_dir / f"{slug}-hist-{name}", xlabel=xlabel, title=title, formats=formats
            )
            figures += files
            blocks.append(("fig", files, f"{xlabel} of the final models across seeds"))
    sched = {
        k: ([t["epoch"] for t in rs[0].trains], [t["lr"] for t in rs[0].trains])
        for k, rs in runs.items()
        if rs[0].trains
    }
    if any(len(set(lrs)) > 1 for _, lrs in sched.values()):
        files = plots.plot_schedules(
            sched, fig_dir / f"{slug}-schedules", title=title, formats=formats
        )
        figures += files
        blocks.append(("fig", files, "Learning rate against epochs (first seed)"))
    return blocks, {"metric": metric, "configurations": numbers}, figures


def _profile(sweep, groups, opts, fig_dir, formats) -> tuple[list, dict, list[Path]]:
    """Performance profiles over the (task, budget) problems, per optimizer (its best
    configuration on each problem)."""
    costs: dict[str, dict[str, float]] = {}
    kind = {}
    for (task, budget, label), rs in groups.items():
        metric = _metric(opts, rs)
        problem = _slug(task, budget)
        target = _target(opts, task)
        if target is not None:
            values = [T.time_to_target(r, metric, target, opts["target_axis"]) for r in rs]
            cost = float(np.median([math.inf if v is None else v for v in values]))
            kind[problem] = "time to target"
        else:
            values = [T.final(r, metric) for r in rs]
            bad = [
                math.inf
                if v is None or not math.isfinite(v)
                else (1 - v if T.higher_is_better(metric) else v)
                for v in values
            ]
            cost = float(np.mean(bad))
            kind[problem] = "final error" if T.higher_is_better(metric) else "final " + metric
        method = rs[0].optimizer or label
        costs.setdefault(method, {})
        costs[method][problem] = min(costs[method].get(problem, math.inf), cost)
    ratios = []
    for problem in {p for c in costs.values() for p in c}:
        finite = [c[problem] for c in costs.values() if math.isfinite(c.get(problem, math.inf))]
        if finite and min(finite) > 0:
            ratios += [v / min(finite) for v in finite]
    top = max([10.0, *(1.1 * r for r in ratios)])
    taus = list(np.logspace(0, math.log10(top), 200))
    profile = T.performance_profile(costs, taus)
    files = plots.plot_profile(
        taus, profile, fig_dir / "performance-profile", title="performance profile", formats=formats
    )
    blocks = [
        ("h", 2, "Performance profile across tasks"),
        (
            "p",
            "Fraction of problems (task × budget) on which each optimizer, with its best "
            "configuration there, is within a factor τ of the best optimizer; cost: "
            + ", ".join(sorted(set(kind.values())))
            + " (median/mean over seeds).",
        ),
        (
            "table",
            ["optimizer", "τ = 1 (best)", "τ = 2", "τ = 10"],
            [
                [m, *(f"{np.interp(t, taus, profile[m]):.2f}" for t in (1.0, 2.0, 10.0))]
                for m in profile
            ],
        ),
        ("fig", files, "Performance profiles"),
    ]
    return blocks, {"costs": costs, "taus": taus, "profile": profile}, files


def _machines(sweep: T.Sweep) -> tuple[list, list]:
    seen: dict[tuple, int] = {}
    for r in sweep.runs:
        e, v = r.env, r.env.get("versions", {})
        device = e.get("device", "?")
        hw = (e.get("cuda") or {}).get("name") or e.get("cpu") or "?"
        if e.get("cores"):
            hw += f", {e['cores']} cores"
        git = e.get("git") or {}
        commit = (git.get("commit") or "?")[:10] + (" (dirty)" if git.get("dirty") else "")
        row = (
            device,
            hw,
            str(e.get("threads", "?")),
            e.get("platform", "?"),
            v.get("python", "?"),
            v.get("torch", "?"),
            v.get("valleys", "?"),
            commit,
        )
        seen[row] = seen.get(row, 0) + 1
    header = [
        "device",
        "hardware",
        "threads",
        "platform",
        "python",
        "torch",
        "valleys",
        "git",
        "runs",
    ]
    rows = [[*row, str(n)] for row, n in seen.items()]
    return [("h", 2, "Machines and versions"), ("table", header, rows)], [
        dict(zip(header, r, strict=True)) for r in rows
    ]


# ---------------------------------------------------------------------------------------------
# rendering


def _markdown(blocks: list[tuple], out: Path) -> str:
    lines: list[str] = []
    for block in blocks:
        if block[0] == "h":
            lines += ["#" * block[1] + " " + block[2], ""]
        elif block[0] == "p":
            lines += [block[1], ""]
        elif block[0] == "table":
            header, rows = block[1], block[2]
            lines.append("| " + " | ".join(header) + " |")
            lines.append("|" + "|".join("---" for _ in header) + "|")
            lines += [
                "| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows
            ]
            lines.append("")
        elif block[0] == "fig":
            png = [f for f in block[1] if f.suffix == ".png"] or block[1]
            if png:
                lines += [f"![{block[2]}]({png[0].relative_to(out).as_posix()})", ""]
    return "\n".join(lines)


def _svg_inline(path: Path) -> str:
    text = path.read_text()
    start = text.find("<svg")
    return text[start:] if start >= 0 else ""


def _html(blocks: list[tuple], out: Path, title: str) -> str:
    parts = [
        "<!DOCTYPE html>",
        f"<html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
        "<style>body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em}"
        "table{border-collapse:collapse;margin:1em 0;font-size:0.9em}"
        "td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}"
        "th{background:#f3f3f3}figure{margin:1em 0}svg{max-width:100%;height:auto}"
        "figcaption{font-size:0.85em;color:#555}</style></head><body>",
    ]
    for block in blocks:
        if block[0] == "h":
            parts.append(f"<h{block[1]}>{html.escape(block[2])}</h{block[1]}>")
        elif block[0] == "p":
            parts.append(f"<p>{html.escape(block[1])}</p>")
        elif block[0] == "table":
            head = "".join(f"<th>{html.escape(str(h))}</th>" for h in block[1])
            body = "".join(
                "<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>"
                for row in block[2]
            )
            parts.append(f"<table><tr>{head}</tr>{body}</table>")
        elif block[0] == "fig":
            svg = [f for f in block[1] if f.suffix == ".svg"]
            png = [f for f in block[1] if f.suffix == ".png"]
            if svg:
                content = _svg_inline(svg[0])
            elif png:
                content = f"<img src='{png[0].relative_to(out).as_posix()}' style='max-width:100%'>"
            else:
                continue
            parts.append(
                f"<figure>{content}<figcaption>{html.escape(block[2])}</figcaption></figure>"
            )
    parts.append("</body></html>")
    return "\n".join(parts)


def build(
    sweep_dir: str | Path,
    out: str | Path | None = None,
    *,
    formats: Sequence[str] = ("png", "svg"),
    **options: Any,
) -> Report:
    """Write the report of the sweep folder ``sweep_dir`` into ``out`` (default
    ``<sweep_dir>/report``): ``report.md``, ``report.html`` (figures embedded as SVG),
    ``summary.json`` and ``figures/``. ``options`` (see the module docstring) override the
    sweep file's ``report:`` section."""
    from valleys.train.checkpoint import write_atomic

    for key in options:
        if key not in OPTIONS:
            from valleys import _validate as check

            raise check.unknown("report option", key, OPTIONS)
    sweep = T.load_sweep(sweep_dir)
    if not sweep.runs:
        raise ValueError(
            f"No finished or started runs in {sweep.dir} ({len(sweep.missing)} missing): run "
            "the sweep first"
        )
    opts = _options(sweep, options)
    if opts["target_axis"] not in T.AXES:
        from valleys import _validate as check

        check.choice("target_axis", opts["target_axis"], T.AXES)
    out = Path(out) if out is not None else sweep.dir / "report"
    fig_dir = out / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    m = sweep.manifest
    name = m.get("name", sweep.dir.name)
    blocks: list[tuple] = [("h", 1, f"Sweep {name}" + (" (full scale)" if m.get("full") else ""))]
    if m.get("description"):
        blocks.append(("p", m["description"]))
    complete = sum(r.complete for r in sweep.runs)
    diverged = sum(r.diverged for r in sweep.runs)
    blocks.append(
        (
            "p",
            f"Spec: {m.get('spec_file', '?')}; command: {m.get('command') or '?'}. Runs: "
            f"{len(m.get('runs', []))} in the sweep, {complete} complete ({diverged} diverged), "
            f"{len(sweep.runs) - complete} unfinished, {len(sweep.missing)} not started.",
        )
    )
    notes = sorted({r.get("note") for r in m.get("runs", []) if r.get("note")})
    for note in notes:
        blocks.append(("p", f"Note: {note}."))
    summary: dict[str, Any] = {"name": name, "sweep": str(sweep.dir), "options": opts, "groups": {}}
    figures: list[Path] = []
    tasks: dict[tuple[str, str], dict[str, list[T.RunData]]] = {}
    groups = sweep.groups()
    for (task, budget, label), rs in groups.items():
        tasks.setdefault((task, budget), {})[label] = rs
    for (task, budget), runs in tasks.items():
        b, numbers, files = _group_section((task, budget, ""), runs, opts, fig_dir, formats)
        blocks += b
        figures += files
        summary["groups"][_slug(task, budget)] = numbers
    if len(tasks) > 1:
        b, numbers, files = _profile(sweep, groups, opts, fig_dir, formats)
        blocks += b
        figures += files
        summary["profile"] = numbers
    b, machines = _machines(sweep)
    blocks += b
    summary["machines"] = machines
    md = out / "report.md"
    page = out / "report.html"
    text = _markdown(blocks, out)
    write_atomic(md, lambda f: f.write(text.encode()))
    page_text = _html(blocks, out, f"Sweep {name}")
    write_atomic(page, lambda f: f.write(page_text.encode()))
    payload = json.dumps(summary, indent=1, default=lambda v: None) + "\n"
    write_atomic(out / "summary.json", lambda f: f.write(payload.encode()))
    return Report(out, md, page, summary, figures)
