"""The per-step "grn.refine" event that feeds the canvas widget on the Refine Sampler node.

One JSON message per sampler step, at most ``MAX_EVENT_BYTES`` once serialised::

    {"v": 1, "node": "12", "prompt_id": "...", "step": 7, "total": 31, "planned": 50,
     "entropy": 0.41, "kept": 0.22, "guided": true, "decided": null,
     "counts": {"fill": 120, "keep": 300, "erase": 12, "blank": 600},
     "colours": [[220, 120, 117], [88, 160, 227], [240, 180, 40], [128, 138, 151]],
     "size": [848, 480, 33],
     "map": {"t": 9, "h": 30, "w": 53, "bits": 2, "data": "<base64>"},
     "fixed_colour": [150, 110, 210],
     "fixed": {"t": 9, "h": 30, "w": 53, "bits": 1, "data": "<base64>"} | null,
     "preview": {"t": 9, "cols": 3, "tile": [53, 30], "mime": "image/jpeg", "data": "<base64>"} | null}

``map.data`` packs the token-state codes (0 fill, 1 keep, 2 erase, 3 blank; ``grn_core.sampler.states``) four to a
byte, first code in the lowest two bits, frames then rows then columns. ``preview`` is one image sheet holding every
latent frame as a tile, ``cols`` tiles per row: PNG while the sheet is small (a few latent cells per frame, where
JPEG's 8×8 blocks and halved colour resolution would blend neighbouring cells and frames), JPEG above that. When the
message would be too big the preview shrinks, then goes.

``fixed`` (edits: inpainting with a mask, extending a clip) marks the latent cells clamped to the source, one bit per
cell (1 = fixed), eight to a byte, first cell in the lowest bit, on the same (thinned) grid as ``map``; the widget
paints them in ``fixed_colour`` over their state (the sampler reports them as "keep"). It comes with the run's first
event, and with every event while the map is small (``FIXED_EVERY_EVENT_CELLS``); an event without it keeps the
last one of the same prompt. It is left out (and the cells show as "keep") only if it would break the size cap.
"""

from __future__ import annotations

import base64
import io
import json
import math
from typing import Any, Optional

import torch

from grn_core.sampler.states import FIXED_COLOUR, STATE_COLOURS, STATE_NAMES

EVENT_NAME = "grn.refine"
EVENT_VERSION = 1
MAX_EVENT_BYTES = 64 * 1024
LOSSLESS_SHEET_PIXELS = 64 * 64  # sheets up to this size go as PNG (a few KB at most)
MAX_MAP_SIDE = 64
MAX_MAP_FRAMES = 32
FIXED_EVERY_EVENT_CELLS = 8 * 4096  # kept-cell maps up to this many cells (4 KB packed) go with every event


def pack_bit_map(cells: torch.Tensor) -> str:
    """bool ``[t, h, w]`` -> base64 of one bit per cell, eight per byte (lowest bit first)."""
    flat = cells.reshape(-1).to(torch.bool).to(torch.uint8).cpu()
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, torch.zeros(pad, dtype=torch.uint8)])
    octets = flat.view(-1, 8).to(torch.int32)
    packed = sum(octets[:, i] << i for i in range(8))
    return base64.b64encode(packed.to(torch.uint8).numpy().tobytes()).decode("ascii")


def unpack_bit_map(data: str, shape: tuple[int, int, int]) -> torch.Tensor:
    """Inverse of :func:`pack_bit_map` (the widget does the same in JavaScript)."""
    raw = torch.frombuffer(bytearray(base64.b64decode(data)), dtype=torch.uint8).to(torch.int32)
    bits = torch.stack([(raw >> s) & 1 for s in range(8)], dim=1).reshape(-1)
    return bits[:math.prod(shape)].bool().reshape(shape)


def pack_state_map(states: torch.Tensor) -> str:
    """uint8 codes 0..3 ``[t, h, w]`` -> base64 of 2-bit codes, four per byte (lowest bits first)."""
    flat = states.reshape(-1).to(torch.uint8).cpu()
    if flat.numel() and int(flat.max()) > 3:
        raise ValueError(f"state codes must be 0..3, found {int(flat.max())}")
    pad = (-flat.numel()) % 4
    if pad:
        flat = torch.cat([flat, torch.zeros(pad, dtype=torch.uint8)])
    quads = flat.view(-1, 4).to(torch.int32)
    packed = quads[:, 0] | (quads[:, 1] << 2) | (quads[:, 2] << 4) | (quads[:, 3] << 6)
    return base64.b64encode(packed.to(torch.uint8).numpy().tobytes()).decode("ascii")


def unpack_state_map(data: str, shape: tuple[int, int, int]) -> torch.Tensor:
    """Inverse of :func:`pack_state_map` (the widget does the same in JavaScript)."""
    raw = torch.frombuffer(bytearray(base64.b64decode(data)), dtype=torch.uint8).to(torch.int32)
    codes = torch.stack([(raw >> s) & 3 for s in (0, 2, 4, 6)], dim=1).reshape(-1)
    n = math.prod(shape)
    return codes[:n].to(torch.uint8).reshape(shape)


def thin_map(states: torch.Tensor, max_side: int = MAX_MAP_SIDE, max_frames: int = MAX_MAP_FRAMES) -> torch.Tensor:
    """Nearest thinning of ``[t, h, w]`` categories so that h, w <= max_side and t <= max_frames."""
    t, h, w = states.shape
    if t > max_frames:
        states = states.index_select(0, torch.arange(max_frames) * t // max_frames)
    if h > max_side:
        states = states.index_select(1, torch.arange(max_side) * h // max_side)
    if w > max_side:
        states = states.index_select(2, torch.arange(max_side) * w // max_side)
    return states


def preview_sheet(rgb: torch.Tensor, max_tile_side: int = 64, quality: int = 75) -> Optional[dict]:
    """RGB preview ``[t, 3, h, w]`` (about [-1, 1]) -> one image sheet of frame tiles, as the event's ``preview``."""
    from PIL import Image

    if rgb is None or rgb.dim() != 4 or rgb.shape[1] != 3:
        return None
    t, _, h, w = rgb.shape
    scale = min(1.0, max_tile_side / max(h, w))
    th, tw = max(1, round(h * scale)), max(1, round(w * scale))
    tiles = rgb.float().cpu()
    if (th, tw) != (h, w):
        tiles = torch.nn.functional.interpolate(tiles, size=(th, tw), mode="area" if scale < 1 else "nearest")
    cols = max(1, math.ceil(math.sqrt(t)))
    rows = math.ceil(t / cols)
    sheet = torch.zeros(3, rows * th, cols * tw)
    for i in range(t):
        r, c = divmod(i, cols)
        sheet[:, r * th:(r + 1) * th, c * tw:(c + 1) * tw] = tiles[i]
    pixels = ((sheet.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    buffer = io.BytesIO()
    lossless = sheet.shape[1] * sheet.shape[2] <= LOSSLESS_SHEET_PIXELS
    if lossless:
        Image.fromarray(pixels).save(buffer, format="PNG")
    else:
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=quality)
    return {"t": t, "cols": cols, "tile": [tw, th], "mime": "image/png" if lossless else "image/jpeg",
            "data": base64.b64encode(buffer.getvalue()).decode("ascii")}


def event_size(payload: dict) -> int:
    return len(json.dumps(payload, separators=(",", ":")).encode("utf-8"))


def build_step_event(
    *,
    node: str,
    prompt_id: Optional[str],
    step: int,
    total: int,
    planned: int,
    entropy: float,
    kept: float,
    guided: bool,
    counts: Any,
    token_states: Optional[torch.Tensor],
    preview_rgb: Optional[torch.Tensor] = None,
    size: Optional[tuple[int, int, int]] = None,
    decided: Optional[int] = None,
    max_bytes: int = MAX_EVENT_BYTES,
    fixed_cells: Optional[torch.Tensor] = None,
) -> dict:
    """One widget event for one sample's step. ``token_states`` uint8 ``[t, h, w]``; ``preview_rgb`` ``[t, 3, h, w]``.

    ``counts`` is a ``StateCounts`` (or a 4-sequence fill/keep/erase/blank). The result is guaranteed to
    serialise to at most ``max_bytes``. ``fixed_cells`` bool ``[t, h, w]``: an edit's kept latent cells.
    """
    if hasattr(counts, "fill"):
        counts = (counts.fill, counts.keep, counts.erase, counts.blank)
    payload: dict = {
        "v": EVENT_VERSION, "node": str(node), "prompt_id": prompt_id, "step": int(step), "total": int(total),
        "planned": int(planned), "entropy": round(float(entropy), 5), "kept": round(float(kept), 5),
        "guided": bool(guided), "decided": None if decided is None else int(decided),
        "counts": {name: int(v) for name, v in zip(STATE_NAMES, counts)},
        "colours": [list(c) for c in STATE_COLOURS],  # the widget paints the states in these (code order)
        "size": list(size) if size is not None else None, "map": None, "preview": None,
        "fixed_colour": list(FIXED_COLOUR), "fixed": None,
    }
    if token_states is not None:
        states = token_states
        if states.dim() == 2:
            states = states.unsqueeze(0)
        states = thin_map(states)
        t, h, w = states.shape
        payload["map"] = {"t": t, "h": h, "w": w, "bits": 2, "data": pack_state_map(states)}
    if fixed_cells is not None:
        cells = fixed_cells.reshape(fixed_cells.shape[-3:]) if fixed_cells.dim() > 3 else fixed_cells
        if cells.dim() == 2:
            cells = cells.unsqueeze(0)
        cells = thin_map(cells.bool())
        t, h, w = cells.shape
        payload["fixed"] = {"t": t, "h": h, "w": w, "bits": 1, "data": pack_bit_map(cells)}
        if event_size(payload) > max_bytes:
            payload["fixed"] = None
    budget = max_bytes - event_size(payload)
    if preview_rgb is not None and budget > 2048:
        side, quality = 64, 75
        while side >= 8:
            sheet = preview_sheet(preview_rgb, max_tile_side=side, quality=quality)
            if sheet is None:
                break
            if len(sheet["data"]) + 200 <= budget:
                payload["preview"] = sheet
                break
            side, quality = side // 2, max(40, quality - 10)
    if event_size(payload) > max_bytes:  # only a pathological map can get here: drop it rather than break the cap
        payload["map"] = None
    return payload
