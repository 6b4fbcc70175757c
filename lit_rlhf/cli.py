"""The shared LightningCLI of every stage: ``python -m lit_rlhf.experiments.<stage> [--config X.yaml] [--a.b=v]``.

Adds to Lightning's CLI: ``--trainer.strategy=fsdp2`` (Lightning's ``ModelParallelStrategy``; each stage shards
its networks with FSDP2 in ``configure_model``; ``ddp`` and the other Lightning strategies work as usual),
``--output_dir`` (everything of the run goes there: checkpoints, config, W&B files,
``export/``, ``final_metrics.json``; a new run into a directory holding another run's results is refused, see
:mod:`lit_rlhf.run_dir`), ``--ckpt_path`` (resume; ``last``: :func:`lit_rlhf.checkpointing.newest_checkpoint`),
``--overwrite`` (start over there), ``--nan_policy`` (:class:`lit_rlhf.callbacks.DivergenceGuard`), ``--wandb.*``
(W&B logging; offline when no API key is configured), ``--validate_before_fit`` (held-out metrics at step 0, for
before/after comparisons; kept in the checkpoints, so ``final_metrics.json`` has them after a resume too). The
data module is given the stage's tokenizer (``datamodule.connect(model.tokenizer)``), so a model is named once.

:func:`run_stage` is a run's life: parse, validate, fit, validate, write ``final_metrics.json``, print the summary.
Logging setup lives in :mod:`lit_rlhf.loggers`, SLURM requeue in :mod:`lit_rlhf.requeue`, the FSDP2 strategy and
CPU determinism in :mod:`lit_rlhf.hardware`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from jsonargparse import Namespace
from lightning.fabric.plugins import CheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

from lit_rlhf.callbacks import CheckpointFit, DivergenceGuard, ExportCallback, StartMetrics
from lit_rlhf.checkpointing import AtomicCheckpointIO
from lit_rlhf.cli_help import USAGE, HelpAllAction, RawDescriptionFormatter, StageArgumentParser, stage_prog
from lit_rlhf.hardware import fsdp2_strategy, runs_on_cpu
from lit_rlhf.io import write_json, write_text
from lit_rlhf.loggers import WandbSettings, continue_wandb_run, finish_wandb, remember_wandb_run, resolve_loggers
from lit_rlhf.requeue import ExitAfterRequeue, retire_hpc_checkpoints
from lit_rlhf.run_dir import accept_output_dir, prepare_output_dir

BASE_TRAINER_DEFAULTS: dict[str, Any] = {
    "accelerator": "auto",
    "devices": 1,
    "precision": "32-true",
    "log_every_n_steps": 1,
    "num_sanity_val_steps": 0,
    "gradient_clip_val": 1.0,
    "enable_progress_bar": True,
    "use_distributed_sampler": False,  # data modules shard one seeded permutation themselves (lit_rlhf.data.loaders)
    "inference_mode": False,  # no_grad in eval: tensors made there (metric states, caches) stay usable in training
}


class LoggerSaveConfig(SaveConfigCallback):
    """Writes the resolved config to ``output_dir/config.yaml`` (re-runnable) and to every logger's hyperparameters,
    and keeps the W&B run id in ``output_dir/wandb_run_id``: when training starts, so a run that fails before leaves
    an earlier run's files as they were (both written atomically)."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        pass  # (Lightning's SaveConfigCallback writes here; see on_train_start)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.already_saved:
            return
        if trainer.is_global_zero:  # output_dir, not a logger's log_dir
            config_path = Path(trainer.default_root_dir) / self.config_filename
            write_text(config_path, self.parser.dump(self.config, skip_none=False))
            remember_wandb_run(trainer, Path(trainer.default_root_dir))
            hparams = {k: v for k, v in self.config.as_dict().items() if k != "config"}  # not the --config paths
            for logger in trainer.loggers:
                logger.log_hyperparams(hparams)
            self.already_saved = True
        self.already_saved = trainer.strategy.broadcast(self.already_saved)


@dataclass
class ExportSettings:
    """Export of the trained model to ``output_dir/export`` at the end (``--export=false``: none).

    Args:
        enabled: write the export.
        dtype: dtype of the merged weights (``export/merged``); null: the training dtype (``model.*.dtype``).
    """

    enabled: bool = True
    dtype: Literal["float32", "bfloat16", "float16"] | None = None


class RLHFCLI(LightningCLI):
    """Lightning's CLI plus the run's ``output_dir``, checkpoints, export, loggers, FSDP2 and CPU determinism.

    Before the classes are instantiated (and so before ``config.yaml`` is written) the config is completed with what
    will run: ``trainer.default_root_dir`` = ``output_dir``, ``trainer.deterministic`` = true on the CPU when unset
    (see :func:`lit_rlhf.hardware.runs_on_cpu`), ``trainer.logger`` = the explicit logger list
    (:func:`lit_rlhf.loggers.resolve_loggers`: W&B by default, the run's CSV always). A ``ModelCheckpoint`` writing
    ``output_dir/checkpoints/last.ckpt`` is added unless ``--trainer.enable_checkpointing=false``.
    """

    def __init__(
        self,
        model_class,
        datamodule_class,
        stage: str,
        trainer_defaults: dict[str, Any],
        args=None,
        description: str = "",
        defaults: dict[str, Any] | None = None,
    ) -> None:
        self.stage = stage
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
            parser_class=StageArgumentParser,
            parser_kwargs={
                "description": description,
                "default_env": False,
                "prog": stage_prog(stage),
                "usage": USAGE,
                "formatter_class": RawDescriptionFormatter,
            },
        )

    def init_parser(self, **kwargs: Any) -> StageArgumentParser:
        parser = super().init_parser(**kwargs)
        parser.add_argument("--help-all", "--help_all", action=HelpAllAction, help="Also list the Trainer's options.")
        return parser

    def add_arguments_to_parser(self, parser) -> None:
        add = parser.add_argument
        add("--output_dir", type=str, default=f"runs/{self.stage}", help="Where everything of the run is written.")
        add("--ckpt_path", type=str | None, default=None, help="Checkpoint to resume from ('last': the newest).")
        add("--validate_before_fit", type=bool, default=True, help="Run validation at step 0 (before/after figures).")
        add("--checkpoint_every_n_steps", type=int, default=0, help="Also checkpoint every N steps (0: at the end).")
        overwrite_help = "Start over in an output_dir that holds another run (deletes that run's files first)."
        add("--overwrite", type=bool, nargs="?", const=True, default=False, help=overwrite_help)
        nan_help = "On a NaN/inf loss or gradient norm: stop with an error, or skip that optimizer step (counted)."
        add("--nan_policy", type=Literal["stop", "skip_step"], default="stop", help=nan_help)
        export_help = "Export to output_dir/export at the end (false: none; --export.dtype: the merged weights' dtype)."
        add("--export", type=ExportSettings | bool, default=ExportSettings(), help=export_help)
        parser.add_class_arguments(WandbSettings, "wandb")
        if self.defaults:  # the entry point's default experiment (a --config or command line overrides them)
            parser.set_defaults(self.defaults)

    def before_instantiate_classes(self) -> None:
        """Complete the config with what will run (see the class doc) before anything is built or saved."""
        cfg, trainer = self.config, self.config.trainer
        output_dir = Path(cfg.output_dir)
        trainer.default_root_dir = str(output_dir)
        if trainer.deterministic is None and runs_on_cpu(_accelerator_name(trainer.accelerator)):
            trainer.deterministic = True
        trainer.logger = resolve_loggers(trainer.logger, cfg.wandb, output_dir, self.stage)
        if trainer.enable_checkpointing is False and cfg.checkpoint_every_n_steps:
            self.parser.error("--checkpoint_every_n_steps needs --trainer.enable_checkpointing (not false)")
        if cfg.overwrite and cfg.ckpt_path is not None:
            self.parser.error(f"--overwrite starts the run over and --ckpt_path={cfg.ckpt_path} resumes it: give one")
        self.resume_from = accept_output_dir(output_dir, cfg.ckpt_path, cfg.overwrite)  # or refuse the directory

    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        cfg = self.config
        output_dir = Path(cfg.output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        trainer_cfg = self._get(self.config_init, "trainer", default={})
        callbacks = list(trainer_cfg.get("callbacks") or [])
        every = cfg.checkpoint_every_n_steps or None
        if cfg.trainer.enable_checkpointing is not False:  # last.ckpt; with --checkpoint_every_n_steps also step=N.ckpt
            callbacks.append(
                ModelCheckpoint(
                    dirpath=output_dir / "checkpoints",
                    filename="{step}",
                    save_last=True,
                    save_top_k=-1 if every else 0,
                    every_n_train_steps=every,
                    enable_version_counter=False,  # one last.ckpt, overwritten (atomically), never last-v1.ckpt
                )
            )
        export = Namespace(enabled=cfg.export, dtype=None) if isinstance(cfg.export, bool) else cfg.export
        callbacks.append(ExportCallback(enabled=export.enabled, dtype=export.dtype))
        callbacks += [ExitAfterRequeue(), DivergenceGuard(cfg.nan_policy), StartMetrics(), CheckpointFit()]
        if trainer_cfg.get("strategy") == "fsdp2":
            kwargs["strategy"] = fsdp2_strategy(trainer_cfg.get("devices", 1), trainer_cfg.get("num_nodes", 1))
        plugins = list(trainer_cfg.get("plugins") or [])
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            plugins.append(AtomicCheckpointIO())
        kwargs.update(plugins=plugins, callbacks=callbacks)
        if self.resume_from is not None:  # continue the W&B run kept in output_dir (not in config.yaml)
            kwargs["logger"] = continue_wandb_run(cfg.trainer.logger, trainer_cfg.get("logger"), output_dir)
        return super().instantiate_trainer(**kwargs)


def _accelerator_name(accelerator: Any) -> Any:
    """A config's accelerator as :func:`runs_on_cpu` takes it (a ``class_path`` entry by its class name)."""
    if isinstance(accelerator, Namespace):
        return "cpu" if str(accelerator.get("class_path", "")).endswith("CPUAccelerator") else "other"
    return accelerator


def run_stage(
    model_class,
    datamodule_class,
    stage: str,
    trainer_defaults: dict[str, Any],
    args=None,
    description: str = "",
    defaults: dict[str, Any] | None = None,
    cli_class: type[RLHFCLI] = RLHFCLI,
) -> RLHFCLI:
    """Parse the CLI/config, validate (step 0), fit, validate again, and write ``final_metrics.json``.

    ``defaults``: dotted keys (``"data.instruction"``) -> values of the stage's default experiment, over the classes'
    own defaults (like ``trainer_defaults`` for the Trainer). ``cli_class``: an :class:`RLHFCLI` subclass with more
    options or work before the classes are built (``lit-rlhf rft`` samples its training data there)."""
    cli = cli_class(
        model_class, datamodule_class, stage, trainer_defaults, args=args, description=description, defaults=defaults
    )
    cli.datamodule.connect(cli.model.tokenizer)  # data modules are given their tokenizer, they load no model
    cli.datamodule.setup("fit")  # bad data and runs that cannot learn fail here, before anything is written
    cfg, trainer = cli.config, cli.trainer
    output_dir, ckpt_path = Path(cfg.output_dir), cli.resume_from  # output_dir accepted, resume target resolved
    prepare_output_dir(output_dir, overwrite=cfg.overwrite)  # --overwrite: the earlier run's files go only now
    kept = next(c for c in trainer.callbacks if isinstance(c, StartMetrics))  # restored from the checkpoint
    if cfg.validate_before_fit and ckpt_path is None:
        kept.metrics = _scalars(trainer.validate(cli.model, datamodule=cli.datamodule, verbose=False))
    trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt_path)
    start = kept.metrics
    retire_hpc_checkpoints(trainer, output_dir)
    train_end = _scalars([trainer.callback_metrics])
    end = _scalars(trainer.validate(cli.model, datamodule=cli.datamodule, verbose=False))
    if trainer.is_global_zero:
        summary = dict(stage=stage, global_step=trainer.global_step, start=start, end=end, train_last=train_end)
        write_json(output_dir / "final_metrics.json", summary)
        _print_summary(stage, start, end)
    finish_wandb(trainer)
    _end_process_group(trainer)
    return cli


def _end_process_group(trainer: L.Trainer) -> None:
    """Destroy the process group (DDP/FSDP2) once every rank is done: a gloo group left to the interpreter's exit
    can abort a rank (``terminate called without an active exception``) after the work is finished. A later stage in
    the same process starts a new one. A vLLM rollout engine is shut down first (it joined or created the group)."""
    from lit_rlhf.vllm_engine import release

    release()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        trainer.strategy.barrier("end_of_stage")
        torch.distributed.destroy_process_group()


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
