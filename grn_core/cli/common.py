"""What the commands share: which model to load and where, CPU threads, a progress line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from ..models import MODEL_CHOICES, load_named
from ..presets import TASKS


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Which model to load and where to run it (``generate`` and ``calibrate``)."""
    parser.add_argument("--model", default="tiny",
                        help=f"a refiner file, or one of: {', '.join(MODEL_CHOICES)} (default: tiny)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer file (with --model PATH)")
    parser.add_argument("--text-encoder", default=None, help="umt5-xxl weights file (with --model PATH)")
    parser.add_argument("--text-tokenizer", default=None, help="umt5-xxl tokenizer.json (with --text-encoder)")
    parser.add_argument("--model-dir", type=Path, default=None, help="folder of released files (default models/grn)")
    parser.add_argument("--download", action="store_true", help="fetch missing released files from Hugging Face")
    parser.add_argument("--task", choices=list(TASKS), default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="default, bf16, fp16, fp32, fp8_e4m3fn, fp8_e5m2")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads (default: 1 for the tiny model, whose small matrices only lose time "
                             "synchronising threads; torch's default otherwise)")


def set_threads(args: argparse.Namespace) -> None:
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    elif args.model == "tiny" and args.device == "cpu":
        torch.set_num_threads(1)


def load_from_args(args: argparse.Namespace):
    """The model, its text encoder (or None) and its default task, from ``--model`` and friends."""
    from ..checkpoints import load_umt5
    from ..pipeline import load_model
    from ..text import UMT5PromptEncoder

    if args.model in MODEL_CHOICES:
        return load_named(args.model, args.model_dir, args.download, device=args.device, dtype=args.dtype)
    if args.tokenizer is None:
        raise ValueError("--model PATH needs --tokenizer PATH (the HBQ tokenizer file that belongs to it).")
    model = load_model(args.model, args.tokenizer, dtype=args.dtype, device=args.device)
    encoder = None
    if args.text_encoder is not None:
        if args.text_tokenizer is None:
            raise ValueError("--text-encoder needs --text-tokenizer (the umt5-xxl tokenizer.json).")
        encoder = UMT5PromptEncoder(load_umt5(args.text_encoder, dtype=args.dtype, device=args.device),
                                    str(args.text_tokenizer))
    return model, encoder, model.default_task()


class ProgressLine:
    """A one-line progress bar on a terminal (nothing when stderr is redirected)."""

    def __init__(self) -> None:
        self.enabled = sys.stderr.isatty()

    def __call__(self, step: int, total: int, entropy: float) -> None:
        if not self.enabled:
            return
        width = 30
        done = int(width * step / max(1, total))
        sys.stderr.write(f"\r[{'#' * done}{'.' * (width - done)}] step {step}/{total}  entropy {entropy:.3f}")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)
