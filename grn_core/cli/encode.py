"""``python -m grn_core encode SRC --model M --out T.safetensors``: an image or video → its HBQ bits.

The file holds one tensor ``bits`` (uint8 ``[1, rounds*d, t, h, w]``) with safetensors metadata (``grn_tokens``,
model, width, height, frames, rounds, latent_channels) and a JSON sidecar ``T.json`` saying the same; both are
written to temporary files and renamed into place together. ``generate --init/--extend`` read such a file (and
images and videos directly); ``generate --save-tokens`` writes the same layout.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from ..media import StagedFile
from .common import add_model_arguments, check_device, check_dtype, check_input_file, load_from_args, \
    prepare_output_dir, set_threads, stage

TOKENS_MARK = "grn_tokens"
VIDEO_SOURCE_SUFFIXES = (".mp4", ".gif", ".webp", ".mov", ".mkv", ".webm", ".avi")


def add_encode_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("source", type=Path, help="an image or a video (.mp4/.gif/.webp)")
    parser.add_argument("--out", type=Path, required=True, help="T.safetensors (T.json gets the record)")
    parser.add_argument("--width", type=int, default=0, help="encode at this width (0: the source's, floored)")
    parser.add_argument("--height", type=int, default=0, help="encode at this height (0: the source's, floored)")
    parser.add_argument("--frames", type=int, default=None, help="use the first 1 + 4k frames (default: all)")


def read_source(flag: str, path: Path) -> tuple[str, Any]:
    """``("tokens", (bits, metadata))`` for a ``.safetensors`` from ``encode``, else ``("frames", uint8 [N, H, W, 3])``
    (ValueError naming the file when it cannot be read or holds nothing the tokenizer can encode)."""
    path = check_input_file(flag, path)
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as handle:
                meta = handle.metadata() or {}
                if "bits" not in handle.keys():
                    raise ValueError(f"{flag} {path}: no 'bits' tensor; make token files with "
                                     "`python -m grn_core encode`.")
                bits = handle.get_tensor("bits")
        except ValueError:
            raise
        except Exception as error:  # noqa: BLE001 - safetensors raises its own types for damaged headers
            raise ValueError(f"{flag} {path}: not a readable safetensors file ({error}).") from error
        if bits.dim() != 5 or bits.shape[0] != 1 or bits.shape[2] < 1 or bits.numel() == 0:
            raise ValueError(f"{flag} {path}: bits of shape {tuple(bits.shape)}; expected [1, rounds*d, t, h, w] "
                             "with t >= 1 (from `python -m grn_core encode`).")
        if bits.is_floating_point() or int(bits.min()) < 0 or int(bits.max()) > 1:
            raise ValueError(f"{flag} {path}: the bits are not 0/1 integers; make token files with "
                             "`python -m grn_core encode`.")
        return "tokens", (bits.to(torch.uint8), meta)
    try:
        if suffix in VIDEO_SOURCE_SUFFIXES:
            from ..media import read_video

            frames = read_video(path)
        else:
            from PIL import Image

            with Image.open(path) as image:
                frames = np.asarray(image.convert("RGB"))[None]
    except Exception as error:  # noqa: BLE001 - Pillow / PyAV have many ways of saying "damaged"
        what = str(error).splitlines()[0][:160] if str(error) else type(error).__name__
        raise ValueError(f"{flag} {path}: not a readable image or video ({what}); give a PNG/JPEG/WebP picture, an "
                         ".mp4/.gif/.webp video or a .safetensors from `python -m grn_core encode`.") from error
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[0] < 1 or frames.shape[-1] != 3 or min(frames.shape[1:3]) < 1:
        raise ValueError(f"{flag} {path}: {tuple(frames.shape)} is not RGB frames [N, H, W, 3] with at least one "
                         "frame; the tokenizer encodes 3-channel pictures.")
    return "frames", frames


def check_tokens(flag: str, path: Path, bits: torch.Tensor, model: Any, grid: Optional[tuple] = None) -> torch.Tensor:
    """Token bits against the model (channels) and, when given, the output's latent grid."""
    expected = model.rounds * model.latent_channels
    if bits.shape[1] != expected:
        raise ValueError(f"{flag} {path}: {bits.shape[1]} bit channels but this model's tokenizer uses {expected}; "
                         "encode the source with the same model.")
    if grid is not None and tuple(bits.shape[2:]) != tuple(grid):
        t, h, w = grid
        sf = model.spatial_factor
        raise ValueError(f"{flag} {path}: the tokens are {bits.shape[4] * sf}x{bits.shape[3] * sf} pixels with "
                         f"{bits.shape[2]} latent frames but the output is {w * sf}x{h * sf} with {t}; ask for "
                         "that size (--width/--height/--frames) or encode the source at the output's size.")
    return bits


def tokens_metadata(model: Any, bits: torch.Tensor, **extra: Any) -> dict[str, str]:
    sf, tf = model.spatial_factor, model.temporal_factor
    t, h, w = bits.shape[2:]
    meta = {TOKENS_MARK: "1", "model": str(getattr(model, "name", "")), "width": str(w * sf), "height": str(h * sf),
            "frames": str(1 + (t - 1) * tf), "rounds": str(model.rounds), "latent_channels": str(model.latent_channels),
            "shape": json.dumps(list(bits.shape))}
    meta.update({k: str(v) for k, v in extra.items()})
    return meta


def write_tokens(path: Path, bits: torch.Tensor, metadata: dict[str, str], sidecar: bool = True) -> None:
    """``bits`` (uint8 ``[1, D, t, h, w]``) to ``path`` with ``metadata`` (+ ``path.json``), atomically."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise ValueError(f"{path}: token files are .safetensors; name it {path.with_suffix('.safetensors').name}.")
    if path.is_dir():
        raise ValueError(f"{path} is a folder; give a file name such as {path / 'tokens.safetensors'}.")
    prepare_output_dir("--out", path.parent if str(path.parent) else Path("."))
    bits = bits.detach().to("cpu", torch.uint8).contiguous()
    try:
        with StagedFile(path) as staged_bits:
            save_file({"bits": bits}, str(staged_bits.temp), metadata=metadata)
            if sidecar:
                with StagedFile(path.with_suffix(".json")) as staged_json:
                    staged_json.temp.write_text(json.dumps({**metadata, "shape": list(bits.shape)}, indent=1) + "\n",
                                                encoding="utf-8")
                    staged_bits.commit()
                    staged_json.commit()
            else:
                staged_bits.commit()
    except OSError as error:
        raise ValueError(f"{path}: writing failed ({error.strerror or error}); nothing was replaced.") from error


def run(args: argparse.Namespace) -> int:
    from ..editing import encode_source
    from ..request import snap_frames

    args.device = check_device(args.device)
    check_dtype(args.dtype)
    set_threads(args)
    kind, source = read_source("SRC", args.source)
    if kind == "tokens":
        raise ValueError(f"SRC {args.source} already holds tokens; give an image or a video.")
    if Path(args.out).suffix.lower() != ".safetensors":
        raise ValueError(f"--out {args.out}: token files are .safetensors.")
    with stage("loading the model"):
        model, _, _ = load_from_args(args)
    sf = model.spatial_factor
    n = int(source.shape[0])
    count = snap_frames(n if args.frames is None else min(n, args.frames), model.temporal_factor)
    if args.frames is not None and args.frames < 1:
        raise ValueError(f"--frames {args.frames} must be >= 1.")
    width = args.width or max(sf, source.shape[2] // sf * sf)
    height = args.height or max(sf, source.shape[1] // sf * sf)
    with stage("encoding"):
        try:
            bits = encode_source(model, source, width, height, count)
        except ValueError as error:
            raise ValueError(f"SRC {args.source}: {error}") from error
    write_tokens(args.out, bits, tokens_metadata(model, bits, source=args.source))
    print(f"wrote {args.out} (bits {list(bits.shape)}, {width}x{height}, {count} frames)")
    return 0
