"""Padding collators: rows are right-padded to the longest row of the batch (never to ``max_length``)."""

from __future__ import annotations

import torch


def pad_right(rows: list[list[int]], pad_value: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), pad_value, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return out


def pad_left(rows: list[list[int]], pad_value: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), pad_value, dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            out[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
    return out


def prompt_response_rows(
    prompts: list[list[int]], responses: list[list[int]], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, loss_mask) [N, T] for prompt+response rows; loss_mask covers the response."""
    ids = [p + r for p, r in zip(prompts, responses)]
    input_ids = pad_right(ids, pad_id)
    attention_mask = pad_right([[1] * len(x) for x in ids], 0)
    loss_mask = pad_right([[0] * len(p) + [1] * len(r) for p, r in zip(prompts, responses)], 0)
    return input_ids, attention_mask, loss_mask
