"""Behaviour of grn_core.request: sizes and frames, negative prompts, adaptive-step rules, settings, the first frame.

Expected values are computed here independently of the library (the official formulas written out again, PIL for the
first-frame reference), on a small stand-in model object: no weights are loaded.

Official references (bytedance/GRN): tools/grn_pipeline.py:208 (commit a2e1dcf2)
``num_frames = min(self.args.video_frames, int(duration * self.args.video_fps + 1))`` with video_frames 81 (:92) and
video_fps 16 (:119), latent frames ``(num_frames - 1) // 4 + 1`` (:210); grn/utils_t2iv/infer.py:139-153
(commit 3fdaec47) ``transform``: cover-resize with LANCZOS (:141-147), centre crop with floored offsets (:150-152),
``to_tensor(...) * 2 - 1`` (:152-153).
"""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from grn_core.presets import ADAPTIVE_RULES, OFFICIAL_NEGATIVE_PROMPT
from grn_core.refiner.buckets import pixel_size
from grn_core.request import (MAX_LATENT_CELLS, SizePlan, frames_for_duration, model_rule, negative_prompt,
                              plan_size, prepare_first_frame, resolve_settings, snap_frames)
from grn_core.sampler import AdaptiveSteps, C2ISettings, SamplerSettings

OFFICIAL_FPS = 16  # tools/grn_pipeline.py:119 self.video_fps = 16
OFFICIAL_MAX_FRAMES = 81  # tools/grn_pipeline.py:92 self.video_frames = 81


def stand_in(defaults=None, adaptive=None):
    """The attributes of a loaded model that request resolution reads."""
    model = SimpleNamespace(spatial_factor=16, temporal_factor=4, defaults=dict(defaults or {}))
    if adaptive is not None:
        model.adaptive = adaptive
    return model


def official_frames(duration: float) -> int:
    """grn_pipeline.py:208 then the causal tokenizer's floor to 1 + 4k (:210)."""
    frames = min(OFFICIAL_MAX_FRAMES, int(duration * OFFICIAL_FPS + 1))
    return 1 + 4 * ((frames - 1) // 4)


# --- frames ---------------------------------------------------------------------------------------------------------


def test_frames_for_duration_sweep():
    """0.0 .. 5.9 s in 0.1 s steps: the official count floored to 1 + 4k, capped at 81."""
    seen = []
    for tenth in range(60):
        duration = tenth / 10
        expected = official_frames(duration)
        got = frames_for_duration(duration)
        assert got == expected, duration
        assert (got - 1) % 4 == 0 and 1 <= got <= 81
        seen.append(got)
    assert seen == sorted(seen)  # never decreases with the duration
    assert seen[-1] == 81 and seen[0] == 1


@pytest.mark.parametrize("duration, frames", [(0.0, 1), (0.2, 1), (0.25, 5), (0.3, 5), (1.0, 17), (2.0, 33),
                                              (2.1, 33), (3.0, 49), (4.9, 77), (5.0, 81), (5.9, 81), (60.0, 81)])
def test_frames_for_duration_by_hand(duration, frames):
    """Hand-worked points: 0.2 s -> int(4.2) = 4 -> 1; 2 s -> 33; 2.1 s -> int(34.6) = 34 -> 33; >= 5 s -> 81."""
    assert frames_for_duration(duration) == frames


@pytest.mark.parametrize("duration", [-0.1, float("nan"), float("inf")])
def test_frames_for_duration_refuses(duration):
    with pytest.raises(ValueError):
        frames_for_duration(duration)


@pytest.mark.parametrize("frames, expected", [(-3, 1), (0, 1), (1, 1), (2, 1), (4, 1), (5, 5), (8, 5), (9, 9),
                                              (32, 29), (33, 33), (81, 81), (84, 81), (85, 85)])
def test_snap_frames(frames, expected):
    """The largest 1 + 4k not above the count, at least 1."""
    assert snap_frames(frames) == expected


def test_snap_frames_other_factor():
    assert [snap_frames(f, 2) for f in (1, 2, 3, 4, 5, 6)] == [1, 1, 3, 3, 5, 5]
    assert snap_frames(17, 8) == 17 and snap_frames(16, 8) == 9


# --- sizes --------------------------------------------------------------------------------------------------------------


def test_plan_size_defaults_are_the_presets():
    model = stand_in()
    assert plan_size(model, "t2i") == SizePlan(1024, 1024, 1, False, "1024x1024")
    plan = plan_size(model, "t2v")
    assert (plan.width, plan.height, plan.frames, plan.snapped) == (848, 480, 33, False)
    assert plan.label == "848x480, 33 frames"
    c2i = plan_size(model, "c2i")
    assert (c2i.width, c2i.height, c2i.frames) == (256, 256, 1)


def test_plan_size_model_defaults_win_over_presets():
    model = stand_in(defaults={"width": 320, "height": 192, "frames": 9})
    plan = plan_size(model, "t2v")
    assert (plan.width, plan.height, plan.frames, plan.snapped) == (320, 192, 9, False)
    assert plan_size(model, "t2i").frames == 1  # an image whatever the file says about frames


@pytest.mark.parametrize("width, height, out_w, out_h", [(850, 470, 848, 464), (840, 488, 832, 480),
                                                         (1000, 1000, 992, 992), (17, 9, 16, 16),
                                                         (24, 40, 32, 32), (8, 8, 16, 16)])
def test_plan_size_snaps_to_multiples(width, height, out_w, out_h):
    """Each side goes to the nearest multiple of 16 (Python's round: half to even, so 840 -> 832 and 488 -> 480),
    at least 16, and a note says so."""
    expected_w = max(16, 16 * round(width / 16))
    expected_h = max(16, 16 * round(height / 16))
    assert (expected_w, expected_h) == (out_w, out_h)
    plan = plan_size(stand_in(), "t2i", width=width, height=height)
    assert (plan.width, plan.height, plan.frames) == (out_w, out_h, 1)
    assert plan.width % 16 == 0 and plan.height % 16 == 0
    assert plan.snapped is True
    assert f"{out_w}x{out_h}" in plan.note and f"{width}x{height}" in plan.note


def test_plan_size_exact_size_has_no_change_note():
    plan = plan_size(stand_in(), "t2v", width=640, height=368, frames=21)
    assert (plan.width, plan.height, plan.frames, plan.snapped) == (640, 368, 21, False)
    assert plan.note == "640x368, 21 frames"


def test_plan_size_frames_floor_and_note():
    plan = plan_size(stand_in(), "t2v", width=848, height=480, frames=30)
    assert plan.frames == 29 and plan.snapped is True
    assert "29 frames" in plan.note and "30 frames" in plan.note


def test_plan_size_duration_replaces_frames():
    for tenth in (0, 3, 10, 20, 47, 59):
        duration = tenth / 10
        plan = plan_size(stand_in(), "t2v", frames=9, duration=duration)
        # duration 0 keeps the asked frames; otherwise the official count
        assert plan.frames == (9 if duration == 0 else official_frames(duration))


def test_plan_size_t2i_and_c2i_make_one_frame():
    for task in ("t2i", "c2i"):
        assert plan_size(stand_in(), task, frames=33).frames == 1
        assert plan_size(stand_in(), task, duration=2.0).frames == 1


def test_plan_size_i2v_at_least_five_frames():
    for frames in (1, 2, 4):
        plan = plan_size(stand_in(), "i2v", frames=frames)
        assert plan.frames == 5 and plan.snapped is True
    assert plan_size(stand_in(), "i2v", frames=9).frames == 9
    assert plan_size(stand_in(), "t2v", frames=1).frames == 1  # text-to-video may make a single frame


@pytest.mark.parametrize("bucket, h_over_w", [("0.41M", 9 / 16), ("0.41M", 16 / 9), ("1M", 1.0), ("1M", 2.0),
                                              ("0.25M", 3 / 4), ("2M", 1.0), ("0.06M", 1 / 3)])
def test_plan_size_bucket_with_aspect(bucket, h_over_w):
    """A bucket + aspect gives the bucket's trained size (pixel_size), whatever width/height were."""
    height, width = pixel_size(bucket, h_over_w)
    plan = plan_size(stand_in(), "t2v", width=100, height=100, resolution=bucket, h_over_w=h_over_w)
    assert (plan.width, plan.height) == (width, height)
    assert plan.frames == 33


def test_plan_size_bucket_hand_values():
    """0.41M at 9/16 -> 848x480; 1M at 2:1 -> latent 91x45 -> 720x1456 (spec §4's example)."""
    plan = plan_size(stand_in(), "t2i", resolution="0.41M", h_over_w=9 / 16)
    assert (plan.width, plan.height) == (848, 480)
    plan = plan_size(stand_in(), "t2i", resolution="1M", h_over_w=2.0)
    assert (plan.width, plan.height) == (45 * 16, 91 * 16)


def test_plan_size_bucket_aspect_from_width_height():
    """Without h_over_w the aspect is height / width: 720x1280 in 0.41M is the 9:16 template, 848x480."""
    plan = plan_size(stand_in(), "t2v", width=1280, height=720, resolution="0.41M")
    assert (plan.width, plan.height) == (848, 480)
    custom = plan_size(stand_in(), "t2v", width=1280, height=720, resolution="custom")
    assert (custom.width, custom.height) == (1280, 720)


def test_plan_size_aspect_without_bucket_sets_height():
    plan = plan_size(stand_in(), "t2i", width=512, h_over_w=0.5)
    assert (plan.width, plan.height) == (512, 256)


def test_plan_size_unknown_bucket():
    with pytest.raises(ValueError):
        plan_size(stand_in(), "t2i", resolution="3M")


def test_plan_size_too_large():
    """Beyond the 2M bucket's 90x90 latent cells is refused; exactly 90x90 (1440x1440) is allowed."""
    assert MAX_LATENT_CELLS == 90 * 90
    ok = plan_size(stand_in(), "t2i", width=1440, height=1440)
    assert (ok.width, ok.height) == (1440, 1440)
    for width, height in ((2048, 2048), (1456, 1440), (4096, 64 * 16 + 16)):
        with pytest.raises(ValueError):
            plan_size(stand_in(), "t2i", width=width, height=height)
    with pytest.raises(ValueError):
        plan_size(stand_in(), "t2i", width=64, height=64, max_latent_cells=15)


@pytest.mark.parametrize("field, value", [("width", 0), ("height", 0), ("frames", 0), ("width", -16),
                                          ("height", -1.5), ("frames", -4), ("width", float("nan")),
                                          ("height", float("nan")), ("frames", float("nan")), ("width", float("inf")),
                                          ("width", True), ("height", "480")])
def test_plan_size_refuses_bad_sizes(field, value):
    with pytest.raises(ValueError):
        plan_size(stand_in(), "t2v", **{field: value})


# --- negative prompt ----------------------------------------------------------------------------------------------------


def test_negative_prompt_precedence():
    told = stand_in(defaults={"negative": "blurry"})
    plain = stand_in()
    # explicit wins, even the empty string
    assert negative_prompt(told, "t2v", "") == ""
    assert negative_prompt(told, "t2v", "low quality") == "low quality"
    # then the model's own default
    assert negative_prompt(told, "t2v") == "blurry"
    assert negative_prompt(told, "t2i") == "blurry"
    # then the task's preset: the demos' list for video, empty for images
    assert negative_prompt(plain, "t2v") == OFFICIAL_NEGATIVE_PROMPT
    assert negative_prompt(plain, "i2v") == OFFICIAL_NEGATIVE_PROMPT
    assert negative_prompt(plain, "t2i") == ""
    assert negative_prompt(stand_in(defaults={"negative": ""}), "t2v") == ""
    assert negative_prompt(SimpleNamespace(), "t2v") == OFFICIAL_NEGATIVE_PROMPT  # no defaults attribute at all


# --- adaptive-step rules and settings -----------------------------------------------------------------------------------

OWN_RULE = AdaptiveSteps(warmup=4, k=33.0, b=6.0, min_steps=12, calibrated=True)


def test_model_rule_calibrated_own_rule_wins():
    assert model_rule(stand_in(adaptive=OWN_RULE), "t2v") is OWN_RULE


def test_model_rule_uncalibrated_falls_back_to_family():
    draft = AdaptiveSteps(warmup=4, k=33.0, b=6.0, min_steps=12, calibrated=False)
    for task in ("t2i", "t2v", "i2v", "c2i"):
        assert model_rule(stand_in(adaptive=draft), task) == AdaptiveSteps(**ADAPTIVE_RULES[task])
        assert model_rule(stand_in(), task) == AdaptiveSteps(**ADAPTIVE_RULES[task])
    assert model_rule(stand_in(adaptive={"k": 1.0}), "t2v") == AdaptiveSteps(**ADAPTIVE_RULES["t2v"])


@pytest.mark.parametrize("task, guidance, temperature", [("t2i", 3.0, 1.1), ("t2v", 3.0, 1.0), ("i2v", 3.0, 1.0)])
def test_resolve_settings_presets(task, guidance, temperature):
    settings = resolve_settings(stand_in(), task)
    assert type(settings) is SamplerSettings
    assert (settings.steps, settings.guidance, settings.temperature, settings.shift, settings.cfg_interval) == (
        50, guidance, temperature, 1.0, 0.0)
    assert settings.adaptive is None


def test_resolve_settings_overrides():
    settings = resolve_settings(stand_in(), "t2v", steps=30, guidance=4.5, temperature=0.9, shift=2.0,
                                cfg_interval=0.25)
    assert (settings.steps, settings.guidance, settings.temperature, settings.shift, settings.cfg_interval) == (
        30, 4.5, 0.9, 2.0, 0.25)
    # None leaves the preset value; 0-like values are real overrides
    assert resolve_settings(stand_in(), "t2i", guidance=None).guidance == 3.0
    assert resolve_settings(stand_in(), "t2i", cfg_interval=0.0).cfg_interval == 0.0


def test_resolve_settings_validates():
    with pytest.raises(ValueError):
        resolve_settings(stand_in(), "t2v", steps=0)
    with pytest.raises(ValueError):
        resolve_settings(stand_in(), "t2v", cfg_interval=1.5)


def test_resolve_settings_adaptive_uses_model_rule():
    settings = resolve_settings(stand_in(adaptive=OWN_RULE), "t2v", adaptive=True)
    assert settings.adaptive == OWN_RULE
    family = resolve_settings(stand_in(), "t2i", adaptive=True)
    assert family.adaptive == AdaptiveSteps(**ADAPTIVE_RULES["t2i"])
    given = AdaptiveSteps(warmup=2, k=1.0, b=30.0, min_steps=10, calibrated=True)
    assert resolve_settings(stand_in(adaptive=OWN_RULE), "t2v", adaptive=True, rule=given).adaptive == given
    assert resolve_settings(stand_in(adaptive=OWN_RULE), "t2v", adaptive=False).adaptive is None


def test_resolve_settings_kb_overrides_are_uncalibrated():
    settings = resolve_settings(stand_in(adaptive=OWN_RULE), "t2v", adaptive=True, k=50.0, b=-3.0)
    assert settings.adaptive == AdaptiveSteps(warmup=4, k=50.0, b=-3.0, min_steps=12, calibrated=False)
    settings = resolve_settings(stand_in(), "t2v", adaptive=True, warmup=3, min_steps=15)
    assert settings.adaptive == AdaptiveSteps(warmup=3, k=90.0, b=0.0, min_steps=15, calibrated=False)
    c2i = resolve_settings(stand_in(), "c2i", adaptive=True, b=-600.0)
    assert c2i.adaptive == AdaptiveSteps(warmup=5, k=700.0, b=-600.0, min_steps=20, calibrated=False)


@pytest.mark.parametrize("kwargs", [dict(k=10.0), dict(b=1.0), dict(warmup=2), dict(min_steps=10),
                                    dict(rule=OWN_RULE), dict(adaptive=False, k=10.0)])
def test_resolve_settings_rule_without_adaptive_refused(kwargs):
    with pytest.raises(ValueError):
        resolve_settings(stand_in(), "t2v", **kwargs)


def test_resolve_settings_c2i():
    settings = resolve_settings(stand_in(), "c2i")
    assert type(settings) is C2ISettings
    assert (settings.steps, settings.guidance, settings.temperature, settings.interval) == (50, 2.35, 1.31,
                                                                                           (0.44, 1.0))
    assert settings.adaptive is None
    adaptive = resolve_settings(stand_in(), "c2i", adaptive=True, guidance=2.0)
    assert adaptive.adaptive == AdaptiveSteps(5, 700.0, -620.0, 20, calibrated=True)
    assert adaptive.guidance == 2.0
    for kwargs in (dict(shift=2.0), dict(cfg_interval=0.1), dict(shift=1.0)):
        with pytest.raises(ValueError):
            resolve_settings(stand_in(), "c2i", **kwargs)


def test_resolve_settings_unknown_task():
    with pytest.raises(ValueError):
        resolve_settings(stand_in(), "v2v")


# --- first frame --------------------------------------------------------------------------------------------------------


def _random_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _to_model_range(pixels: np.ndarray) -> torch.Tensor:
    """uint8 [H, W, 3] -> float32 [3, H, W]: to_tensor's /255, then *2 - 1 (infer.py:152-153)."""
    array = pixels.astype(np.float32) / np.float32(255.0) * np.float32(2.0) - np.float32(1.0)
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


def _reference_cover_crop(pixels: np.ndarray, width: int, height: int) -> np.ndarray:
    """infer.py:139-153 written out: cover-resize with LANCZOS, centre crop with floored offsets."""
    h, w = pixels.shape[:2]
    if w / h <= width / height:
        size = (width, int(np.round(width / (w / h))))
    else:
        size = (int(np.round((w / h) * height)), height)
    resized = np.array(Image.fromarray(pixels).resize(size, resample=Image.LANCZOS))
    top, left = (resized.shape[0] - height) // 2, (resized.shape[1] - width) // 2
    return resized[top:top + height, left:left + width]


def test_first_frame_shape_and_range():
    frame = prepare_first_frame(_random_image(300, 400), 848, 480)
    assert frame.shape == (3, 480, 848)
    assert frame.dtype == torch.float32
    assert frame.min().item() >= -1.0 and frame.max().item() <= 1.0
    assert frame.min().item() < -0.9 and frame.max().item() > 0.9  # LANCZOS keeps the full range of a noise image


def test_first_frame_exact_size_passes_through():
    pixels = _random_image(480, 848, seed=1)
    frame = prepare_first_frame(pixels, 848, 480)
    assert torch.equal(frame, _to_model_range(pixels))
    assert frame[:, 0, 0].tolist() == [float(np.float32(v) / np.float32(255) * 2 - 1) for v in pixels[0, 0]]


def test_first_frame_4_3_to_848x480():
    """A 4:3 image is relatively taller than 848x480: width 848, height round(848 / (4/3)) = 636, rows 78..557."""
    pixels = _random_image(600, 800, seed=2)
    resized = np.asarray(Image.fromarray(pixels).resize((848, round(848 / (4 / 3))), resample=Image.LANCZOS))
    assert resized.shape == (636, 848, 3)
    top = (636 - 480) // 2
    assert top == 78
    expected = _to_model_range(resized[top:top + 480, :])
    frame = prepare_first_frame(pixels, 848, 480)
    assert torch.equal(frame, expected)


def test_first_frame_tall_target_takes_other_branch():
    """A 16:9 image to a 480x848 (portrait) target: height 848, width round(16/9 * 848) = 1508, centre columns."""
    pixels = _random_image(360, 640, seed=3)
    width, height = 480, 848
    assert 640 / 360 > width / height  # the "else" branch of infer.py:144-146
    resized = np.asarray(Image.fromarray(pixels).resize((round(640 / 360 * 848), 848), resample=Image.LANCZOS))
    assert resized.shape == (848, 1508, 3)
    left = (1508 - 480) // 2
    expected = _to_model_range(resized[:, left:left + 480])
    assert torch.equal(prepare_first_frame(pixels, width, height), expected)


@pytest.mark.parametrize("shape, target", [((480, 848), (848, 480)), ((1080, 1920), (848, 480)),
                                           ((512, 512), (848, 480)), ((1000, 300), (640, 640)),
                                           ((97, 131), (64, 48)), ((480, 850), (848, 480))])
def test_first_frame_matches_reference(shape, target):
    pixels = _random_image(*shape, seed=sum(shape))
    width, height = target
    expected = _to_model_range(_reference_cover_crop(pixels, width, height))
    assert torch.equal(prepare_first_frame(pixels, width, height), expected)


def test_first_frame_inputs_agree():
    """uint8 array, PIL image, float tensor / array made as byte / 255, and RGBA all give the same frame."""
    pixels = _random_image(600, 800, seed=4)
    reference = prepare_first_frame(pixels, 848, 480)
    as_float = torch.from_numpy(pixels).float() / 255.0
    assert torch.equal(prepare_first_frame(as_float, 848, 480), reference)
    assert torch.equal(prepare_first_frame(as_float.double(), 848, 480), reference)
    assert torch.equal(prepare_first_frame(pixels.astype(np.float32) / 255.0, 848, 480), reference)
    assert torch.equal(prepare_first_frame(Image.fromarray(pixels), 848, 480), reference)
    rgba = np.concatenate([pixels, np.full((600, 800, 1), 7, np.uint8)], axis=-1)
    assert torch.equal(prepare_first_frame(rgba, 848, 480), reference)
    assert torch.equal(prepare_first_frame(torch.from_numpy(pixels), 848, 480), reference)


def test_first_frame_float_exact_size():
    pixels = _random_image(48, 64, seed=5)
    frame = prepare_first_frame(torch.from_numpy(pixels).float() / 255.0, 64, 48)
    assert torch.equal(frame, _to_model_range(pixels))


@pytest.mark.parametrize("shape", [(480, 848), (1, 480, 848, 3), (480, 848, 1), (480, 848, 2), (3, 480, 848),
                                   (0, 848, 3), (480, 0, 3)])
def test_first_frame_wrong_shapes(shape):
    with pytest.raises(ValueError):
        prepare_first_frame(torch.zeros(shape), 848, 480)


def test_first_frame_non_finite():
    image = torch.full((48, 64, 3), 0.5)
    image[3, 4, 1] = math.nan
    with pytest.raises(ValueError):
        prepare_first_frame(image, 64, 48)


# ---- holes a review found (each failed before its fix) -------------------------------------------------------------

@pytest.mark.parametrize("h_over_w", [0.0, -2.0, math.inf, math.nan])
def test_plan_size_refuses_a_bad_aspect_without_a_bucket(h_over_w):
    with pytest.raises(ValueError):
        plan_size(stand_in(), "t2v", h_over_w=h_over_w)


def test_plan_size_refuses_more_frames_than_trained():
    with pytest.raises(ValueError):
        plan_size(stand_in(), "t2v", frames=85)
    assert plan_size(stand_in(), "t2v", frames=81).frames == 81


def test_prepare_first_frame_reads_wide_integer_pixels_as_bytes():
    pixels = np.random.default_rng(0).integers(0, 256, size=(30, 40, 3), dtype=np.uint8)
    assert torch.equal(prepare_first_frame(pixels.astype(np.int64), 32, 16), prepare_first_frame(pixels, 32, 16))
    with pytest.raises(ValueError):
        prepare_first_frame(pixels.astype(np.int64) * 2, 32, 16)
