"""Metric helpers shared by the stages: torchmetrics aggregation per phase, throughput and model-FLOP utilisation.

FLOP counting (per token, N = non-embedding parameters, H x V = output head): a forward costs 2N per token plus
2HV per *scored* token (logits are only projected where a token is scored, see :mod:`lit_rlhf.logprobs`). A
backward costs twice its forward when every weight trains; with LoRA it costs about one forward (activation
gradients through the frozen base; the adapter's weight gradients are negligible). A reference forward adds one
forward. MFU = achieved model FLOP/s / ``peak_flops``. Attention-score FLOPs are ignored (short sequences).
"""

from __future__ import annotations

import time

import torch
from torch import nn
from torchmetrics import MeanMetric


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
            metric.update(value.detach().float() if isinstance(value, torch.Tensor) else torch.tensor(float(value)), weight)
            out[name] = metric
        return out


def model_flop_counts(model: nn.Module) -> tuple[int, int]:
    """(non-embedding parameter count N, output-head size H*V) of a causal LM (peft-wrapped or not)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings()
    embed = base.get_input_embeddings()
    skip = {id(head.weight), id(embed.weight)}
    n = sum(p.numel() for p in base.parameters() if id(p) not in skip)
    return n, head.weight.numel()


def training_flops(n_body: int, head: int, tokens: int, scored_tokens: int, full_backward: bool, reference_forwards: int) -> float:
    """Model FLOPs of one training step (see module doc)."""
    forward = 2.0 * n_body * tokens + 2.0 * head * scored_tokens
    backward = 2.0 * forward if full_backward else forward
    return forward + backward + reference_forwards * forward


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
