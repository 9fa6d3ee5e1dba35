"""Smoke test of benchmarks/edit_eval.py (the editing benchmark) on the built-in tiny model, with few steps."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from grn_core.data import shapes
from grn_core.data.judge import judge
from grn_core.data.shapes import DIRECTION_VECTORS, DIRECTIONS, MARGIN, MIN_TRAVEL, SIZE_RANGE, video_captions
from grn_core.models import TINY_DIR, tiny_available

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import edit_eval  # noqa: E402

pytestmark = pytest.mark.skipif(not tiny_available(), reason="the built-in tiny model is not in this checkout")


def test_captions_spread_and_mask():
    caps = edit_eval.edit_captions(36)
    assert len(caps) == len(set(caps)) == 36
    assert set(caps) <= set(video_captions())
    assert {c.split()[-1] for c in caps} == set(DIRECTIONS)
    mask = edit_eval.half_mask(32, 32)
    assert mask[:, :16].max() == 0.0 and mask[:, 16:].min() == 1.0


def test_rendered_sources_are_training_clips_with_room_to_move():
    """Each rendered source is the clip the training data draws for some uniforms, starts on the side opposite
    its motion, ends at the frame centre, is judged right, and depends only on (caption, seed)."""
    frames, height, width = 9, 32, 32
    for i, caption in enumerate(edit_eval.edit_captions(36)):
        size, centres = edit_eval.source_path(caption, i, frames, height, width)
        assert SIZE_RANGE[0] * 32 <= size <= SIZE_RANGE[1] * 32
        lo, hi = MARGIN + size / 2, 32 - MARGIN - size / 2
        assert centres.shape == (frames, 2) and (centres >= lo - 1e-9).all() and (centres <= hi + 1e-9).all()
        direction = caption.split()[-1]
        vec = np.array(DIRECTION_VECTORS[direction], dtype=np.float64)
        axis = 0 if vec[0] else 1
        start, end = centres[0, axis], centres[-1, axis]
        assert start == pytest.approx(lo if vec.sum() > 0 else hi)  # the side opposite the motion
        assert end == pytest.approx(16.0)  # the frame centre: as much room again to move on
        travel = abs(end - start)
        assert MIN_TRAVEL * 32 <= travel <= hi - lo
        assert np.allclose(centres[:, 1 - axis], centres[0, 1 - axis])  # straight along the motion
        # The training data's own drawing with the matching uniforms gives the same pixels.
        u_travel = (travel - MIN_TRAVEL * 32) / (hi - lo - MIN_TRAVEL * 32)
        u_size = (size / 32 - SIZE_RANGE[0]) / (SIZE_RANGE[1] - SIZE_RANGE[0])
        u_cross = (centres[0, 1 - axis] - lo) / (hi - lo)
        u = np.array([[0.0, u_size, u_travel, 0.0 if vec.sum() > 0 else 1.0, u_cross]])
        train = shapes._build_batch(u, frames, height, width, True, [caption], fixed=True)[0]
        clip = edit_eval.render_source(caption, i, frames, height, width)
        assert clip.shape == (frames, height, width, 3) and 0.0 <= float(clip.min()) and float(clip.max()) <= 1.0
        assert torch.allclose(clip, (train.pixels.permute(1, 2, 3, 0) + 1) / 2, atol=1e-4)
        assert judge(clip.permute(3, 0, 1, 2) * 2 - 1).matches(caption)["all"]
        assert torch.equal(clip, edit_eval.render_source(caption, i, frames, height, width))
    a = edit_eval.render_source("a red circle moving right", 0, frames, height, width)
    b = edit_eval.render_source("a red circle moving right", 1, frames, height, width)
    assert not torch.equal(a, b)  # size / cross position follow the seed
    with pytest.raises(ValueError):
        edit_eval.source_path("a red circle", 0, frames, height, width)


def test_measure_clip_and_report(tmp_path):
    torch.set_num_threads(1)
    editor = edit_eval.Editor(edit_eval.load_model_dir(TINY_DIR), steps=4)
    kept = editor.half_cells()
    assert kept.shape == editor.grid and bool(kept[:, :, :2].all()) and not bool(kept[:, :, 2:].any())
    row = edit_eval.measure_clip(editor, "a red circle moving right", 0)  # asserts strength 0 and the kept half
    assert row["strength0_exact"] and row["kept_equal"] == 1.0
    assert set(row["changed"]) == {"0.25", "0.5", "1.0"}
    assert all(0.0 <= v <= 1.0 for v in row["changed"].values())
    assert np.isfinite(row["extend_distance"])
    assert row["source"] == "rendered" and row["rendered_judge"]["all"]  # the rendered clip itself is right
    assert set(row["extend_judge"]) == set(edit_eval.ATTRIBUTES)
    report = edit_eval.summarize([row], editor, 1.0)
    assert report["steps"] == 4 and report["kept_bits_equal"] == 1.0
    assert report["source"] == "rendered" and report["rendered_accuracy"]["all"] == 1.0
    table = edit_eval.markdown_table(report)
    assert table.startswith("| measure | result |") and "extend: centroid distance" in table
    result = {"date": "d", "machine": "m", "command": "c", "report": report}
    json.dumps(result)
    md = tmp_path / "B.md"
    md.write_text("# head\n")
    edit_eval.write_markdown(md, result)
    edit_eval.write_markdown(md, result)  # replaced, not appended twice
    text = md.read_text()
    assert text.startswith("# head\n") and text.count(edit_eval.SECTION_START) == 1
    assert "rendered" in text and "--source generated" in text
    assert row["extend_read"] is None or row["extend_read"].startswith("a ")
    missed = {**row, "extend_judge": {**row["extend_judge"], "all": False}, "extend_read": "a red square moving right"}
    lines = edit_eval.miss_notes({**report, "per_clip": [missed]})
    assert len(lines) == 1 and '"a red square moving right"' in lines[0] and "seed 0" in lines[0]
    # The earlier measure: sources generated by the model.
    gen = edit_eval.measure_clip(editor, "a red circle moving right", 0, source="generated")
    assert gen["source"] == "generated" and "rendered_judge" not in gen and gen["kept_equal"] == 1.0
    gen_report = edit_eval.summarize([gen], editor, 1.0)
    assert gen_report["source"] == "generated" and "rendered_accuracy" not in gen_report
    assert "generated by the model" in edit_eval.markdown_section({**result, "report": gen_report})
    with pytest.raises(ValueError):
        edit_eval.Editor.source_clip(editor, "a red circle moving right", 0, "painted")
    # Editor.source keeps its earlier call (caption, seed) → the generated source (benchmarks/frame_strip.py).
    bits, frames = editor.source("a red circle moving right", 0)
    assert bits.shape[2:] == editor.grid and frames.shape == (editor.frames, editor.height, editor.width, 3)
    rendered_bits, _ = editor.source("a red circle moving right", 0, "rendered")
    rendered = edit_eval.render_source("a red circle moving right", 0, 9, 32, 32)
    assert torch.equal(rendered_bits, editor.encode(rendered)[0])
