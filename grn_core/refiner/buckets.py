"""Resolution buckets, aspect templates and latent grids, as the official T2I/T2V pipeline derives them.

A request (bucket such as ``"0.41M"``, aspect ``h / w``, duration) is mapped to one of 15 aspect templates, then to a
latent grid ``(ph, pw)`` of the 16x-downsampling tokenizer and a number of latent frames:

    template   = the truncated template nearest to h/w       (int(r * 1000) / 1000, e.g. 9:16 -> 0.562)
    pw_f       = sqrt(side^2 / r)                             (r: the template's exact ratio, side: bucket's 1:1 side)
    pw, ph     = round(pw_f), round(pw_f * r)                 (half to even, both from the unrounded pw_f)
    frames F   = min(81, int(duration * 16 + 1)),  latent frames = (F - 1) // 4 + 1

The RoPE of the refiner uses the truncated template, not the grid's own h/w (see ``rope.normalized_extent``).
"""

from __future__ import annotations

import math
from typing import NamedTuple

__all__ = [
    "ASPECT_RATIOS",
    "ASPECT_TEMPLATES",
    "BUCKET_SIDES",
    "FPS",
    "MAX_FRAMES",
    "VAE_STRIDE",
    "AspectTemplate",
    "aspect_template",
    "latent_frames",
    "latent_grid",
    "nearest_aspect",
    "pixel_size",
    "truncate_template",
    "video_num_frames",
]

# Latent side length at 1:1 of each bucket (the name is the approximate pixel count).
BUCKET_SIDES: dict[str, int] = {"0.06M": 16, "0.25M": 32, "0.41M": 40, "0.92M": 60, "1M": 64, "2M": 90}
VAE_STRIDE = 16  # pixels per latent cell
FPS = 16  # frame rate the video models were trained at
MAX_FRAMES = 81  # longest video (5 s at 16 fps) the released models were trained on

# The 15 trained aspect ratios h/w, from 3:1 (tall) to 1:3 (wide), in the official order (ties resolve to the first).
ASPECT_RATIOS: tuple[float, ...] = (
    3 / 1, 5 / 2, 2 / 1, 16 / 9, 3 / 2, 4 / 3, 116 / 100, 1.0, 100 / 116, 3 / 4, 2 / 3, 9 / 16, 1 / 2, 2 / 5, 1 / 3,
)


def truncate_template(h_over_w: float) -> float:
    """An aspect ratio as the official code keys its templates: truncated (not rounded) to 3 decimals."""
    return int(h_over_w * 1000) / 1000


ASPECT_TEMPLATES: tuple[float, ...] = tuple(truncate_template(r) for r in ASPECT_RATIOS)


class AspectTemplate(NamedTuple):
    ratio: float  # exact h/w of the template (sizes the latent grid)
    template: float  # the same, truncated to 3 decimals (keys the tables, positions the RoPE)


def _check_aspect(h_over_w: float) -> float:
    try:
        value = float(h_over_w)
    except (TypeError, ValueError):
        raise ValueError(f"aspect ratio {h_over_w!r} is not a number; pass height / width, e.g. 9/16.") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"aspect ratio {h_over_w!r} must be a positive finite height / width, e.g. 9/16.")
    return value


def nearest_aspect(h_over_w: float) -> AspectTemplate:
    """The template whose truncated value is closest to ``h_over_w`` (official: argmin over the truncated keys)."""
    value = _check_aspect(h_over_w)
    best = min(range(len(ASPECT_TEMPLATES)), key=lambda i: abs(ASPECT_TEMPLATES[i] - value))
    return AspectTemplate(ASPECT_RATIOS[best], ASPECT_TEMPLATES[best])


def aspect_template(h_over_w: float) -> float:
    """Truncated template value for ``h_over_w`` (e.g. 0.5625 -> 0.562, 4/3 -> 1.333)."""
    return nearest_aspect(h_over_w).template


def _bucket_side(bucket: str) -> int:
    if bucket not in BUCKET_SIDES:
        raise ValueError(f"unknown resolution bucket {bucket!r}; use one of {list(BUCKET_SIDES)}.")
    return BUCKET_SIDES[bucket]


def latent_grid(bucket: str, h_over_w: float) -> tuple[int, int]:
    """Latent ``(ph, pw)`` of a bucket at the template nearest to ``h_over_w`` (e.g. ``"1M"``, 2.0 -> (91, 45))."""
    side = _bucket_side(bucket)
    ratio = nearest_aspect(h_over_w).ratio
    pw_f = math.sqrt(side * side / ratio)
    # Python's round() on floats is round-half-to-even, like numpy's np.round used by the official table.
    return int(round(pw_f * ratio)), int(round(pw_f))


def pixel_size(bucket: str, h_over_w: float) -> tuple[int, int]:
    """Output ``(height, width)`` in pixels of a bucket / aspect (latent grid times the tokenizer stride 16)."""
    ph, pw = latent_grid(bucket, h_over_w)
    return ph * VAE_STRIDE, pw * VAE_STRIDE


def video_num_frames(duration_s: float, fps: int = FPS, max_frames: int = MAX_FRAMES) -> int:
    """Pixel frames of a clip of ``duration_s`` seconds: ``min(max_frames, int(duration * fps + 1))`` (0 s -> image)."""
    if not math.isfinite(float(duration_s)) or duration_s < 0:
        raise ValueError(f"duration {duration_s!r} s must be a finite number >= 0 (0 makes an image).")
    return min(int(max_frames), int(duration_s * fps + 1))


def latent_frames(num_frames: int) -> int:
    """Latent frames of ``num_frames`` pixel frames for the causal tokenizer: ``(F - 1) // 4 + 1`` (1 -> 1, 33 -> 9)."""
    if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1:
        raise ValueError(f"num_frames={num_frames!r}: must be an integer >= 1 (1 for an image, 4k+1 for video).")
    return (num_frames - 1) // 4 + 1
