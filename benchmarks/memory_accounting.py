"""GPU memory of the default T2V settings at 480x848x33 frames, accounted on the CPU without allocating it.

    python benchmarks/memory_accounting.py                  # table + one JSON line per setting
    python benchmarks/memory_accounting.py --frames 81 --height 720 --width 1280 --budget-gib 24

Settings: GRN2b in bf16 with nothing offloaded but the text encoder, and GRN8b with fp8 block weights and block
offload (also shown: GRN8b fp8 without block offload). Per generation stage (text encoding, sampling, decoding) it
adds up what is on the device at that stage's peak:

* weights: parameters counted on the meta device from the ``grn_core.refiner`` presets and the released tokenizer
  config, at the bytes of the storage scheme the loaders use (bf16 storage keeps the norms and the bit head in
  float32; fp8 keeps the Linears of the repeated blocks in 8 bits plus a float32 scale per output row; block offload
  keeps ``1 + prefetch`` streamed blocks on the device);
* refiner activations of one step for both guidance branches, packed (visual ``t*h*w`` + text + 1 step token per
  branch): *traced*, by tracking live tensor storage (:class:`LiveTensorBytes`) through ``step_logits`` of a
  one-block model of the preset's true width and storage on the meta device at the real shape (blocks run one after
  another with only the residual stream between them, so depth does not add). Attention is a flash /
  memory-efficient kernel on the GPU (no ``L x L``): SDPA is swapped for a stand-in that allocates only its output,
  and flash's log-sum-exp is added. (Cross-checked once against a real bf16 CPU step at small sizes extrapolated
  linearly in the rows: 2.74 vs 2.75 GiB for GRN2b.);
* sampler state: bits, random map Z, kept masks (uint8/bool ``[B, rounds*d, t, h, w]``), logits ``[tokens, 256, 2]``
  float32 for both branches, the guided probabilities and uniforms drawn per step;
* tokenizer decode: whole frames, latent frame by latent frame (``decode_iter``), measured by tracking tensor
  storage through a decode on the meta device at the real size; and tiled (``grn_core.tokenizer.tiled``);
* text encoder (umt5-xxl, bf16): on the device only in the text stage (next to the refiner and tokenizer, which
  stay: the settings named "no offload"), then moved to the CPU; with model offload that stage is umt5 alone.

Not included (stated, not hidden): the CUDA context (~0.3-0.6 GB, outside PyTorch's allocator), allocator
fragmentation / cached blocks (typically 5-15 % on top), cuDNN / cuBLAS workspaces, and ComfyUI's own models. (The
fp8 per-call upcast of a weight matrix happens inside the traced step and is counted.)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from grn_core.refiner import GRNRefiner, RefinerConfig  # noqa: E402
from grn_core.refiner.config import PRESETS  # noqa: E402
from grn_core.tokenizer import HBQTokenizer, TokenizerConfig  # noqa: E402
from grn_core.tokenizer.tiled import decode_tiled_iter  # noqa: E402

GIB = 2**30
# umt5-xxl on two prompts of 512 tokens: residual stream (4096, float32) and gated FFN (10240, bf16), a few of each
# alive at once -- estimated, not traced (the encoder is not run here).
UMT5_ACTIVATIONS = 2 * 512 * (4 * 4096 * 4 + 3 * 10240 * 2)


# ---- live tensor tracking -----------------------------------------------------------------------------------------
class LiveTensorBytes(TorchDispatchMode):
    """Peak bytes of tensor storage allocated *inside* the ``with`` block and alive at the same time.

    Every aten op's outputs are recorded by storage (views and in-place results share their input's storage and are
    not counted again); a storage counts until it is freed (checked through weak references before each op). Works
    on any device including ``meta``, so real shapes can be traced without allocating. Tensors that existed before
    the block (weights, inputs) are not counted.
    """

    def __init__(self) -> None:
        super().__init__()
        self._live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.current = 0
        self.peak = 0

    def _sweep(self) -> None:
        for key in [k for k, (ref, _) in self._live.items() if ref.expired()]:
            self.current -= self._live.pop(key)[1]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self._sweep()
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage()._cdata for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key = storage._cdata
            if key in self._live or key in inputs:
                continue
            self._live[key] = (StorageWeakRef(storage), storage.nbytes())
            self.current += storage.nbytes()
        self.peak = max(self.peak, self.current)
        return out

    def __exit__(self, *exc):
        result = super().__exit__(*exc)
        self._sweep()
        return result


# ---- weights --------------------------------------------------------------------------------------------------------
def _on_meta(build) -> nn.Module:
    with torch.device("meta"):
        return build()


def refiner_weight_bytes(config: RefinerConfig, storage: str, offload_blocks: int = 0, prefetch: int = 1) -> dict:
    """Device bytes of a refiner's weights. ``storage``: 'bf16' or 'fp8'; ``offload_blocks`` streamed blocks."""
    model = _on_meta(lambda: GRNRefiner(config))
    blocks = model.blocks
    block_ids = {id(p) for b in blocks for p in b.parameters()}
    fp32_ids = {id(p) for m in model.modules() if type(m).__name__ == "RMSNorm" for p in m.parameters()}
    fp32_ids |= {id(p) for p in model.head.parameters()}

    def tensor_bytes(p: torch.Tensor, in_block: bool, owner: Optional[nn.Module]) -> int:
        if id(p) in fp32_ids:
            return p.numel() * 4
        if storage == "fp8" and in_block and isinstance(owner, nn.Linear) and p is owner.weight:
            return p.numel() + p.shape[0] * 4  # 8-bit weight + float32 scale per output row
        return p.numel() * 2

    def module_bytes(module: nn.Module, in_block: bool) -> int:
        total = 0
        for m in module.modules():
            for p in m.parameters(recurse=False):
                total += tensor_bytes(p, in_block, m)
        return total

    per_block = module_bytes(blocks[0], True)
    rest = sum(tensor_bytes(p, False, None) for p in model.parameters() if id(p) not in block_ids)  # bf16 / fp32
    depth = len(blocks)
    streamed = min(offload_blocks, depth)
    on_device_blocks = depth - streamed + min(streamed, 1 + prefetch)
    params = sum(p.numel() for p in model.parameters())
    return {
        "params": params,
        "bytes_all": rest + depth * per_block,
        "bytes_on_device": rest + on_device_blocks * per_block,
        "block_bytes": per_block,
    }


def tokenizer_weight_bytes(config: TokenizerConfig, bytes_per: int) -> dict:
    model = _on_meta(lambda: HBQTokenizer(config))
    total = sum(p.numel() for p in model.parameters())
    decoder = sum(p.numel() for p in model.decoder.parameters()) + sum(p.numel() for p in model.conv2.parameters())
    return {"params": total, "decoder_params": decoder, "bytes": total * bytes_per}


def umt5_weight_bytes(bytes_per: int = 2) -> dict:
    from grn_core.text import UMT5Config, UMT5Encoder

    model = _on_meta(lambda: UMT5Encoder(UMT5Config.preset("umt5-xxl")))
    total = sum(p.numel() for p in model.parameters())
    return {"params": total, "bytes": total * bytes_per}


# ---- refiner activations ----------------------------------------------------------------------------------------------
class _FlashStandIn:
    """Replace SDPA (CPU: possibly the L x L math path) by a stand-in that allocates only the output, like the
    flash / memory-efficient CUDA kernels (their log-sum-exp side output, [n, H, L] float32, is added analytically)."""

    def __enter__(self):
        self._sdpa = F.scaled_dot_product_attention

        def stand_in(q, k, v, *args, **kwargs):
            return torch.empty_like(q)

        F.scaled_dot_product_attention = stand_in
        return self

    def __exit__(self, *exc):
        F.scaled_dot_product_attention = self._sdpa


def refiner_step_bytes(config: RefinerConfig, storage: str, grid: tuple[int, int, int], text_len: int) -> dict:
    """Peak activation bytes of one step (both branches, batch 1) traced on the meta device at the real shape.

    A one-block model of the preset's true width stands in for the whole refiner: blocks run one after another and
    only the residual stream passes between them, so the peak of one block is the peak of all. The plan cache
    (RoPE table, row indices) is built inside the trace and counted, as it stays on the device during sampling.
    """
    one = RefinerConfig.from_dict({**config.to_dict(), "depth": 1, "block_chunks": 1})
    model = _on_meta(lambda: GRNRefiner(one)).to(torch.bfloat16)
    for m in model.modules():  # float32 norms and head, as the loaders keep them under bf16 / fp8 storage
        if type(m).__name__ == "RMSNorm" or m is model.head:
            m.float()
    if storage == "fp8":
        from grn_core.runtime.fp8 import quantize_linears

        quantize_linears(model, torch.float8_e4m3fn, compute_dtype=torch.bfloat16)
    model.eval()
    # The kept-fraction check reads the value back (impossible on meta); the value does not change any shape.
    model._step_values = lambda value, batch: torch.full((batch,), float(value), dtype=torch.float64, device="meta")
    t, h, w = grid
    bits = torch.zeros(1, one.bits, t, h, w, dtype=torch.bool, device="meta")  # bool: no value check either
    texts = [torch.zeros(text_len, one.text_channels, dtype=torch.bfloat16, device="meta") for _ in range(2)]
    with torch.inference_mode():
        contexts = [model.prepare_text(x) for x in texts]  # prepared once per generation, counted separately
        with _FlashStandIn(), LiveTensorBytes() as tracker:
            cond, uncond = model.step_logits(bits, 0.5, contexts[0], contexts[1], aspect_ratio=h / w)
            del cond, uncond
    rows = 2 * (t * h * w + text_len + 1)
    lse = 2 * config.heads * (t * h * w + text_len + 1) * 4  # flash log-sum-exp, float32 [n, H, L] per branch
    return {"rows": rows, "bytes": tracker.peak + lse, "bytes_per_row": (tracker.peak + lse) / rows}


def sampler_state_bytes(config: RefinerConfig, grid: tuple[int, int, int], batch: int = 1) -> dict:
    t, h, w = grid
    tokens = t * h * w * batch
    bits = config.bits
    maps = tokens * bits * (1 + 1 + 1 + 1)  # x_i, Z, kept, previous kept (uint8 / bool)
    logits = 2 * tokens * bits * 2 * 4  # cond + uncond [tokens, bits, 2] float32
    per_step = tokens * bits * 4 * 3  # guided p1 + two uniform draws, float32
    return {"bytes": maps + logits + per_step}


# ---- tokenizer decode ---------------------------------------------------------------------------------------------
def tracked_decode_bytes(config: TokenizerConfig, dtype: torch.dtype, grid: tuple[int, int], latent_frames: int,
                         tile: Any = None, overlap: int = 4) -> int:
    """Peak tensor bytes of a streaming decode (``decode_tiled_iter``: whole frames, or tiles with every tile's
    cache alive) traced on the meta device at the real size."""
    tok = _on_meta(lambda: HBQTokenizer(config)).to(dtype).eval()
    z = torch.zeros(1, config.z_dim, latent_frames, *grid, device="meta", dtype=dtype)
    with torch.inference_mode(), LiveTensorBytes() as tracker:
        for chunk in decode_tiled_iter(tok, z, tile=tile, overlap=overlap):
            del chunk
    return tracker.peak


def tracked_tile_by_tile_bytes(config: TokenizerConfig, dtype: torch.dtype, grid: tuple[int, int], tile: int,
                               latent_frames: int = 3) -> int:
    """Device peak of ``decode_tiled(..., out_device="cpu")``, traced on the meta device: the larger of the whole-frame
    stem of one latent frame (with the stem cache) and the tail of one tile (its input crop, cache and activations);
    the output and the stored stem features live on the CPU. From the third latent frame on, every cache is full."""
    from grn_core.tokenizer.causal import CausalCache
    from grn_core.tokenizer.tiled import _stem_scale, decode_stem, decode_tail

    tok = _on_meta(lambda: HBQTokenizer(config)).to(dtype).eval()
    z = torch.zeros(1, config.z_dim, latent_frames, *grid, device="meta", dtype=dtype)
    scale = _stem_scale(config)
    th, tw = min(tile, grid[0]), min(tile, grid[1])
    with torch.inference_mode():
        with LiveTensorBytes() as stem_tracker:
            cache = CausalCache()
            shapes = []
            for i in range(latent_frames):
                shapes.append(tuple(decode_stem(tok, z[:, :, i : i + 1], cache).shape))
                cache.advance()
            del cache
        with LiveTensorBytes() as tail_tracker:
            cache = CausalCache()
            for shape in shapes:
                crop = torch.zeros(*shape[:3], th * scale, tw * scale, device="meta", dtype=dtype)  # copied in
                chunk = decode_tail(tok, crop, cache)
                cache.advance()
                del crop, chunk
            del cache
    return max(stem_tracker.peak, tail_tracker.peak)


# ---- the table ------------------------------------------------------------------------------------------------------
def account(height: int, width: int, frames: int, text_len: int, budget_gib: float, decode_tile: int,
            prefetch: int = 1) -> list[dict]:
    tok_cfg = TokenizerConfig()  # released 64-channel tokenizer (dim 160, dec_dim 256)
    sf, tf = tok_cfg.spatial_factor, tok_cfg.temporal_factor
    grid = (1 + (frames - 1) // tf, height // sf, width // sf)
    tok_w = tokenizer_weight_bytes(tok_cfg, 2)
    umt5 = umt5_weight_bytes(2)
    # three latent frames: from the third on, chunks and caches have their final sizes
    decode_whole = tracked_decode_bytes(tok_cfg, torch.bfloat16, grid[1:], 3)
    decode_tiled = tracked_tile_by_tile_bytes(tok_cfg, torch.bfloat16, grid[1:], decode_tile)
    decode_streamed_tiles = tracked_decode_bytes(tok_cfg, torch.bfloat16, grid[1:], 3, tile=decode_tile)
    settings = [
        ("GRN2b", "bf16", 0),
        ("GRN8b", "fp8", 0),
        ("GRN8b", "fp8", 10**9),  # every block streamed
    ]
    rows = []
    for name, storage, offload in settings:
        cfg = PRESETS[name]()
        weights = refiner_weight_bytes(cfg, storage, offload, prefetch)
        acts = refiner_step_bytes(cfg, storage, grid, text_len)
        state = sampler_state_bytes(cfg, grid)
        text_ctx = 2 * text_len * cfg.width * 4  # prepared (projected) text of both branches, float32
        refiner_dev = weights["bytes_on_device"]
        sampling = refiner_dev + tok_w["bytes"] + acts["bytes"] + state["bytes"] + text_ctx
        decoding = refiner_dev + tok_w["bytes"] + decode_whole
        decoding_tiled = refiner_dev + tok_w["bytes"] + decode_tiled
        # models stay; only umt5 leaves after; its activations for 2 x 512 tokens are < 0.1 GiB (estimated, added)
        text_stage = umt5["bytes"] + UMT5_ACTIVATIONS + refiner_dev + tok_w["bytes"]
        peak = max(sampling, decoding, text_stage)
        rows.append({
            "model": name, "storage": storage,
            "offload": "text encoder" + (f" + blocks ({min(offload, cfg.depth)} streamed, prefetch {prefetch})"
                                         if offload else ""),
            "size": [frames, height, width], "latent_grid": list(grid), "text_tokens": text_len,
            "refiner_params": weights["params"],
            "refiner_weights_gib": weights["bytes_all"] / GIB,
            "refiner_weights_on_device_gib": refiner_dev / GIB,
            "tokenizer_weights_gib": tok_w["bytes"] / GIB,
            "umt5_weights_gib": umt5["bytes"] / GIB,
            "step_activations_gib": acts["bytes"] / GIB,
            "step_rows": acts["rows"], "step_bytes_per_row": round(acts["bytes_per_row"]),
            "sampler_state_gib": state["bytes"] / GIB,
            "decode_whole_frames_gib": decode_whole / GIB,
            f"decode_tiled_{decode_tile}_gib": decode_tiled / GIB,
            f"decode_tiled_{decode_tile}_streaming_gib": decode_streamed_tiles / GIB,
            "stage_text_gib": text_stage / GIB,
            "stage_sampling_gib": sampling / GIB,
            "stage_decode_gib": decoding / GIB,
            "stage_decode_tiled_gib": decoding_tiled / GIB,
            "peak_gib": peak / GIB,
            "budget_gib": budget_gib,
            "fits": peak <= budget_gib * GIB,
        })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=848)
    parser.add_argument("--frames", type=int, default=33)
    parser.add_argument("--text-tokens", type=int, default=512, help="text tokens per branch (umt5 keeps <= 512)")
    parser.add_argument("--budget-gib", type=float, default=24.0)
    parser.add_argument("--decode-tile", type=int, default=16, help="latent cells per tile for the tiled row")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = account(args.height, args.width, args.frames, args.text_tokens, args.budget_gib, args.decode_tile)
    keys = [("refiner_weights_on_device_gib", "refiner weights on device"), ("tokenizer_weights_gib", "tokenizer "
            "weights (bf16)"), ("step_activations_gib", "step activations (2 branches)"), ("sampler_state_gib",
            "sampler state"), ("stage_text_gib", "stage: text encoding"), ("stage_sampling_gib", "stage: sampling"),
            ("stage_decode_gib", "stage: decode, whole frames"), ("stage_decode_tiled_gib",
            f"stage: decode, {args.decode_tile}-cell tiles"), ("peak_gib", "peak")]
    header = f"{'GiB':34s}" + "".join(f"{r['model'] + ' ' + r['storage'] + (' +blocks' if 'blocks' in r['offload'] else ''):>20s}" for r in rows)
    print(header)
    for key, label in keys:
        print(f"{label:34s}" + "".join(f"{r[key]:20.2f}" for r in rows))
    print(f"{'fits ' + str(args.budget_gib) + ' GiB':34s}" + "".join(f"{str(r['fits']):>20s}" for r in rows))
    for r in rows:
        print(json.dumps({"benchmark": "memory_accounting", **{k: (round(v, 3) if isinstance(v, float) else v)
                                                               for k, v in r.items()}}))


if __name__ == "__main__":
    main()
