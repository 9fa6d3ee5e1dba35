"""Smoke test of benchmarks/edit_eval.py (the editing benchmark) on the built-in tiny model, with few steps."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from grn_core.data.shapes import DIRECTIONS, video_captions
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
    report = edit_eval.summarize([row], editor, 1.0)
    assert report["steps"] == 4 and report["kept_bits_equal"] == 1.0
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
