"""3-D rotary position embedding of the GRN_bit refiner, with the official token positions.

Each head's ``head_dim / 2`` channel pairs ``(x[2i], x[2i+1])`` (interleaved) are rotated by an angle
``pos * freq``. The pairs are split into a time, a height and a width part of ``n = (head_dim/2) // 3``, ``n`` and
``head_dim/2 - 2n`` pairs; part ``p`` with ``m`` pairs has frequencies ``1 / base^(j / m)``, ``j = 0..m-1``.

Positions ``(t, h, w)`` of the tokens of one guidance branch:

    text token i        -> (i, 0, 0)                 i < 512
    step token          -> (512, 0, 0)
    visual frame f      -> (600 + f (+1 with a first frame), round(y * uph / ph), round(x * upw / pw))
    I2V first frame     -> (600, ...)                same spatial positions

The spatial positions are resolution-normalised: whatever the bucket, the grid spans the same ``uph x upw`` range,
which depends only on the aspect template (truncated to 3 decimals, as the official tables are keyed).
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "FRAME_POSITION_BASE",
    "STEP_POSITION",
    "TEXT_MAX_TOKENS",
    "apply_rope",
    "normalized_extent",
    "rope_frequencies",
    "rope_pair_split",
    "rope_table",
    "step_positions",
    "text_positions",
    "visual_positions",
]

TEXT_MAX_TOKENS = 512  # text positions 0..511; the step token sits right after the longest text
STEP_POSITION = 512
FRAME_POSITION_BASE = 600  # first visual frame's time position (the official 1-D range reserved for text is 600)
_GRID_EDGE = 1800 // 8  # official max_height of the position tables (225)
_EXTREME_ASPECT = 3.0  # the tallest template; sizes the normalised area 225 x 75


def rope_pair_split(head_dim: int) -> tuple[int, int, int]:
    """Channel pairs given to time / height / width: ``(n, n, head_dim/2 - 2n)`` with ``n = (head_dim/2) // 3``."""
    half = head_dim // 2
    n = half // 3
    return n, n, half - 2 * n


def rope_frequencies(head_dim: int, base: float = 10000.0) -> torch.Tensor:
    """Float64 ``[head_dim/2]`` angular frequencies, time part first, then height, then width."""
    parts = []
    for m in rope_pair_split(head_dim):
        parts.append(1.0 / base ** (torch.arange(m, dtype=torch.float64) / m))
    return torch.cat(parts)


def normalized_extent(template: float) -> tuple[int, int]:
    """Normalised position range ``(uph, upw)`` of an aspect template (e.g. 1.333 -> (149, 112), 0.562 -> (97, 173)).

    ``upw = sqrt(225 * 75 / r)``, ``uph = r * upw``, both truncated to int — the official formula, with ``r`` the
    **truncated** template value (4:3 gives 1.333 and uph 149, not 150).
    """
    if not math.isfinite(template) or not 0 < template <= _EXTREME_ASPECT:
        raise ValueError(f"aspect template {template!r} must lie in (0, 3]; map h/w with buckets.aspect_template().")
    upw = math.sqrt(_GRID_EDGE * (_GRID_EDGE / _EXTREME_ASPECT) / template)
    return int(template * upw), int(upw)


def _spread(n: int, extent: int) -> torch.Tensor:
    # Official: (torch.arange(n) * (extent / n)).round() — a float32 product (torch's default dtype) rounded half to
    # even. Kept in float32 on purpose: in float64 some real grids round the other way (0.06M at 3:1, row 14 of 28:
    # 14 * 225/28 is 112.5 in float32 -> 112, but 112.50000000000001 in float64 -> 113; 12 such bucket/aspect axes).
    return (torch.arange(n, dtype=torch.float32) * (extent / n)).round().to(torch.long)


def visual_positions(frames: int, height: int, width: int, template: float, frame_offset: int = 0) -> torch.Tensor:
    """``[frames*height*width, 3]`` int64 positions of a latent grid, frame-major then row-major (token order).

    ``frame_offset`` is 1 for the generated frames of I2V (the given first frame takes time 600) and 0 otherwise.
    """
    uph, upw = normalized_extent(template)
    t = FRAME_POSITION_BASE + frame_offset + torch.arange(frames, dtype=torch.long)
    h = _spread(height, uph)
    w = _spread(width, upw)
    grid = torch.stack(torch.meshgrid(t, h, w, indexing="ij"), dim=-1)
    return grid.reshape(-1, 3)


def text_positions(length: int) -> torch.Tensor:
    """``[length, 3]`` positions ``(i, 0, 0)`` of text tokens."""
    if length > TEXT_MAX_TOKENS:
        raise ValueError(f"text has {length} tokens; at most {TEXT_MAX_TOKENS} fit (truncate the prompt features).")
    pos = torch.zeros(length, 3, dtype=torch.long)
    pos[:, 0] = torch.arange(length)
    return pos


def step_positions() -> torch.Tensor:
    """``[1, 3]`` position of the step token."""
    return torch.tensor([[STEP_POSITION, 0, 0]], dtype=torch.long)


def rope_table(
    positions: torch.Tensor,
    head_dim: int,
    base: float = 10000.0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Rotations ``exp(i * pos * freq)`` as a complex ``[N, 1, head_dim/2]`` table (broadcasts over heads).

    Angles are formed in float64 (positions reach ~620, so float32 angles would be off by ~1e-4 rad) and stored as
    complex128 for float64 compute, complex64 otherwise.
    """
    n_t, n_h, _ = rope_pair_split(head_dim)
    freqs = rope_frequencies(head_dim, base)
    which = torch.cat([torch.full((n_t,), 0), torch.full((n_h,), 1), torch.full((freqs.numel() - n_t - n_h,), 2)])
    angles = positions.to(torch.float64)[:, which] * freqs  # [N, head_dim/2]
    table = torch.polar(torch.ones_like(angles), angles)
    complex_dtype = torch.complex128 if dtype == torch.float64 else torch.complex64
    return table.to(device=device, dtype=complex_dtype).unsqueeze(1)


def apply_rope(x: torch.Tensor, table: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """Rotate interleaved channel pairs: ``x [N, H, D]`` by ``table [N, 1, D/2]`` (complex) -> ``[N, H, D]``.

    ``(x0, x1) -> (x0 cos - x1 sin, x0 sin + x1 cos)`` written as one complex product (a single pass over x).
    Runs in the table's precision (float32 for half inputs) and returns ``x.dtype``. ``inplace=True`` overwrites
    ``x`` when it already is contiguous in that precision (no new tensor).
    """
    work = torch.float64 if table.dtype == torch.complex128 else torch.float32
    pairs = x.to(work).unflatten(-1, (-1, 2))
    if inplace and pairs.data_ptr() == x.data_ptr() and pairs.is_contiguous():
        torch.view_as_complex(pairs).mul_(table)
        return x
    if not pairs.is_contiguous():
        pairs = pairs.contiguous()
    rotated = torch.view_as_real(torch.view_as_complex(pairs) * table).flatten(-2)
    return rotated.to(x.dtype)
