"""Closed-form tests of the DPO-family losses (lit_rlhf.losses.preference).

Notation: pc, pr = policy chosen/rejected sequence logps; rc, rr = reference; h = (pc - rc) - (pr - rr).
"""

import math

import pytest
import torch

from lit_rlhf.losses import PREFERENCE_LOSSES, dpo_loss, hinge_loss, ipo_loss, robust_dpo_loss

# one pair with h = (-1 - -2) - (-3 - -2.5) = 1 - (-0.5) = 1.5, and one with h = 0
PC, PR, RC, RR = (
    torch.tensor([-1.0, -4.0]),
    torch.tensor([-3.0, -4.0]),
    torch.tensor([-2.0, -4.0]),
    torch.tensor([-2.5, -4.0]),
)


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


def test_dpo_closed_form():
    """DPO Eq. 7: loss = -log sigmoid(beta h). beta = 0.1, h = 1.5 -> -log sigmoid(0.15) = 0.62096...;
    h = 0 -> log 2. Rewards: beta (pc - rc) = 0.1, beta (pr - rr) = -0.05."""
    losses, cr, rr = dpo_loss(PC, PR, RC, RR, beta=0.1)
    assert losses[0].item() == pytest.approx(-math.log(sigmoid(0.15)), rel=1e-6)
    assert losses[1].item() == pytest.approx(math.log(2), rel=1e-6)
    assert cr.tolist() == pytest.approx([0.1, 0.0])
    assert rr.tolist() == pytest.approx([-0.05, 0.0])


def test_cdpo_label_smoothing_closed_form():
    """cDPO: -(1-e) log sigmoid(beta h) - e log sigmoid(-beta h); e = 0.1, beta h = 0.15."""
    losses, _, _ = dpo_loss(PC, PR, RC, RR, beta=0.1, label_smoothing=0.1)
    expected = -0.9 * math.log(sigmoid(0.15)) - 0.1 * math.log(sigmoid(-0.15))
    assert losses[0].item() == pytest.approx(expected, rel=1e-6)


def test_dpo_matches_written_out_formulation():
    """DPO Eq. 7 written out as a training loop would: loss = -(sigmoid(0.1 (prob_diff - prob_diff_ref)) + 1e-8).log(),
    prob_diff = pc - pr."""
    reference = -(torch.sigmoid(0.1 * ((PC - PR) - (RC - RR))) + 1e-8).log()
    ours, _, _ = dpo_loss(PC, PR, RC, RR, beta=0.1)
    torch.testing.assert_close(ours, reference, atol=1e-7, rtol=1e-6)


def test_dpo_gradient_closed_form():
    """d/d pc of -log sigmoid(beta h) = -beta (1 - sigmoid(beta h)) = -beta sigmoid(-beta h)."""
    pc = PC.clone().requires_grad_(True)
    dpo_loss(pc, PR, RC, RR, beta=0.1)[0].sum().backward()
    assert pc.grad[0].item() == pytest.approx(-0.1 * sigmoid(-0.15), rel=1e-6)


def test_ipo_closed_form():
    """IPO Eq. 17: (h - 1/(2 beta))^2; beta = 0.1 -> (1.5 - 5)^2 = 12.25 and (0 - 5)^2 = 25."""
    losses, _, _ = ipo_loss(PC, PR, RC, RR, beta=0.1)
    assert losses.tolist() == pytest.approx([12.25, 25.0])


def test_hinge_closed_form():
    """Hinge: max(0, 1 - beta h); beta = 0.1 -> 1 - 0.15 = 0.85 and 1; beta = 1 -> max(0, 1 - 1.5) = 0."""
    assert hinge_loss(PC, PR, RC, RR, beta=0.1)[0].tolist() == pytest.approx([0.85, 1.0])
    assert hinge_loss(PC, PR, RC, RR, beta=1.0)[0].tolist() == pytest.approx([0.0, 1.0])


def test_robust_dpo_closed_form():
    """Robust DPO: ((1-e)(-log s(bh)) - e(-log s(-bh))) / (1-2e); e = 0.2, bh = 0.15; e = 0 is plain DPO."""
    e, bh = 0.2, 0.15
    expected = ((1 - e) * -math.log(sigmoid(bh)) - e * -math.log(sigmoid(-bh))) / (1 - 2 * e)
    assert robust_dpo_loss(PC, PR, RC, RR, beta=0.1, label_smoothing=e)[0][0].item() == pytest.approx(
        expected, rel=1e-6
    )
    torch.testing.assert_close(robust_dpo_loss(PC, PR, RC, RR, beta=0.1)[0], dpo_loss(PC, PR, RC, RR, beta=0.1)[0])


def test_robust_dpo_is_unbiased_under_label_noise():
    """With labels flipped w.p. e, the expected robust loss equals the clean DPO loss (Chowdhury et al., Lemma 3.1)."""
    e = 0.2
    clean = dpo_loss(PC, PR, RC, RR, beta=0.1)[0]
    kept = robust_dpo_loss(PC, PR, RC, RR, beta=0.1, label_smoothing=e)[0]
    flipped = robust_dpo_loss(PR, PC, RR, RC, beta=0.1, label_smoothing=e)[0]
    torch.testing.assert_close((1 - e) * kept + e * flipped, clean)


def test_registry_and_shapes():
    assert set(PREFERENCE_LOSSES) == {"dpo", "ipo", "hinge", "robust_dpo"}
    for fn in PREFERENCE_LOSSES.values():
        losses, cr, rr = fn(PC, PR, RC, RR, beta=0.1)
        assert losses.shape == cr.shape == rr.shape == (2,)


def test_label_smoothing_range_checked():
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(PC, PR, RC, RR, label_smoothing=0.5)
