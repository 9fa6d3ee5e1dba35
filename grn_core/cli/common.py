"""What the commands share: which model to load and where, CPU threads, progress lines, Ctrl-C, and the checks that
need no model (run before any weight is loaded, so a mistake costs seconds, not a model load).

Order of a command: everything the flags alone decide is checked first (device, threads, dtype, the files named,
the output path, sizes against the model's grid read from its file header, sampler settings); only then is the model
loaded, the size re-planned with the loaded model (the authority), and the memory the request needs compared with
what is free.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import numbers
import signal
import struct
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import torch

from ..models import MODEL_CHOICES, TINY_DIR, load_named, tiny_available
from ..presets import TASKS
from ..releases import BY_NAME, SHORT_NAMES
from ..request import SizeSpec, check_seed


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
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu, cuda or cuda:N (default: cuda when a GPU is visible)")
    parser.add_argument("--dtype", default=None, help="default, bf16, fp16, fp32, fp8_e4m3fn, fp8_e5m2")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads (default: 1 for the tiny model, whose small matrices only lose time "
                             "synchronising threads; torch's default otherwise)")


# ---- checks that need no model -----------------------------------------------------------------------------------


def check_device(name: str) -> str:
    """``--device`` as torch understands it, on a device this machine has (ValueError naming the fix)."""
    try:
        device = torch.device(str(name))
    except (RuntimeError, ValueError) as error:
        raise ValueError(f"--device {name!r} is not a device name; use cpu, cuda or cuda:N.") from error
    if device.type == "cpu":
        return str(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "this PyTorch build has no CUDA support" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise ValueError(f"--device {name}: {why}; use --device cpu.")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ValueError(f"--device {name}: there {'is' if count == 1 else 'are'} {count} CUDA "
                             f"device{'s' if count != 1 else ''} (cuda:0..cuda:{count - 1}); pick one of them.")
        return str(device)
    if device.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise ValueError(f"--device {name}: Apple's MPS is not available here; use --device cpu.")
        return str(device)
    raise ValueError(f"--device {name}: generation runs on cpu, cuda[:N] or mps, not on '{device.type}'.")


def check_dtype(name: Optional[str]) -> Optional[str]:
    from ..checkpoints import parse_dtype

    if name is None:
        return None
    try:
        parse_dtype(name)
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"--dtype {name!r} is not a weight dtype; use default, bf16, fp16, fp32, fp8_e4m3fn or "
                         "fp8_e5m2.") from error
    return name


def check_positive_int(flag: str, value: Any, fix: str = "") -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{flag} {value!r} must be a whole number >= 1{'; ' + fix if fix else ''}.")


def check_number(flag: str, value: Any, low: Optional[float] = None, high: Optional[float] = None,
                 low_open: bool = False) -> None:
    """A float flag: finite and within ``[low, high]`` (``(low, high]`` with ``low_open``)."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{flag} {value!r} must be a finite number.")
    if low is not None and (value <= low if low_open else value < low):
        raise ValueError(f"{flag} {value:g} must be {'>' if low_open else '>='} {low:g}.")
    if high is not None and value > high:
        raise ValueError(f"{flag} {value:g} must be <= {high:g}.")


def check_seeds(flag: str, *seeds: Any) -> None:
    for seed in seeds:
        check_seed(seed, name=flag)


def check_input_file(flag: str, path: Any) -> Path:
    """A file named by a flag exists, is a file and can be opened (ValueError naming the flag and the fix)."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{flag} {path}: no such file; check the path.")
    if path.is_dir():
        raise ValueError(f"{flag} {path} is a folder; give the file inside it.")
    try:
        with open(path, "rb"):
            pass
    except OSError as error:
        raise ValueError(f"{flag} {path}: cannot be read ({error.strerror}); check its permissions.") from error
    return path


def prepare_output_dir(flag: str, folder: Path) -> None:
    """Make ``folder`` (and missing parents: documented behaviour of --out and --preview-dir) and check that a file
    can be created in it, before anything is generated."""
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{flag}: {folder} is a file, not a folder; choose another path.")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        from ..media import StagedFile

        StagedFile(folder / ".grn-write-check").discard()  # create and remove a file: the only honest probe
    except OSError as error:
        where = error.filename or folder
        raise ValueError(f"{flag}: cannot write in {folder} ({error.strerror or error}: {where}); choose a "
                         "folder you can write to.") from error


def set_threads(args: argparse.Namespace) -> None:
    check_positive_int("--threads", args.threads, "use the number of CPU cores to use, e.g. 4")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    elif args.model == "tiny" and str(args.device) == "cpu":
        torch.set_num_threads(1)


# ---- the model, before and after loading ------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelPreview:
    """What the flags and the files' headers tell about the model before it is loaded.

    ``spec``: the tokenizer's factors and the file's native size (None: only known after loading); ``tasks``: what the
    model does (empty: unknown until loaded); ``default_task``: the task without ``--task`` (None: unknown).
    """

    spec: Optional[SizeSpec]
    tasks: tuple[str, ...]
    default_task: Optional[str]

    def task(self, asked: Optional[str]) -> Optional[str]:
        return asked or self.default_task


def safetensors_metadata(path: Path) -> Optional[dict]:
    """The ``__metadata__`` of a .safetensors file from its header alone (None when it is not one, or damaged: the
    loader then says what is wrong)."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(8)
            if len(head) != 8:
                return None
            (length,) = struct.unpack("<Q", head)
            if not 2 <= length <= 100 * 2 ** 20:
                return None
            header = json.loads(handle.read(length).decode("utf-8"))
    except (OSError, ValueError, struct.error, RecursionError):
        return None
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return meta if isinstance(meta, dict) else {}


def _json_meta(meta: Optional[dict], key: str) -> Any:
    try:
        return json.loads(meta[key]) if meta and isinstance(meta.get(key), str) else None
    except (ValueError, RecursionError):
        return None


def _tokenizer_factors(path: Path) -> Optional[tuple[int, int]]:
    """(spatial, temporal) factors of a tokenizer file without loading it: our safetensors header, or the release
    catalogue (every released tokenizer is 16 x 4)."""
    config = _json_meta(safetensors_metadata(path), "grn.config")
    if isinstance(config, dict):
        from ..tokenizer import TokenizerConfig

        try:
            tok = TokenizerConfig.from_dict(config)
            return int(tok.spatial_factor), int(tok.temporal_factor)
        except (ValueError, TypeError, KeyError, AttributeError):
            return None
    entry = BY_NAME.get(path.name)
    if entry is not None and entry.kind == "tokenizer":
        return 16, 4
    return None


def _refiner_facts(path: Path) -> tuple[tuple[str, ...], dict, Any]:
    """(tasks, native size, calibrated rule) of a refiner file from its header or the release catalogue."""
    from ..sampler import AdaptiveSteps

    meta = safetensors_metadata(path)
    tasks: tuple[str, ...] = ()
    if meta and isinstance(meta.get("grn.tasks"), str):
        tasks = tuple(t for t in meta["grn.tasks"].split(",") if t in TASKS)
    elif meta and meta.get("grn.kind") == "c2i":
        tasks = ("c2i",)
    entry = BY_NAME.get(path.name)
    if not tasks and entry is not None and entry.kind in ("refiner", "c2i"):
        tasks = entry.tasks
    defaults = _json_meta(meta, "grn.defaults")
    defaults = {k: v for k, v in defaults.items() if k in ("width", "height", "frames") and isinstance(v, int)
                and not isinstance(v, bool) and 1 <= v <= 100_000} if isinstance(defaults, dict) else {}
    rule = _json_meta(meta, "grn.adaptive")
    adaptive = None
    if isinstance(rule, dict):
        try:
            adaptive = AdaptiveSteps(**rule)
        except TypeError:
            adaptive = None
    return tasks, defaults, adaptive


def preview_model(args: argparse.Namespace) -> ModelPreview:
    """Check ``--model`` and the files that go with it, and read what can be known without loading (fast).

    Refused here: a ``--model`` that is neither a file nor a known name, missing or unreadable files, and flags the
    chosen model would ignore (``--tokenizer`` / ``--text-encoder`` / ``--text-tokenizer`` with a named model)."""
    name = str(args.model)
    extra = [flag for flag, value in (("--tokenizer", args.tokenizer), ("--text-encoder", args.text_encoder),
                                      ("--text-tokenizer", args.text_tokenizer)) if value is not None]
    if name in MODEL_CHOICES:
        if extra:
            raise ValueError(f"{', '.join(extra)} {'is' if len(extra) == 1 else 'are'} for --model PATH; the named "
                             f"model '{name}' brings its own files. Drop {' and '.join(extra)}, or give the refiner "
                             "file as --model PATH.")
        if name == "tiny":
            if not tiny_available():
                raise ValueError(
                    f"the built-in tiny model is not in this copy of the library (expected {TINY_DIR}/refiner."
                    "safetensors and tokenizer.safetensors). It is produced by `python -m grn_core.train`; until "
                    "then use --model PATH with released files.")
            factors = _tokenizer_factors(TINY_DIR / "tokenizer.safetensors")
            tasks, defaults, adaptive = _refiner_facts(TINY_DIR / "refiner.safetensors")
            spec = SizeSpec(*factors, defaults=defaults, tasks=tasks, adaptive=adaptive) if factors else None
            return ModelPreview(spec, tasks, tasks[0] if tasks else None)
        short = SHORT_NAMES[name]
        return ModelPreview(SizeSpec(16, 4, tasks=short.file.tasks), short.file.tasks, short.task)
    path = Path(name)
    if not path.exists():
        raise ValueError(f"--model {name}: neither an existing file nor a known model name; give the path of a "
                         f"refiner file, or one of: {', '.join(MODEL_CHOICES)}.")
    check_input_file("--model", path)
    if args.tokenizer is None:
        raise ValueError("--model PATH needs --tokenizer PATH (the HBQ tokenizer file that belongs to it).")
    check_input_file("--tokenizer", args.tokenizer)
    if args.text_tokenizer is not None and args.text_encoder is None:
        raise ValueError("--text-tokenizer is for --text-encoder (the umt5-xxl weights); give both, or drop it.")
    if args.text_encoder is not None:
        check_input_file("--text-encoder", args.text_encoder)
        if args.text_tokenizer is None:
            raise ValueError("--text-encoder needs --text-tokenizer (the umt5-xxl tokenizer.json).")
        read_text_tokenizer(args.text_tokenizer)
    factors = _tokenizer_factors(Path(args.tokenizer))
    tasks, defaults, adaptive = _refiner_facts(path)
    spec = SizeSpec(*factors, defaults=defaults, tasks=tasks, adaptive=adaptive) if factors else None
    default_task = tasks[0] if tasks else None
    return ModelPreview(spec, tasks, default_task)


@functools.lru_cache(maxsize=2)
def read_text_tokenizer(path: Any):
    """The umt5 ``tokenizer.json`` as a ``tokenizers.Tokenizer`` (read once: checked before the load, used after)."""
    from tokenizers import Tokenizer

    check_input_file("--text-tokenizer", path)
    try:
        return Tokenizer.from_file(str(path))
    except Exception as error:  # noqa: BLE001 - `tokenizers` raises plain Exception for every unreadable file
        first = str(error).splitlines()[0][:200] if str(error) else type(error).__name__
        raise ValueError(f"--text-tokenizer {path}: not a tokenizer.json ({first}); give the umt5-xxl "
                         "tokenizer.json.") from error


def check_task(preview: ModelPreview, task: Optional[str]) -> None:
    """A ``--task`` the model surely cannot do is refused before loading (unknown files are checked after)."""
    if task is None or not preview.tasks or task in preview.tasks:
        return
    if task == "i2v" and "t2v" in preview.tasks:
        return  # a joint T2V refiner may run image-to-video (with a warning), as the official code allows
    raise ValueError(f"--task {task}: this model does {', '.join(preview.tasks)}; pick one of those.")


def load_from_args(args: argparse.Namespace, text_encoder: bool = True):
    """The model, its text encoder (or None) and its default task, from ``--model`` and friends
    (``text_encoder=False``: without loading a separate umt5-xxl)."""
    from ..checkpoints import load_umt5
    from ..pipeline import load_model
    from ..text import UMT5PromptEncoder

    if args.model in MODEL_CHOICES:
        return load_named(args.model, args.model_dir, args.download, device=args.device, dtype=args.dtype,
                          text_encoder=text_encoder)
    if args.tokenizer is None:
        raise ValueError("--model PATH needs --tokenizer PATH (the HBQ tokenizer file that belongs to it).")
    model = load_model(args.model, args.tokenizer, dtype=args.dtype, device=args.device)
    encoder = None
    if args.text_encoder is not None and text_encoder:
        if args.text_tokenizer is None:
            raise ValueError("--text-encoder needs --text-tokenizer (the umt5-xxl tokenizer.json).")
        tokenizer = read_text_tokenizer(args.text_tokenizer)
        umt5 = load_umt5(args.text_encoder, dtype=args.dtype, device=args.device)
        encoder = UMT5PromptEncoder(umt5, tokenizer)
    return model, encoder, model.default_task()


def model_files(args: argparse.Namespace) -> list:
    """The files ``load_from_args`` will read (for the parallel check that every rank has the same ones); a released
    file not downloaded yet is left out (``--download`` fetches the same file on every rank)."""
    if args.model == "tiny":
        files = [TINY_DIR / "refiner.safetensors", TINY_DIR / "tokenizer.safetensors"]
    elif args.model in MODEL_CHOICES:
        from ..models import default_model_dir, released_files

        files = list(released_files(args.model, Path(args.model_dir or default_model_dir())).values())
    else:
        files = [args.model, args.tokenizer, args.text_encoder, args.text_tokenizer]
    return [Path(f) for f in files if f is not None and Path(f).is_file()]


# ---- progress and Ctrl-C -----------------------------------------------------------------------------------------


_QUIET = False  # set on every rank but 0 of a parallel run: only rank 0 prints progress and warnings


def set_quiet(quiet: bool) -> None:
    """``True``: no progress lines, stage labels or warnings from this process (the non-main ranks of a parallel
    run; their errors are still printed, by ``cli.main``)."""
    global _QUIET
    _QUIET = bool(quiet)


def progress_enabled() -> bool:
    if _QUIET:
        return False
    try:
        return bool(sys.stderr.isatty())
    except (AttributeError, ValueError):
        return False


class ProgressLine:
    """A one-line progress bar on a terminal (nothing when stderr is redirected)."""

    def __init__(self) -> None:
        self.enabled = progress_enabled()

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


@contextlib.contextmanager
def stage(label: str) -> Iterator[None]:
    """``label … done (1.2 s)`` on a terminal around a long stage (loading, encoding, decoding, writing)."""
    if not progress_enabled():
        yield
        return
    started = time.perf_counter()
    sys.stderr.write(f"{label} …")
    sys.stderr.flush()
    try:
        yield
    except BaseException:
        sys.stderr.write("\n")
        raise
    sys.stderr.write(f" done ({time.perf_counter() - started:.1f} s)\n")
    sys.stderr.flush()


class CtrlC:
    """Ctrl-C as a request to stop, for the length of a command.

    Inside :meth:`cooperative` (sampling) the first SIGINT only sets :attr:`requested`: the refiner checks it between
    blocks (``GRNRefiner.should_stop``) and the step callback between steps, so a long step ends within one block.
    Elsewhere, or on a second Ctrl-C, it raises ``KeyboardInterrupt`` at once. Either way the command ends as
    ``interrupted`` with exit code 130 and no output file (outputs are renamed into place only when complete).
    Outside the main thread (no signal handlers there) Python's default behaviour is left as it is.
    """

    def __init__(self) -> None:
        self.requested = False
        self._cooperative = False
        self._previous: Any = None
        self._installed = False

    def __enter__(self) -> "CtrlC":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
            self._installed = True
        return self

    def __exit__(self, *exc) -> None:
        if self._installed:
            signal.signal(signal.SIGINT, self._previous)
            self._installed = False

    def _handle(self, signum, frame) -> None:  # noqa: ARG002 - signal handler signature
        if self.requested or not self._cooperative:
            self.requested = True
            raise KeyboardInterrupt
        self.requested = True

    def is_requested(self) -> bool:
        return self.requested

    def check(self) -> None:
        if self.requested:
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def cooperative(self, refiner: Any = None) -> Iterator[None]:
        """Sampling: SIGINT sets the flag; ``refiner`` (a GRNRefiner) checks it between blocks."""
        hooked = refiner is not None and hasattr(type(refiner), "should_stop")
        if hooked:
            refiner.should_stop = self.is_requested
        self._cooperative = True
        try:
            self.check()
            yield
            self.check()
        finally:
            self._cooperative = False
            if hooked:
                refiner.should_stop = None


def warn(message: str) -> None:
    if _QUIET:
        return
    print(f"warning: {message}", file=sys.stderr)
