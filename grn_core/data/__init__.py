"""Procedural training data for the tiny offline GRN, and a judge that reads generated clips back.

``shapes``: deterministic "a {color} {shape} moving {direction}" clips and "a {color} {shape}" images.
``judge``: colour / shape / direction of a generated clip, for caption-accuracy quality tests
(``grn_core.data.judge.judge(clip)``; the function is not re-exported here, so that ``grn_core.data.judge``
stays the module).
"""

from grn_core.data.judge import STATIC, Verdict, caption_accuracy
from grn_core.data.shapes import (
    COLORS,
    DIRECTIONS,
    SHAPES,
    Caption,
    ShapeBatch,
    ShapeLabel,
    ShapeSample,
    ShapesDataset,
    image_captions,
    make_caption,
    parse_caption,
    render_coverage,
    sample_clip,
    sample_image,
    validate_clip_size,
    video_captions,
)

__all__ = [
    "COLORS", "DIRECTIONS", "SHAPES", "STATIC", "Caption", "ShapeBatch", "ShapeLabel", "ShapeSample", "ShapesDataset",
    "Verdict", "caption_accuracy", "image_captions", "make_caption", "parse_caption", "render_coverage",
    "sample_clip", "sample_image", "validate_clip_size", "video_captions",
]
