"""GPU suite: speed and memory of random-weight GRN models at the released sizes, as JSON (run by gpu_suite.sh).

Sections (each prints one JSON line as it finishes; a failing section records its error and the rest still run):

- ``device``: name, memory, torch/CUDA versions, attention backends, measured bf16 matmul TFLOP/s;
- ``checks``: correctness on the real device — block offload with CUDA streams gives logits identical to a resident
  model (fp32 and bf16), fp8 logits close to bf16, a real out-of-memory error becomes GRNOutOfMemoryError and the
  device is usable afterwards;
- ``t2i_2b``: GRN2b bf16, T2I 1024² (latent 1×64×64), both guidance branches: s/step, TFLOP/s, MFU, peak memory;
- ``t2v_2b``: GRN2b bf16, T2V 480×848×33 (latent 9×30×53): the same, plus the full sampler's s/step;
- ``t2v_8b_fp8_offload``: GRN8b fp8_e4m3fn with the block offload ``auto_policy`` picks for a 24 GB card, run
  under a 23 GiB allocator cap (``torch.cuda.set_per_process_memory_fraction``): peak memory, s/step, fits or not;
- ``decode``: the full-size tokenizer (705M parameters, bf16) decoding 9 and 33 frames at 480×848, per latent frame,
  and tiled when ``grn_core.tokenizer.tiled`` is there: seconds and peak memory.

Model FLOP utilisation (MFU) = model FLOPs per step (``benchmarks/refiner_step.py:step_flops``: projections, SwiGLU,
attention, bit embedding, head) / seconds / the device's dense bf16 peak (a table of data-sheet numbers, or
``--peak-tflops``); ``fraction_of_matmul`` divides by the bf16 matmul rate measured in this process instead.

    python benchmarks/gpu_suite.py --out $OUT/gpu_suite.json           # on the GPU machine
    python benchmarks/gpu_suite.py --device cpu --smoke                 # tiny sizes: the code path, on any machine
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from grn_core.nn import RMSNorm  # noqa: E402
from grn_core.refiner import GRN2b, GRN8b, GRNRefiner, RefinerConfig  # noqa: E402
from grn_core.runtime.attention import backend_status  # noqa: E402
from grn_core.runtime.fp8 import Fp8Linear  # noqa: E402
from grn_core.runtime.memory import (GRNOutOfMemoryError, OutOfMemoryError, oom_guard,  # noqa: E402
                                     refiner_step_bytes, refiner_weight_bytes)
from grn_core.runtime.offload import auto_policy, module_bytes  # noqa: E402
from grn_core.runtime.precision import cast_network, resolve_precision  # noqa: E402
from refiner_step import step_flops  # noqa: E402

GiB = 1024 ** 3
# Dense bf16 tensor-core peaks from the data sheets (TFLOP/s, no sparsity), matched by substring of the device name.
PEAK_BF16_TFLOPS = [
    ("GH200", 989), ("H200", 989), ("H100", 989), ("H800", 989), ("H20", 148), ("B200", 2250), ("B100", 1750),
    ("A100", 312), ("A800", 312), ("L40S", 362), ("L40", 181), ("L4", 121), ("A10G", 70), ("A10", 125),
    ("RTX 6000 Ada", 364), ("A6000", 155), ("RTX 5090", 209), ("RTX 4090", 165), ("RTX 4080", 97),
    ("RTX 3090", 71), ("V100", 125), ("T4", 65),
]
CARD_24GB_CAP = 23.0 * GiB  # what a 24 GB card leaves after the CUDA context (~0.5-1 GB)
TEXT_COND, TEXT_UNCOND = 120, 1  # a typical prompt; the empty negative prompt is EOS alone


# ----------------------------------------------------------------------------------------------------------------------
# helpers


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def memory(device: torch.device) -> dict[str, Any]:
    if device.type != "cuda":
        return {}
    return {"peak_allocated_gib": round(torch.cuda.max_memory_allocated(device) / GiB, 3),
            "peak_reserved_gib": round(torch.cuda.max_memory_reserved(device) / GiB, 3)}


def timed(fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int = 1) -> list[float]:
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return times


def peak_tflops(name: str, override: Optional[float]) -> Optional[float]:
    if override:
        return override
    for key, value in PEAK_BF16_TFLOPS:
        if key.lower() in name.lower():
            return float(value)
    return None


def matmul_tflops(device: torch.device, dtype: torch.dtype, n: int, repeats: int = 10) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    times = timed(lambda: torch.mm(a, b), device, repeats, warmup=3)
    return 2 * n ** 3 / statistics.median(times) / 1e12


@torch.no_grad()
def random_refiner(config: RefinerConfig, storage: torch.dtype, device: torch.device, seed: int = 0,
                   compute: Optional[torch.dtype] = None) -> GRNRefiner:
    """A refiner with random weights, cast exactly as the loaders cast files, built directly on ``device``."""
    with torch.device("meta"):
        model = GRNRefiner(config)
    cast_network(model, resolve_precision(storage, device, None, compute))
    model.to_empty(device=device)
    g = torch.Generator(device=device).manual_seed(seed)
    for module in model.modules():
        if isinstance(module, RMSNorm):
            module.weight.fill_(1.0)
        elif isinstance(module, Fp8Linear):
            w = torch.randn(module.out_features, module.in_features, device=device, generator=g) * 0.02
            module.set_weight(w)
            if module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, nn.Linear):
            w = torch.randn(module.weight.shape, device=device, generator=g, dtype=torch.float32) * 0.02
            module.weight.copy_(w)
            if module.bias is not None:
                module.bias.zero_()
    return model.eval()


def step_case(model: GRNRefiner, grid: tuple[int, int, int], device: torch.device, repeats: int,
              peak: Optional[float], mm_tflops: Optional[float]) -> dict[str, Any]:
    """Time ``step_logits`` with both guidance branches on a random bit map; count FLOPs and memory."""
    cfg = model.config
    t, h, w = grid
    g = torch.Generator().manual_seed(1)
    bits = torch.randint(0, 2, (1, cfg.bits, t, h, w), dtype=torch.uint8, generator=g).to(device)
    cond = model.prepare_text(torch.randn(TEXT_COND, cfg.text_channels, generator=g).to(device))
    uncond = model.prepare_text(torch.randn(TEXT_UNCOND, cfg.text_channels, generator=g).to(device))
    reset_peak(device)
    base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0

    def step():
        return model.step_logits(bits, 0.5, cond, uncond, aspect_ratio=h / w)

    times = timed(step, device, repeats)
    seconds = statistics.median(times)
    flops = step_flops(cfg, grid, [TEXT_COND, TEXT_UNCOND], 1)
    tflops = flops["total"] / seconds / 1e12
    out = {
        "grid": list(grid), "tokens_per_branch": t * h * w + TEXT_COND + 1, "s_per_step": round(seconds, 4),
        "s_per_step_all": [round(x, 4) for x in times], "tflop_per_step": round(flops["total"] / 1e12, 2),
        "tflop_split": {k: round(v / 1e12, 2) for k, v in flops.items() if k != "total"},
        "tflops": round(tflops, 1),
        "mfu": round(tflops / peak, 3) if peak else None,
        "fraction_of_matmul": round(tflops / mm_tflops, 3) if mm_tflops else None,
        "weights_gib": round(module_bytes(model) / GiB, 3),
        "activation_estimate_gib": round(refiner_step_bytes(cfg, grid, TEXT_COND, compute=model._dtype) / GiB, 3),
    }
    out.update(memory(device))
    if device.type == "cuda":
        out["activation_measured_gib"] = round((torch.cuda.max_memory_allocated(device) - base) / GiB, 3)
    return out


# ----------------------------------------------------------------------------------------------------------------------
# sections


def section_device(args, device: torch.device) -> dict[str, Any]:
    out = {"torch": torch.__version__, "python": platform.python_version(), "attention": backend_status()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        out.update(name=props.name, memory_gib=round(props.total_memory / GiB, 1),
                   capability=list(torch.cuda.get_device_capability(device)), cuda=torch.version.cuda,
                   sm_count=props.multi_processor_count)
        out["peak_bf16_tflops"] = peak_tflops(props.name, args.peak_tflops)
        out["matmul_bf16_tflops"] = round(matmul_tflops(device, torch.bfloat16, 8192 if not args.smoke else 1024), 1)
    else:
        out.update(name=platform.processor() or "cpu", threads=torch.get_num_threads())
        out["peak_bf16_tflops"] = args.peak_tflops
        out["matmul_bf16_tflops"] = round(matmul_tflops(device, torch.float32, 256, 3), 3)
    return out


@torch.no_grad()
def section_checks(args, device: torch.device) -> dict[str, Any]:
    from grn_core.checkpoints import load_refiner
    from tests._golden import GOLDEN, load_golden, rel_err

    io = load_golden("refiner_joint_io.safetensors")
    step = (io["t2v.step0.labels"].long().to(device), float(io["t2v.pt_values"][0]), io["text_cond"].to(device),
            io["text_uncond"].to(device))
    path = GOLDEN / "refiner_joint_weights.safetensors"
    out: dict[str, Any] = {}
    for dtype in ("fp32", "bf16"):
        resident = load_refiner(path, layout="joint", dtype=dtype, device=device)
        expected = resident.step_logits(*step, aspect_ratio=0.562)[0]
        del resident
        streamed = load_refiner(path, layout="joint", dtype=dtype, device=device, offload_blocks=4, prefetch=1)
        simulate = device.type == "cpu"
        if simulate:
            streamed.enable_block_offload("all", device=device, simulate=True)
        got = streamed.step_logits(*step, aspect_ratio=0.562)[0]
        offload = streamed.block_offload
        out[f"offload_identical_{dtype}"] = bool(torch.equal(got, expected))
        out[f"offload_peak_streamed_{dtype}"] = offload.peak_streamed_on_device
        out[f"offload_blocks_left_on_device_{dtype}"] = sum(offload.is_on_device(i) for i in offload.streamed)
    bf16 = load_refiner(path, layout="joint", dtype="bf16", device=device).step_logits(*step, aspect_ratio=0.562)[0]
    fp8 = load_refiner(path, layout="joint", dtype="fp8_e4m3fn", device=device).step_logits(*step,
                                                                                             aspect_ratio=0.562)[0]
    out["fp8_e4m3fn_vs_bf16_rel_err"] = round(rel_err(fp8, bf16), 4)
    if device.type == "cuda":
        free_before = torch.cuda.mem_get_info(device)[0]
        try:
            with oom_guard("a deliberate oversized allocation", ["nothing: this is the suite's test"], device):
                torch.empty(int(free_before * 2), dtype=torch.uint8, device=device)
            out["oom_translated"] = False
        except GRNOutOfMemoryError as error:
            out["oom_translated"] = True
            out["oom_message"] = str(error)[:300]
        torch.ones(1024, device=device).sum().item()  # the device still works
        out["oom_device_usable"] = True
    return out


def _grid_t2i(args) -> tuple[int, int, int]:
    return (1, 8, 8) if args.smoke else (1, 64, 64)


def _grid_t2v(args) -> tuple[int, int, int]:
    return (3, 4, 6) if args.smoke else (9, 30, 53)


def _config(args, preset: Callable[..., RefinerConfig]) -> RefinerConfig:
    if args.smoke:
        return RefinerConfig(width=64, depth=4, heads=2, kv_heads=2, mlp_hidden=128, block_chunks=2, text_channels=32,
                             latent_channels=8)
    return preset()


def _half(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


@torch.no_grad()
def section_2b(args, device: torch.device, info: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    cfg = _config(args, GRN2b)
    model = random_refiner(cfg, _half(device), device)
    model.set_attention(args.attention)
    peak, mm = info.get("peak_bf16_tflops"), info.get("matmul_bf16_tflops")
    t2i = step_case(model, _grid_t2i(args), device, args.repeats, peak, mm)
    t2i["fits_24gb"] = t2i.get("peak_reserved_gib", 0) * GiB <= CARD_24GB_CAP if device.type == "cuda" else None
    t2v = step_case(model, _grid_t2v(args), device, args.repeats, peak, mm)
    t2v["fits_24gb"] = t2v.get("peak_reserved_gib", 0) * GiB <= CARD_24GB_CAP if device.type == "cuda" else None
    try:  # the sampler's Triton kernel compiles here: its failure must not cost the step numbers above
        t2v["sampler"] = sampler_case(model, _grid_t2v(args), device, steps=3 if args.smoke else 4)
    except Exception as error:
        t2v["sampler"] = {"error": f"{type(error).__name__}: {error}"[:500]}
    for case in (t2i, t2v):
        case.update(model="GRN2b" if not args.smoke else "smoke", dtype="bf16", attention=args.attention)
    del model
    reset_peak(device)
    return t2i, t2v


def sampler_case(model: GRNRefiner, grid: tuple[int, int, int], device: torch.device, steps: int) -> dict[str, Any]:
    """The full sampler (refiner + guidance + bit sampling) for a few steps: wall seconds per step."""
    from grn_core.sampler import SamplerSettings, sample_bits

    cfg = model.config
    g = torch.Generator().manual_seed(2)
    cond = torch.randn(TEXT_COND, cfg.text_channels, generator=g).to(device)
    uncond = torch.randn(TEXT_UNCOND, cfg.text_channels, generator=g).to(device)
    settings = SamplerSettings(steps=steps, guidance=3.0)

    def run():
        sample_bits(model, cond, uncond, grid=grid, batch_size=1, seed=0, settings=settings,
                    aspect_ratio=grid[1] / grid[2])

    times = timed(run, device, repeats=1, warmup=1)
    return {"steps": steps, "s_per_step": round(times[0] / steps, 4)}


@torch.no_grad()
def section_8b(args, device: torch.device, info: dict[str, Any]) -> dict[str, Any]:
    """GRN8b, fp8 weights, T2V 480x848x33, under a 23 GiB cap: the block offload ``auto_policy`` picks for a 24 GB
    card (it may be none: fp8 weights are ~7.4 GiB) and every block streamed (the least device memory)."""
    cfg = _config(args, GRN8b)
    grid = _grid_t2v(args)
    storage = torch.float8_e4m3fn
    compute = torch.bfloat16 if device.type == "cuda" else torch.float32
    weights = refiner_weight_bytes(cfg, storage, compute)
    activations = refiner_step_bytes(cfg, grid, TEXT_COND, compute=compute, storage=storage)
    budget = CARD_24GB_CAP if not args.smoke else 10 ** 12
    policy = auto_policy("cuda", weights["total"], weights["block"], cfg.depth, other_bytes=0,
                         activation_bytes=activations, free_bytes=budget, margin=0.95)
    auto_blocks = policy.blocks if policy.mode == "blocks" else 0
    out: dict[str, Any] = {
        "model": "GRN8b" if not args.smoke else "smoke", "storage": "fp8_e4m3fn", "depth": cfg.depth,
        "weights_gib": round(weights["total"] / GiB, 3), "activation_estimate_gib": round(activations / GiB, 3),
        "cap_gib": round(budget / GiB, 1), "auto_policy_24gb": policy.describe(),
    }
    model = random_refiner(cfg, storage, device, compute=compute)
    model.set_attention(args.attention)
    capped = device.type == "cuda"
    if capped:
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, CARD_24GB_CAP / total), device)
    try:
        for name, streamed in (("auto", auto_blocks), ("all_blocks", cfg.depth)):
            model.disable_block_offload()
            if streamed:
                model.enable_block_offload(streamed, device=device, prefetch=1, simulate=device.type == "cpu")
            resident = module_bytes(model) - (model.block_offload.streamed_bytes if model.block_offload else 0)
            case: dict[str, Any] = {"streamed_blocks": streamed, "resident_weights_gib": round(resident / GiB, 3)}
            try:
                case.update(step_case(model, grid, device, max(1, args.repeats - 1), info.get("peak_bf16_tflops"),
                                      info.get("matmul_bf16_tflops")))
                case.pop("weights_gib", None)
                case["fits_24gb"] = True if capped else None
                if model.block_offload is not None:
                    case["peak_streamed_blocks_on_device"] = model.block_offload.peak_streamed_on_device
            except (GRNOutOfMemoryError, OutOfMemoryError) as error:
                case.update(fits_24gb=False, error=str(error)[:500])
            out[name] = case
            if streamed == cfg.depth:
                break  # auto already streamed every block
    finally:
        if capped:
            torch.cuda.set_per_process_memory_fraction(1.0, device)
        del model
        reset_peak(device)
    return out


@torch.no_grad()
def random_tokenizer(device: torch.device, dtype: torch.dtype, smoke: bool):
    from grn_core.tokenizer import HBQTokenizer, TokenizerConfig

    config = TokenizerConfig(dim=8, dec_dim=8, z_dim=8) if smoke else TokenizerConfig()
    with torch.device("meta"):
        tok = HBQTokenizer(config)
    tok.to_empty(device=device)
    g = torch.Generator(device=device).manual_seed(3)
    for name, p in tok.named_parameters():
        if name.endswith("gamma"):
            p.data.fill_(1.0)
        elif p.dim() == 1:
            p.data.zero_()
        else:
            fan_in = p[0].numel()
            p.data.copy_(torch.randn(p.shape, device=device, generator=g) / math.sqrt(fan_in))
    for name, b in tok.named_buffers():
        if b.is_floating_point() and not b.isfinite().all():
            raise RuntimeError(f"tokenizer buffer {name} is not initialised")
    return tok.to(dtype).eval().requires_grad_(False), config


@torch.no_grad()
def section_decode(args, device: torch.device) -> dict[str, Any]:
    dtype = _half(device)
    tok, config = random_tokenizer(device, dtype, args.smoke)
    h, w = (2, 3) if args.smoke else (30, 53)
    out: dict[str, Any] = {"tokenizer_params_m": round(sum(p.numel() for p in tok.parameters()) / 1e6, 1),
                           "dtype": str(dtype).replace("torch.", ""), "size": [h * 16, w * 16]}
    try:
        from grn_core.tokenizer.tiled import decode_tiled
    except ImportError:
        decode_tiled = None
    for frames in ((5, 9) if args.smoke else (9, 33)):
        t = 1 + (frames - 1) // 4
        z = (torch.rand(1, config.z_dim, t, h, w, generator=torch.Generator().manual_seed(4)) * 2 - 1).to(device)
        reset_peak(device)

        start = time.perf_counter()
        produced = sum(chunk.float().cpu().shape[2] for chunk in tok.decode_iter(z))  # as decode_tokens does
        sync(device)
        row = {"frames": produced, "seconds": round(time.perf_counter() - start, 3)}
        row.update(memory(device))
        out[f"chunked_{frames}"] = row
        if decode_tiled is not None:
            reset_peak(device)
            start = time.perf_counter()
            try:
                video = decode_tiled(tok, z, tile=(16, 16), overlap=4, out_device="cpu")
                sync(device)
                row = {"frames": int(video.shape[2]), "seconds": round(time.perf_counter() - start, 3), "tile": 16}
                row.update(memory(device))
            except Exception as error:  # the tiled decoder is another engineer's work in progress
                row = {"error": f"{type(error).__name__}: {error}"[:300]}
            out[f"tiled_{frames}"] = row
    if device.type == "cuda" and "peak_allocated_gib" in out.get("chunked_33", {}):
        out["peak_ratio_33_over_9"] = round(out["chunked_33"]["peak_allocated_gib"] /
                                            max(1e-9, out["chunked_9"]["peak_allocated_gib"]), 3)
    return out


# ----------------------------------------------------------------------------------------------------------------------


SECTIONS = ("device", "checks", "2b", "8b", "decode")


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None, help="write all results as one JSON file here")
    p.add_argument("--markdown", default=None, help="append a results table to this file (e.g. BENCHMARKS.md)")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--attention", default="auto")
    p.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak for MFU (default: data sheet)")
    p.add_argument("--smoke", action="store_true", help="tiny models and sizes: exercise the code, not the device")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    wanted = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(wanted) - set(SECTIONS))
    if unknown:
        p.error(f"unknown sections {unknown}; choose from {SECTIONS}")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    results: dict[str, Any] = {"suite": "gpu_suite", "smoke": args.smoke, "started": time.strftime("%Y-%m-%d %H:%M:%S")}

    def run(name: str, fn: Callable[[], Any]) -> Any:
        start = time.perf_counter()
        try:
            value = fn()
        except Exception as error:  # keep going: one broken section must not cost the others' device time
            value = {"error": f"{type(error).__name__}: {error}"[:800], "traceback": traceback.format_exc()[-1500:]}
        if isinstance(value, dict):
            value["section_seconds"] = round(time.perf_counter() - start, 2)
        print(json.dumps({name: value}), flush=True)
        results[name] = value
        return value

    info = run("device", lambda: section_device(args, device)) if "device" in wanted else {}
    if "checks" in wanted:
        run("checks", lambda: section_checks(args, device))
    if "2b" in wanted:
        pair = {}

        def both():
            pair["t2i"], pair["t2v"] = section_2b(args, device, info if isinstance(info, dict) else {})
            return {"done": True}

        status = run("_2b", both)
        if "error" in status:
            results["t2i_2b"] = results["t2v_2b"] = status
        else:
            for key, name in (("t2i", "t2i_2b"), ("t2v", "t2v_2b")):
                print(json.dumps({name: pair[key]}), flush=True)
                results[name] = pair[key]
        results.pop("_2b", None)
    if "8b" in wanted:
        run("t2v_8b_fp8_offload", lambda: section_8b(args, device, info if isinstance(info, dict) else {}))
    if "decode" in wanted:
        run("decode", lambda: section_decode(args, device))
    results["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=1))
    if args.markdown:
        with open(args.markdown, "a") as handle:
            handle.write(markdown(results))
    print(json.dumps({"summary": summary(results)}), flush=True)
    return results


def _cases(results: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    cases = [(name, results.get(name, {})) for name in ("t2i_2b", "t2v_2b")]
    eight = results.get("t2v_8b_fp8_offload", {})
    for key in ("auto", "all_blocks"):
        if isinstance(eight.get(key), dict):
            cases.append((f"t2v_8b_fp8_offload_{key}", eight[key]))
    if "error" in eight:
        cases.append(("t2v_8b_fp8_offload", eight))
    return cases


def summary(results: dict[str, Any]) -> dict[str, Any]:
    """The headline numbers in one flat dict."""
    out: dict[str, Any] = {"device": results.get("device", {}).get("name")}
    for name, case in _cases(results):
        out[name] = {k: case.get(k) for k in ("s_per_step", "tflops", "mfu", "peak_reserved_gib", "fits_24gb",
                                              "streamed_blocks", "error") if case.get(k) is not None}
    decode = results.get("decode", {})
    out["decode"] = {k: {m: v.get(m) for m in ("seconds", "peak_allocated_gib")} for k, v in decode.items()
                     if isinstance(v, dict)}
    checks = results.get("checks", {})
    out["checks"] = {k: v for k, v in checks.items() if not isinstance(v, str) or k == "error"}
    return out


def markdown(results: dict[str, Any]) -> str:
    """A short BENCHMARKS.md section."""
    dev = results.get("device", {})
    title = f"{dev.get('name', '?')} ({results.get('started', '')}, torch {dev.get('torch', '?')})"
    lines = [f"\n## gpu_suite — {title}\n",
             "| case | s/step | TFLOP/s | MFU | peak reserved GiB | fits 24 GB |", "|---|---|---|---|---|---|"]
    for name, c in _cases(results):
        lines.append(f"| {name} | {c.get('s_per_step', c.get('error', '—'))} | {c.get('tflops', '—')} | "
                     f"{c.get('mfu', '—')} | {c.get('peak_reserved_gib', '—')} | {c.get('fits_24gb', '—')} |")
    d = results.get("decode", {})
    for key in sorted(k for k in d if isinstance(d[k], dict)):
        lines.append(f"| decode {key} | {d[key].get('seconds', d[key].get('error', '—'))} s total | | | "
                     f"{d[key].get('peak_reserved_gib', '—')} | |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
