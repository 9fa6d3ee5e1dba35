"""Memory: what a refiner needs (weights, one step's activations) and out-of-memory errors that say what to change.

    with oom_guard("the refiner step", step_advice(...)):
        ...                                   # torch.OutOfMemoryError -> GRNOutOfMemoryError with the fixes

The estimates count the tensors the refiner really allocates (see ``grn_core/refiner/model.py``): per packed token
row the float32 residual stream, the norm output, the q/k/v buffer and its float32 normed copy, the SwiGLU
activations, plus the head's logits of the visual rows; they are checked against measured peaks by
``benchmarks/gpu_suite.sh``.
"""

from __future__ import annotations

import gc
import traceback
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

__all__ = ["GRNOutOfMemoryError", "ParallelLayoutError", "RankMemory", "decode_advice",
           "format_bytes", "is_out_of_memory", "oom_guard", "parallel_layout", "parallel_step_bytes",
           "refiner_step_bytes", "refiner_weight_bytes", "step_advice"]

GiB = 1024 ** 3
# torch.OutOfMemoryError is top-level from torch 2.5; torch.cuda's name exists on every supported version.
OutOfMemoryError = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


class GRNOutOfMemoryError(RuntimeError):
    """The device ran out of memory in a stage; the message names the settings that lower the need.

    ``stage``: what was running; ``advice``: the suggested changes, most effective first.
    """

    def __init__(self, message: str, stage: str = "", advice: Sequence[str] = ()):
        super().__init__(message)
        self.stage = stage
        self.advice = tuple(advice)


def format_bytes(n: float) -> str:
    return f"{n / GiB:.1f} GB" if n >= 0.1 * GiB else f"{n / 1024 ** 2:.0f} MB"


def is_out_of_memory(error: BaseException) -> bool:
    """CUDA / MPS / CPU allocation failures (``torch.OutOfMemoryError`` or the RuntimeError texts of other backends)."""
    if isinstance(error, OutOfMemoryError):
        return True
    if isinstance(error, (RuntimeError, MemoryError)):
        text = str(error).lower()
        return any(s in text for s in ("out of memory", "can't allocate memory", "cannot allocate memory",
                                       "failed to allocate"))
    return False


def _device_state(device: Optional[torch.device]) -> str:
    if device is None or device.type != "cuda" or not torch.cuda.is_available():
        return ""
    try:
        free, total = torch.cuda.mem_get_info(device)
    except RuntimeError:
        return ""
    return f"; {format_bytes(free)} free of {format_bytes(total)} on {torch.cuda.get_device_name(device)}"


class oom_guard:  # noqa: N801 - used like a function: ``with oom_guard(...):``
    """Turn an out-of-memory error inside the block into :class:`GRNOutOfMemoryError` naming ``stage`` and the
    ``advice`` (a list of changes, or a callable returning one — evaluated only on failure).

    The failed frames' locals (the stage's tensors) are cleared and the original error loses its traceback before
    the CUDA cache is emptied, so the memory really returns and the device is usable for a retry with other
    settings. Other exceptions pass through untouched.
    """

    def __init__(self, stage: str, advice: Sequence[str] | Any = (), device: Any = None):
        self.stage = stage
        self.advice = advice
        self.device = torch.device(device) if device is not None else None

    def __enter__(self) -> "oom_guard":
        return self

    def __exit__(self, exc_type, error, tb) -> bool:
        if error is None or not is_out_of_memory(error):
            return False
        text = str(error).strip()
        failed = text.splitlines()[0][:300] if text else type(error).__name__
        traceback.clear_frames(tb)  # finished frames only; the caller's own frame is still running and is skipped
        error.__traceback__ = None
        del tb
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        items = list(self.advice() if callable(self.advice) else self.advice)
        lines = "\n".join(f"  - {item}" for item in items)
        message = (f"Out of memory during {self.stage}{_device_state(self.device)} ({failed})."
                   + (f" To fit, change one of these settings:\n{lines}" if items else ""))
        raise GRNOutOfMemoryError(message, self.stage, items) from None


# ----------------------------------------------------------------------------------------------------------------------
# Estimates


def _bytes_of(dtype: torch.dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size()


def refiner_weight_bytes(config: Any, storage: torch.dtype, compute: Optional[torch.dtype] = None) -> dict[str, int]:
    """Weight bytes of a refiner stored as ``storage`` (see :mod:`grn_core.runtime.precision`): ``block`` (one
    transformer block), ``blocks`` (all), ``other`` (embeddings, text/step projections, head) and ``total``."""
    from .fp8 import is_fp8

    compute = compute or (storage if not is_fp8(storage) else torch.bfloat16)
    half = compute in (torch.float16, torch.bfloat16)
    w, hd = config.width, config.head_dim
    q, kv = config.heads * hd, config.kv_heads * hd
    matrices = [(q, w), (kv, w), (kv, w), (w, q), (config.mlp_hidden, w), (config.mlp_hidden, w),
                (w, config.mlp_hidden)]
    linear = sum(o * i for o, i in matrices)
    if is_fp8(storage):
        block = linear + 4 * sum(o for o, _ in matrices)  # fp8 weights + float32 per-row scales
    else:
        block = linear * _bytes_of(storage)
    block += (2 * w + 2 * hd) * (4 if half else _bytes_of(compute))  # norms
    c = _bytes_of(compute)
    other = c * (config.in_channels * w + w + config.text_channels * w + w
                 + config.step_freq_dim * w + w + w * w + w)
    other += (4 if half else c) * (w + w * config.in_channels + config.in_channels)  # head
    blocks = block * config.depth
    return {"block": block, "blocks": blocks, "other": other, "total": blocks + other}


def _step_terms(config: Any, grid: tuple[int, int, int], text_tokens: int, batch: int, branches: int,
                compute: torch.dtype, first_frame: bool, storage: Optional[torch.dtype]) -> dict[str, int]:
    """The pieces of :func:`refiner_step_bytes`: packed ``rows`` and visual ``head_rows`` of the pass, bytes per row
    of its phases (``attention_row``, ``mlp_row``, ``head_row``; ``logits_row`` is one float32 logits row), and the
    terms that do not scale with the rows (``text_kv``, ``upcast``, ``sampler``)."""
    from .fp8 import is_fp8

    t, h, w = grid
    visual = t * h * w
    first = h * w if first_frame else 0
    joint = getattr(config, "layout", "joint") == "joint"
    rows_per_seq = visual + first + text_tokens + 1 if joint else visual + 1
    c = _bytes_of(compute)
    r = 4 if c < 4 else c  # residual / norm dtype
    wd, hid = config.width, config.mlp_hidden
    head_rows = branches * batch * visual
    upcast = c * hid * wd if storage is not None and is_fp8(storage) else 0  # one SwiGLU matrix at a time
    return {
        "rows": branches * batch * rows_per_seq,
        "head_rows": head_rows,
        "attention_row": wd * (3 * r + 8 * c + 2 * r),
        "mlp_row": wd * (3 * r + 2 * c) + 2 * c * hid,
        "head_row": 2 * r * wd + 4 * config.in_channels * 2,  # gathered rows, norm, logits (+ a copy)
        "logits_row": 4 * config.in_channels,
        "text_kv": 0 if joint else config.depth * text_tokens * 2 * config.kv_heads * config.head_dim * c * branches,
        "upcast": upcast,
        "sampler": head_rows // branches * config.bits * 24,  # probabilities, uniforms, states: a few bytes per bit
        "compute_bytes": c,
        "residual_bytes": r,
    }


def refiner_step_bytes(config: Any, grid: tuple[int, int, int], text_tokens: int = 128, batch: int = 1,
                       branches: int = 2, compute: torch.dtype = torch.bfloat16,
                       first_frame: bool = False, storage: Optional[torch.dtype] = None) -> int:
    """Peak activation bytes of one refiner step (both guidance branches when ``branches`` = 2), excluding weights.

    Per packed row (``W`` width, ``H`` SwiGLU width, ``c`` compute bytes, residual stream in float32 for half
    types): attention phase ≈ residual 4W + norm 4W + input c·W + q/k/v 3c·W + float32 normed q,k 8W + roped q,k
    2c·W + attention out 2c·W + new residual 4W; MLP phase ≈ residual 4W + norm 4W + input c·W + gate/up 2c·H + out
    c·W + new residual 4W. Plus the head on the visual rows and, for fp8 storage, one upcast SwiGLU matrix.
    """
    s = _step_terms(config, grid, text_tokens, batch, branches, compute, first_frame, storage)
    attention, mlp = s["rows"] * s["attention_row"], s["rows"] * s["mlp_row"]
    head = s["head_rows"] * s["head_row"]
    return int(max(attention, mlp, head) + s["text_kv"] + s["upcast"] + s["sampler"])


# ----------------------------------------------------------------------------------------------------------------------
# Several GPUs: what one rank holds



class ParallelLayoutError(ValueError):
    """A ``--parallel`` mode and process count that cannot run (the message names them and what would)."""


@dataclass(frozen=True)
class RankMemory:
    """Bytes one rank needs for a refiner step under ``mode`` on ``world_size`` processes (see
    :func:`parallel_step_bytes`): every rank holds all ``weights``; ``activations`` are one step's peak on that
    rank, exchange buffers included. ``degree``: ranks sharing one sequence (Ulysses); ``branches``: guidance
    branches in this rank's pass."""

    mode: Optional[str]
    world_size: int
    degree: int
    branches: int
    weights: int
    activations: int

    @property
    def total(self) -> int:
        return self.weights + self.activations


def parallel_layout(mode: Optional[str], world_size: int, config: Any = None) -> tuple[int, int]:
    """``(degree, branches)`` of one rank: how many ranks share its sequence and how many guidance branches its
    pass holds. ``None`` / ``data``: 1 and 2 (each rank samples alone); ``cfg``: 1 and 1 (world size 2); ``sp``:
    ``world_size`` and 2 (both branches packed, rows split); ``cfg+sp``: ``world_size / 2`` and 1. With ``config``,
    Ulysses' rule that the degree divides the query and key/value heads is checked too."""
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ParallelLayoutError(f"world_size={world_size!r}: give the number of processes (an int >= 1).")
    from .distributed import check_parallel_mode, sp_degree

    heads = (config.heads, config.kv_heads) if config is not None else None
    try:  # the one rule of what runs (the command line checks --parallel with it too)
        check_parallel_mode(mode, world_size, heads)
    except ValueError as error:
        raise ParallelLayoutError(str(error)) from error
    degree, branches = sp_degree(mode, world_size), 1 if mode in ("cfg", "cfg+sp") else 2
    return degree, branches


def parallel_step_bytes(config: Any, grid: tuple[int, int, int], mode: Optional[str] = None, world_size: int = 1,
                        text_tokens: int = 128, batch: int = 1, compute: torch.dtype = torch.bfloat16,
                        storage: Optional[torch.dtype] = None, first_frame: bool = False,
                        guided: bool = True) -> RankMemory:
    """Per-rank weight and activation bytes of one refiner step under ``--parallel mode`` (``guided=False``: guidance
    1, one branch: ``sp`` splits that branch alone, ``cfg`` / ``cfg+sp`` run it on the conditional side).

    From the single-process terms (:func:`refiner_step_bytes`, :func:`refiner_weight_bytes`; ``storage`` defaults to
    ``compute``). Weights are never split: every rank holds the whole refiner. Activations:

    - ``None`` / ``data``: a single process's step (both branches; ``data`` runs whole prompts per rank).
    - ``cfg`` (2 ranks): one branch's step, plus the exchanged logits ``[2, rows, bits, 2]`` float32 beside it.
    - ``sp`` degree ``P = world_size``: both branches packed, ``n = ceil(rows / P)`` rows per rank: the attention
      and MLP phases of ``n`` rows, plus Ulysses' all-to-all buffers -- q, k, v and the attention output for *all*
      rows with ``heads / P`` heads, ``4 · rows · W / P`` values (= ``4 n W``) in the compute dtype; the head
      runs on ``n`` rows, and its logits of all rows are gathered on every rank (received parts and their
      concatenation, then the visual rows picked out). Text K/V (prefix layout) and the sampler's state are not split.
    - ``cfg+sp`` (``2P`` ranks): ``sp`` of degree ``P`` on one branch, plus the ``cfg`` exchange.

    So ``sp`` activations fall about as ``1 / P`` (the gathered logits and the sampler's state do not), and ``cfg``
    about halves them; the weights set the floor.
    """
    degree, branches = parallel_layout(mode, world_size, config)
    if not guided:
        branches = 1
    weights = refiner_weight_bytes(config, storage or compute, compute)["total"]
    s = _step_terms(config, grid, text_tokens, batch, branches, compute, first_frame, storage)
    rows, head_rows, logits = s["rows"], s["head_rows"], s["logits_row"]
    # cfg / cfg+sp: both branches' logits, gathered (unguided: the conditional ones, broadcast)
    exchange = (2 if guided else 1) * head_rows * logits if mode in ("cfg", "cfg+sp") else 0
    if degree == 1:
        attention, mlp = rows * s["attention_row"], rows * s["mlp_row"]
        head = head_rows * s["head_row"] + exchange
    else:
        n = -(-rows // degree)
        attention = n * s["attention_row"] + 4 * n * config.width * s["compute_bytes"]
        mlp = n * s["mlp_row"]
        head = (n * (s["residual_bytes"] * config.width + logits) + 2 * degree * n * logits
                + head_rows * 2 * logits + exchange)
    activations = int(max(attention, mlp, head) + s["text_kv"] + s["upcast"] + s["sampler"])
    return RankMemory(mode, world_size, degree, branches, int(weights), activations)


# ----------------------------------------------------------------------------------------------------------------------
# Advice


def step_advice(weight_dtype: str = "", offload: str = "", size: str = "", batch: int = 1,
                guidance: Optional[float] = None) -> list[str]:
    """What lowers a refiner step's memory, given the current settings (strings as the user set them)."""
    advice = []
    if offload not in ("blocks",) and not offload.startswith("blocks:"):
        advice.append(f"offload: 'blocks' or 'blocks:N' (stream the refiner's blocks from the CPU"
                      f"{'; now ' + repr(offload) if offload else ''})")
    elif offload.startswith("blocks:"):
        advice.append(f"offload: stream more blocks than now ({offload!r}), or 'blocks' for all")
    if weight_dtype.startswith("gguf:"):
        if weight_dtype not in ("gguf:q4_k", "gguf:q4_0"):
            advice.append(f"a smaller GGUF file: convert to q4_k (python -m grn_core.convert ... --dtype q4_k; now "
                          f"{weight_dtype})")
    elif not weight_dtype.startswith("fp8"):
        advice.append(f"weight dtype: fp8_e4m3fn (half the refiner's weight memory), or a q8_0 GGUF file"
                      f"{'; now ' + weight_dtype if weight_dtype else ''}")
    if size:
        advice.append(f"a smaller size or fewer frames (now {size}); activations grow with latent cells × frames")
    if batch > 1:
        advice.append(f"batch size 1 (now {batch})")
    if guidance is not None and guidance != 1.0:
        advice.append(f"guidance 1.0 halves the activations (no unconditional branch; now {guidance:g})")
    return advice


def decode_advice(tile: int = 0, offload: str = "") -> list[str]:
    """What lowers the tokenizer decode's memory."""
    advice = []
    if tile:
        advice.append(f"a smaller decode tile (now {tile} latent cells; 16–32 fits small GPUs)")
    else:
        advice.append("tiled decoding: set a decode tile (e.g. 32 latent cells; neighbouring tiles share 4 cells)")
    if offload in ("none", ""):
        advice.append("offload: 'model' (the refiner leaves the GPU before decoding)")
    advice.append("decode on the CPU (slow, but bounded by system memory)")
    return advice
