"""Schedules, adaptive-step decisions and settings validation of grn_core.sampler against hand-computed values."""

import math

import pytest

from grn_core.sampler import (AdaptiveSteps, C2ISettings, SamplerSettings, bit_keep_fraction, c2i_keep_fraction,
                              decide_remaining_steps, layout_cap, shift_progress)
from grn_core.sampler.schedule import adaptive_temperature_factor, bit_progress

SQRT2_HALF = 0.7071067811865476


def test_layout_caps():
    assert layout_cap("joint") == 0.95
    assert layout_cap("prefix") == 0.999
    with pytest.raises(ValueError, match="layout"):
        layout_cap("interleaved")


def test_joint_cap_values():
    # Tmax = 3: progress after step 0 is 1/2 -> 0.95 (1 - cos(pi/4)); after steps 1 and 2 it is 1 -> 0.95
    assert bit_keep_fraction(0, 3, 0.95) == pytest.approx(0.95 * (1 - SQRT2_HALF), abs=1e-15)
    assert bit_keep_fraction(0, 3, 0.95) == pytest.approx(0.27824855787, abs=1e-10)
    assert bit_keep_fraction(1, 3, 0.95) == pytest.approx(0.95, abs=1e-15)
    assert bit_keep_fraction(2, 3, 0.95) == pytest.approx(0.95, abs=1e-15)
    # Tmax = 50: r_1 = 0.95 (1 - cos(pi/98))
    assert bit_keep_fraction(0, 50, 0.95) == pytest.approx(0.000488095, abs=1e-9)


def test_prefix_cap_values():
    assert bit_keep_fraction(0, 3, layout_cap("prefix")) == pytest.approx(0.29260032559, abs=1e-10)
    assert bit_keep_fraction(1, 3, layout_cap("prefix")) == pytest.approx(0.999, abs=1e-15)


def test_shift_values():
    # a = 3, p = 1/2: noise 1/2 -> 3*(1/2)/(1+2*(1/2)) = 3/4, p' = 1/4 -> 0.95 (1 - cos(pi/8))
    assert shift_progress(0.5, 3.0) == pytest.approx(0.25, abs=1e-15)
    assert bit_keep_fraction(0, 3, 0.95, shift=3.0) == pytest.approx(0.07231444412, abs=1e-10)
    # a = 3, p = 1/3 (Tmax 4, step 0): noise 2/3 -> 6/7, p' = 1/7 -> 0.95 (1 - cos(pi/14))
    assert shift_progress(1 / 3, 3.0) == pytest.approx(1 / 7, abs=1e-15)
    assert bit_keep_fraction(0, 4, 0.95, shift=3.0) == pytest.approx(0.02381848343, abs=1e-10)
    assert shift_progress(0.3, 1.0) == pytest.approx(0.3, abs=1e-15)  # a = 1 is the identity


def test_single_step_schedule_is_full():
    assert bit_progress(0, 1) == 1.0


def test_bit_adaptive_reparameterisation():
    # D = Tmax - W reproduces the fixed schedule exactly
    for i in range(50):
        assert bit_progress(i, 50, warmup=5, remaining=45) == pytest.approx(bit_progress(i, 50), abs=1e-12)
    # D = 10: linear from p_W = 5/49 to 1 over D-1 = 9 steps, the last step at the cap
    assert bit_progress(5, 50, warmup=5, remaining=10) == pytest.approx(89 / 441, abs=1e-12)
    assert bit_progress(12, 50, warmup=5, remaining=10) == pytest.approx(5 / 49 + 44 / 49 * 8 / 9, abs=1e-12)
    assert bit_progress(13, 50, warmup=5, remaining=10) == 1.0
    assert bit_progress(14, 50, warmup=5, remaining=10) == 1.0
    assert bit_progress(4, 50, warmup=5, remaining=10) == pytest.approx(5 / 49, abs=1e-12)  # still warm-up


def test_c2i_schedules():
    assert [c2i_keep_fraction(i, 4) for i in range(4)] == [0.25, 0.5, 0.75, 1.0]
    # official complexity-aware continuation: W/T + (1 - W/T) (i+1-W) / D
    assert c2i_keep_fraction(5, 50, warmup=5, remaining=20) == pytest.approx(0.1 + 0.9 / 20, abs=1e-12)
    assert c2i_keep_fraction(24, 50, warmup=5, remaining=20) == pytest.approx(1.0, abs=1e-12)
    assert c2i_keep_fraction(3, 50, warmup=5, remaining=20) == pytest.approx(4 / 50, abs=1e-12)
    for i in range(50):  # D = T - W is the linear schedule
        assert c2i_keep_fraction(i, 50, 5, 45) == pytest.approx(c2i_keep_fraction(i, 50), abs=1e-12)


def test_decide_remaining_steps_official_c2i_numbers():
    # D = round(clip(700 H - 620, 20 - 5, 50 - 5))
    assert decide_remaining_steps(0.90, 700, -620, 5, 20, 50) == 15   # 10 -> clipped to 15
    assert decide_remaining_steps(0.93, 700, -620, 5, 20, 50) == 31   # 651 - 620
    assert decide_remaining_steps(0.99, 700, -620, 5, 20, 50) == 45   # 73 -> clipped to 45
    assert decide_remaining_steps(0.0, 1, 20.5, 5, 20, 50) == 20      # half to even, as torch.round
    assert decide_remaining_steps(0.0, 1, 21.5, 5, 20, 50) == 22


def test_adaptive_temperature_factor():
    assert adaptive_temperature_factor(10) == 0.5
    assert adaptive_temperature_factor(20) == 0.75
    assert adaptive_temperature_factor(45) == 1.0
    assert adaptive_temperature_factor(2) == 0.5


@pytest.mark.parametrize("bad, match", [
    (dict(steps=0), "steps"), (dict(guidance=-0.5), "guidance"), (dict(temperature=0.0), "temperature"),
    (dict(temperature=float("nan")), "temperature"), (dict(shift=0.0), "shift"), (dict(cfg_interval=1.5), "cfg_interval"),
    (dict(kernel="cuda"), "kernel"), (dict(cap=0.0), "cap"),
    (dict(adaptive=AdaptiveSteps(warmup=5, k=1, b=0, min_steps=5)), "warmup"),
    (dict(steps=10, adaptive=AdaptiveSteps(warmup=2, k=1, b=0, min_steps=20)), "min_steps"),
])
def test_settings_reject_bad_values(bad, match):
    with pytest.raises(ValueError, match=match):
        SamplerSettings(**bad).validate()


def test_c2i_settings_validation_and_defaults():
    s = C2ISettings().validate()
    assert (s.steps, s.guidance, s.temperature, s.interval) == (50, 2.35, 1.31, (0.44, 1.0))
    official = C2ISettings.official_adaptive().adaptive
    assert (official.warmup, official.k, official.b, official.min_steps) == (5, 700.0, -620.0, 20)
    with pytest.raises(ValueError, match="interval"):
        C2ISettings(interval=(0.5, 0.2)).validate()
    with pytest.raises(ValueError, match="steps"):
        C2ISettings(steps=0).validate()


def test_task_defaults():
    t2i = SamplerSettings.for_task("t2i")
    assert (t2i.steps, t2i.guidance, t2i.temperature, t2i.adaptive) == (50, 3.0, 1.1, None)
    t2v = SamplerSettings.for_task("t2v", adaptive=True)
    assert t2v.adaptive is not None and not t2v.adaptive.calibrated
    assert math.isclose(SamplerSettings.for_task("i2v", guidance=4.0).guidance, 4.0)
    with pytest.raises(ValueError, match="task"):
        SamplerSettings.for_task("t2x")


def test_settings_round_trip_through_dicts():
    s = SamplerSettings.for_task("t2v", adaptive=True, shift=2.0)
    assert SamplerSettings.from_dict(s.to_dict()) == s
    c = C2ISettings.official_adaptive(steps=40)
    again = C2ISettings(**{**c.to_dict(), "interval": [0.1, 0.9]})
    assert again.adaptive == c.adaptive and again.interval == (0.1, 0.9)
