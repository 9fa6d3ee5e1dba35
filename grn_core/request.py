"""From what a user asks for to what the pipeline runs: sizes, frames, sampler settings, the first frame.

Every face (the command line, the Python API, the ComfyUI nodes) resolves a request here, so the same widgets,
flags or arguments give the same bits:

* ``plan_size`` — width/height (or a resolution bucket + aspect) snapped to the tokenizer grid, frames (or a
  duration) floored to ``1 + 4k`` as the official code does (``F = min(81, int(duration * 16 + 1))`` frames give
  ``(F - 1) // 4 + 1`` latent frames), with a note saying what was changed;
* ``resolve_settings`` — the task's official preset (``grn_core.presets``) with the caller's overrides; adaptive
  steps use the model's own calibrated rule, else the family's, unless the caller gives a rule or k/b explicitly;
* ``prepare_first_frame`` — the official I2V image preparation: cover-resize with LANCZOS so the image covers the
  target (the side that is short gets the target size, the other ``round(target * aspect)``), centre crop (offsets
  floored), then ``x / 255 * 2 - 1``.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import numpy as np
import torch

from .presets import ADAPTIVE_RULES, FPS, MAX_FRAMES, preset
from .refiner.buckets import ASPECT_RATIOS, BUCKET_SIDES, VAE_STRIDE, latent_grid, pixel_size
from .sampler import AdaptiveSteps, C2ISettings, SamplerSettings

# Largest latent cells per frame the released models were trained on (the 2M bucket: 90 x 90).
MAX_LATENT_CELLS = max(BUCKET_SIDES.values()) ** 2
# Longest latent side of any trained bucket (2M at 1:3 is 52 x 156 cells): a custom size may not be longer.
MAX_LATENT_SIDE = max(max(latent_grid(bucket, ratio)) for bucket in BUCKET_SIDES for ratio in ASPECT_RATIOS)
# Largest latent cells per frame of any trained bucket at any trained aspect (2M at 16:9 is 68 x 120 = 8160): the most
# a planned request can have, and what the pipeline accepts from a caller who did not plan with plan_size.
MAX_BUCKET_CELLS = max(h * w for h, w in (latent_grid(bucket, ratio) for bucket in BUCKET_SIDES
                                          for ratio in ASPECT_RATIOS))
# Most sampler steps a request may ask for: the schedules were trained for 50; beyond this a run only burns time.
MAX_STEPS = 1000
# Largest guidance weight: the demos use 3 (C2I about 2.35); far beyond, u + w (c - u) overflows float32 into NaN.
MAX_GUIDANCE = 1000.0
# Seeds are 64-bit: torch generators take 0 .. 2**64 - 1 (sample k of a batch uses seed + k, modulo 2**64).
SEED_LIMIT = 1 << 64


def check_seed(seed: Any, name: str = "seed") -> int:
    """``seed`` as an int in ``0 .. 2**64 - 1``, or a ValueError naming the range (no silent wrap-around)."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise ValueError(f"{name} {seed!r} is not an integer; use a whole number from 0 to {SEED_LIMIT - 1}.")
    if not 0 <= int(seed) < SEED_LIMIT:
        raise ValueError(f"{name} {seed} is outside 0..{SEED_LIMIT - 1} (2**64 - 1); seeds are 64-bit and would "
                         "wrap around, so pick one in that range.")
    return int(seed)


@dataclass(frozen=True)
class SizeSpec:
    """What :func:`plan_size` reads of a model, known without building it (from a file's header, or a released
    model's catalogue entry): the tokenizer's factors and the native size the file names, if any. Lets a face
    refuse an impossible size before it spends time loading weights."""

    spatial_factor: int = 16
    temporal_factor: int = 4
    defaults: dict = field(default_factory=dict)
    tasks: tuple[str, ...] = ()
    adaptive: Optional[AdaptiveSteps] = None  # the file's own calibrated rule (resolve_settings reads it)


def check_strength(strength: Any) -> float:
    """An edit's strength as a float in [0, 1] (0 keeps the source, 1 regenerates fully), or a ValueError."""
    if isinstance(strength, bool) or not isinstance(strength, numbers.Real) or not math.isfinite(strength) or \
            not 0.0 <= float(strength) <= 1.0:
        raise ValueError(f"strength {strength!r} must be a number from 0 (keep the source) to 1 (regenerate fully).")
    return float(strength)


def strength_to_start(strength: float, steps: int) -> int:
    """The sampler's start step for a strength: ``k = round((1 - strength) * steps)`` (0 <= k <= steps)."""
    strength = check_strength(strength)
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1:
        raise ValueError(f"steps {steps!r} must be an integer >= 1.")
    return min(int(steps), max(0, int(round((1.0 - strength) * int(steps)))))


def frames_for_duration(duration: float, temporal_factor: int = 4) -> int:
    """Frames of a clip of ``duration`` seconds as the official pipeline makes it: ``F = min(81, int(d * 16 + 1))``,
    of which the causal tokenizer uses ``1 + 4 * ((F - 1) // 4)`` (0 s: an image)."""
    if not math.isfinite(float(duration)) or duration < 0:
        raise ValueError(f"duration {duration!r} s must be a finite number >= 0 (0 makes an image).")
    return snap_frames(min(MAX_FRAMES, int(duration * FPS + 1)), temporal_factor)


def snap_frames(frames: int, temporal_factor: int = 4) -> int:
    """The largest ``1 + k * temporal_factor`` frame count not above ``frames`` (the official floor; >= 1)."""
    return 1 + max(0, (int(frames) - 1) // temporal_factor) * temporal_factor


@dataclass(frozen=True)
class SizePlan:
    """The output size a request resolves to, and what was changed to get there (``note``)."""

    width: int
    height: int
    frames: int
    snapped: bool
    note: str

    @property
    def label(self) -> str:
        return f"{self.width}x{self.height}" + (f", {self.frames} frames" if self.frames > 1 else "")


def default_size(model: Any, task: str) -> tuple[int, int, int]:
    """(width, height, frames) a model makes when nothing is asked: its file's native size, else the task's preset.
    Class-to-image models make one fixed size (their latent side times the tokenizer stride)."""
    config = getattr(getattr(model, "refiner", None), "config", None)
    if task == "c2i" and hasattr(config, "input_size"):
        side = int(config.input_size) * int(model.spatial_factor)
        return side, side, 1
    width, height, frames = preset(task).size
    defaults = getattr(model, "defaults", None) or {}
    frames = defaults.get("frames", frames) if task in ("t2v", "i2v") else 1
    return int(defaults.get("width", width)), int(defaults.get("height", height)), int(frames)


def negative_prompt(model: Any, task: str, negative: Optional[str] = None) -> str:
    """The negative prompt of a request: ``negative`` when given (``""`` means none), else the model's default
    (a file may say what it was trained with, as the tiny model's does), else the task's preset (the official demo's:
    empty for T2I, its quality list for T2V/I2V)."""
    if negative is not None:
        return negative
    defaults = getattr(model, "defaults", None) or {}
    return str(defaults.get("negative", preset(task).negative))


def _is_number(value: Any) -> bool:
    """A real number that is finite (ints of any size count: ``math.isfinite`` would overflow on them)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return False
    return isinstance(value, numbers.Integral) or math.isfinite(value)


def _check_side(name: str, value: float, sf: int) -> None:
    """Refuse an absurd side before any arithmetic on it (a 10**400 int overflows floats); sensible sides are checked
    against the trained buckets after snapping."""
    if not value < 1e9:
        longest = MAX_LATENT_SIDE * sf
        shown = f"{value:.3g}" if isinstance(value, float) else (str(value) if value < 10 ** 15 else
                                                                  f"a {len(str(int(value)))}-digit number")
        raise ValueError(f"{name} {shown} is longer than any trained bucket's side ({MAX_LATENT_SIDE} latent cells = "
                         f"{longest} px at the most extreme trained aspect, 1:3); keep each side at most {longest} px.")


def plan_size(model: Any, task: str, width: Optional[int] = None, height: Optional[int] = None,
              frames: Optional[int] = None, duration: float = 0.0, resolution: Optional[str] = None,
              h_over_w: Optional[float] = None, max_latent_cells: int = MAX_LATENT_CELLS) -> SizePlan:
    """The size the sampler will make for ``task``: the one validator of a request's size, for every face.

    ``width`` / ``height`` / ``frames`` left ``None`` take the model's default size; a ``resolution`` bucket
    (``"0.41M"`` …) with ``h_over_w`` (default: height / width) replaces width/height by the bucket's trained size;
    ``duration`` > 0 replaces frames (capped at 81 frames, as official, and said in the note). Sizes snap to the
    nearest multiple of the tokenizer's stride, frames floor to ``1 + 4k`` (text-to-image makes one frame,
    image-to-video at least 5); class-to-image makes its model's one size whatever is asked (the note says so).

    Refused (ValueError saying what to change), before any model work: sizes or frames that are not positive finite
    numbers (0 never means "the default"), more than 81 frames, a custom size beyond the largest trained bucket
    (``max_latent_cells`` latent cells per frame, or a side longer than any bucket's, :data:`MAX_LATENT_SIDE` cells).
    ``model`` may be a loaded model or a :class:`SizeSpec`.
    """
    sf, tf = int(model.spatial_factor), int(model.temporal_factor)
    base_w, base_h, base_f = default_size(model, task)
    if task == "c2i":  # one size per model: say so when something else was asked, rather than ignore it silently
        asked = (base_w if width is None else width, base_h if height is None else height)
        changed = asked != (base_w, base_h)
        note = f"{base_w}x{base_h}" + (f" (class-to-image makes one size; asked {asked[0]}x{asked[1]})"
                                       if changed else "")
        return SizePlan(base_w, base_h, 1, changed, note)
    width = base_w if width is None else width
    height = base_h if height is None else height
    frames = base_f if frames is None else frames
    for name, value in (("width", width), ("height", height), ("frames", frames)):
        if not _is_number(value) or value < 1:
            raise ValueError(f"{name} {value!r} must be a positive number (0 does not mean the default: leave it "
                             f"out for the model's {name}).")
    duration = 0.0 if duration is None else duration
    if not _is_number(duration) or duration < 0:
        raise ValueError(f"duration {duration!r} s must be a finite number >= 0 (0: use frames).")
    if h_over_w is not None and (not _is_number(h_over_w) or h_over_w <= 0):
        raise ValueError(f"aspect {h_over_w!r} must be a positive height / width, e.g. 9/16 = 0.5625.")
    if frames > MAX_FRAMES and not duration:
        raise ValueError(f"frames {frames}: at most {MAX_FRAMES} ({MAX_FRAMES / FPS:g} s at {FPS} fps), the longest "
                         "clip the released models were trained on; use fewer frames.")
    if resolution not in (None, "custom"):
        if not isinstance(resolution, str):
            raise ValueError(f"resolution {resolution!r} is not a bucket name; use one of {list(BUCKET_SIDES)}.")
        ratio = float(h_over_w) if h_over_w is not None else height / width
        out_h, out_w = pixel_size(resolution, ratio)
        out_h, out_w = out_h // VAE_STRIDE * sf, out_w // VAE_STRIDE * sf  # keep the bucket's latent grid
        # A bucket's size is a trained size (the 2M bucket at 16:9 is 68 x 120 = 8160 cells): no cap to check.
    else:
        _check_side("width", width, sf)
        if h_over_w is not None:
            height = width * float(h_over_w)
        _check_side("height", height, sf)
        out_w, out_h = max(sf, sf * round(width / sf)), max(sf, sf * round(height / sf))
        cells_w, cells_h = out_w // sf, out_h // sf
        cells = cells_w * cells_h
        if cells > max_latent_cells:
            side = math.isqrt(max_latent_cells) * sf
            raise ValueError(f"{out_w}x{out_h} is {cells} latent cells per frame, beyond the largest trained bucket "
                             f"({max_latent_cells} cells, about {side}x{side}); lower width/height or pick a bucket.")
        if max(cells_w, cells_h) > MAX_LATENT_SIDE:
            longest = MAX_LATENT_SIDE * sf
            raise ValueError(f"{out_w}x{out_h}: a side of {max(cells_w, cells_h)} latent cells is longer than any "
                             f"trained bucket's ({MAX_LATENT_SIDE} cells = {longest} px at the most extreme trained "
                             f"aspect, 1:3); keep each side at most {longest} px.")
    duration_note = ""
    if duration > 0:
        wanted = int(duration * FPS + 1) if duration < 1e12 else MAX_FRAMES + 1
        frames = frames_for_duration(min(duration, 1e12), tf)
        if wanted > MAX_FRAMES and task not in ("t2i", "c2i"):
            asked_s = float(min(duration, 10 ** 12))
            duration_note = f"asked {asked_s:g} s; at most {MAX_FRAMES} frames, {MAX_FRAMES / FPS:g} s"
    out_frames = 1 if task in ("t2i", "c2i") else snap_frames(frames, tf)
    if task == "i2v":
        out_frames = max(out_frames, 1 + tf)
    asked = (int(width), int(round(height)), int(frames))
    snapped = (out_w, out_h, out_frames) != asked or bool(duration_note)
    note = f"{out_w}x{out_h}" + (f", {out_frames} frames" if out_frames > 1 else "")
    if (out_w, out_h, out_frames) != asked:
        note += f" (asked {asked[0]}x{asked[1]}" + (f", {asked[2]} frames" if asked[2] != out_frames else "") + ")"
    if duration_note:
        note += f" ({duration_note})"
    return SizePlan(out_w, out_h, out_frames, snapped, note)


def model_rule(model: Any, task: str) -> AdaptiveSteps:
    """The adaptive-step rule a model runs by default: its own calibrated one (in its file), else its family's."""
    own = getattr(model, "adaptive", None)
    if isinstance(own, AdaptiveSteps) and own.calibrated:
        return own
    return AdaptiveSteps(**ADAPTIVE_RULES[task])


def resolve_settings(model: Any, task: str, *, steps: Optional[int] = None, guidance: Optional[float] = None,
                     temperature: Optional[float] = None, shift: Optional[float] = None,
                     cfg_interval: Optional[float] = None, adaptive: Optional[bool] = None,
                     rule: Optional[AdaptiveSteps] = None, warmup: Optional[int] = None,
                     min_steps: Optional[int] = None, k: Optional[float] = None,
                     b: Optional[float] = None) -> Union[SamplerSettings, C2ISettings]:
    """Sampler settings for a request: the task's preset, then every argument that is not ``None``.

    ``adaptive``: None takes the preset's (off); when on, the rule is ``rule`` if given, else :func:`model_rule`,
    with ``warmup`` / ``min_steps`` / ``k`` / ``b`` replacing its numbers where given (an explicit override). Those
    four without ``adaptive`` on are refused rather than ignored.
    """
    base = preset(task)
    if steps is not None and not isinstance(steps, bool) and isinstance(steps, numbers.Integral) and \
            steps > MAX_STEPS:
        raise ValueError(f"steps {steps}: at most {MAX_STEPS} (the models were trained for {base.steps}; more steps "
                         "only cost time); use fewer steps.")
    if guidance is not None and not isinstance(guidance, bool) and isinstance(guidance, numbers.Real) and \
            math.isfinite(guidance) and guidance > MAX_GUIDANCE:
        raise ValueError(f"guidance {guidance:g}: at most {MAX_GUIDANCE:g} (the demos use {base.guidance:g}; far "
                         "larger weights overflow the guided logits into NaN); use a smaller guidance.")
    adaptive = base.adaptive if adaptive is None else bool(adaptive)
    tweaks = {name: value for name, value in (("warmup", warmup), ("min_steps", min_steps), ("k", k), ("b", b))
              if value is not None}
    if not adaptive and (tweaks or rule is not None):
        raise ValueError(f"adaptive-step settings ({', '.join(tweaks) or 'rule'}) were given with adaptive steps "
                         "off; switch adaptive steps on, or drop them.")
    chosen = None
    if adaptive:
        chosen = rule if rule is not None else model_rule(model, task)
        if tweaks:
            fields = {**chosen.__dict__, **tweaks, "calibrated": False}
            chosen = AdaptiveSteps(**fields)
    values = {**base.sampler_values(), "adaptive": chosen}
    overrides = {"steps": steps, "guidance": guidance, "temperature": temperature}
    if task == "c2i":
        if shift is not None or cfg_interval is not None:
            raise ValueError("class-to-image has no shift or guidance-from setting (its guidance interval is "
                             f"{base.interval}); drop them.")
    else:
        overrides.update(shift=shift, cfg_interval=cfg_interval)
    values.update({name: value for name, value in overrides.items() if value is not None})
    settings_class = C2ISettings if task == "c2i" else SamplerSettings
    return settings_class(**values).validate()


def _to_uint8_rgb(image: Any) -> np.ndarray:
    """A PIL image, a uint8 array ``[H, W, 3]`` or a float tensor/array ``[H, W, 3]`` in [0, 1] → uint8 ``[H, W, 3]``.

    Floats are rounded back to bytes: images loaded by ComfyUI are ``byte / 255`` and must come back unchanged.
    """
    if hasattr(image, "convert") and hasattr(image, "size"):  # PIL
        return np.array(image.convert("RGB"))
    array = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if array.ndim != 3 or array.shape[-1] not in (3, 4) or min(array.shape[:2]) < 1:
        raise ValueError(f"the first frame must be one RGB image [H, W, 3], got shape {tuple(array.shape)}.")
    array = array[..., :3]
    if array.dtype == np.uint8:
        return np.ascontiguousarray(array)
    if np.issubdtype(array.dtype, np.integer):  # byte values in a wider integer type
        if array.min() < 0 or array.max() > 255:
            raise ValueError(f"integer pixels must be 0..255, got {array.min()}..{array.max()}.")
        return array.astype(np.uint8)
    if not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"the first frame has pixels of type {array.dtype}; pass uint8 or floats in [0, 1].")
    array = array.astype(np.float64)
    if not np.isfinite(array).all():
        raise ValueError("the first frame has NaN or infinite pixels.")
    return np.clip(np.rint(array * 255.0), 0, 255).astype(np.uint8)


def prepare_first_frame(image: Any, width: int, height: int) -> torch.Tensor:
    """The official I2V preparation of a first frame → ``[3, height, width]`` float32 in [-1, 1].

    Cover-resize with LANCZOS: when the image is relatively taller than the target (``w/h <= W/H``) it becomes
    ``W x round(W * h / w)``, else ``round(H * w / h) x H``; then the centre ``W x H`` is cut out (offsets floored).
    """
    from PIL import Image

    pixels = _to_uint8_rgb(image)
    h, w = pixels.shape[:2]
    if (h, w) != (height, width):
        if w / h <= width / height:
            size = (width, int(np.round(width / (w / h))))
        else:
            size = (int(np.round((w / h) * height)), height)
        resized = np.array(Image.fromarray(pixels).resize(size, resample=Image.LANCZOS))  # writable copy
        top, left = (resized.shape[0] - height) // 2, (resized.shape[1] - width) // 2
        pixels = resized[top:top + height, left:left + width]
    frame = torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1).float() / 255.0
    return frame * 2 - 1


def prepare_clip(frames: Any, width: int = 0, height: int = 0, spatial_factor: int = 16,
                 temporal_factor: int = 4) -> torch.Tensor:
    """Frames of one clip ``[N, H, W, 3]`` (float in [0, 1] or uint8) → ``[1, 3, T, height, width]`` in [-1, 1] for
    the tokenizer: each frame prepared as a first frame (:func:`prepare_first_frame`), ``T`` = ``N`` floored to
    ``1 + 4k``. ``width`` / ``height`` 0: the frames' own size, floored to the tokenizer grid. Refused (ValueError):
    sizes that are not whole numbers >= 0, sizes beyond the largest trained bucket, more than 81 frames."""
    if not hasattr(frames, "shape") or len(frames.shape) != 4 or frames.shape[-1] not in (3, 4) or frames.shape[0] < 1:
        shape = tuple(frames.shape) if hasattr(frames, "shape") else type(frames).__name__
        raise ValueError(f"expected frames [N, H, W, 3], got shape {shape}.")
    n, h, w = (int(v) for v in frames.shape[:3])
    if h < 1 or w < 1:
        raise ValueError(f"the frames are {w}x{h} pixels; pass pictures with pixels in them.")
    sf = spatial_factor
    for name, value in (("width", width), ("height", height)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) and not (
                isinstance(value, numbers.Real) and math.isfinite(value) and float(value).is_integer()) or value < 0:
            raise ValueError(f"{name} {value!r} must be a whole number of pixels >= 0 (0: the picture's own {name}, "
                             f"floored to a multiple of {sf}).")
    width = int(width) or max(sf, w // sf * sf)
    height = int(height) or max(sf, h // sf * sf)
    if width % sf or height % sf:
        raise ValueError(f"width/height must be multiples of {sf}, got {width}x{height}.")
    cells = (width // sf) * (height // sf)
    if cells > MAX_LATENT_CELLS or max(width, height) // sf > MAX_LATENT_SIDE:
        side = math.isqrt(MAX_LATENT_CELLS) * sf
        raise ValueError(f"{width}x{height} is {cells} latent cells per frame, beyond the largest trained bucket "
                         f"({MAX_LATENT_CELLS} cells, about {side}x{side}; each side at most "
                         f"{MAX_LATENT_SIDE * sf} px); set a smaller width/height.")
    count = snap_frames(n, temporal_factor)
    if count > MAX_FRAMES:
        raise ValueError(f"{n} frames: at most {MAX_FRAMES} (the longest clip the models were trained on); pass "
                         "fewer frames.")
    clip = torch.stack([prepare_first_frame(frames[i], width, height) for i in range(count)], dim=1)
    return clip.unsqueeze(0)


__all__ = ["MAX_BUCKET_CELLS", "MAX_GUIDANCE", "MAX_LATENT_CELLS", "MAX_LATENT_SIDE", "MAX_STEPS", "SEED_LIMIT",
           "SizePlan", "SizeSpec", "check_seed", "default_size",
           "frames_for_duration", "model_rule", "negative_prompt", "plan_size", "prepare_clip", "prepare_first_frame",
           "resolve_settings", "snap_frames"]
