"""Per-task presets: what the official demo scripts pass, in one place.

A leaf module (no import from the rest of ``grn_core``): the sampler settings, the pipeline, the command line, the
ComfyUI widgets and the workflow generator all read these numbers, and ``tests/test_presets.py`` compares them with
the official scripts line by line.

=====  =====  ====  =====  ==============  ========  ===========================  ==================================
task   steps  w     tau    guidance from   shift     size                          negative prompt
=====  =====  ====  =====  ==============  ========  ===========================  ==================================
t2i    50     3.0   1.1    r >= 0 (always)  1        1024x1024 (bucket 1M, 1:1)   '' (the pipeline's default)
t2v    50     3.0   1.0    r >= 0 (always)  1        848x480, 33 frames (0.41M,   the demo's long quality list
                                                     9:16, 2 s at 16 fps)
i2v    as t2v, plus the first frame
c2i    50     2.35  1.31   0.44 < t < 1.0   —        256x256                      — (class labels)
=====  =====  ====  =====  ==============  ========  ===========================  ==================================

Adaptive steps are off by default everywhere, as in the demos (their ``k = 0, b = 50`` always gives 50 steps).
When switched on, a model's own calibrated rule is used if its file carries one; otherwise the family rule below:
the released C2I evaluation's complexity-aware rule, or for the bit models a documented starting rule
``D = 90 * H`` (warm-up 5, at least 20 steps) that ``python -m grn_core calibrate`` replaces with a fitted one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

TASKS = ("t2i", "t2v", "i2v", "c2i")
BIT_TASKS = ("t2i", "t2v", "i2v")
FPS = 16  # frame rate the video models were trained at
MAX_FRAMES = 81  # longest video (5 s at 16 fps) the released models were trained on

# Largest kept fraction the official loop of each sequence layout reaches: r_i = cap * (1 - cos(pi/2 * p)).
LAYOUT_CAPS = {"joint": 0.95, "prefix": 0.999}

# tools/t2v_infer.py and tools/i2v_infer.py of bytedance/GRN pass this negative prompt (lines 3-21 of both files).
OFFICIAL_NEGATIVE_PROMPT = (
    "ugly, blurry, low-resolution, low-detail, low-quality, noisy, grainy, "
    "overexposed, underexposed, oversaturated, undersaturated, soft focus, "
    "artifacts, compression artifacts, jpeg artifacts, flickering, "
    "painting, oil painting, illustration, drawing, sketch, cartoon, anime, manga, "
    "3d, cgi, render, digital art, "
    "plastic, waxy, glossy, fake, unnatural, "
    "plastic skin, waxy skin, over-smoothed skin, doll-like, "
    "deformed, mutated, disfigured, bad anatomy, bad hands, extra fingers, missing fingers, extra limbs, "
    "still image, static, motionless, frozen, "
    "unnatural motion, reversed motion, stuttering, choppy, "
    "text, watermark, logo, signature, username, "
    "crowded background, bad composition"
)

# Task tags as a plain-text prefix, as the current (joint-layout) checkpoints were trained; the first (prefix-layout)
# releases had no tag and a quality suffix instead. Negative prompts are never tagged.
JOINT_PROMPT_TEMPLATES = {
    "t2i": "<T2I>{}",
    "t2v": "<T2V>{} high aesthetic and high quality video.",
    "i2v": "<I2V>{} high aesthetic and high quality video.",
}
PREFIX_PROMPT_TEMPLATES = {"t2i": "{}", "t2v": "{}. masterpiece, high quality.", "i2v": "{}"}


# Adaptive-step rules as the keyword arguments of ``grn_core.sampler.AdaptiveSteps``: after ``warmup`` steps,
# ``D = round(clip(k*H + b, min_steps - warmup, steps - warmup))`` more steps; ``calibrated``: fitted on real outputs.
# C2I: the released ImageNet evaluation (wp 5, k 700, b -620, Tmin 20, Tmax 50). Bit models: the official loop never
# uses a rule; ours starts at D = 90*H within [15, 45] remaining steps until `calibrate` fits one for a model.
ADAPTIVE_RULES = {
    "c2i": dict(warmup=5, k=700.0, b=-620.0, min_steps=20, calibrated=True),
    "t2i": dict(warmup=5, k=90.0, b=0.0, min_steps=20, calibrated=False),
    "t2v": dict(warmup=5, k=90.0, b=0.0, min_steps=20, calibrated=False),
    "i2v": dict(warmup=5, k=90.0, b=0.0, min_steps=20, calibrated=False),
}


@dataclass(frozen=True)
class TaskPreset:
    """The official demo's request for one task.

    cfg_interval: bit tasks guide where the kept fraction ``r >= cfg_interval``; ``interval``: C2I guides where
    ``low < t < high``. ``bucket`` / ``h_over_w`` / ``duration`` are what the demo passes; ``width``, ``height``,
    ``frames`` are what they resolve to for the released 16x tokenizer.
    """

    task: str
    steps: int
    guidance: float
    temperature: float
    width: int
    height: int
    frames: int = 1
    shift: float = 1.0
    cfg_interval: float = 0.0
    interval: Optional[tuple[float, float]] = None
    negative: str = ""
    bucket: Optional[str] = None
    h_over_w: float = 1.0
    duration: float = 0.0
    adaptive: bool = False

    @property
    def size(self) -> tuple[int, int, int]:
        return self.width, self.height, self.frames

    def sampler_values(self) -> dict:
        """The fields of the sampler settings this preset fixes (bit loop or C2I loop)."""
        values = dict(steps=self.steps, guidance=self.guidance, temperature=self.temperature)
        if self.interval is not None:
            values["interval"] = self.interval
        else:
            values.update(shift=self.shift, cfg_interval=self.cfg_interval)
        return values


PRESETS: dict[str, TaskPreset] = {
    "t2i": TaskPreset("t2i", steps=50, guidance=3.0, temperature=1.1, width=1024, height=1024, bucket="1M",
                      h_over_w=1.0),
    "t2v": TaskPreset("t2v", steps=50, guidance=3.0, temperature=1.0, width=848, height=480, frames=33,
                      negative=OFFICIAL_NEGATIVE_PROMPT, bucket="0.41M", h_over_w=9 / 16, duration=2.0),
    "i2v": TaskPreset("i2v", steps=50, guidance=3.0, temperature=1.0, width=848, height=480, frames=33,
                      negative=OFFICIAL_NEGATIVE_PROMPT, bucket="0.41M", h_over_w=9 / 16, duration=2.0),
    "c2i": TaskPreset("c2i", steps=50, guidance=2.35, temperature=1.31, width=256, height=256,
                      interval=(0.44, 1.0)),
}


def preset(task: str) -> TaskPreset:
    """The preset of ``task`` (``t2i``, ``t2v``, ``i2v``, ``c2i``), or a ValueError listing them."""
    key = str(task).lower()
    if key not in PRESETS:
        raise ValueError(f"unknown task {task!r}; use one of {', '.join(TASKS)}.")
    return PRESETS[key]


__all__ = ["TASKS", "BIT_TASKS", "FPS", "MAX_FRAMES", "LAYOUT_CAPS", "OFFICIAL_NEGATIVE_PROMPT", "JOINT_PROMPT_TEMPLATES",
           "PREFIX_PROMPT_TEMPLATES", "ADAPTIVE_RULES", "TaskPreset", "PRESETS", "preset"]
