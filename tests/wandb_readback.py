"""Read an offline W&B run back with W&B's own tooling (``wandb leet inspect --json``)."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys


def offline_records(output_dir: str) -> list[dict]:
    runs = sorted(glob.glob(os.path.join(output_dir, "wandb", "offline-run-*", "run-*.wandb")))
    assert runs, f"no offline W&B run under {output_dir}/wandb"
    wandb_cli = os.path.join(os.path.dirname(sys.executable), "wandb")
    out = subprocess.run(
        [wandb_cli, "leet", "inspect", "--json", runs[-1]], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    return [json.loads(line) for line in out.stdout.splitlines() if line.strip().startswith("{")]


def history(records: list[dict]) -> list[dict]:
    return [r["history"]["item"] for r in records if r.get("type") == "history"]


def logged_config(records: list[dict]) -> dict:
    config: dict = {}
    for r in records:
        if r.get("type") == "config":
            item = r["config"].get("update", r["config"])
            if isinstance(item, dict):
                config.update(item)
    return config
