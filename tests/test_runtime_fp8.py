"""Weight storage: fp8 with per-row scales and per-call upcast, half storage with float32 norms and head.

Measured on the golden joint refiner (t2v step 0, both branches), max |Δ| / max |reference| of the cond logits:
bf16 vs float64 ≈ 0.007, fp16 vs float64 ≈ 0.0009, fp8_e4m3fn vs bf16 ≈ 0.052, fp8_e5m2 vs bf16 ≈ 0.126
(e4m3 keeps 3 mantissa bits, e5m2 2; the golden weights are random, std 0.09); a converted e4m3fn *file* (every
matrix plain-cast to fp8, no scales, see ``grn_core.convert``) ≈ 0.109. The bounds below leave ~1.5× room.
"""

import pytest
import torch
from torch import nn

from grn_core.checkpoints import load_c2i, load_refiner, load_umt5
from grn_core.convert import convert
from grn_core.nn import RMSNorm
from grn_core.refiner import GRNRefiner, GRN8b
from grn_core.runtime.fp8 import Fp8Linear, matmul_weight, quantize_linears, quantize_rows
from grn_core.runtime.memory import refiner_weight_bytes
from grn_core.runtime.offload import module_bytes
from grn_core.runtime.precision import Precision, cast_network, resolve_precision
from tests._golden import GOLDEN, load_golden, rel_err

REFINER = GOLDEN / "refiner_joint_weights.safetensors"
FP8_TOLERANCE = {"fp8_e4m3fn": 0.08, "fp8_e5m2": 0.2}


@pytest.fixture(scope="module")
def step_args():
    io = load_golden("refiner_joint_io.safetensors")
    return (io["t2v.step0.labels"].long(), float(io["t2v.pt_values"][0]), io["text_cond"], io["text_uncond"])


def cond_logits(ref, args):
    return ref.step_logits(*args, aspect_ratio=0.562)[0]


@pytest.fixture(scope="module")
def bf16_logits(step_args):
    return cond_logits(load_refiner(REFINER, layout="joint", dtype="bf16"), step_args)


# ---- quantisation ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fp8, mantissa, subnormal_step", [(torch.float8_e4m3fn, 3, 2.0 ** -9),
                                                           (torch.float8_e5m2, 2, 2.0 ** -16)])
def test_row_quantisation_error_is_half_an_ulp(fp8, mantissa, subnormal_step):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 96, dtype=torch.float64, generator=g) * torch.logspace(-4, 1, 64, dtype=torch.float64)[:, None]
    q, scale = quantize_rows(w, fp8)
    assert q.dtype == fp8 and q.element_size() == 1 and scale.shape == (64, 1)
    back = q.double() * scale.double()
    # Rounding to `mantissa` bits: relative error <= 2^-(mantissa+1) (plus float32 rounding of the scaled value);
    # entries below the row's normal range round to a multiple of the subnormal step instead.
    bound = (2.0 ** -(mantissa + 1) + 1e-6) * w.abs() + subnormal_step / 2 * scale.double() + 1e-12
    assert bool(((back - w).abs() <= bound).all())
    # Each row's largest entry maps onto the largest fp8 value: no saturation, no wasted range.
    assert torch.allclose(q.double().abs().amax(1), torch.full((64,), torch.finfo(fp8).max, dtype=torch.float64))


def test_fp8_linear_stores_one_byte_and_upcasts_per_call():
    torch.manual_seed(0)
    plain = nn.Linear(48, 32)
    x = torch.randn(5, 48)
    layer = Fp8Linear.from_linear(plain, torch.float8_e4m3fn, torch.float32)
    assert layer.weight.dtype == torch.float8_e4m3fn and layer.weight.element_size() == 1
    assert not layer.weight.requires_grad
    y = layer(x)
    assert y.dtype == torch.float32
    assert rel_err(y, plain(x)) < 0.05
    assert layer(x.bfloat16()).dtype == torch.bfloat16  # manual cast follows the input dtype
    w = matmul_weight(layer)
    assert w.dtype == torch.float32 and w is not layer.weight
    assert matmul_weight(plain) is plain.weight


def test_casts_keep_fp8_storage_and_change_the_compute_dtype():
    torch.manual_seed(0)
    layer = Fp8Linear.from_linear(nn.Linear(16, 8), torch.float8_e5m2, torch.bfloat16)
    layer.to(torch.float64)
    assert layer.weight.dtype == torch.float8_e5m2 and layer.weight_scale.dtype == torch.float32
    assert layer.compute_dtype == layer.bias.dtype == torch.float64
    assert matmul_weight(layer).dtype == torch.float64
    with torch.device("meta"):
        ghost = Fp8Linear.from_linear(nn.Linear(16, 8), torch.float8_e4m3fn, torch.bfloat16)
    ghost.to_empty(device="cpu")  # how the GPU suite builds random models
    assert ghost.weight.device.type == ghost.weight_scale.device.type == "cpu"
    assert ghost.weight.dtype == torch.float8_e4m3fn


def test_fp8_state_dict_speaks_plain_linear():
    torch.manual_seed(0)
    net = nn.Sequential(nn.ModuleList([nn.Linear(16, 16, bias=False), nn.Linear(16, 8)]))
    reference = {k: v.clone() for k, v in net.state_dict().items()}
    assert quantize_linears(net, torch.float8_e4m3fn, torch.float32) == 2
    saved = net.state_dict()
    assert list(saved) == list(reference)  # official key names, no scale buffers
    assert all(v.dtype == torch.float32 for v in saved.values())
    fresh = nn.Sequential(nn.ModuleList([nn.Linear(16, 16, bias=False), nn.Linear(16, 8)]))
    fresh.load_state_dict(saved, strict=True)
    # and a float dict loads into the fp8 model, quantised on the way in
    net.load_state_dict(reference, strict=True)
    assert net[0][1].weight.dtype == torch.float8_e4m3fn
    assert rel_err(net[0][1].upcast_weight(), reference["0.1.weight"]) < 2 ** -4
    with pytest.raises(RuntimeError, match="Missing key"):
        net.load_state_dict({"0.0.weight": reference["0.0.weight"]}, strict=True)


# ---- precision policy ------------------------------------------------------------------------------------------------

def test_precision_defaults_never_put_float32_on_a_gpu():
    assert resolve_precision(None, "cpu", torch.float32) == Precision(torch.float32, torch.float32)
    # CUDA is not needed to decide: without a GPU to ask, bf16 is the default half type.
    assert resolve_precision(None, "cuda", torch.float32).storage in (torch.bfloat16, torch.float16)
    assert resolve_precision(None, "mps", torch.float32).storage == torch.bfloat16
    assert resolve_precision(torch.float32, "cuda", torch.float32).storage == torch.float32  # asked for: allowed
    assert resolve_precision(None, "cuda", torch.float8_e4m3fn) == Precision(torch.float8_e4m3fn, torch.bfloat16)
    fp8_fp32 = resolve_precision(torch.float8_e5m2, "cpu", torch.float32, compute=torch.float32)
    assert fp8_fp32 == Precision(torch.float8_e5m2, torch.float32)
    with pytest.raises(ValueError, match="only exists for fp8 storage"):
        resolve_precision(torch.bfloat16, "cpu", None, compute=torch.float32)


def test_half_storage_keeps_norms_and_head_in_float32():
    ref = load_refiner(REFINER, layout="joint", dtype="bf16")
    assert ref.head.proj.weight.dtype == ref.head.norm.weight.dtype == torch.float32
    norms = [m for m in ref.modules() if isinstance(m, RMSNorm)]
    assert norms and all(m.weight.dtype == torch.float32 for m in norms)
    assert ref.word_embed.weight.dtype == ref.blocks[0].mlp.up_proj.weight.dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", ["fp8_e4m3fn", "fp8_e5m2"])
def test_fp8_refiner_logits_stay_close_to_bf16(dtype, step_args, bf16_logits):
    ref = load_refiner(REFINER, layout="joint", dtype=dtype)
    block_linears = [m for b in ref.blocks for m in b.modules() if isinstance(m, (nn.Linear,))]
    assert block_linears and all(isinstance(m, Fp8Linear) and m.weight_scale is not None for m in block_linears)
    assert ref.word_embed.weight.dtype == ref.text_proj.weight.dtype == torch.bfloat16  # small: compute dtype
    assert ref.head.proj.weight.dtype == torch.float32
    bf16 = load_refiner(REFINER, layout="joint", dtype="bf16")
    block_bytes = sum(module_bytes(b) for b in ref.blocks)
    assert block_bytes < 0.6 * sum(module_bytes(b) for b in bf16.blocks)
    logits = cond_logits(ref, step_args)
    assert logits.dtype == torch.float32
    assert rel_err(logits, bf16_logits) < FP8_TOLERANCE[dtype]


def test_half_storage_logits_match_float64(step_args):
    f64 = cond_logits(load_refiner(REFINER, layout="joint", dtype="fp64"), step_args)
    assert rel_err(cond_logits(load_refiner(REFINER, layout="joint", dtype="bf16"), step_args), f64) < 0.015
    assert rel_err(cond_logits(load_refiner(REFINER, layout="joint", dtype="fp16"), step_args), f64) < 0.003


def test_fp8_file_keeps_fp8_storage(tmp_path, step_args, bf16_logits):
    dst = convert(REFINER, tmp_path / "refiner_fp8.safetensors", dtype="fp8_e4m3fn", layout="joint")
    ref = load_refiner(dst)  # no dtype: the file's fp8, as stored (no rescaling)
    layer = ref.blocks[0].attn.q_proj
    assert isinstance(layer, Fp8Linear) and layer.weight_scale is None
    assert layer.weight.dtype == torch.float8_e4m3fn and ref.word_embed.weight.dtype == torch.bfloat16
    assert rel_err(cond_logits(ref, step_args), bf16_logits) < 0.16
    upcast = load_refiner(dst, dtype="bf16")  # asked for bf16: the exact upcast of the stored values
    assert type(upcast.blocks[0].attn.q_proj) is nn.Linear
    assert torch.equal(upcast.blocks[0].attn.q_proj.weight.float(), layer.upcast_weight(torch.float32))


def test_fp8_c2i_and_umt5_use_module_forward():
    io = load_golden("c2i_io.safetensors")
    c2i = {dt: load_c2i(GOLDEN / "c2i_weights.safetensors", in_context_start=1, dtype=dt)
           for dt in ("bf16", "fp8_e4m3fn")}
    assert any(isinstance(m, Fp8Linear) for m in c2i["fp8_e4m3fn"].modules())
    outs = {dt: net(io["z"].long(), io["t"], io["y"]) for dt, net in c2i.items()}
    assert rel_err(outs["fp8_e4m3fn"], outs["bf16"]) < 0.1
    enc = {dt: load_umt5(GOLDEN / "umt5_weights.safetensors", dtype=dt) for dt in ("bf16", "fp8_e4m3fn")}
    assert any(isinstance(m, Fp8Linear) for m in enc["fp8_e4m3fn"].modules())
    ids = torch.randint(0, enc["bf16"].config.vocab_size, (1, 9), generator=torch.Generator().manual_seed(0))
    # width-32 random encoder, bf16 activations throughout: measured 0.12
    assert rel_err(enc["fp8_e4m3fn"](ids).float(), enc["bf16"](ids).float()) < 0.2


def test_weight_accounting_matches_the_cast_network():
    """refiner_weight_bytes (used for planning) equals what cast_network really stores, on the meta device."""
    config = GRN8b()
    for storage in (torch.bfloat16, torch.float8_e4m3fn):
        with torch.device("meta"):
            model = GRNRefiner(config)
        cast_network(model, resolve_precision(storage, "cuda", torch.float32))
        estimate = refiner_weight_bytes(config, storage)
        assert estimate["total"] == module_bytes(model)
        assert estimate["block"] == module_bytes(model.blocks[0])
    gib = 1024 ** 3
    assert refiner_weight_bytes(config, torch.float8_e4m3fn)["total"] < 8 * gib   # GRN8b fp8: ~7.9e9 bytes
    assert refiner_weight_bytes(config, torch.bfloat16)["total"] > 14 * gib           # bf16: ~15.8e9 bytes
