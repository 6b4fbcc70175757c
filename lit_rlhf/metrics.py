"""Metric helpers shared by the stages: torchmetrics aggregation per phase, sample tables (W&B and
``samples.jsonl``), throughput and model-FLOP utilisation.

FLOP counting (per token, N = non-embedding parameters, H x V = output head): a forward costs 2N per token plus
2HV per *scored* token (logits are only projected where a token is scored, see :mod:`lit_rlhf.logprobs`). A
backward costs twice its forward when every weight trains; with LoRA it costs about one forward (activation
gradients through the frozen base; the adapter's weight gradients are negligible). A reference forward adds one
forward. MFU = achieved model FLOP/s / ``peak_flops``. Attention-score FLOPs are ignored (short sequences).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn
from torchmetrics import MeanMetric

SAMPLES_FILE = "samples.jsonl"


class PhaseMeans(nn.Module):
    """One torchmetrics ``MeanMetric`` per metric name, created on first use; log the returned metric objects."""

    def __init__(self) -> None:
        super().__init__()
        self.means = nn.ModuleDict()

    def update(self, values: dict[str, torch.Tensor | float], weight: float = 1.0) -> dict[str, MeanMetric]:
        out = {}
        for name, value in values.items():
            key = name.replace(".", "_").replace("/", "__")
            if key not in self.means:
                device = value.device if isinstance(value, torch.Tensor) else "cpu"
                with torch.inference_mode(False):  # created lazily, possibly inside a validation loop
                    self.means[key] = MeanMetric().to(device)
            metric = self.means[key]
            tensor = value.detach().float() if isinstance(value, torch.Tensor) else torch.tensor(float(value))
            metric.update(tensor, weight)
            out[name] = metric
        return out


def log_table(
    trainer: L.Trainer | None, key: str, columns: list[str], rows: list[list[Any]], step: int | None = None
) -> None:
    """Log a table of samples to every W&B logger of the trainer and append it to ``DIR/samples.jsonl`` (rank zero;
    ``DIR`` = the run's output directory, ``trainer.default_root_dir``; nothing when the run has no logger).

    W&B tables logged under one key at successive steps are kept as separate versions, so earlier samples are never
    overwritten. ``samples.jsonl`` grows by one JSON object per row, ``{"key", "step", <column>: value, ...}``, so
    completions can be read without W&B. A table with a ``step`` column may repeat earlier rows (a cumulative table,
    each W&B version holding every row so far): only its rows of this ``step`` are appended.
    """
    if trainer is None or not trainer.is_global_zero or not trainer.loggers:
        return
    from lightning.pytorch.loggers import WandbLogger

    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            logger.log_table(key=key, columns=columns, data=rows, step=step)
    step = trainer.global_step if step is None else step
    append_samples(Path(trainer.default_root_dir) / SAMPLES_FILE, key, columns, rows, step)


def append_samples(path: Path, key: str, columns: list[str], rows: list[list[Any]], step: int) -> None:
    """Append the rows of a sample table to the JSONL file ``path`` in one write (see :func:`log_table`)."""
    records = [{"key": key, "step": step, **dict(zip(columns, row, strict=True))} for row in rows]
    if "step" in columns:
        records = [r for r in records if r["step"] == step]
    if not records:
        return
    text = "".join(json.dumps(r, default=_jsonable, ensure_ascii=False) + "\n" for r in records)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as f:
        f.write(text)
        f.flush()


def _jsonable(value: Any) -> Any:
    """Tensors and numpy values as numbers or lists; anything else as its string."""
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def model_flop_counts(model: nn.Module) -> tuple[int, int]:
    """(non-embedding parameter count N, output-head size H*V) of a causal LM (peft-wrapped or not)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings()
    embed = base.get_input_embeddings()
    skip = {id(head.weight), id(embed.weight)}
    n = sum(p.numel() for p in base.parameters() if id(p) not in skip)
    return n, head.weight.numel()


def training_flops(
    n_body: int, head: int, tokens: int, scored_tokens: int, full_backward: bool, reference_forwards: int
) -> float:
    """Model FLOPs of one training step (see module doc)."""
    forward = 2.0 * n_body * tokens + 2.0 * head * scored_tokens
    backward = 2.0 * forward if full_backward else forward
    return forward + backward + reference_forwards * forward


def rollout_step_flops(
    flop_counts: tuple[int, int], prompt_tokens: int, completion_tokens: int, forwards: int, passes: int, full: bool
) -> float:
    """Model FLOPs of an RL step: ``forwards`` no-grad forwards over prompts and completions (sampling, old and
    reference logps) and ``passes`` training passes (forward + backward; ``full``: full fine-tune)."""
    n_body, head = flop_counts
    tokens = prompt_tokens + completion_tokens
    forward = 2.0 * n_body * tokens + 2.0 * head * completion_tokens
    return forwards * forward + passes * training_flops(n_body, head, tokens, completion_tokens, full, 0)


class Throughput:
    """Wall-clock throughput between consecutive ``step`` calls: samples/s, tokens/s, MFU."""

    def __init__(self, peak_flops: float) -> None:
        self.peak_flops = peak_flops
        self._last: float | None = None

    def start(self) -> None:
        self._last = time.perf_counter()

    def step(self, samples: int, tokens: int, flops: float) -> dict[str, float]:
        now = time.perf_counter()
        if self._last is None:
            self._last = now
            return {}
        dt, self._last = now - self._last, now
        if dt <= 0:
            return {}
        return {
            "perf/samples_per_s": samples / dt,
            "perf/tokens_per_s": tokens / dt,
            "perf/mfu": flops / dt / self.peak_flops if self.peak_flops > 0 else 0.0,
            "perf/step_s": dt,
        }
