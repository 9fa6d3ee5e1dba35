"""Refiner behaviour beyond the golden records: batching, branches, text caching, GQA, dtypes, config, buckets and
input errors."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from grn_core import hbq
from grn_core.refiner import (
    ASPECT_TEMPLATES,
    KEEP_CAP,
    GRN2b,
    GRN8b,
    GRNRefiner,
    RefinerConfig,
    TextContext,
    aspect_template,
    infer_refiner_config,
    latent_frames,
    latent_grid,
    nearest_aspect,
    pixel_size,
    video_num_frames,
)
from grn_core.refiner.rope import normalized_extent, rope_pair_split, visual_positions
from tests._golden import load_golden, rel_err

GRID = (2, 4, 6)


def small_config(layout="joint", **kw):
    base = dict(width=40, depth=2, heads=2, kv_heads=1, mlp_hidden=64, block_chunks=2, text_channels=12,
                latent_channels=3, layout=layout)
    return RefinerConfig(**{**base, **kw})


def random_model(config, seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    model = GRNRefiner(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            # Non-trivial norm weights and biases so that every parameter matters.
            offset = 1.0 if name.endswith("norm.weight") else 0.0
            p.copy_(torch.randn_like(p) * (0.3 if p.dim() > 1 else 0.5) + offset)
    return model.to(dtype).eval()


def random_inputs(config, batch=1, grid=GRID, seed=1, text_lens=(5, 3)):
    g = torch.Generator().manual_seed(seed)
    bits = torch.randint(0, 2, (batch, config.bits, *grid), generator=g, dtype=torch.uint8)
    texts = [torch.randn(n, config.text_channels, generator=g, dtype=torch.float64) for n in text_lens]
    first = torch.randint(0, 2, (batch, config.bits, 1, *grid[1:]), generator=g, dtype=torch.uint8)
    return bits, texts, first


# ----------------------------------------------------------------------------------------------------------------------
# A deliberately naive re-statement of the model (explicit one-hot, one branch at a time, explicit softmax, repeated
# K/V heads, pair-wise cos/sin RoPE) to check the packed, batched implementation on configs the golden files lack.


def _rms(x, weight, eps=1e-6):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def _rope_naive(x, positions, head_dim):
    n_t, n_h, n_w = rope_pair_split(head_dim)
    freqs = []
    for m in (n_t, n_h, n_w):
        freqs.append(1.0 / 10000.0 ** (torch.arange(m, dtype=torch.float64) / m))
    angle = torch.cat([positions[:, 0:1] * freqs[0], positions[:, 1:2] * freqs[1], positions[:, 2:3] * freqs[2]], -1)
    cos, sin = angle.cos()[:, None], angle.sin()[:, None]  # [L, 1, D/2]
    x0, x1 = x[..., 0::2], x[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x0 * cos - x1 * sin
    out[..., 1::2] = x0 * sin + x1 * cos
    return out


def _layer_qkv(block, x, positions, cfg):
    h = _rms(x, block.input_layernorm.weight)
    q = (h @ block.attn.q_proj.weight.T).view(-1, cfg.heads, cfg.head_dim)
    k = (h @ block.attn.k_proj.weight.T).view(-1, cfg.kv_heads, cfg.head_dim)
    v = (h @ block.attn.v_proj.weight.T).view(-1, cfg.kv_heads, cfg.head_dim)
    q = _rope_naive(_rms(q, block.attn.q_norm.weight), positions.double(), cfg.head_dim)
    k = _rope_naive(_rms(k, block.attn.k_norm.weight), positions.double(), cfg.head_dim)
    return q, k, v


def _layer_rest(block, x, q, k, v, cfg):
    rep = cfg.heads // cfg.kv_heads
    k = k[:, :, None].expand(-1, -1, rep, -1).reshape(k.shape[0], cfg.heads, cfg.head_dim)
    v = v[:, :, None].expand(-1, -1, rep, -1).reshape(v.shape[0], cfg.heads, cfg.head_dim)
    scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(cfg.head_dim)
    attn = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).reshape(q.shape[0], -1)
    x = x + attn @ block.attn.o_proj.weight.T
    h = _rms(x, block.post_attention_layernorm.weight)
    mlp = block.mlp
    return x + (F.silu(h @ mlp.gate_proj.weight.T) * (h @ mlp.up_proj.weight.T)) @ mlp.down_proj.weight.T


def naive_branch(model, bits, r, text, template, first=None):
    """Logits ``[t, h, w, bits, 2]`` of one sample ``bits [1, C, t, h, w]`` and one branch, float64."""
    cfg = model.config
    _, _, t, h, w = bits.shape

    def embed(b):
        one_hot = hbq.bits_one_hot(b, dtype=torch.float64)  # [1, 2C, ...] label-major
        return one_hot.flatten(2)[0].T @ model.word_embed.weight.T + model.word_embed.bias

    half = cfg.step_freq_dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float64) / half)
    sinusoid = torch.cat([torch.cos(r * freqs), torch.sin(r * freqs)])[None]
    step = model.pt_embedder.mlp(sinusoid)
    txt = text @ model.text_proj.weight.T + model.text_proj.bias
    vis = embed(bits)
    vis_pos = visual_positions(t, h, w, template, frame_offset=1 if first is not None else 0)
    text_pos = torch.stack([torch.arange(text.shape[0]), torch.zeros(text.shape[0], dtype=torch.long),
                            torch.zeros(text.shape[0], dtype=torch.long)], -1)
    step_pos = torch.tensor([[512, 0, 0]])
    if cfg.layout == "joint":
        pieces, pos = [vis], [vis_pos]
        if first is not None:
            pieces.append(embed(first))
            pos.append(visual_positions(1, h, w, template))
        x = torch.cat(pieces + [txt, step])
        positions = torch.cat(pos + [text_pos, step_pos])
        for block in model.blocks:
            q, k, v = _layer_qkv(block, x, positions, cfg)
            x = _layer_rest(block, x, q, k, v, cfg)
    else:
        text_kv, xt = [], txt
        for block in model.blocks:
            q, k, v = _layer_qkv(block, xt, text_pos, cfg)
            text_kv.append((k, v))
            xt = _layer_rest(block, xt, q, k, v, cfg)
        x = torch.cat([vis, step])
        positions = torch.cat([vis_pos, step_pos])
        for block, (kt, vt) in zip(model.blocks, text_kv):
            q, k, v = _layer_qkv(block, x, positions, cfg)
            x = _layer_rest(block, x, q, torch.cat([kt, k]), torch.cat([vt, v]), cfg)
    out = model.head.proj(_rms(x[: t * h * w], model.head.norm.weight))
    return out.view(t, h, w, cfg.bits, 2)


@pytest.mark.parametrize("layout", ["joint", "prefix"])
def test_batched_gqa_model_matches_naive_reference(layout):
    """GQA (2 heads, 1 kv head), head_dim 20 (RoPE split 3/3/4), batch of 2 with per-sample prompts and step values."""
    cfg = small_config(layout)
    assert rope_pair_split(cfg.head_dim) == (3, 3, 4)
    model = random_model(cfg)
    bits, texts, first = random_inputs(cfg, batch=2, text_lens=(5, 3, 4))
    r = torch.tensor([0.25, 0.7])
    first = first if layout == "joint" else None
    cond, uncond = model.step_logits(bits, r, [texts[0], texts[1]], texts[2], aspect_ratio=0.75, first_frame_bits=first)
    template = aspect_template(0.75)
    for b in range(2):
        ff = first[b:b + 1] if first is not None else None
        exp_c = naive_branch(model, bits[b:b + 1], r[b], texts[b], template, ff)
        exp_u = naive_branch(model, bits[b:b + 1], r[b], texts[2], template, ff)
        assert rel_err(cond[b], exp_c) < 1e-10
        assert rel_err(uncond[b], exp_u) < 1e-10


def test_word_embed_equals_one_hot_product():
    cfg = small_config()
    model = random_model(cfg)
    bits, _, _ = random_inputs(cfg, batch=2)
    tokens = model._grid_tokens(bits)
    one_hot = hbq.bits_one_hot(bits, dtype=torch.float64).flatten(2).transpose(1, 2)
    assert rel_err(tokens, model.word_embed(one_hot)) < 1e-13


@pytest.fixture(scope="module")
def golden_models():
    """The golden weights (both layouts, float64) with a small 2x4x6 bit map: these tests are about batching and
    branches, not the golden grid, and must stay fast."""
    out = {}
    for layout in ("joint", "prefix"):
        weights = load_golden(f"refiner_{layout}_weights.safetensors")
        model = GRNRefiner(infer_refiner_config(weights, layout=layout))
        model.load_state_dict(weights, strict=True)
        out[layout] = model.double().eval()
    io = load_golden("refiner_joint_io.safetensors")
    small = {
        "bits": io["t2v.step1.labels"][:, :, :2, :4, :6].contiguous(),
        "bits2": io["t2v.step2.labels"][:, :, :2, 4:8, 6:12].contiguous(),
        "first": io["i2v.first_frame_labels"][:, :, :, :4, :6].contiguous(),
        "r": io["t2v.pt_values"][1:3].double(),
        "text_cond": io["text_cond"].double(),
        "text_uncond": io["text_uncond"].double(),
    }
    return out, small


@pytest.mark.parametrize("layout", ["joint", "prefix"])
def test_uncond_none_equals_cond_of_full_call(golden_models, layout):
    models, io = golden_models
    model = models[layout]
    bits, r = io["bits"], float(io["r"][0])
    cond_full, uncond_full = model.step_logits(bits, r, io["text_cond"], io["text_uncond"], aspect_ratio=0.75)
    cond_only, none = model.step_logits(bits, r, io["text_cond"], None, aspect_ratio=0.75)
    assert none is None and uncond_full is not None
    assert rel_err(cond_only, cond_full) < 1e-12


@pytest.mark.parametrize("layout", ["joint", "prefix"])
def test_batch_of_two_equals_two_single_calls(golden_models, layout):
    models, io = golden_models
    model = models[layout]
    bits = torch.cat([io["bits"], io["bits2"]])
    r = io["r"]
    g = torch.Generator().manual_seed(3)
    other_text = torch.randn(5, 32, generator=g, dtype=torch.float64)
    first = torch.cat([io["first"], 1 - io["first"]]) if layout == "joint" else None
    for texts in ([io["text_cond"], other_text], io["text_cond"]):  # per-sample prompts, then one shared prompt
        cond, uncond = model.step_logits(bits, r, texts, io["text_uncond"], aspect_ratio=0.75, first_frame_bits=first)
        for b in range(2):
            text_b = texts[b] if isinstance(texts, list) else texts
            ff = first[b:b + 1] if first is not None else None
            c1, u1 = model.step_logits(bits[b:b + 1], float(r[b]), text_b, io["text_uncond"], aspect_ratio=0.75,
                                       first_frame_bits=ff)
            assert rel_err(cond[b], c1[0]) < 1e-12 and rel_err(uncond[b], u1[0]) < 1e-12


def test_per_sample_prompts_of_equal_length_use_their_own_text(golden_models):
    """Same-length prompts share an attention call (stacked text K/V in prefix); each must still see its own text."""
    models, io = golden_models
    for model in models.values():
        bits = io["bits"].repeat(2, 1, 1, 1, 1)
        texts = [io["text_cond"], io["text_cond"].flip(0)]
        cond, _ = model.step_logits(bits, 0.3, texts, None, aspect_ratio=0.75)
        single, _ = model.step_logits(bits[:1], 0.3, texts[1], None, aspect_ratio=0.75)
        assert rel_err(cond[1], single[0]) < 1e-12
        assert rel_err(cond[0], cond[1]) > 1e-6


@pytest.mark.parametrize("layout", ["joint", "prefix"])
def test_prepared_text_equals_raw_text_and_is_deterministic(golden_models, layout):
    models, io = golden_models
    model = models[layout]
    bits = io["bits"]
    ctx_c, ctx_u = model.prepare_text(io["text_cond"]), model.prepare_text(io["text_uncond"])
    assert isinstance(ctx_c, TextContext) and ctx_c.layout == layout and ctx_c.lengths == (7,)
    if layout == "prefix":
        assert len(ctx_c.keys) == model.config.depth and ctx_c.keys[0].shape == (7, 2, 64)
    a = model.step_logits(bits, 0.0, ctx_c, ctx_u, aspect_ratio=0.75)
    b = model.step_logits(bits, 0.0, io["text_cond"], io["text_uncond"], aspect_ratio=0.75)
    assert torch.equal(a[0], model.step_logits(bits, 0.0, ctx_c, ctx_u, aspect_ratio=0.75)[0])
    assert rel_err(a[0], b[0]) < 1e-13 and rel_err(a[1], b[1]) < 1e-13


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("layout", ["joint", "prefix"])
def test_forward_under_autograd_is_step_logits(layout, dtype):
    """``model(...)`` (training's entry point) records a graph, yet gives step_logits' cond logits bit for bit: under
    autograd the pass runs its in-place kernels' maths out of place, same ops in the same order. Inputs untouched."""
    config = small_config(layout, kv_heads=2, heads=4)
    model = random_model(config, dtype=dtype)
    bits, texts, first = random_inputs(config, batch=2, text_lens=(5, 3))
    first = first[:1] if layout == "joint" else None
    r = torch.tensor([0.25, 0.75])
    kept = [t.clone() for t in texts]
    out = model(bits, r, texts, aspect_ratio=0.75, first_frame_bits=first)
    expected, uncond = model.step_logits(bits, r, texts, aspect_ratio=0.75, first_frame_bits=first)
    assert out.grad_fn is not None and uncond is None
    assert expected.grad_fn is None, "step_logits stays inference-only"
    assert torch.equal(out, expected)
    with torch.inference_mode():
        assert torch.equal(model(bits, r, texts, aspect_ratio=0.75, first_frame_bits=first), expected)
    assert all(torch.equal(a, b) for a, b in zip(texts, kept))


def test_aspect_ratio_maps_to_template(golden_models):
    models, io = golden_models
    model = models["joint"]
    bits = io["bits"][:, :, :, :3, :4]  # a 3x4 grid
    ref, _ = model.step_logits(bits, 0.0, io["text_cond"], aspect_ratio=0.75)
    for value in (0.76, None):  # near 3:4, and the grid's own 3/4, both map to the 0.75 template
        out, _ = model.step_logits(bits, 0.0, io["text_cond"], aspect_ratio=value)
        assert torch.equal(out, ref)
    other, _ = model.step_logits(bits, 0.0, io["text_cond"], aspect_ratio=1.0)
    assert rel_err(other, ref) > 1e-6


def test_half_precision_storage_runs_close_to_float32():
    cfg = small_config(kv_heads=2)
    model32 = random_model(cfg, dtype=torch.float32)
    bits, texts, first = random_inputs(cfg, batch=1)
    ref, _ = model32.step_logits(bits, 0.5, texts[0].float(), texts[1].float(), first_frame_bits=first)
    model16 = random_model(cfg, dtype=torch.bfloat16)
    cond, uncond = model16.step_logits(bits, 0.5, texts[0], texts[1], first_frame_bits=first)
    assert cond.dtype == torch.float32 and uncond.dtype == torch.float32  # logits in compute dtype
    assert rel_err(cond, ref) < 0.1


# ----------------------------------------------------------------------------------------------------------------------
# Config


def test_state_dict_keys_are_official():
    weights = load_golden("refiner_joint_weights.safetensors")
    model = GRNRefiner(infer_refiner_config(weights))
    assert set(model.state_dict()) == set(weights)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == {k: tuple(v.shape) for k, v in weights.items()}


def test_infer_config_from_golden_and_presets():
    weights = load_golden("refiner_prefix_weights.safetensors")
    cfg = infer_refiner_config(weights, layout="prefix")
    assert (cfg.width, cfg.depth, cfg.heads, cfg.kv_heads, cfg.head_dim) == (128, 4, 2, 2, 64)
    assert (cfg.mlp_hidden, cfg.block_chunks, cfg.text_channels, cfg.latent_channels, cfg.rounds) == (512, 2, 32, 8, 4)
    assert cfg.layout == "prefix" and cfg.keep_cap == KEEP_CAP["prefix"] == 0.999
    assert infer_refiner_config(weights).keep_cap == 0.95
    assert infer_refiner_config(weights, rounds=2).latent_channels == 16
    assert infer_refiner_config(weights, norm_eps=1e-5).norm_eps == 1e-5

    two, eight = GRN2b(), GRN8b()
    assert (two.depth, two.width, two.heads, two.head_dim, two.kv_heads, two.mlp_hidden, two.block_chunks) == (
        28, 2304, 18, 128, 18, 8192, 7)
    assert (eight.depth, eight.width, eight.heads, eight.head_dim, eight.kv_heads, eight.mlp_hidden,
            eight.block_chunks) == (36, 4096, 32, 128, 32, 12288, 6)
    assert two.in_channels == 512 and two.text_channels == 4096
    for preset in (two, eight):
        with torch.device("meta"):  # shapes only: an 8B model is never materialised here
            sd = GRNRefiner(preset).state_dict()
        assert infer_refiner_config(sd) == preset


def test_config_round_trip_and_validation():
    cfg = GRN2b(layout="prefix")
    data = json.loads(json.dumps(cfg.to_dict()))
    assert RefinerConfig.from_dict(data) == cfg
    with pytest.raises(ValueError, match="no field"):
        RefinerConfig.from_dict({**data, "bogus": 1})
    with pytest.raises(ValueError, match="layout"):
        RefinerConfig(layout="sideways")
    with pytest.raises(ValueError, match="kv_heads"):
        RefinerConfig(width=64, heads=4, kv_heads=3)


def test_infer_rejects_non_refiner_dicts():
    weights = load_golden("refiner_joint_weights.safetensors")
    with pytest.raises(ValueError, match="word_embed.weight"):
        infer_refiner_config({k: v for k, v in weights.items() if not k.startswith("word_embed")})
    with pytest.raises(ValueError, match="nested"):
        infer_refiner_config({"trainer": {"gpt_fsdp": weights}})
    with pytest.raises(ValueError, match="rounds"):
        infer_refiner_config(weights, rounds=3)
    with pytest.raises(ValueError, match="override"):
        infer_refiner_config(weights, wdith=3)
    c2i = load_golden("c2i_weights.safetensors")
    with pytest.raises(ValueError, match="missing"):
        infer_refiner_config(c2i)


# ----------------------------------------------------------------------------------------------------------------------
# Buckets, aspect templates, positions


def test_buckets_and_templates_match_the_spec():
    assert len(ASPECT_TEMPLATES) == 15 and ASPECT_TEMPLATES[0] == 3.0 and ASPECT_TEMPLATES[-1] == 0.333
    assert latent_grid("1M", 2.0) == (91, 45)
    assert latent_grid("1M", 1.0) == (64, 64)
    assert latent_grid("0.06M", 9 / 16) == (12, 21)  # the golden grid
    assert latent_grid("0.41M", 9 / 16) == (30, 53) and pixel_size("0.41M", 9 / 16) == (480, 848)
    assert aspect_template(4 / 3) == 1.333 and aspect_template(9 / 16) == 0.562 and aspect_template(100 / 116) == 0.862
    assert normalized_extent(1.333) == (149, 112)  # truncation matters: exact 4/3 would give uph 150
    assert normalized_extent(4 / 3)[0] == 150
    assert normalized_extent(0.562) == (97, 173)
    assert nearest_aspect(0.59).template == 0.562 and nearest_aspect(10.0).template == 3.0
    assert nearest_aspect(1.07).template == 1.0 and nearest_aspect(1.09).template == 1.16
    assert video_num_frames(2.0) == 33 and latent_frames(33) == 9
    assert video_num_frames(10.0) == 81 and latent_frames(81) == 21
    assert video_num_frames(0) == 1 and latent_frames(1) == 1


def test_visual_positions():
    pos = visual_positions(3, 12, 21, 0.562)
    assert pos.shape == (3 * 12 * 21, 3)
    assert pos[0].tolist() == [600, 0, 0] and pos[-1].tolist() == [602, 89, 165]  # round(11*97/12), round(20*173/21)
    shifted = visual_positions(3, 12, 21, 0.562, frame_offset=1)
    assert shifted[0, 0] == 601 and torch.equal(shifted[:, 1:], pos[:, 1:])
    # The official float32 product rounds this exact half down (float64 would give 113).
    assert visual_positions(1, 28, 1, 3.0)[14, 1] == 112


def test_bucket_errors():
    with pytest.raises(ValueError, match="bucket"):
        latent_grid("3M", 1.0)
    with pytest.raises(ValueError, match="aspect"):
        latent_grid("1M", -1.0)
    with pytest.raises(ValueError, match="num_frames"):
        latent_frames(0)
    with pytest.raises(ValueError, match="duration"):
        video_num_frames(-1)


# ----------------------------------------------------------------------------------------------------------------------
# Input errors


def test_bad_inputs_raise_value_error():
    cfg = small_config(kv_heads=2)
    model = random_model(cfg)
    bits, texts, first = random_inputs(cfg)
    text = texts[0]
    with pytest.raises(ValueError, match=r"12 bit channels"):
        model.step_logits(bits[:, :-1], 0.5, text)
    with pytest.raises(ValueError, match=r"\[B, rounds\*d=12, t, h, w\]"):
        model.step_logits(bits[:, :, 0], 0.5, text)
    with pytest.raises(ValueError, match="0 or 1"):
        model.step_logits(bits * 2, 0.5, text)
    with pytest.raises(ValueError, match="dtype"):
        model.step_logits(bits.float(), 0.5, text)
    with pytest.raises(ValueError, match=r"\[L, 12\]"):
        model.step_logits(bits, 0.5, torch.randn(4, 13, dtype=torch.float64))
    with pytest.raises(ValueError, match="text_uncond"):
        model.step_logits(bits, 0.5, text, torch.randn(4, 7, dtype=torch.float64))
    with pytest.raises(ValueError, match="first_frame_bits"):
        model.step_logits(bits, 0.5, text, first_frame_bits=first[..., :-1])
    with pytest.raises(ValueError, match="first_frame_bits"):
        model.step_logits(bits, 0.5, text, first_frame_bits=first.repeat(1, 1, 2, 1, 1))
    with pytest.raises(ValueError, match="2 prompts for a batch of 1"):
        model.step_logits(bits, 0.5, [text, text])
    with pytest.raises(ValueError, match="step_value"):
        model.step_logits(bits, torch.tensor([0.1, 0.2, 0.3]), text)
    with pytest.raises(ValueError, match="512"):
        model.prepare_text(torch.randn(513, 12, dtype=torch.float64))
    prefix = random_model(small_config("prefix", kv_heads=2))
    with pytest.raises(ValueError, match="image-to-video"):
        prefix.step_logits(bits, 0.5, text, first_frame_bits=first)
    with pytest.raises(ValueError, match="prefix"):
        model.step_logits(bits, 0.5, prefix.prepare_text(text))
