"""Time one refinement step of a random-weight GRN_bit refiner and compare with plain matmul throughput.

Prints one JSON line: the configuration, the FLOPs of one step (both guidance branches: q/k/v/o projections, SwiGLU,
attention scores and weighted sums, bit embedding, head), the median seconds per step, the resulting GFLOP/s, the
float32 matmul GFLOP/s (2048^2 matmuls, median of runs before and after the steps) measured in the same process, and
their ratio; also the best-of-runs ratio, which a busy shared machine disturbs less.

    python benchmarks/refiner_step.py                              # width 512, depth 4, 4 heads, grid 3x12x21
    python benchmarks/refiner_step.py --layout prefix --dtype bfloat16 --threads 4

The text is prepared once (``prepare_text``) as the sampler does, so per-step work is what is timed and counted.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from grn_core.refiner import GRNRefiner, RefinerConfig, swiglu_hidden  # noqa: E402

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


def step_flops(cfg: RefinerConfig, grid: tuple[int, int, int], text_lens: list[int], batch: int,
               first_frame: bool = False) -> dict[str, int]:
    """Multiply-add FLOPs (2 per MAC) of one step, split by kind, summed over branches and samples.

    Every matmul of the step is counted (tests/test_benchmark_flops.py checks the total against PyTorch's FLOP
    counter); element-wise work (norms, RoPE, softmax, SiLU) is not.
    """
    t, h, w = grid
    visual = t * h * w
    c, hd = cfg.width, cfg.head_dim
    q_width, kv_width = cfg.heads * hd, cfg.kv_heads * hd
    flops = dict(projections=0, mlp=0, attention=0, embed=0, head=0)
    for text in text_lens:
        if cfg.layout == "joint":
            rows = visual + (h * w if first_frame else 0) + text + 1
            keys = rows
        else:
            rows = visual + 1
            keys = rows + text
        per_layer_proj = 2 * rows * c * (q_width + 2 * kv_width + c)
        per_layer_mlp = 2 * rows * 3 * c * cfg.mlp_hidden
        per_layer_attn = 2 * 2 * rows * keys * q_width  # q k^T and p v
        flops["projections"] += batch * cfg.depth * per_layer_proj
        flops["mlp"] += batch * cfg.depth * per_layer_mlp
        flops["attention"] += batch * cfg.depth * per_layer_attn
        flops["head"] += batch * 2 * visual * c * cfg.in_channels
    # The bit embedding and the step token's MLP run once per sample (shared by both branches); the embedding
    # multiplies the bits, not the one-hot input.
    embed_tokens = visual + (h * w if first_frame else 0)
    flops["embed"] = batch * 2 * (embed_tokens * cfg.bits * c + cfg.step_freq_dim * c + c * c)
    flops["total"] = sum(flops.values())
    return flops


def step_times(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def matmul_gflops(repeats: int, n: int = 2048) -> list[float]:
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        out.append(2 * n ** 3 / (time.perf_counter() - start) / 1e9)
    return out


def time_against_matmul(step, flops: int, repeats: int, warmup: int) -> dict:
    """Time ``step`` (after ``warmup`` calls) between two rounds of float32 matmul timings; the speed fields of the
    JSON line: median and best seconds, GFLOP/s for ``flops`` per step, and the ratios to the matmul rate."""
    mm_runs = matmul_gflops(repeats)
    for _ in range(warmup):
        step()
    times = step_times(step, repeats)
    mm_runs += matmul_gflops(repeats)
    seconds, mm = statistics.median(times), statistics.median(mm_runs)
    gflops = flops / seconds / 1e9
    best_gflops, best_mm = flops / min(times) / 1e9, max(mm_runs)
    return {
        "s_per_step": round(seconds, 4), "gflops": round(gflops, 1),
        "matmul_f32_gflops": round(mm, 1), "matmul_f32_gflops_range": [round(min(mm_runs), 1), round(max(mm_runs), 1)],
        "fraction_of_matmul": round(gflops / mm, 3),
        # Best-of figures are less sensitive to other processes on a shared machine.
        "s_per_step_min": round(min(times), 4), "fraction_of_matmul_best": round(best_gflops / best_mm, 3),
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=None, help="default: = heads")
    p.add_argument("--mlp-ratio", type=float, default=3.55)
    p.add_argument("--latent-channels", type=int, default=64)
    p.add_argument("--text-channels", type=int, default=4096)
    p.add_argument("--grid", type=int, nargs=3, default=[3, 12, 21], metavar=("T", "H", "W"))
    p.add_argument("--text-cond", type=int, default=64, help="cond text tokens")
    p.add_argument("--text-uncond", type=int, default=16, help="uncond text tokens (0: no uncond branch)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--layout", choices=["joint", "prefix"], default="joint")
    p.add_argument("--first-frame", action="store_true", help="I2V: add a clean first frame (joint only)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    dtype = DTYPES[args.dtype]
    cfg = RefinerConfig(
        width=args.width, depth=args.depth, heads=args.heads, kv_heads=args.kv_heads or args.heads,
        mlp_hidden=swiglu_hidden(args.width, args.mlp_ratio), block_chunks=1, text_channels=args.text_channels,
        latent_channels=args.latent_channels, layout=args.layout,
    )
    model = GRNRefiner(cfg).to(dtype).eval().requires_grad_(False)
    t, h, w = args.grid
    bits = torch.randint(0, 2, (args.batch, cfg.bits, t, h, w), dtype=torch.uint8)
    first = torch.randint(0, 2, (args.batch, cfg.bits, 1, h, w), dtype=torch.uint8) if args.first_frame else None
    text_cond = model.prepare_text(torch.randn(args.text_cond, cfg.text_channels))
    text_uncond = model.prepare_text(torch.randn(args.text_uncond, cfg.text_channels)) if args.text_uncond else None
    step_value = torch.rand(args.batch)

    def step():
        model.step_logits(bits, step_value, text_cond, text_uncond, aspect_ratio=h / w, first_frame_bits=first)

    text_lens = [args.text_cond] + ([args.text_uncond] if args.text_uncond else [])
    flops = step_flops(cfg, (t, h, w), text_lens, args.batch, first_frame=args.first_frame)
    result = {
        "layout": args.layout, "dtype": args.dtype, "threads": args.threads, "width": args.width, "depth": args.depth,
        "heads": args.heads, "kv_heads": cfg.kv_heads, "mlp_hidden": cfg.mlp_hidden, "grid": [t, h, w],
        "text": text_lens, "batch": args.batch, "first_frame": args.first_frame,
        "gflop_per_step": round(flops["total"] / 1e9, 3),
        "gflop_split": {k: round(v / 1e9, 3) for k, v in flops.items() if k != "total"},
        **time_against_matmul(step, flops["total"], args.repeats, args.warmup),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
