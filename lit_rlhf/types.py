"""Typed batch containers; shapes use B = batch rows, T = padded length.

Padding: prompts are LEFT-padded (``prompt_ids``/``prompt_mask`` and :class:`PromptBatch`, so generation appends to
the right end of every row); responses and full sequences (``response_ids``/``response_mask``, :class:`SFTBatch`) are
RIGHT-padded.

Position convention (shared by every stage, enforced in :mod:`lit_rlhf.logprobs`): ``logps[b, t]`` is
``log p(input_ids[b, t] | input_ids[b, :t])``, so it lines up with ``input_ids``; ``loss_mask[b, t]`` is 1 where
token ``t`` is a scored (response) token. Position 0 is never scored. In the prompt/response layout
(:class:`PromptResponseBatch`) logps are [N, R], aligned with ``response_ids``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch


@dataclass
class _Batch:
    def to(self, device: torch.device | str) -> _Batch:
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        moved = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in values.items()}
        return replace(self, **moved)

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])  # type: ignore[attr-defined]


@dataclass
class SFTBatch(_Batch):
    """input_ids, attention_mask, loss_mask: [B, T]; position_ids: [B, T] when rows are packed (else None)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    loss_mask: torch.Tensor
    position_ids: torch.Tensor | None = None


@dataclass
class PromptResponseBatch(_Batch):
    """Prompts once, responses many: the layout every stage that scores responses uses.

    prompt_ids/prompt_mask: [B, P], LEFT-padded. response_ids/response_mask: [N, R], RIGHT-padded; row n answers
    prompt ``prompt_index[n]`` ([N]). ``response_mask`` marks scored response tokens. Scoring runs the prompt once
    and the N responses on top of its KV cache (:func:`lit_rlhf.logprobs.response_logps`); ``as_sequences`` gives
    the equivalent [N, P + R] rows for code that wants one concatenated forward.
    """

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    response_ids: torch.Tensor
    response_mask: torch.Tensor
    prompt_index: torch.Tensor

    def __len__(self) -> int:
        return int(self.response_ids.shape[0])

    def as_sequences(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask, loss_mask, position_ids), each [N, P + R]: a row's prompt padding stays on the
        left, its response padding on the right; ``position_ids`` count real tokens only."""
        prompt_mask = self.prompt_mask[self.prompt_index]
        response_mask = self.response_mask.to(prompt_mask.dtype)
        input_ids = torch.cat([self.prompt_ids[self.prompt_index], self.response_ids], dim=1)
        attention_mask = torch.cat([prompt_mask, response_mask], dim=1)
        loss_mask = torch.cat([torch.zeros_like(prompt_mask), response_mask], dim=1)
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        return input_ids, attention_mask, loss_mask, position_ids


@dataclass
class PreferenceBatch(PromptResponseBatch):
    """B pairs: responses are the B chosen rows, then the B rejected rows (N = 2B; ``prompt_index`` = [0..B-1] * 2).

    ``keys`` ([B] strings) identify each pair for the reference-logp cache; ``prompts``/``chosen``/``rejected`` keep
    the rendered text for sample tables.
    """

    keys: list[str] = field(default_factory=list)
    prompts: list[str] = field(default_factory=list)
    chosen: list[str] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)

    @property
    def num_pairs(self) -> int:
        return int(self.prompt_ids.shape[0])


@dataclass
class PromptBatch(_Batch):
    """Left-padded prompts for generation: input_ids/attention_mask [B, P]; ``extras`` maps column -> [B] values."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    prompts: list[str] = field(default_factory=list)
    extras: dict[str, list[Any]] = field(default_factory=dict)


@dataclass
class Rollout(PromptResponseBatch):
    """B prompts and N sampled completions (``G = N / B`` per prompt, rows of a group consecutive).

    prompt_ids/prompt_mask [B, P] (left-padded), response_ids/response_mask [N, R] (right-padded), prompt_index [N]
    as in :class:`PromptResponseBatch`, so scoring uses :func:`lit_rlhf.logprobs.response_logps`.
    ``response_mask`` marks the completion tokens up to and including the EOS token. ``truncated`` [N] is True where
    no EOS came within the token budget. ``sample_logps`` [N, R]: the sampling policy's logps of the chosen tokens
    at the sampling temperature, before top-k/top-p filtering (0 outside the mask), as ``response_logps(...,
    temperature)`` computes them; ``entropy`` [N, R]: the entropy of that tempered distribution at each completion
    token. Both are None when the backend does not provide them. ``prompts`` ([B]) and ``completions`` ([N]) hold
    the text.
    """

    truncated: torch.Tensor
    sample_logps: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    prompts: list[str] = field(default_factory=list)
    completions: list[str] = field(default_factory=list)

    @property
    def num_prompts(self) -> int:
        return int(self.prompt_ids.shape[0])

    @property
    def completion_lengths(self) -> torch.Tensor:
        """Tokens per completion [N] (EOS included)."""
        return self.response_mask.sum(-1)

    def select(self, rows: torch.Tensor) -> Rollout:
        """The completions ``rows`` ([n] indices) with only the prompts they answer (prompt order kept)."""
        used, prompt_index = torch.unique(self.prompt_index[rows], sorted=True, return_inverse=True)
        prompt_mask = self.prompt_mask[used]
        width = int(prompt_mask.sum(-1).max()) if len(used) else 0

        def pick(x: torch.Tensor | None) -> torch.Tensor | None:
            return None if x is None else x[rows]

        return Rollout(
            self.prompt_ids[used][:, prompt_mask.shape[1] - width :],
            prompt_mask[:, prompt_mask.shape[1] - width :],
            self.response_ids[rows],
            self.response_mask[rows],
            prompt_index,
            self.truncated[rows],
            pick(self.sample_logps),
            pick(self.entropy),
            [self.prompts[i] for i in used.tolist()] if self.prompts else [],
            [self.completions[i] for i in rows.tolist()] if self.completions else [],
        )


@dataclass
class RankedBatch(PromptResponseBatch):
    """B prompts with up to K responses each, ranked best first: response row ``k * B + b`` is rank k of prompt b
    (N = K B; ``prompt_index`` = [0..B-1] * K). ``rank_mask`` [B, K] (bool) marks real responses, a prefix of each
    row; a missing rank is a one-token placeholder row whose reward is ignored. A preference pair is K = 2.
    """

    rank_mask: torch.Tensor | None = None
    prompts: list[str] = field(default_factory=list)
    responses: list[list[str]] = field(default_factory=list)

    @property
    def num_prompts(self) -> int:
        return int(self.prompt_ids.shape[0])


@dataclass
class ScoredBatch(PromptResponseBatch):
    """N (prompt, response) rows with a target score each: ``scores`` [N] float (pointwise reward regression);
    ``prompt_index`` = arange(N)."""

    scores: torch.Tensor | None = None
    prompts: list[str] = field(default_factory=list)
    responses: list[str] = field(default_factory=list)


@dataclass
class StepBatch(PromptResponseBatch):
    """N (prompt, response) rows whose response is a solution of up to K labelled steps (process reward model;
    ``prompt_index`` = arange(N)). ``step_positions`` [N, K] long: the index in ``response_ids`` of each step's last
    token; ``step_labels`` [N, K] float, 1 = the step is correct; ``step_mask`` [N, K] bool marks real steps (a
    prefix of each row)."""

    step_positions: torch.Tensor | None = None
    step_labels: torch.Tensor | None = None
    step_mask: torch.Tensor | None = None
    prompts: list[str] = field(default_factory=list)
    responses: list[str] = field(default_factory=list)
