"""``--ckpt_path last`` (CLI, sweeps, pipelines: :func:`lit_rlhf.checkpointing.newest_checkpoint`) is the newest
checkpoint of the run that loads, by global step then time, among ``checkpoints/last*.ckpt``,
``checkpoints/step=*.ckpt`` and ``hpc_ckpt_*.ckpt`` (in the run directory or retired to ``checkpoints/``); a torn one
is skipped with a warning naming it. End to end: the issue's reproduction (a second run into a used directory is
refused; restarted with ``--overwrite``, killed, resumed with ``--ckpt_path last`` from its own checkpoint, with a
torn ``last.ckpt`` or none at all), one ``last.ckpt`` kept, the before-training metrics carried across the resume."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from lit_rlhf.checkpointing import checkpoint_global_step, newest_checkpoint, resolve_ckpt_path
from tests.distributed_runs import ROOT, run_entry, step_metrics
from tests.test_resume import kill_after_checkpoint


def save(path, step: int, mtime: float | None = None):
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"global_step": step, "state_dict": {"w": torch.ones(2)}}, path)
    if mtime is not None:
        os.utime(path, (mtime, mtime))
    return path


def tear(path):
    """What a kill or a full disk leaves: the first half of the file."""
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def test_newest_by_global_step_then_time(tmp_path):
    ck = tmp_path / "checkpoints"
    assert newest_checkpoint(tmp_path) is None and resolve_ckpt_path("last", tmp_path) is None
    last = save(ck / "last.ckpt", 4, mtime=100)
    save(ck / "step=3.ckpt", 3, mtime=200)  # newer file, older step
    assert newest_checkpoint(tmp_path) == last
    hpc = save(tmp_path / "hpc_ckpt_1.ckpt", 4, mtime=300)  # same step, newer: SLURM's save on the signal
    assert newest_checkpoint(tmp_path) == hpc
    retired = save(ck / "hpc_ckpt_2.ckpt", 5, mtime=50)
    assert newest_checkpoint(tmp_path) == retired
    assert resolve_ckpt_path("last", tmp_path) == str(retired)
    assert resolve_ckpt_path("some/where.ckpt", tmp_path) == "some/where.ckpt"
    assert resolve_ckpt_path(None, tmp_path) is None
    (tmp_path / "checkpoints" / "notes.txt").write_text("not a checkpoint")
    assert newest_checkpoint(tmp_path) == retired


def test_torn_checkpoints_are_skipped_with_a_warning_naming_them(tmp_path):
    ck = tmp_path / "checkpoints"
    save(ck / "step=2.ckpt", 2)
    three = save(ck / "step=3.ckpt", 3)
    last = save(ck / "last.ckpt", 4)
    tear(last)
    with pytest.raises(RuntimeError, match="failed finding central directory"):
        checkpoint_global_step(last)
    with pytest.warns(UserWarning, match=f"skipping checkpoint {last}: it does not load"):
        assert newest_checkpoint(tmp_path) == three
    tear(three)
    with pytest.warns(UserWarning, match="step=3.ckpt: it does not load"):
        assert newest_checkpoint(tmp_path) == ck / "step=2.ckpt"
    (ck / "step=2.ckpt").write_bytes(b"")
    with pytest.warns(UserWarning):
        assert newest_checkpoint(tmp_path) is None


def test_no_last_ckpt_resumes_from_the_newest_step_file(tmp_path):
    """A full disk can leave step=N.ckpt files and no last.ckpt; `last` still finds the newest step, by number."""
    for step in (2, 10, 4):
        save(tmp_path / "checkpoints" / f"step={step}.ckpt", step)
    assert newest_checkpoint(tmp_path) == tmp_path / "checkpoints" / "step=10.ckpt"


def test_legacy_versioned_last_files_are_candidates(tmp_path):
    """Directories written before ``last.ckpt`` was overwritten in place may hold ``last-v1.ckpt``."""
    save(tmp_path / "checkpoints" / "last.ckpt", 2)
    v1 = save(tmp_path / "checkpoints" / "last-v1.ckpt", 3)
    assert newest_checkpoint(tmp_path) == v1


def test_sharded_checkpoint_directories_count_once_complete(tmp_path):
    """FSDP2 (Lightning's ModelParallelStrategy) writes a checkpoint as a directory: shards, the distributed
    checkpoint's ``.metadata`` (written last) and Lightning's ``meta.pt`` (the global step)."""
    save(tmp_path / "checkpoints" / "step=2.ckpt", 2)
    sharded = tmp_path / "checkpoints" / "last.ckpt"
    save(sharded / "meta.pt", 3)
    (sharded / "__0_0.distcp").write_bytes(b"shard")
    with pytest.warns(UserWarning, match=f"skipping checkpoint {sharded}: .*without its .metadata"):
        assert newest_checkpoint(tmp_path) == tmp_path / "checkpoints" / "step=2.ckpt"
    (sharded / ".metadata").write_bytes(b"dcp")
    assert newest_checkpoint(tmp_path) == sharded and checkpoint_global_step(sharded) == 3


# ---------------------------------------------------------------------------------------------------- end to end
DPO = [
    "--config",
    "experiments/dpo/tiny.yaml",
    "--data.num_train=12",
    "--data.num_val=4",
    "--trainer.val_check_interval=100",
]


def _snapshot(directory) -> dict[str, tuple[int, bytes]]:
    return {
        str(p.relative_to(directory)): (p.stat().st_mtime_ns, p.read_bytes())
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def _stage(output_dir, *args: str) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "lit_rlhf.experiments.dpo",
        *args,
        "--wandb.mode=disabled",
        "--output_dir",
        str(output_dir),
    ]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_a_second_run_is_refused_and_a_restarted_one_resumes_its_own_checkpoint(tmp_path):
    d = tmp_path / "D"
    a = run_entry("dpo", d, *DPO, "--trainer.max_steps=4")  # run A: 4 steps, beta 0.1, exported
    # run B into D (beta 0.5): refused before anything is written, saying how to resume or start over
    before = _snapshot(d)
    b_args = [*DPO, "--model.beta=0.5", "--checkpoint_every_n_steps=1"]
    refused = _stage(d, *b_args, "--trainer.max_steps=5")
    assert refused.returncode != 0
    assert (
        f"output directory {d} holds another run's results (checkpoints/last.ckpt, export, final_metrics.json)"
        in refused.stderr
    ), refused.stderr[-3000:]
    assert "Resume that run with --ckpt_path last, start over with --overwrite" in refused.stderr
    assert _snapshot(d) == before, "a refused run changes nothing"
    # B started over (--overwrite deletes A's files), SIGKILLed once step=3.ckpt exists
    kill_after_checkpoint("dpo", d, 3, *b_args, "--trainer.max_steps=1000", "--overwrite")
    assert not (d / "export").exists() and not (d / "final_metrics.json").exists(), "A's results were deleted"
    assert torch.load(d / "checkpoints" / "step=3.ckpt", weights_only=True)["hyper_parameters"]["beta"] == 0.5
    torn, missing = tmp_path / "torn", tmp_path / "missing"
    shutil.copytree(d, torn)
    shutil.copytree(d, missing)
    tear(torn / "checkpoints" / "last.ckpt")  # a torn last.ckpt (written by B at step 2 or 3)
    (missing / "checkpoints" / "last.ckpt").unlink()  # no last.ckpt at all (a full disk)
    for out in (torn, missing):
        resumed = run_entry("dpo", out, *b_args, "--trainer.max_steps=5", "--ckpt_path", "last")
        assert f"Restoring states from the checkpoint path at {out / 'checkpoints' / 'step=3.ckpt'}" in resumed["log"]
        if out == torn:
            assert f"skipping checkpoint {out / 'checkpoints' / 'last.ckpt'}: it does not load" in resumed["log"]
        assert resumed["global_step"] == 5 and min(step_metrics(out)) == 3, "continued after step 3"
        names = sorted(p.name for p in (out / "checkpoints").iterdir())
        assert names == ["last.ckpt", "step=1.ckpt", "step=2.ckpt", "step=3.ckpt", "step=4.ckpt", "step=5.ckpt"]
        last = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
        assert last["global_step"] == 5 and last["hyper_parameters"]["beta"] == 0.5
        # the before-training metrics of the killed run (B's step 0 = A's step 0: the policy is the reference)
        assert resumed["start"] == pytest.approx(a["start"])
        assert resumed["start"]["val/loss"] == pytest.approx(0.6931472)
        assert json.loads((out / "final_metrics.json").read_text())["start"] == resumed["start"]


@pytest.mark.slow
def test_fsdp2_sharded_checkpoints_are_written_atomically_and_found_by_last(tmp_path):
    """2 processes with FSDP2: every checkpoint is a complete sharded directory (written under a temporary name, moved
    into place once all ranks wrote their shards: no temporaries left), and ``last`` resolves to the newest."""
    out, ck = tmp_path / "fsdp2", tmp_path / "fsdp2" / "checkpoints"
    fsdp = [
        *DPO,
        "--trainer.devices=2",
        "--trainer.strategy=fsdp2",
        "--data.batch_size=2",
        "--export=false",
        "--validate_before_fit=false",
        "--checkpoint_every_n_steps=1",
    ]
    run_entry("dpo", out, *fsdp, "--trainer.max_steps=2")
    assert sorted(p.name for p in ck.iterdir()) == ["last.ckpt", "step=1.ckpt", "step=2.ckpt"]
    assert all((p / ".metadata").is_file() and (p / "meta.pt").is_file() for p in ck.iterdir())
    assert newest_checkpoint(out) in (ck / "last.ckpt", ck / "step=2.ckpt")
    assert checkpoint_global_step(ck / "last.ckpt") == 2 and checkpoint_global_step(ck / "step=1.ckpt") == 1
    # and the run resumes from it (stages set strict_loading in __init__: FSDP2 loads before on_load_checkpoint)
    resumed = run_entry("dpo", out, *fsdp, "--trainer.max_steps=3", "--ckpt_path", "last")
    assert resumed["global_step"] == 3 and min(resumed["steps"]) == 2, "continued after step 2"


@pytest.mark.slow
def test_a_full_fine_tune_checkpoint_resumed_into_a_lora_run_names_the_cause(tmp_path):
    """The stages load checkpoints non-strictly (they hold only trainable weights); a checkpoint of other model
    settings is refused before the optimizer states are restored, with the cause, not an optimizer-group error."""
    out = tmp_path / "run"
    base = [*DPO, "--validate_before_fit=false", "--export=false", "--trainer.val_check_interval=2"]
    run_entry("dpo", out, *base, "--trainer.max_steps=2")
    cmd = [sys.executable, "-m", "lit_rlhf.experiments.dpo", *base, "--trainer.max_steps=3", "--ckpt_path", "last"]
    cmd += ["--model.policy.lora={}", "--model.policy.lora.r=4", "--wandb.mode=disabled", "--output_dir", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    assert "does not fit this run's model" in proc.stderr and "full fine-tune vs LoRA" in proc.stderr
