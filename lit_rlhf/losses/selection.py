"""Token selection: 0/1 masks [N, R] that multiply each token's policy term (``weights=`` of the losses).

- ``top_entropy_mask``: keep only the tokens whose entropy is at least the (1 - rho) quantile of the batch's token
  entropies (the "forking" tokens; Wang et al. 2025, "Beyond the 80/20 Rule", arXiv:2506.01939, rho = 0.2). The
  quantile interpolates linearly (``torch.quantile``), as TRL's ``get_high_entropy_mask`` does: rho = 1 keeps every
  token, rho = 0 only the highest. TRL gathers the entropies of all ranks first; here the caller passes the batch.
- ``off_policy_sequence_mask``: drop a token when its advantage is negative AND its completion's mean log-ratio
  log(pi_sampler / pi) exceeds delta (DeepSeek-V3.2, DeepSeek-AI 2025, §3.1, Eq. 9; TRL ``get_off_policy_mask``
  and ``off_policy_mask_threshold``: the same rule). Negative samples that drifted far from the current policy
  give the noisiest, most destabilising gradients; positive ones are kept whatever their drift.
"""

from __future__ import annotations

import torch

from lit_rlhf.logprobs import masked_mean

Metrics = dict[str, torch.Tensor]


def top_entropy_mask(entropy: torch.Tensor, mask: torch.Tensor, rho: float = 0.2) -> tuple[torch.Tensor, Metrics]:
    """Float mask [N, R]: 1 on valid tokens with entropy >= quantile(valid entropies, 1 - rho), else 0.

    Metrics: ``entropy_mask/threshold`` and ``entropy_mask/kept_fraction`` (of valid tokens).
    """
    if not 0.0 <= rho <= 1.0:
        raise ValueError(f"top-entropy rho must be in [0, 1], got {rho}")
    valid = mask.bool()
    if not valid.any():
        zero = entropy.new_zeros(())
        return torch.zeros_like(entropy), {"entropy_mask/threshold": zero, "entropy_mask/kept_fraction": zero}
    work = entropy.detach()
    work = work if work.dtype in (torch.float32, torch.float64) else work.float()  # quantile's dtypes
    threshold = torch.quantile(work[valid], 1.0 - rho)
    keep = ((work >= threshold) & valid).to(entropy.dtype)
    metrics = {"entropy_mask/threshold": threshold, "entropy_mask/kept_fraction": masked_mean(keep, valid)}
    return keep, metrics


def off_policy_sequence_mask(
    advantages: torch.Tensor,
    logps: torch.Tensor,
    sample_logps: torch.Tensor,
    mask: torch.Tensor,
    threshold: float,
) -> tuple[torch.Tensor, Metrics]:
    """Float mask [N, R]: 0 where A < 0 and (1/|o|) sum_t (sample_logps - logps) > ``threshold``, 1 elsewhere on
    valid tokens. ``advantages`` are [N] or [N, R]; ``logps`` are the current policy's (used detached), and
    ``sample_logps`` the sampler's (or ``old_logps`` without a separate sampler, as TRL falls back to).

    Metrics: ``off_policy_mask/masked_fraction`` (of valid tokens) and ``off_policy_mask/seq_kl_max``.
    """
    fmask = mask.to(logps.dtype)
    seq_kl = masked_mean((sample_logps - logps).detach(), fmask, dim=-1)  # [N]
    adv = advantages.unsqueeze(-1) if advantages.dim() == 1 else advantages
    keep = ((adv >= 0) | (seq_kl.unsqueeze(-1) <= threshold)).to(logps.dtype).expand_as(fmask) * fmask
    metrics = {
        "off_policy_mask/masked_fraction": masked_mean(1.0 - keep, fmask),
        "off_policy_mask/seq_kl_max": seq_kl.max() if seq_kl.numel() else seq_kl.sum(),
    }
    return keep, metrics
