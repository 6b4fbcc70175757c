"""Plots and a markdown summary of finished (or running) runs, read from their metrics CSV; no W&B account needed.

A target is a run directory (a stage's ``--output_dir``), a ``metrics.csv`` file, a sweep spec
(``experiments/sweeps/*.yaml``) or a sweep directory (``<output_root>/<name>``). A run's curves come from Lightning's
``CSVLogger`` file, ``OUTPUT_DIR/csv/version_N/metrics.csv`` (the versions of a resumed run joined in order, a later
one winning a step both logged), its held-out start/end figures from ``final_metrics.json``. Written (matplotlib's
Agg backend, no display):

- one run: ``report.png``, a panel per curve of :data:`CURVES` the run logged (its train and val lines; a band of
  ± the batch's std where the stage logs one, e.g. ``train/rewards/std``), and ``report.md``, the first, last and
  best value of every plotted metric and ``final_metrics.json``'s table; in the run directory or ``--out``;
- several runs: each run's figure, plus ``overlay.png`` (a panel per curve and split, a line per run) and one
  ``report.md`` in ``--out`` (default: the runs' common parent directory);
- a sweep: ``report.png`` and ``report.md`` in the sweep directory: its cells grouped by grid values, each group's
  mean over seeds with a ± std band (sample std), and a table of the groups' last values.
"""

from __future__ import annotations

import csv
import json
import math
import os
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Curve:
    """One panel. ``keys``: the metric names that mean this curve, in order of preference (a preference stage logs
    reward margins and accuracies where an RL stage logs reward means and verifier accuracy); a run plots the first
    of its train keys and the first of its ``val/`` keys. A key ending in
    ``/mean`` gets a band from the same name ending in ``/std`` when that was logged. ``best``: ``min``, ``max`` or
    None (no better direction)."""

    title: str
    keys: tuple[str, ...]
    best: str | None = None


CURVES: tuple[Curve, ...] = (  # names of the README's "Metric schema", shared by the stages
    Curve("loss", ("train/loss", "val/loss"), "min"),
    Curve("reward", ("train/rewards/mean", "train/rewards/margins", "val/rewards/mean", "val/rewards/margins"), "max"),
    Curve("KL", ("train/distill/reverse_kl", "train/kl", "val/kl")),  # distillation: the reverse KL to the teacher
    Curve(
        "accuracy",
        (
            "train/rewards/accuracies",
            "train/token_accuracy",
            "val/accuracy",
            "val/rewards/accuracies",
            "val/token_accuracy",
        ),
        "max",
    ),
    Curve("online RM accuracy on fresh samples", ("train/online_rm/accuracy",), "max"),  # before it trains on them
    Curve("completion length", ("train/completions/mean_length", "val/completions/mean_length")),
    Curve("learning rate", ("train/lr", "lr", "lr-AdamW", "lr-Adam")),
    Curve("grad norm", ("train/grad_norm", "grad_norm", "grad_2.0_norm_total")),
)
SPLITS = ("train", "val")
NOT_METRICS = ("epoch", "step")


@dataclass
class Run:
    """A run's curves (``metrics[key][step] = value``) and ``final_metrics.json``; ``params``/``seed`` for cells."""

    name: str
    path: Path
    metrics: dict[str, dict[int, float]]
    final: dict[str, Any]
    csvs: list[Path] = field(default_factory=list)
    params: dict[str, Any] = field(default_factory=dict)
    seed: int | None = None


# ------------------------------------------------------------------------------------------------------ reading
def metrics_csvs(run_dir: Path) -> list[Path]:
    """The run's CSVLogger files, oldest version first (``csv/version_N/metrics.csv``, else any ``metrics.csv``)."""
    versions = sorted(run_dir.glob("csv/version_*/metrics.csv"), key=lambda p: _number(p.parent.name))
    if versions:
        return versions
    return sorted(p for p in run_dir.rglob("metrics.csv") if "wandb" not in p.relative_to(run_dir).parts)


def read_metrics(paths: list[Path]) -> dict[str, dict[int, float]]:
    """``{metric: {step: value}}`` from Lightning CSV files (a row per log call, empty cells for the rest)."""
    metrics: dict[str, dict[int, float]] = {}
    for path in paths:
        with path.open(newline="") as f:
            for row in csv.DictReader(f):
                if not row.get("step"):
                    continue
                step = int(float(row["step"]))
                for key, text in row.items():
                    if key in NOT_METRICS or key is None or text in ("", None):
                        continue
                    try:
                        metrics.setdefault(key, {})[step] = float(text)
                    except ValueError:
                        continue
    return {k: dict(sorted(v.items())) for k, v in metrics.items()}


def load_run(target: str | Path, name: str | None = None) -> Run:
    """A run from its directory or a ``metrics.csv`` (a FileNotFoundError when neither curves nor
    ``final_metrics.json`` are there)."""
    target = Path(target)
    if target.is_file():
        run_dir = target.parents[2] if target.parent.name.startswith("version_") else target.parent
        csvs = [target]
    elif target.is_dir():
        run_dir, csvs = target, metrics_csvs(target)
    else:
        raise FileNotFoundError(f"{target}: no such run directory or file")
    final = _read_json(run_dir / "final_metrics.json")
    if not csvs and not final:
        raise FileNotFoundError(f"{target}: neither a metrics CSV (csv/version_N/metrics.csv) nor final_metrics.json")
    return Run(name or run_dir.name, run_dir, read_metrics(csvs), final, csvs)


def sweep_runs(target: Any) -> tuple[str, Path, list[Run]]:
    """(name, directory, cells with any metrics) of a sweep: a ``SweepSpec``, a spec file or a sweep directory."""
    from lit_rlhf import sweep as sw

    if not isinstance(target, sw.SweepSpec):
        target = Path(target)
    if isinstance(target, sw.SweepSpec) or target.is_file():
        spec = target if isinstance(target, sw.SweepSpec) else sw.load_spec(target)
        cells = [(c.output_dir, c.params, c.seed) for c in sw.expand(spec)]
        name, sweep_dir = spec.name, spec.sweep_dir
    else:
        cells = []
        for d in sorted(target.glob("cell-*")):
            meta = _read_json(d / sw.CELL_FILE)
            cells.append((d, meta.get("params", {"cell": d.name}), meta.get("seed")))
        name, sweep_dir = target.name, target
    runs = []
    for out_dir, params, seed in cells:
        if out_dir.is_dir() and (metrics_csvs(out_dir) or (out_dir / "final_metrics.json").is_file()):
            run = load_run(out_dir)
            run.params, run.seed = params, seed
            runs.append(run)
    if not runs:
        raise FileNotFoundError(f"{target}: no cell of sweep {name!r} under {sweep_dir} has metrics yet")
    return name, sweep_dir, runs


def is_sweep(target: str | Path) -> bool:
    target = Path(target)
    if target.is_file():
        return target.suffix in (".yaml", ".yml")
    return target.is_dir() and any(target.glob("cell-*")) and not metrics_csvs_here(target)


def metrics_csvs_here(path: Path) -> bool:
    return any(path.glob("csv/version_*/metrics.csv")) or (path / "metrics.csv").is_file()


# ---------------------------------------------------------------------------------------------------- summaries
def split_of(key: str) -> str:
    return "val" if key.startswith("val/") else "train"


def pick(curve: Curve, split: str, metrics: dict[str, dict[int, float]]) -> str | None:
    """The first of ``curve.keys`` in ``split`` that the run logged."""
    return next((k for k in curve.keys if split_of(k) == split and metrics.get(k)), None)


def summary(series: dict[int, float], best: str | None) -> tuple[float, float, float | None]:
    """(first, last, best) of a curve; best is its min or max over finite values (None without a direction)."""
    values = list(series.values())
    finite = [v for v in values if math.isfinite(v)]
    chosen = (min if best == "min" else max)(finite) if best and finite else None
    return values[0], values[-1], chosen


def mean_std(runs_series: list[dict[int, float]]) -> tuple[list[int], list[float], list[float]]:
    """Steps (the union), the mean at each over the runs that logged it, and the sample std (0 below two)."""
    steps = sorted({s for series in runs_series for s in series})
    means, stds = [], []
    for s in steps:
        values = [series[s] for series in runs_series if s in series]
        means.append(statistics.fmean(values))
        stds.append(statistics.stdev(values) if len(values) > 1 else 0.0)
    return steps, means, stds


def run_markdown(run: Run) -> str:
    """A run's section: first/last/best of every plotted metric and final_metrics.json's start -> end table."""
    final = run.final
    facts = [f"`{run.path}`"] + [f"{k} {final[k]}" for k in ("stage", "global_step") if k in final]
    lines = [f"## {run.name}", "", " · ".join(facts), ""]
    rows = [(key, curve) for curve in CURVES for split in SPLITS if (key := pick(curve, split, run.metrics))]
    if rows:
        lines += ["| metric | first | last | best | points |", "|---|---|---|---|---|"]
        for key, curve in rows:
            first, last, best = summary(run.metrics[key], curve.best)
            best_text = f"{fmt(best)} ({curve.best})" if best is not None else "–"
            lines.append(f"| {key} | {fmt(first)} | {fmt(last)} | {best_text} | {len(run.metrics[key])} |")
    elif run.csvs:
        lines.append(f"No curves: {', '.join(map(str, run.csvs))} holds none of the metrics of lit_rlhf.report.CURVES.")
    else:
        lines.append(
            "No curves: no metrics CSV found (a run writes OUTPUT_DIR/csv/version_N/metrics.csv with its CSV "
            "logger on)."
        )
    start, end = final.get("start", {}), final.get("end", {})
    if start or end:
        lines += ["", "final_metrics.json (held-out, start -> end):", "", "| metric | start | end |", "|---|---|---|"]
        lines += [f"| {k} | {fmt(start.get(k))} | {fmt(end.get(k))} |" for k in sorted({*start, *end})]
    return "\n".join(lines) + "\n"


def fmt(value: Any) -> str:
    """Numbers in the markdown: 6 significant digits (``-`` for none)."""
    return "-" if value is None else f"{value:.6g}" if isinstance(value, (int, float)) else str(value)


# ------------------------------------------------------------------------------------------------------ figures
def _axes(n: int, title: str):
    from matplotlib.figure import Figure  # the object API: Agg canvas, no pyplot state, no display

    cols = min(3, n)
    rows = -(-n // cols)
    fig = Figure(figsize=(4.8 * cols, 3.3 * rows + 0.4), dpi=100, layout="constrained")
    axes = list(fig.subplots(rows, cols, squeeze=False).ravel())
    for ax in axes[n:]:
        ax.set_visible(False)
    fig.suptitle(title)
    return fig, axes[:n]


def _line(ax, steps, values, label: str, std=None, marker: bool = False) -> None:
    (line,) = ax.plot(steps, values, label=label, marker="o" if marker else None, markersize=3, linewidth=1.4)
    if std is not None and any(std):
        low = [v - s for v, s in zip(values, std)]
        high = [v + s for v, s in zip(values, std)]
        ax.fill_between(steps, low, high, color=line.get_color(), alpha=0.2, linewidth=0)


def _finish(ax, title: str) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.set_title(title, fontsize=10)
    ax.set_xlabel("step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def plot_run(run: Run, path: Path) -> Path | None:
    """``path``: a panel per curve the run logged, its train and val lines (None when it logged none)."""
    panels = [c for c in CURVES if any(pick(c, s, run.metrics) for s in SPLITS)]
    if not panels:
        return None
    final = run.final
    title = f"{run.name}" + (f" ({final['stage']}, {final.get('global_step', '?')} steps)" if "stage" in final else "")
    fig, axes = _axes(len(panels), title)
    for ax, curve in zip(axes, panels):
        for split in SPLITS:
            if key := pick(curve, split, run.metrics):
                series = run.metrics[key]
                band = run.metrics.get(key[: -len("/mean")] + "/std", {}) if key.endswith("/mean") else {}
                std = [band.get(s, 0.0) for s in series] if band else None
                label = key + (" ± std" if band else "")
                _line(ax, list(series), list(series.values()), label, std, marker=split == "val" or len(series) < 20)
        _finish(ax, curve.title)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def plot_groups(groups: list[tuple[str, list[Run]]], path: Path, title: str) -> Path | None:
    """``path``: a panel per curve and split; a line per group, the mean over its runs with a ± std band (one run:
    its own band where logged)."""
    panels = [(c, s) for c in CURVES for s in SPLITS if any(pick(c, s, r.metrics) for _, rs in groups for r in rs)]
    if not panels:
        return None
    fig, axes = _axes(len(panels), title)
    for ax, (curve, split) in zip(axes, panels):
        keys = set()
        for label, runs in groups:
            chosen = [(r, k) for r in runs if (k := pick(curve, split, r.metrics))]
            if not chosen:
                continue
            keys |= {k for _, k in chosen}
            if len(chosen) == 1:
                run, key = chosen[0]
                series = run.metrics[key]
                band = run.metrics.get(key[: -len("/mean")] + "/std", {}) if key.endswith("/mean") else {}
                steps, means, stds = list(series), list(series.values()), [band.get(s, 0.0) for s in series]
            else:
                steps, means, stds = mean_std([r.metrics[k] for r, k in chosen])
                label = f"{label} (n={len(chosen)})"
            _line(ax, steps, means, label, stds, marker=split == "val" or len(steps) < 20)
        ax.set_ylabel(" / ".join(sorted(keys)), fontsize=7)
        _finish(ax, f"{curve.title} ({split})")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


# ------------------------------------------------------------------------------------------------- the reports
def report_run(run: Run, out: Path | None = None) -> list[Path]:
    """``report.png`` and ``report.md`` of one run in ``out`` (default: the run directory)."""
    out = Path(out) if out else run.path
    out.mkdir(parents=True, exist_ok=True)
    png = plot_run(run, out / "report.png")
    md = out / "report.md"
    md.write_text(f"# Report: {run.name}\n\n" + ("![curves](report.png)\n\n" if png else "") + run_markdown(run))
    return [p for p in (png, md) if p]


def report_runs(runs: list[Run], out: Path | None = None) -> list[Path]:
    """Each run's figure (in its directory, or ``out/<name>.png``), ``overlay.png`` and one ``report.md`` in ``out``
    (default: the runs' common parent directory)."""
    out_dir = Path(out) if out else Path(os.path.commonpath([r.path.resolve() for r in runs]))
    written = []
    for run in runs:
        png = plot_run(run, out_dir / f"{run.name.replace('/', '_')}.png" if out else run.path / "report.png")
        written += [png] if png else []
    overlay = plot_groups([(r.name, [r]) for r in runs], out_dir / "overlay.png", f"{len(runs)} runs")
    md = out_dir / "report.md"
    header = f"# Report: {', '.join(r.name for r in runs)}\n\n" + ("![overlay](overlay.png)\n\n" if overlay else "")
    md.write_text(header + "\n".join(run_markdown(r) for r in runs))
    return [*written, *([overlay] if overlay else []), md]


def group_label(params: dict[str, Any]) -> str:
    """``beta=0.1, loss=ipo`` (the last part of each dotted key, unless two keys share it)."""
    tails = [k.rsplit(".", 1)[-1] for k in params]
    names = tails if len(set(tails)) == len(tails) else list(params)
    return ", ".join(f"{n}={v}" for n, v in zip(names, params.values())) or "all cells"


def report_sweep(target: Any, out: Path | None = None) -> list[Path]:
    """A sweep (spec, its path, or a sweep directory): ``report.png`` (cells grouped by grid values, mean ± std over
    seeds) and ``report.md`` (the groups' last values as mean ± std, then every cell) in the sweep directory."""
    name, sweep_dir, runs = sweep_runs(target)
    out = Path(out) if out else sweep_dir
    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(group_label(run.params), []).append(run)
    png = plot_groups(list(groups.items()), out / "report.png", f"sweep {name}: mean ± std over seeds")
    keys = [k for c in CURVES for s in SPLITS if (k := next((pick(c, s, r.metrics) for r in runs), None))]
    lines = [
        f"# Sweep report: {name}",
        "",
        *(["![curves](report.png)", ""] if png else []),
        "Last value of each curve, mean ± std (sample std) over a group's seeds:",
        "",
        "| group | seeds | " + " | ".join(keys) + " |",
        "|---|---|" + "---|" * len(keys),
    ]
    for label, members in groups.items():
        cells = []
        for key in keys:
            lasts = [list(r.metrics[key].values())[-1] for r in members if r.metrics.get(key)]
            cells.append(
                "-"
                if not lasts
                else fmt(lasts[0])
                if len(lasts) == 1
                else f"{fmt(statistics.fmean(lasts))} ± {fmt(statistics.stdev(lasts))}"
            )
        lines.append(f"| {label} | {len(members)} | " + " | ".join(cells) + " |")
    out.mkdir(parents=True, exist_ok=True)
    md = out / "report.md"
    md.write_text("\n".join(lines) + "\n\n" + "\n".join(run_markdown(r) for r in runs))
    return [p for p in (png, md) if p]


def report(targets: list[str | Path], out: str | Path | None = None) -> list[Path]:
    """Reports of ``targets`` (see the module docstring); returns the files written."""
    out = Path(out) if out else None
    written: list[Path] = []
    runs = []
    for target in targets:
        if is_sweep(target):
            written += report_sweep(target, out)
        else:
            runs.append(load_run(target))
    names = _unique_names([r.path for r in runs])
    for run, name in zip(runs, names):
        run.name = name
    if len(runs) == 1:
        written += report_run(runs[0], out)
    elif runs:
        written += report_runs(runs, out)
    return written


def _unique_names(paths: list[Path]) -> list[str]:
    """The shortest trailing path parts that tell the runs apart (``dpo``, or ``a/dpo`` and ``b/dpo``)."""
    for depth in range(1, 1 + max((len(p.resolve().parts) for p in paths), default=1)):
        names = ["/".join(p.resolve().parts[-depth:]) for p in paths]
        if len(set(names)) == len(names):
            return names
    return [str(p) for p in paths]


def _number(name: str) -> int:
    digits = name.rsplit("_", 1)[-1]
    return int(digits) if digits.isdigit() else -1


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
