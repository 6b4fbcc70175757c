"""The paradigm comparison (DeepSeekMath, Shao et al. 2024, §5.2, Figure 5): held-out greedy accuracy against the
number of sampled completions for RFT, Online RFT and the GRPO variants, mean ± std over seeds.

    python -m lit_rlhf.experiments.paradigm collect runs/pipelines/paradigm-smollm2/seed-0 \\
        runs/pipelines/paradigm-smollm2/seed-1 --out docs/paradigm

Each RUN_DIR is one pipeline run (one seed) of ``experiments/paradigm/*.yaml``: a directory per method step, each a
stage run read with :mod:`lit_rlhf.report`'s readers (``final_metrics.json``, ``csv/version_N/metrics.csv``) and its
``config.yaml``. A step of another stage (e.g. a PRM trained in the pipeline) is left out; a step without
``final_metrics.json`` or without a start and end ``val/accuracy`` is refused, naming its directory.

Samples seen (the x axis), :func:`grpo_points` and :func:`rft_points`:

- GRPO family: each step samples ``data.batch_size`` x ``model.num_generations`` completions, counted whether their
  group is then kept or dropped (``zero_variance_groups``); with ``resample`` (DAPO dynamic sampling) each extra round
  (``train/resample_rounds``, logged every step) samples another batch of prompts and is counted too. Per process:
  under DDP every rank samples this many.
- RFT: all its samples (``rft/summary.json``'s ``samples``: ``data.num_train`` x ``rft.num_samples``) are drawn before
  it trains, so its end accuracy is at that count (its mid-training validations, SFT steps, are not on this axis).
- Before training (0 samples): ``final_metrics.json["start"]``, the SFT export's accuracy.

Wall time: the seconds the pipeline recorded for the step (``<RUN_DIR>/pipeline_times.jsonl``, its last record; a
resumed step: its last part only); left out (``–``) where the pipeline recorded none.

Written to ``--out``: ``results.md`` and ``results.csv`` (a row per method: accuracy at each validation point, start,
end and wall time, mean ± sample std (n - 1) over the seeds found, with n), ``points.csv`` (every run's points) and
``accuracy_vs_samples.png`` (a line per method, the mean over seeds with a min-max band; dotted: a method with a start
and an end point only, RFT; dashed: the start accuracy).
Pure functions (tested): :func:`grpo_points`, :func:`rft_points`, :func:`stats`.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from lit_rlhf.report import _read_json, load_run, mean_std

ACCURACY = "val/accuracy"
METHOD_STAGES = ("rft", "grpo")
LABELS = {
    "rft": "RFT",
    "online-rft": "Online RFT",
    "grpo-os": "GRPO+OS (rule outcome reward)",
    "grpo-ps": "GRPO+PS (rule step verifier)",
    "grpo-ps-prm": "GRPO+PS (learned PRM)",
    "grpo-online-rm": "GRPO (online-updated RM)",
}
PLOT_SIZE = (7.5, 4.8)  # inches at 100 dpi: a 750 x 480 PNG


@dataclass
class MethodRun:
    """One method's run in one seed: held-out accuracy by samples seen, and the pipeline's wall time of the step."""

    method: str
    run: str
    points: dict[int, float]
    wall_s: float | None = None


def grpo_points(
    val: dict[int, float],
    start: float,
    end: float,
    steps: int,
    per_step: int,
    resample_rounds: dict[int, float] | None = None,
    interval_one: bool = False,
) -> dict[int, float]:
    """Samples seen -> accuracy of a GRPO-family run. ``val``: the CSV's ``val/accuracy`` by logged step; Lightning logs
    a validation during training at step s after s + 1 rollout batches, the end-of-run one at ``steps`` (the run's
    ``global_step``), and the start at 0, which a validation after the first batch overwrites in the reader when
    ``val_check_interval`` is 1 (``interval_one``: then step 0 is that one). Batch t samples ``per_step`` x
    (1 + ``resample_rounds[t]``) completions. ``start``/``end``: ``final_metrics.json``'s, over the CSV's."""
    seen = [0.0]
    for t in range(steps):
        seen.append(seen[-1] + per_step * (1 + (resample_rounds or {}).get(t, 0.0)))
    points = {0: start}
    for step, value in val.items():
        if step > 0 or interval_one:
            points[round(seen[min(step + 1, steps)])] = value
    points[round(seen[steps])] = end
    return dict(sorted(points.items()))


def rft_points(start: float, end: float, samples: int) -> dict[int, float]:
    """Samples seen -> accuracy of an RFT run: the start at 0, the end after all ``samples`` (drawn before training)."""
    return {0: start, int(samples): end}


def stats(values: list[float]) -> tuple[float, float | None, int]:
    """(mean, sample std with n - 1 in the denominator or None below two values, n)."""
    std = statistics.stdev(values) if len(values) > 1 else None
    return statistics.fmean(values), std, len(values)


# ------------------------------------------------------------------------------------------------------ reading
def read_method(step_dir: Path, run: str, wall_s: float | None = None) -> MethodRun | None:
    """The :class:`MethodRun` of a step directory; None for a step of another stage (not a method)."""
    try:
        loaded = load_run(step_dir)
    except FileNotFoundError:
        loaded = None
    final = loaded.final if loaded else {}
    if not final:
        raise ValueError(f"{step_dir}: no final_metrics.json (the step has not finished); rerun its pipeline")
    if final.get("stage") not in METHOD_STAGES:
        return None
    start, end = (final.get(k, {}).get(ACCURACY) for k in ("start", "end"))
    if start is None or end is None:
        raise ValueError(f"{step_dir}: final_metrics.json has no start and end {ACCURACY} (held-out accuracy)")
    if final["stage"] == "rft":
        samples = _read_json(step_dir / "rft" / "summary.json").get("samples")
        if samples is None:
            raise ValueError(f"{step_dir}: RFT step without rft/summary.json's 'samples'")
        return MethodRun(step_dir.name, run, rft_points(start, end, samples), wall_s)
    if not (step_dir / "config.yaml").is_file():
        raise ValueError(f"{step_dir}: no config.yaml (data.batch_size, model.num_generations)")
    config = yaml.safe_load((step_dir / "config.yaml").read_text())
    per_step = int(config["data"]["batch_size"]) * int(config["model"]["num_generations"])
    interval = config.get("trainer", {}).get("val_check_interval")
    interval_one = isinstance(interval, int) and interval == 1  # 1.0: once per epoch
    steps, rounds = int(final["global_step"]), loaded.metrics.get("train/resample_rounds")
    points = grpo_points(loaded.metrics.get(ACCURACY, {}), start, end, steps, per_step, rounds, interval_one)
    return MethodRun(step_dir.name, run, points, wall_s)


def step_times(run_dir: Path) -> dict[str, float]:
    """Step -> seconds of its last record in the pipeline's ``pipeline_times.jsonl`` (empty without one)."""
    from lit_rlhf.experiments.pipeline import TIMES

    path, times = run_dir / TIMES, {}
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.strip():
                record = json.loads(line)
                times[record["step"]] = float(record["seconds"])
    return times


def read_runs(run_dirs: list[str | Path]) -> list[MethodRun]:
    """Every method step of every run directory (one seed each); a directory without one is refused."""
    runs: list[MethodRun] = []
    for run_dir in map(Path, run_dirs):
        if not run_dir.is_dir():
            raise ValueError(f"{run_dir}: no such run directory")
        times = step_times(run_dir)
        steps = [d for d in sorted(run_dir.iterdir()) if d.is_dir() and any(d.iterdir())]  # a stage writes at once
        found = [read_method(d, run_dir.name, times.get(d.name)) for d in steps]
        found = [m for m in found if m is not None]
        if not found:
            raise ValueError(f"{run_dir}: no method step (a step directory of stage {' or '.join(METHOD_STAGES)})")
        runs += found
    return runs


def by_method(runs: list[MethodRun]) -> dict[str, list[MethodRun]]:
    """Runs grouped by method, in :data:`LABELS` order, then others by name."""
    order = {name: i for i, name in enumerate(LABELS)}
    groups: dict[str, list[MethodRun]] = {}
    for r in sorted(runs, key=lambda r: (order.get(r.method, len(order)), r.method)):
        groups.setdefault(r.method, []).append(r)
    return groups


# ------------------------------------------------------------------------------------------------------ writing
def summarise(runs: list[MethodRun]) -> tuple[list[int], list[dict]]:
    """(every samples-seen value, a row per method: n and (mean, std, n) at each of them, start, end and wall)."""
    xs = sorted({x for r in runs for x in r.points})
    rows = []
    for method, members in by_method(runs).items():
        row = {"method": method, "label": LABELS.get(method, method), "n": len(members)}
        for x in xs:
            values = [r.points[x] for r in members if x in r.points]
            row[x] = stats(values) if values else None
        row["start"] = stats([r.points[0] for r in members])
        row["end"] = stats([r.points[max(r.points)] for r in members])
        walls = [r.wall_s for r in members if r.wall_s is not None]
        row["wall_s"] = stats(walls) if walls else None
        rows.append(row)
    return xs, rows


def _cell(cell: tuple[float, float | None, int] | None, n: int, wall: bool = False) -> str:
    """``mean ± std`` (accuracy: 3 decimals; wall: m:ss ± s), ``(n=k)`` when fewer than the method's n seeds."""
    if cell is None:
        return "–"
    mean, std, k = cell
    if wall:
        text = f"{round(mean) // 60}:{round(mean) % 60:02d}" + (f" ± {std:.0f} s" if std is not None else "")
    else:
        text = f"{mean:.3f}" + (f" ± {std:.3f}" if std is not None else "")
    return text + (f" (n={k})" if k != n else "")


def write_tables(runs: list[MethodRun], out: Path, sources: list[str]) -> tuple[Path, Path, Path]:
    xs, rows = summarise(runs)
    mid = [x for x in xs if x > 0]
    header = ["method", "n", "start", *[f"after {x} samples" for x in mid], "start → end (Δ)", "wall"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        n, (start, _, _), (end, _, _) = row["n"], row["start"], row["end"]
        cells = [row["label"], str(n), _cell(row["start"], n), *[_cell(row[x], n) for x in mid]]
        cells += [f"{start:.3f} → {end:.3f} ({end - start:+.3f})", _cell(row["wall_s"], n, wall=True)]
        lines.append("| " + " | ".join(cells) + " |")
    md = out / "results.md"
    md.write_text(
        "Held-out greedy accuracy (val/accuracy) by sampled completions seen (DeepSeekMath §5.2, Figure 5), mean ± "
        "sample std (n - 1) over the seeds found (n: seeds; a cell with fewer says so); start → end: means. Wall: "
        "the pipeline's pipeline_times.jsonl (m:ss). Runs: "
        + ", ".join(f"`{s}`" for s in sources)
        + ".\n\n"
        + "\n".join(lines)
        + "\n"
    )
    table = out / "results.csv"
    with table.open("w", newline="") as f:
        writer = csv.writer(f)
        columns = [f"acc@{x}" for x in mid] + ["start", "end", "wall_s"]
        writer.writerow(["method", "label", "n"] + [f"{c}_{s}" for c in columns for s in ("mean", "std", "n")])
        for row in rows:
            cells = [row[x] for x in mid] + [row["start"], row["end"], row["wall_s"]]
            flat = [v if v is not None else "" for c in cells for v in (c or ("", "", ""))]
            writer.writerow([row["method"], row["label"], row["n"], *flat])
    points = out / "points.csv"
    with points.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["method", "run", "samples", "accuracy", "wall_s"])
        for r in runs:
            for x, value in r.points.items():
                writer.writerow([r.method, r.run, x, value, "" if r.wall_s is None else r.wall_s])
    return md, table, points


def plot(runs: list[MethodRun], path: Path) -> Path:
    from matplotlib.figure import Figure  # the object API, as lit_rlhf.report: Agg canvas, no display

    fig = Figure(figsize=PLOT_SIZE, dpi=100, layout="constrained")
    ax = fig.subplots()
    groups = by_method(runs)
    for method, members in groups.items():
        xs, means, _ = mean_std([r.points for r in members])
        label = f"{LABELS.get(method, method)} (n={len(members)})"
        style = ":" if len(xs) == 2 else "-"  # start and end only (RFT: every sample drawn before training)
        (line,) = ax.plot(xs, means, style, marker="o", markersize=4, label=label)
        if len(members) > 1:
            low = [min(r.points[x] for r in members if x in r.points) for x in xs]
            high = [max(r.points[x] for r in members if x in r.points) for x in xs]
            ax.fill_between(xs, low, high, color=line.get_color(), alpha=0.15, linewidth=0)
    start = statistics.fmean(r.points[0] for r in runs)
    ax.axhline(start, color="grey", linestyle="--", linewidth=1, label=f"start (SFT export) {start:.3f}")
    ax.set_title("Held-out greedy accuracy vs. samples seen (mean over n seeds; band: min-max)", fontsize=10)
    ax.set_xlabel("sampled completions")
    ax.set_ylabel("held-out accuracy (val/accuracy)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.savefig(path)
    return path


def collect(run_dirs: list[str | Path], out: str | Path) -> list[Path]:
    """Read the runs (:func:`read_runs`) and write the tables and the figure to ``out``."""
    runs = read_runs(run_dirs)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    return [*write_tables(runs, out, [str(d) for d in run_dirs]), plot(runs, out / "accuracy_vs_samples.png")]


def main(argv: list[str] | None = None) -> int:
    prog = sys.argv[0] if sys.argv and sys.argv[0].startswith("lit-rlhf") else "python -m lit_rlhf.experiments.paradigm"
    ap = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=("collect",))
    ap.add_argument("runs", nargs="+", metavar="RUN_DIR", help="a pipeline run directory (one seed) per argument")
    ap.add_argument("--out", required=True, help="directory for results.md, results.csv, points.csv and the PNG")
    args = ap.parse_args(argv)
    try:
        written = collect(args.runs, args.out)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("written: " + "\n         ".join(map(str, written)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
