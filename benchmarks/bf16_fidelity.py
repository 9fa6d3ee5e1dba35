"""bf16 fidelity: how far our bf16 refiner and the official bf16-autocast path are from a float64 truth.

    python benchmarks/bf16_fidelity.py                         # both golden layouts, 4 seeds, markdown table
    python benchmarks/bf16_fidelity.py --repeats 8 --seed 7 --diagnostics --json /tmp/bf16_fidelity.json

Weights: the golden refiners of ``tests/golden`` (``refiner_joint_weights`` and ``refiner_prefix_weights``, official
key names, width 128, depth 4, 2 heads, d = 8 so 32 bits per token). Every path loads the same file.

Paths (one refinement step, both guidance branches, ``step_logits`` shape ``[1, t, h, w, bits, 2]``):

- ``truth``: our refiner with float64 weights and float64 compute (``load_refiner(dtype="fp64")``). It reproduces
  the official code run in float64 to ~1e-6 (tests/test_refiner_golden.py), so it stands for the exact function.
- ``fp32``: ours, float32 weights, no autocast — a reference line for plain single precision.
- ``ours bf16``: ``load_refiner(dtype="bf16")``, our normal path: every weight in bf16 except the norms and the
  ``head`` (float32, see grn_core/runtime/precision.py); matmuls and attention in bf16; the residual stream, RMS
  norms, QK-norm, RoPE, the step sinusoid, the bit embedding's sum and the head in float32.
- ``official autocast``: float32 weights run in the *official op order* under ``torch.autocast("cpu",
  dtype=torch.bfloat16)``, the CPU stand-in for the official demo's ``torch.cuda.amp.autocast(dtype=bfloat16)``
  (grn/utils_t2iv/infer.py). :func:`official_style_logits` re-states what the official inference loop does, op by op
  (it is written here, nothing of the official code is copied or imported; in float64 without autocast it equals our
  float64 model, checked at start-up). What that order implies under bf16 autocast: ``word_embed``, ``text_proj`` and
  the step MLP run as autocast Linears, so the packed tokens are bf16 and the *residual stream is bf16* (``x = x +
  attn(...)`` adds two bf16 tensors); ``FastRMSNorm`` computes in float32 and returns bf16; q/k are bf16 after
  QK-norm, RoPE multiplies them by float32 cos/sin in place (so the result is stored in bf16 twice), attention is
  bf16 (FlashAttention there, SDPA here); RoPE angles are formed in float32; the head gets ``x.float()`` and runs in
  float32 (``autocast('cuda', dtype=float32)`` there; on the CPU that CUDA context does nothing, so here autocast is
  switched off around the head to reproduce the CUDA behaviour). (The official loader also has a ``bf16`` option
  that stores the blocks' weights in bf16, norms included; that variant is not measured here.)

Three diagnostic paths (``--diagnostics``):

- ``bf16-rounded weights, fp64 compute``: the float64 model with every weight that both bf16 paths round (all but
  the norms and the head) rounded to bf16 — the error floor that weight rounding alone sets, shared by both paths
  (autocast casts the float32 weights to bf16 on the fly, which is the same rounding);
- ``official-style + autocast, fp32 residual stream``: the official-style path with one change, the packed tokens
  cast to float32 before the blocks, so that the residual stream stays float32 as in ours (attributes the gap
  between the two main paths);
- ``ours fp32 + autocast`` (not a supported mode): our float32 model called under the same CPU autocast.
  It is *not* the official path: our fused ``addmm`` residual updates become bf16 (the residual stream is rounded
  after every block), while our q/k/v ``mm(out=...)`` calls are not autocast at all (explicit ``out=`` ops are not
  eligible) and stay float32. Shown only so that nobody mistakes it for the official-style line.

What autocast runs in bf16 (torch docs, "Autocast Op Reference"): on CUDA the lower-precision list is the matmul
family (``linear``, ``matmul``, ``mm``, ``bmm``, ``addmm``, ``baddbmm``, ``addbmm``, ``mv``, ``addmv``, ``addr``,
``chain_matmul``, ``multi_dot``), convolutions, RNN cells and ``prelu`` (the source also lists
``scaled_dot_product_attention``), and a float32 list forces ``pow``, ``rsqrt``, ``exp``, ``sum``, ``softmax``,
``log_softmax``, ``layer_norm``, ``group_norm``, ``norm`` and the losses up to float32. On the CPU the bf16 list is
again the matmul family (``linear``, ``matmul``, ``mm``, ``bmm``, ``addmm``, ``baddbmm``, ``addbmm``) and
convolutions, plus ``scaled_dot_product_attention``; its float32 list holds losses, FFTs, linear algebra and a few
pooling/padding ops, *not* ``pow``/``rsqrt``/``exp``/``softmax``, which therefore run in whatever dtype their inputs
have (checked on torch 2.13: ``pow``, ``rsqrt``, ``mean``, ``softmax``, ``silu`` keep float32 inputs in float32 and
bf16 inputs in bf16; ``mm(out=float32 tensor)`` is not autocast). For this network the difference does not matter:
the official norms upcast with an explicit ``.float()``, its RoPE switches autocast off, the softmax lives inside the
attention kernel (float32 accumulation on both devices), the SiLU and the gate product see bf16 inputs on both
devices (neither list names them), and the only CUDA-specific context (the float32 head) is reproduced by hand as
above. Not emulated: CUDA FlashAttention vs the CPU SDPA kernel (both take bf16 q/k/v and accumulate in float32, in
another order) and the bf16 GEMMs' accumulation order (tensor cores vs oneDNN on this CPU, float32 accumulation in
both); they move the last bits of each path, not which tensors are rounded to bf16, which is what is compared here.

Inputs, per seed (``--seed`` + i for i < ``--repeats``): a structured "clean" bit map (the golden I2V first frame,
clean bits of a real image through the golden tokenizer, repeated over the 3 latent frames of the 3x12x21 grid) of
which a fraction r is kept and the rest replaced by random bits, as the sampler's mixing does, for r in {0, 0.3, 0.7,
0.95}; r is also the step value. Text features: Gaussian, std of the golden features, two length pairs (cond,
uncond) = (7, 3) and (77, 12), alternating over the cases and seeds (with two or more seeds every kept fraction meets
both). Both guidance branches always run.

Measures, each path against the truth, on the visual rows of both branches:

- relative logit error: ``|l - l64| / RMS(l64)``, the RMS taken over all logits of that branch and case (an
  element-wise ``|l - l64| / |l64|`` is meaningless where a logit crosses zero). Reported: its max and its mean
  over all logits of the cases;
- guided bit probability at w = ``--guidance`` (3), tau = ``--tau`` (1): ``g = u + w (c - u)``,
  ``p1 = sigmoid((g_1 - g_0) / tau)`` (= the official softmax over the 2 classes); reported max and mean
  ``|p1 - p1_64|``;
- flipped bits: one uniform ``U`` per bit drawn once per case and shared by every path, bit = ``U < p1``; the fraction
  of bits that differ from the truth's. With the shared uniform its expectation is ``mean |p1 - p1_64|``.

Per seed: max of the maxima and mean of the means over the 4 cases (one per kept fraction) of each layout; the
table gives mean ± standard deviation of those over the seeds. The JSON also holds every per-seed value and a
per-kept-fraction breakdown.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from grn_core.checkpoints import load_refiner  # noqa: E402
from grn_core.refiner.buckets import aspect_template  # noqa: E402
from grn_core.refiner.rope import rope_pair_split, step_positions, text_positions, visual_positions  # noqa: E402

GOLDEN = ROOT / "tests" / "golden"
LAYOUTS = ("joint", "prefix")
KEPT_FRACTIONS = (0.0, 0.3, 0.7, 0.95)
TEXT_LENGTHS = ((7, 3), (77, 12))  # (cond, uncond) token counts
ASPECT = 0.562  # the golden records' aspect template (grid 12 x 21)
PATHS = ("fp32", "ours_bf16", "official_autocast")
DIAGNOSTIC_PATHS = ("bf16_weights_fp64", "official_fp32_residual", "ours_fp32_autocast")
PATH_LABELS = {
    "fp32": "fp32 (ours, no autocast)",
    "ours_bf16": "**ours bf16**",
    "official_autocast": "**official-style fp32 + bf16 autocast**",
    "bf16_weights_fp64": "bf16-rounded weights, fp64 compute (diagnostic)",
    "official_fp32_residual": "official-style + autocast, fp32 residual stream (diagnostic)",
    "ours_fp32_autocast": "ours fp32 + autocast (diagnostic)",
}
METRICS = ("max_rel_logit", "mean_rel_logit", "max_dp1", "mean_dp1", "flipped")


# ----------------------------------------------------------------------------------------------------------------------
# Measuring functions (tested in tests/test_bf16_fidelity.py)


def relative_logit_error(logits: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Element-wise ``|l - l64| / RMS(l64)`` (float64), RMS over the whole ``truth`` tensor."""
    t = truth.detach().to(torch.float64)
    rms = t.square().mean().sqrt().clamp_min(1e-300)
    return (logits.detach().to(torch.float64) - t).abs() / rms


def guided_p1(cond: torch.Tensor, uncond: torch.Tensor, guidance: float, tau: float) -> torch.Tensor:
    """Probability of bit 1 after guidance and temperature, in float64: ``sigmoid((g_1 - g_0) / tau)``,
    ``g = u + w (c - u)`` over the last (class) axis of ``[..., bits, 2]`` logits."""
    c, u = cond.to(torch.float64), uncond.to(torch.float64)
    g = u + guidance * (c - u)
    return torch.sigmoid((g[..., 1] - g[..., 0]) / tau)


def measure(pair: tuple[torch.Tensor, torch.Tensor], truth: tuple[torch.Tensor, torch.Tensor],
            uniforms: torch.Tensor, guidance: float, tau: float) -> dict[str, float]:
    """Errors of one path's ``(cond, uncond)`` logits against the truth's, for one case.

    ``uniforms`` (one per bit, shape of ``p1``) decide the sampled bits of every path: bit = ``U < p1``.
    Returns max / mean relative logit error (both branches, each relative to its own RMS), max / mean
    ``|p1 - p1_64|`` and the fraction of sampled bits that differ from the truth's.
    """
    rel = torch.cat([relative_logit_error(l, t).flatten() for l, t in zip(pair, truth)])
    p1 = guided_p1(pair[0], pair[1], guidance, tau)
    p1_true = guided_p1(truth[0], truth[1], guidance, tau)
    if uniforms.shape != p1.shape:
        raise ValueError(f"uniforms have shape {tuple(uniforms.shape)}, the bit probabilities {tuple(p1.shape)}.")
    dp = (p1 - p1_true).abs()
    flips = (uniforms < p1) != (uniforms < p1_true)
    return {
        "max_rel_logit": float(rel.max()),
        "mean_rel_logit": float(rel.mean()),
        "max_dp1": float(dp.max()),
        "mean_dp1": float(dp.mean()),
        "flipped": float(flips.to(torch.float64).mean()),
    }


def summarize_cases(cases: list[dict[str, float]]) -> dict[str, float]:
    """One seed's figures from its cases: max of the maxima, mean of the means and of the flip fractions."""
    out = {}
    for key in METRICS:
        values = [c[key] for c in cases]
        out[key] = max(values) if key.startswith("max_") else sum(values) / len(values)
    return out


def mean_spread(values: list[float]) -> dict[str, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


# ----------------------------------------------------------------------------------------------------------------------
# The official op order (for the official-style path; in float64 without autocast it equals our float64 model)


def _official_rms(x: torch.Tensor, norm, base: torch.dtype) -> torch.Tensor:
    """``FastRMSNorm``: upcast to ``base``, ``x * rsqrt(mean(x^2) + eps) * weight``, back to the input dtype."""
    src = x.dtype
    h = x.to(base)
    return (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True).add_(norm.eps)) * norm.weight).to(src)


def _official_rope_table(positions: torch.Tensor, head_dim: int, rope_base: float,
                         base: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos / sin ``[N, 1, head_dim/2]`` with frequencies and angles formed in ``base`` (float32 officially)."""
    freqs, which = [], []
    for axis, m in enumerate(rope_pair_split(head_dim)):
        freqs.append(1.0 / (rope_base ** (torch.arange(m, dtype=torch.int64).to(base) / m)))
        which.append(torch.full((m,), axis))
    angles = positions.to(base)[:, torch.cat(which)] * torch.cat(freqs)
    return torch.cos(angles).unsqueeze(1), torch.sin(angles).unsqueeze(1)


def _official_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """In-place rotation of interleaved pairs as the official ``apply_rotary_emb`` does it (autocast off): the
    products with the float32 tables are written back into ``x``'s dtype after each in-place op."""
    with torch.autocast("cpu", enabled=False):
        pairs = x.view(*x.shape[:-1], -1, 2)
        tmp1 = pairs[..., 1] * sin
        tmp2 = pairs[..., 0] * sin
        pairs[..., 0].mul_(cos).sub_(tmp1)
        pairs[..., 1].mul_(cos).add_(tmp2)
    return x


def _official_attention(q, k, v, cfg) -> torch.Tensor:
    """``q [L, H, D]``, ``k, v [S, Hkv, D]`` -> ``[L, H*D]``, scale ``D ** -0.5`` (flash_attn_varlen_func's maths)."""
    rep = cfg.heads // cfg.kv_heads
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None])
    return out[0].transpose(0, 1).reshape(q.shape[0], -1)


def _official_block(block, x, cos, sin, lengths, cfg, base, prefix=None):
    """One ``SelfAttnBlock`` on the packed rows ``x``; attention within each of ``lengths``. ``prefix``: per sequence
    the cached text ``(k, v)`` prepended to its keys. Returns the new ``x`` and this layer's roped ``(k, v)``."""
    attn, mlp = block.attn, block.mlp
    n, hd = x.shape[0], cfg.head_dim
    h = _official_rms(x, block.input_layernorm, base)
    q = _official_rms(attn.q_proj(h).view(n, cfg.heads, hd), attn.q_norm, base)
    k = _official_rms(attn.k_proj(h).view(n, cfg.kv_heads, hd), attn.k_norm, base)
    v = attn.v_proj(h).view(n, cfg.kv_heads, hd)
    q, k = _official_rope(q, cos, sin), _official_rope(k, cos, sin)
    outs, start = [], 0
    for i, length in enumerate(lengths):
        rows = slice(start, start + length)
        k_i, v_i = k[rows], v[rows]
        if prefix is not None:
            k_i, v_i = torch.cat([prefix[i][0], k_i]), torch.cat([prefix[i][1], v_i])
        outs.append(_official_attention(q[rows], k_i, v_i, cfg))
        start += length
    x = x + attn.o_proj(torch.cat(outs))
    h = _official_rms(x, block.post_attention_layernorm, base)
    x = x + mlp.down_proj(F.silu(mlp.gate_proj(h)) * mlp.up_proj(h))
    return x, (k, v)


def _official_step_token(embedder, step_value: float, base: torch.dtype) -> torch.Tensor:
    """``TimestepEmbedder``: sinusoid in ``base`` (float32 officially), then the MLP as plain modules."""
    half = embedder.freq_dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=base) / half)
    angles = torch.tensor([step_value], dtype=base)[:, None] * freqs[None]
    return embedder.mlp(torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1))


@torch.no_grad()
def official_style_logits(model, bits: torch.Tensor, step_value: float, text_cond: torch.Tensor,
                          text_uncond: torch.Tensor, aspect_ratio: float, base: torch.dtype = torch.float32,
                          residual: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cond, uncond)`` logits ``[1, t, h, w, bits, 2]`` of one T2V step computed in the official inference order.

    ``model`` is one of our refiners (its modules hold the official weights under the official names); ``base`` is the
    dtype the official code writes as float32 (norm upcasts, sinusoid, RoPE tables, head input). Run it under
    ``torch.autocast("cpu", dtype=torch.bfloat16)`` with float32 weights for the official bf16 path; with float64
    weights, ``base=float64`` and no autocast it is the float64 function the golden records were made with.
    ``residual`` (diagnostic): cast the packed tokens to this dtype before the blocks, so that the residual stream
    stays in it (officially it is whatever the embeddings return: bf16 under autocast).
    """
    cfg = model.config
    template = aspect_template(aspect_ratio)
    _, nbits, t, h, w = bits.shape
    visual = t * h * w
    # multiclass_labels2onehot_input + word_embed: label-major one-hot, channel 2j + bit_j.
    onehot = F.one_hot(bits.reshape(nbits, visual).t().long(), 2).reshape(visual, 2 * nbits).to(base)
    vis = model.word_embed(onehot)
    texts = [model.text_proj(text.to(base)) for text in (text_cond, text_uncond)]
    step = _official_step_token(model.pt_embedder, step_value, base)
    vis_pos = visual_positions(t, h, w, template)

    def table(positions):
        return _official_rope_table(positions, cfg.head_dim, cfg.rope_base, base)

    if cfg.layout == "joint":  # per branch [visual | text | step token], attending to itself
        x = torch.cat([vis, texts[0], step, vis, texts[1], step])
        x = x if residual is None else x.to(residual)
        cos, sin = table(torch.cat([vis_pos, text_positions(len(text_cond)), step_positions(),
                                    vis_pos, text_positions(len(text_uncond)), step_positions()]))
        lengths = [visual + len(text_cond) + 1, visual + len(text_uncond) + 1]
        for block in model.blocks:
            x, _ = _official_block(block, x, cos, sin, lengths, cfg, base)
    else:  # prefix: the texts run alone first and leave their per-layer K/V; then per branch [visual | step token]
        text_lengths = [len(text_cond), len(text_uncond)]
        xt = torch.cat(texts)
        xt = xt if residual is None else xt.to(residual)
        cos_t, sin_t = table(torch.cat([text_positions(n) for n in text_lengths]))
        caches = []
        for block in model.blocks:
            xt, (k, v) = _official_block(block, xt, cos_t, sin_t, text_lengths, cfg, base)
            caches.append([(k[:text_lengths[0]], v[:text_lengths[0]]), (k[text_lengths[0]:], v[text_lengths[0]:])])
        x = torch.cat([vis, step, vis, step])
        x = x if residual is None else x.to(residual)
        cos, sin = table(torch.cat([vis_pos, step_positions(), vis_pos, step_positions()]))
        lengths = [visual + 1, visual + 1]
        for block, prefix in zip(model.blocks, caches):
            x, _ = _official_block(block, x, cos, sin, lengths, cfg, base, prefix=prefix)
    # get_logits_during_infer: head(x.float()) inside autocast('cuda', dtype=float32) -> float32 on the GPU.
    with torch.autocast("cpu", enabled=False):
        hidden = x.to(base)
        logits = model.head.proj(_official_rms(hidden, model.head.norm, base).to(model.head.proj.weight.dtype))
    shape = (1, t, h, w, nbits, 2)
    return logits[:visual].reshape(shape), logits[lengths[0]:lengths[0] + visual].reshape(shape)


# ----------------------------------------------------------------------------------------------------------------------
# Inputs and paths


def clean_bits() -> torch.Tensor:
    """``[1, 32, 3, 12, 21]`` structured bits: the golden I2V first frame (real image) repeated over 3 frames."""
    from safetensors.torch import load_file

    first = load_file(str(GOLDEN / "refiner_joint_io.safetensors"))["i2v.first_frame_labels"]
    return first.repeat(1, 1, 3, 1, 1).to(torch.uint8)


def golden_text_std() -> float:
    from safetensors.torch import load_file

    io = load_file(str(GOLDEN / "refiner_joint_io.safetensors"))
    return float(torch.cat([io["text_cond"], io["text_uncond"]]).std())


def case_text_lengths(seed: int, index: int) -> tuple[int, int]:
    """Text lengths of case ``index`` of a seed: the pairs alternate over cases and seeds, so that over two or more
    seeds every kept fraction sees every length (half the forward passes of running all pairs every seed)."""
    return TEXT_LENGTHS[(seed + index) % len(TEXT_LENGTHS)]


def make_case(gen: torch.Generator, clean: torch.Tensor, kept: float, lengths: tuple[int, int], text_channels: int,
              text_std: float) -> dict:
    """Bits with a fraction ``kept`` of ``clean`` and the rest random, Gaussian text features, one uniform per bit."""
    keep = torch.rand(clean.shape, generator=gen) < kept
    noise = torch.randint(0, 2, clean.shape, generator=gen, dtype=torch.uint8)
    bits = torch.where(keep, clean, noise)
    text_cond = torch.randn(lengths[0], text_channels, generator=gen, dtype=torch.float64) * text_std
    text_uncond = torch.randn(lengths[1], text_channels, generator=gen, dtype=torch.float64) * text_std
    _, nbits, t, h, w = clean.shape
    uniforms = torch.rand(1, t, h, w, nbits, generator=gen, dtype=torch.float64)
    return dict(bits=bits, kept=kept, text_cond=text_cond, text_uncond=text_uncond, uniforms=uniforms)


def round_weights_like_bf16(model) -> None:
    """Round (in place, dtype kept) every weight that bf16 storage or bf16 autocast rounds: all but the norms and
    the head, which both paths keep in float32."""
    from grn_core.nn import RMSNorm

    kept = {name for name, module in model.named_modules() if isinstance(module, RMSNorm)}
    for name, param in model.named_parameters():
        owner = name.rpartition(".")[0]
        if owner in kept or name.startswith("head."):
            continue
        param.data = param.data.to(torch.bfloat16).to(param.dtype)


def load_models(layout: str, diagnostics: bool = False) -> dict:
    path = GOLDEN / f"refiner_{layout}_weights.safetensors"
    if not path.is_file():
        raise SystemExit(f"error: {path} is missing; the golden refiner weights ship with the repository's tests.")
    models = {name: load_refiner(path, layout=layout, dtype=dtype).eval()
              for name, dtype in (("fp64", "fp64"), ("fp32", "fp32"), ("bf16", "bf16"))}
    if diagnostics:
        models["fp64_bf16w"] = load_refiner(path, layout=layout, dtype="fp64").eval()
        round_weights_like_bf16(models["fp64_bf16w"])
    return models


def run_paths(models: dict, case: dict, paths=PATHS) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Logits of the truth and of each of ``paths`` for one case."""
    args = (case["bits"], case["kept"])
    kw = dict(aspect_ratio=ASPECT)
    tc, tu = case["text_cond"], case["text_uncond"]
    tc32, tu32 = tc.float(), tu.float()
    out = {"truth": models["fp64"].step_logits(*args, tc, tu, **kw)}
    for path in paths:
        if path == "fp32":
            out[path] = models["fp32"].step_logits(*args, tc32, tu32, **kw)
        elif path == "ours_bf16":
            out[path] = models["bf16"].step_logits(*args, tc32, tu32, **kw)
        elif path == "bf16_weights_fp64":
            out[path] = models["fp64_bf16w"].step_logits(*args, tc, tu, **kw)
        elif path == "official_autocast":
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out[path] = official_style_logits(models["fp32"], *args, tc32, tu32, ASPECT)
        elif path == "official_fp32_residual":
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out[path] = official_style_logits(models["fp32"], *args, tc32, tu32, ASPECT,
                                                  residual=torch.float32)
        elif path == "ours_fp32_autocast":
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out[path] = models["fp32"].step_logits(*args, tc32, tu32, **kw)
        else:
            raise ValueError(f"unknown path {path!r}")
    return out


def check_official_order(models: dict, case: dict) -> dict[str, float]:
    """The official-order function without autocast against our model: float64 (must agree to ~1e-12) and float32."""
    args = (case["bits"], case["kept"])
    result = {}
    for name, base in (("fp64", torch.float64), ("fp32", torch.float32)):
        text = [case["text_cond"].to(base), case["text_uncond"].to(base)]
        ours = models[name].step_logits(*args, *text, aspect_ratio=ASPECT)
        official = official_style_logits(models[name], *args, *text, ASPECT, base=base)
        result[name] = max(float(relative_logit_error(o, r).max()) for o, r in zip(official, ours))
    if result["fp64"] > 1e-9:
        raise SystemExit(f"error: the official-order function disagrees with our float64 refiner "
                         f"(relative {result['fp64']:.3g}); the comparison would be meaningless.")
    return result


# ----------------------------------------------------------------------------------------------------------------------
# Report


def _fmt(stat: dict[str, float], percent: bool = False) -> str:
    scale = 100.0 if percent else 1.0
    m, s = stat["mean"] * scale, stat["std"] * scale
    if percent:
        return f"{m:.3f} ± {s:.3f} %"
    return f"{m:.2e} ± {s:.1e}"


def markdown(summary: dict, by_kept: dict, layouts: list[str], paths=PATHS) -> str:
    lines = ["| layout | path | max rel. logit err | mean rel. logit err | max abs(Δp1) | mean abs(Δp1) "
             "| flipped bits |",
             "|---|---|---|---|---|---|---|"]
    for layout in layouts:
        for path in paths:
            s = summary[layout][path]
            cells = [_fmt(s[key]) for key in METRICS[:-1]] + [_fmt(s["flipped"], percent=True)]
            lines.append(f"| {layout} | {PATH_LABELS[path]} | " + " | ".join(cells) + " |")
    lines += ["", "Flipped bits by kept fraction r (mean over seeds and text lengths):", "",
              "| layout | path | " + " | ".join(f"r = {r:g}" for r in KEPT_FRACTIONS) + " |",
              "|---|---|" + "---|" * len(KEPT_FRACTIONS)]
    for layout in layouts:
        for path in paths:
            cells = [f"{100 * by_kept[layout][path][str(r)]['flipped']:.3f} %" for r in KEPT_FRACTIONS]
            lines.append(f"| {layout} | {PATH_LABELS[path]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=4, help="seeds to run (1..100, default 4)")
    parser.add_argument("--seed", type=int, default=0, help="first seed (>= 0, default 0)")
    parser.add_argument("--layouts", default="joint,prefix", help="comma-separated subset of joint,prefix")
    parser.add_argument("--guidance", type=float, default=3.0, help="guidance scale w (default 3)")
    parser.add_argument("--tau", type=float, default=1.0, help="sampling temperature (> 0, default 1)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    parser.add_argument("--diagnostics", action="store_true",
                        help="also run the diagnostic paths (bf16-rounded weights in fp64; official-style with a "
                             "float32 residual stream; ours fp32 + autocast)")
    args = parser.parse_args(argv)
    if not 1 <= args.repeats <= 100:
        parser.error(f"--repeats {args.repeats}: give 1 to 100 seeds.")
    if args.seed < 0:
        parser.error(f"--seed {args.seed}: must be >= 0.")
    layouts = [s.strip() for s in args.layouts.split(",") if s.strip()]
    if not layouts or any(s not in LAYOUTS for s in layouts) or len(set(layouts)) != len(layouts):
        parser.error(f"--layouts {args.layouts!r}: a comma-separated subset of {','.join(LAYOUTS)}.")
    args.layouts = layouts
    if not math.isfinite(args.guidance):
        parser.error(f"--guidance {args.guidance}: must be a finite number.")
    if not (math.isfinite(args.tau) and args.tau > 0):
        parser.error(f"--tau {args.tau}: must be a finite number > 0.")
    if args.threads < 0:
        parser.error(f"--threads {args.threads}: must be >= 0.")
    if args.json is not None and not args.json.parent.resolve().is_dir():
        parser.error(f"--json {args.json}: directory {args.json.parent} does not exist.")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    clean = clean_bits()
    text_std = golden_text_std()
    seeds = [args.seed + i for i in range(args.repeats)]
    paths = PATHS + (DIAGNOSTIC_PATHS if args.diagnostics else ())
    per_seed = {layout: {path: [] for path in paths} for layout in args.layouts}
    kept_acc = {layout: {path: {str(r): [] for r in KEPT_FRACTIONS} for path in paths} for layout in args.layouts}
    sanity = {}
    for layout in args.layouts:
        models = load_models(layout, args.diagnostics)
        text_channels = models["fp64"].config.text_channels
        for seed in seeds:
            gen = torch.Generator().manual_seed(seed)
            cases = [make_case(gen, clean, r, case_text_lengths(seed, i), text_channels, text_std)
                     for i, r in enumerate(KEPT_FRACTIONS)]
            if seed == seeds[0]:
                sanity[layout] = check_official_order(models, cases[-1])
            results = {path: [] for path in paths}
            for case in cases:
                logits = run_paths(models, case, paths)
                for path in paths:
                    m = measure(logits[path], logits["truth"], case["uniforms"], args.guidance, args.tau)
                    results[path].append(m)
                    kept_acc[layout][path][str(case["kept"])].append(m)
            for path in paths:
                per_seed[layout][path].append(summarize_cases(results[path]))
    summary = {layout: {path: {key: {**mean_spread([s[key] for s in per_seed[layout][path]]),
                                     "per_seed": [s[key] for s in per_seed[layout][path]]}
                               for key in METRICS} for path in paths} for layout in args.layouts}
    by_kept = {layout: {path: {r: {key: statistics.fmean(c[key] for c in cases) for key in METRICS}
                               for r, cases in kept_acc[layout][path].items()} for path in paths}
               for layout in args.layouts}
    elapsed = time.perf_counter() - started
    table = markdown(summary, by_kept, args.layouts, paths)
    report = {
        "command": "python benchmarks/bf16_fidelity.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "threads":
                    torch.get_num_threads(), "torch": torch.__version__},
        "settings": {"seeds": seeds, "paths": list(paths), "layouts": args.layouts,
                     "kept_fractions": list(KEPT_FRACTIONS), "text_lengths": [list(x) for x in TEXT_LENGTHS], "guidance": args.guidance, "tau": args.tau,
                     "grid": list(clean.shape[2:]), "aspect_template": ASPECT},
        "official_order_check_max_rel": sanity,
        "summary": summary,
        "by_kept_fraction": by_kept,
        "seconds": round(elapsed, 1),
        "table_markdown": table,
    }
    print(table)
    print()
    print(f"official-order function vs our model without autocast (max rel. logit diff): "
          + ", ".join(f"{layout}: fp64 {v['fp64']:.1e}, fp32 {v['fp32']:.1e}" for layout, v in sanity.items()))
    print(f"{len(seeds)} seeds x {len(KEPT_FRACTIONS)} cases x {len(args.layouts)} layouts in "
          f"{elapsed:.1f} s")
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=1))
        print(f"wrote {args.json}")
    return report


if __name__ == "__main__":
    main()
