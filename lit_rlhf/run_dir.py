"""A run's output directory holds one run: a new run never mixes its files with another run's.

:func:`accept_output_dir` runs once the command line is parsed, before anything is built or written. It resolves
what the run resumes from (``--ckpt_path``; ``last``, and a SLURM requeue, which leaves ``hpc_ckpt_N.ckpt`` in the
directory, mean :func:`lit_rlhf.checkpointing.newest_checkpoint`), and refuses a new run (nothing to resume) into a
directory that holds another run's results (checkpoints, export, final metrics), saying how to resume it
(``--ckpt_path last``) or start over (``--overwrite``).

:func:`prepare_output_dir` runs once the run's inputs are checked too: with ``--overwrite`` it deletes the earlier
run's files (only the files a run writes; anything else stays), and it removes the temporaries that a kill during an
atomic write left behind (:mod:`lit_rlhf.io`). Only global rank zero changes files.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from lightning.fabric.utilities.rank_zero import rank_zero_only

from lit_rlhf.checkpointing import newest_checkpoint, run_checkpoints
from lit_rlhf.io import remove_stale_temporaries

RUN_FILES = (
    "checkpoints",
    "export",
    "csv",
    "wandb",
    "final_metrics.json",
    "config.yaml",
    "wandb_run_id",
    "samples.jsonl",
)
"""What a run writes into its ``output_dir`` (besides ``hpc_ckpt_*.ckpt``): what ``--overwrite`` deletes."""


class OutputDirInUse(FileExistsError):
    """A new run was pointed at a directory that holds another run's results."""


def run_results(output_dir: str | Path) -> list[Path]:
    """The results of a run found in ``output_dir``: checkpoint files, a non-empty ``export/``, final metrics."""
    out = Path(output_dir)
    found = list(run_checkpoints(out))
    if (out / "export").is_dir() and any(not p.name.startswith(".") for p in (out / "export").iterdir()):
        found.append(out / "export")  # (a killed export leaves only a hidden temporary)
    if (out / "final_metrics.json").is_file():
        found.append(out / "final_metrics.json")
    return found


def accept_output_dir(output_dir: str | Path, ckpt_path: str | None, overwrite: bool) -> str | None:
    """The checkpoint this run resumes from (None: a run from step 0), after checking that ``output_dir`` may take
    it; writes nothing. Raises ``ValueError`` (``overwrite`` with ``ckpt_path``) or :class:`OutputDirInUse`."""
    out = Path(output_dir)
    if overwrite and ckpt_path is not None:
        raise ValueError(
            f"--overwrite starts the run in {out} over and --ckpt_path={ckpt_path} resumes one: give only one of them"
        )
    if overwrite:
        return None
    requeued = ckpt_path is None and any(out.glob("hpc_ckpt_*.ckpt"))
    if ckpt_path is not None and ckpt_path != "last":
        return ckpt_path
    resume = newest_checkpoint(out) if ckpt_path == "last" or requeued else None
    if resume is None and (results := run_results(out)):
        names = ", ".join(str(p.relative_to(out)) for p in results[:4]) + (", ..." if len(results) > 4 else "")
        if ckpt_path is None and not requeued:
            raise OutputDirInUse(
                f"output directory {out} holds another run's results ({names}); not starting a new run there. "
                "Resume that run with --ckpt_path last, start over with --overwrite (deletes that run's files "
                "first), or choose another --output_dir."
            )
        raise OutputDirInUse(
            f"nothing to resume: no checkpoint in {out} loads, but it holds another run's results ({names}). "
            "Start over with --overwrite (deletes that run's files first) or choose another --output_dir."
        )
    return None if resume is None else str(resume)


def prepare_output_dir(output_dir: str | Path, overwrite: bool) -> None:
    """Once the run is accepted (its inputs checked too): on global rank zero, delete the earlier run's files
    (``overwrite``) or the temporaries a kill during an atomic write left behind."""
    if rank_zero_only.rank != 0:
        return
    out = Path(output_dir)
    if overwrite:
        clear_run(out)
    for d in (out, out / "checkpoints", out / "export"):
        remove_stale_temporaries(d)


def clear_run(output_dir: str | Path) -> list[Path]:
    """Delete the files an earlier run wrote into ``output_dir`` (:data:`RUN_FILES`, ``hpc_ckpt_*.ckpt``, stale
    temporaries); other files stay. Returns what was deleted."""
    out = Path(output_dir)
    removed = [*remove_stale_temporaries(out), *remove_stale_temporaries(out / "checkpoints")]
    for path in [*(out / name for name in RUN_FILES), *out.glob("hpc_ckpt_*.ckpt")]:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
        else:
            continue
        removed.append(path)
    return removed
