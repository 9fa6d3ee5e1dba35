"""The procedural shapes data: grammar, geometry, containment, determinism, validation."""

import math

import numpy as np
import pytest
import torch

from grn_core.data.shapes import (
    COLORS,
    DIRECTION_VECTORS,
    DIRECTIONS,
    MARGIN,
    MIN_TRAVEL,
    SHAPE_CENTROID_DROP,
    SHAPE_FILL,
    SHAPES,
    SIZE_RANGE,
    Caption,
    ShapesDataset,
    counter_uniforms,
    image_captions,
    make_caption,
    parse_caption,
    sample_clip,
    sample_image,
    video_captions,
)


# ------------------------------------------------------------------------------------------------ grammar
def test_caption_grammar_is_enumerated_and_round_trips():
    videos, images = video_captions(), image_captions()
    assert len(videos) == len(set(videos)) == 6 * 3 * 4
    assert len(images) == len(set(images)) == 6 * 3
    seen = set()
    for caption in videos + images:
        parsed = parse_caption(caption)
        assert parsed.text == caption
        seen.add((parsed.color, parsed.shape, parsed.direction))
    assert {c for c, _, _ in seen} == set(COLORS)
    assert {s for _, s, _ in seen} == set(SHAPES)
    assert {d for _, _, d in seen} == set(DIRECTIONS) | {None}
    assert parse_caption("  A Blue SQUARE moving Up ") == Caption("blue", "square", "up")
    assert make_caption("red", "circle") == "a red circle"


@pytest.mark.parametrize("caption, word", [
    ("a purple circle", "purple"),
    ("a red hexagon moving left", "hexagon"),
    ("a red circle moving sideways", "sideways"),
    ("the red circle", "the"),
    ("a red circle running left", "running"),
    ("a red circle moving left fast", "fast"),
])
def test_parse_caption_names_the_unknown_word(caption, word):
    with pytest.raises(ValueError, match=repr(word)):
        parse_caption(caption)


@pytest.mark.parametrize("caption", ["", "a red", "a red circle moving"])
def test_parse_caption_rejects_incomplete_captions(caption):
    with pytest.raises(ValueError):
        parse_caption(caption)


def test_make_caption_rejects_unknown_words():
    with pytest.raises(ValueError, match="'orange'"):
        make_caption("orange", "circle")


# ------------------------------------------------------------------------------------------------ samples
@pytest.fixture(scope="module")
def batch():
    return ShapesDataset(seed=3).batch(range(400))


def test_clip_layout_range_and_caption():
    g = torch.Generator().manual_seed(0)
    s = sample_clip(g, "a yellow triangle moving down")
    assert s.pixels.shape == (3, 9, 32, 32) and s.pixels.dtype == torch.float32
    assert s.pixels.min() == -1.0 and s.pixels.max() == 1.0
    assert s.caption == s.label.caption == "a yellow triangle moving down"
    assert len(s.label.positions) == 9


def test_image_layout_and_label():
    g = torch.Generator().manual_seed(0)
    s = sample_image(g, "a blue circle", height=32, width=48)
    assert s.pixels.shape == (3, 32, 48)
    assert s.label.direction is None and len(s.label.positions) == 1
    assert s.caption in image_captions()
    assert sample_image(g).caption in image_captions()


def test_pixels_are_background_or_caption_colour(batch):
    # Fully covered pixels carry the exact caption colour, untouched ones the black background; the
    # anti-aliased edge lies on the segment between them.
    for i in range(0, len(batch), 37):
        pix = batch.pixels[i]
        colour = torch.tensor(COLORS[batch.labels[i].color]).view(3, 1, 1, 1)
        coverage = (pix + 1) / (colour + 1).clamp_min(1e-9)
        lit = colour.flatten() > 0
        cov = coverage[lit]
        assert torch.allclose(cov, cov[0:1].expand_as(cov), atol=1e-6)  # one coverage across lit channels
        assert torch.equal(pix[~lit], torch.full_like(pix[~lit], -1.0))
        assert (cov >= 0).all() and (cov <= 1 + 1e-6).all()
        assert (cov == 1).any() and (cov == 0).any()


def test_shape_stays_inside_the_frame_on_every_frame(batch):
    p = batch.pixels
    border = torch.cat([p[..., 0, :], p[..., -1, :], p[..., :, 0], p[..., :, -1]], -1)
    assert (border == -1).all(), "a shape touches the frame border"
    for label in batch.labels:
        half = label.size / 2
        for x, y in label.positions:
            assert MARGIN - 1e-9 <= x - half and x + half <= 32 - MARGIN + 1e-9
            assert MARGIN - 1e-9 <= y - half and y + half <= 32 - MARGIN + 1e-9


def test_lit_pixels_lie_in_the_labelled_bounding_box(batch):
    ys, xs = torch.meshgrid(torch.arange(32) + 0.5, torch.arange(32) + 0.5, indexing="ij")
    for i in range(0, len(batch), 13):
        label = batch.labels[i]
        lit = batch.pixels[i].amax(0) > -1  # [T, H, W]
        for t, (x, y) in enumerate(label.positions):
            inside = ((xs - x).abs() <= label.size / 2 + 0.5) & ((ys - y).abs() <= label.size / 2 + 0.5)
            assert not (lit[t] & ~inside).any()


def test_geometry_area_and_centroid_match_the_shape(batch):
    # Coverage sums to the shape's area (fill fraction x size^2) and its centroid sits at the box centre,
    # dropped by size/6 for the apex-up triangle.
    ys, xs = torch.meshgrid(torch.arange(32) + 0.5, torch.arange(32) + 0.5, indexing="ij")
    for i in range(0, len(batch), 7):
        label = batch.labels[i]
        colour = torch.tensor(COLORS[label.color])
        c = int(torch.argmax(colour))
        cover = (batch.pixels[i, c] + 1) / 2  # [T, H, W]
        area = cover.sum((1, 2))
        expected = SHAPE_FILL[label.shape] * label.size**2
        assert torch.allclose(area, torch.full_like(area, expected), rtol=0.04), (label.shape, area, expected)
        x, y = label.positions[0]
        cx = float((cover[0] * xs).sum() / area[0])
        cy = float((cover[0] * ys).sum() / area[0])
        assert abs(cx - x) < 0.05
        assert abs(cy - (y + SHAPE_CENTROID_DROP[label.shape] * label.size)) < 0.1


def test_motion_follows_the_caption(batch):
    short = 32
    for label in batch.labels:
        pos = np.array(label.positions)
        step = np.diff(pos, axis=0)
        dx, dy = DIRECTION_VECTORS[label.direction]
        along = step @ np.array([dx, dy], dtype=np.float64)
        cross = step @ np.array([dy, dx], dtype=np.float64)
        assert np.allclose(along, along[0]) and along[0] > 0  # constant speed, the right way
        assert np.allclose(cross, 0)
        assert along.sum() >= MIN_TRAVEL * short - 1e-9
        assert SIZE_RANGE[0] * short - 1e-9 <= label.size <= SIZE_RANGE[1] * short + 1e-9


@pytest.mark.parametrize("frames, height, width", [(5, 16, 16), (17, 64, 48), (13, 32, 64)])
def test_other_sizes_fit(frames, height, width):
    ds = ShapesDataset(seed=1, frames=frames, height=height, width=width)
    b = ds.batch(range(40))
    assert b.pixels.shape == (40, 3, frames, height, width)
    p = b.pixels
    border = torch.cat([p[..., 0, :], p[..., -1, :], p[..., :, 0], p[..., :, -1]], -1)
    assert (border == -1).all()
    assert (p > -1).any(1).flatten(2).any(-1).all()  # every frame shows the shape


# -------------------------------------------------------------------------------------------- determinism
def test_sample_clip_is_seeded():
    a = sample_clip(torch.Generator().manual_seed(11))
    b = sample_clip(torch.Generator().manual_seed(11))
    c = sample_clip(torch.Generator().manual_seed(12))
    assert torch.equal(a.pixels, b.pixels) and a.label == b.label
    assert not torch.equal(a.pixels, c.pixels)


def test_dataset_items_are_pure_functions_of_seed_and_index():
    ds = ShapesDataset(seed=5)
    full = ds.batch([4, 9, 2])
    assert torch.equal(ds[9].pixels, full.pixels[1])
    assert ds[2].label == full.labels[2]
    assert torch.equal(ShapesDataset(seed=5).batch([4, 9, 2]).pixels, full.pixels)
    assert not torch.equal(ShapesDataset(seed=6).batch([4, 9, 2]).pixels, full.pixels)


def test_dataset_is_pinned_across_machines():
    # Integer hashing + float64 numpy arithmetic: these values are the same on every machine and version.
    u = counter_uniforms(0, np.arange(2, dtype=np.uint64), 5)
    assert u[0, 0] == 0.13870941014555427 and u[1, 4] == 0.9100280115283688
    labels = ShapesDataset(seed=0).batch([0, 1, 2]).labels
    assert [lab.caption for lab in labels] == [
        "a red triangle moving right", "a green square moving down", "a magenta circle moving left"]
    assert labels[0].size == pytest.approx(9.07352246181154, abs=1e-12)
    assert labels[1].positions[-1] == pytest.approx((24.982283011073786, 18.83594192227475), abs=1e-12)


def test_dataset_captions_cover_the_grammar_and_respect_a_subset():
    ds = ShapesDataset(seed=0, length=10_000)
    u = counter_uniforms(0, np.arange(10_000, dtype=np.uint64), 5)
    assert abs(u.mean() - 0.5) < 0.01 and abs(u.var() - 1 / 12) < 0.005
    assert set(ds.batch(range(720)).captions) == set(video_captions())
    subset = ["a red circle moving left", "a blue square moving up"]
    sub = ShapesDataset(seed=0, captions=subset).batch(range(50))
    assert set(sub.captions) == set(subset)
    images = ShapesDataset(seed=0, kind="image").batch(range(200))
    assert images.pixels.shape == (200, 3, 32, 32) and set(images.captions) == set(image_captions())


def test_dataloader_collate():
    ds = ShapesDataset(seed=0, length=8)
    loader = torch.utils.data.DataLoader(ds, batch_size=4, collate_fn=ShapesDataset.collate)
    first = next(iter(loader))
    assert first.pixels.shape == (4, 3, 9, 32, 32) and len(first.captions) == 4
    assert torch.equal(first.pixels, ds.batch(range(4)).pixels)


# --------------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize("kwargs, word", [
    ({"frames": 8}, "frames=8"),
    ({"frames": 1}, "frames=1"),
    ({"height": 30}, "height=30"),
    ({"width": 0}, "width=0"),
])
def test_bad_clip_sizes_are_rejected(kwargs, word):
    with pytest.raises(ValueError, match=word):
        sample_clip(torch.Generator().manual_seed(0), **kwargs)
    with pytest.raises(ValueError, match=word):
        ShapesDataset(**kwargs)


def test_caption_kind_mismatch_is_rejected():
    g = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="not a video caption"):
        sample_clip(g, "a red circle")
    with pytest.raises(ValueError, match="not an image caption"):
        sample_image(g, "a red circle moving up")
    with pytest.raises(ValueError, match="not a video caption"):
        ShapesDataset(captions=["a red circle"])
    with pytest.raises(ValueError, match="'pink'"):
        ShapesDataset(captions=["a pink circle moving up"])
    with pytest.raises(ValueError):
        ShapesDataset(kind="audio")
    with pytest.raises(ValueError):
        ShapesDataset(seed=-1)
    with pytest.raises(ValueError):
        ShapesDataset(length=5).batch([5])


def test_fill_fractions_are_the_shapes_geometry():
    assert SHAPE_FILL["circle"] == pytest.approx(math.pi / 4)
    assert SHAPE_FILL["triangle"] == 0.5 and SHAPE_FILL["square"] == 1.0
