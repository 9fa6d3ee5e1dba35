"""Calibrating entropy-guided adaptive steps for any text-conditioned GRN: fit ``k`` and ``b`` on a prompt list.

    python -m grn_core calibrate --model tiny                               # the shapes captions, judged
    python -m grn_core calibrate --model t2v-2b --prompts prompts.txt --width 848 --height 480 --frames 33 \\
        --seeds 0 1 --out t2v_rule.json                                       # any model: likelihood score
    python -m grn_core generate --model t2v-2b --prompt "..." --adaptive --adaptive-rule t2v_rule.json

The adaptive sampler decides, after ``warmup`` steps, ``D = round(clip(k*H + b, min_steps - W, steps - W))``
remaining steps from the mean bit entropy ``H`` of the conditional prediction at that step. To fit (k, b):

1. every prompt x seed runs once per remaining-step count ``D`` of a ladder, all other randomness equal: the first
   ``W`` steps, and so ``H``, are identical on every rung (the rung only changes what happens after the decision);
2. every result gets a score, higher is better (``Scorer``): the shapes *judge* (colour, shape and direction all
   right: 1, else 0) for the built-in tiny model, or the *likelihood* for any model: the mean log-probability
   that the model's own conditional prediction, shown the finished sample at the schedule's end, gives that
   sample's bits (how settled the sample is by the model's standard; no external judge or download needed);
3. the samples are split into ``bins`` groups of equal size by ``H``; a group *needs* the smallest ``D`` whose mean
   score is close enough to its best rung's: within ``tolerance`` (absolute, for the judge's accuracy) or keeping
   ``1 - tolerance`` of the gain from the worst rung to the best (relative, for likelihoods whose scale is the
   model's). Single samples are too noisy to say how many steps they need: after the decision every rung draws
   different bits. For a 0/1 score even group means are noisy (one standard error is ~5 points at 60 samples), and
   the best of five noisy rungs is best partly by luck: with ``noise_z > 0`` a rung is also close enough when its
   shortfall is within ``noise_z`` standard errors of its paired per-sample difference to the best rung (the judge
   uses 1), so that the fit follows the quality/step curve rather than the luck of one rung;
4. ``D_needed ~ k*H + b`` is fitted through the groups by least squares with ``k >= 0`` (harder content never gets
   fewer steps), then ``b`` is raised until the line covers every group's need (too few steps cost quality, too
   many only time: the rule is an upper envelope);
5. with an ``overall_tolerance`` (the judge: 0.02), the whole prompt set is the last check: every sample is scored
   at the largest rung not above the rule's ``D`` for it (what the ladder measured, erring low), and ``b`` is
   raised until that mean is within ``overall_tolerance`` of the best rung's mean. Per-group needs find the slope;
   this bounds what the rule may cost on the prompt set as a whole.

The fit is printed as JSON (the rule, per-group needs and scores) and can be written to a file that
``generate --adaptive-rule`` reads; the nodes take the same ``k`` and ``b`` as numbers.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from .pipeline import GRNModel, decode_tokens, encode_prompt
from .sampler import AdaptiveSteps, SamplerSettings, layout_cap, sample_bits

__all__ = ["D_LADDER", "CalibrationRun", "Scorer", "calibrate", "fit_rule", "judge_scorer", "ladder_settings",
           "likelihood_scorer", "mean_steps", "read_rule", "rule_score", "run_ladder"]

D_LADDER = (5, 10, 15, 25, 45)
WARMUP = 5
MIN_STEPS = 10
BINS = 4


@dataclass(frozen=True)
class Scorer:
    """Per-sample quality of a finished batch, higher is better.

    ``score(model, prompts, result)`` gets the prompts of the batch and the :class:`SamplingResult` and returns one
    float per sample. ``tolerance`` is in score units when ``relative`` is False, else a fraction of the gain.
    """

    name: str
    score: Callable[[GRNModel, Sequence[str], object, "CalibrationInputs"], list[float]]
    tolerance: float
    relative: bool
    noise_z: float = 0.0
    overall_tolerance: Optional[float] = None


@dataclass(frozen=True)
class CalibrationInputs:
    """What a scorer may need besides the result: the conditional features and the request's shape."""

    cond: list[torch.Tensor]
    aspect_ratio: float
    cap: float


def _judge_score(model: GRNModel, prompts: Sequence[str], result, inputs: CalibrationInputs) -> list[float]:
    from .data.judge import judge

    frames = decode_tokens(model, result.bits)  # [B, T, H, W, 3] in [0, 1]
    scores = []
    for video, prompt in zip(frames, prompts):
        verdict = judge(video.permute(3, 0, 1, 2) * 2 - 1).matches(prompt)
        scores.append(float(verdict["all"]))
    return scores


def _likelihood_score(model: GRNModel, prompts: Sequence[str], result, inputs: CalibrationInputs) -> list[float]:
    bits = result.bits
    with torch.inference_mode():
        cond, _ = model.refiner.step_logits(bits, inputs.cap, inputs.cond, None, aspect_ratio=inputs.aspect_ratio)
    logp = torch.log_softmax(cond.float(), dim=-1)  # [B, t, h, w, bits, 2]
    labels = bits.permute(0, 2, 3, 4, 1).long().to(logp.device)  # [B, t, h, w, bits]
    picked = logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    return [float(v) for v in picked.flatten(1).mean(1)]


judge_scorer = Scorer("judge", _judge_score, tolerance=0.05, relative=False, noise_z=1.0,
                      overall_tolerance=0.02)
likelihood_scorer = Scorer("likelihood", _likelihood_score, tolerance=0.1, relative=True)


def ladder_settings(base: SamplerSettings, remaining: int, warmup: int = WARMUP) -> SamplerSettings:
    """Adaptive settings that always decide ``remaining`` steps after the warm-up (k = 0, b = remaining)."""
    rule = AdaptiveSteps(warmup=warmup, k=0.0, b=float(remaining), min_steps=warmup + 1, calibrated=False)
    return dataclasses.replace(base, adaptive=rule)


@dataclass
class CalibrationRun:
    """Measurements of a ladder run: decision entropy per sample and the score per rung and sample."""

    entropy: list[float]
    scores: dict[int, list[float]]
    prompts: list[str]
    seeds: list[int]
    seconds: float


def run_ladder(model: GRNModel, prompts: Sequence[str], seeds: Sequence[int], *, width: int, height: int,
               frames: int, task: str = "t2v", scorer: Scorer = likelihood_scorer,
               base: Optional[SamplerSettings] = None, ladder: Sequence[int] = D_LADDER, warmup: int = WARMUP,
               text_encoder=None, batch_size: int = 8,
               progress: Optional[Callable[[int, int], None]] = None) -> CalibrationRun:
    """Generate every prompt x seed on every rung of ``ladder`` and score the results."""
    if not prompts:
        raise ValueError("calibration needs prompts: pass a list (or a file with one prompt per line).")
    if not seeds:
        raise ValueError("calibration needs at least one seed.")
    base = base or SamplerSettings.for_task(task)
    if max(ladder) + warmup > base.steps:
        raise ValueError(f"the ladder reaches {warmup} + {max(ladder)} steps but steps={base.steps}; raise steps or "
                         f"shorten the ladder.")
    started = time.perf_counter()
    guided = base.guidance != 1.0
    feats = [encode_prompt(model, text_encoder, p, task=task, need_uncond=guided) for p in prompts]
    sf, tf = model.spatial_factor, model.temporal_factor
    if width % sf or height % sf or (frames - 1) % tf:
        raise ValueError(f"calibration size {width}x{height}x{frames}: sides must be multiples of {sf} and frames "
                         f"1 + {tf}k for this tokenizer.")
    grid = (1 + (frames - 1) // tf, height // sf, width // sf)
    cap = base.cap if base.cap is not None else layout_cap(model.layout)
    aspect = height / width
    scores: dict[int, list[float]] = {d: [] for d in ladder}
    entropy: list[float] = []
    chunks = [list(range(i, min(i + batch_size, len(prompts)))) for i in range(0, len(prompts), batch_size)]
    total, done = len(ladder) * len(seeds) * len(chunks), 0
    for seed in seeds:
        for chunk in chunks:
            cond = [feats[i].cond for i in chunk]
            uncond = feats[chunk[0]].uncond if guided else None
            inputs = CalibrationInputs(cond, aspect, cap)
            for rung, remaining in enumerate(ladder):
                # Sample k of a batch uses seed + k: prompt i of seed s gets the stream s * len(prompts) + i.
                with model.stage(model.refiner), torch.inference_mode():
                    result = sample_bits(model.refiner, cond, uncond, grid=grid, batch_size=len(chunk),
                                         seed=seed * len(prompts) + chunk[0],
                                         settings=ladder_settings(base, remaining, warmup), aspect_ratio=aspect)
                with model.stage(model.refiner):
                    scores[remaining] += scorer.score(model, [prompts[i] for i in chunk], result, inputs)
                decided = [float(h) for h in result.decision_entropy]
                if rung == 0:
                    entropy += decided
                    first = decided
                elif max(abs(a - b) for a, b in zip(first, decided)) > 1e-4:
                    # The rungs must share their warm-up; otherwise H would not describe the samples compared.
                    raise RuntimeError(f"the warm-up of rung D={remaining} diverged from rung D={ladder[0]} "
                                       f"(decision entropies {decided} vs {first}); the sampler is not seeded "
                                       f"deterministically on this device.")
                done += 1
                if progress is not None:
                    progress(done, total)
    return CalibrationRun(entropy, scores, list(prompts), list(seeds), round(time.perf_counter() - started, 1))


def _paired_standard_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """Standard error of ``mean(a - b)`` for paired samples (0 for fewer than two)."""
    diff = a - b
    return float(diff.std(unbiased=True) / len(diff) ** 0.5) if len(diff) > 1 else 0.0


def fit_rule(entropy: Sequence[float], scores: dict[int, Sequence[float]], bins: int = BINS,
             tolerance: float = 0.05, relative: bool = False, noise_z: float = 0.0) -> tuple[float, float, dict]:
    """(k, b) from per-sample decision entropies and per-rung scores (see the module docstring)."""
    if not entropy or any(len(v) != len(entropy) for v in scores.values()):
        raise ValueError("fit_rule needs one score per sample on every rung, and at least one sample.")
    if noise_z < 0:
        raise ValueError(f"noise_z={noise_z}: use 0 (no noise allowance) or a positive number of standard errors.")
    h = torch.tensor(entropy, dtype=torch.float64)
    table_scores = {d: torch.tensor([float(v) for v in scores[d]], dtype=torch.float64) for d in sorted(scores)}
    order = torch.argsort(h)
    groups = [g for g in torch.tensor_split(order, min(bins, len(order))) if len(g)]
    centers, needs, table = [], [], []
    for group in groups:
        rows = group.tolist()
        per_rung = {d: table_scores[d][group] for d in table_scores}
        mean = {d: float(v.mean()) for d, v in per_rung.items()}
        best_rung = max(mean, key=lambda d: (mean[d], d))
        best, worst = mean[best_rung], min(mean.values())
        floor = best - tolerance * (best - worst) if relative else best - tolerance
        need = min(d for d, s in mean.items()
                   if s >= floor - noise_z * _paired_standard_error(per_rung[d], per_rung[best_rung]))
        centers.append(float(h[group].mean()))
        needs.append(float(need))
        table.append({"entropy_mean": round(centers[-1], 5), "samples": len(rows), "needs": need,
                      "score": {str(d): round(s, 4) for d, s in mean.items()}})
    x = torch.tensor(centers, dtype=torch.float64)
    y = torch.tensor(needs, dtype=torch.float64)
    k = 0.0
    if len(x) >= 2 and float(x.max() - x.min()) > 1e-9:
        xc = x - x.mean()
        k = max(0.0, float((xc * (y - y.mean())).sum() / xc.square().sum()))
    b = float(y.mean()) - k * float(x.mean())
    b = b + max(0.0, float((y - (k * x + b)).max()))  # cover every group's need
    return k, b, {"groups": table, "tolerance": tolerance, "relative": relative, "noise_z": noise_z}


def _remaining(rule: AdaptiveSteps, entropy: float, max_steps: int) -> int:
    lo, hi = rule.min_steps - rule.warmup, max_steps - rule.warmup
    return int(round(min(max(rule.k * entropy + rule.b, lo), hi)))


def mean_steps(rule: AdaptiveSteps, entropies: Sequence[float], max_steps: int = 50) -> float:
    """Mean total steps the rule takes for these decision entropies."""
    total = sum(rule.warmup + _remaining(rule, h, max_steps) for h in entropies)
    return total / max(1, len(entropies))


def rule_score(rule: AdaptiveSteps, entropy: Sequence[float], scores: dict[int, Sequence[float]],
               max_steps: int = 50) -> float:
    """Mean score of the ladder's samples under ``rule``: each at the largest rung not above its ``D`` (the
    smallest rung when ``D`` is below all of them)."""
    ladder = sorted(scores)
    total = 0.0
    for i, h in enumerate(entropy):
        d = _remaining(rule, h, max_steps)
        rung = max((r for r in ladder if r <= d), default=ladder[0])
        total += float(scores[rung][i])
    return total / max(1, len(entropy))


def _guard_overall(rule: AdaptiveSteps, run: CalibrationRun, tolerance: float, max_steps: int) -> AdaptiveSteps:
    """Raise ``b`` (in steps of 1) until the rule's prompt-set score is within ``tolerance`` of the best rung's."""
    best = max(sum(float(v) for v in run.scores[d]) / len(run.entropy) for d in run.scores)
    top = max_steps - rule.warmup
    while rule_score(rule, run.entropy, run.scores, max_steps) < best - tolerance - 1e-12:
        if rule.k * min(run.entropy) + rule.b >= top:
            break  # every sample already runs the longest schedule
        rule = dataclasses.replace(rule, b=float(int(rule.b) + 1))
    return rule


def calibrate(run: CalibrationRun, scorer: Scorer, warmup: int = WARMUP, min_steps: int = MIN_STEPS,
              max_steps: int = 50, bins: int = BINS, tolerance: Optional[float] = None,
              noise_z: Optional[float] = None) -> dict:
    """Fit the rule to a ladder run; returns the rule (as ``AdaptiveSteps`` fields) and the measurements."""
    tol = scorer.tolerance if tolerance is None else tolerance
    z = scorer.noise_z if noise_z is None else noise_z
    k, b, stats = fit_rule(run.entropy, run.scores, bins, tol, scorer.relative, z)
    rule = AdaptiveSteps(warmup=warmup, k=round(k, 2), b=round(b, 2), min_steps=min_steps, calibrated=True)
    fitted_b = rule.b
    if scorer.overall_tolerance is not None:
        rule = _guard_overall(rule, run, scorer.overall_tolerance, max_steps)
    stats = {**stats, "b_from_groups": fitted_b, "overall_tolerance": scorer.overall_tolerance,
             "rule_score": round(rule_score(rule, run.entropy, run.scores, max_steps), 4)}
    return {
        "rule": dataclasses.asdict(rule),
        "scorer": scorer.name,
        "fit": stats,
        "ladder": sorted(run.scores),
        "score_by_remaining": {str(d): round(sum(v) / len(v), 4) for d, v in sorted(run.scores.items())},
        "samples": len(run.entropy),
        "prompts": len(run.prompts),
        "seeds": run.seeds,
        "entropy_range": [round(min(run.entropy), 4), round(max(run.entropy), 4)],
        "mean_total_steps": round(mean_steps(rule, run.entropy, max_steps), 2),
        "seconds": run.seconds,
    }


def _finite(value: float) -> bool:
    try:
        return math.isfinite(float(value))
    except OverflowError:  # an int too large for a float
        return False


def read_rule(path: str | Path) -> AdaptiveSteps:
    """The rule from a file written by ``calibrate --out`` (the whole report, or just its ``rule``)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as error:
        raise ValueError(f"--adaptive-rule {path}: not a readable JSON file ({error}); write one with "
                         f"`python -m grn_core calibrate --out {path.name}`.") from error
    data = data.get("rule", data) if isinstance(data, dict) else data
    fields = {f.name for f in dataclasses.fields(AdaptiveSteps)}
    if not isinstance(data, dict) or not {"warmup", "k", "b", "min_steps"} <= set(data) or set(data) - fields:
        raise ValueError(f"--adaptive-rule {path}: expected a JSON object with warmup, k, b and min_steps (as "
                         f"`python -m grn_core calibrate --out` writes), got {str(data)[:120]}.")
    fix = f"write the rule with `python -m grn_core calibrate --out {path.name}`, or correct the file by hand"
    for name in ("warmup", "min_steps"):
        value = data[name]
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"--adaptive-rule {path}: {name} is {value!r}, not a whole number; {fix}.")
    for name in ("k", "b"):
        value = data[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not _finite(value):
            raise ValueError(f"--adaptive-rule {path}: {name} is {str(value)[:40]}, not a finite number; {fix}.")
    if "calibrated" in data and not isinstance(data["calibrated"], bool):
        raise ValueError(f"--adaptive-rule {path}: calibrated is {data['calibrated']!r}, not true/false; {fix}.")
    if not 0 <= data["warmup"] < data["min_steps"]:
        raise ValueError(f"--adaptive-rule {path}: needs 0 <= warmup < min_steps, got warmup={data['warmup']}, "
                         f"min_steps={data['min_steps']}; {fix}.")
    return AdaptiveSteps(**{**data, "k": float(data["k"]), "b": float(data["b"])})
