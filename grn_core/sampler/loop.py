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
  the batch (its rows are sliced out, so later calls pass fewer rows to the refiner).
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Optional, Sequence, Tuple

import torch

from .bookkeeping import RunLedger, call_callback, draw_uniforms, make_generators, sample_seeds
from .events import SamplingResult, StepInfo
from .schedule import (adaptive_temperature_factor, bit_keep_fraction, decide_remaining_steps, layout_cap)
from .settings import SamplerSettings
from .states import StateCounts, count_states, downsample_state_map
from .step import fused_step, mean_bit_entropy

log = logging.getLogger(__name__)

TextArg = Any  # features [L, C], a list of B of them, or an object from refiner.prepare_text(...)


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
    Returns:
        ``SamplingResult`` with ``bits`` uint8 ``[B, rounds*d, t, h, w]`` (I2V: given frame first).
    """
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
    t_gen = t_all - (1 if first_frame_bits is not None else 0)
    shrinks = settings.adaptive is not None
    branch_c = TextBranch(refiner, "text_cond", text_cond, batch_size, text_channels, shrinks)
    branch_u = None
    if text_uncond is not None:
        branch_u = TextBranch(refiner, "text_uncond", text_uncond, batch_size, text_channels, shrinks)
    elif settings.guidance != 1.0:
        raise ValueError(f"guidance={settings.guidance} needs text_uncond (negative-prompt features; the official "
                         "loop encodes the empty prompt ''); pass it or set guidance=1.0")
    if aspect_ratio is None:
        aspect_ratio = h / w
    seeds = sample_seeds(seed, batch_size)
    device = torch.device(device) if device is not None else model_device(refiner)
    use_triton = resolve_kernel(settings.kernel, device)

    # ---- everything validated: start the run ----
    tokens = t_gen * h * w
    ledger = RunLedger(seeds)
    ids = list(range(batch_size))
    gens = make_generators(seeds)
    z = torch.stack([torch.randint(0, 2, (tokens, n_bits), generator=g, dtype=torch.uint8) for g in gens]).to(device)
    x = z.clone()                                              # x_0 = Z
    kept = torch.zeros_like(z, dtype=torch.bool)
    fraction = [0.0] * batch_size                              # r_0 = 0
    remaining: list = [None] * batch_size                      # D per running sample, once decided
    first = None
    if first_frame_bits is not None:
        first = first_frame_bits.to(device=device, dtype=torch.uint8).expand(batch_size, -1, -1, -1, -1)
    adaptive = settings.adaptive
    interrupted = False
    sample = z

    step = 0
    while ids:
        rows = len(ids)
        guided = [settings.guidance != 1.0 and fraction[j] >= settings.cfg_interval for j in range(rows)]
        with_uncond = any(guided)
        bits_in = x.view(rows, t_gen, h, w, n_bits).permute(0, 4, 1, 2, 3).contiguous()
        step_value = torch.tensor(fraction, dtype=torch.float32, device=device)
        cond, uncond = refiner.step_logits(bits_in, step_value, branch_c.current(),
                                           branch_u.current() if with_uncond else None,
                                           aspect_ratio=aspect_ratio, first_frame_bits=first)
        ledger.model_call(rows)
        expected = (rows, t_gen, h, w, n_bits, 2)
        if tuple(cond.shape) != expected or (with_uncond and (uncond is None or tuple(uncond.shape) != expected)):
            raise ValueError(f"refiner.step_logits returned {tuple(cond.shape)} / "
                             f"{None if uncond is None else tuple(uncond.shape)}; expected {expected}")
        cond = cond.reshape(rows, tokens, n_bits, 2)
        uncond = uncond.reshape(rows, tokens, n_bits, 2) if with_uncond else None

        if adaptive is not None and step == adaptive.warmup:
            entropy_now = mean_bit_entropy(cond).tolist()
            for j, k in enumerate(ids):
                remaining[j] = decide_remaining_steps(entropy_now[j], adaptive.k, adaptive.b, adaptive.warmup,
                                                      adaptive.min_steps, settings.steps)
                ledger.decision_entropy[k], ledger.remaining[k] = entropy_now[j], remaining[j]

        warm = adaptive.warmup if adaptive is not None else None
        keep_prob = [bit_keep_fraction(step, settings.steps, cap, settings.shift, warm, remaining[j]) for j in range(rows)]
        tau = [settings.temperature * (adaptive_temperature_factor(remaining[j])
                                       if settings.adaptive_temperature and remaining[j] is not None else 1.0)
               for j in range(rows)]
        weight = [settings.guidance if guided[j] else 1.0 for j in range(rows)]
        uniforms = draw_uniforms(gens, (tokens, n_bits), device)
        step_args = (cond, uncond, torch.tensor(weight, device=device), torch.tensor(tau, device=device),
                     uniforms[0], uniforms[1], z, torch.tensor(keep_prob, dtype=torch.float32, device=device), kept, x)
        try:
            out = fused_step(*step_args, use_triton=use_triton)
        except Exception as exc:  # a GPU/driver the kernel cannot compile for: "auto" falls back once, loudly
            if not use_triton or settings.kernel != "auto":
                raise
            log.warning("Triton fused step failed (%s); using the torch reference for this run", exc)
            use_triton = False
            out = fused_step(*step_args)
        del step_args
        del cond, uncond, uniforms
        sample, x, kept = out.sample, out.mixed, out.kept

        # one small device->host copy per step: entropy sums and bit state counts
        stats = torch.cat([out.entropy_sum.view(rows, 1), out.state_counts.double()], dim=1).cpu()
        n = float(tokens * n_bits)
        entropy = (stats[:, 0] / n).tolist()
        fraction = ((stats[:, 1] + stats[:, 2]) / n).tolist()   # kept = FILL + KEEP
        ledger.record(ids, entropy, fraction, [2 if with_uncond else 1] * rows)
        totals = [settings.steps if remaining[j] is None else adaptive.warmup + remaining[j] for j in range(rows)]

        if callback is not None:
            preview = None
            last = any(step + 1 >= tot for tot in totals)
            if preview_fn is not None and (step % settings.preview_every == 0 or last):
                preview = preview_fn(sample.view(rows, t_gen, h, w, n_bits).permute(0, 4, 1, 2, 3))
            info = StepInfo(
                step=step, total_steps=max(totals), sample_ids=tuple(ids), total_steps_per_sample=tuple(totals),
                entropy=tuple(entropy), kept_fraction=tuple(fraction), guided=tuple(guided),
                bit_counts=tuple(StateCounts.from_row(r[1:]) for r in stats.long().tolist()),
                token_counts=tuple(StateCounts.from_row(r) for r in count_states(out.token_states, rows).tolist()),
                token_states=downsample_state_map(out.token_states.view(rows, t_gen, h, w)),
                preview=preview, seconds=ledger.seconds(),
            )
            if not call_callback(callback, info):
                interrupted = True
        del out

        step += 1
        done = [j for j in range(rows) if interrupted or step >= totals[j]]
        for j in done:
            ledger.finals[ids[j]] = sample[j].clone()  # own copy: frees the batch tensor later
        if done:
            stay = [j for j in range(rows) if j not in done]
            index = torch.tensor(stay, dtype=torch.long, device=device)
            ids = [ids[j] for j in stay]
            gens = [gens[j] for j in stay]
            fraction = [fraction[j] for j in stay]
            remaining = [remaining[j] for j in stay]
            if stay:
                z, x, kept, sample = (v.index_select(0, index) for v in (z, x, kept, sample))
                for branch in (branch_c, branch_u):
                    if branch is not None:
                        branch.keep_rows(stay)
                if first is not None:
                    first = first.index_select(0, index)

    bits = torch.stack([ledger.finals[k] for k in range(batch_size)])
    bits = bits.view(batch_size, t_gen, h, w, n_bits).permute(0, 4, 1, 2, 3)
    if first_frame_bits is not None:
        given = first_frame_bits.to(device=device, dtype=torch.uint8).expand(batch_size, -1, -1, -1, -1)
        bits = torch.cat([given, bits], dim=2)
    return ledger.result(bits.contiguous(), interrupted)


def official_keep_fractions(steps: int, cap: float, shift: float = 1.0) -> Sequence[float]:
    """The scheduled ``r_1 .. r_steps`` of the fixed official loop (before realisation), for display/tests."""
    return [bit_keep_fraction(i, steps, cap, shift) for i in range(steps)]


__all__ = ["sample_bits", "official_keep_fractions", "resolve_kernel", "model_device"]
