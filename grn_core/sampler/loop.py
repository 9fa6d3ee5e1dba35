"""The T2I / T2V / I2V refinement loop (GRN spec §4), with seeds, adaptive steps and observability.

Per step i, for every running sample (rows of the batch):

    cond, uncond = refiner.step_logits(one-hot(x_i), r_i, text, negative text)     # uncond only if guided
    p1   = sigmoid(((u + w (c - u))_1 - (u + w (c - u))_0) / tau)                   # per bit, w = 1 unguided
    s    ~ Bernoulli(p1)                          # the full sample of this step
    keep ~ Bernoulli(r_{i+1}) per bit;  x_{i+1} = where(keep, s, Z);  r_{i+1} <- mean(keep)

``Z`` is drawn once; guidance applies where ``r_i >= cfg_interval``; the run returns the last full sample
``s`` of each sample (not the mixed map). Differences from the official loop, all on purpose:

* random numbers: sample k draws everything from its own CPU ``torch.Generator`` seeded ``seed + k``
  (Z, then per step the sampling and keep uniforms), so sample k of a batch equals that seed run alone,
  and CPU and CUDA get the same numbers. Bits are drawn as ``u < p1`` instead of ``torch.multinomial``
  (same distribution).
* no wasted passes: the unconditional branch is skipped (``text_uncond=None``) when no running sample is
  guided this step (guidance 1, or outside the interval).
* adaptive steps (optional): as the official C2I rule, the mean entropy of the conditional prediction of
  step ``i = warmup`` (after ``warmup`` refinement steps) decides each sample's remaining ``D`` steps, that
  step being the first of them (total ``warmup + D``; schedule in ``schedule``); a finished sample leaves
  the batch (``running.RunningBatch`` slices its rows out, so later calls pass fewer rows to the refiner).

Editing (the token map as a canvas: ``init_bits``, ``fixed``, ``start_step``; ``grn_core.editing`` builds them):

* ``init_bits`` uint8 ``[1 or B, D, t, h, w]``: a source's bits on the output grid (I2V: the first latent frame of
  the grid is the given frame and ``init_bits[:, :, 0]`` is ignored).
* ``fixed`` bool ``[1 or B, 1, t, h, w]``: latent cells clamped to ``init_bits`` at every step. Every bit of a fixed
  cell takes the source's value in the starting map, in every step's full sample ``s`` and in every mixed map
  ``x_{i+1}``, and counts as kept (state KEEP); the refiner sees those bits as context because they are in its input.
  The clamp is done through the step's uniforms, never by drawing fewer numbers: at fixed bits ``u_keep = -1``
  (always kept) and ``u_sample = -1`` where the source bit is 1, ``2`` where it is 0 (``u < p1`` then gives the
  source bit for every ``p1`` in [0, 1]). The final bits at fixed cells therefore equal ``init_bits`` exactly. The
  entropy statistics still read the network's prediction there.
* ``start_step`` k (``0 <= k <= T``, ``T = settings.steps``; from a strength ``s``: ``k = round((1 - s) * T)``,
  ``editing.strength_to_start``): the run starts part-way with

      keep_k ~ Bernoulli(r_k) per bit        (r_k = bit_keep_fraction(k - 1, T, ...), the schedule's kept fraction)
      x_k    = where(keep_k, init_bits, Z)   (then fixed bits := init_bits)
      r_k   <- mean(keep_k | fixed)          (the realised fraction is the step value the refiner sees)

  and steps k .. T-1 run (the ``StepInfo.step`` values are k .. T-1 of T). Random numbers, per sample from its own
  generator: Z first, then (only when k > 0) the ``[tokens, D]`` uniforms of keep_k, then per step the sampling and
  keep uniforms as before; with k = 0 and no ``fixed`` nothing changes, so existing seeds reproduce bit for bit.
  Without ``start_step`` but with ``fixed``: x_0 = where(fixed, init_bits, Z), r_0 = mean(fixed).
  k = T (strength 0) runs no network pass and draws nothing: the result is ``init_bits`` exactly (steps 0, nfe 0).
  Adaptive steps decide the step count at step ``warmup`` of a run that starts at 0, so ``0 < k < T`` with
  ``settings.adaptive`` is refused (use fixed steps).

Parallel sampling (the seam): the loop is handed a *branch strategy* that turns one step's inputs into the
``(cond, uncond)`` logits: ``branches.logits(refiner, bits, step_value, text_cond, text_uncond_or_None,
aspect_ratio=..., first_frame_bits=...)``. The default, :class:`LocalBranches`, is one ``refiner.step_logits`` call on
this process; ``grn_core.runtime.distributed.CFGParallel`` computes one branch per rank and exchanges the logits. A
strategy must return on every rank exactly the logits one process would compute; everything after it (the fused step,
the random numbers, retirement) is the same code on every rank, so ranks stay in lockstep. Pass it as
``sample_bits(..., branches=...)`` (``pipeline.generate_tokens`` passes its own ``branches=`` through).

Code: ``sample_bits`` = ``_validate`` (every check before any work) -> ``_prepare`` (Z, x_0, r_0 as columns of
the running batch) -> ``_step`` per step (``_logits``, ``_fused_step``, ``_advance``, ``_report``, retirement)
-> ``_finish`` (the stored final samples, I2V first frame prepended).
"""

from __future__ import annotations

import logging
import math
import numbers
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Sequence, Tuple

import torch

from .bookkeeping import SEED_MODULUS, RunLedger, call_callback, draw_uniforms, make_step_info, sample_seeds
from .events import SamplingResult, StepInfo
from .running import RunningBatch, decide_steps, planned_steps, preview_due, row_temperatures
from .schedule import bit_keep_fraction, layout_cap
from .settings import SamplerSettings
from .step import StepOutput, fused_step_reference, mean_bit_entropy

log = logging.getLogger(__name__)

TextArg = Any  # features [L, C], a list of B of them, or an object from refiner.prepare_text(...)


class NonFiniteLogitsError(ValueError):
    """The network returned NaN or infinite logits: sampling them would give noise and a sidecar of NaNs."""


def check_seed_range(seed: Optional[int]) -> None:
    """A base seed is ``None`` (random) or an int in ``0 .. 2**64 - 1`` (no silent wrap-around of the typed seed)."""
    if seed is None:
        return
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise ValueError(f"seed must be an integer or None, got {seed!r}")
    if not 0 <= int(seed) < SEED_MODULUS:
        raise ValueError(f"seed {seed} is outside 0..{SEED_MODULUS - 1} (seeds are 64-bit); pick one in that range")


def check_finite_step(entropy: Sequence[float], step: int, total: int, ids: Sequence[int], what: str = "refiner",
                      branch: str = "") -> None:
    """Raise :class:`NonFiniteLogitsError` naming the step (1-based) when a row's entropy is not finite: every NaN or
    infinite logit makes its bit's entropy NaN, so this costs no extra pass over the logits."""
    for row, value in enumerate(entropy):
        if not math.isfinite(value):
            raise NonFiniteLogitsError(
                f"the {what} produced NaN or infinite {branch + ' ' if branch else ''}logits at step {step + 1} of "
                f"{total} (sample {ids[row]}): the weights or the inputs are damaged (or a half-precision weight dtype "
                "overflowed: try --dtype bf16 or fp32).")


def _config_value(config: Any, *names: str) -> Any:
    for name in names:
        if hasattr(config, name):
            return getattr(config, name)
    raise ValueError(f"refiner.config has none of {names}; the sampler needs it to size the bit map")


def model_device(model: Any) -> torch.device:
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration, TypeError):
        return torch.device("cpu")


def resolve_kernel(kernel: str, device: torch.device) -> bool:
    """True when the fused step should run as the Triton kernel."""
    if kernel == "torch":
        return False
    if kernel == "auto" and device.type != "cuda":
        return False
    from .triton_step import interpreter_active, triton_available
    if not triton_available():
        if kernel == "triton":
            raise ValueError("kernel='triton' but triton is not installed; `pip install triton` or use kernel='auto'")
        return False
    if kernel == "triton" and device.type != "cuda" and not interpreter_active():
        raise ValueError(f"kernel='triton' on {device} needs TRITON_INTERPRET=1 (set before importing triton); "
                         "use kernel='auto' to run the torch reference there")
    return True


class LocalBranches:
    """The default branch strategy: both guidance branches in one ``refiner.step_logits`` call on this process."""

    def logits(self, refiner: Any, bits: torch.Tensor, step_value: torch.Tensor, text_cond: Any,
               text_uncond: Optional[Any], **kwargs: Any) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        return refiner.step_logits(bits, step_value, text_cond, text_uncond, **kwargs)


class TextBranch:
    """The text of one guidance branch, prepared with ``refiner.prepare_text`` once (when the refiner offers it).

    Raw features are ``[L, C]`` (shared by the batch), ``[B, L, C]`` or a list of B ``[L_i, C]`` (per sample).
    When samples leave the batch a per-sample text is cut to the remaining rows and prepared again (once per
    change). Anything else (e.g. an already prepared context) is passed through unchanged and must then be
    shared by the batch, or hold one item per sample of a batch that never shrinks (fixed step count).
    """

    def __init__(self, refiner: Any, name: str, text: TextArg, batch_size: int, channels: Optional[int],
                 batch_may_shrink: bool):
        self.refiner, self.name = refiner, name
        self.per_sample = isinstance(text, (list, tuple)) or (isinstance(text, torch.Tensor) and text.dim() == 3)
        items = list(text) if isinstance(text, (list, tuple)) else [text]
        if isinstance(text, (list, tuple)) and len(text) != batch_size:
            raise ValueError(f"{name} is a list of {len(text)} entries but batch_size={batch_size}; pass one entry "
                             "per sample, or one tensor [L, C] shared by all")
        for item in items:
            if isinstance(item, torch.Tensor):
                if item.dim() not in (2, 3) or (item.dim() == 3 and (item.shape[0] != batch_size or len(items) > 1)):
                    raise ValueError(f"{name} has shape {tuple(item.shape)}; expected encoder features [L, C] or "
                                     f"[{batch_size}, L, C]")
                if channels is not None and item.shape[-1] != channels:
                    raise ValueError(f"{name} has {item.shape[-1]} feature channels but the refiner expects "
                                     f"text_channels={channels}; encode the prompt with the matching text encoder "
                                     "(umt5-xxl: 4096)")
            elif isinstance(text, (list, tuple)):
                raise ValueError(f"{name} is a list holding {type(item).__name__}; a list must hold one [L, C] "
                                 "tensor per sample")
        self.raw_text = self.per_sample or isinstance(text, torch.Tensor)
        items_in_context = getattr(text, "num_items", 1) if not self.raw_text else 1
        if not self.raw_text and items_in_context not in (1, batch_size):
            raise ValueError(f"{name} holds {items_in_context} text items for batch_size={batch_size}; use 1 or "
                             f"{batch_size}")
        if not self.raw_text and items_in_context > 1 and batch_may_shrink:
            raise ValueError(f"{name} is a prepared per-sample text context, but with adaptive steps finished samples "
                             "leave the batch and it cannot be cut to the remaining rows; pass the raw features "
                             "(a list of [L, C] tensors) instead")
        self.text = text
        self._prepared = None

    def current(self) -> Any:
        """What to pass to ``step_logits`` for the running rows (prepared lazily, once per row set)."""
        if self._prepared is None:
            prepare = getattr(self.refiner, "prepare_text", None)
            self._prepared = prepare(self.text) if (self.raw_text and callable(prepare)) else self.text
        return self._prepared

    def keep_rows(self, rows: Sequence[int]) -> None:
        if not self.per_sample:
            return
        if isinstance(self.text, torch.Tensor):
            self.text = self.text.index_select(0, torch.tensor(list(rows), dtype=torch.long, device=self.text.device))
        else:
            self.text = [self.text[i] for i in rows]
        self._prepared = None


def _check_first_frame(first_frame_bits: torch.Tensor, batch_size: int, bits: int, h: int, w: int) -> None:
    shape = tuple(first_frame_bits.shape)
    ok = (first_frame_bits.dim() == 5 and shape[0] in (1, batch_size) and shape[1:] == (bits, 1, h, w))
    if not ok:
        raise ValueError(f"first_frame_bits has shape {shape}; expected [1 or {batch_size}, {bits}, 1, {h}, {w}] "
                         "(HBQ bits of the first latent frame: hbq.features_to_bits(tok.encode(image))[:, :, :1])")
    if first_frame_bits.is_floating_point() or first_frame_bits.is_complex():
        raise ValueError(f"first_frame_bits has dtype {first_frame_bits.dtype}; expected 0/1 integer bits (uint8)")
    if first_frame_bits.numel() and (int(first_frame_bits.min()) < 0 or int(first_frame_bits.max()) > 1):
        raise ValueError("first_frame_bits holds values outside {0, 1}; pass HBQ bit labels, not index labels")


@dataclass(frozen=True)
class _BitPlan:
    """What ``_validate`` fixed for the whole run: model, settings, sizes of the bit map, text, kernel."""

    refiner: Any
    settings: SamplerSettings
    cap: float                  # largest kept fraction (the layout's, or settings.cap)
    n_bits: int                 # D = rounds * latent_channels bits per token
    t_gen: int                  # generated latent frames (I2V: t - 1, the first one is given)
    h: int
    w: int
    aspect_ratio: float
    branch_c: TextBranch
    branch_u: Optional[TextBranch]
    first_frame_bits: Optional[torch.Tensor]
    init_bits: Optional[torch.Tensor]   # uint8 [1 or B, D, t_gen, h, w] (I2V: without the given frame)
    fixed: Optional[torch.Tensor]       # bool [1 or B, 1, t_gen, h, w]
    start_step: int
    seeds: List[int]
    device: torch.device
    use_triton: bool
    branches: Any = None        # the branch strategy (LocalBranches, CFGParallel, ...)

    @property
    def tokens(self) -> int:
        return self.t_gen * self.h * self.w


@dataclass
class _BitRun:
    """A run in progress: the running rows and the index of the next step.

    Columns of ``batch``: ``z`` (Z), ``x`` (x_i), ``kept`` (bool mask of x_i's kept bits), all uint8/bool
    ``[R, T, D]``; ``fraction`` (r_i) and ``remaining`` (D, None until decided) lists; I2V: ``first``.
    """

    batch: RunningBatch
    use_triton: bool            # off for the rest of the run once the Triton kernel failed under kernel="auto"
    step: int = 0
    interrupted: bool = False


@torch.no_grad()
def sample_bits(
    refiner: Any,
    text_cond: TextArg,
    text_uncond: Optional[TextArg] = None,
    *,
    grid: Tuple[int, int, int],
    batch_size: int = 1,
    seed: Optional[int] = 0,
    settings: Optional[SamplerSettings] = None,
    aspect_ratio: Optional[float] = None,
    first_frame_bits: Optional[torch.Tensor] = None,
    callback: Optional[Callable[[StepInfo], Any]] = None,
    preview_fn: Optional[Callable[[torch.Tensor], Any]] = None,
    device: Optional[torch.device] = None,
    init_bits: Optional[torch.Tensor] = None,
    fixed: Optional[torch.Tensor] = None,
    start_step: int = 0,
    branches: Any = None,
) -> SamplingResult:
    """Sample bit maps with a GRN_bit refiner (T2I: t = 1; T2V; I2V with ``first_frame_bits``).

    Args:
        refiner: object with ``step_logits(...)`` and ``config.layout``, ``config.latent_channels``,
            ``config.rounds`` (or ``hbq_rounds``) and optionally ``config.text_channels``.
        text_cond / text_uncond: prompt / negative-prompt encoder features ``[L, C]`` shared by the batch,
            ``[B, L, C]`` or a list of B ``[L_i, C]`` (see ``TextBranch``: prepared once with
            ``refiner.prepare_text`` when offered, re-prepared for the remaining rows when samples leave), or an
            already prepared context (passed through). ``text_uncond`` is required when guidance != 1 (the
            official loop uses the empty prompt); it is only prepared once a step is guided.
        grid: latent grid ``(t, h, w)`` of the whole output; with ``first_frame_bits`` the first of the
            ``t`` frames is given and ``t - 1`` are generated.
        batch_size: samples; sample k uses seed ``seed + k``.
        aspect_ratio: height/width passed to the refiner (its RoPE template); default ``h / w``.
        first_frame_bits: I2V, uint8 ``[1 or B, rounds*d, 1, h, w]``.
        callback: called after every step with a ``StepInfo``; return False or raise
            ``SamplingInterrupted`` to stop (the result then has ``interrupted=True``).
        preview_fn: called with the current full sample bits ``[n, rounds*d, t_gen, h, w]`` every
            ``settings.preview_every`` steps; its return value is put in ``StepInfo.preview``.
        init_bits / fixed / start_step: refine or inpaint a source (module docstring, "Editing").
        branches: how a step's logits are computed (module docstring, "Parallel sampling"); default
            :class:`LocalBranches` (this process).
    Returns:
        ``SamplingResult`` with ``bits`` uint8 ``[B, rounds*d, t, h, w]`` (I2V: given frame first).
    """
    plan = _validate(refiner, text_cond, text_uncond, grid, batch_size, seed, settings, aspect_ratio,
                     first_frame_bits, device, init_bits, fixed, start_step, branches)
    if plan.start_step >= plan.settings.steps:
        return _unchanged(plan)
    run = _prepare(plan)
    while run.batch:
        _step(plan, run, callback, preview_fn)
    return _finish(plan, run)


def _validate(refiner: Any, text_cond: TextArg, text_uncond: Optional[TextArg], grid: Tuple[int, int, int],
              batch_size: int, seed: Optional[int], settings: Optional[SamplerSettings],
              aspect_ratio: Optional[float], first_frame_bits: Optional[torch.Tensor],
              device: Optional[torch.device], init_bits: Optional[torch.Tensor] = None,
              fixed: Optional[torch.Tensor] = None, start_step: int = 0, branches: Any = None) -> _BitPlan:
    """Check every argument before any work (a bad input never costs a model call) and fix the run's sizes."""
    settings = (settings or SamplerSettings()).validate()
    config = refiner.config
    cap = settings.cap if settings.cap is not None else layout_cap(_config_value(config, "layout"))
    rounds = int(_config_value(config, "hbq_rounds", "rounds"))
    n_bits = rounds * int(_config_value(config, "latent_channels"))
    text_channels = getattr(config, "text_channels", None)

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if len(tuple(grid)) != 3 or any((not isinstance(v, int)) or v < 1 for v in grid):
        raise ValueError(f"grid must be three positive integers (t, h, w) of the latent grid, got {grid!r}")
    t_all, h, w = grid
    if first_frame_bits is not None:
        if t_all < 2:
            raise ValueError(f"I2V needs grid t >= 2 (the given first latent frame plus generated ones), got t={t_all}; "
                             "use 2 s of video (33 frames -> 9 latent frames)")
        _check_first_frame(first_frame_bits, batch_size, n_bits, h, w)
    shrinks = settings.adaptive is not None
    branch_c = TextBranch(refiner, "text_cond", text_cond, batch_size, text_channels, shrinks)
    branch_u = None
    if text_uncond is not None:
        branch_u = TextBranch(refiner, "text_uncond", text_uncond, batch_size, text_channels, shrinks)
    elif settings.guidance != 1.0:
        raise ValueError(f"guidance={settings.guidance} needs text_uncond (negative-prompt features; the official "
                         "loop encodes the empty prompt ''); pass it or set guidance=1.0")
    check_seed_range(seed)
    init_bits, fixed, start_step = _check_edit(init_bits, fixed, start_step, batch_size, n_bits, grid, settings,
                                               first_frame_bits is not None)
    seeds = sample_seeds(seed, batch_size)
    device = torch.device(device) if device is not None else model_device(refiner)
    return _BitPlan(
        refiner=refiner, settings=settings, cap=cap, n_bits=n_bits,
        t_gen=t_all - (1 if first_frame_bits is not None else 0), h=h, w=w,
        aspect_ratio=aspect_ratio if aspect_ratio is not None else h / w, branch_c=branch_c, branch_u=branch_u,
        first_frame_bits=first_frame_bits, init_bits=init_bits, fixed=fixed, start_step=start_step,
        seeds=seeds, device=device,
        use_triton=resolve_kernel(settings.kernel, device),
        branches=branches if branches is not None else LocalBranches(),
    )


def _check_edit(init_bits: Optional[torch.Tensor], fixed: Optional[torch.Tensor], start_step: Any, batch_size: int,
                n_bits: int, grid: Tuple[int, int, int], settings: SamplerSettings, i2v: bool
                ) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor], int]:
    """Check the editing inputs against the grid; returns them cut to the generated frames (I2V: without frame 0)."""
    t, h, w = grid
    steps = settings.steps
    if isinstance(start_step, bool) or not isinstance(start_step, numbers.Integral) or not 0 <= start_step <= steps:
        raise ValueError(f"start_step {start_step!r} must be an integer from 0 to steps={steps} "
                         "(strength s gives round((1 - s) * steps))")
    start_step = int(start_step)
    if init_bits is None:
        if fixed is not None or start_step:
            raise ValueError("fixed cells and start_step > 0 need init_bits (the source's bits on the output grid: "
                             "grn_core.pipeline.encode_clip, or grn_core.editing.extend_source)")
        return None, None, 0
    shape = tuple(init_bits.shape) if isinstance(init_bits, torch.Tensor) else type(init_bits).__name__
    if not isinstance(init_bits, torch.Tensor) or init_bits.dim() != 5 or init_bits.shape[0] not in (1, batch_size) \
            or tuple(init_bits.shape[1:]) != (n_bits, t, h, w):
        raise ValueError(f"init_bits has shape {shape}; expected [1 or {batch_size}, {n_bits}, {t}, {h}, {w}] (the "
                         "source's HBQ bits on the output's latent grid; encode the source at the output's size)")
    if init_bits.is_floating_point() or init_bits.is_complex() or init_bits.dtype == torch.bool:
        raise ValueError(f"init_bits has dtype {init_bits.dtype}; expected 0/1 integer bits (uint8)")
    if init_bits.numel() and (int(init_bits.min()) < 0 or int(init_bits.max()) > 1):
        raise ValueError("init_bits holds values outside {0, 1}; pass HBQ bit labels, not index labels")
    if fixed is not None:
        fshape = tuple(fixed.shape) if isinstance(fixed, torch.Tensor) else type(fixed).__name__
        if not isinstance(fixed, torch.Tensor) or fixed.dtype != torch.bool or fixed.dim() != 5 or \
                fixed.shape[0] not in (1, batch_size) or tuple(fixed.shape[1:]) != (1, t, h, w):
            raise ValueError(f"fixed has shape {fshape} ({getattr(fixed, 'dtype', None)}); expected bool "
                             f"[1 or {batch_size}, 1, {t}, {h}, {w}] (True: a latent cell kept from init_bits; "
                             "grn_core.editing.mask_to_cells makes one from a mask)")
    if settings.adaptive is not None and 0 < start_step < steps:
        raise ValueError(f"adaptive steps cannot start part-way (start_step={start_step}, strength < 1): the step "
                         "count is decided at the warm-up step of a run that starts at 0. Turn adaptive steps off "
                         "(fixed steps) or use strength 1.")
    first = 1 if i2v else 0
    init_bits = init_bits[:, :, first:].to(torch.uint8)
    fixed = fixed[:, :, first:] if fixed is not None else None
    return init_bits, fixed, start_step


def _flat(plan: _BitPlan, tensor: torch.Tensor, rows: int) -> torch.Tensor:
    """``[1 or R, C, t_gen, h, w]`` -> ``[R, tokens, C]`` on the plan's device (the loop's row layout)."""
    flat = tensor.to(plan.device).permute(0, 2, 3, 4, 1).reshape(tensor.shape[0], plan.tokens, tensor.shape[1])
    return flat.expand(rows, -1, -1).contiguous()


def _unchanged(plan: _BitPlan) -> SamplingResult:
    """start_step == steps (strength 0): no network pass, nothing drawn; every sample is ``init_bits``."""
    batch = RunningBatch(RunLedger(plan.seeds))
    n = len(plan.seeds)
    run = _BitRun(batch, plan.use_triton, step=plan.start_step)
    batch.retire([True] * n, _flat(plan, plan.init_bits, n).to(torch.uint8))
    return _finish(plan, run)


def _prepare(plan: _BitPlan) -> _BitRun:
    """Draw Z (each sample from its own generator, before any uniform of a step) and set x_0 = Z, r_0 = 0.

    Everything per row is a column of the running batch, so finished rows leave all of it in one call; a new
    per-row input of the step (a map to start from instead of Z, cells clamped to a source) is one more
    column here and one more read in ``_step`` / ``_advance``.
    """
    batch = RunningBatch(RunLedger(plan.seeds))
    rows = len(batch)
    z = torch.stack([torch.randint(0, 2, (plan.tokens, plan.n_bits), generator=g, dtype=torch.uint8)
                     for g in batch.generators]).to(plan.device)
    batch["z"] = z
    batch["x"] = z.clone()                                   # x_0 = Z
    batch["kept"] = torch.zeros_like(z, dtype=torch.bool)    # nothing kept before step 0
    batch["fraction"] = [0.0] * rows                         # r_0 = 0
    batch["remaining"] = [None] * rows                       # D per row, once decided
    if plan.init_bits is not None:
        _start_from_source(plan, batch, z)
    if plan.first_frame_bits is not None:
        first = plan.first_frame_bits.to(device=plan.device, dtype=torch.uint8)
        batch["first"] = first.expand(rows, -1, -1, -1, -1)
    for branch in (plan.branch_c, plan.branch_u):
        if branch is not None:
            batch.on_keep_rows(branch.keep_rows)             # a per-sample text follows its rows
    return _BitRun(batch, plan.use_triton, step=plan.start_step)


def _start_from_source(plan: _BitPlan, batch: RunningBatch, z: torch.Tensor) -> None:
    """x_k = where(keep_k, init, Z) with keep_k ~ Bernoulli(r_k) (uniforms drawn right after Z, only when k > 0),
    fixed bits := init; columns ``fixed`` and ``forced`` (their sampling uniforms) for the per-step clamp;
    r_k = realised kept fraction."""
    rows = len(batch)
    init = _flat(plan, plan.init_bits, rows)
    k = plan.start_step
    kept = torch.zeros_like(z, dtype=torch.bool)
    if k > 0:
        s = plan.settings
        r_k = bit_keep_fraction(k - 1, s.steps, plan.cap, s.shift)
        u = torch.stack([torch.rand((plan.tokens, plan.n_bits), generator=g, dtype=torch.float32)
                         for g in batch.generators]).to(plan.device)
        kept = u < r_k
    if plan.fixed is not None:
        fixed = _flat(plan, plan.fixed, rows).expand(-1, -1, plan.n_bits).contiguous()
        kept = kept | fixed
        batch["fixed"] = fixed
        batch["forced"] = torch.where(init.bool(), -1.0, 2.0)  # the sampling uniforms at fixed bits, every step
    batch["x"] = torch.where(kept, init, z)
    batch["kept"] = kept
    batch["fraction"] = kept.flatten(1).double().mean(1).tolist()


def _step(plan: _BitPlan, run: _BitRun, callback: Optional[Callable[[StepInfo], Any]],
          preview_fn: Optional[Callable[[torch.Tensor], Any]]) -> None:
    """Step ``i = run.step`` of every running row: logits, adaptive decision (at ``i = warmup``), fused step,
    report to the callback, and retirement of the rows that finished (or all of them, when stopped)."""
    batch, settings = run.batch, plan.settings
    guided = [settings.guidance != 1.0 and r >= settings.cfg_interval for r in batch["fraction"]]
    cond, uncond = _logits(plan, run, with_uncond=any(guided))
    adaptive = settings.adaptive
    if adaptive is not None and run.step == adaptive.warmup:
        decision = mean_bit_entropy(cond).tolist()
        check_finite_step(decision, run.step, settings.steps, batch.ids)
        decide_steps(batch, decision, adaptive, settings.steps)
    # Unconditional logits do not enter the entropy: one flag per row says whether they were all finite (a row's sum
    # is NaN/inf exactly when one of its logits is, for logits of any sane size; no temporary as large as the logits).
    uncond_bad = ~torch.isfinite(uncond.flatten(1).sum(1, dtype=torch.float32)) if uncond is not None else None
    out = _fused_step(plan, run, cond, uncond, guided)
    del cond, uncond  # the logits are a step's largest tensors: free them before the callback runs
    totals = planned_steps(batch, settings)
    entropy, bit_counts = _advance(plan, run, out, branches=2 if any(guided) else 1, total=max(totals),
                                   uncond_bad=uncond_bad)
    if callback is not None:
        info = _report(plan, run, out, entropy, guided, bit_counts, totals, preview_fn)
        if not call_callback(callback, info):
            run.interrupted = True
    run.step += 1
    batch.retire([run.interrupted or run.step >= total for total in totals], out.sample)


def _logits(plan: _BitPlan, run: _BitRun, with_uncond: bool) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """One refiner call on the running rows -> cond (and, when a row is guided, uncond) logits [R, T, D, 2].

    The refiner sees x_i as bits ``[R, D, t, h, w]`` and each row's realised kept fraction r_i as its step
    value. Without a guided row the unconditional branch is not computed at all. ``plan.branches`` decides where
    the branches run (this process, or one per rank).
    """
    batch = run.batch
    rows = len(batch)
    bits_in = batch["x"].view(rows, plan.t_gen, plan.h, plan.w, plan.n_bits).permute(0, 4, 1, 2, 3).contiguous()
    step_value = torch.tensor(batch["fraction"], dtype=torch.float32, device=plan.device)
    cond, uncond = plan.branches.logits(plan.refiner, bits_in, step_value, plan.branch_c.current(),
                                        plan.branch_u.current() if with_uncond else None,
                                        aspect_ratio=plan.aspect_ratio, first_frame_bits=batch.get("first"))
    batch.ledger.model_call(rows)
    expected = (rows, plan.t_gen, plan.h, plan.w, plan.n_bits, 2)
    if tuple(cond.shape) != expected or (with_uncond and (uncond is None or tuple(uncond.shape) != expected)):
        raise ValueError(f"refiner.step_logits returned {tuple(cond.shape)} / "
                         f"{None if uncond is None else tuple(uncond.shape)}; expected {expected}")
    flat = (rows, plan.tokens, plan.n_bits, 2)
    return cond.reshape(flat), (uncond.reshape(flat) if with_uncond else None)


def fused_step(*args, use_triton: bool = False, **kwargs) -> StepOutput:
    """The fused step as the Triton kernel (imported only when used: CUDA, or the interpreter in tests) or the
    torch reference; same arguments, same result."""
    if use_triton:
        from .triton_step import fused_step_triton
        return fused_step_triton(*args, **kwargs)
    return fused_step_reference(*args, **kwargs)


def _fused_step(plan: _BitPlan, run: _BitRun, cond: torch.Tensor, uncond: Optional[torch.Tensor],
                guided: List[bool]) -> StepOutput:
    """Per-row w, tau and r_{i+1}, this step's uniforms (sampling, keep) and the fused step (``step``)."""
    batch, settings, device = run.batch, plan.settings, plan.device
    warm = settings.adaptive.warmup if settings.adaptive is not None else None
    keep_prob = [bit_keep_fraction(run.step, settings.steps, plan.cap, settings.shift, warm, d)
                 for d in batch["remaining"]]
    weight = [settings.guidance if g else 1.0 for g in guided]
    tau = row_temperatures(batch, settings)
    uniforms = draw_uniforms(batch.generators, (plan.tokens, plan.n_bits), device)
    if "fixed" in batch:  # clamp fixed bits to the source through the uniforms (module docstring, "Editing")
        fixed = batch["fixed"]  # uniforms is this step's own fresh tensor: overwrite it in place
        uniforms[0] = torch.where(fixed, batch["forced"], uniforms[0])
        uniforms[1].masked_fill_(fixed, -1.0)
    args = (cond, uncond, torch.tensor(weight, device=device), torch.tensor(tau, device=device),
            uniforms[0], uniforms[1], batch["z"], torch.tensor(keep_prob, dtype=torch.float32, device=device),
            batch["kept"], batch["x"])
    try:
        return fused_step(*args, use_triton=run.use_triton)
    except Exception as exc:  # a GPU/driver the kernel cannot compile for: "auto" falls back once, loudly
        if not run.use_triton or settings.kernel != "auto":
            raise
        log.warning("Triton fused step failed (%s); using the torch reference for this run", exc)
        run.use_triton = False
        return fused_step(*args)


def _advance(plan: _BitPlan, run: _BitRun, out: StepOutput, branches: int, total: int,
             uncond_bad: Optional[torch.Tensor] = None) -> Tuple[List[float], torch.Tensor]:
    """Make the step the rows' state: x_{i+1}, its kept mask, and r_{i+1} = realised kept fraction (FILL + KEEP).

    One small device->host copy per step (entropy sums, bit state counts and, when guided, whether the
    unconditional logits were finite). Returns each row's mean entropy and the CPU ``[R, 4]`` bit state counts;
    raises :class:`NonFiniteLogitsError` (naming the step of ``total``, the longest planned run) before anything
    of a non-finite step is recorded.
    """
    batch = run.batch
    rows = len(batch)
    columns = [out.entropy_sum.view(rows, 1), out.state_counts.double()]
    if uncond_bad is not None:
        columns.append(uncond_bad.view(rows, 1).double())
    stats = torch.cat(columns, dim=1).cpu()
    n = float(plan.tokens * plan.n_bits)
    entropy = (stats[:, 0] / n).tolist()
    check_finite_step(entropy, run.step, total, batch.ids)
    if uncond_bad is not None:
        check_finite_step([math.nan if bad else 0.0 for bad in stats[:, 5].tolist()], run.step, total, batch.ids,
                          branch="unconditional")
        stats = stats[:, :5]
    batch["x"], batch["kept"] = out.mixed, out.kept
    batch["fraction"] = ((stats[:, 1] + stats[:, 2]) / n).tolist()
    batch.ledger.record(batch.ids, entropy, batch["fraction"], [branches] * rows)
    return entropy, stats[:, 1:]


def _report(plan: _BitPlan, run: _BitRun, out: StepOutput, entropy: List[float], guided: List[bool],
            bit_counts: torch.Tensor, totals: List[int],
            preview_fn: Optional[Callable[[torch.Tensor], Any]]) -> StepInfo:
    """The callback's ``StepInfo``; ``preview_fn`` sees the full sample ``[n, rounds*d, t_gen, h, w]`` when due."""
    batch = run.batch
    shape = (len(batch), plan.t_gen, plan.h, plan.w)
    preview = None
    if preview_fn is not None and preview_due(run.step, plan.settings.preview_every, totals):
        preview = preview_fn(out.sample.view(*shape, plan.n_bits).permute(0, 4, 1, 2, 3))
    return make_step_info(run.step, batch.ids, totals, entropy, batch["fraction"], guided, bit_counts,
                          out.token_states.view(shape), preview, batch.ledger.seconds())


def _finish(plan: _BitPlan, run: _BitRun) -> SamplingResult:
    """Every sample's last full sample as ``[B, rounds*d, t, h, w]`` (I2V: the given first frame prepended)."""
    ledger = run.batch.ledger
    n = len(plan.seeds)
    bits = torch.stack([ledger.finals[k] for k in range(n)])
    bits = bits.view(n, plan.t_gen, plan.h, plan.w, plan.n_bits).permute(0, 4, 1, 2, 3)
    if plan.first_frame_bits is not None:
        given = plan.first_frame_bits.to(device=plan.device, dtype=torch.uint8).expand(n, -1, -1, -1, -1)
        bits = torch.cat([given, bits], dim=2)
    return ledger.result(bits.contiguous(), run.interrupted)


def official_keep_fractions(steps: int, cap: float, shift: float = 1.0) -> Sequence[float]:
    """The scheduled ``r_1 .. r_steps`` of the fixed official loop (before realisation), for display/tests."""
    return [bit_keep_fraction(i, steps, cap, shift) for i in range(steps)]


__all__ = ["LocalBranches", "NonFiniteLogitsError", "check_finite_step", "check_seed_range", "sample_bits",
           "official_keep_fractions", "resolve_kernel", "model_device"]
