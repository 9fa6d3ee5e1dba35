"""``python -m grn_core convert`` (also ``python -m grn_core.convert``): a checkpoint → a self-describing
``.safetensors`` file (config, layout and tasks in its metadata), optionally in another storage dtype."""

from __future__ import annotations

import argparse

from ..convert import convert


def add_convert_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", help="official .pth/.ckpt/.pt or a .safetensors file")
    parser.add_argument("dst", help="output .safetensors file, or .gguf for a quantized refiner")
    parser.add_argument("--dtype", default=None, help="storage dtype: bf16, fp16, fp32, fp8_e4m3fn, fp8_e5m2 "
                                                      "(default: keep the source's); for .gguf: q8_0, q5_k, q4_k, "
                                                      "bf16, f16, f32")
    parser.add_argument("--layout", choices=["joint", "prefix"], default=None,
                        help="refiner attention layout, when neither the file nor its name tells")
    parser.add_argument("--in-context-start", type=int, default=None,
                        help="class-to-image: first block with in-context class tokens, when no preset matches")


def run(args: argparse.Namespace) -> int:
    out = convert(args.src, args.dst, args.dtype, args.layout, args.in_context_start)
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB)")
    return 0
