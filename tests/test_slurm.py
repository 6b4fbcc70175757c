"""A real SLURM cluster on localhost (munged + slurmctld + slurmd, see tests/slurm_cluster.py) runs a 3-cell sweep
of tiny DPO runs as a job array through ``slurm/sweep_cell.sbatch``; then ``collect`` builds the results table.

SLURM + munge are installed with apt-get where missing (root + Debian/Ubuntu); the test is skipped, saying why, only
where that is impossible. Run it alone with ``pytest -s -m slurm tests/test_slurm.py`` (-s shows job ids and table).
"""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from lit_rlhf import sweep as sw
from tests.slurm_cluster import LocalSlurm, ensure_slurm_installed

REPO = Path(__file__).resolve().parents[1]
SPEC = "experiments/sweeps/dpo-tiny-beta.yaml"

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


@pytest.fixture(scope="session")
def local_slurm(tmp_path_factory):
    reason = ensure_slurm_installed()
    if reason:
        pytest.skip(f"SLURM cannot be installed here: {reason}")
    cluster = LocalSlurm(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
        print(f"\n[slurm] one-node cluster up: node {cluster.node}, {cluster.cpus} CPUs, SLURM_CONF={cluster.conf}")
        yield cluster
    finally:
        cluster.stop()


def job_env(cluster: LocalSlurm) -> dict[str, str]:
    """The submitting shell's environment (sbatch exports it to the job): SLURM_CONF, offline settings, this venv."""
    env = {**cluster.env, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    if sys.prefix != sys.base_prefix:
        env["VENV"] = sys.prefix  # the sbatch templates activate $VENV
    return env


def sweep_cli(cluster: LocalSlurm, *args: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "lit_rlhf.experiments.sweep", *args],
        cwd=REPO,
        env=job_env(cluster),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def cell_logs(sweep_dir: Path) -> str:
    return "\n".join(
        f"--- {p}\n{p.read_text(errors='replace')[-3000:]}" for p in sorted((sweep_dir / "logs").glob("*.out"))
    )


def test_sweep_runs_as_a_slurm_job_array(local_slurm, tmp_path):
    root = tmp_path / "runs"
    spec = sw.load_spec(REPO / SPEC, output_root=str(root))
    assert spec.size == 3

    out = sweep_cli(local_slurm, "submit", SPEC, "--output_root", str(root))
    print(out)
    job_id = out.strip().splitlines()[-1].removeprefix("job_id=")
    assert job_id.isdigit(), out
    assert "--array=0-2%1 " in out

    states = local_slurm.wait(job_id, timeout=900)
    print(f"[slurm] job array {job_id} finished: {states}")
    assert states == {f"{job_id}_{i}": "COMPLETED" for i in range(3)}, cell_logs(spec.sweep_dir) + local_slurm.logs()

    for cell in sw.expand(spec):
        d = cell.output_dir
        metrics = json.loads((d / "final_metrics.json").read_text())
        assert metrics["stage"] == "dpo" and metrics["global_step"] == 4
        assert all(math.isfinite(v) for v in metrics["end"].values()) and "val/loss" in metrics["end"]
        assert (d / "export" / "merged" / "config.json").is_file()
        record = json.loads((d / sw.CELL_FILE).read_text())
        assert record["slurm_job"] == f"{job_id}_{cell.index}" and record["index"] == cell.index
        config = yaml.safe_load((d / "config.yaml").read_text())
        assert config["model"]["beta"] == cell.params["model.beta"]
        assert config["wandb"]["group"] == spec.name and config["wandb"]["tags"] == [spec.name, "dpo"]
        assert list((d / "wandb").glob("offline-run-*")), f"no W&B run in {d}"
        log = spec.sweep_dir / "logs" / f"{job_id}_{cell.index}.out"
        assert f"[sweep] dpo-tiny-beta cell {cell.index}/2" in log.read_text()

    out = sweep_cli(local_slurm, "collect", SPEC, "--output_root", str(root))
    print(out)
    assert "3/3 cells done" in out
    rows = list(csv.DictReader((spec.sweep_dir / "results.csv").open()))
    assert [r["cell"] for r in rows] == ["0", "1", "2"]
    assert [float(r["model.beta"]) for r in rows] == [0.05, 0.1, 0.5]
    assert [r["job"] for r in rows] == [f"{job_id}_{i}" for i in range(3)]
    assert all(r["status"] == "done" and r["step"] == "4" for r in rows)
    assert all(math.isfinite(float(r["val/loss"])) and 0 <= float(r["val/rewards/accuracies"]) <= 1 for r in rows)
    cells_table, _, by_config = (spec.sweep_dir / "results.md").read_text().strip().split("\n\n")
    assert len(cells_table.splitlines()) == 2 + 3 and len(by_config.splitlines()) == 2 + 3  # one seed per beta

    # a resubmission of a finished sweep has nothing to do
    assert "nothing to submit" in sweep_cli(local_slurm, "submit", SPEC, "--output_root", str(root), "--only_missing")


PREEMPT_SPEC = """
name: preempt
stage: dpo
base_config: experiments/dpo/tiny.yaml
output_root: {root}
fixed:
  trainer.max_steps: 24
  trainer.val_check_interval: 24
  trainer.enable_progress_bar: false
  data.num_val: 8
  checkpoint_every_n_steps: 2
"""


def test_preempted_cell_requeues_and_resumes(local_slurm, tmp_path):
    """SIGUSR1 to the cell (what ``--signal=B:USR1@90`` sends before the time limit) makes Lightning save
    ``hpc_ckpt_1.ckpt`` and ``scontrol requeue`` the task; the requeued task resumes from the newest checkpoint
    (``run-cell`` adds ``--ckpt_path``) and finishes its 24 steps."""
    spec_path = tmp_path / "preempt.yaml"
    spec_path.write_text(PREEMPT_SPEC.format(root=tmp_path / "runs"))
    job_id = sweep_cli(local_slurm, "submit", str(spec_path)).strip().splitlines()[-1].removeprefix("job_id=")
    cell_dir = tmp_path / "runs" / "preempt" / "cell-000"
    log = tmp_path / "runs" / "preempt" / "logs" / f"{job_id}_0.out"

    deadline = time.time() + 600
    while not (cell_dir / "checkpoints" / "last.ckpt").exists():  # training is under way (step >= 2)
        assert time.time() < deadline and local_slurm.job_states(job_id).get(f"{job_id}_0") in ("PENDING", "RUNNING"), (
            log.read_text(errors="replace") if log.exists() else local_slurm.logs()
        )
        time.sleep(0.5)
    local_slurm.run(["scancel", "--batch", "--signal=USR1", f"{job_id}_0"])
    print(f"[slurm] sent SIGUSR1 to {job_id}_0 (pre-emption notice)")

    states = local_slurm.wait(job_id, timeout=600)
    text = log.read_text(errors="replace")
    assert states == {f"{job_id}_0": "COMPLETED"}, text[-5000:]
    assert "Handling auto-requeue signal" in text and list(
        cell_dir.glob("checkpoints/hpc_ckpt_*.ckpt")
    )  # consumed, retired
    assert json.loads((cell_dir / sw.CELL_FILE).read_text())["restarts"] == 1
    resumed = [line for line in text.splitlines() if line.startswith("$ ") and "--ckpt_path=" in line]
    assert len(resumed) == 1, text[-5000:]
    # the hpc checkpoint is loaded by the resumed fit only, not by the final validation (which must see trained weights)
    assert text.count("Restoring states from the checkpoint path") == 1, text[-5000:]
    assert json.loads((cell_dir / "final_metrics.json").read_text())["global_step"] == 24
    print(f"[slurm] {job_id}_0 requeued once and resumed with {resumed[0].split()[-1]}; finished at step 24")


def test_multinode_template_ranks_come_from_srun(local_slurm, tmp_path):
    """``slurm/multinode_fsdp.sbatch`` on 1 node x 2 tasks (CPU processes and gloo standing in for GPUs and NCCL):
    srun starts two processes, Lightning's SLURMEnvironment makes them ranks 0 and 1 of one group, and they train
    with the template's FSDP2 strategy."""
    out_dir = tmp_path / "multinode"
    resources = [
        "--nodes=1",
        "--ntasks-per-node=2",
        "--gpus-per-node=0",
        "--cpus-per-task=1",
        "--mem=0",
        "--time=00:10:00",
    ]
    stage_args = [
        "--config",
        "experiments/dpo/tiny.yaml",
        "--output_dir",
        str(out_dir),
        "--trainer.accelerator=cpu",
        "--trainer.max_steps=4",
        "--trainer.val_check_interval=4",
        "--trainer.enable_progress_bar=false",
        "--data.num_val=8",
    ]
    proc = local_slurm.run(
        [
            "sbatch",
            "--parsable",
            *resources,
            f"--output={tmp_path}/%j.out",
            "slurm/multinode_fsdp.sbatch",
            "dpo",
            *stage_args,
        ],
        cwd=REPO,
        env=job_env(local_slurm),
    )
    job_id = proc.stdout.strip()
    print(f"[slurm] submitted slurm/multinode_fsdp.sbatch as job {job_id} (1 node x 2 tasks)")
    states = local_slurm.wait(job_id, timeout=600)
    log = (tmp_path / f"{job_id}.out").read_text(errors="replace")
    assert states == {job_id: "COMPLETED"}, log[-5000:]
    assert "GLOBAL_RANK: 0, MEMBER: 1/2" in log and "GLOBAL_RANK: 1, MEMBER: 2/2" in log, log[-5000:]
    trainer = yaml.safe_load((out_dir / "config.yaml").read_text())["trainer"]
    assert (trainer["strategy"], trainer["num_nodes"], str(trainer["devices"])) == ("fsdp2", 1, "2")
    assert json.loads((out_dir / "final_metrics.json").read_text())["global_step"] == 4
