"""The shared LightningCLI of every stage: ``python -m lit_rlhf.experiments.<stage> [--config X.yaml] [--a.b=v]``.

Adds to Lightning's CLI: ``--trainer.strategy=fsdp2`` (Lightning's ``ModelParallelStrategy``; each stage shards
its networks with FSDP2 in ``configure_model``; ``ddp`` and the other Lightning strategies work as usual),
``--output_dir`` (everything of the run goes there: checkpoints, config, W&B files,
``export/``, ``final_metrics.json``), ``--ckpt_path`` (resume), ``--wandb.*`` (W&B logging; offline when no API key
is configured), ``--validate_before_fit`` (held-out metrics at step 0, for before/after comparisons). The
policy's name is linked to the data module's tokenizer, so a model is named once.
"""

from __future__ import annotations

import os
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

from lightning.fabric.plugins import CheckpointIO

from lit_rlhf.callbacks import ExportCallback
from lit_rlhf.checkpointing import AtomicCheckpointIO
from lit_rlhf.io import write_json

BASE_TRAINER_DEFAULTS: dict[str, Any] = {
    "accelerator": "auto",
    "devices": 1,
    "precision": "32-true",
    "log_every_n_steps": 1,
    "num_sanity_val_steps": 0,
    "gradient_clip_val": 1.0,
    "enable_progress_bar": True,
    "use_distributed_sampler": False,  # data modules shard one seeded permutation themselves (lit_rlhf.data.loaders)
    "inference_mode": False,  # no_grad for evaluation: tensors made there (metric states, caches) stay usable in training
}


DEFAULT_LINKS = {"model.policy.name": "data.tokenizer"}
"""Shared values declared once (source -> target): by default the policy's name gives the data's tokenizer."""


@dataclass
class WandbSettings:
    """Weights & Biases logging.

    Args:
        project: W&B project.
        mode: ``auto`` (online when an API key is configured, else offline), ``online``, ``offline``, or ``disabled``
            (metrics go to ``output_dir/csv`` instead).
        name: run name (default: W&B's generated name).
        group: run group (sweeps and pipelines set one group for all their runs).
        tags: run tags.
        entity: W&B entity (team or user).
    """

    project: str = "lit_rlhf"
    mode: Literal["auto", "online", "offline", "disabled"] = "auto"
    name: str | None = None
    group: str | None = None
    tags: list[str] = field(default_factory=list)
    entity: str | None = None


def wandb_mode(requested: str) -> str:
    if requested != "auto":
        return requested
    if os.environ.get("WANDB_MODE") in ("online", "offline", "disabled"):
        return os.environ["WANDB_MODE"]
    netrc = Path.home() / ".netrc"
    has_key = bool(os.environ.get("WANDB_API_KEY")) or (netrc.exists() and "api.wandb.ai" in netrc.read_text(errors="ignore"))
    return "online" if has_key else "offline"


def build_logger(settings: WandbSettings, output_dir: Path, resume: bool, config: dict):
    mode = wandb_mode(settings.mode)
    if mode == "disabled":
        from lightning.pytorch.loggers import CSVLogger

        return CSVLogger(save_dir=str(output_dir), name="csv")
    from lightning.pytorch.loggers import WandbLogger

    id_file = output_dir / "wandb_run_id"
    run_id = id_file.read_text().strip() if resume and id_file.exists() else None
    logger = WandbLogger(
        project=settings.project, name=settings.name, group=settings.group, tags=list(settings.tags),
        entity=settings.entity, save_dir=str(output_dir), offline=(mode == "offline"), id=run_id,
        resume="allow" if run_id else None, config=config,
    )
    return logger


class LoggerSaveConfig(SaveConfigCallback):
    """Writes the resolved config to ``output_dir/config.yaml`` (re-runnable) and W&B's run config."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.already_saved:
            return
        if trainer.is_global_zero:  # output_dir, not the logger's log_dir (csv/version_N when W&B is disabled)
            config_path = Path(trainer.default_root_dir) / self.config_filename
            config_path.parent.mkdir(parents=True, exist_ok=True)
            self.parser.save(self.config, str(config_path), skip_none=False, overwrite=True, multifile=False)
            if trainer.logger is not None:
                trainer.logger.log_hyperparams(self.config.as_dict())
            self.already_saved = True
        self.already_saved = trainer.strategy.broadcast(self.already_saved)


class RLHFCLI(LightningCLI):
    def __init__(
        self, model_class, datamodule_class, stage: str, trainer_defaults: dict[str, Any], args=None, description: str = "",
        links: dict[str, str] | None = None, defaults: dict[str, Any] | None = None,
    ) -> None:
        self.stage = stage
        self.links = DEFAULT_LINKS if links is None else links
        self.defaults = defaults or {}
        super().__init__(
            model_class,
            datamodule_class,
            run=False,
            args=args,
            trainer_defaults={**BASE_TRAINER_DEFAULTS, **trainer_defaults},
            seed_everything_default=0,
            save_config_callback=LoggerSaveConfig,
            save_config_kwargs={"overwrite": True, "config_filename": "config.yaml"},
            auto_configure_optimizers=False,
            parser_kwargs={"description": description, "default_env": False},
        )

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--output_dir", type=str, default=f"runs/{self.stage}", help="Where everything of the run is written.")
        parser.add_argument("--ckpt_path", type=str | None, default=None, help="Checkpoint to resume from ('last' = output_dir's latest).")
        parser.add_argument("--validate_before_fit", type=bool, default=True, help="Run validation at step 0 (before/after figures).")
        parser.add_argument("--checkpoint_every_n_steps", type=int, default=0, help="Also checkpoint every N steps (0: only at the end).")
        parser.add_argument("--export", type=bool, default=True, help="Export the trained model to output_dir/export at the end.")
        parser.add_dataclass_arguments(WandbSettings, "wandb")
        for source, target in self.links.items():
            parser.link_arguments(source, target)
        if self.defaults:  # the entry point's default experiment (a --config or command line overrides them)
            parser.set_defaults(self.defaults)

    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        cfg = self.config
        output_dir = Path(cfg.output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        callbacks = list(self._get(self.config_init, "trainer", default={}).get("callbacks") or [])
        every = cfg.checkpoint_every_n_steps or None
        callbacks.append(  # last.ckpt always; with --checkpoint_every_n_steps also step=N.ckpt files
            ModelCheckpoint(
                dirpath=output_dir / "checkpoints", filename="{step}", save_last=True, save_top_k=-1 if every else 0,
                every_n_train_steps=every,
            )
        )
        callbacks.append(ExportCallback(enabled=cfg.export))
        callbacks.append(ExitAfterRequeue())
        trainer_cfg = self._get(self.config_init, "trainer", default={})
        if trainer_cfg.get("strategy") == "fsdp2":
            kwargs["strategy"] = fsdp2_strategy(trainer_cfg.get("devices", 1), trainer_cfg.get("num_nodes", 1))
        if trainer_cfg.get("deterministic") is None and runs_on_cpu(trainer_cfg.get("accelerator", "auto")):
            kwargs["deterministic"] = True  # see runs_on_cpu: exact resume and reruns
        plugins = list(trainer_cfg.get("plugins") or [])
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            plugins.append(AtomicCheckpointIO())
        kwargs.update(
            plugins=plugins,
            default_root_dir=str(output_dir),
            callbacks=callbacks,
            logger=build_logger(cfg.wandb, output_dir, resume=is_resume(cfg.ckpt_path, output_dir), config={"stage": self.stage}),
        )
        return super().instantiate_trainer(**kwargs)


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
            _finish_wandb(trainer, preempted=True)  # first: the requeue's SIGTERM also stops W&B's service process
            if "wandb" in sys.modules:
                sys.modules["wandb"].teardown()
            requeue(signum, frame)
            raise SystemExit(0)

        signal.signal(env.requeue_signal, requeue_then_exit)


def runs_on_cpu(accelerator) -> bool:
    """Whether the Trainer will run on the CPU. There ``trainer.deterministic`` defaults to True: with more than one
    thread, CPU ``index_put_(accumulate=True)`` (the backward of advanced indexing with repeated indices, e.g. a
    prompt's KV cache gathered to its G completions) adds in a varying order, so two processes given the same
    inputs differ in the last bits and, a few sampled tokens later, visibly. Set it explicitly to override."""
    if isinstance(accelerator, str):
        if accelerator == "auto":
            return not torch.cuda.is_available() and not torch.backends.mps.is_available()
        return accelerator == "cpu"
    from lightning.pytorch.accelerators import CPUAccelerator

    return isinstance(accelerator, CPUAccelerator)


def fsdp2_strategy(devices, num_nodes: int):
    """Lightning's ModelParallelStrategy as pure FSDP2: all processes on the data-parallel mesh dimension.

    (Its default puts the processes of a node on the tensor-parallel dimension, which would leave FSDP2 a 1-rank
    mesh and every process training on its own.)
    """
    from lightning.pytorch.strategies import ModelParallelStrategy

    if isinstance(devices, (list, tuple)):
        per_node = len(devices)
    elif isinstance(devices, int) and devices > 0:
        per_node = devices
    elif isinstance(devices, str) and devices.isdigit():
        per_node = int(devices)
    else:  # "auto" / -1
        per_node = torch.cuda.device_count() if torch.cuda.is_available() else 1
    return ModelParallelStrategy(data_parallel_size=per_node * int(num_nodes), tensor_parallel_size=1)


def is_resume(ckpt_path: str | None, output_dir: Path) -> bool:
    """A resumed run: ``--ckpt_path`` given, or a SLURM-requeued job whose ``hpc_ckpt_N.ckpt`` Lightning restores by
    itself (the same command line, no ``--ckpt_path``). W&B then continues the run id kept in ``output_dir``."""
    return ckpt_path is not None or any(output_dir.glob("hpc_ckpt_*.ckpt"))


def resolve_ckpt_path(ckpt_path: str | None, output_dir: Path) -> str | None:
    if ckpt_path == "last":
        last = output_dir / "checkpoints" / "last.ckpt"
        return str(last) if last.exists() else None
    return ckpt_path


def run_stage(
    model_class, datamodule_class, stage: str, trainer_defaults: dict[str, Any], args=None, description: str = "",
    links: dict[str, str] | None = None, defaults: dict[str, Any] | None = None,
) -> RLHFCLI:
    """Parse the CLI/config, validate (step 0), fit, validate again, and write ``final_metrics.json``.

    ``defaults``: dotted keys (``"data.instruction"``) -> values of the stage's default experiment, over the classes'
    own defaults (like ``trainer_defaults`` for the Trainer)."""
    cli = RLHFCLI(
        model_class, datamodule_class, stage, trainer_defaults, args=args, description=description, links=links,
        defaults=defaults,
    )
    cfg, trainer = cli.config, cli.trainer
    output_dir = Path(cfg.output_dir)
    _remember_wandb_run(trainer, output_dir)
    ckpt_path = resolve_ckpt_path(cfg.ckpt_path, output_dir) or _newest_hpc_checkpoint(output_dir)
    start = {}
    if cfg.validate_before_fit and ckpt_path is None:
        start = _scalars(trainer.validate(cli.model, datamodule=cli.datamodule, verbose=False))
    trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt_path)
    _retire_hpc_checkpoints(trainer, output_dir)
    train_end = _scalars([trainer.callback_metrics])
    end = _scalars(trainer.validate(cli.model, datamodule=cli.datamodule, verbose=False))
    if trainer.is_global_zero:
        summary = {"stage": stage, "global_step": trainer.global_step, "start": start, "end": end, "train_last": train_end}
        write_json(output_dir / "final_metrics.json", summary)
        _print_summary(stage, start, end)
    _finish_wandb(trainer)
    _end_process_group(trainer)
    return cli


def _end_process_group(trainer: L.Trainer) -> None:
    """Destroy the process group (DDP/FSDP2) once every rank is done: a gloo group left to the interpreter's exit
    can abort a rank (``terminate called without an active exception``) after the work is finished. A later stage in
    the same process starts a new one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        trainer.strategy.barrier("end_of_stage")
        torch.distributed.destroy_process_group()


def _newest_hpc_checkpoint(output_dir: Path) -> str | None:
    """``output_dir/hpc_ckpt_N.ckpt`` with the largest N (saved by Lightning on a SLURM requeue signal), or None."""
    found = sorted(output_dir.glob("hpc_ckpt_*.ckpt"), key=lambda p: int(p.stem.rsplit("_", 1)[-1]))
    return str(found[-1]) if found else None


def _retire_hpc_checkpoints(trainer: L.Trainer, output_dir: Path) -> None:
    """Move consumed ``hpc_ckpt_N.ckpt`` files into ``checkpoints/``: while one sits in ``output_dir`` under SLURM,
    Lightning's ``validate()`` loads it instead of the weights just trained (and a later requeue would resume
    from it)."""
    if trainer.is_global_zero:
        for path in output_dir.glob("hpc_ckpt_*.ckpt"):
            (output_dir / "checkpoints").mkdir(exist_ok=True)
            os.replace(path, output_dir / "checkpoints" / path.name)
    trainer.strategy.barrier("retire_hpc_checkpoints")


def _finish_wandb(trainer: L.Trainer, preempted: bool = False) -> None:
    """Close the W&B run so its files are complete when the stage returns (pipelines run stages in one process)."""
    from lightning.pytorch.loggers import WandbLogger

    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger) and trainer.is_global_zero and logger._experiment is not None:
            if preempted:
                logger.experiment.mark_preempting()
            logger.experiment.finish()


def _remember_wandb_run(trainer: L.Trainer, output_dir: Path) -> None:
    from lightning.pytorch.loggers import WandbLogger

    if isinstance(trainer.logger, WandbLogger) and trainer.is_global_zero:
        (output_dir / "wandb_run_id").write_text(trainer.logger.experiment.id)


def _scalars(results: list[dict]) -> dict[str, float]:
    out = {}
    for r in results or []:
        for k, v in r.items():
            try:
                out[k] = float(v)
            except (TypeError, ValueError):
                continue
    return out


def _print_summary(stage: str, start: dict, end: dict) -> None:
    keys = sorted(set(start) | set(end))
    if not keys:
        return
    print(f"\n[lit_rlhf] {stage}: held-out metrics, start -> end")
    for k in keys:
        a, b = start.get(k), end.get(k)
        fa = f"{a:.4f}" if a is not None else "-"
        fb = f"{b:.4f}" if b is not None else "-"
        print(f"  {k:32s} {fa:>10s} -> {fb:>10s}")
