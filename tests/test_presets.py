"""The per-task presets (grn_core.presets) against the official demo scripts, value by value.

The official numbers are hard-coded here (CI has no network), each with the file and line it was read from in the
public repository bytedance/GRN:

* tools/t2i_infer.py   (commit 8e8e2b61052a724fb81043a844d4bf9e47e4a442)
* tools/t2v_infer.py   (commit 2846724a93381aa7c4a6c4ffd767c7760f6e38c3)
* tools/i2v_infer.py   (commit 62c94fb187d129cfc007e3804106d1336f6cf414)
* tools/grn_pipeline.py (commit a2e1dcf287bef7effadf3fd674915cfd6459e304, the version naming the current release files)
* grn/utils_t2iv/infer.py (commit 3fdaec470f19631d21e22cd2c0f4d64d1f21e5e8; ``transform``, tested in test_request.py)

Class-to-image has no demo script; its numbers are the released ImageNet evaluation of GRN_ind_B recorded in
shared/docs/GRN_SPEC.md §5 (line 114) and §7 (lines 130-131).

A preset that drifts from the demos fails here; so does a second copy of a number that should be read from the
presets (sampler settings, layout caps, the release catalogue).
"""

from pathlib import Path

import pytest

import grn_core.checkpoints as checkpoints
import grn_core.presets as presets
import grn_core.refiner.config as refiner_config
import grn_core.releases as releases
import grn_core.sampler.schedule as schedule
from grn_core.models import released_files
from grn_core.presets import PRESETS, preset
from grn_core.refiner.buckets import pixel_size
from grn_core.request import frames_for_duration
from grn_core.sampler import ADAPTIVE_DEFAULTS, AdaptiveSteps, C2ISettings, SamplerSettings, decide_remaining_steps

# --- official values ------------------------------------------------------------------------------------------------

# bytedance/GRN tools/grn_pipeline.py:92  self.video_frames = 81
# bytedance/GRN tools/grn_pipeline.py:119 self.video_fps = 16
# bytedance/GRN tools/grn_pipeline.py:128 self.cfg_type = 'cfg_interval_0.0'   (guidance where r >= 0.0: always)
# bytedance/GRN tools/grn_pipeline.py:113 self.max_infer_steps = 50
# bytedance/GRN tools/grn_pipeline.py:114 self.min_infer_steps = 50
OFFICIAL_VIDEO_FRAMES = 81
OFFICIAL_VIDEO_FPS = 16
OFFICIAL_CFG_INTERVAL = float("cfg_interval_0.0".split("_")[-1])

# bytedance/GRN tools/grn_pipeline.py:161 negative_prompt=''  (the __call__ default; tools/t2i_infer.py passes none)
OFFICIAL_PIPELINE_NEGATIVE = ""

# bytedance/GRN tools/t2v_infer.py:3-21 and tools/i2v_infer.py:3-21 (identical): negative_prompt = ( ... ), the
# string literals of lines 5-7, 9-11, 13-14, 16-17, 19-20 concatenated as Python does (lines 4, 8, 12, 15, 18 are
# comments).
OFFICIAL_DEMO_NEGATIVE = (
    # --- quality ---
    "ugly, blurry, low-resolution, low-detail, low-quality, noisy, grainy, "
    "overexposed, underexposed, oversaturated, undersaturated, soft focus, "
    "artifacts, compression artifacts, jpeg artifacts, flickering, "
    # --- style ---
    "painting, oil painting, illustration, drawing, sketch, cartoon, anime, manga, "
    "3d, cgi, render, digital art, "
    "plastic, waxy, glossy, fake, unnatural, "
    # --- skin, figure ---
    "plastic skin, waxy skin, over-smoothed skin, doll-like, "
    "deformed, mutated, disfigured, bad anatomy, bad hands, extra fingers, missing fingers, extra limbs, "
    # --- motion ---
    "still image, static, motionless, frozen, "
    "unnatural motion, reversed motion, stuttering, choppy, "
    # --- misc ---
    "text, watermark, logo, signature, username, "
    "crowded background, bad composition"
)

# What each demo passes. Steps: every demo passes complexity_aware_Tmin=10, Tmax=50, k=0, b=50, wp=5, which always
# gives wp + clip(0*H + 50, Tmin - wp, Tmax - wp) = 5 + 45 = 50 steps (checked in test_demo_step_rule_is_always_50).
OFFICIAL_DEMOS = {
    "t2i": dict(
        guidance=3.0,        # bytedance/GRN tools/t2i_infer.py:17 guidance_scale=3.0
        temperature=1.1,     # bytedance/GRN tools/t2i_infer.py:18 temperature=1.1
        Tmin=10,             # bytedance/GRN tools/t2i_infer.py:19 complexity_aware_Tmin=10
        Tmax=50,             # bytedance/GRN tools/t2i_infer.py:20 complexity_aware_Tmax=50
        k=0,                 # bytedance/GRN tools/t2i_infer.py:21 complexity_aware_k = 0
        b=50,                # bytedance/GRN tools/t2i_infer.py:22 complexity_aware_b = 50
        wp=5,                # bytedance/GRN tools/t2i_infer.py:23 complexity_aware_wp = 5
        shift=1.0,           # bytedance/GRN tools/t2i_infer.py:24 snr_shift = 1.
        h_div_w=1.0,         # bytedance/GRN tools/t2i_infer.py:25 h_div_w=1.
        content_type="image",  # bytedance/GRN tools/t2i_infer.py:26 content_type='image'
        duration=0.0,        # bytedance/GRN tools/grn_pipeline.py:205-206 image: num_frames = 1, duration = 0
        pn="1M",             # bytedance/GRN tools/t2i_infer.py:8 pn='1M'
        negative=OFFICIAL_PIPELINE_NEGATIVE,  # not passed: tools/grn_pipeline.py:161 negative_prompt=''
    ),
    "t2v": dict(
        guidance=3.0,        # bytedance/GRN tools/t2v_infer.py:39 guidance_scale=3.0
        temperature=1.0,     # bytedance/GRN tools/t2v_infer.py:40 temperature=1.0
        Tmin=10,             # bytedance/GRN tools/t2v_infer.py:41 complexity_aware_Tmin=10
        Tmax=50,             # bytedance/GRN tools/t2v_infer.py:42 complexity_aware_Tmax=50
        k=0,                 # bytedance/GRN tools/t2v_infer.py:43 complexity_aware_k = 0
        b=50,                # bytedance/GRN tools/t2v_infer.py:44 complexity_aware_b = 50
        wp=5,                # bytedance/GRN tools/t2v_infer.py:45 complexity_aware_wp = 5
        shift=1.0,           # bytedance/GRN tools/t2v_infer.py:46 snr_shift = 1.
        h_div_w=9 / 16,      # bytedance/GRN tools/t2v_infer.py:47 h_div_w=9/16
        duration=2.0,        # bytedance/GRN tools/t2v_infer.py:48 duration=2.
        content_type="video",  # bytedance/GRN tools/t2v_infer.py:50 content_type='video'
        pn="0.41M",          # bytedance/GRN tools/t2v_infer.py:27 pn='0.41M'
        negative=OFFICIAL_DEMO_NEGATIVE,  # bytedance/GRN tools/t2v_infer.py:38 negative_prompt=negative_prompt
    ),
    "i2v": dict(
        guidance=3.0,        # bytedance/GRN tools/i2v_infer.py:40 guidance_scale=3.0
        temperature=1.0,     # bytedance/GRN tools/i2v_infer.py:41 temperature=1.0
        Tmin=10,             # bytedance/GRN tools/i2v_infer.py:42 complexity_aware_Tmin=10
        Tmax=50,             # bytedance/GRN tools/i2v_infer.py:43 complexity_aware_Tmax=50
        k=0,                 # bytedance/GRN tools/i2v_infer.py:44 complexity_aware_k = 0
        b=50,                # bytedance/GRN tools/i2v_infer.py:45 complexity_aware_b = 50
        wp=5,                # bytedance/GRN tools/i2v_infer.py:46 complexity_aware_wp = 5
        shift=1.0,           # bytedance/GRN tools/i2v_infer.py:47 snr_shift = 1.
        h_div_w=9 / 16,      # bytedance/GRN tools/i2v_infer.py:48 h_div_w=9/16
        duration=2.0,        # bytedance/GRN tools/i2v_infer.py:49 duration=2., # 2~5s
        content_type="video",  # bytedance/GRN tools/i2v_infer.py:52 content_type='video'
        pn="0.41M",          # bytedance/GRN tools/i2v_infer.py:27 pn='0.41M'
        negative=OFFICIAL_DEMO_NEGATIVE,  # bytedance/GRN tools/i2v_infer.py:39 negative_prompt=negative_prompt
    ),
}

# Released ImageNet-256 evaluation of GRN_ind_B (no demo script): shared/docs/GRN_SPEC.md:114 (§5) "released eval for
# B: T 50, tau 1.31, w 2.35, interval (0.44, 1.0)"; shared/docs/GRN_SPEC.md:130-131 (§7) "C2I (GRN_ind B eval): w 2.35,
# τ 1.31, interval (0.44, 1.0), 50 steps; complexity-aware C2I: warm-up 5, k 700, b −620, Tmin 20";
# shared/docs/GRN_SPEC.md:98 (§4) "released eval: wp 5, k 700, b -620, Tmin 20, Tmax 50".
OFFICIAL_C2I = dict(steps=50, guidance=2.35, temperature=1.31, interval=(0.44, 1.0), width=256, height=256)
OFFICIAL_C2I_ADAPTIVE = dict(warmup=5, k=700.0, b=-620.0, min_steps=20, max_steps=50)

BIT_TASKS = ("t2i", "t2v", "i2v")


def _official_steps(demo: dict, entropy: float) -> int:
    """The step count the demo's complexity-aware arguments give for a mean entropy ``entropy``, computed by hand:
    ``wp + round(clip(k*H + b, Tmin - wp, Tmax - wp))``."""
    lo, hi = demo["Tmin"] - demo["wp"], demo["Tmax"] - demo["wp"]
    return demo["wp"] + int(round(min(max(demo["k"] * entropy + demo["b"], lo), hi)))


# --- the presets against the demos -------------------------------------------------------------------------------------


def test_task_list():
    """Four tasks, three of them on the bit refiner."""
    assert presets.TASKS == ("t2i", "t2v", "i2v", "c2i")
    assert presets.BIT_TASKS == BIT_TASKS
    assert set(PRESETS) == set(presets.TASKS)
    for task, entry in PRESETS.items():
        assert entry.task == task


@pytest.mark.parametrize("task", BIT_TASKS)
def test_demo_step_rule_is_always_50(task):
    """tools/{t2i,t2v,i2v}_infer.py pass Tmin 10, Tmax 50, k 0, b 50, wp 5 (t2i_infer.py:19-23, t2v_infer.py:41-45,
    i2v_infer.py:42-46): 50 steps whatever the entropy, i.e. our fixed 50-step preset with adaptive steps off."""
    demo = OFFICIAL_DEMOS[task]
    for entropy in (0.0, 0.1, 0.5, 0.9, 1.0):
        assert _official_steps(demo, entropy) == 50
        assert demo["wp"] + decide_remaining_steps(entropy, demo["k"], demo["b"], demo["wp"], demo["Tmin"],
                                                   demo["Tmax"]) == 50
    assert preset(task).steps == 50
    assert preset(task).adaptive is False


@pytest.mark.parametrize("task", BIT_TASKS)
def test_guidance_temperature_shift_interval(task):
    """guidance_scale / temperature / snr_shift: t2i_infer.py:17,18,24; t2v_infer.py:39,40,46; i2v_infer.py:40,41,47.
    Guidance interval: grn_pipeline.py:128 cfg_type 'cfg_interval_0.0' (guide where r >= 0.0)."""
    demo, entry = OFFICIAL_DEMOS[task], preset(task)
    assert entry.guidance == demo["guidance"]
    assert entry.temperature == demo["temperature"]
    assert entry.shift == demo["shift"]
    assert entry.cfg_interval == OFFICIAL_CFG_INTERVAL == 0.0
    assert entry.interval is None  # bit tasks guide by cfg_interval, not by a C2I interval


def test_t2i_temperature_differs_from_video():
    """The demos differ only in tau: t2i_infer.py:18 temperature=1.1 vs t2v_infer.py:40 / i2v_infer.py:41 1.0."""
    assert preset("t2i").temperature == 1.1
    assert preset("t2v").temperature == preset("i2v").temperature == 1.0


@pytest.mark.parametrize("task", BIT_TASKS)
def test_negative_prompt_equals_demo(task):
    """T2V/I2V: the demos' negative_prompt (t2v_infer.py:3-21 passed at :38; i2v_infer.py:3-21 passed at :39), exact.
    T2I: t2i_infer.py passes none, so the pipeline default grn_pipeline.py:161 negative_prompt='' applies."""
    assert preset(task).negative == OFFICIAL_DEMOS[task]["negative"]


def test_official_negative_prompt_constant():
    """presets.OFFICIAL_NEGATIVE_PROMPT is the demos' string (t2v_infer.py:3-21), character for character."""
    assert presets.OFFICIAL_NEGATIVE_PROMPT == OFFICIAL_DEMO_NEGATIVE
    assert len(presets.OFFICIAL_NEGATIVE_PROMPT) == 681
    assert presets.OFFICIAL_NEGATIVE_PROMPT.startswith("ugly, blurry, ")
    assert presets.OFFICIAL_NEGATIVE_PROMPT.endswith("crowded background, bad composition")


@pytest.mark.parametrize("task", BIT_TASKS)
def test_size_is_what_the_demo_resolves_to(task):
    """pn / h_div_w / duration of the demo (t2i_infer.py:8,25,26; t2v_infer.py:27,47,48; i2v_infer.py:27,48,49)
    through the official resolution (buckets) and frame count (grn_pipeline.py:208
    num_frames = min(video_frames, int(duration * video_fps + 1)), video_frames 81 at :92, video_fps 16 at :119;
    floored to 1 + 4k by the causal tokenizer, :210 (num_frames - 1) // 4 + 1)."""
    demo, entry = OFFICIAL_DEMOS[task], preset(task)
    height, width = pixel_size(demo["pn"], demo["h_div_w"])
    assert (entry.width, entry.height) == (width, height)
    frames = 1 if demo["content_type"] == "image" else frames_for_duration(demo["duration"])
    assert entry.frames == frames
    # What the preset records it was derived from is the demo's request.
    assert entry.bucket == demo["pn"]
    assert entry.h_over_w == demo["h_div_w"]
    assert entry.duration == demo["duration"]


def test_sizes_by_hand():
    """The same sizes computed without the library: 1M is a 64-cell side at 1:1 -> 1024x1024; 0.41M is 40 cells, at
    h/w = 9/16 pw = round(sqrt(40^2 * 16/9)) = round(53.33) = 53, ph = round(53.33 * 9/16) = 30 -> 848x480; 2 s at
    16 fps: int(2 * 16 + 1) = 33 frames = 1 + 4*8."""
    assert preset("t2i").size == (1024, 1024, 1)
    assert preset("t2v").size == (848, 480, 33)
    assert preset("i2v").size == (848, 480, 33)
    assert min(OFFICIAL_VIDEO_FRAMES, int(2.0 * OFFICIAL_VIDEO_FPS + 1)) == 33


def test_frame_constants():
    """FPS and MAX_FRAMES are the pipeline's video_fps 16 (grn_pipeline.py:119) and video_frames 81 (:92)."""
    assert presets.FPS == OFFICIAL_VIDEO_FPS
    assert presets.MAX_FRAMES == OFFICIAL_VIDEO_FRAMES


def test_c2i_preset():
    """C2I: the released GRN_ind_B evaluation, shared/docs/GRN_SPEC.md:114 (§5) and :130-131 (§7): 50 steps,
    w 2.35, tau 1.31, guidance interval (0.44, 1.0), ImageNet 256x256; no negative prompt, no shift."""
    entry = preset("c2i")
    assert entry.steps == OFFICIAL_C2I["steps"]
    assert entry.guidance == OFFICIAL_C2I["guidance"]
    assert entry.temperature == OFFICIAL_C2I["temperature"]
    assert entry.interval == OFFICIAL_C2I["interval"]
    assert (entry.width, entry.height, entry.frames) == (OFFICIAL_C2I["width"], OFFICIAL_C2I["height"], 1)
    assert entry.negative == ""
    assert entry.adaptive is False
    values = entry.sampler_values()
    assert values == dict(steps=50, guidance=2.35, temperature=1.31, interval=(0.44, 1.0))
    assert "shift" not in values and "cfg_interval" not in values


def test_c2i_adaptive_rule():
    """Complexity-aware C2I: shared/docs/GRN_SPEC.md:98 (§4) and :131 (§7): wp 5, k 700, b -620, Tmin 20, Tmax 50."""
    rule = presets.ADAPTIVE_RULES["c2i"]
    assert (rule["warmup"], rule["k"], rule["b"], rule["min_steps"]) == (
        OFFICIAL_C2I_ADAPTIVE["warmup"], OFFICIAL_C2I_ADAPTIVE["k"], OFFICIAL_C2I_ADAPTIVE["b"],
        OFFICIAL_C2I_ADAPTIVE["min_steps"])
    assert rule["calibrated"] is True
    assert preset("c2i").steps == OFFICIAL_C2I_ADAPTIVE["max_steps"]
    official = C2ISettings.official_adaptive()
    assert official.adaptive == AdaptiveSteps(5, 700.0, -620.0, 20, calibrated=True)
    assert official.steps == 50


def test_bit_adaptive_rules_are_uncalibrated_starting_rules():
    """The official bit loop never uses a rule (always 50 steps); ours start uncalibrated at D = 90*H."""
    for task in BIT_TASKS:
        assert presets.ADAPTIVE_RULES[task] == dict(warmup=5, k=90.0, b=0.0, min_steps=20, calibrated=False)


@pytest.mark.parametrize("task", BIT_TASKS)
def test_sampler_values_of_bit_presets(task):
    """sampler_values() hands the sampler exactly the demo's numbers (and no C2I interval)."""
    demo = OFFICIAL_DEMOS[task]
    assert preset(task).sampler_values() == dict(steps=50, guidance=demo["guidance"], temperature=demo["temperature"],
                                                 shift=demo["shift"], cfg_interval=OFFICIAL_CFG_INTERVAL)


def test_preset_lookup():
    """preset() is case-insensitive and refuses unknown tasks with a ValueError."""
    assert preset("T2V") is PRESETS["t2v"]
    with pytest.raises(ValueError):
        preset("v2v")


def test_prompt_templates():
    """Task tags of the joint-layout checkpoints: tools/t2i_infer.py:16 "<T2I>" + prompt; tools/i2v_infer.py:38
    f"<I2V>{prompt} high aesthetic and high quality video."; the T2V tag is "<T2V>" (tools/t2v_infer.py:37, whose
    stored version ends ". The quality is very high!" rather than the I2V suffix)."""
    assert presets.JOINT_PROMPT_TEMPLATES["t2i"].format("A cute cat") == "<T2I>" + "A cute cat"
    assert presets.JOINT_PROMPT_TEMPLATES["i2v"].format("p") == "<I2V>p high aesthetic and high quality video."
    assert presets.JOINT_PROMPT_TEMPLATES["t2v"].startswith("<T2V>{}")
    for template in presets.PREFIX_PROMPT_TEMPLATES.values():
        assert "<" not in template  # the prefix-layout releases had no tag


# --- one place: everything else reads the presets -----------------------------------------------------------------------


@pytest.mark.parametrize("task", BIT_TASKS)
def test_sampler_settings_for_task_reads_presets(task):
    """SamplerSettings.for_task(t) carries the preset's numbers, adaptive off."""
    entry = preset(task)
    settings = SamplerSettings.for_task(task)
    assert (settings.steps, settings.guidance, settings.temperature, settings.shift, settings.cfg_interval) == (
        entry.steps, entry.guidance, entry.temperature, entry.shift, entry.cfg_interval)
    assert settings.adaptive is None
    assert settings.validate() is settings


def test_sampler_settings_defaults_are_the_t2v_preset():
    """SamplerSettings() is the T2V demo's request (t2v_infer.py:39-46), C2ISettings() the C2I evaluation."""
    plain, entry = SamplerSettings(), preset("t2v")
    assert (plain.steps, plain.guidance, plain.temperature, plain.shift, plain.cfg_interval) == (
        entry.steps, entry.guidance, entry.temperature, entry.shift, entry.cfg_interval)
    assert plain.adaptive is None
    c2i, entry = C2ISettings(), preset("c2i")
    assert (c2i.steps, c2i.guidance, c2i.temperature, c2i.interval) == (
        entry.steps, entry.guidance, entry.temperature, entry.interval)
    assert c2i.adaptive is None


def test_for_task_adaptive_true_uses_family_rule():
    """adaptive=True takes the family rule, built from presets.ADAPTIVE_RULES."""
    for task in BIT_TASKS:
        settings = SamplerSettings.for_task(task, adaptive=True)
        assert settings.adaptive == AdaptiveSteps(**presets.ADAPTIVE_RULES[task])
        assert settings.adaptive is ADAPTIVE_DEFAULTS[task]
    assert ADAPTIVE_DEFAULTS["c2i"] == AdaptiveSteps(**presets.ADAPTIVE_RULES["c2i"])


def test_for_task_uses_the_given_rule():
    """for_task("t2v", adaptive=AdaptiveSteps(...)) runs that rule, not the family's."""
    rule = AdaptiveSteps(warmup=3, k=12.5, b=7.0, min_steps=11, calibrated=True)
    settings = SamplerSettings.for_task("t2v", adaptive=rule)
    assert settings.adaptive is rule
    assert settings.adaptive != ADAPTIVE_DEFAULTS["t2v"]
    assert (settings.steps, settings.guidance, settings.temperature) == (50, 3.0, 1.0)
    settings.validate()


def test_for_task_overrides_and_refusals():
    """Overrides replace preset fields; C2I and unknown tasks are refused (ValueError)."""
    settings = SamplerSettings.for_task("t2i", guidance=4.0, steps=30)
    assert (settings.steps, settings.guidance, settings.temperature) == (30, 4.0, 1.1)
    for task in ("c2i", "v2v"):
        with pytest.raises(ValueError):
            SamplerSettings.for_task(task)


def test_layout_caps_are_one_object():
    """schedule.layout_cap and refiner.config.KEEP_CAP read presets.LAYOUT_CAPS itself (same object, not a copy)."""
    assert schedule.LAYOUT_CAPS is presets.LAYOUT_CAPS
    assert refiner_config.KEEP_CAP is presets.LAYOUT_CAPS
    assert presets.LAYOUT_CAPS == {"joint": 0.95, "prefix": 0.999}
    for layout, cap in presets.LAYOUT_CAPS.items():
        assert schedule.layout_cap(layout) == cap


def test_known_files_are_the_release_catalogue():
    """checkpoints.KNOWN_FILES is derived from releases.RELEASED_FILES: same names, kinds, layouts, tasks, overrides."""
    assert list(checkpoints.KNOWN_FILES) == [f.name for f in releases.RELEASED_FILES]
    for entry in releases.RELEASED_FILES:
        known = checkpoints.KNOWN_FILES[entry.name]
        assert (known.kind, known.layout, known.tasks, known.overrides) == (
            entry.kind, entry.layout, entry.tasks, entry.overrides)
    assert len({f.name for f in releases.RELEASED_FILES}) == len(releases.RELEASED_FILES)


def test_catalogue_names_the_official_pipeline_files():
    """The current files the official pipeline downloads (tools/grn_pipeline.py:49 GRN_T2I_2B_FSA_251600.pth,
    :51 GRN_T2V_2B_FSA_sft147400_ema.pth (GRN2b), :53 GRN_T2V_TITAN_FSA_sft10600_ema.pth (GRN8b), :56 the tokenizer
    HBQ_image_video_tokenizer_64dim_M4_20260626.ckpt) are in the catalogue, the 8B video file for t2v and i2v."""
    assert releases.BY_NAME["GRN_T2I_2B_FSA_251600.pth"].tasks == ("t2i",)
    assert releases.BY_NAME["GRN_T2V_2B_FSA_sft147400_ema.pth"].tasks == ("t2v",)
    assert releases.BY_NAME["GRN_T2V_TITAN_FSA_sft10600_ema.pth"].tasks == ("t2v", "i2v")
    assert releases.TOKENIZER_64 == "HBQ_image_video_tokenizer_64dim_M4_20260626.ckpt"
    for name in ("GRN_T2I_2B_FSA_251600.pth", "GRN_T2V_2B_FSA_sft147400_ema.pth",
                 "GRN_T2V_TITAN_FSA_sft10600_ema.pth"):
        assert releases.BY_NAME[name].tokenizer == releases.TOKENIZER_64
        assert releases.BY_NAME[name].layout == "joint"
    assert releases.I2V_FILE == "GRN_T2V_TITAN_FSA_sft10600_ema.pth"
    assert releases.does_i2v(releases.I2V_FILE) and not releases.does_i2v("GRN_T2V_2B_FSA_sft147400_ema.pth")


def test_released_files_i2v_8b_names_catalogue_files(tmp_path: Path):
    """models.released_files("i2v-8b", dir) names the catalogue's refiner, its tokenizer and umt5-xxl, under dir."""
    files = released_files("i2v-8b", tmp_path)
    short = releases.SHORT_NAMES["i2v-8b"]
    assert short.task == "i2v" and short.refiner == releases.I2V_FILE
    assert files == {
        "refiner": tmp_path / releases.I2V_FILE,
        "tokenizer": tmp_path / releases.BY_NAME[releases.I2V_FILE].tokenizer,
        "text_encoder": tmp_path / releases.UMT5_WEIGHTS,
        "text_tokenizer": tmp_path / releases.UMT5_TOKENIZER,
    }
    assert files["tokenizer"].name == "HBQ_image_video_tokenizer_64dim_M4_20260626.ckpt"
    for path in files.values():
        assert releases.released(str(path)) is not None or path.name == "tokenizer.json"


def test_released_files_c2i_has_no_text_encoder(tmp_path: Path):
    """The class-to-image file needs its 16-channel tokenizer only."""
    files = released_files("c2i-b", tmp_path)
    assert files == {"refiner": tmp_path / "GRN_ind_B_ep599.pth", "tokenizer": tmp_path / releases.TOKENIZER_16}
