"""Seconds and peak memory of the tokenizer decode vs frame count and resolution, whole frames and tiled.

Every case runs in a fresh subprocess, so one case's allocations cannot hide in another's peak. In the child, after
the tokenizer (random weights) and the latents are built, the kernel's resident-set high-water mark is reset
(``/proc/self/clear_refs``), and the peak RSS of the decode is read back (``VmHWM``) minus the RSS before it. That
delta is what the decode needs beyond the weights: its activations, causal caches, allocator slack, and the frames
it keeps. Prints one JSON line per case; ``--markdown`` also prints a table.

Modes:
    whole     ``tokenizer.decode_iter`` (latent frame by latent frame, whole frames); each chunk is converted to
              float [0, 1] on the CPU and dropped, as a streaming consumer would (only one chunk is kept).
    stream    ``decode_tiled_iter`` with ``--tile`` cells: streaming, every tile's cache alive.
    tiled     ``decode_tiled`` with ``--tile`` cells: tile by tile; the output (float32) and the stem features
              of all latent frames are assembled in RAM, so its delta includes them (``kept_mib``).

    python benchmarks/tokenizer_decode.py                        # reduced widths (dim 40, dec_dim 64), minutes
    python benchmarks/tokenizer_decode.py --full --frames 9 33 --sizes 128x128 --modes whole tiled
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DTYPES = ("float32", "bfloat16")


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def run_case(case: dict) -> dict:
    """Child side: build, reset the RSS high-water mark, decode, report."""
    import torch

    sys.path.insert(0, str(ROOT))
    from grn_core.tokenizer import HBQTokenizer, TokenizerConfig
    from grn_core.tokenizer.tiled import decode_tiled, decode_tiled_iter, estimate_decode_memory

    torch.set_num_threads(case["threads"])
    dtype = getattr(torch, case["dtype"])
    config = TokenizerConfig(**case["config"])
    torch.manual_seed(0)
    tok = HBQTokenizer(config).to(dtype).eval()
    sf, tf = config.spatial_factor, config.temporal_factor
    height, width, frames = case["height"], case["width"], case["frames"]
    grid = (height // sf, width // sf)
    latent_frames = 1 + (frames - 1) // tf
    g = torch.Generator().manual_seed(1)
    z = torch.tanh(torch.randn(1, config.z_dim, latent_frames, *grid, generator=g)).to(dtype)
    mode, tile = case["mode"], case["tile"]

    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak RSS (VmHWM) to the current RSS
    before = _status_kib("VmRSS")
    kept = 0
    start = time.perf_counter()
    with torch.inference_mode():
        if mode == "whole":
            for chunk in tok.decode_iter(z):
                chunk = ((chunk.float() + 1) / 2).clamp_(0, 1)
                del chunk
        elif mode == "stream":
            for chunk in decode_tiled_iter(tok, z, tile=tile, overlap=case["overlap"], out_dtype=torch.float32):
                del chunk
        elif mode == "tiled":
            out = decode_tiled(tok, z, tile=tile, overlap=case["overlap"], out_dtype=torch.float32)
            kept = out.numel() * out.element_size()
            del out
        else:
            raise ValueError(f"mode {mode!r}: use whole, stream or tiled")
    seconds = time.perf_counter() - start
    peak = _status_kib("VmHWM")
    order = "tiles" if mode == "tiled" else "frames"
    estimate = estimate_decode_memory(config, grid, None if mode == "whole" else tile, case["overlap"], dtype,
                                      frames=latent_frames, order=order, stored_on_device=mode == "tiled")
    weights = sum(p.numel() * p.element_size() for p in tok.parameters())
    return {
        "benchmark": "tokenizer_decode", "mode": mode, "frames": frames, "height": height, "width": width,
        "tile": tile if mode != "whole" else None, "overlap": case["overlap"] if mode != "whole" else None,
        "dtype": case["dtype"], "config": case["config"], "threads": case["threads"],
        "mmap_threshold": case.get("mmap_threshold"),
        "weights_mib": round(weights / 2**20, 1),
        "seconds": round(seconds, 2),
        "peak_rss_delta_mib": round((peak - before) / 1024, 1),
        "kept_mib": round(kept / 2**20, 1),
        "estimate_mib": round(estimate.total / 2**20, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="released sizes: dim 160, dec_dim 256, z 64 (705M)")
    parser.add_argument("--frames", type=int, nargs="+", default=[9, 33])
    parser.add_argument("--sizes", nargs="+", default=["128x128", "256x256"], help="HxW in pixels")
    parser.add_argument("--modes", nargs="+", default=["whole", "stream", "tiled"])
    parser.add_argument("--tile", type=int, default=8, help="latent cells per tile side")
    parser.add_argument("--overlap", type=int, default=2)
    parser.add_argument("--dtype", choices=DTYPES, default="float32")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--mmap-threshold", type=int, default=None, metavar="BYTES",
                        help="set glibc's MALLOC_MMAP_THRESHOLD_ in the children (e.g. 65536: every larger buffer is "
                             "mmapped and returned on free, so heap fragmentation does not pile up in the RSS)")
    parser.add_argument("--markdown", action="store_true", help="also print a markdown table")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_case(json.loads(args.child))))
        return

    config = dict(dim=160, dec_dim=256, z_dim=64) if args.full else dict(dim=40, dec_dim=64, z_dim=64)
    rows = []
    for size in args.sizes:
        height, width = (int(v) for v in size.lower().split("x"))
        for frames in args.frames:
            for mode in args.modes:
                case = dict(mode=mode, frames=frames, height=height, width=width, tile=args.tile,
                            overlap=args.overlap, dtype=args.dtype, config=config, threads=args.threads)
                env = {**os.environ, "PYTHONPATH": str(ROOT)}
                if args.mmap_threshold is not None:
                    env["MALLOC_MMAP_THRESHOLD_"] = str(args.mmap_threshold)
                    case["mmap_threshold"] = args.mmap_threshold
                proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(case)], capture_output=True,
                                      text=True, env=env)
                if proc.returncode:
                    sys.stderr.write(proc.stderr)
                    raise SystemExit(f"case {case} failed")
                row = json.loads(proc.stdout.strip().splitlines()[-1])
                rows.append(row)
                print(json.dumps(row), flush=True)
    if args.markdown:
        print("\n| size | frames | mode | tile | s | peak RSS delta MiB | kept MiB | estimate MiB |")
        print("|---|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['height']}x{r['width']} | {r['frames']} | {r['mode']} | {r['tile'] or '-'} | {r['seconds']} "
                  f"| {r['peak_rss_delta_mib']} | {r['kept_mib']} | {r['estimate_mib']} |")


if __name__ == "__main__":
    main()
