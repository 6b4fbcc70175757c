"""Rollout correction (truncated / masked importance weights, token and sequence level) and off-policy sequence
masking: hand-derived closed forms, and the formulas of TRL ``trl/trainer/grpo_trainer.py``
(``vllm_importance_sampling_mode``, ``get_off_policy_mask``) and verl ``verl/trainer/ppo/rollout_corr_helper.py``
(``compute_rollout_correction_weights``) written out independently."""

import math

import pytest
import torch

from lit_rlhf.losses import (
    GRPO_LOSSES,
    ROLLOUT_CORRECTIONS,
    logp_diff_metrics,
    masked_is_weights,
    off_policy_sequence_mask,
    truncated_is_weights,
)


def _t(x):
    return torch.tensor(x, dtype=torch.float64)


# Token ratios rho = exp(old - sample): (0.4, 1, 3 | 1.5, 2.5, pad). The padded position holds junk (log ratio 5).
RATIOS = [[0.4, 1.0, 3.0], [1.5, 2.5, math.exp(5.0)]]
MASK = _t([[1, 1, 1], [1, 1, 0]])
SAMPLE = _t([[-1.0, -2.0, -0.5], [-1.5, -0.7, -3.0]])
OLD = SAMPLE + torch.log(_t(RATIOS))


def _metric(m, name):
    return m[f"rollout_correction/{name}"].item()


def test_tis_token_level():
    """TIS, high = 2: w = min(rho, 2) = (0.4, 1, 2 | 1.5, 2, 0 pad); 2 of 5 tokens truncated (3 and 2.5);
    min 0.4, mean 6.9 / 5 = 1.38, max 2. With low = 0.5 the 0.4 is raised to 0.5 too: 3 of 5 truncated."""
    w, m = truncated_is_weights(OLD, SAMPLE, MASK, high=2.0)
    torch.testing.assert_close(w, _t([[0.4, 1.0, 2.0], [1.5, 2.0, 0.0]]))
    assert (_metric(m, "weight_min"), _metric(m, "weight_max")) == (pytest.approx(0.4), pytest.approx(2.0))
    assert _metric(m, "weight_mean") == pytest.approx(1.38)
    assert _metric(m, "truncated_fraction") == pytest.approx(0.4) and _metric(m, "masked_fraction") == 0
    w, m = truncated_is_weights(OLD, SAMPLE, MASK, low=0.5, high=2.0)
    torch.testing.assert_close(w, _t([[0.5, 1.0, 2.0], [1.5, 2.0, 0.0]]))
    assert _metric(m, "truncated_fraction") == pytest.approx(0.6)


def test_mis_token_level():
    """MIS, [0.5, 2]: rho kept inside, 0 outside: (0, 1, 0 | 1.5, 0, 0 pad); masked 3 of 5; min 0, mean 0.5, max
    1.5."""
    w, m = masked_is_weights(OLD, SAMPLE, MASK, low=0.5, high=2.0)
    torch.testing.assert_close(w, _t([[0.0, 1.0, 0.0], [1.5, 0.0, 0.0]]))
    assert _metric(m, "masked_fraction") == pytest.approx(0.6) and _metric(m, "truncated_fraction") == 0
    assert [_metric(m, k) for k in ("weight_min", "weight_mean", "weight_max")] == pytest.approx([0.0, 0.5, 1.5])


def test_sequence_level_product_of_token_ratios():
    """Sequence rho = prod_t rho_t over valid tokens: 0.4 * 1 * 3 = 1.2 and 1.5 * 2.5 = 3.75 (the junk padded ratio
    e^5 does not enter). TIS (high 2): (1.2, 2) on every token of the row, 1 of 2 completions truncated, mean over
    completions 1.6. MIS [0.5, 2]: row 0 keeps 1.2, row 1 is dropped: masked 1/2."""
    w, m = truncated_is_weights(OLD, SAMPLE, MASK, level="sequence", high=2.0)
    torch.testing.assert_close(w, _t([[1.2, 1.2, 1.2], [2.0, 2.0, 0.0]]))
    assert _metric(m, "truncated_fraction") == pytest.approx(0.5) and _metric(m, "weight_mean") == pytest.approx(1.6)
    w, m = masked_is_weights(OLD, SAMPLE, MASK, level="sequence", low=0.5, high=2.0)
    torch.testing.assert_close(w, _t([[1.2, 1.2, 1.2], [0.0, 0.0, 0.0]]))
    assert _metric(m, "masked_fraction") == pytest.approx(0.5)


def test_extreme_log_ratios_stay_finite():
    """A sequence log-ratio of 100 (rho = e^100): TIS caps it at high (exp of the log-ratio clamped at 20), MIS
    drops it (decided on the unclamped log-ratio); -100 is raised to low / dropped. Nothing is inf or nan."""
    old, sample, mask = _t([[50.0, 50.0], [-50.0, -50.0]]), torch.zeros(2, 2, dtype=torch.float64), torch.ones(2, 2)
    w, _ = truncated_is_weights(old, sample, mask, level="sequence", low=0.5, high=3.0)
    torch.testing.assert_close(w, _t([[3.0, 3.0], [0.5, 0.5]]))
    w, m = masked_is_weights(old, sample, mask, level="sequence", low=0.5, high=3.0)
    assert (w == 0).all() and _metric(m, "masked_fraction") == 1.0 and torch.isfinite(w).all()


def test_bounds_and_level_validated():
    with pytest.raises(ValueError, match="low <= 1 <= high"):
        truncated_is_weights(OLD, SAMPLE, MASK, high=0.9)
    with pytest.raises(ValueError, match="low <= 1 <= high"):
        masked_is_weights(OLD, SAMPLE, MASK, low=1.5, high=2.0)
    with pytest.raises(ValueError, match="level"):
        masked_is_weights(OLD, SAMPLE, MASK, level="geometric")
    assert ROLLOUT_CORRECTIONS == {"tis": truncated_is_weights, "mis": masked_is_weights}


def _random(seed=0, B=5, T=7):
    g = torch.Generator().manual_seed(seed)
    sample = -2 * torch.rand(B, T, generator=g, dtype=torch.float64)
    old = sample + 0.5 * torch.randn(B, T, generator=g, dtype=torch.float64)
    lengths = torch.tensor([T, 4, 2, T - 1, 5])[:B]
    mask = (torch.arange(T)[None, :] < lengths[:, None]).double()
    return old, sample, mask


def trl_importance_ratio(old, sample, mask, mode, clip_min, clip_max):
    """TRL vllm_importance_sampling_mode: diff = (old - sample) * mask, summed per row for sequence_* modes;
    ratio = exp(diff); *_truncate clamps to [clip_min, clip_max], *_mask zeroes ratios outside (None = unbounded)."""
    diff = (old - sample) * mask
    if mode.startswith("sequence"):
        diff = diff.sum(-1, keepdim=True)
    ratio = torch.exp(diff)
    if mode.endswith("truncate"):
        return torch.clamp(ratio, min=clip_min, max=clip_max)
    lo = -math.inf if clip_min is None else clip_min
    hi = math.inf if clip_max is None else clip_max
    return ratio.masked_fill((ratio < lo) | (ratio > hi), 0.0)


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_weights_match_trl_and_verl(level):
    """On random ratios: TIS (high 3) = TRL {level}_truncate with clip_max 3; TIS (low 0.5, high 3) = TRL with
    clip_min 0.5; MIS [0.5, 3] = TRL {level}_mask; TIS (high 2) = verl compute_rollout_correction_weights
    (rollout_is=level, threshold 2: exp of the log-ratio clamped to +-20, times the mask, clamped above at 2)."""
    old, sample, mask = _random()
    for correction, mode, low, high in [
        ("tis", "truncate", 0.0, 3.0),
        ("tis", "truncate", 0.5, 3.0),
        ("mis", "mask", 0.5, 3.0),
    ]:
        ours, _ = ROLLOUT_CORRECTIONS[correction](old, sample, mask, level=level, low=low, high=high)
        trl = trl_importance_ratio(old, sample, mask, f"{level}_{mode}", low or None, high)
        torch.testing.assert_close(ours, trl.expand_as(mask) * mask)
    log_ratio = (old - sample) * mask
    if level == "sequence":
        log_ratio = log_ratio.sum(-1, keepdim=True)
    verl = (torch.exp(log_ratio.clamp(-20, 20)) * mask).clamp(max=2.0)
    torch.testing.assert_close(truncated_is_weights(old, sample, mask, level=level, high=2.0)[0], verl)


def test_weights_enter_the_loss_like_trl():
    """TRL multiplies the per-token GRPO loss by the importance ratio before the per-sequence mean and adds beta k3
    after: grpo_loss(weights = token TIS weights) equals that, value and gradient (the weights carry none)."""
    old, sample, mask = _random(seed=1)
    g = torch.Generator().manual_seed(11)
    adv = torch.randn(old.shape[0], generator=g, dtype=torch.float64)
    logps = old + 0.3 * torch.randn(old.shape, generator=g, dtype=torch.float64)
    ref = old - 0.2
    w, _ = truncated_is_weights(old, sample, mask, high=2.0)
    ratio = trl_importance_ratio(old, sample, mask, "token_truncate", None, 2.0)

    def trl(x):
        r = torch.exp(x - old)
        pg = -torch.min(r * adv[:, None], torch.clamp(r, 0.8, 1.2) * adv[:, None]) * ratio
        kl = torch.exp(ref - x) - (ref - x) - 1
        return (((pg + 0.05 * kl) * mask).sum(-1) / mask.sum(-1)).mean()

    def ours(x):
        return GRPO_LOSSES["grpo"](x, old, ref, adv, mask, beta=0.05, weights=w)[0]

    x1, x2 = logps.clone().requires_grad_(), logps.clone().requires_grad_()
    a, b = ours(x1), trl(x2)
    a.backward(), b.backward()
    torch.testing.assert_close((a, x1.grad), (b, x2.grad))


def test_logp_diff_metrics():
    """|old - sample| = |ln rho| on the 5 valid tokens: mean (|ln 0.4| + 0 + ln 3 + ln 1.5 + ln 2.5) / 5, max
    ln 3 = 1.0986 (the padded e^5, log-ratio 5, is ignored)."""
    m = logp_diff_metrics(OLD, SAMPLE, MASK)
    diffs = [abs(math.log(r)) for r in (0.4, 1.0, 3.0, 1.5, 2.5)]
    assert m["rollout/logp_diff/mean"].item() == pytest.approx(sum(diffs) / 5)
    assert m["rollout/logp_diff/max"].item() == pytest.approx(max(diffs))


# ---------------------------------------------------------------- off-policy sequence mask


def test_off_policy_sequence_mask_closed_form():
    """delta = 0.5; mean over valid tokens of sample - logp: row 0 (0.4, 0.8 | pad 9) = 0.6 with A < 0 -> dropped;
    row 1 the same drift with A > 0 -> kept; row 2 mean 0.2 with A < 0 -> kept (under delta); row 3 A = 0 counts
    as non-negative -> kept. Masked: 2 of 8 valid tokens."""
    logps = torch.zeros(4, 3, dtype=torch.float64)
    sample = _t([[0.4, 0.8, 9.0], [0.4, 0.8, 9.0], [0.1, 0.3, 0.2], [2.0, 2.0, 2.0]])
    mask = _t([[1, 1, 0], [1, 1, 0], [1, 1, 1], [1, 0, 0]])
    keep, m = off_policy_sequence_mask(_t([-1.0, 1.0, -1.0, 0.0]), logps, sample, mask, threshold=0.5)
    torch.testing.assert_close(keep, _t([[0, 0, 0], [1, 1, 0], [1, 1, 1], [1, 0, 0]]))
    assert m["off_policy_mask/masked_fraction"].item() == pytest.approx(2 / 8)
    assert m["off_policy_mask/seq_kl_max"].item() == pytest.approx(2.0)


def test_off_policy_sequence_mask_matches_trl_and_per_token_advantages():
    """TRL get_off_policy_mask: kl = sample - logp (detached), per-row masked mean, keep (A >= 0) | (kl <= delta).
    Per-token advantages constant on a row give the same mask as per-sequence ones."""
    old, sample, mask = _random(seed=2)
    g = torch.Generator().manual_seed(12)
    adv = torch.randn(old.shape[0], generator=g, dtype=torch.float64)
    logps = old.clone().requires_grad_()
    kl = ((sample - logps.detach()) * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1.0)
    for delta in (-0.1, 0.0, 0.2):
        trl = ((adv[:, None] >= 0) | (kl <= delta)).double()
        keep, _ = off_policy_sequence_mask(adv, logps, sample, mask, delta)
        torch.testing.assert_close(keep, trl * mask)
        per_token, _ = off_policy_sequence_mask(adv[:, None].expand_as(mask), logps, sample, mask, delta)
        torch.testing.assert_close(per_token, keep)
    assert not keep.requires_grad


def test_the_grpo_objective_applies_rollout_correction_weights():
    """``rollout_correction`` multiplies each token's policy term by the pure function's weights (old = logps, so
    ratio 1 and the GRPO term is A w_t: -1/N sum_i mean_t A_i w_it); none, or no sampler logps, leaves the loss."""
    from lit_rlhf.objectives import GRPOObjective, ObjectiveSettings, RolloutCorrection
    from lit_rlhf.types import Rollout

    mask = MASK.long()
    rollout = Rollout(torch.ones(2, 1, dtype=torch.long), torch.ones(2, 1, dtype=torch.long), torch.ones(2, 3).long(),
                      mask, torch.tensor([0, 1]), torch.zeros(2, dtype=torch.bool), SAMPLE)  # fmt: skip
    adv = _t([1.0, -2.0])
    tis = ObjectiveSettings(group_size=2, rollout_correction={"mode": "tis", "high": 2.0})  # a mapping, as from YAML
    assert tis.rollout_correction == RolloutCorrection("tis", "token", None, 2.0)
    loss, metrics = GRPOObjective(tis).loss(OLD, None, OLD, None, adv, rollout)
    w = _t([[0.4, 1.0, 2.0], [1.5, 2.0, 0.0]])  # test_tis_token_level
    expected = -((1.0 * w[0].sum() / 3) + (-2.0 * w[1].sum() / 2)) / 2
    assert loss.item() == pytest.approx(expected.item())
    assert _metric(metrics, "weight_max") == pytest.approx(2.0)
    plain, _ = GRPOObjective(ObjectiveSettings(group_size=2)).loss(OLD, None, OLD, None, adv, rollout)
    assert plain.item() == pytest.approx(-((1.0 * 3 / 3) + (-2.0 * 2 / 2)) / 2)
    rollout.sample_logps = None
    unweighted, none = GRPOObjective(tis).loss(OLD, None, OLD, None, adv, rollout)
    assert unweighted.item() == pytest.approx(plain.item()) and "rollout_correction/weight_max" not in none
    with pytest.raises(ValueError, match="low <= 1 <= high"):
        RolloutCorrection("mis", high=0.5)


def test_the_ppo_policy_loss_applies_rollout_correction_weights():
    """PPO (``objectives.ppo_corrected_loss``): at ratio 1 (logps = old) the clipped surrogate's token term is -A_t, so
    the corrected loss is the token mean -sum_t A_t w_t / 5 over the 5 valid tokens and its gradient -A_t w_t / 5.
    TIS token (high 2), A = (1 | -2): w = (0.4, 1, 2 | 1.5, 2) -> -(3.4 - 2 x 3.5) / 5 = 0.72. Dual clip with MIS
    at the sequence level [0.5, 2]: w = (1.2 x 3 | dropped) -> -3.6 / 5 = -0.72 (row 1's dual cap 6 > 2 does not
    bind). Without correction, or without sampler logps: (-3 + 4) / 5 = 0.2 and no rollout_correction metrics."""
    from lit_rlhf.objectives import ppo_corrected_loss

    adv = _t([[1.0, 1.0, 1.0], [-2.0, -2.0, -2.0]])
    tis = ppo_corrected_loss("ppo", 0.2, 3.0, {"mode": "tis", "high": 2.0})  # a mapping, as from YAML
    logps = OLD.clone().requires_grad_()
    loss, metrics = tis(logps, OLD, adv, MASK, SAMPLE)
    loss.backward()
    w = _t([[0.4, 1.0, 2.0], [1.5, 2.0, 0.0]])  # test_tis_token_level
    assert loss.item() == pytest.approx(0.72)
    torch.testing.assert_close(logps.grad, -adv * w * MASK / 5)
    assert _metric(metrics, "weight_max") == pytest.approx(2.0) and _metric(metrics, "truncated_fraction") == 0.4
    assert "policy/clipfrac" in metrics  # the loss's own metrics are kept
    mis = ppo_corrected_loss("dual_clip", 0.2, 3.0, {"mode": "mis", "level": "sequence", "low": 0.5, "high": 2.0})
    loss, metrics = mis(OLD, OLD, adv, MASK, SAMPLE)
    assert loss.item() == pytest.approx(-0.72) and _metric(metrics, "masked_fraction") == pytest.approx(0.5)
    assert "policy/dual_clipfrac" in metrics
    for fn, sample in ((ppo_corrected_loss("ppo", 0.2, 3.0), SAMPLE), (tis, None)):
        plain, metrics = fn(OLD, OLD, adv, MASK, sample)
        assert plain.item() == pytest.approx(0.2) and not any(k.startswith("rollout_correction/") for k in metrics)


@pytest.mark.slow
def test_a_tiny_ppo_run_logs_rollout_correction(tmp_path):
    """PPO end to end with TIS on the built-in sampler (its logps are the sampler logps): the weights reach the
    policy loss and are logged; sampler and trainer agree (fp32), so every weight is ~1 and none is truncated."""
    import json
    import os

    from lit_rlhf.experiments.ppo import main
    from tests.test_report import undocumented

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    args = ["--config", os.path.join(root, "experiments", "ppo", "tiny.yaml"), "--output_dir", str(tmp_path),
            "--export=false", "--trainer.max_steps=1", "--validate_before_fit=false",
            '--model.rollout_correction={"mode": "tis", "low": 0.5, "high": 1.5}']  # fmt: skip
    main(args=args)
    summary = json.loads((tmp_path / "final_metrics.json").read_text())
    metrics = summary["train_last"]
    assert summary["global_step"] == 1
    for name in ("weight_min", "weight_mean", "weight_max"):
        assert metrics[f"train/rollout_correction/{name}"] == pytest.approx(1.0, abs=1e-3), name
    assert metrics["train/rollout_correction/truncated_fraction"] == 0.0
    assert undocumented(set(metrics) | set(summary["end"])) == []
