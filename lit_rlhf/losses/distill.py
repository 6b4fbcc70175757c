"""Full-vocabulary divergences for on-policy distillation (:mod:`lit_rlhf.stages.distill`, ``divergence: full``).

GKD (Agarwal et al. 2024, "On-Policy Distillation of Language Models", Eq. 4 with lambda = 1 and D = reverse KL; TRL's
``GKDTrainer.generalized_jsd_loss`` with beta = 1): on the student's own samples o (no gradient through sampling), each
visited prefix contributes the exact reverse KL of the next-token distributions, summed over the whole vocabulary:

    KL_t = sum_v pi_s(v | o_<t) (log pi_s(v | o_<t) - log pi_t(v | o_<t))

Its gradient w.r.t. the student's logits z is pi_s * (log pi_s - log pi_t - KL_t) / temperature: it raises every token
the teacher prefers, sampled or not, unlike the sampled-token estimate log pi_s(o_t) - log pi_t(o_t).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def full_reverse_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor,
    temperature: float = 1.0,
    chunk_rows: int = 1024,
) -> torch.Tensor:
    """Per-token reverse KL(pi_s || pi_t) over the full vocabulary, float32, 0 where ``mask`` is 0.

    student_logits, teacher_logits: [..., V] (the same V; differentiable through the student's only if it requires
    grad); mask: [...]; both logits are divided by the sampling ``temperature`` first. Rows go through in chunks of
    ``chunk_rows`` to bound the float32 temporaries. Returns [...] (sum it with weights for a token-mean loss).
    """
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
        out.append((log_s.exp() * (log_s - log_t)).sum(-1))
    kl = torch.cat(out) if out else s_rows.new_zeros(0, dtype=torch.float32)
    return kl.reshape(mask.shape) * mask.to(torch.float32)
