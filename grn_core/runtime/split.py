"""Work that several ranks share after sampling and before it: the tokenizer decode and the text encoder.

Every rank of a ``torchrun`` group holds the same final bits after sampling (``--parallel cfg``, ``sp``, ``cfg+sp``),
so the decode can be split instead of run by rank 0 alone, and the prompt only needs encoding once::

    encode = (lambda: encode_prompt(model, encoder, prompt, negative)) if plan.is_main else None
    feats = broadcast_features(plan, encode)          # the text encoder runs on rank 0 only
    ...                                               # sampling: every rank ends with the same bits
    frames = decode_tokens_split(plan, model, bits)   # rank 0: == pipeline.decode_tokens(model, bits, tile=None)

**Splitting the decode exactly.** The HBQ decoder is causal in time and runs one latent frame at a time; what it
carries from earlier latent frames is the :class:`~grn_core.tokenizer.CausalCache`: every k=3 causal conv keeps the
last two frames it was fed. There is no recurrence: the cache holds *inputs* of convolutions, so the output of latent
frame ``s`` depends on latent frames ``s - R .. s`` only, with ``R`` the temporal receptive field of the stack
(:func:`temporal_receptive_field`: 28 latent frames for the tiny tokenizer, 38 for the released layout). A rank can
therefore decode latent frames ``[a, b)`` exactly by first feeding frames ``a - R .. a - 1`` into a fresh cache and
dropping their output ("warm-up"): every value its kept frames read was computed from the same inputs by the same
operations on tensors of the same shapes, so the frames equal the single-process decode bit for bit (where the
kernels are deterministic for a given shape, as on the CPU; see ``tests/test_parallel_split.py``).

Because ``R`` is large, splitting time only pays for long clips: with ``t`` latent frames and ``W`` ranks the busiest
rank decodes about ``t / W + R`` of them, fewer than ``t`` only when ``t > R W / (W - 1)`` (more than 76 latent
frames, i.e. 301 pixel frames, on 2 ranks for the released tokenizer). For the usual 81-frame clips the decode is
split in **space** instead: every rank runs the decoder's *stem* (the latent-resolution part with the frame-wide
attention, ~5 % of the work and memory) on whole frames, then the *tail* (everything after it, only local
convolutions, up-sampling and per-position norms) on a band of the frame plus a halo as wide as the tail's spatial
receptive field (:func:`stem_span`), and keeps the band. The halo absorbs everything the artificial crop border
changes, also through the causal cache (a path from input to output passes each layer once whatever frames it goes
through, so time does not widen the reach). Clips too short and frames too small for either to save work are decoded
by rank 0 alone (``strategy="single"``). :func:`plan_decode_split` says which strategy and which parts.

Pieces are gathered to rank 0 (``everywhere=True``: to every rank) with one ``gather`` / ``all_gather``; pieces of
unequal length are padded to the longest, and every rank computes every piece's length from the same plan, so no
sizes travel.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Sequence, Tuple, Union

import torch

from ..tokenizer.causal import CausalCache, unpatchify
from ..tokenizer.config import TokenizerConfig
from ..tokenizer.tiled import decode_stem, decode_tail, stem_levels
from .distributed import DistributedError, ParallelPlan

__all__ = ["DecodeSplit", "SplitError", "broadcast_features", "decode_frames", "decode_split", "decode_tokens_split",
           "plan_decode_split", "stem_span", "temporal_receptive_field"]

STRATEGIES = ("auto", "time", "space", "single")
# A split must save at least this fraction of the busiest rank's work over one rank decoding alone; below it the
# gather and the duplicated stem are not worth it.
MIN_SAVING = 0.1


class SplitError(ValueError):
    """A split decode or a feature broadcast got arguments it cannot use (the message names the value and the fix)."""


# ---- receptive fields ------------------------------------------------------------------------------------------------
def _k3_convs_per_level(config: TokenizerConfig) -> int:
    """k=3 causal convs in one decoder level: ``num_res_blocks + 1`` residual blocks of two convs each."""
    return 2 * (config.num_res_blocks + 1)


def temporal_receptive_field(config: TokenizerConfig) -> int:
    """``R``: the output of latent frame ``s`` depends on latent frames ``s - R .. s`` only (``s - R >= 1``).

    Walks the decoder backwards from the first pixel frame of latent frame ``s``. Positions count frames at a
    layer's rate ``r`` (frames per latent frame): latent frame ``i >= 1`` holds positions ``(i-1) r + 1 .. i r``.
    A k=3 causal conv at that rate reads its input at ``p - 2 .. p`` (its cache holds two frames): ``p -= 2``. A
    temporal up-sampling turns input position ``q`` into output positions ``2q - 1, 2q`` after its own k=3 causal
    conv, so output ``p`` needs input ``ceil(p / 2) - 2``. 1x1 convs, the duplicating shortcut (output ``p`` from
    input ``ceil(p / 2)``, a shorter path), norms and the per-frame attention add nothing. Order backwards: head
    conv, then per level (deepest last) its up-sampling, then its residual convs; the middle block (4 convs) and
    the decoder's first conv.

    Released layout (3 levels of 3 residual blocks and a last level of 3, two temporal up-samplings): 38. The tiny
    tokenizer (2 residual blocks per level): 28. ``tests/test_parallel_split.py`` checks both by perturbing one
    latent frame and finding the last output chunk that changes.
    """
    tf, levels = config.temporal_factor, len(config.dim_mult)
    s = 4 * levels * 64 + 1000  # any latent frame far enough from frame 0 (the walk is shift-invariant)
    p = (s - 1) * tf + 1  # first pixel frame of latent frame s
    p -= 2  # head conv
    for i in reversed(range(levels)):
        if i < levels - 1 and config.temporal_upsample[i]:
            p = -(-p // 2) - 2
        p -= 2 * _k3_convs_per_level(config)
    p -= 2 * 4 + 2  # middle (two residual blocks) and the decoder's first conv
    return s - p


def stem_span(config: TokenizerConfig, start: int, stop: int, size: int) -> Tuple[int, int]:
    """The stem-feature cells ``[lo, hi)`` (along one axis of ``size`` cells) the tail needs to produce the pixels of
    stem cells ``[start, stop)`` exactly, clamped to the frame.

    Backwards from pixels to stem cells: the final 2x2 unpatchify (pixel ``x`` from head cell ``x // 2``), the
    head's 3x3 conv (one cell each side), then per tail level (finest first) its up-sampling -- a 3x3 conv at the
    finer resolution (one fine cell) after a nearest 2x (fine cell ``f`` from coarse ``f // 2``) -- and its
    residual blocks' 3x3 convs (one cell each). Convs pad with zeros at a crop's border just as at the frame's, so
    beyond this span the crop border changes nothing; at the frame border the crop *is* the frame.
    """
    levels, first = len(config.dim_mult), stem_levels(config)
    px = config.spatial_factor // 2 ** first  # pixels per stem cell
    lo, hi = (start * px) // 2, -(-(stop * px) // 2)  # head-level cells (unpatchify)
    lo, hi = lo - 1, hi + 1  # head conv
    for i in reversed(range(first, levels)):
        if i < levels - 1:  # spatial up-sampling at the end of level i
            lo, hi = lo - 1, hi + 1
            lo, hi = lo // 2, -(-hi // 2)
        n = _k3_convs_per_level(config)
        lo, hi = lo - n, hi + n
    return max(0, lo), min(size, hi)


# ---- planning --------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DecodeSplit:
    """Who decodes what: ``strategy`` ``"time"`` (``parts`` are latent-frame ranges), ``"space"`` (ranges of stem
    cells along ``axis``, -2 rows or -1 columns) or ``"single"`` (rank 0 alone; ``parts`` covers every frame).
    ``work``: the busiest rank's work relative to one rank decoding alone (1.0 for single)."""

    strategy: str
    parts: Tuple[Tuple[int, int], ...]
    axis: int = 0
    warmup: int = 0
    work: float = 1.0


def _decoder_work(config: TokenizerConfig) -> Tuple[float, float]:
    """Multiply-adds per latent cell and latent frame of the decoder's stem and tail (convolutions only).

    A conv ``c_in -> c_out`` with ``k`` taps at level ``i`` runs on ``4^i`` cells per latent cell and ``r_i``
    frames per latent frame (``r`` doubles at each temporal up-sampling): ``c_in c_out k 4^i r_i``.
    """
    widths, levels, first = config.decoder_widths, len(config.dim_mult), stem_levels(config)
    work = [config.z_dim * widths[0] * 27 + 4 * widths[0] ** 2 * 27 + 4 * widths[0] ** 2, 0.0]  # conv1, middle
    rate = 1
    for i in range(levels):
        part = 0 if i < first else 1
        area, w_in, w_out = 4 ** i, widths[i], widths[i + 1]
        convs = w_in * w_out + (_k3_convs_per_level(config) - 1) * w_out * w_out
        work[part] += convs * 27 * area * rate
        if i < levels - 1:
            if config.temporal_upsample[i]:
                work[part] += w_out * 2 * w_out * 3 * area * rate
                rate *= 2
            work[part] += w_out * w_out * 9 * 4 * area * rate
    work[1] += widths[-1] * 12 * 27 * 4 ** (levels - 1) * rate  # head
    return float(work[0]), float(work[1])


def _balanced(total: int, parts: int, cost: Callable[[int, int], int]) -> Optional[List[Tuple[int, int]]]:
    """Contiguous ranges covering ``[0, total)`` in ``parts`` pieces minimising the largest ``cost(a, b)`` (cost
    grows with ``b`` and falls with ``a``): bisect the bound, fill greedily. Unused parts are empty
    ``(total, total)``."""

    def fill(bound: int) -> Optional[List[Tuple[int, int]]]:
        ranges, a = [], 0
        while a < total:
            if len(ranges) == parts or cost(a, a + 1) > bound:
                return None
            b = a + 1
            while b < total and cost(a, b + 1) <= bound:
                b += 1
            ranges.append((a, b))
            a = b
        return ranges + [(total, total)] * (parts - len(ranges))

    lo, hi = 1, cost(0, total)
    while lo < hi:
        mid = (lo + hi) // 2
        if fill(mid) is None:
            lo = mid + 1
        else:
            hi = mid
    return fill(lo)


def _check_strategy(strategy: str) -> None:
    if strategy not in STRATEGIES:
        raise SplitError(f"strategy={strategy!r}: use one of {', '.join(STRATEGIES)} ('auto' picks the one that "
                         "saves the most work).")


def plan_decode_split(config: TokenizerConfig, latent_shape: Sequence[int], world_size: int,
                      strategy: str = "auto") -> DecodeSplit:
    """How ``world_size`` ranks share decoding latents of ``(t, h, w)``.

    ``"time"``: contiguous latent-frame ranges balanced by the frames each rank decodes, warm-up included (a rank
    starting at ``a`` also decodes ``max(0, a - R) .. a - 1``). ``"space"``: bands of stem cells along the longer-
    paying axis, balanced by the crop each needs (band plus halo, :func:`stem_span`); every rank also runs the stem on
    whole frames. ``"auto"``: the cheaper of the two by :func:`_decoder_work`, or ``"single"`` unless it saves at least
    ``MIN_SAVING`` of the work. A forced strategy is used even when it saves nothing (it is exact all the same).
    """
    _check_strategy(strategy)
    t, h, w = (int(v) for v in latent_shape)
    if world_size < 1:
        raise SplitError(f"world_size={world_size}: needs at least 1 rank.")
    single = DecodeSplit("single", ((0, t),))
    if world_size == 1 or strategy == "single":
        return single
    stem, tail = _decoder_work(config)
    options = []
    if strategy in ("auto", "time"):
        r = temporal_receptive_field(config)
        parts = _balanced(t, world_size, lambda a, b: b - max(0, a - r))
        busiest = max(b - max(0, a - r) for a, b in parts if b > a)
        options.append(DecodeSplit("time", tuple(parts), warmup=r, work=busiest / t))
    if strategy in ("auto", "space"):
        scale = 2 ** stem_levels(config)
        for axis, size, other in ((-1, w * scale, h), (-2, h * scale, w)):
            def crop_of(a: int, b: int, size: int = size) -> int:
                lo, hi = stem_span(config, a, b, size)
                return hi - lo

            parts = _balanced(size, world_size, crop_of)
            crop = max(crop_of(a, b) for a, b in parts if b > a)
            work = (stem * h * w + tail * crop * other / scale) / ((stem + tail) * h * w)
            options.append(DecodeSplit("space", tuple(parts), axis=axis, work=work))
    best = min(options, key=lambda o: o.work)
    if strategy == "auto" and best.work > 1 - MIN_SAVING:
        return single
    return best


# ---- decoding one part -----------------------------------------------------------------------------------------------
def _pixel_frame(config: TokenizerConfig, latent: int) -> int:
    """Index of the first pixel frame of latent frame ``latent`` (frame 0 gives 1 pixel frame, the others ``tf``)."""
    return 0 if latent == 0 else 1 + config.temporal_factor * (latent - 1)


def decode_frames(tokenizer, z: torch.Tensor, start: int, stop: int, warmup: Optional[int] = None) -> torch.Tensor:
    """Pixel frames of latent frames ``[start, stop)`` of ``z`` ``[B, d, t, h, w]``, decoded after feeding the
    ``warmup`` latent frames before ``start`` (default :func:`temporal_receptive_field`) into a fresh cache.

    Equal to the matching slice of ``tokenizer.decode(z)`` when ``warmup >= R`` or the warm-up reaches frame 0.
    A warm-up that starts at ``a > 0`` runs with the cache's ``chunk_index`` set to ``a``: the first-chunk rules
    (no time doubling, frame 0's single pixel frame) belong to latent frame 0 only, and the empty cache stands for
    the frames before ``a``, which the receptive field makes irrelevant.
    """
    z = tokenizer._like_weights(tokenizer._check_latents(z))
    t = int(z.shape[2])
    if not 0 <= start <= stop <= t:
        raise SplitError(f"latent frames [{start}, {stop}) are outside 0..{t}; give 0 <= start <= stop <= {t}.")
    r = temporal_receptive_field(tokenizer.config) if warmup is None else int(warmup)
    if r < 0:
        raise SplitError(f"warmup={warmup}: give the number of latent frames to warm up on (>= 0).")
    begin = max(0, start - r) if start < stop else start
    cache = CausalCache()
    cache.chunk_index = begin
    chunks = []
    for i in range(begin, stop):
        frames = unpatchify(tokenizer.decoder(tokenizer.conv2(z[:, :, i:i + 1]), cache))
        cache.advance()
        if i >= start:
            chunks.append(frames)
    if not chunks:
        b, _, _, h, w = z.shape
        sf = tokenizer.config.spatial_factor
        return z.new_zeros(b, 3, 0, h * sf, w * sf)
    return torch.cat(chunks, dim=2)


def _decode_band(tokenizer, z: torch.Tensor, start: int, stop: int, axis: int) -> torch.Tensor:
    """Every frame of stem cells ``[start, stop)`` along ``axis``: stem on whole frames, tail on the band's crop."""
    config = tokenizer.config
    size = int(z.shape[axis]) * 2 ** stem_levels(config)
    lo, hi = stem_span(config, start, stop, size)
    px = config.spatial_factor // 2 ** stem_levels(config)
    keep = slice((start - lo) * px, (stop - lo) * px)
    stem_cache, tail_cache, chunks = CausalCache(), CausalCache(), []
    for i in range(int(z.shape[2])):
        features = decode_stem(tokenizer, z[:, :, i:i + 1], stem_cache)
        stem_cache.advance()
        crop = features.narrow(axis, lo, hi - lo)
        frames = decode_tail(tokenizer, crop, tail_cache)
        tail_cache.advance()
        chunks.append(frames[..., keep, :] if axis == -2 else frames[..., keep])
    return torch.cat(chunks, dim=2)


def _local_piece(tokenizer, z: torch.Tensor, split: DecodeSplit, rank: int) -> Tuple[torch.Tensor, List[int], int]:
    """This rank's frames, every piece's length along the gathered axis, and that axis (of ``[B, 3, T, H, W]``)."""
    config = tokenizer.config
    a, b = split.parts[rank]
    if split.strategy == "time":
        lengths = [_pixel_frame(config, q) - _pixel_frame(config, p) if q > p else 0 for p, q in split.parts]
        return decode_frames(tokenizer, z, a, b, split.warmup), lengths, 2
    px = config.spatial_factor // 2 ** stem_levels(config)
    lengths = [(q - p) * px for p, q in split.parts]
    axis = split.axis % 5
    if b > a:
        return _decode_band(tokenizer, z, a, b, split.axis), lengths, axis
    sf = config.spatial_factor
    shape = [int(z.shape[0]), 3, config.pixel_frames(int(z.shape[2])), int(z.shape[3]) * sf, int(z.shape[4]) * sf]
    shape[axis] = 0
    return z.new_zeros(shape), lengths, axis


# ---- gathering -------------------------------------------------------------------------------------------------------
def _gather_pieces(plan: ParallelPlan, piece: torch.Tensor, lengths: Sequence[int], axis: int,
                   everywhere: bool) -> Optional[torch.Tensor]:
    """Concatenate every rank's ``piece`` along ``axis`` on rank 0 (every rank with ``everywhere``), in rank order.

    Collectives need equal shapes: each piece is zero-padded to the longest along ``axis`` (every rank knows all
    lengths from the plan), travels on ``plan.device`` (NCCL needs CUDA tensors), and is cut back on arrival.
    """
    import torch.distributed as dist

    if piece.shape[axis] != lengths[plan.rank]:
        raise SplitError(f"rank {plan.rank} decoded {piece.shape[axis]} along dim {axis}, the plan says "
                         f"{lengths[plan.rank]}; every rank must run the same split (same z, same strategy).")
    longest = max(lengths)
    home = piece.device
    if piece.shape[axis] < longest:
        pad = list(piece.shape)
        pad[axis] = longest - piece.shape[axis]
        piece = torch.cat([piece, piece.new_zeros(pad)], dim=axis)
    piece = piece.to(plan.device).contiguous()
    if everywhere:
        parts = [torch.empty_like(piece) for _ in range(plan.world_size)]
        plan.guarded("gathering the decoded frames", lambda: dist.all_gather(parts, piece))
    else:
        parts = [torch.empty_like(piece) for _ in range(plan.world_size)] if plan.is_main else None
        plan.guarded("gathering the decoded frames", lambda: dist.gather(piece, parts, dst=0))
        if parts is None:
            return None
    return torch.cat([p.narrow(axis, 0, n) for p, n in zip(parts, lengths)], dim=axis).to(home)


def decode_split(plan: ParallelPlan, tokenizer, z: torch.Tensor, strategy: str = "auto",
                 everywhere: bool = False) -> Optional[torch.Tensor]:
    """``tokenizer.decode(z)`` shared by the ranks of ``plan``: frames ``[B, 3, T, H, W]`` on rank 0 (on every rank
    with ``everywhere``), None on the others. Every rank calls it with the same ``z``.

    ``strategy``: ``"auto"`` (see :func:`plan_decode_split`), or force ``"time"``, ``"space"`` or ``"single"``. Exact
    for every strategy (module docstring). Without a process group (``plan.active`` False) it is a plain decode.
    Run under ``torch.inference_mode()`` unless gradients are wanted (the caller's mode is kept).
    """
    _check_strategy(strategy)
    z = tokenizer._like_weights(tokenizer._check_latents(z))
    split = plan_decode_split(tokenizer.config, tuple(z.shape[2:]), plan.world_size if plan.active else 1, strategy)
    if split.strategy == "single":
        if plan.is_main or everywhere or not plan.active:
            return decode_frames(tokenizer, z, 0, int(z.shape[2]), 0)
        return None
    piece, lengths, axis = _local_piece(tokenizer, z, split, plan.rank)
    return _gather_pieces(plan, piece, lengths, axis, everywhere)


def decode_tokens_split(plan: ParallelPlan, model, tokens: Any, strategy: str = "auto",
                        everywhere: bool = False) -> Optional[torch.Tensor]:
    """``pipeline.decode_tokens(model, tokens, tile=None)`` shared by the ranks: frames ``[B, T, H, W, 3]`` float32 in
    [0, 1] on the CPU, on rank 0 (every rank with ``everywhere``), None on the others. Every rank passes the same
    bits (a ``TokenResult`` or ``[B, rounds*d, t, h, w]``); samples are decoded one at a time, as decode_tokens does.

    When a rank's GPU has too little free memory for whole frames (``decode_tokens`` would decode spatial tiles
    there), the ranks agree to let rank 0 run ``decode_tokens`` alone, tiled: a split piece stays on its GPU until the
    gather, which a tight GPU cannot afford.
    """
    from ..pipeline import TokenResult
    from .memory import decode_advice, oom_guard

    bits = tokens.bits if isinstance(tokens, TokenResult) else tokens
    expected = model.rounds * model.latent_channels
    if not torch.is_tensor(bits) or bits.dim() != 5 or bits.shape[1] != expected:
        shape = tuple(bits.shape) if torch.is_tensor(bits) else type(bits).__name__
        raise SplitError(f"the tokens have shape {shape} but this tokenizer decodes [B, {expected}, t, h, w] bit "
                         "maps; decode with the model that made them.")
    from .. import hbq

    tight = torch.tensor([1.0 if _needs_tiles(model, bits) else 0.0], device=plan.device)
    if plan.active:  # every rank must take the same path: one gather needs all of them
        import torch.distributed as dist

        plan.guarded("agreeing how to decode", lambda: dist.all_reduce(tight, op=dist.ReduceOp.MAX))
    if tight.item() > 0:
        from ..pipeline import decode_tokens

        return decode_tokens(model, bits) if (plan.is_main or everywhere) else None
    samples = []
    with model.stage(model.tokenizer), torch.inference_mode():
        weight = next(model.tokenizer.parameters())
        advice = lambda: decode_advice(0, model.offload.describe())  # noqa: E731
        with oom_guard("the tokenizer decode", advice, model.compute_device):
            for b in range(bits.shape[0]):
                z = hbq.bits_to_features(bits[b:b + 1].to(weight.device), model.rounds, dtype=weight.dtype)
                video = decode_split(plan, model.tokenizer, z, strategy, everywhere)
                if video is not None:
                    video = video.to(device="cpu", dtype=torch.float32)
                    samples.append(((video[0] + 1) / 2).clamp_(0, 1).permute(1, 2, 3, 0).contiguous())
    return torch.stack(samples) if samples else None


def _needs_tiles(model, bits: torch.Tensor) -> bool:
    """Whether ``pipeline.decode_tokens`` would decode tiles on this rank: a CUDA device whose free memory does not
    hold a whole frame's decode (the same estimate, ``tokenizer.tiled.choose_tile``)."""
    from ..pipeline import DECODE_OVERLAP
    from ..tokenizer.tiled import choose_tile

    device = model.compute_device or model.device
    if device.type != "cuda":
        return False
    free, _ = torch.cuda.mem_get_info(device)
    dtype = next(model.tokenizer.parameters()).dtype
    try:
        return choose_tile(model.tokenizer.config, tuple(bits.shape[-2:]), int(free * 0.8), DECODE_OVERLAP,
                           dtype) is not None
    except ValueError:
        return True


# ---- prompt features -------------------------------------------------------------------------------------------------
_ALIGN = 16  # byte offsets in the packed buffer, so every tensor's bytes can be viewed as its dtype


def _dtype(name: str) -> torch.dtype:
    value = getattr(torch, name.rpartition(".")[2], None)
    if not isinstance(value, torch.dtype):
        raise SplitError(f"unknown dtype {name!r} in the feature header; every rank needs the same torch version.")
    return value


def _describe(value: Any, tensors: List[torch.Tensor], offset: List[int]) -> Any:
    """Header entry of one field: tensors (alone or in a list/tuple) by shape, dtype and byte offset; other values
    (strings, numbers, None) as they are. Appends the tensors to ``tensors``."""
    if torch.is_tensor(value):
        start = offset[0]
        nbytes = value.numel() * value.element_size()
        offset[0] = start + -(-nbytes // _ALIGN) * _ALIGN
        tensors.append(value)
        return {"tensor": [list(value.shape), str(value.dtype), start, nbytes, value.device.type]}
    if isinstance(value, (list, tuple)) and value and all(torch.is_tensor(v) for v in value):
        return {"tensors": [_describe(v, tensors, offset) for v in value], "tuple": isinstance(value, tuple)}
    return {"value": value}


def _rebuild(entry: dict, buffer: torch.Tensor, device: torch.device) -> Any:
    if "value" in entry:
        return entry["value"]
    if "tensors" in entry:
        items = [_rebuild(e, buffer, device) for e in entry["tensors"]]
        return tuple(items) if entry["tuple"] else items
    shape, dtype, start, nbytes, kind = entry["tensor"]
    t = buffer[start:start + nbytes].view(_dtype(dtype)).reshape(shape).clone()
    return t.to("cpu" if kind == "cpu" else device)


def _pack(features: Any, device: torch.device) -> Tuple[dict, torch.Tensor]:
    """``(header, uint8 buffer)`` of a PromptFeatures: one buffer for all its tensors, one broadcast."""
    tensors: List[torch.Tensor] = []
    offset = [0]
    fields = {f.name: _describe(getattr(features, f.name), tensors, offset) for f in dataclasses.fields(features)}
    buffer = torch.zeros(offset[0], dtype=torch.uint8, device=device)
    for t, entry in zip(tensors, _flat_entries(fields)):
        _, _, start, nbytes, _ = entry["tensor"]
        if nbytes:
            buffer[start:start + nbytes] = t.detach().to(device).contiguous().reshape(-1).view(torch.uint8)
    return {"fields": fields, "nbytes": offset[0]}, buffer


def _flat_entries(fields: dict) -> List[dict]:
    out: List[dict] = []

    def walk(entry: dict) -> None:
        if "tensor" in entry:
            out.append(entry)
        for e in entry.get("tensors", ()):
            walk(e)

    for entry in fields.values():
        walk(entry)
    return out


def broadcast_features(plan: ParallelPlan, features: Union[Any, Callable[[], Any], None] = None) -> Any:
    """Rank 0's prompt features on every rank: the text encoder runs on rank 0 only.

    ``features``: on rank 0 a ``PromptFeatures`` or a callable returning one (called on rank 0 only); the other
    ranks pass None (or the same callable, which they never call), so they need no text encoder loaded. Every
    rank gets a ``PromptFeatures`` with equal tensors (``cond``, ``uncond`` or None, single tensors or lists of any
    length), dtypes and strings (``task``, ``text``, ``negative``). Tensors rank 0 holds on the CPU arrive on the
    CPU, others on ``plan.device``.

    Transport: a header (field names, shapes, dtypes, byte offsets) by ``broadcast_object_list``, then every tensor's
    bytes in one uint8 buffer by ``broadcast`` (any dtype travels, bf16 over gloo included). If rank 0 fails to
    produce the features, the others raise :class:`DistributedError` naming rank 0's error instead of waiting.
    """
    import torch.distributed as dist

    if not plan.active:
        value = features() if callable(features) else features
        if value is None:
            raise SplitError("broadcast_features without a process group needs the features (or a callable "
                             "returning them); got None.")
        return value
    from ..pipeline import PromptFeatures

    transport = plan.device
    if plan.is_main:
        try:
            value = features() if callable(features) else features
            if not isinstance(value, PromptFeatures):
                raise SplitError(f"rank 0 must pass a PromptFeatures (or a callable returning one) to "
                                 f"broadcast_features; got {type(value).__name__}.")
            header, buffer = _pack(value, transport)
        except Exception as error:  # tell the other ranks before failing here, or they would wait for the timeout
            note = [{"error": f"{type(error).__name__}: {error}"}]
            plan.guarded("broadcasting the prompt features' header", lambda: dist.broadcast_object_list(note, src=0))
            raise
        plan.guarded("broadcasting the prompt features' header", lambda: dist.broadcast_object_list([header], src=0))
        if header["nbytes"]:
            plan.guarded("broadcasting the prompt features", lambda: dist.broadcast(buffer, src=0))
        return value
    box: List[Any] = [None]
    plan.guarded("receiving the prompt features' header", lambda: dist.broadcast_object_list(box, src=0))
    header = box[0]
    if "error" in header:
        raise DistributedError(f"rank {plan.rank}: rank 0 could not encode the prompt ({header['error']}); "
                               "see rank 0's error.")
    buffer = torch.empty(header["nbytes"], dtype=torch.uint8, device=transport)
    if header["nbytes"]:
        plan.guarded("receiving the prompt features", lambda: dist.broadcast(buffer, src=0))
    return PromptFeatures(**{name: _rebuild(entry, buffer, transport) for name, entry in header["fields"].items()})
