"""Procedural "moving shapes" clips and images: the training data of the tiny offline GRN.

Captions follow a closed grammar::

    video:  "a {color} {shape} moving {direction}"     6 x 3 x 4 = 72 captions
    image:  "a {color} {shape}"                        6 x 3     = 18 captions

Every sample is one flat-coloured shape on a black background. The shape has a square bounding box of
side ``size`` pixels (circle: diameter ``size``; square: side ``size``; triangle: apex up, base and height
``size``), a random size and start position, and moves at constant speed along its direction; start and
speed are drawn so the whole shape stays inside the frame on every frame.

Pixels are float32 torch tensors in [-1, 1]: clips ``[3, T, H, W]``, images ``[3, H, W]`` (the tokenizer's
input range and layout). Edges are anti-aliased analytically: coverage = clamp(0.5 - signed_distance, 0, 1)
per pixel, which is the exact box-filtered coverage for straight axis-aligned edges and costs one distance
per pixel (no supersampling): ~3000 clips/s batched, ~2000/s one by one, on one CPU core.

Coordinates: pixel (row i, column j) covers [j, j+1] x [i, i+1]; x grows to the right, y grows downwards;
a label's positions are the bounding-box centre (x, y) per frame.

Two ways to draw samples, both deterministic:

- ``sample_clip(generator, ...)`` / ``sample_image(generator, ...)`` consume a ``torch.Generator``.
- ``ShapesDataset(seed, ...)`` is random-access: item ``i`` is a pure function of ``(seed, i)`` (counter-based
  splitmix64 hashing, integer arithmetic only), so it is identical across processes, machines, DataLoader
  workers and batch compositions, and ``dataset.batch(indices)`` renders many items in one vectorised call.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np
import torch

COLORS: dict[str, tuple[float, float, float]] = {
    "red": (1.0, -1.0, -1.0),
    "green": (-1.0, 1.0, -1.0),
    "blue": (-1.0, -1.0, 1.0),
    "yellow": (1.0, 1.0, -1.0),
    "white": (1.0, 1.0, 1.0),
    "magenta": (1.0, -1.0, 1.0),
}
"""Shape colours as RGB in [-1, 1] (the background is (-1, -1, -1))."""

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
DIRECTIONS: tuple[str, ...] = ("left", "right", "up", "down")

# Unit displacement (dx, dy) per direction; y grows downwards.
DIRECTION_VECTORS: dict[str, tuple[int, int]] = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}

# Fraction of the bounding box each shape fills; the judge uses it to turn an area into a size.
SHAPE_FILL: dict[str, float] = {"circle": math.pi / 4.0, "square": 1.0, "triangle": 0.5}
# How far the area centroid lies below the bounding-box centre, in units of ``size`` (triangle: apex up).
SHAPE_CENTROID_DROP: dict[str, float] = {"circle": 0.0, "square": 0.0, "triangle": 1.0 / 6.0}

DEFAULT_FRAMES = 9
DEFAULT_HEIGHT = 32
DEFAULT_WIDTH = 32

SIZE_RANGE = (0.25, 0.40)
"""Bounding-box side as a fraction of min(H, W)."""
MIN_TRAVEL = 0.25
"""Smallest total displacement over a clip, as a fraction of the frame side along the motion, so direction is
never ambiguous (the judge calls a clip static below 0.08 of the frame)."""
MARGIN = 1.0
"""Pixels kept free between the shape's bounding box and the frame border (room for the anti-aliased edge)."""

_DRAWS = 5  # uniforms consumed per sample: caption, size, travel, along-axis start, cross-axis position


# --------------------------------------------------------------------------------------------------- captions
@dataclass(frozen=True)
class Caption:
    """The attributes of a caption; ``direction`` is None for image captions."""

    color: str
    shape: str
    direction: str | None = None

    @property
    def text(self) -> str:
        return make_caption(self.color, self.shape, self.direction)


def _check_word(word: str, allowed, what: str, caption: str | None = None) -> None:
    if word not in allowed:
        where = f" in caption {caption!r}" if caption is not None else ""
        raise ValueError(f"unknown {what} {word!r}{where}; expected one of {list(allowed)}")


def make_caption(color: str, shape: str, direction: str | None = None) -> str:
    """"a {color} {shape}" or "a {color} {shape} moving {direction}"; ValueError for words outside the grammar."""
    _check_word(color, COLORS, "colour")
    _check_word(shape, SHAPES, "shape")
    if direction is None:
        return f"a {color} {shape}"
    _check_word(direction, DIRECTIONS, "direction")
    return f"a {color} {shape} moving {direction}"


def video_captions() -> list[str]:
    """All 72 video captions, colour-major then shape then direction."""
    return list(_VIDEO_CAPTIONS)


def image_captions() -> list[str]:
    """All 18 image captions, colour-major then shape."""
    return list(_IMAGE_CAPTIONS)


_VIDEO_CAPTIONS = tuple(make_caption(c, s, d) for c, s, d in itertools.product(COLORS, SHAPES, DIRECTIONS))
_IMAGE_CAPTIONS = tuple(make_caption(c, s) for c, s in itertools.product(COLORS, SHAPES))


def parse_caption(caption: str) -> Caption:
    """Parse a caption of the grammar back into its attributes (case and surrounding whitespace are ignored).

    Raises ValueError naming the first word that does not fit the grammar.
    """
    if not isinstance(caption, str):
        raise ValueError(f"caption must be a string, got {type(caption).__name__}: {caption!r}")
    words = caption.strip().lower().split()
    grammar = "'a {color} {shape}' or 'a {color} {shape} moving {direction}'"
    if not words:
        raise ValueError(f"empty caption {caption!r}; expected {grammar}")
    if words[0] != "a":
        raise ValueError(f"unknown word {words[0]!r} in caption {caption!r}: it must start with 'a'; expected {grammar}")
    if len(words) < 3:
        raise ValueError(f"caption {caption!r} is too short; expected {grammar}")
    color, shape = words[1], words[2]
    _check_word(color, COLORS, "colour", caption)
    _check_word(shape, SHAPES, "shape", caption)
    if len(words) == 3:
        return Caption(color, shape, None)
    if words[3] != "moving":
        raise ValueError(f"unknown word {words[3]!r} in caption {caption!r}: expected 'moving'; grammar is {grammar}")
    if len(words) == 4:
        raise ValueError(f"caption {caption!r} lacks a direction after 'moving'; expected one of {list(DIRECTIONS)}")
    _check_word(words[4], DIRECTIONS, "direction", caption)
    if len(words) > 5:
        raise ValueError(f"unknown word {words[5]!r} in caption {caption!r}: nothing may follow the direction")
    return Caption(color, shape, words[4])


# --------------------------------------------------------------------------------------------------- samples
@dataclass(frozen=True)
class ShapeLabel:
    """Ground truth of one sample.

    positions: bounding-box centre (x, y) in pixels per frame (one entry for an image), origin at the top-left
    corner, y downwards. size: side of the shape's square bounding box in pixels. direction: None for images.
    """

    color: str
    shape: str
    direction: str | None
    size: float
    positions: tuple[tuple[float, float], ...]

    @property
    def caption(self) -> str:
        return make_caption(self.color, self.shape, self.direction)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ShapeSample:
    """pixels: float32 in [-1, 1], [3, T, H, W] for a clip or [3, H, W] for an image."""

    pixels: torch.Tensor
    caption: str
    label: ShapeLabel


@dataclass
class ShapeBatch:
    """pixels: float32 in [-1, 1], [N, 3, T, H, W] for clips or [N, 3, H, W] for images."""

    pixels: torch.Tensor
    captions: list[str]
    labels: list[ShapeLabel]

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, i: int) -> ShapeSample:
        return ShapeSample(self.pixels[i], self.captions[i], self.labels[i])


def validate_clip_size(frames: int, height: int, width: int, *, video: bool = True) -> None:
    """ValueError unless frames is 1+4k (k >= 1 for a clip) and height/width are positive multiples of 16."""
    if video:
        if not isinstance(frames, int) or isinstance(frames, bool) or frames < 5 or (frames - 1) % 4:
            raise ValueError(
                f"frames={frames!r}: a clip needs 1+4k frames with k >= 1 (the tokenizer keeps the first frame and "
                f"compresses the rest 4x); use 5, 9, 13, ... (or sample_image for a single frame)"
            )
    for name, side in (("height", height), ("width", width)):
        if not isinstance(side, int) or isinstance(side, bool) or side < 16 or side % 16:
            raise ValueError(f"{name}={side!r}: frame sides must be positive multiples of 16 (the tokenizer's "
                             f"spatial stride); use 16, 32, 48, ...")


def sample_clip(
    generator: torch.Generator | None = None,
    caption: str | None = None,
    frames: int = DEFAULT_FRAMES,
    height: int = DEFAULT_HEIGHT,
    width: int = DEFAULT_WIDTH,
) -> ShapeSample:
    """One clip [3, T, H, W]; the caption is drawn from the video grammar unless given.

    Consumes 5 float64 draws of ``generator`` (torch's default generator when None), so a seeded generator
    gives identical clips.
    """
    validate_clip_size(frames, height, width, video=True)
    return _sample_one(generator, caption, frames, height, width, video=True)


def sample_image(
    generator: torch.Generator | None = None,
    caption: str | None = None,
    height: int = DEFAULT_HEIGHT,
    width: int = DEFAULT_WIDTH,
) -> ShapeSample:
    """One image [3, H, W]; the caption is drawn from the image grammar unless given."""
    validate_clip_size(1, height, width, video=False)
    return _sample_one(generator, caption, 1, height, width, video=False)


def _sample_one(generator, caption, frames, height, width, video) -> ShapeSample:
    u = torch.rand(1, _DRAWS, generator=generator, dtype=torch.float64).numpy()
    captions = [caption] if caption is not None else None
    batch = _build_batch(u, frames, height, width, video, captions, fixed=caption is not None)
    return batch[0]


class ShapesDataset(torch.utils.data.Dataset):
    """Random-access dataset of shape clips (``kind="video"``) or images (``kind="image"``).

    Item ``i`` depends only on ``(seed, i)`` and the size arguments (``frames`` is ignored for images). ``captions`` restricts the drawn captions
    (e.g. to hold some out); by default every caption of the grammar is drawn uniformly.
    Use ``dataset.batch(indices)`` for fast vectorised rendering, or a DataLoader with
    ``collate_fn=ShapesDataset.collate``.
    """

    def __init__(
        self,
        seed: int = 0,
        length: int = 100_000,
        kind: str = "video",
        frames: int = DEFAULT_FRAMES,
        height: int = DEFAULT_HEIGHT,
        width: int = DEFAULT_WIDTH,
        captions: Sequence[str] | None = None,
    ):
        if kind not in ("video", "image"):
            raise ValueError(f"kind={kind!r}; use 'video' or 'image'")
        if not isinstance(seed, int) or not 0 <= seed < 2**64:
            raise ValueError(f"seed={seed!r}; use an int in [0, 2**64)")
        if not isinstance(length, int) or length < 1:
            raise ValueError(f"length={length!r}; use a positive int")
        video = kind == "video"
        frames = frames if video else 1
        validate_clip_size(frames, height, width, video=video)
        if captions is None:
            captions = video_captions() if video else image_captions()
        else:
            captions = list(captions)
            if not captions:
                raise ValueError("captions is empty; pass None for the whole grammar or at least one caption")
            for c in captions:
                if (parse_caption(c).direction is None) == video:
                    raise ValueError(f"caption {c!r} is not {'a video' if video else 'an image'} caption; "
                                     f"{'add' if video else 'drop'} 'moving {{direction}}'")
        self.seed, self.length, self.kind = seed, length, kind
        self.frames, self.height, self.width = frames, height, width
        self.captions = captions

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> ShapeSample:
        if not -self.length <= index < self.length:
            raise IndexError(f"index {index} out of range for a dataset of length {self.length}")
        return self.batch([index % self.length])[0]

    def batch(self, indices: Sequence[int] | torch.Tensor | np.ndarray) -> ShapeBatch:
        """Render the items ``indices`` in one vectorised call (same pixels as item-by-item access)."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size == 0:
            raise ValueError("indices is empty; pass at least one index")
        if (idx.min() < 0 or idx.max() >= self.length):
            raise ValueError(f"indices must lie in [0, {self.length}); got min {idx.min()}, max {idx.max()}")
        u = counter_uniforms(self.seed, idx.astype(np.uint64), _DRAWS)
        return _build_batch(u, self.frames, self.height, self.width, self.kind == "video", self.captions, fixed=False)

    @staticmethod
    def collate(samples: Sequence[ShapeSample]) -> ShapeBatch:
        """collate_fn for torch.utils.data.DataLoader."""
        return ShapeBatch(torch.stack([s.pixels for s in samples]), [s.caption for s in samples],
                          [s.label for s in samples])


# --------------------------------------------------------------------------------------------- randomness
_MASK64 = (1 << 64) - 1


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser on uint64 arrays (wrapping arithmetic): a bijective, well-mixed integer hash."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def counter_uniforms(seed: int, indices: np.ndarray, draws: int) -> np.ndarray:
    """Uniforms in [0, 1), float64 [N, draws], a pure function of (seed, index, draw) — integer hashing only."""
    with np.errstate(over="ignore"):
        key = _splitmix64(np.array([seed & _MASK64], dtype=np.uint64))
        item = _splitmix64(key ^ indices.astype(np.uint64).reshape(-1, 1))
        bits = _splitmix64(item ^ (np.arange(draws, dtype=np.uint64) * np.uint64(0xD1B54A32D192ED03)))
    return (bits >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


# ------------------------------------------------------------------------------------------------ sampling
def _build_batch(u: np.ndarray, frames: int, height: int, width: int, video: bool,
                 captions: Sequence[str] | None, fixed: bool) -> ShapeBatch:
    """Map uniforms u [N, 5] to shape parameters and render them.

    fixed=True: ``captions`` holds one caption per row; otherwise row n draws captions[floor(u0 * len)].
    """
    n = u.shape[0]
    if captions is None:
        captions = _VIDEO_CAPTIONS if video else _IMAGE_CAPTIONS
    if fixed:
        chosen = list(captions)
    else:
        chosen = [captions[min(int(v * len(captions)), len(captions) - 1)] for v in u[:, 0]]
    parsed = [parse_caption(c) for c in chosen]
    for c, p in zip(chosen, parsed):
        if (p.direction is None) == video:
            raise ValueError(f"caption {c!r} is not {'a video' if video else 'an image'} caption; "
                             f"use {'sample_image' if video else 'sample_clip'} or "
                             f"{'add' if video else 'drop'} 'moving {{direction}}'")

    short = float(min(height, width))
    size = short * (SIZE_RANGE[0] + (SIZE_RANGE[1] - SIZE_RANGE[0]) * u[:, 1])  # [N]
    half = size / 2.0
    lo = MARGIN + half  # centre limits, identical for x and y offsets
    hi_x, hi_y = width - MARGIN - half, height - MARGIN - half

    if video:
        vec = np.array([DIRECTION_VECTORS[p.direction] for p in parsed], dtype=np.float64)  # [N, 2]
        horizontal = vec[:, 0] != 0
        axis_len = np.where(horizontal, width, height).astype(np.float64)
        room = np.where(horizontal, hi_x, hi_y) - lo  # the centre's free range along the motion
        travel_min = MIN_TRAVEL * axis_len
        travel = travel_min + (room - travel_min) * u[:, 2]
        # Along the motion: the whole path [start, start +- travel] lies inside [lo, hi].
        along_first = lo + (room - travel) * u[:, 3]  # leftmost / topmost centre on the path
        forward = (vec.sum(1) > 0)  # right or down
        start_along = np.where(forward, along_first, along_first + travel)
        cross = lo + (np.where(horizontal, hi_y, hi_x) - lo) * u[:, 4]
        start = np.stack([np.where(horizontal, start_along, cross), np.where(horizontal, cross, start_along)], 1)
        step = vec * (travel / (frames - 1))[:, None]
        t = np.arange(frames, dtype=np.float64)
        centres = start[:, None, :] + t[None, :, None] * step[:, None, :]  # [N, T, 2]
    else:
        centres = np.stack([lo + (hi_x - lo) * u[:, 3], lo + (hi_y - lo) * u[:, 4]], 1)[:, None, :]

    shape_ids = np.array([SHAPES.index(p.shape) for p in parsed], dtype=np.int64)
    rgb = np.array([COLORS[p.color] for p in parsed], dtype=np.float32).reshape(n, 3)
    coverage = render_coverage(shape_ids, centres, size, height, width)
    pixels = coverage_to_pixels(coverage, rgb)
    if not video:
        pixels = pixels[:, :, 0]

    labels = [
        ShapeLabel(p.color, p.shape, p.direction, float(size[i]),
                   tuple((float(x), float(y)) for x, y in centres[i]))
        for i, p in enumerate(parsed)
    ]
    return ShapeBatch(pixels, [p.text for p in parsed], labels)


# ------------------------------------------------------------------------------------------------ rendering
def render_coverage(shape_ids: np.ndarray, centres: np.ndarray, sizes: np.ndarray, height: int,
                    width: int) -> np.ndarray:
    """Anti-aliased coverage in [0, 1], float32 numpy [N, T, H, W].

    shape_ids [N] (index into SHAPES), centres [N, T, 2] bounding-box centre (x, y) in pixels, sizes [N]
    bounding-box side in pixels. coverage = clamp(0.5 - d, 0, 1) with d the signed distance (pixels) to the
    outline, negative inside.

    numpy rather than torch: these are many small elementwise ops, which torch would spread over its thread
    pool (slow when the cores are shared) and numpy runs on one core, with the same IEEE results everywhere.
    """
    shape_ids = np.asarray(shape_ids).reshape(-1)
    centres = np.asarray(centres, dtype=np.float32)
    sizes = np.asarray(sizes, dtype=np.float32).reshape(-1)
    n, frames = centres.shape[0], centres.shape[1]
    xs = np.arange(width, dtype=np.float32) + np.float32(0.5)
    ys = np.arange(height, dtype=np.float32) + np.float32(0.5)
    out = np.empty((n, frames, height, width), dtype=np.float32)
    for k, name in enumerate(SHAPES):
        rows = np.nonzero(shape_ids == k)[0]
        if rows.size == 0:
            continue
        c = centres[rows]
        dx = xs.reshape(1, 1, 1, width) - c[:, :, 0, None, None]  # [n, T, 1, W]
        dy = ys.reshape(1, 1, height, 1) - c[:, :, 1, None, None]  # [n, T, H, 1]
        half = (sizes[rows] / np.float32(2)).reshape(-1, 1, 1, 1)
        if name == "circle":
            dist = np.sqrt(dx * dx + dy * dy) - half
        elif name == "square":
            dist = np.maximum(np.abs(dx), np.abs(dy)) - half
        else:
            # Apex (0, -h), base corners (+-h, h) with h = size/2: inside the base (dy <= h) and inside both
            # slanted edges, whose outward normals are (+-1, -1/2)/sqrt(5/4). The half-planes alone
            # under-estimate the distance beyond the sharp apex and corners (a faint halo would leak past the
            # bounding box), so the bounding box's own half-planes cap them.
            adx = np.abs(dx)
            slant = (adx - np.float32(0.5) * dy - half / np.float32(2)) * np.float32(1.0 / math.sqrt(1.25))
            dist = np.maximum(np.maximum(slant, adx - half), np.abs(dy) - half)
        out[rows] = np.clip(np.float32(0.5) - dist, 0.0, 1.0)
    return out


def coverage_to_pixels(coverage: np.ndarray, rgb: np.ndarray) -> torch.Tensor:
    """Blend colours rgb [N, 3] (in [-1, 1]) over black by coverage [N, T, H, W] -> [N, 3, T, H, W] in [-1, 1]."""
    gain = (np.asarray(rgb, dtype=np.float32) + np.float32(1)).reshape(-1, 3, 1, 1, 1)
    return torch.from_numpy(coverage[:, None] * gain - np.float32(1))
