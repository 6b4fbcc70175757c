"""CISPO, SAPO, dual-clip PPO, the k3+ / importance-weighted k3 KL terms, KL in the reward, loss weights, per-token
advantages and the top-entropy mask: hand-derived closed forms, and each new loss next to its peer's published
formula (TRL ``trl/trainer/grpo_trainer.py`` loss branches, verl ``verl/trainer/ppo/core_algos.py``), written out
independently here from the formulas those files implement."""

import math

import pytest
import torch

from lit_rlhf.losses import (
    GRPO_LOSSES,
    PPO_POLICY_LOSSES,
    kl_in_reward,
    kl_penalty,
    ppo_dual_clip_loss,
    ppo_policy_loss,
    top_entropy_mask,
)

LN2 = math.log(2.0)
EPS_LOW, EPS_HIGH = 0.2, 0.28


def _t(x):
    return torch.tensor(x, dtype=torch.float64)


def _sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


def _one_token(name, ratio, advantage, **kw):
    """Loss, d loss / d logp and metrics for one token with old_logp = 0, logp = ln ratio."""
    logps = _t([[math.log(ratio)]]).requires_grad_()
    loss, metrics = GRPO_LOSSES[name](logps, _t([[0.0]]), None, _t([advantage]), _t([[1.0]]), **kw)
    loss.backward()
    return loss.item(), logps.grad.item(), metrics


def random_inputs(seed=0, B=4, T=6):
    """Shared random batch (float64): logps, old, ref, per-sequence advantages, a right-padded mask."""
    g = torch.Generator().manual_seed(seed)
    logps = -2 * torch.rand(B, T, generator=g, dtype=torch.float64)
    old = logps + 0.6 * torch.randn(B, T, generator=g, dtype=torch.float64)  # ratios well outside [0.8, 1.28]
    ref = logps + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    lengths = torch.tensor([T, T - 2, 3, T - 1])[:B]
    mask = (torch.arange(T)[None, :] < lengths[:, None]).double()
    return logps, old, ref, adv, mask


def _value_and_grad(fn, logps):
    x = logps.clone().requires_grad_()
    value = fn(x)
    (grad,) = torch.autograd.grad(value, x)
    return value.detach(), grad


def _seq_mean(per_token, mask):
    return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()


def _token_mean(per_token, mask):
    return (per_token * mask).sum() / mask.sum()


def _k3(logp, ref):
    return torch.exp(ref - logp) - (ref - logp) - 1


# ---------------------------------------------------------------- peer formulas, written out


def trl_cispo(logp, old, ref, adv, mask, bound, beta):
    """TRL loss_type="cispo": weight clamp(r, max=epsilon_high) detached (epsilon_high IS the bound), times
    -A logp, + beta k3, summed over tokens / number of tokens (one process)."""
    weight = torch.clamp(torch.exp(logp - old), max=bound).detach()
    per_token = -weight * adv[:, None] * logp + beta * _k3(logp, ref)
    return _token_mean(per_token, mask)


def verl_cispo(logp, old, adv, mask, lo, hi):
    """verl compute_policy_loss_cispo: clamp(exp(clamp(logp - old, -20, 20)), 1 - lo, 1 + hi) detached, times
    -A logp, token-mean."""
    weight = torch.clamp(torch.exp(torch.clamp(logp - old, -20, 20)), 1 - lo, 1 + hi).detach()
    return _token_mean(-weight * adv[:, None] * logp, mask)


def trl_sapo(logp, old, ref, adv, mask, tau_pos, tau_neg, beta):
    """TRL loss_type="sapo": tau = tau_pos where A > 0 else tau_neg; -sigmoid(tau (r - 1)) 4 / tau A + beta k3,
    per-sequence token mean, then mean."""
    a = adv[:, None]
    tau = torch.where(a > 0, torch.full_like(a, tau_pos), torch.full_like(a, tau_neg))  # float64 (TRL: float32)
    soft = torch.sigmoid(tau * (torch.exp(logp - old) - 1)) * 4 / tau
    return _seq_mean(-soft * a + beta * _k3(logp, ref), mask)


def verl_sapo(logp, old, adv, mask, tau_pos, tau_neg):
    """verl compute_policy_loss_sapo: gate(r, tau) = sigmoid(tau (r - 1)) 4 / tau with r from the clamped
    log-ratio, -gate A, seq-mean-token-mean."""
    a = adv[:, None]
    tau = torch.where(a > 0, torch.tensor(tau_pos, dtype=a.dtype), torch.tensor(tau_neg, dtype=a.dtype))
    r = torch.exp(torch.clamp(logp - old, -20, 20))
    return _seq_mean(-torch.sigmoid(tau * (r - 1)) * (4 / tau) * a, mask)


def verl_dual_clip(logp, old, adv, mask, lo, hi, c, agg):
    """verl compute_policy_loss_vanilla: max(-A r, -A clip(r)), for A < 0 also min with -A c; then agg_loss
    ("token-mean" or "seq-mean-token-mean"). Returns (loss, pg_clipfrac_lower)."""
    r = torch.exp(torch.clamp(logp - old, -20, 20))
    pg1, pg2 = -adv * r, -adv * torch.clamp(r, 1 - lo, 1 + hi)
    clip1 = torch.maximum(pg1, pg2)
    pg3 = -adv * c
    losses = torch.where(adv < 0, torch.min(pg3, clip1), clip1)
    lower = (((clip1 > pg3) & (adv < 0)).double() * mask).sum() / mask.sum()
    return (_token_mean(losses, mask) if agg == "token-mean" else _seq_mean(losses, mask)), lower


# ---------------------------------------------------------------- CISPO


@pytest.mark.parametrize(
    ("advantage", "ratio", "weight", "side"),
    [
        (1.0, 1.5, 1 + EPS_HIGH, "high"),  # clipped above: weight 1.28, gradient kept (grpo/dapo: 0)
        (-1.0, 0.5, 1 - EPS_LOW, "low"),  # clipped below: weight 0.8, gradient kept
        (1.0, 1.1, 1.1, None),  # inside: weight r, gradient -r A as unclipped PPO
        (-1.0, 1.5, 1 + EPS_HIGH, "high"),  # A < 0, r high: PPO keeps r (grad 1.5); CISPO truncates the weight
    ],
)
def test_cispo_weight_is_clipped_but_gradient_kept(advantage, ratio, weight, side):
    """One token, old = 0, logp = ln r: loss = -w A ln r with w = clip(r, 0.8, 1.28) held constant, so
    d/dlogp = -w A, nonzero on clipped tokens too. The clip metrics count truncated weights of either sign of A."""
    loss, grad, m = _one_token("cispo", ratio, advantage, epsilon_low=EPS_LOW, epsilon_high=EPS_HIGH)
    assert loss == pytest.approx(-weight * advantage * math.log(ratio))
    assert grad == pytest.approx(-weight * advantage)
    assert m["clip_ratio/region"] == (side is not None)
    assert m["clip_ratio/high"] == (side == "high") and m["clip_ratio/low"] == (side == "low")
    if side is not None and (advantage > 0) == (side == "high"):
        assert _one_token("dapo", ratio, advantage, epsilon_low=EPS_LOW, epsilon_high=EPS_HIGH)[1] == 0.0


def test_cispo_defaults_have_no_lower_bound_and_cap_five():
    """Defaults eps_low = 1, eps_high = 4: r = 0.01 keeps weight 0.01 (no floor); r = 6 is capped at 5."""
    assert _one_token("cispo", 0.01, -1.0)[1] == pytest.approx(0.01)
    assert _one_token("cispo", 6.0, 1.0)[1] == pytest.approx(-5.0)


def test_cispo_matches_trl_and_verl():
    """Same inputs, ratios in [0.18, 6.6]: ours with eps (1, 4) and beta = 0.04 equals TRL's formula with
    epsilon_high = 5 (its absolute bound); ours with eps (0.2, 0.28) equals verl's. Values and gradients."""
    logps, old, ref, adv, mask = random_inputs()
    ours = _value_and_grad(
        lambda x: GRPO_LOSSES["cispo"](x, old, ref, adv, mask, epsilon_low=1.0, epsilon_high=4.0, beta=0.04)[0], logps
    )
    trl = _value_and_grad(lambda x: trl_cispo(x, old, ref, adv, mask, bound=5.0, beta=0.04), logps)
    torch.testing.assert_close(ours, trl)
    for eps in ((1.0, 4.0), (EPS_LOW, EPS_HIGH)):  # both comparisons include truncated weights
        m = GRPO_LOSSES["cispo"](logps, old, None, adv, mask, epsilon_low=eps[0], epsilon_high=eps[1])[1]
        assert 0 < m["clip_ratio/region"] < 1
    ours = _value_and_grad(
        lambda x: GRPO_LOSSES["cispo"](x, old, None, adv, mask, epsilon_low=EPS_LOW, epsilon_high=EPS_HIGH)[0], logps
    )
    verl = _value_and_grad(lambda x: verl_cispo(x, old, adv, mask, EPS_LOW, EPS_HIGH), logps)
    torch.testing.assert_close(ours, verl)


# ---------------------------------------------------------------- SAPO


def test_sapo_soft_gate_closed_form():
    """f(r) = sigmoid(tau (r - 1)) 4 / tau; d/dlogp of -f(r) A = -4 s (1 - s) r A with s = sigmoid(tau (r - 1)).
    r = 2, A = 1, tau_pos = 1: loss -4 sigmoid(1), gradient -8 sigmoid(1)(1 - sigmoid(1)) = -1.5729 where GRPO's
    hard clip gives 0; gate 4 s (1 - s) = 0.7864 (not damped), and the hard clip would have engaged.
    r = 2, A = -1, tau_neg = 1.05: loss +4 sigmoid(1.05) / 1.05, gradient +8 s (1 - s) with s = sigmoid(1.05),
    a smaller gate than tau_pos's: negative tokens are damped faster. r = 3, A = 1: gate 4 s (1 - s), s = sigmoid(2),
    = 0.41997 < 1/2: damped."""
    s = _sigmoid(1.0)
    loss, grad, m = _one_token("sapo", 2.0, 1.0)
    assert (loss, grad) == (pytest.approx(-4 * s), pytest.approx(-8 * s * (1 - s)))
    assert m["gate/mean"].item() == pytest.approx(4 * s * (1 - s)) and m["gate/damped"] == 0
    assert m["clip_ratio/high"] == 1
    assert _one_token("grpo", 2.0, 1.0)[1] == 0.0
    s_neg = _sigmoid(1.05)
    loss, grad, m_neg = _one_token("sapo", 2.0, -1.0)
    assert (loss, grad) == (pytest.approx(4 * s_neg / 1.05), pytest.approx(8 * s_neg * (1 - s_neg)))
    assert m_neg["gate/mean"] < m["gate/mean"]
    s3 = _sigmoid(2.0)
    _, grad, m = _one_token("sapo", 3.0, 1.0)
    assert m["gate/mean"].item() == pytest.approx(4 * s3 * (1 - s3)) and 4 * s3 * (1 - s3) == pytest.approx(0.41997434)
    assert m["gate/damped"] == 1 and grad == pytest.approx(-3 * 4 * s3 * (1 - s3))


def test_sapo_temperatures_validated():
    with pytest.raises(ValueError, match="temperatures"):
        _one_token("sapo", 1.0, 1.0, tau_neg=0.0)


def test_sapo_matches_trl_and_verl():
    """Same inputs: ours (tau 1.0 / 1.05, beta = 0.04) equals TRL's sapo branch; with beta = 0 and tau (0.5, 2.0)
    verl's compute_policy_loss_sapo. Values and gradients."""
    logps, old, ref, adv, mask = random_inputs(seed=1)
    ours = _value_and_grad(lambda x: GRPO_LOSSES["sapo"](x, old, ref, adv, mask, beta=0.04)[0], logps)
    trl = _value_and_grad(lambda x: trl_sapo(x, old, ref, adv, mask, 1.0, 1.05, beta=0.04), logps)
    torch.testing.assert_close(ours, trl)
    ours = _value_and_grad(lambda x: GRPO_LOSSES["sapo"](x, old, None, adv, mask, tau_pos=0.5, tau_neg=2.0)[0], logps)
    verl = _value_and_grad(lambda x: verl_sapo(x, old, adv, mask, 0.5, 2.0), logps)
    torch.testing.assert_close(ours, verl)


# ---------------------------------------------------------------- dual clip


@pytest.mark.parametrize(
    ("advantage", "ratio", "loss", "grad", "dual"),
    [
        (-1.0, 3.5, 3.0, 0.0, 1),  # A < 0, r > c: loss capped at c |A| = 3, no gradient (PPO: 3.5, grad 3.5)
        (-1.0, 2.9, 2.9, 2.9, 0),  # r < c: PPO's -r A, gradient -r A
        (-1.0, 0.5, 0.8, 0.0, 0),  # the ordinary low clip: -min(-0.5, -0.8) = 0.8
        (1.0, 3.5, -1.28, 0.0, 0),  # A > 0 untouched: the ordinary high clip
    ],
)
def test_dual_clip_closed_form(advantage, ratio, loss, grad, dual):
    """One token, eps = (0.2, 0.28), c = 3: for A < 0 the loss is min(max(-r A, -clip(r) A), c |A|)."""
    kw = dict(epsilon_low=EPS_LOW, epsilon_high=EPS_HIGH, dual_clip_c=3.0)
    value, g, m = _one_token("dual_clip", ratio, advantage, **kw)
    assert (value, g, m["clip_ratio/dual"].item()) == (pytest.approx(loss), pytest.approx(grad), dual)
    logps = _t([[math.log(ratio)]]).requires_grad_()
    value, m = ppo_dual_clip_loss(logps, _t([[0.0]]), _t([[advantage]]), _t([[1.0]]), clip_range=EPS_LOW)
    value.backward()
    expected = 1.2 if (advantage, ratio) == (1.0, 3.5) else loss  # PPO's symmetric clip range 0.2
    assert value.item() == pytest.approx(-expected if advantage > 0 else expected)
    assert logps.grad.item() == pytest.approx(grad)
    assert m["policy/dual_clipfrac"] == dual


def test_dual_clip_needs_c_above_one():
    with pytest.raises(ValueError, match="dual_clip_c"):
        _one_token("dual_clip", 1.0, -1.0, dual_clip_c=1.0)
    with pytest.raises(ValueError, match="dual_clip_c"):
        ppo_dual_clip_loss(_t([[0.0]]), _t([[0.0]]), _t([[-1.0]]), _t([[1.0]]), dual_clip_c=0.5)


def test_dual_clip_matches_verl():
    """verl compute_policy_loss_vanilla with clip_ratio_c = 3 on the same inputs (ratios up to ~6, so the cap binds):
    GRPO dual_clip = its seq-mean-token-mean, PPO dual clip = its token-mean, per-token advantages; values,
    gradients and pg_clipfrac_lower."""
    logps, old, _, adv, mask = random_inputs(seed=2)
    old = old - 1.0 * (adv[:, None] < 0)  # ratios e^1 larger on negative rows, past c = 3 for some tokens
    ours = GRPO_LOSSES["dual_clip"](logps, old, None, adv, mask, epsilon_low=EPS_LOW, epsilon_high=EPS_HIGH)
    verl = verl_dual_clip(logps, old, adv[:, None], mask, EPS_LOW, EPS_HIGH, 3.0, "seq-mean-token-mean")
    assert 0 < verl[1] < 1
    torch.testing.assert_close((ours[0], ours[1]["clip_ratio/dual"]), verl)
    a = adv[:, None]
    ours = _value_and_grad(lambda x: GRPO_LOSSES["dual_clip"](x, old, None, adv, mask, epsilon_high=EPS_HIGH)[0], logps)
    verl = _value_and_grad(lambda x: verl_dual_clip(x, old, a, mask, 0.2, EPS_HIGH, 3.0, "seq-mean")[0], logps)
    torch.testing.assert_close(ours, verl)
    tok_adv = adv[:, None] * torch.linspace(0.5, 1.5, logps.shape[1], dtype=torch.float64)
    ours = _value_and_grad(lambda x: ppo_dual_clip_loss(x, old, tok_adv, mask)[0], logps)
    verl = _value_and_grad(lambda x: verl_dual_clip(x, old, tok_adv, mask, 0.2, 0.2, 3.0, "token-mean")[0], logps)
    torch.testing.assert_close(ours, verl)


def test_ppo_policy_losses_registry():
    """Both PPO losses by name; with c large enough never to bind, dual clip equals plain PPO."""
    assert PPO_POLICY_LOSSES == {"ppo": ppo_policy_loss, "dual_clip": ppo_dual_clip_loss}
    logps, old, _, adv, mask = random_inputs(seed=3)
    tok_adv = adv[:, None].expand_as(logps)
    plain = PPO_POLICY_LOSSES["ppo"](logps, old, tok_adv, mask)[0]
    torch.testing.assert_close(PPO_POLICY_LOSSES["dual_clip"](logps, old, tok_adv, mask, dual_clip_c=1e6)[0], plain)


# ---------------------------------------------------------------- KL terms


def test_k3_plus_value_of_k3_gradient_of_k2():
    """x = logp - ref = ln 2: value k3 = ln 2 - 1/2; gradient x = ln 2 (k2's), where k3's own is 1 - e^-x = 1/2."""
    logps = _t([LN2]).requires_grad_()
    value = kl_penalty(logps, _t([0.0]), "k3+")
    value.sum().backward()
    assert value.item() == pytest.approx(LN2 - 0.5) and logps.grad.item() == pytest.approx(LN2)


def test_k3_iw_closed_form_and_ratio_one_reduction():
    """k3_iw = r k3 with r = exp(logp - old); d/dlogp [r (e^-x + x - 1)] = r k3 + r (1 - e^-x) = r x.
    x = ln 2, r = 2: value 2 (ln 2 - 1/2) = 2 ln 2 - 1, gradient 2 ln 2. r = 1: value k3, gradient x (as k3+)."""
    for r in (2.0, 1.0):
        logps = _t([LN2]).requires_grad_()
        value = kl_penalty(logps, _t([0.0]), "k3_iw", old_logps=_t([LN2 - math.log(r)]))
        value.sum().backward()
        assert value.item() == pytest.approx(r * (LN2 - 0.5)) and logps.grad.item() == pytest.approx(r * LN2)
    with pytest.raises(ValueError, match="old_logps"):
        kl_penalty(_t([0.0]), _t([0.0]), "k3_iw")


def test_k3_iw_and_k3_plus_are_unbiased_off_and_on_policy():
    """Exact expectations over a 3-token vocabulary (DeepSeek-V3.2 §3.1's argument): with samples from pi_old,
    E_old[r k3] = sum_a pi(a) k3(a) = KL(pi || pi_ref) and E_old[grad (r k3)] = grad KL, while E_old[k3] is not
    KL(pi || pi_ref). On policy (pi_old = pi), E_pi[grad k3+] = E_pi[x grad log pi] = grad KL as well."""
    logits = _t([0.3, -1.0, 1.2]).requires_grad_()
    ref = torch.log_softmax(_t([0.0, 0.5, -0.5]), -1)
    old = torch.log_softmax(_t([1.0, -0.2, 0.1]), -1)
    logp = torch.log_softmax(logits, -1)
    exact = (logp.exp() * (logp - ref)).sum()
    (exact_grad,) = torch.autograd.grad(exact, logits, retain_graph=True)
    iw = (old.exp() * kl_penalty(logp, ref, "k3_iw", old_logps=old)).sum()
    (iw_grad,) = torch.autograd.grad(iw, logits, retain_graph=True)
    torch.testing.assert_close((iw.detach(), iw_grad), (exact.detach(), exact_grad))
    assert abs((old.exp() * kl_penalty(logp, ref, "k3")).sum().item() - exact.item()) > 1e-2
    plus = (logp.exp().detach() * kl_penalty(logp, ref, "k3+")).sum()
    (plus_grad,) = torch.autograd.grad(plus, logits)
    torch.testing.assert_close(plus_grad, exact_grad)


def test_grpo_k3_iw_matches_trl_bias_correction_and_k3_plus_matches_verl():
    """TRL use_bias_correction_kl: per_token_kl = k3 * exp(logp - old) (with gradient), in the grpo loss with
    beta = 0.1. verl "k3+": 0.5 x^2 - sg(0.5 x^2) + sg(k3). Values and gradients on the same inputs."""
    logps, old, ref, adv, mask = random_inputs(seed=4)

    def trl_grpo(x):
        r = torch.exp(x - old)
        pg = -torch.min(r * adv[:, None], torch.clamp(r, 0.8, 1.2) * adv[:, None])
        return _seq_mean(pg + 0.1 * _k3(x, ref) * r, mask)

    kw = dict(beta=0.1, kl_estimator="k3_iw")
    ours = _value_and_grad(lambda x: GRPO_LOSSES["grpo"](x, old, ref, adv, mask, **kw)[0], logps)
    torch.testing.assert_close(ours, _value_and_grad(trl_grpo, logps))

    def verl_k3_plus(x):
        k2 = 0.5 * (x - ref) ** 2
        return (k2 - k2.detach() + _k3(x, ref).detach()).sum()

    ours = _value_and_grad(lambda x: kl_penalty(x, ref, "k3+").sum(), logps)
    torch.testing.assert_close(ours, _value_and_grad(verl_k3_plus, logps))


def test_kl_in_reward_closed_form():
    """k1 = logp - ref = ((0.1, 0.2, pad 9), (0.3, 0, 0)), beta = 0.5: sequence KL 0.3 and 0.3, so the scores
    (1, 0) become (0.85, -0.15); the KL returned is 0 on padding; nothing carries a gradient."""
    ref = _t([[-1.0, -1.0, -1.0], [-2.0, -2.0, -2.0]])
    logps = (ref + _t([[0.1, 0.2, 9.0], [0.3, 0.0, 0.0]])).requires_grad_()
    mask = _t([[1, 1, 0], [1, 1, 1]])
    scores, kl = kl_in_reward(_t([1.0, 0.0]), logps, ref, mask, beta=0.5)
    torch.testing.assert_close(scores, _t([0.85, -0.15]))
    torch.testing.assert_close(kl, _t([[0.1, 0.2, 0.0], [0.3, 0.0, 0.0]]))
    assert not scores.requires_grad and not kl.requires_grad
    k3_scores, _ = kl_in_reward(_t([1.0, 0.0]), logps, ref, mask, beta=1.0, estimator="k3")
    k3 = [math.exp(-x) + x - 1 for x in (0.1, 0.2, 0.3)]
    torch.testing.assert_close(k3_scores, _t([1.0 - k3[0] - k3[1], -k3[2]]))


# ---------------------------------------------------------------- weights and per-token advantages


@pytest.mark.parametrize("name", sorted(GRPO_LOSSES))
def test_weights_scale_policy_term_only(name):
    """Ratio 1, A = (1, -2), lengths (2, 3), logp - ref = ln 2 everywhere (k3 = ln 2 - 1/2), beta = 0.1.
    Weights (0.5, 0 | 1, 1, 2) multiply each token's policy gradient (-A / normaliser): the gradient of the
    weighted loss minus the unweighted one is (w - 1) times the policy-only gradient, the KL part unchanged, and
    the normaliser is the same (a zero weight does not shorten the sequence)."""
    logps = _t([[-1.0, -2.0, 0.0], [-0.5, -1.5, -2.5]])
    mask, adv = _t([[1, 1, 0], [1, 1, 1]]), _t([1.0, -2.0])
    weights = _t([[0.5, 0.0, 7.0], [1.0, 1.0, 2.0]])
    kw = {"max_length": 3} if name == "dr_grpo" else {}

    def grad(w, beta):
        return _value_and_grad(
            lambda x: GRPO_LOSSES[name](x, logps, logps - LN2, adv, mask, beta=beta, weights=w, **kw)[0], logps
        )[1]

    policy_only = grad(None, 0.0)
    torch.testing.assert_close(grad(weights, 0.1) - grad(None, 0.1), (weights - 1) * policy_only * mask)


def test_ppo_weights():
    """ppo_policy_loss at ratio 1: loss = masked mean of -A w; weights (1, 0, 3) on A = (1, 1, 1) -> -4/3."""
    loss, _ = ppo_policy_loss(
        _t([[0.0, 0.0, 0.0]]),
        _t([[0.0, 0.0, 0.0]]),
        _t([[1.0, 1.0, 1.0]]),
        _t([[1, 1, 1]]),
        weights=_t([[1.0, 0.0, 3.0]]),
    )
    torch.testing.assert_close(loss, _t(-4 / 3))


@pytest.mark.parametrize("name", sorted(GRPO_LOSSES))
def test_per_token_advantages_constant_per_row_match_per_sequence(name):
    """Advantages [B, T] equal to A_i on every token give the same loss, gradient and metrics as [B]."""
    logps, old, ref, adv, mask = random_inputs(seed=5)
    kw = {"max_length": logps.shape[1]} if name == "dr_grpo" else {}
    per_seq = _value_and_grad(lambda x: GRPO_LOSSES[name](x, old, ref, adv, mask, beta=0.05, **kw)[0], logps)
    tok = adv[:, None].expand_as(logps).clone()
    per_tok = _value_and_grad(lambda x: GRPO_LOSSES[name](x, old, ref, tok, mask, beta=0.05, **kw)[0], logps)
    torch.testing.assert_close(per_seq, per_tok)
    with pytest.raises(ValueError, match="advantages must be"):
        GRPO_LOSSES[name](logps, old, ref, adv[:2], mask, **kw)


def test_gspo_token_form_with_varying_advantages():
    """GSPO-token: one sequence, logp - old = (ln 2, 0), s = sqrt 2 (inside eps_high = 1), A_t = (1, -1):
    loss (1/2)(-sqrt 2 + sqrt 2) = 0, d/dlogp_t = -A_t s / |o| = (-sqrt 2 / 2, sqrt 2 / 2). (Differentiating the
    sequence ratio instead would give both tokens the mean advantage's gradient, 0.)"""
    logps = _t([[LN2, 0.0]]).requires_grad_()
    loss, _ = GRPO_LOSSES["gspo"](logps, _t([[0.0, 0.0]]), None, _t([[1.0, -1.0]]), _t([[1.0, 1.0]]), epsilon_high=1.0)
    loss.backward()
    assert loss.item() == pytest.approx(0.0)
    torch.testing.assert_close(logps.grad, _t([[-math.sqrt(2) / 2, math.sqrt(2) / 2]]))


# ---------------------------------------------------------------- top-entropy mask

ENTROPY = _t([[0.1, 0.5, 0.9, 0.3], [0.7, 0.2, 0.4, 5.0]])
ENTROPY_MASK = _t([[1, 1, 1, 1], [1, 1, 1, 0]])  # the padded 5.0 must not count


@pytest.mark.parametrize(
    ("rho", "threshold", "kept"),
    [
        # valid sorted: 0.1 0.2 0.3 0.4 0.5 0.7 0.9; quantile 0.8 at position 0.8 * 6 = 4.8: 0.5 + 0.8 * 0.2 = 0.66
        (0.2, 0.66, [[0, 0, 1, 0], [1, 0, 0, 0]]),
        (1.0, 0.1, [[1, 1, 1, 1], [1, 1, 1, 0]]),  # quantile 0 = min: every valid token
        (0.0, 0.9, [[0, 0, 1, 0], [0, 0, 0, 0]]),  # quantile 1 = max: only the highest
    ],
)
def test_top_entropy_mask_closed_form(rho, threshold, kept):
    keep, m = top_entropy_mask(ENTROPY, ENTROPY_MASK, rho)
    torch.testing.assert_close(keep, _t(kept))
    assert m["entropy_mask/threshold"].item() == pytest.approx(threshold)
    assert m["entropy_mask/kept_fraction"].item() == pytest.approx(sum(map(sum, kept)) / 7)


def test_top_entropy_mask_matches_trl_and_trains_only_selected_tokens():
    """TRL get_high_entropy_mask (one process): threshold = quantile(valid entropies, 1 - rho), keep
    (entropy * mask >= threshold) & mask. Used as weights in dapo, unselected tokens get zero gradient."""
    g = torch.Generator().manual_seed(6)
    entropy = 3 * torch.rand(4, 6, generator=g, dtype=torch.float64)
    _, old, ref, adv, mask = random_inputs(seed=6)
    for rho in (0.2, 0.5):
        thr = torch.quantile(entropy[mask.bool()], 1 - rho)
        trl = ((entropy * mask >= thr) & mask.bool()).double()
        torch.testing.assert_close(top_entropy_mask(entropy, mask, rho)[0], trl)
    keep, _ = top_entropy_mask(entropy, mask, 0.2)
    _, grad = _value_and_grad(lambda x: GRPO_LOSSES["dapo"](x, old, None, adv, mask, weights=keep)[0], old.clone())
    assert (grad[keep == 0] == 0).all() and (grad[keep == 1] != 0).all()
    with pytest.raises(ValueError, match="rho"):
        top_entropy_mask(entropy, mask, 1.5)
