"""Kept-fraction schedules of the GRN refinement sampler.

Notation (GRN spec §4, §5): step ``i`` (0-based) feeds the model the map ``x_i`` together with the
kept fraction ``r_i`` (``r_0 = 0``) and, after sampling, keeps every new bit with probability
``r_{i+1}``. ``Tmax`` is the schedule length (``SamplerSettings.steps``).

Text/image/video models ("bit" family, official ``GRN.autoregressive_infer``)::

    progress_{i+1} = min(1, (i+1) / (Tmax-1))
    r_{i+1}        = cap * (1 - cos(pi/2 * shift(progress_{i+1})))
    shift(p)       = 1 - a(1-p) / (1 + (a-1)(1-p))           (identity for a = 1)

The progress reaches 1 one step before the end, so the last step of the official 50-step run sees an
input kept at the cap. ``cap`` is 0.95 for the "joint" checkpoints and 0.999 for the "prefix" ones.

Class-to-image ("GRN_ind", official ``Denoiser.generate``) uses the linear fraction ``t_{i+1} = (i+1)/T``.

Adaptive ("complexity-aware") steps: after ``W`` warm-up steps of the full-length schedule the sampler
decides ``D`` remaining steps (the deciding step ``i = W`` is the first of them), total ``W + D``:

* bit family: progress continues linearly from ``p_W = W/(Tmax-1)`` to 1 over ``D-1`` steps and the
  last step again runs at the cap::

      progress_{i+1} = min(1, p_W + (1 - p_W) * (i+1-W) / (D-1))      (D >= 2; D = 1 -> 1)

  With ``D = Tmax - W`` this is exactly the official fixed schedule.
* C2I (official rule): ``t_{i+1} = W/T + (1 - W/T) * (i+1-W) / D``, reaching 1 at the last step;
  ``D = T - W`` is exactly the linear schedule.
"""

from __future__ import annotations

import math
from typing import Optional

from ..presets import LAYOUT_CAPS


def layout_cap(layout: str) -> float:
    """The largest kept fraction the official loop of a sequence layout reaches."""
    try:
        return LAYOUT_CAPS[layout]
    except KeyError:
        raise ValueError(
            f"unknown refiner layout {layout!r}; expected one of {sorted(LAYOUT_CAPS)} "
            "(set RefinerConfig.layout, or pass SamplerSettings(cap=...))"
        ) from None


def shift_progress(p: float, shift: float) -> float:
    """Official ``shift_pt``: moves a signal ratio ``p`` in [0, 1] lower for ``shift > 1``.

    The official helper reads ``shift > 1000`` as ``shift - 1000``; we take the value as given.
    """
    noise = 1.0 - p
    noise = shift * noise / (1.0 + (shift - 1.0) * noise)
    return 1.0 - noise


def refine_fraction(progress: float, cap: float, shift: float = 1.0) -> float:
    """Kept fraction ``cap * (1 - cos(pi/2 * shift(progress)))`` for a progress in [0, 1]."""
    return cap * (1.0 - math.cos(math.pi / 2.0 * shift_progress(progress, shift)))


def bit_progress(i: int, tmax: int, warmup: Optional[int] = None, remaining: Optional[int] = None) -> float:
    """Schedule progress after step ``i`` (feeds ``r_{i+1}``) of the bit-family loop.

    ``remaining`` (``D``) is ``None`` for the fixed schedule or before the adaptive decision.
    """
    if remaining is None or warmup is None or i < warmup:
        return 1.0 if tmax <= 1 else min(1.0, (i + 1) / (tmax - 1))
    p_w = 1.0 if tmax <= 1 else min(1.0, warmup / (tmax - 1))
    if i + 1 - warmup >= remaining - 1:
        return 1.0
    return min(1.0, p_w + (1.0 - p_w) * (i + 1 - warmup) / (remaining - 1))


def bit_keep_fraction(i: int, tmax: int, cap: float, shift: float = 1.0,
                      warmup: Optional[int] = None, remaining: Optional[int] = None) -> float:
    """``r_{i+1}`` of the bit-family loop (see module docstring)."""
    return refine_fraction(bit_progress(i, tmax, warmup, remaining), cap, shift)


def c2i_keep_fraction(i: int, tmax: int, warmup: Optional[int] = None, remaining: Optional[int] = None) -> float:
    """``t_{i+1}`` of the class-to-image loop: linear, or the official complexity-aware continuation."""
    if remaining is None or warmup is None or i < warmup:
        return min(1.0, (i + 1) / tmax)
    if i + 1 - warmup >= remaining:
        return 1.0
    start = warmup / tmax
    return min(1.0, start + (1.0 - start) * (i + 1 - warmup) / remaining)


def decide_remaining_steps(entropy: float, k: float, b: float, warmup: int, min_steps: int, max_steps: int) -> int:
    """Complexity-aware step count ``D = round(clip(k*H + b, min_steps - W, max_steps - W))``.

    ``round`` is half-to-even, as ``torch.round`` in the official code.
    """
    lo, hi = min_steps - warmup, max_steps - warmup
    value = min(max(k * entropy + b, lo), hi)
    return int(round(value))


def adaptive_temperature_factor(remaining: int) -> float:
    """Official C2I temperature factor ``clip((D - 10)/40 + 0.5, 0.5, 1)``."""
    return min(max((remaining - 10) / 40.0 + 0.5, 0.5), 1.0)
