"""Callbacks: export to HF format at the end of fit, and W&B sample tables."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L


class ExportCallback(L.Callback):
    """At the end of ``fit``, call ``pl_module.export(DIR/export)`` on every rank (``DIR`` = trainer root dir).

    Every stage module implements ``export(out_dir) -> dict[str, str]`` (written paths); under FSDP2 gathering the
    full weights is collective, and only global rank 0 writes.
    """

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.written: dict[str, str] = {}

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.enabled and not trainer.interrupted:
            self.written = pl_module.export(Path(trainer.default_root_dir) / "export")
            if trainer.is_global_zero:
                print(f"[lit_rlhf] exported: {self.written}")


def log_table(trainer: L.Trainer | None, key: str, columns: list[str], rows: list[list[Any]], step: int | None = None) -> None:
    """Log a table to every W&B logger of the trainer (other loggers ignore it).

    W&B tables logged under one key at successive steps are kept as separate versions, so earlier samples are
    never overwritten.
    """
    if trainer is None or not trainer.is_global_zero:
        return
    from lightning.pytorch.loggers import WandbLogger

    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            logger.log_table(key=key, columns=columns, data=rows, step=step)
