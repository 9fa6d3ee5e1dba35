"""A picture of real tiny-model outputs for the README: one row per prompt, the clip's frames left to right.

    python benchmarks/frame_strip.py --out docs/tiny_frames.png
    python benchmarks/frame_strip.py --model-dir /tmp/run --seed 3 --out /tmp/strip.png
    python benchmarks/frame_strip.py --edit --out docs/edit_frames.png      # the editing strip

With ``--edit`` the rows are one clip and its edits (``benchmarks/edit_eval.py``'s procedure, prompt
``--edit-prompt``): the source (generated, decoded and re-encoded); its inpaint with a half mask (left half kept) at
strength 1; a refine at strength 0.5; and an extension continuing it from its last frame with the same prompt.

Each row is ``generate``'s default settings (seed ``--seed``), decoded, each frame scaled up ``--scale`` times with
nearest-neighbour sampling (so the 32x32 pixels stay visible), the prompt and the judge's verdict written beside it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from grn_core.models import TINY_DIR  # noqa: E402
from grn_core.sampler import SamplerSettings  # noqa: E402
from grn_core.train.evaluate import generate_batch, judge_frames, load_model_dir  # noqa: E402

PROMPTS = (
    "a red circle moving right",
    "a blue square moving up",
    "a yellow triangle moving left",
    "a green circle moving down",
    "a magenta square moving right",
    "a white triangle moving up",
)
LABEL_WIDTH = 230


def frame_strip(model_dir: Path, prompts: tuple[str, ...], seed: int, scale: int) -> Image.Image:
    model = load_model_dir(model_dir)
    size = model.defaults or {"width": 32, "height": 32, "frames": 9}
    settings = SamplerSettings.for_task("t2v")
    rows = []
    for prompt in prompts:
        video, _ = generate_batch(model, [prompt], seed, settings, size["frames"], size["height"], size["width"])
        verdict = judge_frames(video[0], prompt)
        frames = (video[0].clamp(0, 1) * 255).round().to(torch.uint8).numpy()  # [T, H, W, 3]
        tiles = [np.kron(f, np.ones((scale, scale, 1), dtype=np.uint8)) for f in frames]
        gap = np.full((tiles[0].shape[0], 4, 3), 40, dtype=np.uint8)
        strip = np.concatenate([x for t in tiles for x in (t, gap)][:-1], axis=1)
        label = Image.new("RGB", (LABEL_WIDTH, strip.shape[0]), (20, 20, 20))
        draw = ImageDraw.Draw(label)
        draw.text((8, strip.shape[0] // 2 - 12), prompt, fill=(230, 230, 230))
        wrong = [a for a in ("color", "shape", "direction") if not verdict[a]]
        draw.text((8, strip.shape[0] // 2 + 4), "judge: all correct" if not wrong else f"judge: wrong {wrong}",
                  fill=(140, 200, 140) if not wrong else (230, 140, 140))
        rows.append(np.concatenate([np.asarray(label), strip], axis=1))
        rows.append(np.full((6, rows[-1].shape[1], 3), 0, dtype=np.uint8))
    return Image.fromarray(np.concatenate(rows[:-1], axis=0))


EDIT_PROMPT = "a magenta square moving right"


def _row(frames: torch.Tensor, scale: int, lines: list[tuple[str, tuple[int, int, int]]]) -> np.ndarray:
    """One labelled row: frames [T, H, W, 3] in [0, 1], each scaled up, with text lines on the left."""
    frames = (frames.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    tiles = [np.kron(f, np.ones((scale, scale, 1), dtype=np.uint8)) for f in frames]
    gap = np.full((tiles[0].shape[0], 4, 3), 40, dtype=np.uint8)
    strip = np.concatenate([x for t in tiles for x in (t, gap)][:-1], axis=1)
    label = Image.new("RGB", (LABEL_WIDTH, strip.shape[0]), (20, 20, 20))
    draw = ImageDraw.Draw(label)
    top = strip.shape[0] // 2 - 8 * len(lines)
    for i, (text, colour) in enumerate(lines):
        draw.text((8, top + 16 * i), text, fill=colour)
    return np.concatenate([np.asarray(label), strip], axis=1)


def edit_strip(model_dir: Path, prompt: str, seed: int, scale: int) -> Image.Image:
    """Rows: a source clip; its half-mask inpaint at strength 1; a refine at strength 0.5; its extension."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from edit_eval import EDIT_SEED_OFFSET, Editor, frame_centroid

    editor = Editor(load_model_dir(model_dir))
    src, src_frames = editor.source(prompt, seed)
    edit_seed = seed + EDIT_SEED_OFFSET
    kept = editor.half_cells()
    inpaint = editor.bits(prompt, edit_seed, init_bits=src, fixed=kept, strength=1.0)
    same = bool(torch.equal(inpaint[kept[None, None].expand_as(src)], src[kept[None, None].expand_as(src)]))
    refine = editor.bits(prompt, edit_seed, init_bits=src, strength=0.5)
    extended = editor.decode(editor.extend(prompt, edit_seed, src_frames))
    moved = float(np.hypot(*(frame_centroid(src_frames[-1]) - frame_centroid(extended[0]))))
    grey, green = (230, 230, 230), (140, 200, 140)
    rows = [
        _row(src_frames, scale, [("source", grey), (prompt, grey), (f"seed {seed}", (160, 160, 160))]),
        _row(editor.decode(inpaint), scale, [("inpaint, strength 1", grey), ("mask: left half kept", grey),
                                             ("kept bits identical" if same else "kept bits CHANGED",
                                              green if same else (230, 140, 140))]),
        _row(editor.decode(refine), scale, [("refine, strength 0.5", grey), (f"bits changed "
                                            f"{100 * float((refine != src).float().mean()):.0f} %", grey)]),
        _row(extended, scale, [("extend (same prompt)", grey), ("frame 1 = source's last", grey),
                               (f"centroid moved {moved:.1f} px", green)]),
    ]
    sep = np.zeros((6, rows[0].shape[1], 3), dtype=np.uint8)
    return Image.fromarray(np.concatenate([x for r in rows for x in (r, sep)][:-1], axis=0))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=TINY_DIR)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scale", type=int, default=4)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--edit", action="store_true", help="the editing strip: source, inpaint, refine, extend")
    parser.add_argument("--edit-prompt", default=EDIT_PROMPT)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.edit:
        image = edit_strip(args.model_dir, args.edit_prompt, args.seed, args.scale)
    else:
        image = frame_strip(args.model_dir, PROMPTS, args.seed, args.scale)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    image.save(args.out, optimize=True)
    print(f"wrote {args.out} ({image.width}x{image.height})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
