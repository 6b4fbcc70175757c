"""Per-token KL estimators of KL(pi || pi_ref) from samples of pi (Schulman, "Approximating KL divergence", 2020).

With ``log_ratio = logps - ref_logps`` (log pi/pi_ref at the sampled token; seed 000 table of k1/k2/k3):

- k1 = log_ratio                                  unbiased, high variance, can be negative
- k2 = log_ratio^2 / 2                            biased, low variance, >= 0
- k3 = exp(-log_ratio) + log_ratio - 1            unbiased, low variance, >= 0  (= exp(ref - logp) - (ref - logp) - 1)
"""

from __future__ import annotations

from typing import Literal

import torch

KLEstimator = Literal["k1", "k2", "k3"]


def kl_penalty(logps: torch.Tensor, ref_logps: torch.Tensor, estimator: KLEstimator = "k3") -> torch.Tensor:
    """Per-token KL estimate, same shape as ``logps``."""
    log_ratio = logps - ref_logps
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio**2
    if estimator == "k3":
        return torch.exp(-log_ratio) + log_ratio - 1.0
    raise ValueError(f"unknown KL estimator {estimator!r}; choose one of 'k1', 'k2', 'k3'")
