"""Editing benchmark of the built-in tiny GRN: refine (strength), inpaint (half mask) and extend, measured.

    python benchmarks/edit_eval.py                         # 36 clips, fixed 50 steps, 1 thread
    python benchmarks/edit_eval.py --clips 6 --json /tmp/edit.json

For each of ``--clips`` captions of the shapes grammar (6 colours x 3 shapes x 2 directions, the directions
alternating left/right and up/down so all four appear; clip ``i`` uses seed ``--seed + i``), one clip per call
(batch 1) with the T2V preset (fixed 50 steps, no adaptive rule), through ``grn_core.pipeline.generate_tokens``.
Every edit samples with seed ``seed + 100000``: with the source's own seed a strength-1 pass would remake the source.

1. source: the caption generated, decoded, and re-encoded with ``grn_core.editing.encode_source`` (the model keeps
   the bits of content it could have made, so an edit is measured against bits the tokenizer reproduces);
2. strength 0 → must return the source bits exactly (asserted);
3. inpaint: a half mask (left half black = keep, right half white = regenerate) at strength 1 → the kept cells' bits
   must equal the source's at every latent frame (reported as the fraction of kept-cell bits equal; asserted 1.0);
4. refine at strengths 0.25 / 0.5 / 1.0 (no mask) → fraction of bits that differ from the source;
5. extend: the source's last decoded frame continued with the same caption (``grn_core.editing.extend_source``, as
   ``generate --extend``). Measured: the distance in pixels between the shape's centroid in the source's last frame
   and in the new clip's first frame (centroids from ``grn_core.data.judge``: the clip's foreground after
   background removal), and the judge's colour / shape / direction verdicts of the new clip against the caption.

Prints a markdown table and the JSON report (``--json PATH`` also writes it). ``--write-md`` replaces this
benchmark's section in a file.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from grn_core.data.judge import judge  # noqa: E402
from grn_core.data.shapes import COLORS, DIRECTIONS, SHAPES, make_caption  # noqa: E402
from grn_core.editing import encode_source, extend_source, mask_to_cells  # noqa: E402
from grn_core.models import TINY_DIR  # noqa: E402
from grn_core.pipeline import (GenerationRequest, GRNModel, decode_tokens, encode_prompt,  # noqa: E402
                               generate_tokens, latent_grid_for)
from grn_core.request import prepare_first_frame  # noqa: E402
from grn_core.sampler import SamplerSettings  # noqa: E402
from grn_core.train.evaluate import load_model_dir  # noqa: E402

STRENGTHS = (0.25, 0.5, 1.0)
ATTRIBUTES = ("color", "shape", "direction", "all")
SECTION_START = "<!-- tiny-edit-benchmark:start -->"
SECTION_END = "<!-- tiny-edit-benchmark:end -->"


def edit_captions(n: int) -> list[str]:
    """``n`` captions: colour x shape pairs, each with two directions (left/right, then up/down, alternating)."""
    out = []
    pairs = [(c, s) for c in COLORS for s in SHAPES]
    k = 0
    while len(out) < n:
        c, s = pairs[k % len(pairs)]
        base = 2 * (k + k // len(pairs))  # the next round over the pairs swaps left/right with up/down
        for j in range(2):
            out.append(make_caption(c, s, DIRECTIONS[(base + j) % len(DIRECTIONS)]))
        k += 1
    return out[:n]


def half_mask(height: int, width: int) -> np.ndarray:
    """Left half black (keep), right half white (regenerate), ``[H, W]`` float in [0, 1]."""
    mask = np.ones((height, width), dtype=np.float32)
    mask[:, : width // 2] = 0.0
    return mask


class Editor:
    """The tiny model at its default size with the T2V preset (fixed steps): generate / refine / inpaint / extend."""

    def __init__(self, model: GRNModel, steps: int | None = None):
        self.model = model
        size = model.defaults or {"width": 32, "height": 32, "frames": 9}
        self.width, self.height, self.frames = int(size["width"]), int(size["height"]), int(size["frames"])
        settings = SamplerSettings.for_task("t2v")
        if steps is not None:
            settings = dataclasses.replace(settings, steps=steps)
        self.settings = settings
        self.grid = latent_grid_for(model, self.width, self.height, self.frames)

    def bits(self, caption: str, seed: int, init_bits=None, fixed=None, strength: float = 1.0) -> torch.Tensor:
        features = encode_prompt(self.model, None, caption, task="t2v")
        request = GenerationRequest(self.width, self.height, self.frames, seed=seed, settings=self.settings,
                                    init_bits=init_bits, fixed=fixed, strength=strength)
        return generate_tokens(self.model, features, request, preview=False).bits

    def decode(self, bits: torch.Tensor) -> torch.Tensor:
        """Bits ``[1, D, t, h, w]`` → frames ``[T, H, W, 3]`` in [0, 1]."""
        with torch.inference_mode():
            return decode_tokens(self.model, bits)[0].float().clamp(0, 1)

    def source(self, caption: str, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A generated clip, decoded and re-encoded → (source bits, source frames [T, H, W, 3])."""
        frames = self.decode(self.bits(caption, seed))
        src = encode_source(self.model, frames, self.width, self.height, self.frames)
        return src, self.decode(src)

    def half_cells(self) -> torch.Tensor:
        mask = half_mask(self.height, self.width)
        return mask_to_cells(mask, self.model.spatial_factor, self.model.temporal_factor,
                             size=(self.frames, self.height, self.width), strength=1.0)

    def extend(self, caption: str, seed: int, frames: torch.Tensor) -> torch.Tensor:
        """Continue decoded ``frames`` [T, H, W, 3] from their last frame (as ``generate --extend``) → new bits."""
        first = prepare_first_frame(frames[-1], self.width, self.height)
        init, fixed = extend_source(self.model, first, self.grid)
        return self.bits(caption, seed, init_bits=init, fixed=fixed, strength=1.0)


def centroids(frames: torch.Tensor) -> np.ndarray:
    """Per-frame foreground centroid (x, y) in pixels of frames [T, H, W, 3] in [0, 1] (NaN where no shape)."""
    return judge(frames.permute(3, 0, 1, 2) * 2 - 1).positions


def frame_centroid(frame: torch.Tensor) -> np.ndarray:
    """The centroid of one frame [H, W, 3] judged on its own (NaN when no shape)."""
    return centroids(frame[None])[0]


EDIT_SEED_OFFSET = 100_000
"""Edits use seed ``seed + EDIT_SEED_OFFSET``: with the source's own seed, strength 1 would remake the source."""


def measure_clip(editor: Editor, caption: str, seed: int) -> dict:
    src, src_frames = editor.source(caption, seed)
    source_judge = judge(src_frames.permute(3, 0, 1, 2) * 2 - 1).matches(caption)
    rounds = editor.model.rounds
    edit_seed = seed + EDIT_SEED_OFFSET
    # 1. strength 0 returns the source bits exactly.
    same = editor.bits(caption, seed, init_bits=src, strength=0.0)
    assert torch.equal(same.to(src.dtype), src), f"{caption!r} seed {seed}: strength 0 changed the source bits"
    # 2. half mask at strength 1: the kept cells keep their bits.
    kept = editor.half_cells()  # [t, h, w]
    inpaint = editor.bits(caption, edit_seed, init_bits=src, fixed=kept, strength=1.0)
    sel = kept[None, None].expand_as(src)
    kept_equal = float((inpaint[sel] == src[sel]).float().mean())
    free_changed = float((inpaint[~sel] != src[~sel]).float().mean())
    assert kept_equal == 1.0, f"{caption!r} seed {seed}: the half mask's kept cells changed ({kept_equal})"
    # 3. refine: changed fraction per strength.
    changed, changed_round1, pixel_change = {}, {}, {}
    for s in STRENGTHS:
        out = editor.bits(caption, edit_seed, init_bits=src, strength=s)
        diff = (out != src).float()
        changed[str(s)] = float(diff.mean())
        changed_round1[str(s)] = float(diff[:, : diff.shape[1] // rounds].mean())  # the coarsest HBQ round
        pixel_change[str(s)] = float((editor.decode(out) - src_frames).abs().mean())
    # 4. extend with the same caption.
    new_frames = editor.decode(editor.extend(caption, edit_seed, src_frames))
    last = frame_centroid(src_frames[-1])
    first = frame_centroid(new_frames[0])
    distance = float(np.hypot(*(last - first)))
    verdict = judge(new_frames.permute(3, 0, 1, 2) * 2 - 1).matches(caption)
    return {"caption": caption, "seed": seed, "strength0_exact": True, "kept_equal": kept_equal,
            "free_changed": free_changed, "changed": changed, "changed_round1": changed_round1,
            "pixel_change": pixel_change, "extend_distance": distance, "extend_judge": verdict,
            "source_judge": source_judge}


def run(model_dir: Path, clips: int, seed: int, steps: int | None = None, log=None) -> dict:
    editor = Editor(load_model_dir(model_dir), steps)
    editor.bits("a red circle moving right", 0)  # warm-up, not counted
    rows = []
    started = time.perf_counter()
    for i, caption in enumerate(edit_captions(clips)):
        t0 = time.perf_counter()
        rows.append(measure_clip(editor, caption, seed + i))
        if log:
            log(f"[{i + 1}/{clips}] {caption} seed {seed + i}: {time.perf_counter() - t0:.2f} s")
    elapsed = time.perf_counter() - started
    return summarize(rows, editor, elapsed)


def summarize(rows: list[dict], editor: Editor, elapsed: float) -> dict:
    n = len(rows)
    dist = np.array([r["extend_distance"] for r in rows])
    finite = dist[np.isfinite(dist)]
    return {
        "clips": n, "steps": editor.settings.steps,
        "size": {"width": editor.width, "height": editor.height, "frames": editor.frames},
        "strength0_exact": all(r["strength0_exact"] for r in rows),
        "kept_bits_equal": min(r["kept_equal"] for r in rows),
        "free_bits_changed": round(float(np.mean([r["free_changed"] for r in rows])), 4),
        "changed_by_strength": {s: round(float(np.mean([r["changed"][s] for r in rows])), 4)
                                for s in map(str, STRENGTHS)},
        "changed_round1_by_strength": {s: round(float(np.mean([r["changed_round1"][s] for r in rows])), 4)
                                       for s in map(str, STRENGTHS)},
        "pixel_change_by_strength": {s: round(float(np.mean([r["pixel_change"][s] for r in rows])), 4)
                                     for s in map(str, STRENGTHS)},
        "source_accuracy": {a: round(sum(r["source_judge"][a] for r in rows) / n, 4) for a in ATTRIBUTES},
        "extend": {
            "centroid_distance_mean": round(float(finite.mean()), 3) if finite.size else None,
            "centroid_distance_max": round(float(finite.max()), 3) if finite.size else None,
            "centroid_missing": int(n - finite.size),
            "accuracy": {a: round(sum(r["extend_judge"][a] for r in rows) / n, 4) for a in ATTRIBUTES},
        },
        "seconds": round(elapsed, 1), "seconds_per_clip": round(elapsed / n, 3),
        "per_clip": rows,
    }


def markdown_table(report: dict) -> str:
    e = report["extend"]
    acc = e["accuracy"]
    ch = report["changed_by_strength"]
    src = report["source_accuracy"]
    lines = [
        "| measure | result |",
        "|---|---|",
        f"| strength 0 returns the source bits exactly | {'yes' if report['strength0_exact'] else 'NO'} "
        f"({report['clips']} / {report['clips']} clips) |",
        f"| half mask, strength 1: kept-cell bits equal to the source (min over clips) | "
        f"{report['kept_bits_equal']:.4f} |",
        f"| half mask, strength 1: regenerated-cell bits changed (mean) | {100 * report['free_bits_changed']:.1f} % |",
        *(f"| refine, strength {s}: bits changed, all rounds / round 1 (mean); mean abs pixel change | "
          f"{100 * ch[s]:.1f} % / {100 * report['changed_round1_by_strength'][s]:.1f} %; "
          f"{report['pixel_change_by_strength'][s]:.4f} |" for s in ch),
        f"| extend: centroid distance, source last frame → new first frame (mean / max) | "
        f"{_px(e['centroid_distance_mean'])} / {_px(e['centroid_distance_max'])}"
        + (f" ({e['centroid_missing']} without a shape)" if e["centroid_missing"] else "") + " |",
        f"| extend: judged right — colour / shape / direction / all three | {100 * acc['color']:.1f} % / "
        f"{100 * acc['shape']:.1f} % / {100 * acc['direction']:.1f} % / {100 * acc['all']:.1f} % |",
        f"| baseline: the source clips judged right — colour / shape / direction / all three | "
        f"{100 * src['color']:.1f} % / {100 * src['shape']:.1f} % / {100 * src['direction']:.1f} % / "
        f"{100 * src['all']:.1f} % |",
    ]
    return "\n".join(lines) + "\n"


def _px(value) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.2f} px"


def markdown_section(result: dict) -> str:
    r = result["report"]
    return "\n".join([
        SECTION_START,
        "## Editing on the tiny model (`benchmarks/edit_eval.py`)",
        "",
        f"- date: {result['date']}",
        f"- machine: {result['machine']}",
        f"- command: `{result['command']}`",
        f"- {r['clips']} clips ({r['size']['frames']} frames at {r['size']['width']}x{r['size']['height']}), "
        f"fixed {r['steps']} steps, batch 1; {r['seconds']} s in all ({r['seconds_per_clip']} s per clip: "
        "source, strength 0, half-mask inpaint, three refines, extend, with decodes and judging)",
        "",
        markdown_table(r).rstrip("\n"),
        SECTION_END,
    ]) + "\n"


def write_markdown(path: Path, result: dict) -> None:
    text = path.read_text() if path.is_file() else ""
    section = markdown_section(result)
    pattern = re.compile(re.escape(SECTION_START) + ".*?" + re.escape(SECTION_END) + "\n?", re.S)
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else (text + ("\n" if text else "") + section)
    path.write_text(text)


def main(argv: list[str] | None = None) -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from shapes_eval import _machine  # the shapes benchmark's machine line

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, default=TINY_DIR)
    parser.add_argument("--clips", type=int, default=36)
    parser.add_argument("--seed", type=int, default=0, help="clip i uses seed SEED + i")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None, help="also write the JSON report here")
    parser.add_argument("--write-md", type=Path, default=None, help="replace this benchmark's section in a file")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    log = None if args.quiet else (lambda m: print(m, file=sys.stderr, flush=True))
    report = run(args.model_dir, args.clips, args.seed, log=log)
    result = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": _machine(),
        "command": "python " + " ".join(["benchmarks/edit_eval.py", *(sys.argv[1:] if argv is None else argv)]),
        "report": report,
    }
    print(markdown_table(report))
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    if args.write_md:
        write_markdown(args.write_md, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
