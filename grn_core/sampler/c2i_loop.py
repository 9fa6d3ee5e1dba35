"""The class-to-image refinement loop (GRN_ind, GRN spec §5) with seeds, adaptive steps and observability.

Per step i with the scheduled fraction ``t_i`` (``t_0 = 0``; the network sees the schedule value, as in
the official ``Denoiser.generate``):

    c = net(x_i, t_i, y)                        [R, K, d, h, w], K = 2**rounds classes per index label
    u = net(x_i, t_i, null)                      only for samples guided now: low < t_i < high (low 0: no bound)
    p = softmax((u + w (c - u)) / tau)           per label; c alone where unguided
    s ~ p (inverse CDF of one uniform per label)
    keep ~ Bernoulli(t_{i+1});  x_{i+1} = where(keep, s, Z)

``t_{i+1} = (i+1)/T`` (linear), or the official complexity-aware continuation after the warm-up
(``schedule.c2i_keep_fraction``), where tau is also scaled by ``clip((D-10)/40 + 0.5, 0.5, 1)`` when
``adaptive_temperature``. The unconditional pass runs only on the guided rows (the official code runs it
on every row at every step). Random numbers: as the bit loop (own generator per sample, seed + k; Z first,
then per step the sampling and keep uniforms); a finished sample leaves the batch (``running.RunningBatch``).

Code: ``sample_c2i`` = ``_validate`` -> ``_prepare`` (Z, x_0, t_0 as columns of the running batch) -> ``_step``
per step (``_cond_logits``, ``_probabilities``, ``_advance``, ``_record``, ``_report``, retirement) -> ``_finish``.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Sequence, Tuple, Union

import torch

from .bookkeeping import RunLedger, call_callback, draw_uniforms, make_step_info, sample_seeds
from .events import SamplingResult, StepInfo
from .loop import check_finite_step, check_seed_range, model_device
from .running import RunningBatch, decide_steps, planned_steps, preview_due, row_temperatures
from .schedule import c2i_keep_fraction
from .settings import C2ISettings
from .states import classify_states, count_states, plurality_states


def in_guidance_interval(t: float, interval: Tuple[float, float]) -> bool:
    """Official interval test: ``t < high and (low == 0 or t > low)``."""
    low, high = interval
    return t < high and (low == 0 or t > low)


def mean_class_entropy(logits: torch.Tensor) -> torch.Tensor:
    """[R] mean over labels of the entropy of softmax over dim 1 (K classes), divided by log K (float64)."""
    logp = torch.log_softmax(logits.float(), dim=1)
    h = -(logp.exp() * logp).sum(1) / math.log(logits.shape[1])
    return h.reshape(logits.shape[0], -1).double().mean(1)


def sample_categorical(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw over dim 1: probs [R, K, ...], u [R, ...] in [0, 1) -> int64 labels [R, ...]."""
    cdf = probs.cumsum(1)
    return (cdf[:, :-1] <= u.unsqueeze(1)).sum(1)  # the last class takes the rounding remainder


def _cfg(net: Any, *names: str) -> Any:
    config = getattr(net, "config", None)
    for name in names:
        if config is not None and hasattr(config, name):
            return getattr(config, name)
    return None


@dataclass(frozen=True)
class _C2IPlan:
    """What ``_validate`` fixed for the whole run: network, settings, labels and sizes of the label map."""

    net: Any
    settings: C2ISettings
    labels: torch.Tensor        # int64 [B] class per sample (CPU)
    null_label: int
    rounds: int
    latent_shape: Tuple[int, int, int]  # (d, h, w)
    seeds: List[int]
    device: torch.device

    @property
    def classes(self) -> int:
        return 2 ** int(self.rounds)          # K classes per index label

    @property
    def n_labels(self) -> float:
        d, h, w = self.latent_shape
        return float(d * h * w)


@dataclass
class _C2IRun:
    """A run in progress: the running rows and the index of the next step.

    Columns of ``batch``: ``z`` (Z), ``x`` (x_i) int64 ``[R, d, h, w]``, ``kept`` (bool mask of x_i's kept
    labels), ``y`` (class labels); lists ``t`` (the scheduled t_i the network sees) and ``remaining`` (D).
    """

    batch: RunningBatch
    step: int = 0
    interrupted: bool = False


@torch.no_grad()
def sample_c2i(
    net: Any,
    labels: Union[Sequence[int], torch.Tensor],
    *,
    seed: Optional[int] = 0,
    settings: Optional[C2ISettings] = None,
    latent_shape: Optional[Tuple[int, int, int]] = None,
    null_label: Optional[int] = None,
    rounds: Optional[int] = None,
    callback: Optional[Callable[[StepInfo], Any]] = None,
    preview_fn: Optional[Callable[[torch.Tensor], Any]] = None,
    device: Optional[torch.device] = None,
) -> SamplingResult:
    """Sample index-label maps for class labels with a GRN_ind network ``net(x, t, y) -> [B, K, d, h, w]``.

    Args:
        labels: one ImageNet class per sample (sample k uses seed ``seed + k``); ``null_label`` itself
            gives unconditional samples.
        latent_shape: ``(d, h, w)``; default from ``net.config`` (``latent_channels``, ``input_size``).
        null_label: the unconditional class; default ``net.config.num_classes``.
        rounds: HBQ rounds (K = 2**rounds); default ``net.config.rounds`` or 4.
        callback / preview_fn: as in ``loop.sample_bits``; ``preview_fn`` gets index labels [n, d, h, w].
    Returns:
        ``SamplingResult`` with ``bits`` = int64 index labels ``[B, d, h, w]``.
    """
    plan = _validate(net, labels, seed, settings, latent_shape, null_label, rounds, device)
    run = _prepare(plan)
    while run.batch:
        _step(plan, run, callback, preview_fn)
    return _finish(plan, run)


def _validate(net: Any, labels: Union[Sequence[int], torch.Tensor], seed: Optional[int],
              settings: Optional[C2ISettings], latent_shape: Optional[Tuple[int, int, int]],
              null_label: Optional[int], rounds: Optional[int], device: Optional[torch.device]) -> _C2IPlan:
    """Check every argument before any work (a bad input never costs a network call) and fix the run's sizes."""
    settings = (settings or C2ISettings()).validate()
    if latent_shape is None:
        d, side = _cfg(net, "latent_channels"), _cfg(net, "input_size")
        if d is None or side is None:
            raise ValueError("latent_shape is not given and net.config has no latent_channels/input_size; "
                             "pass latent_shape=(16, 16, 16) for the released ImageNet 256 model")
        latent_shape = (int(d), int(side), int(side))
    if len(tuple(latent_shape)) != 3 or any((not isinstance(v, int)) or v < 1 for v in latent_shape):
        raise ValueError(f"latent_shape must be three positive integers (d, h, w), got {latent_shape!r}")
    null_label = null_label if null_label is not None else _cfg(net, "num_classes")
    if null_label is None:
        raise ValueError("null_label is not given and net.config has no num_classes; pass null_label=1000 for ImageNet")
    rounds = rounds if rounds is not None else (_cfg(net, "rounds", "hbq_rounds") or 4)
    if isinstance(labels, torch.Tensor):
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise ValueError(f"labels has dtype {labels.dtype}; class labels are whole numbers (torch.long)")
    else:
        bad = [v for v in (labels if isinstance(labels, (list, tuple)) else [labels])
               if isinstance(v, bool) or not isinstance(v, numbers.Integral)]
        if bad:
            raise ValueError(f"class labels must be whole numbers, got {bad[0]!r}; pass ImageNet class indices")
    y_all = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
    if y_all.numel() < 1:
        raise ValueError("labels is empty; pass one class label per sample, e.g. [207]")
    if int(y_all.min()) < 0 or int(y_all.max()) > null_label:
        raise ValueError(f"class labels must be in [0, {null_label}] ({null_label} = unconditional), "
                         f"got {y_all.tolist()}")
    check_seed_range(seed)
    seeds = sample_seeds(seed, int(y_all.numel()))
    device = torch.device(device) if device is not None else model_device(net)
    return _C2IPlan(net=net, settings=settings, labels=y_all, null_label=null_label, rounds=rounds,
                    latent_shape=tuple(latent_shape), seeds=seeds, device=device)


def _prepare(plan: _C2IPlan) -> _C2IRun:
    """Draw Z (each sample from its own generator, before any uniform of a step) and set x_0 = Z, t_0 = 0."""
    batch = RunningBatch(RunLedger(plan.seeds))
    rows = len(batch)
    z = torch.stack([torch.randint(0, plan.classes, plan.latent_shape, generator=g, dtype=torch.long)
                     for g in batch.generators]).to(plan.device)
    batch["z"] = z
    batch["x"] = z.clone()                                   # x_0 = Z
    batch["kept"] = torch.zeros_like(z, dtype=torch.bool)    # nothing kept before step 0
    batch["y"] = plan.labels.to(plan.device)
    batch["t"] = [0.0] * rows                                # t_0 = 0
    batch["remaining"] = [None] * rows                       # D per row, once decided
    return _C2IRun(batch)


def _step(plan: _C2IPlan, run: _C2IRun, callback: Optional[Callable[[StepInfo], Any]],
          preview_fn: Optional[Callable[[torch.Tensor], Any]]) -> None:
    """Step ``i = run.step`` of every running row: conditional pass, adaptive decision (at ``i = warmup``),
    guided probabilities, sample and keep, report to the callback, and retirement of the rows that finished
    (or all of them, when stopped)."""
    batch, settings = run.batch, plan.settings
    t_in = torch.tensor(batch["t"], dtype=torch.float32, device=plan.device)
    cond = _cond_logits(plan, run, t_in)
    entropy_t = mean_class_entropy(cond)
    adaptive = settings.adaptive
    if adaptive is not None and run.step == adaptive.warmup:
        decision = entropy_t.tolist()
        check_finite_step(decision, run.step, settings.steps, batch.ids, what="class-to-image network")
        decide_steps(batch, decision, adaptive, settings.steps)
    guided = [settings.guidance != 1.0 and in_guidance_interval(t, settings.interval) for t in batch["t"]]
    probs = _probabilities(plan, run, cond, t_in, guided)
    del cond  # the logits are a step's largest tensors: free them before sampling
    # The unconditional pass's logits enter only the guided probabilities: a row's sum is NaN when one of them is.
    probs_bad = ~torch.isfinite(probs.flatten(1).sum(1, dtype=torch.float32)) if any(guided) else None
    sample, states = _advance(plan, run, probs)
    totals = planned_steps(batch, settings)
    entropy, fraction, label_counts = _record(plan, run, entropy_t, states, guided, max(totals), probs_bad)
    if callback is not None:
        info = _report(plan, run, sample, states, entropy, fraction, guided, label_counts, totals, preview_fn)
        if not call_callback(callback, info):
            run.interrupted = True
    run.step += 1
    batch.retire([run.interrupted or run.step >= total for total in totals], sample)


def _cond_logits(plan: _C2IPlan, run: _C2IRun, t_in: torch.Tensor) -> torch.Tensor:
    """``c = net(x_i, t_i, y)`` for the running rows: ``[R, K, d, h, w]`` logits."""
    batch = run.batch
    rows = len(batch)
    cond = plan.net(batch["x"], t_in, batch["y"])
    batch.ledger.model_call(rows)
    if tuple(cond.shape) != (rows, plan.classes, *plan.latent_shape):
        raise ValueError(f"net returned {tuple(cond.shape)}, expected {(rows, plan.classes, *plan.latent_shape)}; "
                         f"check rounds={plan.rounds} and latent_shape={plan.latent_shape}")
    return cond


def _probabilities(plan: _C2IPlan, run: _C2IRun, cond: torch.Tensor, t_in: torch.Tensor,
                   guided: List[bool]) -> torch.Tensor:
    """``p = softmax((u + w (c - u)) / tau)`` over the K classes (``c`` alone on unguided rows).

    The unconditional pass ``u = net(x_i, t_i, null)`` runs on the guided rows only.
    """
    batch, settings, device = run.batch, plan.settings, plan.device
    logits = cond.float()
    if any(guided):
        sub = torch.tensor([j for j, g in enumerate(guided) if g], dtype=torch.long, device=device)
        uncond = plan.net(batch["x"].index_select(0, sub), t_in.index_select(0, sub),
                          torch.full_like(sub, plan.null_label))
        batch.ledger.model_call(int(sub.numel()))
        c_sub, u_sub = logits.index_select(0, sub), uncond.float()
        logits = logits.index_copy(0, sub, u_sub + settings.guidance * (c_sub - u_sub))
    tau = torch.tensor(row_temperatures(batch, settings), device=device).view(len(batch), 1, 1, 1, 1)
    return torch.softmax(logits / tau, dim=1)


def _advance(plan: _C2IPlan, run: _C2IRun, probs: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``s ~ p`` (one uniform per label), ``keep ~ Bernoulli(t_{i+1})``, ``x_{i+1} = where(keep, s, Z)``.

    The rows then carry the scheduled ``t_{i+1}`` (what the official network sees next), not the realised
    fraction. Returns ``s`` and the state of every label (``states``).
    """
    batch, settings = run.batch, plan.settings
    rows = len(batch)
    uniforms = draw_uniforms(batch.generators, plan.latent_shape, plan.device)
    sample = sample_categorical(probs, uniforms[0])
    warm = settings.adaptive.warmup if settings.adaptive is not None else None
    t_next = [c2i_keep_fraction(run.step, settings.steps, warm, d) for d in batch["remaining"]]
    keep = uniforms[1] < torch.tensor(t_next, dtype=torch.float32, device=plan.device).view(rows, 1, 1, 1)
    x_next = torch.where(keep, sample, batch["z"])
    states = classify_states(batch["kept"], keep, x_next != batch["x"])
    batch["x"], batch["kept"], batch["t"] = x_next, keep, t_next
    return sample, states


def _record(plan: _C2IPlan, run: _C2IRun, entropy_t: torch.Tensor, states: torch.Tensor,
            guided: List[bool], total: int,
            probs_bad: Optional[torch.Tensor] = None) -> Tuple[List[float], List[float], torch.Tensor]:
    """Ledger entry of the step, from one device->host copy (mean entropy and label state counts per row).

    Returns each row's entropy, its realised kept fraction (FILL + KEEP) and the CPU ``[R, 4]`` counts.
    """
    batch = run.batch
    rows = len(batch)
    columns = [entropy_t.view(rows, 1), count_states(states, rows).double()]
    if probs_bad is not None:
        columns.append(probs_bad.view(rows, 1).double())
    stats = torch.cat(columns, dim=1).cpu()
    entropy = stats[:, 0].tolist()
    check_finite_step(entropy, run.step, total, batch.ids, what="class-to-image network")
    if probs_bad is not None:
        check_finite_step([math.nan if bad else 0.0 for bad in stats[:, 5].tolist()], run.step, total, batch.ids,
                          what="class-to-image network", branch="guided")
        stats = stats[:, :5]
    fraction = ((stats[:, 1] + stats[:, 2]) / plan.n_labels).tolist()
    batch.ledger.record(batch.ids, entropy, fraction, [2 if g else 1 for g in guided])
    return entropy, fraction, stats[:, 1:]


def _report(plan: _C2IPlan, run: _C2IRun, sample: torch.Tensor, states: torch.Tensor, entropy: List[float],
            fraction: List[float], guided: List[bool], label_counts: torch.Tensor, totals: List[int],
            preview_fn: Optional[Callable[[torch.Tensor], Any]]) -> StepInfo:
    """The callback's ``StepInfo`` (a token is a spatial position: plurality state over its d labels);
    ``preview_fn`` sees the full sample ``[n, d, h, w]`` when due."""
    batch = run.batch
    token_states, _ = plurality_states(states, dim=1)        # [R, h, w]
    preview = None
    if preview_fn is not None and preview_due(run.step, plan.settings.preview_every, totals):
        preview = preview_fn(sample)
    return make_step_info(run.step, batch.ids, totals, entropy, fraction, guided, label_counts,
                          token_states.unsqueeze(1), preview, batch.ledger.seconds())


def _finish(plan: _C2IPlan, run: _C2IRun) -> SamplingResult:
    """Every sample's last full sample: int64 index labels ``[B, d, h, w]``."""
    ledger = run.batch.ledger
    bits = torch.stack([ledger.finals[k] for k in range(len(plan.seeds))])
    return ledger.result(bits, run.interrupted)


__all__ = ["sample_c2i", "in_guidance_interval", "mean_class_entropy", "sample_categorical"]
