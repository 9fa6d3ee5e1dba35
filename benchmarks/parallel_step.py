"""Step time vs ranks on the CPU (one process with both guidance branches vs ``--parallel cfg`` over 2 gloo processes),
and the communication per step of CFG parallel and of Ulysses sequence parallel for the released refiners.

    python benchmarks/parallel_step.py                 # tiny model and a wider random refiner, 1 thread a process
    python benchmarks/parallel_step.py --steps 10 --threads 2

A "step" is one guided ``branches.logits(...)`` call (what the sampler loop asks of its branch strategy): the local
strategy runs both branches in one refiner pass; CFG parallel runs one branch per rank plus one ``all_gather`` of the
logits. The volume table assumes the released tokenizer (16 px a cell, 4 frames a latent frame after the first), 256
bits a token (4 HBQ rounds x 64 channels), float32 logits, and bf16 activations for Ulysses; text tokens are left out
(they add a few hundred rows to the sequence).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import socket
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from grn_core.refiner.config import GRN2b, GRN8b  # noqa: E402
from grn_core.runtime.distributed import logits_exchange_bytes, ulysses_bytes  # noqa: E402


def _model(kind: str):
    """(refiner, one-hot-able bits [1, D, t, h, w], prepared cond text, prepared uncond text)."""
    g = torch.Generator().manual_seed(1)
    if kind == "tiny":
        from grn_core.models import load_tiny
        from grn_core.pipeline import encode_prompt

        model = load_tiny()
        refiner, grid = model.refiner, (3, 8, 8)
        feats = encode_prompt(model, model.text_encoder, "a red circle moving right", "", task="t2v",
                              need_uncond=True)
        text_c, text_u = feats.cond, feats.uncond
    else:
        from grn_core.refiner import GRNRefiner, RefinerConfig, swiglu_hidden

        torch.manual_seed(0)
        cfg = RefinerConfig(width=512, depth=4, heads=4, kv_heads=4, mlp_hidden=swiglu_hidden(512, 3.0),
                            block_chunks=1, text_channels=64, latent_channels=16)
        refiner, grid = GRNRefiner(cfg).eval(), (3, 12, 21)
        text_c = torch.randn(12, cfg.text_channels, generator=g)
        text_u = torch.randn(12, cfg.text_channels, generator=g)
    t, h, w = grid
    bits = torch.randint(0, 2, (1, refiner.config.bits, t, h, w), generator=g, dtype=torch.uint8)
    return refiner, bits, refiner.prepare_text(text_c), refiner.prepare_text(text_u)


def _time(branches, refiner, bits, ctx_c, ctx_u, steps: int) -> float:
    r = torch.tensor([0.5])
    with torch.inference_mode():
        branches.logits(refiner, bits, r, ctx_c, ctx_u, aspect_ratio=bits.shape[3] / bits.shape[4])  # warm-up
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            branches.logits(refiner, bits, r, ctx_c, ctx_u, aspect_ratio=bits.shape[3] / bits.shape[4])
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def _setup(kind: str, threads: int):
    torch.set_num_threads(threads)
    return _model(kind), None


def _single(kind: str, steps: int, threads: int, out) -> None:
    from grn_core.sampler.loop import LocalBranches

    (refiner, bits, c, u), _ = _setup(kind, threads)
    out.put(("single", kind, _time(LocalBranches(), refiner, bits, c, u, steps)))


def _rank(rank: int, port: int, kind: str, steps: int, threads: int, out) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    from grn_core.runtime.distributed import CFGParallel, ParallelPlan

    (refiner, bits, c, u), _ = _setup(kind, threads)
    plan = ParallelPlan.from_env("cpu", timeout_s=120)
    try:
        plan.barrier()
        seconds = _time(CFGParallel(plan), refiner, bits, c, u, steps)
    finally:
        plan.close()
    if rank == 0:
        out.put(("cfg", kind, seconds))


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def timing_table(steps: int, threads: int) -> None:
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    rows = {}
    for kind in ("tiny", "wide"):
        p = ctx.Process(target=_single, args=(kind, steps, threads, out))
        p.start()
        p.join()
        port = _port()
        procs = [ctx.Process(target=_rank, args=(r, port, kind, steps, threads, out)) for r in range(2)]
        for q in procs:
            q.start()
        for q in procs:
            q.join()
        for _ in range(2):
            mode, k, seconds = out.get(timeout=5)
            rows.setdefault(k, {})[mode] = seconds
    print(f"guided step time on the CPU ({threads} thread(s) a process, median of {steps})")
    print(f"{'model':<8} {'1 process (ms)':>15} {'cfg x2 (ms)':>12} {'speed-up':>9}")
    for kind, r in rows.items():
        print(f"{kind:<8} {r['single'] * 1e3:>15.2f} {r['cfg'] * 1e3:>12.2f} {r['single'] / r['cfg']:>8.2f}x")


def volume_table() -> None:
    print("\ncommunication per guided step (one sample, both branches)")
    print(f"{'model':<6} {'size':<14} {'tokens':>7} {'CFG logits/rank':>16} {'Ulysses total':>14}")
    for name, cfg in (("GRN2b", GRN2b()), ("GRN8b", GRN8b())):
        for label, (width, height, frames) in (("480p 848x480", (848, 480, 33)), ("720p 1280x720", (1280, 720, 33))):
            tokens = (1 + (frames - 1) // 4) * (height // 16) * (width // 16)
            cfg_bytes = logits_exchange_bytes(1, tokens, cfg.bits)
            sp_bytes = 2 * ulysses_bytes(tokens, cfg.width, cfg.depth)  # 2 branches
            print(f"{name:<6} {label:<14} {tokens:>7} {cfg_bytes / 2**20:>13.1f} MiB {sp_bytes / 2**30:>10.2f} GiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--volume-only", action="store_true")
    args = parser.parse_args()
    if not args.volume_only:
        timing_table(args.steps, args.threads)
    volume_table()


if __name__ == "__main__":
    main()
