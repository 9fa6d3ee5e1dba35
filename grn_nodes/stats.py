"""Refine Stats: a chart of a run (token states per step, entropy, kept fraction, the adaptive decision)."""

from __future__ import annotations

from typing import Any

import torch

from grn_core.pipeline import TokenResult
from grn_core.sampler.states import STATE_COLOURS, STATE_NAMES

COLOURS = dict(zip(STATE_NAMES, STATE_COLOURS))


def render_stats(tokens: TokenResult, width: int = 768, height: int = 512) -> torch.Tensor:
    """A chart of the run as IMAGE ``[1, height, width, 3]``: token states per step (stacked), entropy and kept
    fraction curves, and the adaptive decision (step count and the entropy it was read from)."""
    from PIL import Image, ImageDraw

    records = tokens.extras.get("steps", []) if isinstance(tokens, TokenResult) else []
    image = Image.new("RGB", (width, height), (24, 26, 30))
    draw = ImageDraw.Draw(image)
    left, right, top, bottom = 48, width - 16, 40, height - 56
    draw.rectangle([left, top, right, bottom], outline=(90, 90, 100))
    sampling = getattr(tokens, "sampling", None)
    title = f"GRN refinement: {len(records)} steps"
    decision = None
    if sampling is not None and getattr(sampling, "remaining_steps", None):
        if sampling.remaining_steps[0] is not None:
            decision = (sampling.decision_entropy[0], sampling.remaining_steps[0])
            title += f"  |  adaptive: H={decision[0]:.3f} -> {decision[1]} more steps"
    if sampling is not None and getattr(sampling, "interrupted", False):
        title += "  |  interrupted"
    draw.text((left, 12), title, fill=(230, 230, 230))
    if not records:
        draw.text((left + 10, top + 10), "no sampler steps recorded (tokens from GRN Encode Image?)", fill=(200, 200, 200))
        return pil_to_image(image)
    n = len(records)
    col_w = (right - left) / n
    for i, r in enumerate(records):
        total = max(1, r["fill"] + r["keep"] + r["erase"] + r["blank"])
        y = bottom
        for name in ("keep", "fill", "erase", "blank"):
            hgt = (bottom - top) * r[name] / total
            x0, x1 = left + i * col_w, left + (i + 1) * col_w
            draw.rectangle([x0, y - hgt, max(x0, x1 - 1), y], fill=COLOURS[name])
            y -= hgt

    def curve(key: str, colour: tuple[int, int, int]) -> None:
        pts = [(left + (i + 0.5) * col_w, bottom - (bottom - top) * min(1.0, max(0.0, r[key])))
               for i, r in enumerate(records)]
        if len(pts) > 1:
            draw.line(pts, fill=colour, width=3)
        else:
            draw.ellipse([pts[0][0] - 3, pts[0][1] - 3, pts[0][0] + 3, pts[0][1] + 3], fill=colour)

    curve("entropy", (255, 255, 255))
    curve("kept", (40, 40, 40))
    if decision is not None:
        warm = next((i for i, r in enumerate(records) if r["total"] != records[0]["total"]), None)
        if warm is not None:
            x = left + warm * col_w
            draw.line([(x, top), (x, bottom)], fill=(255, 80, 200), width=2)
    legend = [("fill", COLOURS["fill"]), ("keep", COLOURS["keep"]), ("erase", COLOURS["erase"]),
              ("blank", COLOURS["blank"]), ("entropy", (255, 255, 255)), ("kept fraction", (40, 40, 40))]
    x = left
    for name, colour in legend:
        draw.rectangle([x, height - 36, x + 14, height - 22], fill=colour, outline=(200, 200, 200))
        draw.text((x + 20, height - 36), name, fill=(220, 220, 220))
        x += 24 + 8 * len(name) + 16
    draw.text((left, bottom + 4), "step 1", fill=(180, 180, 180))
    draw.text((right - 60, bottom + 4), f"step {n}", fill=(180, 180, 180))
    return pil_to_image(image)


def pil_to_image(image: Any) -> torch.Tensor:
    import numpy as np

    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0).unsqueeze(0)
