"""Process reward model (PRM): a reward model whose score head is read at the last token of every step of a solution,
predicting whether the solution is still correct there (Lightman et al. 2023, "Let's Verify Step by Step", §2.6;
Wang et al. 2024, Math-Shepherd; the step rewards of DeepSeekMath's process supervision, Shao et al. 2024, §4.1.3).

- Training: the RM stage with ``--data.format=steps`` (:mod:`lit_rlhf.data.step_labels`): :func:`step_logits` reads
  the logits of a :class:`~lit_rlhf.types.StepBatch`, :func:`lit_rlhf.losses.step_bce_loss` fits them;
  :func:`first_error_index` gives the held-out ``first_error_accuracy``.
- Serving: the export is an ordinary sequence-classification directory (:func:`lit_rlhf.reward_models.load_exported`);
  :class:`ProcessRewardScorer` scores the steps of (rendered prompt, completion) pairs, and the step reward ``prm``
  (:mod:`lit_rlhf.steps`' ``fn(prompts, completions, steps, **columns)``) wraps it with a per-(path, device) cache.
  Steps are found in the completion as written and read at the token holding their last character, exactly as in
  training; tokens after a step never affect its score (causal attention), so the end-of-turn suffix does not matter.
"""

from __future__ import annotations

import math
import os

import torch
from torch import nn

from lit_rlhf import models, reward_models
from lit_rlhf.data import render
from lit_rlhf.data.step_labels import locate_steps, step_token_positions
from lit_rlhf.steps import register_step_reward
from lit_rlhf.types import StepBatch


def step_logits(model: nn.Module, batch: StepBatch, pad_token_id: int) -> torch.Tensor:
    """Logits [N, K] (float32, with gradients) of a decoder reward model at every step's last token of a batch."""
    if models.is_encoder(model.config):
        raise ValueError("a process reward model needs a decoder backbone (a score at each step's last token)")
    input_ids, attention_mask, _, _ = batch.as_sequences()
    input_ids, attention_mask = reward_models.contiguous_rows(input_ids, attention_mask, pad_token_id)
    positions = batch.prompt_mask.sum(-1)[batch.prompt_index, None] + batch.step_positions
    return reward_models.scores_at(model, input_ids, attention_mask, positions)[0]


def first_error_index(correct: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Index [N] of each row's first step that is not ``correct`` among its ``mask``-ed steps ([N, K] bools); the
    row's number of steps when every step is correct (as ProcessBench, Zheng et al. 2024, locates the earliest
    error). ``first_error_accuracy`` compares the predicted (logit < 0) and the labelled index."""
    bad = ~correct.bool() & mask.bool()
    k = torch.arange(bad.shape[1], device=bad.device).expand_as(bad)
    return torch.where(bad, k, mask.sum(-1, keepdim=True).expand_as(bad)).min(-1).values


class ProcessRewardScorer:
    """Step scores of a process reward model (trained here or any decoder sequence classifier), no grad.

    Args:
        model: the network; tokenizer: its tokenizer (pad token set).
        batch_size: rows per forward.
        max_length: a longer row loses prompt tokens from the left, then completion tokens from the right (the steps
            cut away are unscored: None).
        probability: sigmoid(logit), the predicted probability that the solution is correct up to that step
            (Lightman et al.); false: the raw logit.
    """

    def __init__(self, model: nn.Module, tokenizer, batch_size: int = 16, max_length: int = 512, probability=True):
        self.model, self.tokenizer = model, tokenizer
        self.batch_size, self.max_length, self.probability = batch_size, max_length, probability

    def rows(self, prompt: str, completion: str, steps: list[str]) -> tuple[list[int], list[int | None]]:
        """(token ids of prompt + completion, index of each step's last token or None when cut away)."""
        prompt_ids = render.encode(self.tokenizer, prompt)
        completion_ids = render.encode(self.tokenizer, completion)
        positions = step_token_positions(self.tokenizer, completion, completion, locate_steps(completion, steps))
        keep_prompt = max(0, min(len(prompt_ids), self.max_length - len(completion_ids)))
        prompt_ids = prompt_ids[len(prompt_ids) - keep_prompt :]
        completion_ids = completion_ids[: self.max_length - len(prompt_ids)]
        at = [None if p is None or p >= len(completion_ids) else len(prompt_ids) + p for p in positions]
        return prompt_ids + completion_ids, at

    @torch.no_grad()
    def score(self, prompts: list[str], completions: list[str], steps: list[list[str]]) -> list[list[float | None]]:
        """One score per step of each completion (prompts as rendered for the policy, e.g. its chat template)."""
        device = next(self.model.parameters()).device
        items = [self.rows(p, c, s) if s else ([], []) for p, c, s in zip(prompts, completions, steps, strict=True)]
        out: list[list[float | None]] = [[None] * len(s) for s in steps]
        todo = [i for i, (ids, at) in enumerate(items) if ids and any(t is not None for t in at)]
        was_training = self.model.training
        self.model.eval()
        try:
            for start in range(0, len(todo), self.batch_size):
                chunk = todo[start : start + self.batch_size]
                ids = reward_models.pad_right([items[i][0] for i in chunk], self.tokenizer.pad_token_id).to(device)
                mask = reward_models.pad_right([[1] * len(items[i][0]) for i in chunk], 0).to(device)
                at = [[t if t is not None else 0 for t in items[i][1]] for i in chunk]
                positions = reward_models.pad_right(at, 0).to(device)
                logits = reward_models.scores_at(self.model, ids, mask, positions)[0].cpu()
                values = torch.sigmoid(logits) if self.probability else logits
                for row, i in enumerate(chunk):
                    out[i] = [None if t is None else float(values[row, k]) for k, t in enumerate(items[i][1])]
        finally:
            self.model.train(was_training)
        return out


_PRMS: dict[tuple[str, str], tuple[nn.Module, object]] = {}
"""(model, tokenizer) of each process reward model :func:`prm` has loaded, per (path, device)."""


@register_step_reward("prm")
def prm(
    prompts: list[str],
    completions: list[str],
    steps: list[list[str]],
    path: str = "runs/prm/export/merged",
    probability: bool = True,
    batch_size: int = 16,
    max_length: int = 512,
    device: str | None = None,
) -> list[list[float | None]]:
    """Step reward of the process reward model exported at ``path`` (the RM stage with ``--data.format=steps``):
    sigmoid of its logit at each step's last token (``probability=false``: the logit; GRPO's process supervision
    normalises the step rewards over the group either way). Loaded once per (path, device); ``device`` defaults to
    CUDA when available."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    key = (os.fspath(path), device)
    if key not in _PRMS:
        _PRMS[key] = reward_models.load_exported(path, device)
    model, tokenizer = _PRMS[key]
    scores = ProcessRewardScorer(model, tokenizer, batch_size, max_length, probability).score(
        prompts, completions, steps
    )
    return [[None if v is None or math.isnan(v) else v for v in row] for row in scores]
