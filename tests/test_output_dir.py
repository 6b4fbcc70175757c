"""A run's output directory holds one run (:mod:`lit_rlhf.run_dir`): a new run into another run's directory is refused
before anything is written, ``--overwrite`` starts over (deleting only a run's files), a run that fails before
training leaves the earlier files as they were, stale temporaries of killed atomic writes are removed, and files
honour the umask (:mod:`lit_rlhf.io`)."""

import contextlib
import os
import stat
import subprocess
import sys

import pytest
import torch

from lit_rlhf.checkpointing import AtomicCheckpointIO
from lit_rlhf.experiments import dpo as dpo_entry
from lit_rlhf.io import atomic_dir, atomic_file, write_json
from lit_rlhf.run_dir import RUN_FILES, OutputDirInUse, accept_output_dir, prepare_output_dir, run_results
from tests.distributed_runs import ROOT, run_entry


def ckpt(path, step: int = 1):
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"global_step": step}, path)
    return path


RESULTS = ["checkpoints/last.ckpt", "checkpoints/step=2.ckpt", "export/merged/model.safetensors", "final_metrics.json"]


@pytest.mark.parametrize("result", RESULTS)
def test_a_new_run_is_refused_where_another_run_left_results(tmp_path, result):
    (tmp_path / result).parent.mkdir(parents=True, exist_ok=True)
    ckpt(tmp_path / result) if result.endswith(".ckpt") else (tmp_path / result).write_text("{}")
    with pytest.raises(OutputDirInUse) as err:
        accept_output_dir(tmp_path, None, overwrite=False)
    assert str(err.value) == (
        f"output directory {tmp_path} holds another run's results ({result.split('/merged')[0]}); not starting a new "
        "run there. Resume that run with --ckpt_path last, start over with --overwrite (deletes that run's files "
        "first), or choose another --output_dir."
    )
    assert accept_output_dir(tmp_path, None, overwrite=True) is None, "--overwrite accepts it"


def test_a_directory_without_results_takes_a_new_run(tmp_path):
    assert accept_output_dir(tmp_path / "new", None, overwrite=False) is None
    for name in ("config.yaml", "wandb_run_id", "cell.json"):  # a run killed before its first checkpoint; a sweep cell
        (tmp_path / name).write_text("x")
    (tmp_path / "export" / ".merged.tmp-x1").mkdir(parents=True)  # an export killed mid-write
    assert run_results(tmp_path) == []
    assert accept_output_dir(tmp_path, None, overwrite=False) is None


def test_what_a_run_resumes_from(tmp_path):
    assert accept_output_dir(tmp_path, "last", overwrite=False) is None, "nothing yet: step 0"
    assert accept_output_dir(tmp_path, "/elsewhere/step=3.ckpt", overwrite=False) == "/elsewhere/step=3.ckpt"
    last = ckpt(tmp_path / "checkpoints" / "last.ckpt", 4)
    assert accept_output_dir(tmp_path, "last", overwrite=False) == str(last)
    hpc = ckpt(tmp_path / "hpc_ckpt_1.ckpt", 5)  # a SLURM-requeued job: the same command line, no --ckpt_path
    assert accept_output_dir(tmp_path, None, overwrite=False) == str(hpc)
    with pytest.raises(ValueError, match="--overwrite starts the run in .* over and --ckpt_path=last resumes one"):
        accept_output_dir(tmp_path, "last", overwrite=True)


def test_nothing_loadable_to_resume_is_an_error_when_results_are_there(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"torn")
    with pytest.warns(UserWarning, match="skipping checkpoint"), pytest.raises(OutputDirInUse) as err:
        accept_output_dir(tmp_path, "last", overwrite=False)
    assert str(err.value) == (
        f"nothing to resume: no checkpoint in {tmp_path} loads, but it holds another run's results "
        "(checkpoints/last.ckpt). Start over with --overwrite (deletes that run's files first) or choose another "
        "--output_dir."
    )


def test_overwrite_deletes_only_what_a_run_writes(tmp_path):
    for name in RUN_FILES:
        is_file = "." in name or name == "wandb_run_id"
        (tmp_path / name).write_text("x") if is_file else (tmp_path / name).mkdir()
    ckpt(tmp_path / "checkpoints" / "last.ckpt")
    ckpt(tmp_path / "hpc_ckpt_3.ckpt")
    (tmp_path / ".final_metrics.json.tmp-abc").write_text("torn")
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "cell.json").write_text("{}")
    prepare_output_dir(tmp_path, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cell.json", "notes.txt"]


def test_stale_temporaries_are_removed_when_a_run_starts(tmp_path):
    keep = [ckpt(tmp_path / "checkpoints" / "last.ckpt"), tmp_path / "export" / "merged" / "config.json"]
    keep[1].parent.mkdir(parents=True)
    keep[1].write_text("{}")
    stale_files = [tmp_path / "checkpoints" / ".last.ckpt.tmp-k2j3", tmp_path / ".wandb_run_id.tmp-1"]
    stale_dirs = [tmp_path / "export" / ".merged.old-77", tmp_path / "export" / ".adapter.tmp-x"]
    for path in stale_files:
        path.write_text("torn")
    for path in stale_dirs:
        path.mkdir()
        (path / "model.safetensors").write_text("torn")
    prepare_output_dir(tmp_path, overwrite=False)
    assert not any(p.exists() for p in stale_files + stale_dirs) and all(p.exists() for p in keep)


@contextlib.contextmanager
def umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


@pytest.mark.parametrize("mask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o027, 0o640, 0o750)])
def test_files_and_directories_honour_the_umask(tmp_path, mask, file_mode, dir_mode):
    """Not mkstemp's 0600 / mkdtemp's 0700, nor the 0600 some writers (safetensors) give their files."""
    mode = lambda p: stat.S_IMODE(os.stat(p).st_mode)  # noqa: E731
    with umask(mask):
        with atomic_file(tmp_path / "a.bin") as f:
            f.write(b"x")
        write_json(tmp_path / "m.json", {"a": 1})
        checkpoint = {"global_step": 1, "state_dict": {"w": torch.ones(1)}}
        AtomicCheckpointIO().save_checkpoint(checkpoint, tmp_path / "c.ckpt")
        with atomic_dir(tmp_path / "export" / "merged") as tmp:
            os.close(os.open(tmp / "model.safetensors", os.O_CREAT | os.O_WRONLY, 0o600))
            (tmp / "sub").mkdir(mode=0o700)
            (tmp / "run.sh").write_text("#!/bin/sh\n")
            os.chmod(tmp / "run.sh", 0o700)
    for name in ("a.bin", "m.json", "c.ckpt", "export/merged/model.safetensors"):
        assert mode(tmp_path / name) == file_mode, name
    for name in ("export/merged", "export/merged/sub"):
        assert mode(tmp_path / name) == dir_mode, name
    assert mode(tmp_path / "export/merged/run.sh") == dir_mode, "an executable stays executable"


def test_cli_refuses_before_building_anything(tmp_path, capsys):
    """The checks run right after parsing: no model is loaded, nothing is written."""
    ckpt(tmp_path / "checkpoints" / "last.ckpt")
    with pytest.raises(OutputDirInUse, match="--ckpt_path last"):
        dpo_entry.main(args=["--config", "experiments/dpo/tiny.yaml", "--output_dir", str(tmp_path)])
    with pytest.raises(SystemExit) as err:
        dpo_entry.main(
            args=[
                "--config",
                "experiments/dpo/tiny.yaml",
                "--output_dir",
                str(tmp_path),
                "--overwrite",
                "--ckpt_path",
                "last",
            ]
        )
    assert err.value.code == 2
    assert "--overwrite starts the run over and --ckpt_path=last resumes it: give one" in capsys.readouterr().err
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == ["checkpoints", "checkpoints/last.ckpt"]


@pytest.mark.slow
def test_a_run_failing_before_training_leaves_the_earlier_files(tmp_path):
    """A finished run (W&B offline: ``wandb_run_id`` too), then a resume from a torn checkpoint with another beta: it
    fails while restoring (after Lightning's setup, where config.yaml used to be rewritten); config.yaml,
    wandb_run_id and final_metrics.json are unchanged. Files are 0644 and directories 0755 at umask 022."""
    out = tmp_path / "run"
    args = ["--config", "experiments/dpo/tiny.yaml", "--trainer.max_steps=2", "--data.num_val=4"]
    with umask(0o022):
        run_entry("dpo", out, *args, wandb="offline")
    kept = {
        name: ((out / name).stat().st_mtime_ns, (out / name).read_bytes())
        for name in ("config.yaml", "wandb_run_id", "final_metrics.json")
    }
    torn = tmp_path / "torn.ckpt"
    torn.write_bytes((out / "checkpoints" / "last.ckpt").read_bytes()[:4096])
    cmd = [
        sys.executable,
        "-m",
        "lit_rlhf.experiments.dpo",
        *args,
        "--model.beta=0.7",
        "--ckpt_path",
        str(torn),
        "--wandb.mode=offline",
        "--output_dir",
        str(out),
    ]
    proc = subprocess.run(
        cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert {name: ((out / name).stat().st_mtime_ns, (out / name).read_bytes()) for name in kept} == kept
    assert stat.S_IMODE((out / "checkpoints" / "last.ckpt").stat().st_mode) == 0o644
    assert stat.S_IMODE((out / "export" / "merged" / "model.safetensors").stat().st_mode) == 0o644
    assert stat.S_IMODE((out / "export" / "merged").stat().st_mode) == 0o755
