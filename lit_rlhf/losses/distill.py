"""Full-vocabulary divergences for on-policy distillation (:mod:`lit_rlhf.stages.distill`): one pure function each.

GKD (Agarwal et al. 2024, "On-Policy Distillation of Language Models", Eq. 4 with lambda = 1): on the student's own
samples o (no gradient through sampling), each visited prefix contributes a divergence D(pi_t || pi_s) between the
teacher's and the student's next-token distributions, summed over the whole vocabulary (GKD Eq. 1 for the JSD):

    reverse  KL(pi_s || pi_t) = sum_v pi_s (log pi_s - log pi_t)     mode-seeking; TRL generalized_jsd_loss beta = 1
    forward  KL(pi_t || pi_s) = sum_v pi_t (log pi_t - log pi_s)     mass-covering; beta = 0
    jsd      beta KL(pi_t || m) + (1 - beta) KL(pi_s || m),  m = beta pi_t + (1 - beta) pi_s      0 < beta < 1

(TRL's ``GKDTrainer.generalized_jsd_loss`` conventions, read in trl/trainer/gkd_trainer.py.) Gradients w.r.t. the
student's logits z: reverse, pi_s (log pi_s - log pi_t - KL) / T, which vanishes where the student is already
certain of a token, right or wrong; forward, (pi_s - pi_t) / T, which does not (the reason the default uses it).
Every function takes [..., V] logits of one shape, divides both by the sampling temperature, runs rows in chunks of
``chunk_rows`` to bound the float32 temporaries and returns a float32 [...] tensor, 0 where ``mask`` is 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F


def full_reverse_kl(student_logits, teacher_logits, mask, temperature: float = 1.0, chunk_rows: int = 1024):
    """Per-token reverse KL(pi_s || pi_t) over the full vocabulary (module doc)."""

    def reverse(log_s: torch.Tensor, log_t: torch.Tensor) -> torch.Tensor:
        return (log_s.exp() * (log_s - log_t)).sum(-1)

    return _per_token(reverse, student_logits, teacher_logits, mask, temperature, chunk_rows)


def full_forward_kl(student_logits, teacher_logits, mask, temperature: float = 1.0, chunk_rows: int = 1024):
    """Per-token forward KL(pi_t || pi_s) over the full vocabulary (module doc)."""

    def forward(log_s: torch.Tensor, log_t: torch.Tensor) -> torch.Tensor:
        return (log_t.exp() * (log_t - log_s)).sum(-1)

    return _per_token(forward, student_logits, teacher_logits, mask, temperature, chunk_rows)


def generalized_jsd(
    student_logits, teacher_logits, mask, beta: float = 0.5, temperature: float = 1.0, chunk_rows: int = 1024
):
    """Per-token generalised Jensen-Shannon divergence (GKD Eq. 1) with mixture m = beta pi_t + (1 - beta) pi_s,
    0 < beta < 1 (its limits are :func:`full_forward_kl` and :func:`full_reverse_kl` scaled by beta or 1 - beta;
    TRL special-cases them to those KLs, so use the functions themselves)."""
    if not 0.0 < beta < 1.0:
        raise ValueError(f"jsd beta={beta}: needs 0 < beta < 1 (beta 0 is the forward KL, 1 the reverse KL)")
    log_b, log_1b = math.log(beta), math.log1p(-beta)

    def jsd(log_s: torch.Tensor, log_t: torch.Tensor) -> torch.Tensor:
        log_m = torch.logaddexp(log_t + log_b, log_s + log_1b)
        teacher = (log_t.exp() * (log_t - log_m)).sum(-1)
        student = (log_s.exp() * (log_s - log_m)).sum(-1)
        return beta * teacher + (1.0 - beta) * student

    return _per_token(jsd, student_logits, teacher_logits, mask, temperature, chunk_rows)


def _per_token(
    divergence: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor,
    temperature: float,
    chunk_rows: int,
) -> torch.Tensor:
    """``divergence(log pi_s, log pi_t)`` row by row over [..., V] logits, float32, masked (module doc)."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student {tuple(student_logits.shape)} and teacher {tuple(teacher_logits.shape)} logits")
    if mask.shape != student_logits.shape[:-1]:
        raise ValueError(f"mask {tuple(mask.shape)} is not the logits' leading shape {student_logits.shape[:-1]}")
    if temperature <= 0:
        raise ValueError(f"temperature={temperature}: needs > 0")
    vocab = student_logits.shape[-1]
    s_rows, t_rows = student_logits.reshape(-1, vocab), teacher_logits.reshape(-1, vocab)
    out = []
    for s, t in zip(s_rows.split(chunk_rows), t_rows.split(chunk_rows)):
        log_s = F.log_softmax(s.float() / temperature, dim=-1)
        log_t = F.log_softmax(t.float() / temperature, dim=-1)
        out.append(divergence(log_s, log_t))
    values = torch.cat(out) if out else s_rows.new_zeros(0, dtype=torch.float32)
    return values.reshape(mask.shape) * mask.to(torch.float32)
