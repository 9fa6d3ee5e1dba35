"""The command line: ``python -m grn_core {generate,encode,calibrate,inspect,convert} ...``.

A face over the library: argparse, progress, files and exit codes live here and nowhere in the library. Every
expected failure (a bad flag value, a missing or damaged file, a request too large for the memory) ends as one
``error: <what>, <value>, <fix>`` on stderr and exit code 2; Ctrl-C ends as ``interrupted`` and exit code 130, with no
traceback and no half-written output. Only our own error classes, ``OSError`` naming a file and out-of-memory errors
are caught: anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import sys

from ..checkpoint_files import CheckpointError
from ..runtime.memory import GRNOutOfMemoryError
from . import calibrate, convert, encode, generate


def _inspect(args: argparse.Namespace) -> int:
    from ..checkpoints import inspect_checkpoint

    info = inspect_checkpoint(args.path, layout=args.layout)
    print(json.dumps({"path": str(info.path), "kind": info.kind, "layout": info.layout, "tasks": list(info.tasks),
                      "config": info.config.to_dict()}, indent=1))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m grn_core", description="GRN: generative refinement networks.")
    commands = parser.add_subparsers(dest="command", required=True)
    command = commands.add_parser("generate", help="prompt → image or video")
    generate.add_generate_arguments(command)
    command.set_defaults(run=generate.run)
    command = commands.add_parser("encode", help="an image or video → its tokens (.safetensors) for --init/--extend")
    encode.add_encode_arguments(command)
    command.set_defaults(run=encode.run)
    command = commands.add_parser("calibrate", help="fit the adaptive-step rule (k, b) on a prompt list")
    calibrate.add_calibrate_arguments(command)
    command.set_defaults(run=calibrate.run)
    command = commands.add_parser("inspect", help="print what a checkpoint file holds (kind, layout, config)")
    command.add_argument("path")
    command.add_argument("--layout", choices=["auto", "joint", "prefix"], default=None)
    command.set_defaults(run=_inspect)
    command = commands.add_parser("convert", help="a checkpoint → a self-describing .safetensors file")
    convert.add_convert_arguments(command)
    command.set_defaults(run=convert.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    except SystemExit as exit_:  # argparse printed its usage and "error: ..." (or --help): a code, not an exit
        return exit_.code if isinstance(exit_.code, int) else 2
    try:
        return args.run(args)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except (CheckpointError, ValueError, FileNotFoundError, GRNOutOfMemoryError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        if error.filename is None:
            raise  # no file named: not an ordinary mistake of the user's
        print(f"error: {error.filename}: {error.strerror or error}", file=sys.stderr)
        return 2


__all__ = ["build_parser", "main"]
