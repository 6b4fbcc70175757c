"""KL controllers: the adaptive update rule of Ziegler et al. (2019) in closed form, and state round-trips."""

import math

import pytest

from lit_rlhf.kl_control import (
    AdaptiveKLController,
    FixedKLController,
    KLSettings,
    adaptive_kl_coef,
    build_kl_controller,
)


def test_adaptive_update_closed_form():
    """beta' = beta (1 + clip(KL / target - 1, -0.2, 0.2) n / horizon).

    KL = 7.2, target 6: error = 7.2 / 6 - 1 = 0.2 (at the clip edge); n = 100, horizon = 1000 ->
    beta' = 0.1 * (1 + 0.2 * 0.1) = 0.102. KL = 5.4: error = -0.1 -> beta' = 0.1 * (1 - 0.01) = 0.099.
    """
    assert adaptive_kl_coef(0.1, 7.2, 100, 6.0, 1000) == pytest.approx(0.102)
    assert adaptive_kl_coef(0.1, 5.4, 100, 6.0, 1000) == pytest.approx(0.099)
    assert adaptive_kl_coef(0.1, 6.0, 100, 6.0, 1000) == pytest.approx(0.1), "on target: unchanged"


def test_adaptive_error_is_clipped():
    """KL far above target (60 -> error 9) moves beta as much as error 0.2; KL = 0 as much as error -0.2."""
    assert adaptive_kl_coef(0.1, 60.0, 100, 6.0, 1000) == pytest.approx(0.1 * 1.02)
    assert adaptive_kl_coef(0.1, 0.0, 100, 6.0, 1000) == pytest.approx(0.1 * 0.98)


def test_adaptive_controller_tracks_target_over_steps():
    """Repeated updates above target grow beta geometrically: (1.02)^k; below target shrink it."""
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=1000)
    for _ in range(10):
        ctl.update(100.0, 100)
    assert ctl.value == pytest.approx(0.1 * 1.02**10)
    for _ in range(10):
        ctl.update(0.0, 100)
    assert ctl.value == pytest.approx(0.1 * 1.02**10 * 0.98**10)


def test_fixed_controller_never_moves_and_builder_picks_kind():
    ctl = build_kl_controller(KLSettings(coef=0.05, target=None))
    assert isinstance(ctl, FixedKLController) and not isinstance(ctl, AdaptiveKLController)
    assert ctl.update(100.0, 64) == 0.05
    adaptive = build_kl_controller(KLSettings(coef=0.05, target=3.0, horizon=500))
    assert isinstance(adaptive, AdaptiveKLController)
    assert adaptive.target == 3.0 and adaptive.horizon == 500


def test_state_round_trip():
    ctl = AdaptiveKLController(0.2, 6.0, 100)
    ctl.update(12.0, 10)
    fresh = AdaptiveKLController(0.2, 6.0, 100)
    fresh.load_state_dict(ctl.state_dict())
    assert fresh.value == ctl.value != 0.2


@pytest.mark.parametrize("target,horizon", [(0.0, 100), (-1.0, 100), (6.0, 0)])
def test_bad_settings_raise(target, horizon):
    with pytest.raises(ValueError):
        AdaptiveKLController(0.1, target, horizon)
    with pytest.raises(ValueError):
        adaptive_kl_coef(0.1, 1.0, 1, target, horizon)


def test_negative_coef_rejected():
    with pytest.raises(ValueError, match=">= 0"):
        build_kl_controller(KLSettings(coef=-0.1))
    assert math.isfinite(build_kl_controller(KLSettings(coef=0.0)).value)
