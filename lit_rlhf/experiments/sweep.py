"""Sweep entry point: ``python -m lit_rlhf.experiments.sweep {plan,submit,run-cell,run-local,collect} SPEC``.

A sweep spec (``experiments/sweeps/*.yaml``, format and cell order in :mod:`lit_rlhf.sweep`) is a grid of
overrides for one stage. On SLURM it runs as a job array: array task ``i`` runs cell ``i``
(``slurm/sweep_cell.sbatch`` calls ``run-cell``, which reads ``SLURM_ARRAY_TASK_ID``); without SLURM ``run-local``
runs the cells as subprocesses of one machine. Each cell writes to ``<output_root>/<name>/cell-<i>``, and every run
joins the W&B group ``<name>`` with tags ``[<name>, <stage>]``. ``plan``, ``submit`` and ``run-local`` first parse
every cell with the stage's own parser and refuse a bad key or value (``did you mean model.beta?``).

    python -m lit_rlhf.experiments.sweep plan experiments/sweeps/dpo-tiny-beta.yaml        # check; cells + sbatch line
    python -m lit_rlhf.experiments.sweep run-local experiments/sweeps/dpo-tiny-beta.yaml   # every cell here, no SLURM
    python -m lit_rlhf.experiments.sweep submit experiments/sweeps/dpo-tiny-beta.yaml      # sbatch --array=0-2%1 ...
    python -m lit_rlhf.experiments.sweep submit SPEC --only_missing                        # resubmit unfinished cells
    python -m lit_rlhf.experiments.sweep run-cell SPEC --index 1                           # one cell here, no SLURM
    python -m lit_rlhf.experiments.sweep collect SPEC --report     # results.{csv,md}, mean ± std over seeds, plots

``--output_root DIR`` (every command) replaces the spec's ``output_root``; ``submit`` passes it on to the cells.
A finished cell (``final_metrics.json`` written) is skipped by ``run-cell`` and ``run-local`` unless ``--force``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections import deque
from pathlib import Path

from lit_rlhf import sweep as sw

PROG = "python -m lit_rlhf.experiments.sweep"


def checked_spec(args) -> sw.SweepSpec:
    """The spec, after the stage's own parser accepted every cell (else a ValueError listing what it refused)."""
    spec = sw.load_spec(args.spec, args.output_root)
    errors = sw.check_spec(spec)
    if errors:
        lines = "\n".join(f"  - {e}" for e in errors)
        raise ValueError(f"{args.spec}: the {spec.stage} stage's parser refuses this sweep:\n{lines}")
    return spec


def plan(args) -> int:
    spec = checked_spec(args)
    if args.index is not None:
        print(shlex.join(sw.cell_command(sw.cell_for_index(spec, args.index), python="python")))
        return 0
    print(
        f"sweep {spec.name!r}: stage {spec.stage}, {spec.size} cells (every one parses), outputs in "
        f"{spec.sweep_dir}/cell-<index>"
    )
    for cell in sw.expand(spec):
        params = " ".join(f"{k}={sw.format_value(v)}" for k, v in cell.params.items())
        print(f"  [{cell.index:3d}] {params} seed={cell.seed}  -> {cell.output_dir}")
    print("submit with:\n  " + shlex.join(sw.sbatch_command(spec, args.spec, output_root_override=args.output_root)))
    print(f"or run here:\n  {PROG} run-local {shlex.quote(str(args.spec))}")
    return 0


def submit(args) -> int:
    spec = checked_spec(args)
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
    if shutil.which("sbatch") is None:
        print(
            "submit: `sbatch` is not on PATH, so there is no SLURM to submit to here (submit from a login node of a "
            "SLURM cluster, or add SLURM's bin directory to PATH).\nTo run the cells on this machine instead:\n  "
            f"{PROG} run-local {shlex.quote(str(args.spec))} [--parallel N]",
            file=sys.stderr,
        )
        return 2
    (spec.sweep_dir / "logs").mkdir(parents=True, exist_ok=True)  # sbatch does not create --output's directory
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        print(proc.stderr.strip() or proc.stdout.strip(), file=sys.stderr)
        return proc.returncode
    job_id = proc.stdout.strip().split(";")[0]
    n = spec.size if indices is None else len(indices)
    print(f"submitted job array {job_id} ({n} cells of sweep {spec.name!r}); logs in {spec.sweep_dir / 'logs'}")
    print(
        f"when it is done: {PROG} collect {shlex.quote(str(args.spec))}"
        + (f" --output_root {shlex.quote(args.output_root)}" if args.output_root else "")
    )
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
        print(
            f"[sweep] cell {index} of {spec.name!r} is done ({cell.output_dir}/final_metrics.json); --force reruns it"
        )
        return 0
    # an unfinished cell resumes; a finished one rerun with --force starts over (its files deleted first)
    argv = sw.cell_command(cell, extra=["--overwrite"] if done else sw.resume_args(cell.output_dir))
    print(
        f"[sweep] {spec.name} cell {index}/{spec.size - 1}: {cell.params} seed={cell.seed}\n$ {shlex.join(argv)}",
        flush=True,
    )
    if args.dry_run:
        return 0
    cell.output_dir.mkdir(parents=True, exist_ok=True)
    (cell.output_dir / sw.CELL_FILE).write_text(json.dumps(sw.cell_record(cell, argv, dict(os.environ)), indent=1))
    os.execv(argv[0], argv)  # the training process replaces this one, so SLURM's signals (requeue) reach Lightning


def run_local(args) -> int:
    """Every unfinished cell as ``run-cell --index i`` in a subprocess, ``--parallel`` at a time, each logging to
    ``<sweep_dir>/logs/local_<i>.out``; exits 1 naming the cells that failed."""
    spec = checked_spec(args)
    if args.parallel < 1:
        raise ValueError(f"--parallel must be >= 1, got {args.parallel}")
    cells = sw.expand(spec)
    todo = deque(c for c in cells if args.force or sw.cell_status(c) != "done")
    logs = spec.sweep_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    print(
        f"sweep {spec.name!r}: {len(todo)} of {spec.size} cells to run here ({spec.size - len(todo)} done), "
        f"{args.parallel} at a time; logs in {logs}/local_<index>.out",
        flush=True,
    )
    env = dict(os.environ)
    if args.parallel > 1 and "OMP_NUM_THREADS" not in env:  # share the cores instead of oversubscribing them
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // args.parallel))
    running: dict[subprocess.Popen, tuple[sw.Cell, Path, float]] = {}
    failed: list[tuple[sw.Cell, Path, int]] = []
    try:
        while todo or running:
            while todo and len(running) < args.parallel:
                cell = todo.popleft()
                log = logs / f"local_{cell.index:03d}.out"
                argv = [
                    sys.executable,
                    "-m",
                    "lit_rlhf.experiments.sweep",
                    "run-cell",
                    str(args.spec),
                    "--index",
                    str(cell.index),
                    *(["--force"] if args.force else []),
                ]
                argv += ["--output_root", args.output_root] if args.output_root else []
                with log.open("w") as out:
                    proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)
                running[proc] = (cell, log, time.time())
                print(f"[sweep] cell {cell.index} started: {_describe(cell)}", flush=True)
            time.sleep(0.2)
            for proc in [p for p in running if p.poll() is not None]:
                cell, log, start = running.pop(proc)
                ok = proc.returncode == 0 and sw.cell_status(cell) == "done"
                verdict = "done" if ok else f"FAILED (exit {proc.returncode}; log {log})"
                print(f"[sweep] cell {cell.index} {verdict} after {time.time() - start:.0f} s", flush=True)
                if not ok:
                    failed.append((cell, log, proc.returncode))
    except KeyboardInterrupt:
        for proc in running:
            proc.terminate()
        raise
    if failed:
        for cell, log, _ in failed:
            tail = log.read_text(errors="replace").strip().splitlines()[-8:]
            print(f"--- cell {cell.index} ({_describe(cell)}), last lines of {log}:", *tail, sep="\n", file=sys.stderr)
        names = ", ".join(str(c.index) for c, _, _ in failed)
        print(
            f"sweep {spec.name!r}: {len(failed)} cell(s) failed: {names}; rerun run-local to retry them "
            "(finished cells are skipped)",
            file=sys.stderr,
        )
        return 1
    print(
        f"sweep {spec.name!r}: all {spec.size} cells done; results: {PROG} collect {shlex.quote(str(args.spec))}"
        + (f" --output_root {shlex.quote(args.output_root)}" if args.output_root else "")
    )
    return 0


def _describe(cell: sw.Cell) -> str:
    return " ".join([*(f"{k}={sw.format_value(v)}" for k, v in cell.params.items()), f"seed={cell.seed}"])


def collect(args) -> int:
    spec = sw.load_spec(args.spec, args.output_root)
    rows = sw.collect(spec)
    paths = sw.write_results(spec, rows)
    done = sum(r["status"] == "done" for r in rows)
    print(f"sweep {spec.name!r}: {done}/{len(rows)} cells done\n")
    print(paths[1].read_text())
    if args.report:
        from lit_rlhf import report

        paths += tuple(report.report_sweep(spec))
    print("written: " + "\n         ".join(str(p) for p in paths))
    return 0


def add_option(parser: argparse.ArgumentParser, name: str, **kwargs) -> None:
    """``--name`` spelled as the stages spell options (underscores), with the old hyphenated spelling kept working."""
    parser.add_argument(f"--{name}", **kwargs)
    if "_" in name:
        kwargs = {k: v for k, v in kwargs.items() if k != "help"}
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, help=argparse.SUPPRESS, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    formatter = argparse.RawDescriptionHelpFormatter
    prog = sys.argv[0] if sys.argv and sys.argv[0].startswith("lit-rlhf") else PROG  # as the user ran it
    parser = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=formatter)
    sub = parser.add_subparsers(dest="command", required=True)
    commands = {
        "plan": (plan, "check every cell with the stage's parser, print the cells and the sbatch command"),
        "submit": (submit, "submit the sweep as a SLURM job array and print its job id"),
        "run-cell": (run_cell, "run one cell (SLURM_ARRAY_TASK_ID or --index); what slurm/sweep_cell.sbatch calls"),
        "run-local": (run_local, "run every unfinished cell on this machine, no SLURM (--parallel N at a time)"),
        "collect": (collect, "write <output_root>/<name>/results.{csv,md} and results_by_config.csv (mean ± std)"),
    }
    for name, (fn, help_) in commands.items():
        p = sub.add_parser(name, help=help_, description=help_)
        p.set_defaults(fn=fn)
        p.add_argument("spec", help="sweep spec YAML (experiments/sweeps/*.yaml)")
        add_option(p, "output_root", default=None, help="replaces the spec's output_root")
        if name in ("plan", "run-cell"):
            p.add_argument("--index", type=int, default=None, help="cell index (run-cell: default SLURM_ARRAY_TASK_ID)")
        if name in ("submit", "run-cell"):
            add_option(p, "dry_run", action="store_true", help="print the command, run nothing")
        if name == "submit":
            add_option(p, "sbatch_args", default="", help="extra sbatch options, e.g. '--partition=gpu --time=2:00:00'")
            add_option(p, "only_missing", action="store_true", help="submit only the cells without final metrics")
        if name in ("run-cell", "run-local"):
            p.add_argument("--force", action="store_true", help="rerun cells that already have final metrics")
        if name == "run-local":
            p.add_argument("--parallel", type=int, default=1, help="cells at once (default 1)")
        if name == "collect":
            p.add_argument("--report", action="store_true", help="also plot the sweep (lit_rlhf.report): report.png/md")
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
