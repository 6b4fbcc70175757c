"""Policy losses and KL estimators against hand-derived closed forms and the written-out formulas of the GRPO
(DeepSeekMath, Shao et al. 2024, Eq. 3) and PPO (Schulman et al. 2017, Eq. 7) papers."""

import math

import pytest
import torch

from lit_rlhf.losses import GRPO_LOSSES, kl_penalty, ppo_policy_loss, ppo_value_loss

LN2 = math.log(2.0)
EPS_LOW, EPS_HIGH = 0.2, 0.28


def _t(x):
    return torch.tensor(x, dtype=torch.float64)


def _call(name, logps, old_logps, ref_logps, advantages, mask, **kw):
    if name == "dr_grpo":
        kw.setdefault("max_length", logps.shape[1])
    return GRPO_LOSSES[name](logps, old_logps, ref_logps, advantages, mask, **kw)


# ---------------------------------------------------------------- KL estimators


@pytest.mark.parametrize(
    ("estimator", "expected"),
    [("k1", [LN2, -LN2, 0.0]), ("k2", [LN2**2 / 2, LN2**2 / 2, 0.0]), ("k3", [LN2 - 0.5, 1.0 - LN2, 0.0])],
)
def test_kl_penalty_hand_values(estimator, expected):
    """x = logp - ref in {ln 2, -ln 2, 0}: k1 = x; k2 = x^2/2; k3 = e^{-x} + x - 1, i.e.
    k3(ln 2) = 1/2 + ln 2 - 1 = ln 2 - 1/2 and k3(-ln 2) = 2 - ln 2 - 1 = 1 - ln 2; every estimator is 0 at x = 0."""
    logps = _t([LN2 - 1.0, -LN2 - 1.0, -3.0])
    ref_logps = _t([-1.0, -1.0, -3.0])
    torch.testing.assert_close(kl_penalty(logps, ref_logps, estimator), _t(expected))


def test_k3_nonnegative_and_equals_ratio_form():
    """k3 = (rho - 1) - log rho with rho = pi_ref / pi, i.e. exp(ref - logp) - (ref - logp) - 1 (Schulman 2020;
    DeepSeekMath Eq. 4), >= 0 since e^y >= 1 + y."""
    g = torch.Generator().manual_seed(0)
    logps, ref_logps = -3 * torch.rand(4, 7, generator=g), -3 * torch.rand(4, 7, generator=g)
    k3 = kl_penalty(logps, ref_logps, "k3")
    assert (k3 >= 0).all()
    torch.testing.assert_close(k3, torch.exp(ref_logps - logps) - (ref_logps - logps) - 1)
    with pytest.raises(ValueError, match="unknown KL estimator"):
        kl_penalty(logps, ref_logps, "k4")


# ---------------------------------------------------------------- GRPO family

# Two completions, lengths 2 and 3 (position [0, 2] is padding), advantages A = (1, -2).
MASK = _t([[1, 1, 0], [1, 1, 1]])
ADV = _t([1.0, -2.0])
# Under ratio = 1 every per-token term is -A_i; the loss is that under each variant's normaliser, and the
# gradient w.r.t. logps[i, t] (d ratio / d logp = ratio = 1) is -A_i / normaliser_i on masked tokens, 0 elsewhere.
RATIO_ONE = {
    # (1/B) sum_i (1/|o_i|) sum_t -A_i = (-1 + 2) / 2 = 0.5; grad -A_i / (B |o_i|) = -1/4, 1/3
    "grpo": (0.5, [[-0.25, -0.25, 0.0], [1 / 3, 1 / 3, 1 / 3]]),
    # sum_{i,t} -A_i / 5 = (-2 + 6) / 5 = 0.8; grad -A_i / 5 = -0.2, 0.4
    "dapo": (0.8, [[-0.2, -0.2, 0.0], [0.4, 0.4, 0.4]]),
    # sum / (B * max_length) = 4 / (2 * 3); grad -A_i / 6
    "dr_grpo": (4 / 6, [[-1 / 6, -1 / 6, 0.0], [1 / 3, 1 / 3, 1 / 3]]),
    # s_i = 1, loss (1/B) sum_i -A_i = 0.5; d s_i / d logp_t = s_i / |o_i| -> same gradient as GRPO
    "gspo": (0.5, [[-0.25, -0.25, 0.0], [1 / 3, 1 / 3, 1 / 3]]),
    # ratio 1 < c = 3: the dual clip never binds, GRPO exactly
    "dual_clip": (0.5, [[-0.25, -0.25, 0.0], [1 / 3, 1 / 3, 1 / 3]]),
    # -sum_{i,t} A_i logp / 5 = -(1 (-1 - 2) - 2 (-0.5 - 1.5 - 2.5)) / 5 = -6/5; weight clip(1) = 1, so the
    # gradient -A_i / 5 is DAPO's
    "cispo": (-1.2, [[-0.2, -0.2, 0.0], [0.4, 0.4, 0.4]]),
    # f(1) = sigmoid(0) 4 / tau = 2 / tau: (-2 (A=1, tau_pos=1) + 4 / 1.05 (A=-2, tau_neg=1.05)) / 2; f'(1) = 1,
    # so the gradient is GRPO's
    "sapo": (-1 + 2 / 1.05, [[-0.25, -0.25, 0.0], [1 / 3, 1 / 3, 1 / 3]]),
}
HARD_CLIP = ("grpo", "dapo", "dr_grpo", "gspo", "dual_clip")  # the losses that zero the gradient of clipped tokens


@pytest.mark.parametrize("name", sorted(GRPO_LOSSES))
def test_ratio_one_is_policy_gradient(name):
    """logps == old_logps: loss = -mean advantage under the variant's normalisation, grad = -A / normaliser
    (cispo and sapo: values as derived in RATIO_ONE, the same gradients)."""
    logps = _t([[-1.0, -2.0, 0.0], [-0.5, -1.5, -2.5]]).requires_grad_()
    loss, metrics = _call(name, logps, logps.detach().clone(), None, ADV, MASK)
    loss.backward()
    expected_loss, expected_grad = RATIO_ONE[name]
    torch.testing.assert_close(loss.detach(), _t(expected_loss))
    torch.testing.assert_close(logps.grad, _t(expected_grad))
    assert metrics["kl"] == 0 and metrics["clip_ratio/region"] == 0
    assert all(not v.requires_grad and v.dim() == 0 for v in metrics.values())


@pytest.mark.parametrize("name", HARD_CLIP)
@pytest.mark.parametrize(
    ("advantage", "ratio", "clipped"),
    [
        (1.0, 1 + EPS_HIGH + 1e-3, True),  # A > 0 just above 1 + eps_high: clipped, no gradient
        (1.0, 1 + EPS_HIGH - 1e-3, False),  # just inside
        (-1.0, 1 - EPS_LOW - 1e-3, True),  # A < 0 just below 1 - eps_low: clipped
        (-1.0, 1 - EPS_LOW + 1e-3, False),  # just inside
        (1.0, 1 - EPS_LOW - 0.1, False),  # A > 0, ratio low: the min keeps the unclipped (pessimistic) term
        (-1.0, 1 + EPS_HIGH + 0.1, False),  # A < 0, ratio high: likewise
    ],
)
def test_clipping_boundaries(name, advantage, ratio, clipped):
    """One token, old_logp = 0, logp = ln r: per_token = -min(r A, clip(r, 0.8, 1.28) A).
    Clipped -> the loss is the constant -clip(r) A and d/dlogp = 0; otherwise loss = -r A and d/dlogp = -r A."""
    logps = _t([[math.log(ratio)]]).requires_grad_()
    loss, metrics = _call(
        name, logps, _t([[0.0]]), None, _t([advantage]), _t([[1.0]]), epsilon_low=EPS_LOW, epsilon_high=EPS_HIGH
    )
    loss.backward()
    if clipped:
        bound = 1 + EPS_HIGH if advantage > 0 else 1 - EPS_LOW
        torch.testing.assert_close(loss.detach(), _t(-bound * advantage))
        assert logps.grad.item() == 0.0
        assert metrics["clip_ratio/region"] == 1
        assert metrics["clip_ratio/high" if advantage > 0 else "clip_ratio/low"] == 1
    else:
        torch.testing.assert_close(loss.detach(), _t(-ratio * advantage))
        torch.testing.assert_close(logps.grad, _t([[-ratio * advantage]]))
        assert metrics["clip_ratio/region"] == 0


def test_grpo_mixed_batch_value_and_clip_metrics():
    """Ratios (0.7, 0.7, 1.5, 1.5), A = (-1, 1, 1, -1), eps = (0.2, 0.28), one token each:
    -min(-0.7, -0.8) = 0.8; -min(0.7, 0.8) = -0.7; -min(1.5, 1.28) = -1.28; -min(-1.5, -1.28) = 1.5;
    mean = 0.32 / 4 = 0.08. Low clip engaged on row 0 only, high on row 2 only -> 1/4, 1/4, region 1/2."""
    logps = torch.log(_t([[0.7], [0.7], [1.5], [1.5]]))
    loss, m = _call(
        "grpo",
        logps,
        torch.zeros_like(logps),
        None,
        _t([-1.0, 1.0, 1.0, -1.0]),
        torch.ones_like(logps),
        epsilon_low=EPS_LOW,
        epsilon_high=EPS_HIGH,
    )
    torch.testing.assert_close(loss, _t(0.08))
    assert (m["clip_ratio/low"].item(), m["clip_ratio/high"].item(), m["clip_ratio/region"].item()) == (0.25, 0.25, 0.5)


@pytest.mark.parametrize("name", sorted(GRPO_LOSSES))
def test_kl_term(name):
    """Ratio 1 and logp - ref = ln 2 on every token: per-token k3 = ln 2 - 1/2 is constant, so each variant adds
    beta (ln 2 - 1/2) times (its normaliser's share of tokens): 1 for grpo/dapo/gspo, 5 / (B max_length) = 5/6 for
    dr_grpo. The ``kl`` metric is the masked token mean, ln 2 - 1/2."""
    logps = _t([[-1.0, -2.0, 0.0], [-0.5, -1.5, -2.5]])
    beta, kl = 0.1, LN2 - 0.5
    loss, metrics = _call(name, logps, logps, logps - LN2, ADV, MASK, beta=beta)
    share = 5 / 6 if name == "dr_grpo" else 1.0
    torch.testing.assert_close(loss, _t(RATIO_ONE[name][0] + beta * kl * share))
    torch.testing.assert_close(metrics["kl"], _t(kl))
    with pytest.raises(ValueError, match="ref_logps"):
        _call(name, logps, logps, None, ADV, MASK, beta=beta)


def test_gspo_sequence_ratio():
    """logp - old = (ln 2, 0) on one sequence: s = exp(ln 2 / 2) = sqrt 2 > 1.28.
    A = 1: clipped, loss -1.28, zero gradient (token-level GRPO would give -(1.28 + 1)/2 = -1.14).
    A = -1: -min(-sqrt 2, -1.28) = sqrt 2, d/dlogp_t = s / |o| = sqrt 2 / 2 on both tokens."""
    old, mask = _t([[0.0, 0.0]]), _t([[1.0, 1.0]])
    kw = dict(epsilon_low=EPS_LOW, epsilon_high=EPS_HIGH)
    logps = _t([[LN2, 0.0]]).requires_grad_()
    loss, m = GRPO_LOSSES["gspo"](logps, old, None, _t([1.0]), mask, **kw)
    loss.backward()
    torch.testing.assert_close(loss.detach(), _t(-1.28))
    assert (logps.grad == 0).all() and m["clip_ratio/high"] == 1
    torch.testing.assert_close(GRPO_LOSSES["grpo"](logps, old, None, _t([1.0]), mask, **kw)[0].detach(), _t(-1.14))
    logps = _t([[LN2, 0.0]]).requires_grad_()
    loss, _ = GRPO_LOSSES["gspo"](logps, old, None, _t([-1.0]), mask, **kw)
    loss.backward()
    torch.testing.assert_close(loss.detach(), _t(math.sqrt(2)))
    torch.testing.assert_close(logps.grad, _t([[math.sqrt(2) / 2] * 2]))


def test_grpo_matches_deepseekmath_eq3():
    """DeepSeekMath Eq. 3 written out (beta = 0, G completions of one prompt, eps = 0.2):
    -(1/G) sum_i (1/|o_i|) sum_t min(r A_i, clip(r, 0.8, 1.2) A_i)."""
    g = torch.Generator().manual_seed(1)
    G, T, input_len = 4, 6, 2
    logps = -torch.rand(G, T, generator=g, dtype=torch.float64)
    old = -torch.rand(G, T, generator=g, dtype=torch.float64)
    adv = torch.randn(G, generator=g, dtype=torch.float64)
    mask = torch.zeros(G, T, dtype=torch.float64)
    mask[:, input_len:] = 1
    ratio = torch.exp(logps - old)
    a = adv.unsqueeze(1)
    policy_gradient = torch.minimum(ratio * a, ratio.clamp(0.8, 1.2) * a)
    written_out = ((-1 / G) * (1 / mask.sum(1, keepdim=True)) * policy_gradient * mask).sum()
    torch.testing.assert_close(GRPO_LOSSES["grpo"](logps, old, None, adv, mask)[0], written_out)


# ---------------------------------------------------------------- PPO


def test_ppo_policy_loss_closed_form():
    """Ratios (1, 1.5, 0.5, 1.1 | 3 masked), A = (1, 1, -1, -2 | 5), eps = 0.2; term max(-A r, -A clip(r)):
    t0: max(-1, -1) = -1; t1: max(-1.5, -1.2) = -1.2 (clipped); t2: max(0.5, 0.8) = 0.8 (clipped);
    t3: max(2.2, 2.2) = 2.2. loss = 0.8 / 4 = 0.2, clipfrac = 2/4, ratio_mean = 4.1 / 4,
    approxkl = mean(0.5 ln^2 r); grad = -A r / 4 on unclipped tokens (-1/4, 0, 0, 0.55, 0)."""
    ratios = _t([[1.0, 1.5, 0.5, 1.1, 3.0]])
    logps = torch.log(ratios).requires_grad_()
    mask = _t([[1, 1, 1, 1, 0]])
    loss, m = ppo_policy_loss(logps, torch.zeros_like(ratios), _t([[1.0, 1.0, -1.0, -2.0, 5.0]]), mask)
    loss.backward()
    torch.testing.assert_close(loss.detach(), _t(0.2))
    torch.testing.assert_close(logps.grad, _t([[-0.25, 0.0, 0.0, 0.55, 0.0]]))
    torch.testing.assert_close(m["policy/clipfrac"], _t(0.5))
    torch.testing.assert_close(m["policy/ratio_mean"], _t(1.025))
    approxkl = sum(0.5 * math.log(r) ** 2 for r in (1.0, 1.5, 0.5, 1.1)) / 4
    torch.testing.assert_close(m["policy/approxkl"], _t(approxkl))


def test_ppo_value_loss_closed_form():
    """c = 0.2; (V, V_old, R) per token: (1, 1, 2): both (1-2)^2 = 1; (1.5, 1, 2): clip(V) = 1.2,
    max(0.25, 0.64) = 0.64 (clipped); (1.5, 1, 1): max(0.25, 0.04) = 0.25; fourth token masked.
    loss = 0.5 (1 + 0.64 + 0.25) / 3 = 0.315, clipfrac = 1/3."""
    values = _t([[1.0, 1.5, 1.5, 0.0]])
    loss, m = ppo_value_loss(values, _t([[1.0, 1.0, 1.0, 0.1]]), _t([[2.0, 2.0, 1.0, 0.0]]), _t([[1, 1, 1, 0]]))
    torch.testing.assert_close(loss, _t(0.315))
    torch.testing.assert_close(m["value/clipfrac"], _t(1 / 3))


def test_ppo_losses_match_written_out_actor_and_critic():
    """PPO Eq. 7 and the clipped value loss written out as standalone actor/critic losses (masked sums, clip 0.2,
    divided by 8 accumulation steps; advantages = delta, returns = delta + value_old) equal ours / 8."""
    g = torch.Generator().manual_seed(2)
    B, T = 3, 5
    new = -torch.rand(B, T, generator=g, dtype=torch.float64)
    old = -torch.rand(B, T, generator=g, dtype=torch.float64)
    delta = torch.randn(B, T, generator=g, dtype=torch.float64)
    v_new = torch.randn(B, T, generator=g, dtype=torch.float64)
    v_old = torch.randn(B, T, generator=g, dtype=torch.float64)
    mask = (torch.rand(B, T, generator=g) > 0.3).double()
    mask[:, 0] = 1

    def get_loss_actor(prob_new, prob_old, delta, generate_mask):
        ratio = ((prob_new - prob_old) * generate_mask).exp()
        loss1 = delta * ratio
        loss2 = delta * ratio.clamp(0.8, 1.2)
        loss = torch.min(loss1, loss2) * generate_mask
        return -(loss.sum() / generate_mask.sum() / 8)

    def get_loss_critic(value_new, value_old, delta, generate_mask):
        loss1 = (value_new - delta - value_old) ** 2
        value_new_clipped = value_new.clamp(value_old - 0.2, value_old + 0.2)
        loss2 = (value_new_clipped - delta - value_old) ** 2
        loss = torch.max(loss1, loss2) * generate_mask
        return loss.sum() / 2 / generate_mask.sum() / 8

    torch.testing.assert_close(ppo_policy_loss(new, old, delta, mask)[0] / 8, get_loss_actor(new, old, delta, mask))
    value_loss = ppo_value_loss(v_new, v_old, delta + v_old, mask)[0]
    torch.testing.assert_close(value_loss / 8, get_loss_critic(v_new, v_old, delta, mask))
