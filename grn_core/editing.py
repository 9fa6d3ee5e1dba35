"""The token map as a canvas: refine from an image or video, inpaint with a mask, extend a clip.

The sampler (:func:`grn_core.sampler.sample_bits`, module docstring "Editing") takes a source's bits ``init_bits``
on the output's latent grid, a map of ``fixed`` latent cells clamped to them, and a ``start_step``. This module turns
what a user gives into those:

* :func:`strength_to_start` — strength ``s`` in [0, 1] → ``k = round((1 - s) * steps)`` (Python ``round``: halves
  to even). ``s = 1``: ``k = 0``, plain generation (the source only matters where cells are fixed); ``s = 0``:
  ``k = steps``, no network pass, the source's bits come back exactly.
* :func:`mask_to_cells` — a mask (white = regenerate, black = keep) → bool ``[t, h, w]`` of kept latent cells. A
  pixel is white when its value is >= 0.5. A latent cell is kept exactly when EVERY pixel of its block is black: its
  ``spatial_factor x spatial_factor`` pixels in every frame the latent frame covers. Frames are grouped as the causal
  tokenizer groups them: latent frame 0 ↔ frame 0, latent frame j ≥ 1 ↔ frames ``4j-3 .. 4j`` (temporal factor 4).
  A single-frame mask ``[H, W]`` (or ``[1, H, W]``) applies to every latent frame. ``grow`` N then dilates the
  regenerate region by N cells in each latent frame (a cell next to, or diagonal to, a regenerated cell within N
  cells is regenerated too). A mask of another size is resized (nearest) to the output's pixels (and frames) with a
  warning. An all-black mask with strength > 0 is an error (nothing would change); an all-white mask keeps nothing.
* :func:`extend_source` — continue a clip: the new clip's first latent frame is the source's last frame encoded as
  a 1-frame clip (as the causal tokenizer encodes frame 0 on its own), fixed like a kept region; the rest is
  generated.
* :func:`encode_source` — an image or video (frames ``[N, H, W, 3]``) → its bits on an output grid.
"""

from __future__ import annotations

import logging
import math
import numbers
from typing import Any, Callable, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from .request import check_strength, strength_to_start  # noqa: F401  (part of this module's API)

log = logging.getLogger(__name__)

WHITE = 0.5  # a mask pixel at or above this value means "regenerate"


def latent_frames_of(frames: int, temporal_factor: int) -> int:
    return 1 + (int(frames) - 1) // temporal_factor


def mask_to_cells(mask: Any, spatial_factor: int, temporal_factor: int, grow: int = 0,
                  size: Optional[Tuple[int, int, int]] = None, strength: Optional[float] = None,
                  warn: Optional[Callable[[str], None]] = None) -> torch.Tensor:
    """A mask ``[H, W]`` or ``[T, H, W]`` in [0, 1] (white = regenerate) → bool ``[t, h, w]``, True = kept cell.

    ``size``: the output's ``(frames, height, width)`` in pixels; a mask of another size is resized (nearest) to it,
    with a warning through ``warn`` (default: the logger). Without ``size`` the mask's own size is used (it must be a
    multiple of ``spatial_factor``). ``strength`` (when given and > 0) refuses an all-black mask. See the module
    docstring for the rule.
    """
    warn = warn or log.warning
    m = torch.as_tensor(np.asarray(mask) if not isinstance(mask, torch.Tensor) else mask).detach().cpu()
    if m.dtype == torch.uint8:
        m = m.float() / 255.0
    m = m.float()
    if m.dim() == 2:
        m = m.unsqueeze(0)
    if m.dim() != 3 or min(m.shape) < 1:
        raise ValueError(f"the mask has shape {tuple(m.shape)}; expected [H, W] or [T, H, W] (white = regenerate).")
    if not torch.isfinite(m).all():
        raise ValueError("the mask holds NaN or infinite values; expected values in [0, 1] (white = regenerate).")
    if isinstance(grow, bool) or not isinstance(grow, numbers.Integral) or grow < 0:
        raise ValueError(f"grow {grow!r} must be a whole number of latent cells >= 0.")
    sf, tf = int(spatial_factor), int(temporal_factor)
    if size is None:
        frames, height, width = (m.shape[0], m.shape[1], m.shape[2])
        if height % sf or width % sf:
            raise ValueError(f"the mask is {width}x{height}, not a multiple of {sf} pixels; give the output size.")
    else:
        frames, height, width = (int(v) for v in size)
    want_t = 1 if m.shape[0] == 1 else frames
    if tuple(m.shape) != (want_t, height, width):
        warn(f"the mask is {m.shape[2]}x{m.shape[1]}" + (f", {m.shape[0]} frames" if m.shape[0] > 1 else "") +
             f" but the output is {width}x{height}" + (f", {frames} frames" if want_t > 1 else "") +
             "; resizing it (nearest).")
        m = F.interpolate(m[None, None], size=(want_t, height, width), mode="nearest")[0, 0]
    white = m >= WHITE  # [T', H, W]
    t = latent_frames_of(frames, tf)
    h, w = height // sf, width // sf
    white = white[:, :h * sf, :w * sf]
    cell_white = white.view(white.shape[0], h, sf, w, sf).any(4).any(2)  # [T', h, w]
    if cell_white.shape[0] == 1:
        regen = cell_white.expand(t, h, w).clone()
    else:  # latent frame 0 <- frame 0; latent frame j <- frames 4j-3 .. 4j
        groups = [cell_white[:1].any(0)] + [cell_white[tf * j - (tf - 1):tf * j + 1].any(0) for j in range(1, t)]
        regen = torch.stack(groups)
    if grow:
        regen = F.max_pool2d(regen.float()[:, None], kernel_size=2 * grow + 1, stride=1, padding=grow)[:, 0] > 0
    kept = ~regen
    if strength is not None and check_strength(strength) > 0 and bool(kept.all()):
        raise ValueError("the mask is all black (keep everything), so nothing would be regenerated; paint the region "
                         "to regenerate white, drop the mask to refine everything, or use strength 0.")
    return kept


def encode_source(model: Any, frames: Any, width: int, height: int, count: int) -> torch.Tensor:
    """Frames ``[N, H, W, 3]`` (uint8, or floats in [0, 1]) → bits ``[1, rounds*d, t, h, w]`` of an output of
    ``width x height`` and ``count`` frames: each frame cover-resized and centre-cropped as a first frame
    (:func:`grn_core.request.prepare_first_frame`); the first ``count`` frames are used; a single image is repeated
    (a still clip). Fewer frames than ``count`` is an error."""
    from .pipeline import encode_clip
    from .request import prepare_clip

    if not hasattr(frames, "shape") or len(frames.shape) != 4 or frames.shape[0] < 1:
        shape = tuple(frames.shape) if hasattr(frames, "shape") else type(frames).__name__
        raise ValueError(f"the source has shape {shape}; expected frames [N, H, W, 3] with at least one frame.")
    if frames.shape[-1] not in (3, 4):
        raise ValueError(f"the source has {frames.shape[-1]} channels; the tokenizer encodes RGB (3 channels).")
    n = int(frames.shape[0])
    if n == 1 and count > 1:
        frames = np.repeat(np.asarray(frames), count, axis=0) if not isinstance(frames, torch.Tensor) else \
            frames.expand(count, -1, -1, -1)
    elif n < count:
        raise ValueError(f"the source has {n} frames but the output needs {count}; ask for fewer frames "
                         f"(--frames {1 + (n - 1) // 4 * 4}) or give a longer source.")
    clip = prepare_clip(frames[:count], width, height, model.spatial_factor, model.temporal_factor)
    return encode_clip(model, clip)


def extend_source(model: Any, last_frame: torch.Tensor, grid: Tuple[int, int, int]
                  ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Continue a clip from its last frame: ``last_frame`` ``[3, H, W]`` in [-1, 1] at the output's size
    (:func:`grn_core.request.prepare_first_frame`) → ``(init_bits [1, D, t, h, w], fixed [1, 1, t, h, w])`` with the
    frame's bits (encoded as a 1-frame clip) as latent frame 0, fixed; the other latent frames are free (zeros in
    ``init_bits``, regenerated at strength 1)."""
    from .pipeline import encode_clip

    t, h, w = grid
    if t < 2:
        raise ValueError("extending a clip makes a video: ask for at least 5 frames (the kept frame plus new ones).")
    if last_frame.dim() != 3 or last_frame.shape[0] != 3 or tuple(last_frame.shape[1:]) != (
            h * model.spatial_factor, w * model.spatial_factor):
        raise ValueError(f"the last frame has shape {tuple(last_frame.shape)}; expected [3, "
                         f"{h * model.spatial_factor}, {w * model.spatial_factor}] (prepare_first_frame).")
    first = encode_clip(model, last_frame[None, :, None])  # [1, D, 1, h, w]
    init = torch.zeros((1, first.shape[1], t, h, w), dtype=torch.uint8)
    init[:, :, :1] = first.to(torch.uint8)
    fixed = torch.zeros((1, 1, t, h, w), dtype=torch.bool)
    fixed[:, :, 0] = True
    return init, fixed


__all__ = ["check_strength", "encode_source", "extend_source", "mask_to_cells", "strength_to_start"]
