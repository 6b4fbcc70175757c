"""SLURM preemption and requeue (``sbatch --signal=USR1@..`` with Lightning's auto-requeue).

On the signal Lightning saves ``output_dir/hpc_ckpt_N.ckpt`` and runs ``scontrol requeue``; :class:`ExitAfterRequeue`
then closes the W&B run as preempted and exits. The requeued job runs the same command line: an ``hpc_ckpt_N.ckpt``
in ``output_dir`` makes it a resume (:func:`lit_rlhf.run_dir.accept_output_dir`: from the newest checkpoint that
loads, continuing the W&B run), and :func:`retire_hpc_checkpoints` moves it out of the way once training has
finished.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import lightning as L

from lit_rlhf.loggers import finish_wandb


class ExitAfterRequeue(L.Callback):
    """Under SLURM auto-requeue (``--signal=USR1@..``): mark the W&B run preempted and close it, let Lightning's
    handler save ``hpc_ckpt_N.ckpt`` and run ``scontrol requeue``, then exit. Otherwise this process would train on
    until SLURM kills it, still holding the W&B run id that the requeued job resumes."""

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from lightning.fabric.plugins.environments import SLURMEnvironment

        env = trainer._accelerator_connector.cluster_environment  # what Lightning's signal connector reads
        if not (isinstance(env, SLURMEnvironment) and env.auto_requeue):
            return
        requeue = signal.getsignal(env.requeue_signal)
        if not callable(requeue):
            return

        def requeue_then_exit(signum, frame) -> None:
            finish_wandb(trainer, preempted=True)  # first: the requeue's SIGTERM also stops W&B's service process
            if "wandb" in sys.modules:
                sys.modules["wandb"].teardown()
            requeue(signum, frame)
            raise SystemExit(0)

        signal.signal(env.requeue_signal, requeue_then_exit)


def retire_hpc_checkpoints(trainer: L.Trainer, output_dir: Path) -> None:
    """Move consumed ``hpc_ckpt_N.ckpt`` files into ``checkpoints/``: while one sits in ``output_dir`` under SLURM,
    Lightning's ``validate()`` loads it instead of the weights just trained (and a later requeue would resume
    from it)."""
    if trainer.is_global_zero:
        for path in output_dir.glob("hpc_ckpt_*.ckpt"):
            (output_dir / "checkpoints").mkdir(exist_ok=True)
            os.replace(path, output_dir / "checkpoints" / path.name)
    trainer.strategy.barrier("retire_hpc_checkpoints")
