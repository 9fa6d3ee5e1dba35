"""Tokenizer decode with bounded memory: latent frame by latent frame, and optionally in overlapping spatial tiles.

The decoder is causal in time and runs one latent frame at a time (``HBQTokenizer.decode_iter``), so its memory does
not grow with the frame count: one chunk of activations plus the :class:`CausalCache` (the last two frames fed to
every k=3 causal conv). Both still grow with the frame *area*. Spatial tiling bounds them by the tile instead::

    frames = decode_tiled(tok, z, tile=(16, 16), overlap=4)          # [B, 3, T, H, W], same layout as tok.decode
    for chunk in decode_tiled_iter(tok, z, tile=16):                 # streaming: [B, 3, n, H, W] per latent frame
        ...

How a tiled decode is split:

* The *stem* (``conv2``, the decoder's ``conv1``, its middle blocks with the frame-wide attention, and the first
  up-sampling level, which runs at latent resolution) runs on whole frames. It is cheap -- about 5 % of the cache
  and of the activations of an untiled decode for the released sizes -- and it holds the only non-local operation
  (attention over all positions of a frame), so tiling it would change every pixel.
* The *tail* (the remaining levels at 2x, 4x, 8x resolution and the head, where nearly all memory goes) runs on
  overlapping tiles of the stem output. Each tile keeps its own causal cache across latent frames, since the cache
  holds spatial feature maps of its region.
* In pixel space each tile is weighted by a product of two 1-D linear ramps that fall to ~0 across the whole overlap
  with each neighbour, and the weighted sum is divided by the summed weights. A tile differs from the untiled decode
  only within the tail's receptive field of its borders (:func:`tail_receptive_field`, 99 px = 6.2 latent cells for
  the released layout); the ramps give those pixels little weight. An overlap of 4 cells or more is advised.

``tile=None`` (or a tile at least the grid) is bit-identical to ``decode``. Two orders, same numbers:

* :func:`decode_tiled` runs tile by tile (each through all latent frames) and adds finished chunks into an output
  buffer on ``out_device``. The stem outputs of all latent frames are kept there too (for the released config 1.3x
  (bf16) to 2.7x (float32) the size of the float32 output), so with ``out_device="cpu"`` the compute device holds
  only the stem of one latent frame, or one tile's cache, crop and activations, whatever the frame count.
* :func:`decode_tiled_iter` runs latent frame by latent frame (stem, then every tile) and yields finished chunks as
  soon as they are blended, for streaming. All tiles' caches stay alive between frames: together a whole frame's
  cache times (summed tile area / frame area), which is *more* than an untiled decode for small, much-overlapping
  tiles. Only the activations are bounded by the tile; use it with large tiles, or use :func:`decode_tiled`.

:func:`estimate_decode_memory` predicts the decode memory beyond the weights for either order (checked against
traced tensor storage: within +0 to +7 %); :func:`choose_tile` picks a tile for a memory budget.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from ..nn import compute_dtype
from .causal import CausalCache, unpatchify
from .config import TokenizerConfig

__all__ = [
    "DecodeMemoryEstimate",
    "choose_tile",
    "decode_stem",
    "decode_tail",
    "decode_tiled",
    "decode_tiled_iter",
    "estimate_decode_memory",
    "stem_levels",
    "tail_receptive_field",
    "tile_starts",
]

TileArg = Union[None, int, Sequence[int]]
Progress = Callable[[int, int], None]

# Up-sampling levels run on whole frames before tiling (level 0 runs at latent resolution).
STEM_LEVELS = 1


# ---- tile layout --------------------------------------------------------------------------------------------------
def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of length ``tile`` covering ``[0, size)`` with neighbours overlapping by >= ``overlap``.

    The fewest tiles that achieve the overlap, spread evenly (the leftover is shared by all seams instead of piling
    up in the last one). ``tile >= size`` gives one tile ``[0]``.
    """
    if tile >= size:
        return [0]
    count = math.ceil((size - overlap) / (tile - overlap))
    step = (size - tile) / (count - 1)
    # round() is monotone and step <= tile - overlap, so rounding never shrinks an overlap below ``overlap``.
    return [round(i * step) for i in range(count)]


def _ramps(starts: list[int], tile: int, scale: int) -> list[torch.Tensor]:
    """Per tile, its 1-D pixel weights ``[tile * scale]`` (float64): 1 inside, linear ramps across the overlap with
    each neighbour. Where exactly two tiles overlap the two ramps sum to 1."""
    length = tile * scale
    weights = []
    for i, start in enumerate(starts):
        w = torch.ones(length, dtype=torch.float64)
        if i > 0:  # overlap with the previous tile: [start, previous end)
            n = (starts[i - 1] + tile - start) * scale
            w[:n] = (torch.arange(n, dtype=torch.float64) + 0.5) / n
        if i + 1 < len(starts):  # overlap with the next tile: [next start, end)
            n = (start + tile - starts[i + 1]) * scale
            down = 1 - (torch.arange(n, dtype=torch.float64) + 0.5) / n
            w[length - n :] = torch.minimum(w[length - n :], down)
        weights.append(w)
    return weights


@dataclass(frozen=True)
class _Tile:
    y: int  # latent offsets and sizes
    x: int
    h: int
    w: int
    weight: torch.Tensor  # [h*sf, w*sf] pixel weights

    def crop(self, features: torch.Tensor, scale: int) -> torch.Tensor:
        """This tile's part of ``[..., h*scale, w*scale]`` features (scale = feature cells per latent cell)."""
        return features[..., self.y * scale : (self.y + self.h) * scale, self.x * scale : (self.x + self.w) * scale]

    def pixels(self, sf: int) -> tuple[slice, slice]:
        return slice(self.y * sf, (self.y + self.h) * sf), slice(self.x * sf, (self.x + self.w) * sf)


def _tile_size(tile: TileArg) -> Optional[tuple[int, int]]:
    if tile is None:
        return None
    size = (tile, tile) if isinstance(tile, int) else tuple(tile)
    if len(size) != 2 or any(not isinstance(v, int) or isinstance(v, bool) or v < 1 for v in size):
        raise ValueError(f"tile={tile!r}: give latent cells per tile as a positive int or (rows, cols), or None.")
    return size  # type: ignore[return-value]


def _layout(
    grid: tuple[int, int], tile: tuple[int, int], overlap: int, sf: int, dtype: torch.dtype, device: torch.device
) -> tuple[list[_Tile], torch.Tensor]:
    """The tiles of a latent ``grid`` (h, w) and the summed pixel weights ``[H, W]`` (to divide by)."""
    th, tw = min(tile[0], grid[0]), min(tile[1], grid[1])
    ys, xs = tile_starts(grid[0], th, overlap), tile_starts(grid[1], tw, overlap)
    ry, rx = _ramps(ys, th, sf), _ramps(xs, tw, sf)
    total = torch.zeros(grid[0] * sf, grid[1] * sf, dtype=torch.float64)
    tiles = []
    for y, wy in zip(ys, ry):
        for x, wx in zip(xs, rx):
            weight = torch.outer(wy, wx)
            t = _Tile(y, x, th, tw, weight.to(device=device, dtype=dtype))
            rows, cols = t.pixels(sf)
            total[rows, cols] += weight
            tiles.append(t)
    return tiles, total.to(device=device, dtype=dtype)


def _check_overlap(overlap: int, grid: tuple[int, int], size: tuple[int, int]) -> None:
    if isinstance(overlap, bool) or not isinstance(overlap, int) or overlap < 0:
        raise ValueError(f"overlap={overlap!r}: give the overlap of neighbouring tiles in latent cells (an int >= 0).")
    for name, t, g in (("rows", size[0], grid[0]), ("cols", size[1], grid[1])):
        if t < g and 2 * overlap > t:
            raise ValueError(
                f"tile {name}={t} with overlap={overlap}: the overlap can be at most half the tile "
                f"(use overlap <= {t // 2}, or a tile of at least {2 * overlap} cells)."
            )


def _plan(tokenizer, z: torch.Tensor, tile: TileArg, overlap: int) -> tuple[torch.Tensor, Optional[tuple[int, int]]]:
    """Validated ``z`` (5-D, on the weights' device/dtype) and the tile size, or None for a plain decode."""
    z = tokenizer._like_weights(tokenizer._check_latents(z))
    grid = (int(z.shape[-2]), int(z.shape[-1]))
    size = _tile_size(tile)
    if size is not None:
        _check_overlap(overlap, grid, size)
        if size[0] >= grid[0] and size[1] >= grid[1]:
            size = None  # one tile covering the grid is the plain decode
    return z, size


def _target(tokenizer, out_device, out_dtype) -> tuple[torch.device, torch.dtype]:
    weight = next(tokenizer.parameters())
    device = torch.device(out_device) if out_device is not None else weight.device
    return device, (out_dtype if out_dtype is not None else weight.dtype)


# ---- the decoder, split into a whole-frame stem and a tiled tail ---------------------------------------------------
def stem_levels(config: TokenizerConfig) -> int:
    """Up-sampling levels in the stem (the part run on whole frames, with the frame-wide attention)."""
    return min(STEM_LEVELS, len(config.dim_mult) - 1)  # the last level does not up-sample


def decode_stem(tokenizer, z_frame: torch.Tensor, cache: CausalCache) -> torch.Tensor:
    """One latent frame ``[B, d, 1, h, w]`` -> features after the first STEM_LEVELS up-sampling levels."""
    decoder = tokenizer.decoder
    h = decoder.conv1(tokenizer.conv2(z_frame), cache)
    res1, attn, res2 = decoder.middle
    h = res2(attn(res1(h, cache)), cache)
    for level in decoder.upsamples[: stem_levels(tokenizer.config)]:
        h = level(h, cache)
    return h


def decode_tail(tokenizer, features: torch.Tensor, cache: CausalCache) -> torch.Tensor:
    """Stem features of one region -> its frames ``[B, 3, n, H, W]`` (the rest of ``Decoder3d.forward``)."""
    decoder = tokenizer.decoder
    h = features
    for level in decoder.upsamples[stem_levels(tokenizer.config) :]:
        h = level(h, cache)
    norm, _, conv = decoder.head
    return unpatchify(conv(F.silu(norm(h)), cache))


def _stem_scale(config: TokenizerConfig) -> int:
    """Stem feature cells per latent cell along H and W."""
    return 2 ** stem_levels(config)


def _out_of_memory(tokenizer, z: torch.Tensor, size: Optional[tuple[int, int]], overlap: int,
                   error: BaseException) -> torch.OutOfMemoryError:
    """An out-of-memory error that says which setting to change."""
    config = tokenizer.config
    grid = (int(z.shape[3]), int(z.shape[4]))
    dtype = next(tokenizer.parameters()).dtype
    frames = f"{config.pixel_frames(int(z.shape[2]))} frames of {grid[0] * config.spatial_factor}x" \
             f"{grid[1] * config.spatial_factor}"
    if size is None:
        need = estimate_decode_memory(config, grid, None, overlap, dtype).total
        try:
            advice = choose_tile(config, grid, need // 4, overlap, dtype)
        except ValueError:
            advice = None
        hint = f"decode in tiles (tile={advice[0] if advice and advice[0] == advice[1] else advice})" if advice \
            else "decode in tiles"
        message = (f"out of memory decoding {frames} on {z.device} (whole frames need about "
                   f"{need / 2**30:.1f} GiB beyond the weights): {hint}, keep the output off the device "
                   f"(out_device='cpu'), or offload the other models first.")
    else:
        smaller = tuple(max(2 * overlap, 4, s // 2) for s in size)
        message = (f"out of memory decoding {frames} on {z.device} in {size[0]}x{size[1]}-cell tiles: use smaller tiles "
                   f"(e.g. tile={smaller}), out_device='cpu' to keep the output off the device, or offload the other "
                   f"models first.")
    oom = torch.OutOfMemoryError(f"{message} ({error})")
    return oom


def tail_receptive_field(config: TokenizerConfig) -> int:
    """Pixels from a tile border within which a tiled decode can differ from the untiled one.

    A 3x3 conv on cells of ``c`` pixels reaches ``c`` pixels beyond its cell; a nearest 2x up-sampling adds up to half
    a coarse cell (a fine cell sits inside a coarse one); summed over the tiled levels and the head (1 px for the
    final 2x2 unpatchify).
    """
    sf, levels = config.spatial_factor, len(config.dim_mult)
    reach = 0
    for i in range(STEM_LEVELS, levels):
        cell = sf // 2**i  # pixels per feature cell at level i
        reach += 2 * (config.num_res_blocks + 1) * cell
        if i < levels - 1:
            reach += cell // 2 + cell // 2  # up-sampling alignment, then the 3x3 conv at the finer level
    last = sf // 2 ** (levels - 1)
    return reach + last + last // 2  # head conv, unpatchify


# ---- decoding -----------------------------------------------------------------------------------------------------
def decode_tiled(
    tokenizer,
    z: torch.Tensor,
    tile: TileArg = None,
    overlap: int = 4,
    out_device: Optional[Union[str, torch.device]] = None,
    out_dtype: Optional[torch.dtype] = None,
    progress: Optional[Progress] = None,
) -> torch.Tensor:
    """Decode ``z`` ``[B, d, t, h, w]`` (or ``[B, d, h, w]``) to frames ``[B, 3, 1 + tf(t-1), h*sf, w*sf]``, tile by
    tile.

    Args:
        tokenizer: an :class:`~grn_core.tokenizer.HBQTokenizer` (any device and dtype).
        tile: latent cells per tile, ``int`` or ``(rows, cols)``; ``None`` (or a tile at least the grid) decodes
            whole frames and equals ``tokenizer.decode(z)`` exactly.
        overlap: latent cells shared by neighbouring tiles (at most half a tile), blended linearly in pixel space.
        out_device: where the frames are assembled (default: the tokenizer's device, like ``decode``). ``"cpu"``
            keeps the output and the stored stem features off the GPU.
        out_dtype: dtype of the result (default: the tokenizer's, like ``decode``); tiles are blended in at least
            float32 first.
        progress: called as ``progress(done, total)`` after each decoded chunk.
    """
    z, size = _plan(tokenizer, z, tile, overlap)
    device, dtype = _target(tokenizer, out_device, out_dtype)
    try:
        return _decode_by_tile(tokenizer, z, size, overlap, device, dtype, progress)
    except torch.OutOfMemoryError as error:
        raise _out_of_memory(tokenizer, z, size, overlap, error) from error


def _decode_by_tile(tokenizer, z: torch.Tensor, size: Optional[tuple[int, int]], overlap: int, device: torch.device,
                    dtype: torch.dtype, progress: Optional[Progress]) -> torch.Tensor:
    latent_frames = int(z.shape[2])
    if size is None:
        frames = []
        for i, chunk in enumerate(tokenizer.decode_iter(z)):
            frames.append(chunk.to(device=device, dtype=dtype))
            if progress is not None:
                progress(i + 1, latent_frames)
        return torch.cat(frames, dim=2)

    config = tokenizer.config
    sf, scale, work = config.spatial_factor, _stem_scale(config), compute_dtype(dtype)
    tiles, total = _layout((int(z.shape[3]), int(z.shape[4])), size, overlap, sf, work, device)
    steps = latent_frames * (1 + len(tiles))
    # The stem of every latent frame, once (cheap, and kept off the compute device when out_device says so).
    stem_cache, stems = CausalCache(), []
    for i in range(latent_frames):
        stems.append(decode_stem(tokenizer, z[:, :, i : i + 1], stem_cache).to(device))
        stem_cache.advance()
        if progress is not None:
            progress(i + 1, steps)
    del stem_cache
    compute = z.device
    out = torch.zeros(z.shape[0], 3, config.pixel_frames(latent_frames), *total.shape, dtype=work, device=device)
    done = latent_frames
    for t in tiles:
        rows, cols = t.pixels(sf)
        cache, start = CausalCache(), 0
        for features in stems:
            chunk = decode_tail(tokenizer, t.crop(features, scale).to(compute), cache).to(device=device, dtype=work)
            cache.advance()
            n = chunk.shape[2]
            out[:, :, start : start + n, rows, cols].addcmul_(chunk, t.weight)
            start += n
            del chunk
            done += 1
            if progress is not None:
                progress(done, steps)
    return out.div_(total).to(dtype)


def decode_tiled_iter(
    tokenizer,
    z: torch.Tensor,
    tile: TileArg = None,
    overlap: int = 4,
    out_device: Optional[Union[str, torch.device]] = None,
    out_dtype: Optional[torch.dtype] = None,
) -> Iterator[torch.Tensor]:
    """Like :func:`decode_tiled`, but yields finished chunks ``[B, 3, n, H, W]`` latent frame by latent frame
    (n = 1, then ``temporal_factor``). ``tile=None`` yields exactly ``tokenizer.decode_iter(z)``'s chunks (moved or
    cast when ``out_device`` / ``out_dtype`` are given)."""
    z, size = _plan(tokenizer, z, tile, overlap)
    device, dtype = _target(tokenizer, out_device, out_dtype)
    try:
        yield from _decode_by_frame(tokenizer, z, size, overlap, device, dtype)
    except torch.OutOfMemoryError as error:
        raise _out_of_memory(tokenizer, z, size, overlap, error) from error


def _decode_by_frame(tokenizer, z: torch.Tensor, size: Optional[tuple[int, int]], overlap: int,
                     device: torch.device, dtype: torch.dtype) -> Iterator[torch.Tensor]:
    if size is None:
        for chunk in tokenizer.decode_iter(z):
            yield chunk.to(device=device, dtype=dtype)
        return
    config = tokenizer.config
    sf, scale, work = config.spatial_factor, _stem_scale(config), compute_dtype(dtype)
    tiles, total = _layout((int(z.shape[3]), int(z.shape[4])), size, overlap, sf, work, device)
    stem_cache = CausalCache()
    caches = [CausalCache() for _ in tiles]  # one per region: the cache holds that region's feature maps
    for i in range(int(z.shape[2])):
        features = decode_stem(tokenizer, z[:, :, i : i + 1], stem_cache)
        stem_cache.advance()
        frame = None
        for t, cache in zip(tiles, caches):
            chunk = decode_tail(tokenizer, t.crop(features, scale), cache).to(device=device, dtype=work)
            cache.advance()
            if frame is None:
                frame = torch.zeros(*chunk.shape[:3], *total.shape, dtype=work, device=device)
            rows, cols = t.pixels(sf)
            frame[:, :, :, rows, cols].addcmul_(chunk, t.weight)
            del chunk
        del features
        yield frame.div_(total).to(dtype)


# ---- memory model -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DecodeMemoryEstimate:
    """Bytes a decode needs beyond the tokenizer's weights (see :func:`estimate_decode_memory`)."""

    cache: int  # causal caches alive at once
    activations: int  # transient activations of one chunk (stem of a whole frame, tail of one tile)
    stored: int  # decode_tiled: the assembled frames and the stem features of every latent frame, when on-device

    @property
    def total(self) -> int:
        return self.cache + self.activations + self.stored


# Peak transient activations of one chunk, in units of the largest tensor that chunk produces, from tracking live
# tensor storage through decodes on the meta device (benchmarks/memory_accounting.py), the same for every width tried
# (16 to the released 256): whole decoder 4.5 in float32/float64 and 7.0 in bf16/fp16 (the channel norms work in
# float32); whole-frame stem 3.125 in both. Half a unit of margin (0.375 for the stem) on top; convolution
# workspaces (cuDNN, oneDNN) and allocator slack are not included.
_ACTIVATION_FACTOR = {"full": 5.0, "half": 7.5, "stem": 3.5}


def _level_widths(config: TokenizerConfig, i: int) -> list[int]:
    """Input channels of the k=3 causal convs of decoder level ``i`` (its residual blocks)."""
    w = config.decoder_widths
    return [w[i], w[i + 1]] + [w[i + 1]] * (2 * config.num_res_blocks)


def _per_cell(config: TokenizerConfig) -> dict[str, int]:
    """Elements per latent cell: causal cache and largest chunk tensor, for the stem and for the tail.

    Every k=3 causal conv caches its last two input frames; level i runs at 2^i times the latent resolution.
    """
    widths, levels = config.decoder_widths, len(config.dim_mult)
    stem_levels = min(STEM_LEVELS, levels - 1)
    cache = {"stem": 2 * config.z_dim + 4 * 2 * widths[0], "tail": 0}  # decoder.conv1, middle (4 convs)
    largest = {"stem": widths[0], "tail": 0}
    frames = 1
    for i in range(levels):
        part = "stem" if i < stem_levels else "tail"
        area = 4**i
        cache[part] += 2 * area * sum(_level_widths(config, i))
        largest[part] = max(largest[part], frames * widths[i + 1] * area)
        if i < levels - 1:
            if config.temporal_upsample[i]:
                cache[part] += 2 * area * widths[i + 1]  # the up-sampling step's time conv
                frames *= 2
            largest[part] = max(largest[part], frames * widths[i + 1] * 4 * area)
    cache["tail"] += 2 * 4 ** (levels - 1) * widths[-1]  # head conv
    # stem output per latent frame (stored by decode_tiled): the last stem level's output
    out_frames = 2 ** sum(int(f) for f in config.temporal_upsample[:stem_levels])
    stem_out = out_frames * widths[stem_levels] * 4**stem_levels
    return {"stem_cache": cache["stem"], "tail_cache": cache["tail"], "stem_act": largest["stem"],
            "tail_act": largest["tail"], "stem_out": stem_out}


def estimate_decode_memory(
    config: TokenizerConfig,
    grid: tuple[int, int],
    tile: TileArg = None,
    overlap: int = 4,
    dtype: torch.dtype = torch.float32,
    frames: int = 1,
    order: str = "tiles",
    stored_on_device: bool = False,
) -> DecodeMemoryEstimate:
    """Estimated decode memory beyond the weights, for a latent ``grid`` (h, w) of ``frames`` latent frames.

    ``order="tiles"`` is :func:`decode_tiled` (one tile's cache alive), ``"frames"`` is :func:`decode_tiled_iter`
    (every tile's cache alive). ``stored_on_device`` adds decode_tiled's output buffer, blending weights and stored
    stem features (they grow with ``frames``; with ``out_device="cpu"`` they are not on the compute device). ``tile=None``
    estimates the plain ``decode_iter``. Counts tensors, not allocator slack or convolution workspaces.
    """
    if order not in ("tiles", "frames"):
        raise ValueError(f"order={order!r}: use 'tiles' (decode_tiled) or 'frames' (decode_tiled_iter).")
    size = _tile_size(tile)
    itemsize = torch.empty((), dtype=dtype).element_size()
    work_size = torch.empty((), dtype=compute_dtype(dtype)).element_size()
    factor = _ACTIVATION_FACTOR["full" if compute_dtype(dtype) == dtype else "half"]
    c = _per_cell(config)
    cells = grid[0] * grid[1]
    if size is None or (size[0] >= grid[0] and size[1] >= grid[1]):
        cache = (c["stem_cache"] + c["tail_cache"]) * cells
        acts = factor * max(c["stem_act"], c["tail_act"]) * cells
        return DecodeMemoryEstimate(cache * itemsize, int(acts * itemsize), 0)
    th, tw = min(size[0], grid[0]), min(size[1], grid[1])
    tile_cells = th * tw
    tiles = len(tile_starts(grid[0], th, overlap)) * len(tile_starts(grid[1], tw, overlap))
    # the blending weights of every tile and their sum, in the blending dtype, where the frames are assembled
    weights = (tiles * tile_cells + cells) * config.spatial_factor**2 * work_size
    tail_acts = factor * c["tail_act"] * tile_cells * itemsize
    stem_acts = _ACTIVATION_FACTOR["stem"] * c["stem_act"] * cells * itemsize
    if order == "frames":
        # Every tile's cache, the stem's, the current frame's stem features, the frame being blended and one
        # tile's chunk in the blending dtype.
        cache = (c["stem_cache"] * cells + c["tail_cache"] * tile_cells * tiles) * itemsize
        pixels_per_chunk = 3 * config.temporal_factor * config.spatial_factor**2
        blend = pixels_per_chunk * (cells + tile_cells) * work_size
        acts = weights + max(stem_acts, c["stem_out"] * cells * itemsize + tail_acts + blend)
    else:
        # Two phases: the stem of all latent frames (its cache, whole-frame activations), then tile after tile (its
        # cache, its crop of the stem features copied in, its activations).
        stem_phase = (c["stem_cache"] * cells * itemsize, stem_acts)
        tail_phase = (c["tail_cache"] * tile_cells * itemsize, tail_acts + c["stem_out"] * tile_cells * itemsize)
        cache, acts = max(stem_phase, tail_phase, key=sum)
    stored = 0
    if stored_on_device and order == "tiles":
        pixels = 3 * config.pixel_frames(frames) * cells * config.spatial_factor**2
        stored = pixels * work_size + c["stem_out"] * cells * frames * itemsize + weights
    return DecodeMemoryEstimate(int(cache), int(acts), stored)


def choose_tile(
    config: TokenizerConfig,
    grid: tuple[int, int],
    budget_bytes: int,
    overlap: int = 4,
    dtype: torch.dtype = torch.float32,
    order: str = "tiles",
) -> Optional[tuple[int, int]]:
    """The largest tile (fewest tiles, then the squarest, then the largest) whose estimated decode memory fits
    ``budget_bytes`` (what the decode may use beyond the weights; outputs assumed off-device).

    Returns None when whole frames fit (decode untiled). Raises ValueError when even the smallest useful tile
    (``2 * overlap`` cells a side, at least 4) does not fit.
    """
    if estimate_decode_memory(config, grid, None, overlap, dtype, order=order).total <= budget_bytes:
        return None
    smallest = max(4, 2 * overlap)
    best, chosen = None, None
    for th in range(min(smallest, grid[0]), grid[0] + 1):
        for tw in range(min(smallest, grid[1]), grid[1] + 1):
            if estimate_decode_memory(config, grid, (th, tw), overlap, dtype, order=order).total > budget_bytes:
                break  # wider tiles only cost more
            count = len(tile_starts(grid[0], th, overlap)) * len(tile_starts(grid[1], tw, overlap))
            key = (count, abs(th - tw), -th * tw)
            if best is None or key < best:
                best, chosen = key, (th, tw)
    if chosen is None:
        side = (min(smallest, grid[0]), min(smallest, grid[1]))
        need = estimate_decode_memory(config, grid, side, overlap, dtype, order=order).total
        raise ValueError(
            f"decoding needs about {need / 2**30:.2f} GiB even in {side[0]}x{side[1]}-cell tiles but the budget is "
            f"{budget_bytes / 2**30:.2f} GiB; free memory (offload the refiner and text encoder), decode in bf16, "
            f"or lower the overlap ({overlap})."
        )
    return chosen
