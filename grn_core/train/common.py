"""Pieces both training stages share: learning-rate schedule, weight averaging, seeds, progress logging."""

from __future__ import annotations

import copy
import logging
import math
import time

import torch
from torch import nn

log = logging.getLogger("grn_core.train")

# Offsets that give each random stream of a run its own seed (data of each stage, masks, initialisation).
STREAM_TOKENIZER_DATA = 1
STREAM_TOKENIZER_INIT = 2
STREAM_REFINER_VIDEO = 3
STREAM_REFINER_IMAGE = 4
STREAM_REFINER_INIT = 5
STREAM_REFINER_STEPS = 6
STREAM_PREVIEW = 7
STREAM_CALIBRATION = 8
STREAM_TOKENIZER_IMAGES = 9


def stream_seed(seed: int, stream: int) -> int:
    """A distinct, reproducible seed per (run seed, random stream)."""
    return (int(seed) * 1_000_003 + int(stream) * 7919) % (2**63)


def lr_at(step: int, total: int, peak: float, warmup: int, floor: float = 0.1) -> float:
    """Linear warm-up to ``peak`` over ``warmup`` steps, then cosine decay to ``floor * peak`` at ``total``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


class WeightAverage:
    """Exponential moving average of a model's weights (the shipped weights of the refiner).

    ``decay`` is warmed up as ``min(decay, (1 + n) / (10 + n))`` so early averages are not dominated by the random
    initialisation.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.updates = 0
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for avg, new in zip(self.model.parameters(), model.parameters()):
            avg.lerp_(new.detach(), 1 - d)


class Progress:
    """Running means of named values, logged every ``every`` steps as one line with steps/s."""

    def __init__(self, stage: str, total: int, every: int) -> None:
        self.stage, self.total, self.every = stage, total, every
        self.sums: dict[str, float] = {}
        self.count = 0
        self.started = time.perf_counter()
        self.window_start = self.started
        self.history: list[dict] = []

    def add(self, step: int, **values: float) -> None:
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v)
        self.count += 1
        if (step + 1) % self.every == 0 or step + 1 == self.total:
            now = time.perf_counter()
            means = {k: v / self.count for k, v in self.sums.items()}
            rate = self.count / max(now - self.window_start, 1e-9)
            entry = {"step": step + 1, **{k: round(v, 5) for k, v in means.items()},
                     "steps_per_s": round(rate, 3), "elapsed_s": round(now - self.started, 1)}
            self.history.append(entry)
            parts = " ".join(f"{k} {v:.4f}" for k, v in means.items())
            log.info("%s step %d/%d %s | %.2f steps/s | %.0f s", self.stage, step + 1, self.total, parts, rate,
                     now - self.started)
            self.sums, self.count, self.window_start = {}, 0, now

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    @property
    def last(self) -> dict:
        return self.history[-1] if self.history else {}
