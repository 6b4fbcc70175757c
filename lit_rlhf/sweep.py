"""Sweeps: a YAML grid expanded to cells, one cell per SLURM array task, and one results table at the end.

A sweep spec (``experiments/sweeps/<name>.yaml``)::

    name: dpo-tiny-beta                  # W&B group; cells write to <output_root>/<name>/cell-<index>
    stage: dpo                           # runs python -m lit_rlhf.experiments.<stage>
    base_config: experiments/dpo/tiny.yaml   # --config of every cell (or null)
    output_root: runs/sweeps
    fixed: {trainer.max_steps: 4}        # overrides shared by every cell
    grid: {model.beta: [0.05, 0.1, 0.5], model.loss: [dpo, ipo]}
    seeds: [0, 1]                        # one cell per seed, passed to every key of seed_keys
    seed_keys: [seed_everything]
    tags: []                             # W&B tags besides [<name>, <stage>]
    sbatch: [--gpus-per-node=1]          # this sweep's resources, added to slurm/sweep_cell.sbatch's
    max_parallel: null                   # at most this many cells at once (the array's %N)

Cell order (the array index): the cartesian product of the grid with the keys in file order, the last key varying
fastest, and the seeds innermost. ``index = ((i_1 * n_2 + i_2) * ... ) * n_seeds + i_seed``. The example above has
3 * 2 * 2 = 12 cells; cell 1 is beta=0.05, loss=dpo, seed=1; cell 2 is beta=0.05, loss=ipo, seed=0.

Before anything runs, :func:`check_spec` parses every override and every cell with the stage's own LightningCLI
parser (:func:`stage_parser`), so a typo'd key fails at ``plan`` with a suggestion, not in a queued job.

Pure functions (tested): :func:`load_spec`, :func:`expand`, :func:`cell_for_index`, :func:`cell_command`,
:func:`array_ranges`, :func:`sbatch_command`, :func:`resume_args`, :func:`collect`, :func:`aggregate`,
:func:`markdown_table`. The command line is :mod:`lit_rlhf.experiments.sweep`.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import difflib
import importlib
import importlib.util
import io
import itertools
import json
import math
import re
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

CELL_FILE = "cell.json"
"""Written by ``run-cell`` into the cell's output directory: the cell, its command and its SLURM job id."""
SWEEP_CELL_SCRIPT = "slurm/sweep_cell.sbatch"
RESERVED_KEYS = ("config", "output_dir", "wandb.group", "wandb.tags", "wandb.name")
"""Set by the sweep for every cell; a spec's ``fixed``/``grid`` may not set them (``wandb.project`` etc. it may)."""


@dataclass(frozen=True)
class SweepSpec:
    """A parsed sweep spec; see the module docstring for the YAML and the cell order."""

    name: str
    stage: str
    grid: dict[str, list[Any]] = field(default_factory=dict)
    fixed: dict[str, Any] = field(default_factory=dict)
    seeds: list[int] = field(default_factory=lambda: [0])
    seed_keys: list[str] = field(default_factory=lambda: ["seed_everything"])
    base_config: str | None = None
    output_root: str = "runs/sweeps"
    tags: list[str] = field(default_factory=list)
    sbatch: list[str] = field(default_factory=list)
    max_parallel: int | None = None

    @property
    def size(self) -> int:
        return math.prod(len(v) for v in self.grid.values()) * len(self.seeds)

    @property
    def sweep_dir(self) -> Path:
        return Path(self.output_root) / self.name


@dataclass(frozen=True)
class Cell:
    """One run of a sweep: ``python -m lit_rlhf.experiments.<stage> [--config C] --output_dir D --k=v ...``.

    ``params`` are this cell's grid values; ``overrides`` every ``--key=value`` it passes (fixed, grid, seeds, W&B).
    """

    index: int
    stage: str
    params: dict[str, Any]
    seed: int
    output_dir: Path
    overrides: dict[str, Any]
    config: str | None = None


def load_spec(path: str | Path, output_root: str | None = None) -> SweepSpec:
    """Read and validate a sweep spec; ``output_root`` replaces the spec's (e.g. a scratch file system)."""
    raw = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: a sweep spec is a mapping, got {type(raw).__name__}")
    allowed = set(SweepSpec.__dataclass_fields__)
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {unknown}; allowed: {sorted(allowed)}")
    for key in ("name", "stage"):
        if not raw.get(key):
            raise ValueError(f"{path}: '{key}' is required")
    if output_root is not None:
        raw["output_root"] = output_root
    for key in ("grid", "fixed"):
        raw[key] = raw.get(key) or {}
    spec = SweepSpec(**raw)
    validate(spec, source=str(path))
    return spec


def validate(spec: SweepSpec, source: str = "sweep spec") -> None:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", spec.name):
        raise ValueError(
            f"{source}: name {spec.name!r} must be letters, digits, '.', '_' or '-' (it names a directory)"
        )
    module = f"lit_rlhf.experiments.{spec.stage}"
    if not re.fullmatch(r"[a-z_][a-z0-9_]*", spec.stage) or importlib.util.find_spec(module) is None:
        raise ValueError(f"{source}: unknown stage {spec.stage!r}: there is no module {module}")
    for key, values in spec.grid.items():
        if not isinstance(values, list) or not values:
            raise ValueError(f"{source}: grid['{key}'] must be a non-empty list of values, got {values!r}")
    if not isinstance(spec.seeds, list) or not spec.seeds or not all(isinstance(s, int) for s in spec.seeds):
        raise ValueError(f"{source}: seeds must be a non-empty list of integers, got {spec.seeds!r}")
    clash = sorted((set(spec.grid) & set(spec.fixed)) | (set(spec.seed_keys) & (set(spec.grid) | set(spec.fixed))))
    if clash:
        raise ValueError(f"{source}: key(s) {clash} set twice (grid, fixed and seed_keys must not overlap)")
    reserved = sorted(k for k in [*spec.grid, *spec.fixed] if k in RESERVED_KEYS)
    if reserved:
        raise ValueError(f"{source}: {reserved} are set by the sweep (base_config, output_root/name, name, tags)")
    if spec.max_parallel is not None and spec.max_parallel < 1:
        raise ValueError(f"{source}: max_parallel must be >= 1 or null, got {spec.max_parallel}")


def expand(spec: SweepSpec) -> list[Cell]:
    """All cells in array order (grid keys in file order, last fastest; seeds innermost)."""
    keys = list(spec.grid)
    cells = []
    for index, (*values, seed) in enumerate(itertools.product(*spec.grid.values(), spec.seeds)):
        params = dict(zip(keys, values))
        output_dir = spec.sweep_dir / f"cell-{index:03d}"
        overrides = {
            **spec.fixed,
            **params,
            **{k: seed for k in spec.seed_keys},
            "wandb.group": spec.name,
            "wandb.tags": [spec.name, spec.stage, *spec.tags],
            "wandb.name": f"{spec.name}-cell-{index:03d}",
        }
        cells.append(Cell(index, spec.stage, params, seed, output_dir, overrides, spec.base_config))
    return cells


def cell_for_index(spec: SweepSpec, index: int) -> Cell:
    """The cell that array task ``index`` runs; an error names the array's size when ``index`` is out of range."""
    n = spec.size
    if not 0 <= index < n:
        raise IndexError(
            f"cell index {index} is out of range: sweep {spec.name!r} has {n} cells (array indices 0-{n - 1})"
        )
    return expand(spec)[index]


def format_value(value: Any) -> str:
    """A value as the stage CLI (jsonargparse) reads it: strings as they are, the rest as JSON (true, null, [1, 2])."""
    return value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))


def cell_command(cell: Cell, python: str | None = None, extra: list[str] | tuple[str, ...] = ()) -> list[str]:
    """The argv of a cell: ``python -m lit_rlhf.experiments.<stage> [--config C] --output_dir D --k=v ...``."""
    argv = [python or sys.executable, "-m", f"lit_rlhf.experiments.{cell.stage}"]
    if cell.config:
        argv += ["--config", str(cell.config)]
    argv += ["--output_dir", str(cell.output_dir)]
    argv += [f"--{k}={format_value(v)}" for k, v in cell.overrides.items()]
    return argv + list(extra)


# ------------------------------------------------------------------------------- checking cells with the stage's parser
class _ParserBuilt(Exception):
    pass


def stage_parser(stage: str):
    """The LightningCLI parser of ``python -m lit_rlhf.experiments.<stage>``, built by the entry point itself and not
    used: while it runs, Lightning's ``LightningCLI.parse_arguments`` hook hands the parser back instead of parsing,
    so nothing is instantiated. Abbreviations are off (argparse would read ``--model.bet`` as ``--model.beta``)."""
    from lightning.pytorch.cli import LightningCLI

    module = importlib.import_module(f"lit_rlhf.experiments.{stage}")

    def hand_back(self, parser, args) -> None:
        raise _ParserBuilt(parser)

    original = LightningCLI.parse_arguments
    LightningCLI.parse_arguments = hand_back
    try:  # --print_config: should the hook ever be bypassed, the stage prints its config and exits, running nothing
        with contextlib.redirect_stdout(io.StringIO()):
            module.main(args=["--print_config"])
    except _ParserBuilt as built:
        parser = built.args[0]
        parser.allow_abbrev = False
        return parser
    except SystemExit:
        pass
    finally:
        LightningCLI.parse_arguments = original
    raise ValueError(f"stage {stage!r}: lit_rlhf.experiments.{stage}.main builds no LightningCLI parser to check with")


def parser_keys(parser) -> list[str]:
    """Every dotted key the parser takes (``model.beta``, ``model.policy.lora.r``, ``trainer.max_steps``)."""
    keys = {k.replace(".init_args.", ".") for k in parser.get_defaults().keys()}  # Namespace.keys(): dotted leaves
    keys |= {a.dest for a in parser._actions if isinstance(a.dest, str)}
    skip = ("help", "config", "print_config")
    internal = (".help", ".class_path", "__subclasses_disabled__")
    return sorted(k for k in keys if k not in skip and not k.endswith(internal))


def parse_error(parser, argv: list[str]) -> str | None:
    """The parser's message for ``argv`` (whitespace collapsed), or None when it parses."""
    exit_on_error, parser.exit_on_error = parser.exit_on_error, False
    try:
        parser.parse_args(argv)
    except (argparse.ArgumentError, ValueError, TypeError, KeyError) as e:  # a link or a type may raise the others
        return " ".join(str(e).split())
    finally:
        parser.exit_on_error = exit_on_error
    return None


def explain(message: str, key: str, known: list[str]) -> str:
    """A parser message about ``key``, with "did you mean ...?" when the key itself is unknown."""
    if not any(s in message for s in ("unrecognized arguments", "is not accepted", "No action for key")):
        return message
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    return f"unknown key {key!r}; " + (f"did you mean {close[0]}?" if close else "the stage's --help lists its keys")


def check_spec(spec: SweepSpec, parser=None) -> list[str]:
    """What the stage's own parser refuses in a sweep, [] when every cell parses: the base config, each override
    (``fixed``, each ``grid`` value, ``seed_keys``) on its own over the base config (one message per bad key, e.g.
    ``grid['model.bta']: unknown key 'model.bta'; did you mean model.beta?``), then each cell's full command."""
    parser = parser or stage_parser(spec.stage)
    base = ["--config", str(spec.base_config)] if spec.base_config else []
    if base and (message := parse_error(parser, base)):
        return [f"base_config {spec.base_config}: {message}"]
    known = parser_keys(parser)
    overrides = [("fixed", k, [v]) for k, v in spec.fixed.items()] + [("grid", k, vs) for k, vs in spec.grid.items()]
    overrides += [("seed_keys", k, spec.seeds) for k in spec.seed_keys]
    errors = []
    for where, key, values in overrides:
        for value in values:
            if message := parse_error(parser, [*base, f"--{key}={format_value(value)}"]):
                errors.append(f"{where}['{key}'] = {format_value(value)}: {explain(message, key, known)}")
                break
    if errors:
        return errors
    for cell in expand(spec):
        if message := parse_error(parser, cell_command(cell)[3:]):
            errors.append(f"cell {cell.index} ({cell.params}, seed {cell.seed}): {message}")
    return errors


def resume_args(output_dir: str | Path) -> list[str]:
    """``--ckpt_path`` of the newest checkpoint that loads among those a cell left behind
    (:func:`lit_rlhf.checkpointing.newest_checkpoint`, what ``--ckpt_path last`` means); ``[]`` for a fresh cell."""
    from lit_rlhf.checkpointing import newest_checkpoint  # (torch: only when a cell is looked at)

    found = newest_checkpoint(output_dir)
    return [] if found is None else [f"--ckpt_path={found}"]


def array_ranges(indices: list[int]) -> str:
    """Compact SLURM ``--array`` list: ``[0, 1, 2, 5, 7, 8]`` -> ``"0-2,5,7-8"``."""
    if not indices:
        raise ValueError("no array indices")
    parts = []
    for _, run in itertools.groupby(enumerate(sorted(set(indices))), key=lambda t: t[1] - t[0]):
        values = [v for _, v in run]
        parts.append(str(values[0]) if len(values) == 1 else f"{values[0]}-{values[-1]}")
    return ",".join(parts)


def sbatch_command(
    spec: SweepSpec,
    spec_path: str | Path,
    indices: list[int] | None = None,
    extra: list[str] | tuple[str, ...] = (),
    output_root_override: str | None = None,
    script: str = SWEEP_CELL_SCRIPT,
) -> list[str]:
    """``sbatch --array=... [resources] slurm/sweep_cell.sbatch SPEC`` for the given cells (default: all).

    Resources come from the script's ``#SBATCH`` lines, then the spec's ``sbatch`` list, then ``extra`` (later wins).
    """
    array = array_ranges(list(range(spec.size)) if indices is None else indices)
    if spec.max_parallel:
        array += f"%{spec.max_parallel}"
    argv = [
        "sbatch",
        "--parsable",
        f"--array={array}",
        f"--job-name={spec.name}",
        f"--output={spec.sweep_dir / 'logs' / '%A_%a.out'}",
        *spec.sbatch,
        *extra,
        script,
        str(spec_path),
    ]
    if output_root_override is not None:
        argv += ["--output_root", output_root_override]
    return argv


def cell_record(cell: Cell, argv: list[str], environ: dict[str, str]) -> dict[str, Any]:
    """What ``run-cell`` writes to ``<cell>/cell.json``: the cell, its command and the SLURM job that ran it."""
    job = environ.get("SLURM_JOB_ID", "")
    if environ.get("SLURM_ARRAY_JOB_ID"):
        job = f"{environ['SLURM_ARRAY_JOB_ID']}_{environ.get('SLURM_ARRAY_TASK_ID', '')}"
    return {
        "index": cell.index,
        "stage": cell.stage,
        "params": cell.params,
        "seed": cell.seed,
        "command": argv,
        "slurm_job": job,
        "slurm_job_id": environ.get("SLURM_JOB_ID", ""),
        "host": environ.get("SLURMD_NODENAME", ""),
        "restarts": int(environ.get("SLURM_RESTART_COUNT", 0)),
    }


def cell_status(cell: Cell) -> str:
    """``done`` (final_metrics.json written), ``incomplete`` (started, no final metrics: running, failed or
    preempted) or ``missing`` (never started)."""
    if (cell.output_dir / "final_metrics.json").is_file():
        return "done"
    return "incomplete" if cell.output_dir.exists() else "missing"


def collect(spec: SweepSpec) -> list[dict[str, Any]]:
    """One row per cell: index, SLURM job, grid values, seed, status, global_step, the end-of-run held-out metrics
    (``final_metrics.json["end"]``). Cells without final metrics keep their row, with the status saying why."""
    rows = []
    for cell in expand(spec):
        row: dict[str, Any] = {"cell": cell.index}
        meta = _read_json(cell.output_dir / CELL_FILE)
        row["job"] = meta.get("slurm_job", "")
        row.update(cell.params)
        row["seed"] = cell.seed
        row["status"] = cell_status(cell)
        metrics = _read_json(cell.output_dir / "final_metrics.json")
        row["step"] = metrics.get("global_step", "")
        row.update(metrics.get("end", {}))
        rows.append(row)
    return rows


CELL_COLUMNS = ("cell", "job", "seed", "status", "step")
"""The columns of a :func:`collect` row that are neither grid values nor metrics."""


def aggregate(rows: list[dict[str, Any]], grid_keys: list[str]) -> list[dict[str, Any]]:
    """One row per grid point of :func:`collect`'s rows, in cell order: its grid values, ``seeds`` (cells done /
    cells), and for every metric ``mean(<metric>)`` and ``std(<metric>)`` over the done cells (the sample standard
    deviation, n - 1 in the denominator; empty below two values)."""
    metrics = [c for c in _columns(rows) if c not in CELL_COLUMNS and c not in grid_keys]
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(json.dumps([row.get(k) for k in grid_keys]), []).append(row)
    out = []
    for members in groups.values():
        done = [r for r in members if r.get("status") == "done"]
        point: dict[str, Any] = {k: members[0].get(k) for k in grid_keys}
        point["seeds"] = f"{len(done)}/{len(members)}"
        for m in metrics:
            values = [float(r[m]) for r in done if isinstance(r.get(m), (int, float)) and not isinstance(r[m], bool)]
            point[f"mean({m})"] = statistics.fmean(values) if values else ""
            point[f"std({m})"] = statistics.stdev(values) if len(values) > 1 else ""
        out.append(point)
    return out


def write_results(spec: SweepSpec, rows: list[dict[str, Any]]) -> tuple[Path, Path, Path]:
    """Write ``<sweep_dir>/results.csv`` (a row per cell, full precision), ``results_by_config.csv`` (a row per grid
    point: :func:`aggregate`) and ``results.md`` (both tables, the second as ``mean ± std``)."""
    grid_keys = list(spec.grid)
    points = aggregate(rows, grid_keys)
    spec.sweep_dir.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = spec.sweep_dir / "results.csv", spec.sweep_dir / "results.md"
    by_config = spec.sweep_dir / "results_by_config.csv"
    for path, table in ((csv_path, rows), (by_config, points)):
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=_columns(table), restval="")
            writer.writeheader()
            writer.writerows(table)
    metrics = [c[len("mean(") : -1] for c in _columns(points) if c.startswith("mean(")]
    summary = [
        {**{k: p[k] for k in [*grid_keys, "seeds"]}, **{m: _pm(p[f"mean({m})"], p[f"std({m})"]) for m in metrics}}
        for p in points
    ]
    heading = "Mean ± std over seeds (sample std) of each grid point's done cells:"
    md_path.write_text(f"{markdown_table(rows)}\n\n{heading}\n\n{markdown_table(summary)}\n")
    return csv_path, md_path, by_config


def _pm(mean: Any, std: Any) -> str:
    if mean == "":
        return ""
    return f"{mean:.4g}" if std == "" else f"{mean:.4g} ± {std:.2g}"


def markdown_table(rows: list[dict[str, Any]], columns: list[str] | None = None) -> str:
    columns = columns or _columns(rows)
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(c, "")) for c in columns) + " |")
    return "\n".join(lines)


def _columns(rows: list[dict[str, Any]]) -> list[str]:
    columns: list[str] = []
    for row in rows:
        columns += [c for c in row if c not in columns]
    return columns


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value) if not isinstance(value, (list, dict)) else json.dumps(value)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
