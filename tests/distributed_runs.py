"""Run a stage entry point as a subprocess (Lightning's DDP/FSDP launchers re-execute the command for each rank)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_entry(stage: str, output_dir: Path, *args: str, timeout: int = 600, wandb: str = "disabled") -> dict:
    """Run ``python -m lit_rlhf.experiments.<stage>`` (W&B off by default: metrics go to the CSV logger); return
    final_metrics.json plus per-step metrics (CSV only) and the process output."""
    cmd = [
        sys.executable,
        "-m",
        f"lit_rlhf.experiments.{stage}",
        *args,
        f"--wandb.mode={wandb}",
        "--output_dir",
        str(output_dir),
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    summary = json.loads((output_dir / "final_metrics.json").read_text())
    summary["steps"] = step_metrics(output_dir)
    summary["log"] = proc.stdout + proc.stderr
    summary["output_dir"] = str(output_dir)
    return summary


def step_metrics(output_dir: Path) -> dict[int, dict[str, float]]:
    """Per-step metrics from the CSV logger (``--wandb.mode=disabled``): {step: {name: value}}."""
    files = sorted(output_dir.glob("csv/version_*/metrics.csv"))
    out: dict[int, dict[str, float]] = {}
    for path in files[-1:]:
        with open(path) as f:
            for row in csv.DictReader(f):
                step = int(row["step"])
                for k, v in row.items():
                    if v not in ("", None) and k != "step":
                        out.setdefault(step, {})[k] = float(v)
    return out
