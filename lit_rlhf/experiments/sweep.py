"""Sweep entry point: ``python -m lit_rlhf.experiments.sweep {plan,submit,run-cell,collect} SPEC``.

A sweep spec (``experiments/sweeps/*.yaml``, format and cell order in :mod:`lit_rlhf.sweep`) is a grid of
overrides for one stage. It runs as a SLURM job array: array task ``i`` runs cell ``i``
(``slurm/sweep_cell.sbatch`` calls ``run-cell``, which reads ``SLURM_ARRAY_TASK_ID``), each cell writes to
``<output_root>/<name>/cell-<i>``, and every run joins the W&B group ``<name>`` with tags ``[<name>, <stage>]``.

    python -m lit_rlhf.experiments.sweep plan experiments/sweeps/dpo-tiny-beta.yaml      # cells + the sbatch line
    python -m lit_rlhf.experiments.sweep submit experiments/sweeps/dpo-tiny-beta.yaml    # sbatch --array=0-2%1 ...
    python -m lit_rlhf.experiments.sweep submit SPEC --only-missing                      # resubmit unfinished cells
    python -m lit_rlhf.experiments.sweep run-cell SPEC --index 1                         # one cell here, no SLURM
    python -m lit_rlhf.experiments.sweep collect experiments/sweeps/dpo-tiny-beta.yaml   # results.csv + results.md

``--output-root DIR`` (every command) replaces the spec's ``output_root``; ``submit`` passes it on to the cells.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys

from lit_rlhf import sweep as sw


def plan(args) -> int:
    spec = sw.load_spec(args.spec, args.output_root)
    if args.index is not None:
        print(shlex.join(sw.cell_command(sw.cell_for_index(spec, args.index), python="python")))
        return 0
    print(f"sweep {spec.name!r}: stage {spec.stage}, {spec.size} cells, outputs in {spec.sweep_dir}/cell-<index>")
    for cell in sw.expand(spec):
        params = " ".join(f"{k}={sw.format_value(v)}" for k, v in cell.params.items())
        print(f"  [{cell.index:3d}] {params} seed={cell.seed}  -> {cell.output_dir}")
    print("submit with:\n  " + shlex.join(sw.sbatch_command(spec, args.spec, output_root_override=args.output_root)))
    return 0


def submit(args) -> int:
    spec = sw.load_spec(args.spec, args.output_root)
    indices = None
    if args.only_missing:
        indices = [c.index for c in sw.expand(spec) if sw.cell_status(c) != "done"]
        if not indices:
            print(f"sweep {spec.name!r}: all {spec.size} cells are done; nothing to submit")
            return 0
    argv = sw.sbatch_command(spec, args.spec, indices, shlex.split(args.sbatch_args), args.output_root)
    print("$ " + shlex.join(argv), flush=True)
    if args.dry_run:
        return 0
    (spec.sweep_dir / "logs").mkdir(parents=True, exist_ok=True)  # sbatch does not create --output's directory
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode != 0:
        print(proc.stderr.strip() or proc.stdout.strip(), file=sys.stderr)
        return proc.returncode
    job_id = proc.stdout.strip().split(";")[0]
    n = spec.size if indices is None else len(indices)
    print(f"submitted job array {job_id} ({n} cells of sweep {spec.name!r}); logs in {spec.sweep_dir / 'logs'}")
    print(f"when it is done: python -m lit_rlhf.experiments.sweep collect {shlex.quote(str(args.spec))}"
          + (f" --output-root {shlex.quote(args.output_root)}" if args.output_root else ""))
    print(f"job_id={job_id}")
    return 0


def run_cell(args) -> int:
    spec = sw.load_spec(args.spec, args.output_root)
    index = args.index
    if index is None:
        if "SLURM_ARRAY_TASK_ID" not in os.environ:
            raise SystemExit("run-cell: give --index or run as a SLURM array task (SLURM_ARRAY_TASK_ID is not set)")
        index = int(os.environ["SLURM_ARRAY_TASK_ID"])
    cell = sw.cell_for_index(spec, index)
    done = sw.cell_status(cell) == "done"
    if done and not args.force:
        print(f"[sweep] cell {index} of {spec.name!r} is done ({cell.output_dir}/final_metrics.json); --force reruns it")
        return 0
    argv = sw.cell_command(cell, extra=[] if done else sw.resume_args(cell.output_dir))  # an unfinished cell resumes
    print(f"[sweep] {spec.name} cell {index}/{spec.size - 1}: {cell.params} seed={cell.seed}\n$ {shlex.join(argv)}", flush=True)
    if args.dry_run:
        return 0
    cell.output_dir.mkdir(parents=True, exist_ok=True)
    (cell.output_dir / sw.CELL_FILE).write_text(json.dumps(sw.cell_record(cell, argv, dict(os.environ)), indent=1))
    os.execv(argv[0], argv)  # the training process replaces this one, so SLURM's signals (requeue) reach Lightning


def collect(args) -> int:
    spec = sw.load_spec(args.spec, args.output_root)
    rows = sw.collect(spec)
    csv_path, md_path = sw.write_results(spec, rows)
    done = sum(r["status"] == "done" for r in rows)
    print(f"sweep {spec.name!r}: {done}/{len(rows)} cells done\n")
    print(md_path.read_text())
    print(f"written: {csv_path}\n         {md_path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lit_rlhf.experiments.sweep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    commands = {
        "plan": (plan, "print the cells and the sbatch command"),
        "submit": (submit, "submit the sweep as a SLURM job array and print its job id"),
        "run-cell": (run_cell, "run one cell (SLURM_ARRAY_TASK_ID or --index); what slurm/sweep_cell.sbatch calls"),
        "collect": (collect, "write <output_root>/<name>/results.{csv,md}: a row per cell from final_metrics.json"),
    }
    for name, (fn, help_) in commands.items():
        p = sub.add_parser(name, help=help_, description=help_)
        p.set_defaults(fn=fn)
        p.add_argument("spec", help="sweep spec YAML (experiments/sweeps/*.yaml)")
        p.add_argument("--output-root", default=None, help="replaces the spec's output_root")
        if name in ("plan", "run-cell"):
            p.add_argument("--index", type=int, default=None, help="cell index (run-cell: default SLURM_ARRAY_TASK_ID)")
        if name in ("submit", "run-cell"):
            p.add_argument("--dry-run", action="store_true", help="print the command, run nothing")
        if name == "submit":
            p.add_argument("--sbatch-args", default="", help="extra sbatch options, e.g. '--partition=gpu --time=2:00:00'")
            p.add_argument("--only-missing", action="store_true", help="submit only the cells without final metrics")
        if name == "run-cell":
            p.add_argument("--force", action="store_true", help="rerun a cell that already has final metrics")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (ValueError, IndexError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
