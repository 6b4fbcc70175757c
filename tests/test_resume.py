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

DPO = ["--config", "experiments/dpo/tiny.yaml", "--data.num_train=12", "--checkpoint_every_n_steps=2", "--export=false",
       "--validate_before_fit=false", "--trainer.val_check_interval=100", "--data.num_val=4"]


def kill_after_checkpoint(stage: str, output_dir, step: int, *args: str) -> None:
    """Start the run, wait until ``checkpoints/step=<step>.ckpt`` exists, then SIGKILL the process."""
    cmd = [sys.executable, "-m", f"lit_rlhf.experiments.{stage}", *args, "--wandb.mode=disabled", "--output_dir", str(output_dir)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
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
    kill_after_checkpoint("dpo", killed, 4, *DPO, "--trainer.max_steps=1000")  # constant LR: max_steps changes nothing else
    resumed = run_entry("dpo", killed, *DPO, "--trainer.max_steps=8", "--ckpt_path", str(killed / "checkpoints" / "step=4.ckpt"))
    assert resumed["global_step"] == 8
    after = step_metrics(killed)  # the resumed run's own CSV (steps 4..7)
    assert sorted(after) [:4] == [4, 5, 6, 7]
    for step in (4, 5, 6, 7):  # epoch boundary at step 6 (12 pairs, 4 per step... 3 batches/epoch)
        for key in ("train/loss", "train/rewards/margins", "train/logps/chosen"):
            assert after[step][key] == pytest.approx(full["steps"][step][key], abs=1e-6), (step, key)
