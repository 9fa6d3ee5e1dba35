"""Sampler settings, their validation, and the per-family defaults (one place for all constants)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Optional, Tuple, Union

from ..presets import ADAPTIVE_RULES, BIT_TASKS, preset

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


# The adaptive-step rule of every family, from the one place holding the presets (grn_core.presets).
ADAPTIVE_DEFAULTS = {task: AdaptiveSteps(**rule) for task, rule in ADAPTIVE_RULES.items()}


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

    steps: int = preset("t2v").steps  # the plain dataclass is the T2V demo's settings
    guidance: float = preset("t2v").guidance
    temperature: float = preset("t2v").temperature
    shift: float = preset("t2v").shift
    cfg_interval: float = preset("t2v").cfg_interval
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
    def for_task(cls, task: str, adaptive: Union[bool, AdaptiveSteps] = False, **overrides) -> "SamplerSettings":
        """The official demo's settings of a bit task (``grn_core.presets``: "t2i" w 3.0, tau 1.1; "t2v"/"i2v"
        w 3.0, tau 1.0; 50 steps), with ``overrides``. ``adaptive``: True for the family's rule, or a rule."""
        task = str(task).lower()
        if task not in BIT_TASKS:
            raise ValueError(f"unknown task {task!r}; expected one of {list(BIT_TASKS)} (C2I: C2ISettings)")
        base = preset(task).sampler_values()
        if isinstance(adaptive, AdaptiveSteps):
            base["adaptive"] = adaptive
        elif adaptive:
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

    steps: int = preset("c2i").steps
    guidance: float = preset("c2i").guidance
    temperature: float = preset("c2i").temperature
    interval: Tuple[float, float] = preset("c2i").interval
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

