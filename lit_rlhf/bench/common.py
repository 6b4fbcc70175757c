"""Shared benchmark pieces: the step timer (training loop only) and peak-RSS reading."""

from __future__ import annotations

import resource
import time

import lightning as L


def status_mib(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


class StepTimer(L.Callback):
    """Per-step wall time over the training loop (setup excluded) and the loop's own peak RSS."""

    def __init__(self) -> None:
        self.ends: list[float] = []
        self.begin = 0.0
        self.cpu = None

    def on_train_start(self, trainer, pl_module) -> None:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM so the peak is the training loop's
        except OSError:
            pass
        self.cpu = resource.getrusage(resource.RUSAGE_SELF)
        self.begin = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.ends.append(time.perf_counter())

    def step_times(self) -> list[float]:
        ts = [self.begin] + self.ends
        return [b - a for a, b in zip(ts, ts[1:])]


def bench_trainer(max_steps: int, callbacks: list, **overrides) -> L.Trainer:
    """A CPU Trainer that only trains: no logger, checkpoint, progress bar, summary or validation."""
    settings = dict(
        max_steps=max_steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=callbacks,
    )
    return L.Trainer(**{**settings, **overrides})
