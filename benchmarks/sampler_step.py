"""Per-step overhead of the sampler's fused step: Triton kernel vs torch reference, as one JSON line.

    python benchmarks/sampler_step.py                         # 14 310 tokens x 256 bits (T2V 480p, 2 s), CPU
    python benchmarks/sampler_step.py --tokens 4096 --bits 256 --device cuda --repeats 20

On CPU the kernel can only run under Triton's interpreter (set here before triton is imported), which
measures the interpreter, not the kernel: use ``--kernel none`` to time the reference alone. The uniform
draw (per-sample CPU generator, then copy to the device) is timed separately: it is part of every step.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=14310)
    parser.add_argument("--bits", type=int, default=256)
    parser.add_argument("--rows", type=int, default=1, help="batch samples")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--kernel", choices=("triton", "none"), default="triton")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = parser.parse_args()
    if args.device == "cpu" and args.kernel == "triton":
        os.environ.setdefault("TRITON_INTERPRET", "1")

    import torch

    from grn_core.sampler.bookkeeping import draw_uniforms, make_generators
    from grn_core.sampler.step import fused_step_reference

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    g = torch.Generator().manual_seed(0)
    shape = (args.rows, args.tokens, args.bits)
    cond = torch.randn(*shape, 2, generator=g).to(device)
    uncond = torch.randn(*shape, 2, generator=g).to(device)
    z = torch.randint(0, 2, shape, generator=g, dtype=torch.uint8).to(device)
    prev_kept = (torch.rand(shape, generator=g) < 0.5).to(device)
    prev_bits = torch.where(prev_kept, torch.randint(0, 2, shape, generator=g, dtype=torch.uint8).to(device), z)
    w = torch.full((args.rows,), 3.0, device=device)
    tau = torch.full((args.rows,), 1.0, device=device)
    keep_prob = torch.full((args.rows,), 0.5, device=device)
    gens = make_generators(list(range(args.rows)))

    def timed(fn):
        fn()  # warm-up (and Triton compile)
        sync()
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            out = fn()
            sync()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times), out

    u = draw_uniforms(gens, shape[1:], device)
    uniform_ms, _ = timed(lambda: draw_uniforms(gens, shape[1:], device))
    step_args = (cond, uncond, w, tau, u[0], u[1], z, keep_prob, prev_kept, prev_bits)
    ref_ms, ref = timed(lambda: fused_step_reference(*step_args))
    report = {"benchmark": "sampler_step", "device": str(device), "rows": args.rows, "tokens": args.tokens,
              "bits": args.bits, "repeats": args.repeats, "threads": args.threads,
              "uniforms_ms": round(uniform_ms, 3), "reference_ms": round(ref_ms, 3)}
    if args.kernel == "triton":
        from grn_core.sampler.triton_step import fused_step_triton, interpreter_active, triton_available
        if not triton_available():
            report["kernel"] = "triton not installed"
        else:
            kernel_ms, out = timed(lambda: fused_step_triton(*step_args))
            report.update(kernel_ms=round(kernel_ms, 3),
                          kernel_mode="interpreter" if interpreter_active() else "compiled",
                          speedup=round(ref_ms / kernel_ms, 3),
                          bits_equal=bool(torch.equal(out.sample, ref.sample) and torch.equal(out.mixed, ref.mixed)),
                          counts_equal=bool(torch.equal(out.state_counts, ref.state_counts)))
    print(json.dumps(report))


if __name__ == "__main__":
    main()
