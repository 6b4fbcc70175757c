"""Preemption: a run killed by a real signal (SIGKILL) resumes from its last atomic checkpoint and continues with
the same per-step metrics as an uninterrupted run of the same seed (tolerance 1e-6: same data order via the
resumable sampler, same RNG state from the checkpoint, same optimizer state)."""

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.distributed_runs import ROOT, run_entry, step_metrics

DPO = [
    "--config",
    "experiments/dpo/tiny.yaml",
    "--data.num_train=12",
    "--checkpoint_every_n_steps=2",
    "--export=false",
    "--validate_before_fit=false",
    "--trainer.val_check_interval=100",
    "--data.num_val=4",
]


def kill_after_checkpoint(stage: str, output_dir, step: int, *args: str, wandb: str = "disabled") -> None:
    """Start the run, wait until ``checkpoints/step=<step>.ckpt`` exists, then SIGKILL the process."""
    cmd = [
        sys.executable,
        "-m",
        f"lit_rlhf.experiments.{stage}",
        *args,
        f"--wandb.mode={wandb}",
        "--output_dir",
        str(output_dir),
    ]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    target = output_dir / "checkpoints" / f"step={step}.ckpt"
    deadline = time.time() + 600
    while not target.exists():
        assert proc.poll() is None, f"run ended before step {step}: {proc.stderr.read().decode()[-3000:]}"
        assert time.time() < deadline, "timed out waiting for the checkpoint"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL


@pytest.mark.slow
def test_dpo_killed_and_resumed_matches_uninterrupted(tmp_path):
    full = run_entry("dpo", tmp_path / "full", *DPO, "--trainer.max_steps=8")
    killed = tmp_path / "killed"
    kill_after_checkpoint(
        "dpo", killed, 4, *DPO, "--trainer.max_steps=1000"
    )  # constant LR: max_steps changes nothing else
    resumed = run_entry(
        "dpo", killed, *DPO, "--trainer.max_steps=8", "--ckpt_path", str(killed / "checkpoints" / "step=4.ckpt")
    )
    assert resumed["global_step"] == 8
    after = step_metrics(killed)  # the resumed run's own CSV (steps 4..7)
    assert sorted(after)[:4] == [4, 5, 6, 7]
    for step in (4, 5, 6, 7):  # epoch boundary at step 6 (12 pairs, 4 per step... 3 batches/epoch)
        for key in ("train/loss", "train/rewards/margins", "train/logps/chosen"):
            assert after[step][key] == pytest.approx(full["steps"][step][key], abs=1e-6), (step, key)


# GRPO (mu = 2: a GRPO step, one global step, is 2 optimizer steps); a cosine schedule (over 8 optimizer steps) so the
# scheduler state matters; W&B offline so the run id and the growing sample table are checked too.
GRPO = [
    "--config",
    "experiments/grpo/tiny.yaml",
    "--trainer.max_steps=4",
    "--checkpoint_every_n_steps=1",
    "--export=false",
    "--validate_before_fit=false",
    "--trainer.val_check_interval=100",
    "--data.num_val=2",
    "--data.val_batch_size=2",
    "--model.optimizer.schedule=cosine",
    "--model.table_every_n_steps=1",
]


def _latest_samples_table(output_dir) -> list[list]:
    """The rows of the newest ``train/samples`` table version of all offline W&B runs in ``output_dir`` (each version
    holds every row so far, so the newest is the longest)."""
    import json

    paths = list(output_dir.glob("wandb/offline-run-*/files/media/table/train/samples_*.table.json"))
    assert paths, f"no train/samples table under {output_dir}"
    return max((json.loads(p.read_text())["data"] for p in paths), key=len)


@pytest.mark.slow
def test_grpo_killed_and_resumed_matches_uninterrupted(tmp_path):
    """GRPO killed by SIGKILL after GRPO step 2 (optimizer step 4) and resumed from ``step=2.ckpt`` continues exactly as
    the uninterrupted run: the same completions are sampled (sampling generator and global RNG restored), from the
    same prompts (resumable sampler), with the same weights, AdamW moments and learning rate (cosine schedule), and
    the sample table keeps the rows logged before the kill. W&B resumes the same run id. Tolerance: identical
    figures expected (same operations in the same order on the same CPU); 1e-6 absolute allows for nothing else."""
    from tests.wandb_readback import history, offline_records

    full = run_entry("grpo", tmp_path / "full", *GRPO, wandb="offline")
    killed = tmp_path / "killed"
    kill_after_checkpoint("grpo", killed, 2, *GRPO, wandb="offline")
    run_id = (killed / "wandb_run_id").read_text().strip()
    resumed = run_entry(
        "grpo", killed, *GRPO, "--ckpt_path", str(killed / "checkpoints" / "step=2.ckpt"), wandb="offline"
    )
    assert resumed["global_step"] == full["global_step"] == 4
    # W&B: the resumed process continued the same run (id file kept, a second offline directory with that id)
    assert (killed / "wandb_run_id").read_text().strip() == run_id
    run_dirs = sorted((killed / "wandb").glob("offline-run-*"))
    assert len(run_dirs) == 2 and all(d.name.endswith(run_id) for d in run_dirs)

    def by_step(output_dir) -> dict[int, dict]:
        """Training metrics by global step, read back from the newest offline W&B run file of ``output_dir``."""
        return {
            int(h["trainer/global_step"]): h for h in history(offline_records(str(output_dir))) if "train/loss" in h
        }

    before, after = (
        by_step(tmp_path / "full"),
        by_step(killed),
    )  # the resumed directory: its own records (the last 2 steps)
    assert len(before) == 4, sorted(before)  # one row of training metrics per GRPO step
    later = sorted(before)[2:]
    assert sorted(after) == later
    for step in later:
        for key in (
            "train/loss",
            "train/kl",
            "train/rewards/mean",
            "train/completions/mean_length",
            "train/entropy",
            "train/clip_ratio/low",
        ):
            assert after[step][key] == pytest.approx(before[step][key], abs=1e-6), (step, key)
    # the sample table: the resumed run's last version holds all 4 steps' rows, identical to the uninterrupted run's
    resumed_rows, full_rows = _latest_samples_table(killed), _latest_samples_table(tmp_path / "full")
    assert len(full_rows) == 16 and resumed_rows == full_rows  # 4 rows per GRPO step
