"""Sampler settings, their validation, and the per-family defaults (one place for all constants)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Optional, Tuple

KERNEL_CHOICES = ("auto", "triton", "torch")


@dataclass(frozen=True)
class AdaptiveSteps:
    """Entropy-guided ("complexity-aware") step count; ``max_steps`` is the settings' ``steps``.

    After ``warmup`` steps the mean entropy H of the conditional prediction decides the remaining
    ``D = round(clip(k*H + b, min_steps - warmup, steps - warmup))`` steps.
    """

    warmup: int
    k: float
    b: float
    min_steps: int
    calibrated: bool = False  # False: placeholder numbers, to be calibrated on the released weights


# The one place holding the adaptive-step constants of every family.
# C2I: the released ImageNet evaluation (wp 5, k 700, b -620, Tmin 20, Tmax 50).
# Bit models (T2I/T2V/I2V): the official loop never uses the rule (its demo passes k 0, b 50, i.e. always
# 50 steps); the numbers below are PLACEHOLDERS, TO BE CALIBRATED: D = 90*H clipped to [15, 45].
ADAPTIVE_DEFAULTS = {
    "c2i": AdaptiveSteps(warmup=5, k=700.0, b=-620.0, min_steps=20, calibrated=True),
    "t2i": AdaptiveSteps(warmup=5, k=90.0, b=0.0, min_steps=20, calibrated=False),
    "t2v": AdaptiveSteps(warmup=5, k=90.0, b=0.0, min_steps=20, calibrated=False),
    "i2v": AdaptiveSteps(warmup=5, k=90.0, b=0.0, min_steps=20, calibrated=False),
}


def _coerce_adaptive(obj) -> None:
    """Accept ``adaptive`` as a dict (from ``to_dict`` / JSON) and turn it back into ``AdaptiveSteps``."""
    if isinstance(obj.adaptive, dict):
        object.__setattr__(obj, "adaptive", AdaptiveSteps(**obj.adaptive))


def _check_common(steps: int, guidance: float, temperature: float, adaptive: Optional[AdaptiveSteps], kernel: str) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}; use steps=50 (the official default)")
    if not (isinstance(guidance, (int, float)) and guidance >= 0 and math.isfinite(guidance)):
        raise ValueError(f"guidance must be a finite number >= 0, got {guidance!r}; use 1.0 for no guidance or 3.0 (default)")
    if not (isinstance(temperature, (int, float)) and temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}; use 1.0 (default) or e.g. 1.1")
    if kernel not in KERNEL_CHOICES:
        raise ValueError(f"kernel must be one of {KERNEL_CHOICES}, got {kernel!r}")
    if adaptive is not None:
        a = adaptive
        if not (isinstance(a.warmup, int) and 0 <= a.warmup < a.min_steps <= steps):
            raise ValueError(
                f"adaptive steps need 0 <= warmup < min_steps <= steps, got warmup={a.warmup}, "
                f"min_steps={a.min_steps}, steps={steps}; raise steps or lower min_steps/warmup")
        if not (math.isfinite(a.k) and math.isfinite(a.b)):
            raise ValueError(f"adaptive k and b must be finite, got k={a.k}, b={a.b}")


@dataclass(frozen=True)
class SamplerSettings:
    """Settings of the T2I / T2V / I2V refinement loop.

    steps: iterations of the fixed schedule, and ``Tmax`` (schedule length, largest step count) when adaptive.
    guidance: ``w`` in ``u + w (c - u)``; 1 disables guidance (and the unconditional pass).
    temperature: ``tau``, logits are divided by it after guidance.
    shift: ``a`` of the schedule's progress shift (1 = none).
    cfg_interval: guidance only where the current kept fraction ``r_i >= cfg_interval``.
    cap: largest kept fraction; ``None`` = the refiner layout's (0.95 joint, 0.999 prefix).
    adaptive: ``AdaptiveSteps`` for entropy-guided step counts, ``None`` for the fixed schedule.
    adaptive_temperature: scale tau by the official ``clip((D-10)/40 + 0.5, 0.5, 1)`` after the decision.
    kernel: fused step implementation: "auto" (Triton on CUDA when importable), "triton", "torch".
    preview_every: call ``preview_fn`` every this many steps (and on the last one).
    """

    steps: int = 50
    guidance: float = 3.0
    temperature: float = 1.0
    shift: float = 1.0
    cfg_interval: float = 0.0
    cap: Optional[float] = None
    adaptive: Optional[AdaptiveSteps] = None
    adaptive_temperature: bool = False
    kernel: str = "auto"
    preview_every: int = 1

    def __post_init__(self) -> None:
        _coerce_adaptive(self)

    @classmethod
    def from_dict(cls, data: dict) -> "SamplerSettings":
        return cls(**data)

    @classmethod
    def for_task(cls, task: str, adaptive: bool = False, **overrides) -> "SamplerSettings":
        """Official defaults of a task ("t2i": w 3.0, tau 1.1; "t2v"/"i2v": w 3.0, tau 1.0; 50 steps)."""
        task = task.lower()
        if task not in TASK_DEFAULTS:
            raise ValueError(f"unknown task {task!r}; expected one of {sorted(TASK_DEFAULTS)}")
        base = dict(TASK_DEFAULTS[task])
        if adaptive:
            base["adaptive"] = ADAPTIVE_DEFAULTS[task]
        base.update(overrides)
        return cls(**base)

    def validate(self) -> "SamplerSettings":
        _check_common(self.steps, self.guidance, self.temperature, self.adaptive, self.kernel)
        if not (self.shift > 0 and math.isfinite(self.shift)):
            raise ValueError(f"shift must be a finite number > 0, got {self.shift!r}; use 1.0 for no shift")
        if not (0.0 <= self.cfg_interval <= 1.0):
            raise ValueError(f"cfg_interval must be in [0, 1], got {self.cfg_interval!r}; 0.0 guides every step")
        if self.cap is not None and not (0.0 < self.cap <= 1.0):
            raise ValueError(f"cap must be in (0, 1], got {self.cap!r}; leave it None to use the layout's")
        if not (isinstance(self.preview_every, int) and self.preview_every >= 1):
            raise ValueError(f"preview_every must be an integer >= 1, got {self.preview_every!r}")
        return self

    def to_dict(self) -> dict:
        return asdict(self)

    def replace(self, **changes) -> "SamplerSettings":
        return replace(self, **changes)


@dataclass(frozen=True)
class C2ISettings:
    """Settings of the class-to-image loop (defaults: released evaluation of GRN_ind_B).

    interval: guidance where ``low < t < high`` (``low == 0`` means no lower bound), t = current fraction.
    adaptive_temperature: the official complexity-aware rule scales tau by ``clip((D-10)/40+0.5, 0.5, 1)``.
    """

    steps: int = 50
    guidance: float = 2.35
    temperature: float = 1.31
    interval: Tuple[float, float] = (0.44, 1.0)
    adaptive: Optional[AdaptiveSteps] = None
    adaptive_temperature: bool = True
    preview_every: int = 1

    def __post_init__(self) -> None:
        _coerce_adaptive(self)
        object.__setattr__(self, "interval", tuple(self.interval))

    @classmethod
    def from_dict(cls, data: dict) -> "C2ISettings":
        return cls(**data)

    @classmethod
    def official_adaptive(cls, **overrides) -> "C2ISettings":
        """Released complexity-aware evaluation: wp 5, k 700, b -620, Tmin 20, Tmax 50."""
        return cls(**{"adaptive": ADAPTIVE_DEFAULTS["c2i"], **overrides})

    def validate(self) -> "C2ISettings":
        _check_common(self.steps, self.guidance, self.temperature, self.adaptive, "torch")
        low, high = self.interval
        if not (0.0 <= low <= high):
            raise ValueError(f"interval must satisfy 0 <= low <= high, got {self.interval!r}; use (0.0, 1.0) for always")
        if not (isinstance(self.preview_every, int) and self.preview_every >= 1):
            raise ValueError(f"preview_every must be an integer >= 1, got {self.preview_every!r}")
        return self

    def to_dict(self) -> dict:
        return asdict(self)


TASK_DEFAULTS = {
    "t2i": dict(steps=50, guidance=3.0, temperature=1.1),
    "t2v": dict(steps=50, guidance=3.0, temperature=1.0),
    "i2v": dict(steps=50, guidance=3.0, temperature=1.0),
}
