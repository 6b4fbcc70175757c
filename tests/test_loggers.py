"""The run's loggers (``--trainer.logger`` honoured, W&B by default, the run's CSV always), ``config.yaml`` recording
what ran, ``--trainer.enable_checkpointing=false``, and the sample tables in ``samples.jsonl``."""

import json
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from jsonargparse import Namespace
from lightning.pytorch.loggers import CSVLogger

from lit_rlhf.loggers import CSV_LOGGER, RUN_CSV, WANDB_LOGGER, resolve_loggers
from lit_rlhf.metrics import SAMPLES_FILE, append_samples, log_table

ROOT = Path(__file__).resolve().parents[1]


def wandb_settings(mode: str = "offline") -> Namespace:
    return Namespace(project="p", mode=mode, name="n", group="g", tags=["t"], entity=None)


def csv_entry(save_dir: str, name: str) -> Namespace:
    return Namespace(class_path=CSV_LOGGER, init_args=Namespace(save_dir=save_dir, name=name))


def test_default_is_wandb_from_the_wandb_group_plus_the_run_csv(tmp_path):
    for requested in (None, True):
        wandb, csv = resolve_loggers(requested, wandb_settings(), tmp_path, "dpo")
        assert wandb.class_path == WANDB_LOGGER and csv.class_path == CSV_LOGGER
        args = wandb.init_args
        assert (args.project, args.name, args.group, args.tags, args.offline) == ("p", "n", "g", ["t"], True)
        assert args.save_dir == str(tmp_path) and args.config == {"stage": "dpo"}
        assert (csv.init_args.save_dir, csv.init_args.name) == (str(tmp_path), RUN_CSV)
    (wandb, _) = resolve_loggers(None, wandb_settings("online"), tmp_path, "dpo")
    assert wandb.init_args.offline is False


def test_wandb_disabled_leaves_the_csv_and_false_leaves_nothing(tmp_path):
    (only,) = resolve_loggers(None, wandb_settings("disabled"), tmp_path, "sft")
    assert only.class_path == CSV_LOGGER and only.init_args.name == RUN_CSV
    assert resolve_loggers(False, wandb_settings(), tmp_path, "sft") is False


def test_named_loggers_are_kept_and_the_run_csv_added_once(tmp_path):
    """A user's logger (any class, its own save_dir) is kept as given; the run's CSV is appended. A config.yaml of an
    earlier run already lists the run's CSV (a CSVLogger named ``csv``): it is not added twice, and it and the W&B
    logger follow the new ``output_dir``."""
    mine = csv_entry("/elsewhere", "lightning_logs")
    kept, run_csv = resolve_loggers(mine, wandb_settings(), tmp_path, "dpo")
    assert kept is mine and kept.init_args.save_dir == "/elsewhere"
    assert (run_csv.init_args.save_dir, run_csv.init_args.name) == (str(tmp_path), RUN_CSV)

    earlier = resolve_loggers(None, wandb_settings(), Path("/old/run"), "dpo")
    again = resolve_loggers(earlier, wandb_settings(), tmp_path, "dpo")
    assert [e.class_path for e in again] == [WANDB_LOGGER, CSV_LOGGER]
    assert all(e.init_args.save_dir == str(tmp_path) for e in again)


def test_samples_jsonl_appends_one_object_per_row_and_skips_repeated_rows(tmp_path):
    """A cumulative table (with a ``step`` column, every row so far at each call) adds only its rows of this step."""
    path = tmp_path / SAMPLES_FILE
    append_samples(path, "val/samples", ["prompt", "reward"], [["a", torch.tensor(0.5)], ["b", 1.0]], step=3)
    rows = [[1, "p", "c1", 0.1], [2, "p", "c2", 0.2]]
    append_samples(path, "train/samples", ["step", "prompt", "completion", "reward"], rows[:1], step=1)
    append_samples(path, "train/samples", ["step", "prompt", "completion", "reward"], rows, step=2)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert records[:2] == [
        {"key": "val/samples", "step": 3, "prompt": "a", "reward": 0.5},
        {"key": "val/samples", "step": 3, "prompt": "b", "reward": 1.0},
    ]
    assert [(r["key"], r["step"], r["completion"]) for r in records[2:]] == [
        ("train/samples", 1, "c1"),
        ("train/samples", 2, "c2"),
    ]


def test_log_table_writes_to_the_run_directory_only_with_a_logger(tmp_path):
    trainer = L.Trainer(accelerator="cpu", logger=CSVLogger(tmp_path), default_root_dir=tmp_path)
    log_table(trainer, "val/samples", ["prompt", "completion"], [["p", "c"]], step=7)
    (line,) = (tmp_path / SAMPLES_FILE).read_text().splitlines()
    assert json.loads(line) == {"key": "val/samples", "step": 7, "prompt": "p", "completion": "c"}
    silent = L.Trainer(accelerator="cpu", logger=False, default_root_dir=tmp_path / "none", enable_progress_bar=False)
    log_table(silent, "val/samples", ["prompt"], [["p"]])
    assert not (tmp_path / "none" / SAMPLES_FILE).exists()


@pytest.mark.slow
def test_named_csv_logger_no_checkpointing_and_config_yaml_describes_the_run(tmp_path):
    """``--trainer.logger=CSVLogger --trainer.logger.save_dir=X`` writes X's CSV (and the run's own CSV), creates no
    W&B run; ``--trainer.enable_checkpointing=false`` writes no checkpoint; ``config.yaml`` names both CSV loggers and
    ``deterministic: true`` (the CPU default) and parses again; ``samples.jsonl`` holds the validation tables."""
    out, elsewhere = tmp_path / "run", tmp_path / "X"
    cmd = [
        sys.executable,
        "-m",
        "lit_rlhf.experiments.dpo",
        "--config",
        "experiments/dpo/tiny.yaml",
        "--trainer.logger=CSVLogger",
        f"--trainer.logger.save_dir={elsewhere}",
        "--trainer.max_steps=2",
        "--trainer.enable_checkpointing=false",
        "--data.num_train=8",
        "--data.num_val=4",
        "--export=false",
        "--trainer.enable_progress_bar=false",
        "--output_dir",
        str(out),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]

    def train_losses(path: Path) -> list[str]:
        lines = path.read_text().splitlines()
        column = lines[0].split(",").index("train/loss")
        return [row.split(",")[column] for row in lines[1:] if row.split(",")[column]]

    assert len(train_losses(elsewhere / "lightning_logs" / "version_0" / "metrics.csv")) == 2
    assert len(train_losses(out / "csv" / "version_0" / "metrics.csv")) == 2
    assert not (out / "wandb").exists() and not (out / "wandb_run_id").exists()
    assert not list(out.rglob("*.ckpt")) and not (out / "checkpoints").exists()

    config = yaml.safe_load((out / "config.yaml").read_text())
    trainer = config["trainer"]
    assert trainer["deterministic"] is True and trainer["enable_checkpointing"] is False
    assert trainer["default_root_dir"] == str(out)
    loggers = [(e["class_path"], e["init_args"]["save_dir"], e["init_args"]["name"]) for e in trainer["logger"]]
    assert loggers == [(CSV_LOGGER, str(elsewhere), "lightning_logs"), (CSV_LOGGER, str(out), RUN_CSV)]
    reparse = [sys.executable, "-m", "lit_rlhf.experiments.dpo", "--config", str(out / "config.yaml"), "--print_config"]
    reparsed = subprocess.run(reparse, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert reparsed.returncode == 0, reparsed.stderr[-3000:]
    again = yaml.safe_load(reparsed.stdout)["trainer"]["logger"]  # the same loggers, the defaults spelled out
    assert [e["class_path"] for e in again] == [e["class_path"] for e in trainer["logger"]]
    assert all(e["init_args"].items() <= a["init_args"].items() for e, a in zip(trainer["logger"], again, strict=True))

    records = [json.loads(line) for line in (out / SAMPLES_FILE).read_text().splitlines()]
    assert {(r["key"], r["step"]) for r in records} == {("val/samples", 0), ("val/samples", 2)}
    assert all({"prompt", "chosen", "rejected", "margin"} <= set(r) for r in records)
