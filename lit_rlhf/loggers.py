"""Logging setup of a run: which Lightning loggers it uses, the W&B run id kept so a resumed run continues the same W&B
run, and closing W&B at the end.

:func:`resolve_loggers` turns ``trainer.logger`` into the explicit list that runs and that ``config.yaml`` records:

- unset (``null``/``true``): a ``WandbLogger`` from ``--wandb.*`` (offline without an API key), none with
  ``--wandb.mode=disabled``;
- one Lightning logger or a list of them (``--trainer.logger=CSVLogger --trainer.logger.save_dir=X``): those;
- ``false``: no logger at all (no CSV, no ``samples.jsonl``; ``report`` then has only ``final_metrics.json``).

Unless ``false``, the run's CSV is always added: ``CSVLogger(save_dir=OUTPUT_DIR, name="csv")``, i.e.
``OUTPUT_DIR/csv/version_N/metrics.csv`` (a resumed run adds ``version_N+1``; ``report`` joins them), so curves exist
without W&B. W&B files and the run's CSV follow ``--output_dir``: a ``WandbLogger``'s ``save_dir`` and that of a
``CSVLogger`` named ``csv`` are set to it, so re-running a ``config.yaml`` elsewhere never writes into the old run.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import lightning as L
from jsonargparse import Namespace

from lit_rlhf.io import write_text

WANDB_LOGGER = "lightning.pytorch.loggers.WandbLogger"
CSV_LOGGER = "lightning.pytorch.loggers.CSVLogger"
RUN_CSV = "csv"
"""Name (sub-directory of ``output_dir``) of the run's CSV logger."""


@dataclass
class WandbSettings:
    """Weights & Biases logging (the default logger, used when ``--trainer.logger`` is not given).

    Args:
        project: W&B project.
        mode: ``auto`` (online when an API key is configured, else offline), ``online``, ``offline``, or ``disabled``
            (no W&B; metrics still go to ``output_dir/csv``).
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
    """``requested`` unless ``auto``: then ``$WANDB_MODE`` if set, else online with an API key, offline without."""
    if requested != "auto":
        return requested
    if os.environ.get("WANDB_MODE") in ("online", "offline", "disabled"):
        return os.environ["WANDB_MODE"]
    netrc = Path.home() / ".netrc"
    has_key = bool(os.environ.get("WANDB_API_KEY")) or (
        netrc.exists() and "api.wandb.ai" in netrc.read_text(errors="ignore")
    )
    return "online" if has_key else "offline"


def resolve_loggers(requested: Any, settings: Namespace, output_dir: Path, stage: str) -> list | bool:
    """The loggers of a run (config entries ``{class_path, init_args}``, see the module doc), or False for none.

    ``requested``: the parsed ``trainer.logger``; ``settings``: the parsed ``--wandb`` group."""
    if requested is False:
        return False
    if requested is None or requested is True:
        mode = wandb_mode(settings.mode)
        entries = [] if mode == "disabled" else [wandb_entry(settings, mode, stage)]
    else:
        entries = list(requested) if isinstance(requested, (list, tuple)) else [requested]
    has_csv = False
    for entry in entries:
        kind = logger_class(entry)
        is_run_csv = _is_subclass(kind, CSV_LOGGER) and _arg(entry, "name") == RUN_CSV
        if isinstance(entry, Namespace) and (is_run_csv or _is_subclass(kind, WANDB_LOGGER)):
            entry.init_args.save_dir = str(output_dir)
        has_csv = has_csv or is_run_csv
    if not has_csv:
        csv = {"save_dir": str(output_dir), "name": RUN_CSV, "flush_logs_every_n_steps": 10}
        entries.append(Namespace(class_path=CSV_LOGGER, init_args=Namespace(**csv)))
    return entries


def wandb_entry(settings: Namespace, mode: str, stage: str) -> Namespace:
    """The config entry of the default ``WandbLogger`` (``save_dir`` is set by :func:`resolve_loggers`)."""
    init = dict(
        project=settings.project,
        name=settings.name,
        group=settings.group,
        tags=list(settings.tags or []),
        entity=settings.entity,
        offline=(mode == "offline"),
        config={"stage": stage},
    )
    return Namespace(class_path=WANDB_LOGGER, init_args=Namespace(**init))


def continue_wandb_run(entries: Any, loggers: Any, output_dir: Path) -> Any:
    """``loggers`` with each ``WandbLogger`` that names no run id rebuilt to continue the run id kept in
    ``output_dir/wandb_run_id`` (a resumed or requeued run). The id is resume state, like the checkpoint: it is looked
    up in ``output_dir`` and not written into ``config.yaml``."""
    from lightning.pytorch.cli import instantiate_class
    from lightning.pytorch.loggers import WandbLogger

    id_file = output_dir / "wandb_run_id"
    if not id_file.exists() or not isinstance(loggers, list) or not isinstance(entries, list):
        return loggers
    run_id = id_file.read_text().strip()
    out = []
    for entry, logger in zip(entries, loggers, strict=True):
        if isinstance(logger, WandbLogger) and isinstance(entry, Namespace) and logger.version is None:
            init = {**entry.init_args.as_dict(), "id": run_id, "resume": "allow"}
            logger = instantiate_class((), {"class_path": entry.class_path, "init_args": init})
        out.append(logger)
    return out


def logger_class(entry: Any) -> type | None:
    """The class of a logger config entry (``{class_path, init_args}``) or of a logger object."""
    if isinstance(entry, Namespace):
        module, _, name = str(entry.get("class_path", "")).rpartition(".")
        return getattr(importlib.import_module(module), name, None) if module else None
    return type(entry)


def _is_subclass(kind: type | None, class_path: str) -> bool:
    module, _, name = class_path.rpartition(".")
    return isinstance(kind, type) and issubclass(kind, getattr(importlib.import_module(module), name))


def _arg(entry: Any, name: str) -> Any:
    if isinstance(entry, Namespace):
        return (entry.get("init_args") or Namespace()).get(name)
    return getattr(entry, name, None)


def remember_wandb_run(trainer: L.Trainer, output_dir: Path) -> None:
    """Write the W&B run id to ``output_dir/wandb_run_id`` (rank zero), for :func:`continue_wandb_run` on resume."""
    from lightning.pytorch.loggers import WandbLogger

    if not trainer.is_global_zero:
        return
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            write_text(output_dir / "wandb_run_id", logger.experiment.id)  # atomic
            return


def finish_wandb(trainer: L.Trainer, preempted: bool = False) -> None:
    """Close the W&B run so its files are complete when the stage returns (pipelines run stages in one process);
    ``preempted`` marks it as preempted first (a SLURM requeue resumes it)."""
    from lightning.pytorch.loggers import WandbLogger

    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger) and trainer.is_global_zero and logger._experiment is not None:
            if preempted:
                logger.experiment.mark_preempting()
            logger.experiment.finish()
