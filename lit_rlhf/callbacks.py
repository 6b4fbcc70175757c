"""Callbacks of every run: the divergence guard (grad norm and learning rate logged), the before-training metrics kept
in checkpoints, and the export to HF format at the end of fit (never from non-finite weights)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch

from lit_rlhf.checkpointing import NonFiniteWeightsError, first_non_finite, newest_checkpoint
from lit_rlhf.optim import take_pre_clip_norm, total_grad_norm


class DivergenceError(RuntimeError):
    """The loss or the gradient norm of a training step is NaN or infinite."""


class DivergenceGuard(L.Callback):
    """Checks every optimizer step for a non-finite loss or total gradient norm, and logs ``train/grad_norm`` (the
    total 2-norm before clipping) and ``train/lr`` (a second optimizer's as ``train/grad_norm/opt1``, ...).

    ``nan_policy``: ``stop`` raises :class:`DivergenceError` before the optimizer step, naming the step, the quantity
    and the last good checkpoint, so no checkpoint, ``last.ckpt`` or export is written from the diverged weights;
    ``skip_step`` drops the step's gradients instead (the optimizer skips parameters without a gradient; the
    learning-rate schedule moves on) and counts it in ``train/skipped_steps``.

    The losses are those handed to backward (``on_before_backward``, automatic and manual optimization). The norm is
    taken in ``on_before_optimizer_step`` (before Lightning's own clipping); stages that clip themselves
    (:func:`lit_rlhf.optim.clip_and_step`) leave their pre-clip norm for it. Under a GradScaler (``16-mixed``)
    non-finite gradients are the scaler's to skip and only the loss is checked.
    """

    def __init__(self, nan_policy: Literal["stop", "skip_step"] = "stop") -> None:
        if nan_policy not in ("stop", "skip_step"):
            raise ValueError(f"--nan_policy must be 'stop' or 'skip_step', got {nan_policy!r}")
        self.nan_policy = nan_policy
        self.skipped_steps = 0
        self._loss_ok: torch.Tensor | None = None  # all losses since the last optimizer step finite (no host sync)
        self._bad_loss: torch.Tensor | None = None

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        ok = torch.isfinite(loss.detach()).all()
        if self._loss_ok is None:
            self._loss_ok, self._bad_loss = ok, loss.detach().float().reshape(-1)[0]
        else:
            self._bad_loss = torch.where(self._loss_ok & ~ok, loss.detach().float().reshape(-1)[0], self._bad_loss)
            self._loss_ok = self._loss_ok & ok

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        norm = take_pre_clip_norm(optimizer)
        if norm is None:
            norm = total_grad_norm(params)
        index = _index(trainer.optimizers, optimizer)
        suffix = "" if index == 0 else f"/opt{index}"
        if norm is not None:
            pl_module.log(f"train/grad_norm{suffix}", norm.detach().float(), on_step=True, on_epoch=False, batch_size=1)
        pl_module.log(
            f"train/lr{suffix}", float(optimizer.param_groups[0]["lr"]), on_step=True, on_epoch=False, batch_size=1
        )
        scaled = getattr(trainer.precision_plugin, "scaler", None) is not None
        loss_ok = self._loss_ok if self._loss_ok is not None else torch.tensor(True)
        norm_ok = torch.isfinite(norm).all() if norm is not None and not scaled else torch.tensor(True)
        flags = torch.stack([loss_ok.to(norm_ok.device), norm_ok]).cpu()  # one host sync per optimizer step
        bad_loss = None if self._bad_loss is None else float(self._bad_loss)
        self._loss_ok = self._bad_loss = None
        good = bool(flags.all())
        if trainer.world_size > 1:  # one decision for all ranks (a skipped step must be skipped everywhere)
            good = trainer.strategy.reduce_boolean_decision(good, all=True)
        if good:
            if self.nan_policy == "skip_step":
                pl_module.log(
                    "train/skipped_steps", float(self.skipped_steps), on_step=True, on_epoch=False, batch_size=1
                )
            return
        if self.nan_policy == "skip_step":
            for p in params:
                p.grad = None
            self.skipped_steps += 1
            pl_module.log("train/skipped_steps", float(self.skipped_steps), on_step=True, on_epoch=False, batch_size=1)
            return
        if not bool(flags[0]):
            what = f"the loss is {bad_loss}"
        elif not bool(flags[1]):
            what = f"the gradient norm{'' if index == 0 else f' of optimizer {index}'} is {float(norm)}"
        else:
            what = "the loss or the gradient norm is not finite on another rank"
        raise DivergenceError(
            f"training diverged at global step {trainer.global_step}: {what}. Stopped before the optimizer step, so "
            f"no checkpoint or export holds these weights. Last good checkpoint: {_last_good(trainer)}. Lower the "
            "learning rate, or skip such batches with --nan_policy=skip_step."
        )

    def state_dict(self) -> dict[str, Any]:
        return {"skipped_steps": self.skipped_steps}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped_steps = int(state_dict.get("skipped_steps", 0))


def _index(optimizers: list, optimizer) -> int:
    return next((i for i, o in enumerate(optimizers) if o is optimizer), 0)


def _last_good(trainer: L.Trainer) -> str:
    found = newest_checkpoint(trainer.default_root_dir) or trainer.ckpt_path
    return str(found) if found else "none (no checkpoint written yet)"


class CheckpointFit(L.Callback):
    """Refuses to resume from a checkpoint whose weights are not this model's trainable weights (saved with other
    model settings: full fine-tune vs LoRA, another rank or target modules, another model). The stages load with
    ``strict_loading=False`` (checkpoints hold only trainable weights), so without this the mismatch would surface
    later as an optimizer-group error that names no cause. Runs before the optimizer states are restored."""

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get("state_dict")
        if saved is None:  # a sharded (FSDP2) checkpoint: its weights were loaded by key already
            return
        params = dict(pl_module.named_parameters())
        foreign = sorted(k for k in saved if k not in params and k not in dict(pl_module.named_buffers()))
        missing = sorted(k for k, p in params.items() if p.requires_grad and k not in saved)
        if foreign or missing:
            raise ValueError(
                f"checkpoint {trainer.ckpt_path} does not fit this run's model: it holds {len(foreign)} weights the "
                f"model does not have (e.g. {foreign[:2]}) and lacks {len(missing)} that it trains (e.g. "
                f"{missing[:2]}). Was it saved with other model settings (full fine-tune vs LoRA, another LoRA rank "
                "or target modules, another model)? Resume with that run's settings (its config.yaml), or start a new "
                "run (--overwrite)."
            )


class StartMetrics(L.Callback):
    """The held-out metrics measured before training (``final_metrics.json["start"]``), kept in every checkpoint so a
    resumed run reports them too."""

    def __init__(self) -> None:
        self.metrics: dict[str, float] = {}

    def state_dict(self) -> dict[str, Any]:
        return {"metrics": dict(self.metrics)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.metrics = {k: float(v) for k, v in state_dict.get("metrics", {}).items()}


class ExportCallback(L.Callback):
    """At the end of ``fit``, call ``pl_module.export(DIR/export)`` on every rank (``DIR`` = trainer root dir), after
    checking that every parameter is finite (:class:`lit_rlhf.checkpointing.NonFiniteWeightsError` otherwise).

    Every stage module implements ``export(out_dir, dtype=None) -> dict[str, str]`` (written paths; ``dtype``: that of
    the merged weights, None: the training dtype); under FSDP2 gathering the full weights is collective, and only
    global rank 0 writes.
    """

    def __init__(self, enabled: bool = True, dtype: str | None = None) -> None:
        self.enabled = enabled
        self.dtype = dtype
        self.written: dict[str, str] = {}

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.enabled and not trainer.interrupted:
            out = Path(trainer.default_root_dir) / "export"
            bad = first_non_finite(pl_module.named_parameters())
            if not trainer.strategy.reduce_boolean_decision(bad is None, all=True):
                raise NonFiniteWeightsError(
                    f"not exporting to {out}: parameter {bad or '(on another rank)'!r} holds NaN or inf (the run "
                    "diverged); nothing was written there"
                )
            self.written = pl_module.export(out, dtype=self.dtype)
            if trainer.is_global_zero:
                print(f"[lit_rlhf] exported: {self.written}")
