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
on every row at every step). Random numbers: as the bit loop (own generator per sample, seed + k).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional, Sequence, Tuple, Union

import torch

from .bookkeeping import RunLedger, call_callback, draw_uniforms, make_generators, sample_seeds
from .events import SamplingResult, StepInfo
from .loop import model_device
from .schedule import adaptive_temperature_factor, c2i_keep_fraction, decide_remaining_steps
from .settings import C2ISettings
from .states import StateCounts, classify_states, count_states, downsample_state_map, plurality_states


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
    classes = 2 ** int(rounds)
    y_all = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
    batch_size = int(y_all.numel())
    if batch_size < 1:
        raise ValueError("labels is empty; pass one class label per sample, e.g. [207]")
    if int(y_all.min()) < 0 or int(y_all.max()) > null_label:
        raise ValueError(f"class labels must be in [0, {null_label}] ({null_label} = unconditional), "
                         f"got {y_all.tolist()}")
    seeds = sample_seeds(seed, batch_size)
    device = torch.device(device) if device is not None else model_device(net)

    # ---- everything validated: start the run ----
    d, h, w = latent_shape
    ledger = RunLedger(seeds)
    ids = list(range(batch_size))
    gens = make_generators(seeds)
    z = torch.stack([torch.randint(0, classes, (d, h, w), generator=g, dtype=torch.long) for g in gens]).to(device)
    x = z.clone()
    kept = torch.zeros_like(z, dtype=torch.bool)
    y = y_all.to(device)
    t_now = [0.0] * batch_size
    remaining: list = [None] * batch_size
    adaptive = settings.adaptive
    warm = adaptive.warmup if adaptive is not None else None
    interrupted = False
    n_labels = float(d * h * w)

    step = 0
    while ids:
        rows = len(ids)
        t_in = torch.tensor(t_now, dtype=torch.float32, device=device)
        cond = net(x, t_in, y)
        ledger.model_call(rows)
        if tuple(cond.shape) != (rows, classes, d, h, w):
            raise ValueError(f"net returned {tuple(cond.shape)}, expected {(rows, classes, d, h, w)}; "
                             f"check rounds={rounds} and latent_shape={latent_shape}")
        entropy_t = mean_class_entropy(cond)
        if adaptive is not None and step == adaptive.warmup:
            for j, k in enumerate(ids):
                remaining[j] = decide_remaining_steps(float(entropy_t[j]), adaptive.k, adaptive.b, adaptive.warmup,
                                                      adaptive.min_steps, settings.steps)
                ledger.decision_entropy[k], ledger.remaining[k] = float(entropy_t[j]), remaining[j]

        guided = [settings.guidance != 1.0 and in_guidance_interval(t_now[j], settings.interval) for j in range(rows)]
        logits = cond.float()
        if any(guided):
            sub = torch.tensor([j for j in range(rows) if guided[j]], dtype=torch.long, device=device)
            uncond = net(x.index_select(0, sub), t_in.index_select(0, sub), torch.full_like(sub, null_label))
            ledger.model_call(int(sub.numel()))
            c_sub, u_sub = logits.index_select(0, sub), uncond.float()
            logits = logits.index_copy(0, sub, u_sub + settings.guidance * (c_sub - u_sub))
            del uncond
        tau = [settings.temperature * (adaptive_temperature_factor(remaining[j])
                                       if settings.adaptive_temperature and remaining[j] is not None else 1.0)
               for j in range(rows)]
        probs = torch.softmax(logits / torch.tensor(tau, device=device).view(rows, 1, 1, 1, 1), dim=1)
        del cond, logits

        uniforms = draw_uniforms(gens, (d, h, w), device)
        sample = sample_categorical(probs, uniforms[0])
        t_next = [c2i_keep_fraction(step, settings.steps, warm, remaining[j]) for j in range(rows)]
        keep = uniforms[1] < torch.tensor(t_next, dtype=torch.float32, device=device).view(rows, 1, 1, 1)
        new_x = torch.where(keep, sample, z)
        states = classify_states(kept, keep, new_x != x)
        x, kept, t_now = new_x, keep, t_next

        bit_counts = count_states(states, rows)
        stats = torch.cat([entropy_t.view(rows, 1), bit_counts.double()], dim=1).cpu()
        entropy = stats[:, 0].tolist()
        fraction = ((stats[:, 1] + stats[:, 2]) / n_labels).tolist()
        ledger.record(ids, entropy, fraction, [2 if g else 1 for g in guided])
        totals = [settings.steps if remaining[j] is None else adaptive.warmup + remaining[j] for j in range(rows)]

        if callback is not None:
            token_states, _ = plurality_states(states, dim=1)        # [R, h, w]: plurality over the d labels
            preview = None
            last = any(step + 1 >= tot for tot in totals)
            if preview_fn is not None and (step % settings.preview_every == 0 or last):
                preview = preview_fn(sample)
            info = StepInfo(
                step=step, total_steps=max(totals), sample_ids=tuple(ids), total_steps_per_sample=tuple(totals),
                entropy=tuple(entropy), kept_fraction=tuple(fraction), guided=tuple(guided),
                bit_counts=tuple(StateCounts.from_row(r[1:]) for r in stats.long().tolist()),
                token_counts=tuple(StateCounts.from_row(r) for r in count_states(token_states, rows).tolist()),
                token_states=downsample_state_map(token_states.unsqueeze(1)),
                preview=preview, seconds=ledger.seconds(),
            )
            if not call_callback(callback, info):
                interrupted = True

        step += 1
        done = [j for j in range(rows) if interrupted or step >= totals[j]]
        for j in done:
            ledger.finals[ids[j]] = sample[j].clone()  # own copy: frees the batch tensor later
        if done:
            stay = [j for j in range(rows) if j not in done]
            index = torch.tensor(stay, dtype=torch.long, device=device)
            ids = [ids[j] for j in stay]
            gens = [gens[j] for j in stay]
            t_now = [t_now[j] for j in stay]
            remaining = [remaining[j] for j in stay]
            if stay:
                z, x, kept, y = (v.index_select(0, index) for v in (z, x, kept, y))

    bits = torch.stack([ledger.finals[k] for k in range(batch_size)])
    return ledger.result(bits, interrupted)


__all__ = ["sample_c2i", "in_guidance_interval", "mean_class_entropy", "sample_categorical"]
