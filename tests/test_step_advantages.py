"""Process-supervision step advantages and RFT / Online-RFT gradient coefficients (DeepSeekMath, Shao et al. 2024,
§4.1.3 and §5.2.1) against hand-derived closed forms and the paper's formula written out step by step."""

import math

import pytest
import torch

from lit_rlhf.advantages import group_advantages, process_supervision_advantages, rft_coefficients
from lit_rlhf.losses import GRPO_LOSSES


def _t(x):
    return torch.tensor(x, dtype=torch.float64)


S5 = math.sqrt(5.0)


def test_hand_example():
    """One group of two completions. Completion 0 (5 tokens, 1 pad): steps end at t = 1, 3, 4 with rewards 1, 0, 1.
    Completion 1 (6 tokens): steps end at t = 2, 5 with rewards 1, 1. The group's step rewards R = (1, 0, 1, 1, 1):
    mean 0.8, unbiased std sqrt((4 * 0.04 + 0.64) / 4) = sqrt(0.2) = 1/sqrt5, so r~(1) = 0.2 sqrt5 = 1/sqrt5 and
    r~(0) = -0.8 sqrt5 = -4/sqrt5. A_t sums r~ over the steps ending at or after t:
    completion 0: t = 0, 1: (1 - 4 + 1)/sqrt5 = -2/sqrt5; t = 2, 3: -3/sqrt5; t = 4: 1/sqrt5; padding 0.
    completion 1: t = 0..2: 2/sqrt5; t = 3..5: 1/sqrt5."""
    ends = _t([[0, 1, 0, 1, 1, 0], [0, 0, 1, 0, 0, 1]]).bool()
    rewards = _t([[9, 1, 9, 0, 1, 9], [9, 9, 1, 9, 9, 1]])  # 9s sit off the step ends and must be ignored
    mask = _t([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]])
    adv = process_supervision_advantages(rewards, ends, mask, group_size=2, eps=0.0)
    expected = _t([[-2, -2, -3, -3, 1, 0], [2, 2, 2, 1, 1, 1]]) / S5
    torch.testing.assert_close(adv, expected)


def written_out(step_rewards, step_ends, mask, group_size, eps):
    """DeepSeekMath §4.1.3 step by step: collect the (index(j), r_i^index(j)) pairs of every completion, normalise all
    rewards of a group by the group's mean and std, then A_{i,t} = sum_{index(j) >= t} r~_i^index(j)."""
    n, length = step_rewards.shape
    out = torch.zeros(n, length, dtype=torch.float64)
    for start in range(0, n, group_size):
        steps = [
            (i, t, step_rewards[i, t].item())
            for i in range(start, start + group_size)
            for t in range(length)
            if step_ends[i, t]
        ]
        values = torch.tensor([r for _, _, r in steps], dtype=torch.float64)
        mean, std = values.mean().item(), values.std().item()
        for i in range(start, start + group_size):
            for t in range(length):
                if mask[i, t]:
                    out[i, t] = sum((r - mean) / (std + eps) for j, end, r in steps if j == i and end >= t)
    return out


def test_matches_paper_formula_on_random_steps():
    """Two groups of three, random step boundaries (each completion ends with a step) and random step rewards."""
    g = torch.Generator().manual_seed(0)
    n, length = 6, 9
    lengths = torch.tensor([9, 5, 7, 3, 8, 6])
    mask = torch.arange(length)[None, :] < lengths[:, None]
    ends = (torch.rand(n, length, generator=g) < 0.35) & mask
    ends[torch.arange(n), lengths - 1] = True
    rewards = torch.rand(n, length, generator=g, dtype=torch.float64)
    ours = process_supervision_advantages(rewards, ends, mask, group_size=3, eps=1e-4)
    torch.testing.assert_close(ours, written_out(rewards, ends, mask, 3, 1e-4))


def test_one_step_per_completion_is_outcome_supervision():
    """Each completion one step ending at its last token, with the outcome reward: every token's advantage is the
    group-relative outcome advantage (r - mean) / (std + eps) of :func:`group_advantages`."""
    g = torch.Generator().manual_seed(1)
    n, length, group = 8, 6, 4
    lengths = torch.randint(1, length + 1, (n,), generator=g)
    mask = torch.arange(length)[None, :] < lengths[:, None]
    ends = torch.zeros(n, length, dtype=torch.bool)
    ends[torch.arange(n), lengths - 1] = True
    outcome = torch.rand(n, generator=g, dtype=torch.float64)
    rewards = outcome[:, None].expand(n, length)
    ours = process_supervision_advantages(rewards, ends, mask, group_size=group)
    torch.testing.assert_close(ours, group_advantages(outcome, group)[:, None] * mask)


def test_normalised_within_each_group():
    """Shifting one group's step rewards by +10 and scaling them by 3 leaves every advantage unchanged (eps = 0):
    each group is normalised by its own steps' mean and std."""
    ends = _t([[1, 0, 1], [0, 1, 1], [1, 1, 0], [0, 0, 1]]).bool()
    rewards = _t([[1, 0, 0], [0, 0.5, 1], [0.2, 1, 0], [0, 0, 0.3]])
    mask = torch.ones(4, 3)
    base = process_supervision_advantages(rewards, ends, mask, group_size=2, eps=0.0)
    moved = rewards.clone()
    moved[2:] = 10 + 3 * moved[2:]
    torch.testing.assert_close(process_supervision_advantages(moved, ends, mask, group_size=2, eps=0.0), base)


def test_validation():
    mask = _t([[1, 1, 0], [1, 1, 1]])
    with pytest.raises(ValueError, match="outside mask"):
        process_supervision_advantages(torch.zeros(2, 3), _t([[0, 0, 1], [0, 0, 1]]).bool(), mask, group_size=2)
    with pytest.raises(ValueError, match="at least 2 steps"):
        process_supervision_advantages(torch.zeros(2, 3), _t([[0, 1, 0], [0, 0, 0]]).bool(), mask, group_size=2)
    with pytest.raises(ValueError, match="groups of group_size=3"):
        process_supervision_advantages(torch.zeros(2, 3), _t([[0, 1, 0], [0, 0, 1]]).bool(), mask, group_size=3)


def test_step_advantages_flow_into_the_grpo_loss():
    """Per-token advantages [N, R] in grpo_loss at ratio 1: d loss / d logp_{i,t} = -A_{i,t} / (B |o_i|)."""
    ends = _t([[0, 1, 0, 1, 1, 0], [0, 0, 1, 0, 0, 1]]).bool()
    rewards = _t([[0, 1, 0, 0, 1, 0], [0, 0, 1, 0, 0, 1]])
    mask = _t([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]])
    adv = process_supervision_advantages(rewards, ends, mask, group_size=2)
    logps = -torch.rand(2, 6, dtype=torch.float64)
    x = logps.clone().requires_grad_()
    GRPO_LOSSES["grpo"](x, logps, None, adv, mask)[0].backward()
    torch.testing.assert_close(x.grad, -adv / (2 * mask.sum(-1, keepdim=True)))


# ---------------------------------------------------------------- RFT / Online RFT


def test_rft_coefficients():
    """GC = 1 for a correct completion, 0 for a wrong one; bool or 0/1 in; graded rewards are refused."""
    torch.testing.assert_close(rft_coefficients(torch.tensor([True, False, True])), torch.tensor([1.0, 0.0, 1.0]))
    torch.testing.assert_close(rft_coefficients(_t([0.0, 1.0])), torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="0/1"):
        rft_coefficients(_t([0.5, 1.0]))


def test_online_rft_gradient_is_sft_on_correct_samples():
    """DeepSeekMath §5.2.1: with coefficient I(o) the policy gradient at ratio 1 is
    (1/B) sum_i I(o_i) (1/|o_i|) sum_t grad log pi, i.e. the gradient of the SFT loss
    -(1/B) sum_i I(o_i) (1/|o_i|) sum_t logp on the correct completions only; wrong ones get no gradient."""
    g = torch.Generator().manual_seed(2)
    logps = -torch.rand(4, 5, generator=g, dtype=torch.float64)
    mask = _t([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 0]])
    correct = torch.tensor([True, False, True, False])
    x = logps.clone().requires_grad_()
    GRPO_LOSSES["grpo"](x, logps, None, rft_coefficients(correct).double(), mask)[0].backward()
    y = logps.clone().requires_grad_()
    sft = -(correct.double() * (y * mask).sum(-1) / mask.sum(-1)).mean()
    sft.backward()
    torch.testing.assert_close(x.grad, y.grad)
    assert (x.grad[~correct] == 0).all()
