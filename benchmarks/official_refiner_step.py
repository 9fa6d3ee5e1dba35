"""Time one refinement step of the OFFICIAL GRN refiner (random weights) on CPU, for comparison with refiner_step.py.

    python benchmarks/official_refiner_step.py --official-dir /tmp/official          # same sizes as refiner_step.py
    python benchmarks/official_refiner_step.py --official-dir /tmp/official --repeats 2 --warmup 1

``--official-dir`` is the directory that holds the official ``grn`` package; nothing of it is copied here, it is
imported at run time. Two official code generations are supported, told apart by their blocks' signature:

- ``prefix`` (MGenAI/GRN, e.g. commit 2a3353d): blocks take no ``cu_seqlens``; text K/V are cached;
- ``joint`` (bytedance/GRN, e.g. ``grn/models/grn.py`` at 2846724): blocks take ``cu_seqlens`` / ``max_seqlen``;
  the text runs through the blocks with the visual and step tokens of its branch every step.

Prints one JSON line with the fields of refiner_step.py that apply, plus ``"implementation": "official"``, the layout
the official code runs, and the official model's parameter count.

What is timed: one denoising step exactly as ``GRN.autoregressive_infer`` runs it, from the current bit labels to the
head logits (the sampling that follows is not timed, nor is it in refiner_step.py): ``multiclass_labels2onehot_input``,
``embeds_codes2input`` (``word_embed`` on the one-hot input), the step token (``pt_embedder``), both guidance
branches concatenated along the sequence (batch 1, no padding: the official code packs cond and uncond and attends
per branch through ``flash_attn_varlen_func``), every block chunk, and ``get_logits_during_infer`` (head on every
row). Per layout:

- prefix: ``get_visual_rope_embeds`` runs every step (as in that loop), each branch is ``[visual | step token]`` and
  attends to its cached text K/V. The text pass (``prepare_text_conditions`` and one forward of the text through the
  blocks, which fills the K/V cache) runs once before timing, as the official loop does;
- joint: each branch is ``[visual | text | step token]`` and attends to itself (``cu_seqlens`` over the two
  branches); the whole packed sequence, text included, runs through every block. What that loop computes once
  before its steps is done once before timing: ``prepare_text_conditions`` (``text_proj``), the visual RoPE, the
  concatenated RoPE table and ``cu_seqlens``. That loop always runs both branches, so ``--text-uncond`` must be > 0.

As refiner_step.py prepares its text once, the text's one-off work is untimed in both. The model is built as the
``GRN0b`` factory builds it (``arch 'qwen'``, no q/k/v/o bias, ``block_chunks`` 2) but through ``GRN(...)`` so that
``--mlp-ratio`` applies, with the pipeline's default ``other_args`` (GRN_bit, 4 rounds, 3-D RoPE, one step token, no
AdaLN).

Stubbed (stand-ins installed into ``sys.modules`` before the import; none of them runs in the timed step except
the attention): ``flash_attn`` -> ``flash_attn_varlen_func`` computed with ``F.scaled_dot_product_attention``, one
call per packed segment (cond / uncond), in float32 (the joint code imports it from ``flash_attn.cute``, whose
FlashAttention-4 function returns ``(out, lse)``: the stand-in there returns ``(out, None)``). The prefix code casts
q/k/v to bfloat16 for FlashAttention; those casts still run, the stand-in upcasts. The joint code passes q/k/v as
they are (float32 here; under the official CUDA bf16 autocast they would be bfloat16). ``flash_attn.ops.rms_norm`` is
absent, so the official pure-torch RMSNorm fallback in basic.py is used; ``timm`` (``register_model``, ``DropPath``:
not used at inference); ``grn.utils_t2iv.dist`` (``get_device`` -> cpu, ``for_visualize``);
``grn.utils_t2iv.sequence_parallel`` (sequence parallelism off). CUDA autocast contexts in the official code are
inactive on CPU, so everything runs in float32; where the joint loop moves RoPE tables to ``'cuda'`` they stay on
the CPU.

FLOPs are counted with ``step_flops`` for the layout the official code runs (the work actually done); compare with
``refiner_step.py --layout <that layout>``. The other layout's count for the same sizes is given for reference
(``gflop_per_step_joint`` / ``gflop_per_step_prefix``). Uncounted extra work done by the official step:
``word_embed`` multiplies the one-hot input (2 x rounds x d wide, twice the bit count refiner_step counts) and the
head runs on every row (also the two step-token rows; joint: also the text rows). Batch is 1 (the official loops
have no batch).

Checked against grn_core: the official model built here has the same parameter count as ``GRNRefiner`` at the same
sizes (18,227,200 by default), its state dict loads into a ``GRNRefiner`` of the same layout with ``strict=True``,
and the timed step's logits match ``GRNRefiner.sequence_logits`` (every row, same row order): prefix to ~3e-4
relative (the bfloat16 q/k/v cast above), joint to ~1e-6 (float32 rounding; no cast in that code).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import sys
import types
import warnings
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from refiner_step import step_flops, time_against_matmul  # noqa: E402  (puts the repo root on sys.path)
from grn_core.refiner import RefinerConfig, swiglu_hidden  # noqa: E402

STEP_TOKENS = 1  # other_args.add_scale_token: one step token per branch, RoPE position 512 of the text axis


def sdpa_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None, softmax_scale=None,
                causal=False, **_):
    """Stand-in for ``flash_attn_varlen_func``: packed ``[tokens, heads, head_dim]`` q/k/v, one SDPA per segment."""
    if causal:
        raise NotImplementedError("causal varlen attention is not used by the GRN refiner")
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    out = []
    for i in range(len(cq) - 1):
        # [1, heads, len, head_dim]: 4-D inputs take PyTorch's fused CPU kernel (3-D ones fall back to the math path).
        qi, ki, vi = (x[a:b].transpose(0, 1).unsqueeze(0).float() for x, (a, b) in
                      ((q, cq[i:i + 2]), (k, ck[i:i + 2]), (v, ck[i:i + 2])))
        out.append(F.scaled_dot_product_attention(qi, ki, vi, scale=softmax_scale)[0].transpose(0, 1))
    return torch.cat(out, 0)


def sdpa_varlen_cute(*args, **kwargs):
    """Stand-in for ``flash_attn.cute.flash_attn_varlen_func`` (FlashAttention-4), which returns ``(out, lse)``."""
    return sdpa_varlen(*args, **kwargs), None


def _module(name: str, **attrs) -> types.ModuleType:
    """Register a stand-in module (and attach it to its parent package when that is loaded)."""
    mod = types.ModuleType(name)
    mod.__dict__.update(attrs)
    sys.modules[name] = mod
    parent, _, child = name.rpartition(".")
    if parent in sys.modules:
        setattr(sys.modules[parent], child, mod)
    return mod


class _SequenceParallelOff:
    @staticmethod
    def sp_on():
        return False


def _not_available(*_, **__):
    raise RuntimeError("stand-in: not available in this benchmark")


def import_official(official_dir: str) -> SimpleNamespace:
    """Import the official modules from ``official_dir`` with the stand-ins above in place; tell the layout."""
    if not (Path(official_dir) / "grn" / "models" / "grn.py").is_file():
        raise SystemExit(f"--official-dir {official_dir}: no grn/models/grn.py there")
    sys.path.insert(0, str(Path(official_dir).resolve()))
    _module("timm")
    _module("timm.models", register_model=lambda fn: fn)
    _module("timm.models.layers", DropPath=nn.Identity, drop_path=lambda x, *_, **__: x)
    _module("flash_attn", flash_attn_varlen_func=sdpa_varlen)
    importlib.import_module("grn.utils_t2iv")  # the real (namespace) package; its dist / SP modules are replaced
    _module("grn.utils_t2iv.dist", get_device=lambda: torch.device("cpu"), for_visualize=lambda fn: fn)
    _module("grn.utils_t2iv.sequence_parallel", SequenceParallelManager=_SequenceParallelOff,
            sp_all_to_all=_not_available, sp_split_sequence_by_dim=_not_available,
            sp_gather_sequence_by_dim=_not_available)
    grn = importlib.import_module("grn.models.grn")
    layout = "joint" if "cu_seqlens" in grn.MultipleLayers.forward.__code__.co_varnames else "prefix"
    if layout == "joint":
        # Imported inside the joint attention's forward. Registered only now: the prefix code tries flash_attn.cute
        # first at import time and expects a plain tensor from whichever function it gets.
        _module("flash_attn.cute", flash_attn_varlen_func=sdpa_varlen_cute)
    refine = importlib.import_module("grn.schedules.global_refine")
    hbq = importlib.import_module("grn.utils_t2iv.hbq_util_t2iv")
    return SimpleNamespace(layout=layout, GRN=grn.GRN, get_visual_rope_embeds=refine.get_visual_rope_embeds,
                           get_scale_pack_info=refine.get_scale_pack_info,
                           onehot=hbq.multiclass_labels2onehot_input)


def build_official(off: SimpleNamespace, args, grid) -> tuple[nn.Module, SimpleNamespace]:
    """The official GRN at the requested sizes, random weights, with the pipeline's default ``other_args``."""
    oargs = SimpleNamespace(
        refine_mode="ar_discrete_GRN_bit", hbq_round=4, detail_scale_dim=args.latent_channels, detail_num_lvl=2,
        dynamic_scale_schedule="GRN_vae_stride16", train_h_div_w_list="[]", video_frames=81, temporal_compress_rate=4,
        use_ada_layer_norm=0, add_scale_token=STEP_TOKENS, rope_type="3d",
    )
    with contextlib.redirect_stdout(io.StringIO()):  # the constructor prints its configuration
        model = off.GRN(
            vae_local=SimpleNamespace(codebook_dim=args.latent_channels), arch="qwen", qwen_qkvo_bias=False,
            text_channels=args.text_channels, text_maxlen=512, embed_dim=args.width, depth=args.depth,
            num_heads=args.heads, num_key_value_heads=args.kv_heads or args.heads, mlp_ratio=args.mlp_ratio,
            block_chunks=2 if args.depth % 2 == 0 else 1, pad_to_multiplier=128, use_flex_attn=False,
            num_of_label_value=2, rope2d_normalized_by_hw=2, pn="0.06M", video_frames=81, apply_spatial_patchify=0,
            inference_mode=True, other_args=oargs,
        )
    t, h, w = grid
    templates = model.h_div_w_templates  # the pipeline maps h/w to the nearest aspect template
    oargs.mapped_h_div_w_template = float(templates[abs(templates - h / w).argmin()])
    return model.eval().requires_grad_(False), oargs


def text_tuple(n: int, channels: int) -> tuple:
    """Random text features as ``encode_prompt`` returns them: (kv_compact, lens, cu_seqlens_k, max_seqlen_k)."""
    return torch.randn(n, channels), [n], torch.tensor([0, n], dtype=torch.int32), n


@torch.no_grad()
def prefix_step(off, model, oargs, grid, labels, step_value, cond, uncond):
    """Run the prefix loop's text pass (fills the K/V cache); return one step of that loop (to the logits)."""
    t, h, w = grid
    schedule = [grid]
    context_info = off.get_scale_pack_info(schedule, 0, oargs)
    use_cfg = uncond is not None
    freqs_text = model.rope2d_freqs_grid["freqs_text"]
    step_token_rope = freqs_text[:, :, :, :, 512:512 + STEP_TOKENS]
    # Text pass, once: projects the text and caches every layer's K/V under scale name 't0'.
    prefix, lens = model.prepare_text_conditions(cond, uncond, use_cfg)
    rope = torch.cat([freqs_text[:, :, :, :, :n] for n in lens], dim=4)
    for b in model.unregistered_blocks:
        b.attn.kv_caching(True)
    x = prefix
    for chunk in model.block_chunks:
        x = chunk(x=x, e0=None, attn_bias_or_two_vector=None, attn_fn=None, rope2d_freqs_grid=rope,
                  scale_ind="t0", context_info=context_info, last_diffusion_step=True, ref_text_scale_inds=[],
                  use_cfg=use_cfg, split_cond_uncond=lens)
    split = [t * h * w + STEP_TOKENS] * (2 if use_cfg else 1)

    @torch.no_grad()
    def step():
        onehot = off.onehot(labels, 2)
        rope = off.get_visual_rope_embeds(model.rope2d_freqs_grid, schedule, 0, 0, labels.device, oargs,
                                          context_info, oargs.mapped_h_div_w_template)
        x = model.embeds_codes2input(onehot)
        x = torch.cat((x, model.pt_embedder(torch.tensor([step_value]))), dim=1)
        rope = torch.cat((rope, step_token_rope), dim=4)
        if use_cfg:  # cond and uncond share the visual input; they differ only in the cached text
            x, rope = torch.cat([x, x], dim=1), torch.cat([rope, rope], dim=4)
        for chunk in model.block_chunks:
            x = chunk(x=x, e0=None, attn_bias_or_two_vector=None, attn_fn=None, rope2d_freqs_grid=rope, scale_ind=0,
                      context_info=context_info, last_diffusion_step=False, ref_text_scale_inds=["t0"],
                      use_cfg=use_cfg, split_cond_uncond=split)
        return model.get_logits_during_infer(x, e=None)

    return step


@torch.no_grad()
def joint_step(off, model, oargs, grid, labels, step_value, cond, uncond):
    """Do what the joint loop does before its steps (text projection, RoPE table, cu_seqlens); return one step."""
    if uncond is None:
        raise SystemExit("The joint-layout official loop always runs both guidance branches: use --text-uncond > 0.")
    t, h, w = grid
    visual_rope = off.get_visual_rope_embeds(model.rope2d_freqs_grid, grid, labels.device,
                                             oargs.mapped_h_div_w_template, t_offset=0)
    prefix, lens = model.prepare_text_conditions(cond, uncond, True)
    texts = torch.split(prefix, lens, dim=0)
    freqs_text = model.rope2d_freqs_grid["freqs_text"]
    step_token_rope = freqs_text[:, :, :, :, 512:512 + STEP_TOKENS]
    seqlens = [t * h * w + n + STEP_TOKENS for n in lens]
    # Per branch [visual | text | step token]; (2, 1, 1, 1, L, d/2) -> (2, 1, L, 1, d/2) as the blocks take it.
    rope = torch.cat([visual_rope, freqs_text[:, :, :, :, :lens[0]], step_token_rope,
                      visual_rope, freqs_text[:, :, :, :, :lens[1]], step_token_rope], dim=4)
    rope = rope[:, 0].permute(0, 1, 3, 2, 4)
    cu_seqlens = torch.tensor([0] + seqlens).cumsum(-1).to(torch.int32)
    max_seqlen = max(seqlens)

    @torch.no_grad()
    def step():
        x = model.embeds_codes2input(off.onehot(labels, 2))
        step_token = model.pt_embedder(torch.tensor([step_value])).unsqueeze(0)
        x = torch.cat([torch.cat((x, texts[0].unsqueeze(0), step_token), dim=1),
                       torch.cat((x, texts[1].unsqueeze(0), step_token), dim=1)], dim=1)
        for chunk in model.block_chunks:
            x = chunk(x=x, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, e0=None, attn_bias_or_two_vector=None,
                      attn_fn=None, rope2d_freqs_grid=rope, last_diffusion_step=False)
        return model.get_logits_during_infer(x, e=None)

    return step


STEPS = {"prefix": prefix_step, "joint": joint_step}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--official-dir", required=True, help="directory holding the official `grn` package")
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=None, help="default: = heads")
    p.add_argument("--mlp-ratio", type=float, default=3.55)
    p.add_argument("--latent-channels", type=int, default=64)
    p.add_argument("--text-channels", type=int, default=4096)
    p.add_argument("--grid", type=int, nargs=3, default=[3, 12, 21], metavar=("T", "H", "W"))
    p.add_argument("--text-cond", type=int, default=64, help="cond text tokens")
    p.add_argument("--text-uncond", type=int, default=16,
                   help="uncond text tokens (0: no uncond branch; prefix layout only)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    # The official code opens torch.amp.autocast('cuda') contexts; on a CPU-only box they warn and do nothing.
    warnings.filterwarnings("ignore", message=".*CUDA is not available.*")
    off = import_official(args.official_dir)
    t, h, w = grid = tuple(args.grid)
    model, oargs = build_official(off, args, grid)
    cond = text_tuple(args.text_cond, args.text_channels)
    uncond = text_tuple(args.text_uncond, args.text_channels) if args.text_uncond > 0 else None
    bits = 4 * args.latent_channels
    labels = torch.randint(0, 2, (1, bits, t, h, w)).float()  # the official loops keep labels in the text dtype
    step = STEPS[off.layout](off, model, oargs, grid, labels, 0.3, cond, uncond)

    # FLOPs counted exactly as refiner_step.py counts them, for the layout this official code runs.
    sizes = dict(width=args.width, depth=args.depth, heads=args.heads, kv_heads=args.kv_heads or args.heads,
                 mlp_hidden=swiglu_hidden(args.width, args.mlp_ratio), block_chunks=1,
                 text_channels=args.text_channels, latent_channels=args.latent_channels)
    text_lens = [args.text_cond] + ([args.text_uncond] if uncond is not None else [])
    other = "joint" if off.layout == "prefix" else "prefix"
    flops = step_flops(RefinerConfig(**sizes, layout=off.layout), grid, text_lens, 1)
    flops_other = step_flops(RefinerConfig(**sizes, layout=other), grid, text_lens, 1)
    result = {
        "implementation": "official", "layout": off.layout, "dtype": "float32", "threads": args.threads,
        "width": args.width, "depth": args.depth, "heads": args.heads, "kv_heads": sizes["kv_heads"],
        "mlp_hidden": model.unregistered_blocks[0].mlp.intermediate_size, "grid": [t, h, w], "text": text_lens,
        "batch": 1, "first_frame": False, "params": sum(q.numel() for q in model.parameters()),
        "gflop_per_step": round(flops["total"] / 1e9, 3),
        "gflop_split": {k: round(v / 1e9, 3) for k, v in flops.items() if k != "total"},
        f"gflop_per_step_{other}": round(flops_other["total"] / 1e9, 3),
        **time_against_matmul(step, flops["total"], args.repeats, args.warmup),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
