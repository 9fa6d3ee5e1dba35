"""Calibrating the entropy-guided step count of the tiny model.

The adaptive sampler decides, after ``warmup`` steps, ``D = round(clip(k * H + b, min_steps - W, steps - W))``
remaining steps from the mean bit entropy ``H`` of the conditional prediction at that step. To calibrate (k, b):

1. run a calibration prompt set with every remaining-step count ``D`` of a ladder (``D_LADDER``), all other
   randomness equal (the first ``W`` steps, and so ``H``, are then identical across the ladder);
2. judge every result (``grn_core.data.judge``: colour, shape and direction all right);
3. split the samples into ``bins`` groups of equal size by ``H``; a group *needs* the smallest ``D`` whose accuracy
   is within ``tolerance`` of the best rung's accuracy for that group (single samples are too noisy to say how many
   steps they need: after the warm-up every rung draws different bits);
4. fit ``D_needed ~ k H + b`` through the groups by least squares with ``k >= 0``, then raise ``b`` until the line
   covers every group's need (too few steps cost accuracy, too many only time: the rule is an upper envelope).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Optional, Sequence

import torch

from ..pipeline import GRNModel
from ..sampler import AdaptiveSteps, SamplerSettings
from .evaluate import generate_batch, judge_frames

D_LADDER = (5, 10, 15, 25, 45)
WARMUP = 5
MIN_STEPS = 10
BINS = 4
TOLERANCE = 0.05


def ladder_settings(base: SamplerSettings, remaining: int) -> SamplerSettings:
    """Adaptive settings that always decide ``remaining`` steps after the warm-up (k = 0, b = remaining)."""
    rule = AdaptiveSteps(warmup=WARMUP, k=0.0, b=float(remaining), min_steps=WARMUP + 1, calibrated=False)
    return dataclasses.replace(base, adaptive=rule)


def fit_rule(entropy: Sequence[float], correct: dict[int, Sequence[bool]], bins: int = BINS,
             tolerance: float = TOLERANCE) -> tuple[float, float, dict]:
    """(k, b) from per-sample decision entropies and per-rung correctness (see the module docstring)."""
    h = torch.tensor(entropy, dtype=torch.float64)
    order = torch.argsort(h)
    groups = [g for g in torch.tensor_split(order, min(bins, len(order))) if len(g)]
    centers, needs, table = [], [], []
    for group in groups:
        rows = group.tolist()
        acc = {d: sum(bool(correct[d][i]) for i in rows) / len(rows) for d in sorted(correct)}
        best = max(acc.values())
        need = min(d for d, a in acc.items() if a >= best - tolerance)
        centers.append(float(h[group].mean()))
        needs.append(float(need))
        table.append({"entropy_mean": round(centers[-1], 5), "samples": len(rows), "needs": need,
                      "accuracy": {str(d): round(a, 3) for d, a in acc.items()}})
    x = torch.tensor(centers, dtype=torch.float64)
    y = torch.tensor(needs, dtype=torch.float64)
    k = 0.0
    if len(x) >= 2 and float(x.max() - x.min()) > 1e-9:
        xc = x - x.mean()
        k = max(0.0, float((xc * (y - y.mean())).sum() / xc.square().sum()))
    b = float(y.mean()) - k * float(x.mean())
    b = b + max(0.0, float((y - (k * x + b)).max()))  # cover every group's need
    return k, b, {"groups": table, "tolerance": tolerance}


def calibrate_adaptive(model: GRNModel, prompts: Sequence[str], seeds: Sequence[int], frames: int, height: int,
                       width: int, base: Optional[SamplerSettings] = None) -> dict:
    """Run the ladder for ``prompts`` x ``seeds`` and fit (k, b); returns the rule and the measurements."""
    base = base or SamplerSettings.for_task("t2v")
    started = time.perf_counter()
    correct: dict[int, list[bool]] = {}
    entropy: list[float] = []
    for remaining in D_LADDER:
        hits = []
        decision = []
        for seed in seeds:
            video, result = generate_batch(model, prompts, seed, ladder_settings(base, remaining), frames, height,
                                           width)
            hits += [judge_frames(video[i], p)["all"] for i, p in enumerate(prompts)]
            decision += list(result.decision_entropy)
        correct[remaining] = hits
        entropy = decision  # identical for every rung: the warm-up is shared
    k, b, stats = fit_rule(entropy, correct)
    rule = AdaptiveSteps(warmup=WARMUP, k=round(k, 2), b=round(b, 2), min_steps=MIN_STEPS, calibrated=True)
    return {
        "rule": dataclasses.asdict(rule),
        "fit": stats,
        "ladder": list(D_LADDER),
        "accuracy_by_remaining": {str(d): round(sum(v) / len(v), 4) for d, v in correct.items()},
        "samples": len(entropy),
        "entropy_range": [round(min(entropy), 4), round(max(entropy), 4)] if entropy else None,
        "mean_total_steps": round(mean_steps(dataclasses.asdict(rule), entropy), 2),
        "seconds": round(time.perf_counter() - started, 1),
    }


def mean_steps(rule: dict, entropies: Sequence[float], max_steps: int = 50) -> float:
    """Mean total steps the rule would take for these decision entropies (for reports)."""
    w, lo, hi = rule["warmup"], rule["min_steps"] - rule["warmup"], max_steps - rule["warmup"]
    return sum(w + int(round(min(max(rule["k"] * h + rule["b"], lo), hi))) for h in entropies) / max(1, len(entropies))


__all__ = ["D_LADDER", "calibrate_adaptive", "fit_rule", "ladder_settings", "mean_steps"]
