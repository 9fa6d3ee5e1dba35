"""A picture of real tiny-model outputs for the README: one row per prompt, the clip's frames left to right.

    python benchmarks/frame_strip.py --out docs/tiny_frames.png
    python benchmarks/frame_strip.py --model-dir /tmp/run --seed 3 --out /tmp/strip.png

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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=TINY_DIR)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scale", type=int, default=4)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    image = frame_strip(args.model_dir, PROMPTS, args.seed, args.scale)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    image.save(args.out, optimize=True)
    print(f"wrote {args.out} ({image.width}x{image.height})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
