"""Runtime: how GRN networks use a device — weight precision, attention kernels, offload and memory errors.

- :mod:`.precision` — storage / compute dtypes and the cast the loaders apply (``Precision``, ``cast_network``);
- :mod:`.fp8` — fp8 weight storage with per-row scales and per-call upcast (``Fp8Linear``, ``quantize_linears``);
- :mod:`.attention` — exact attention backends chosen per device (``attend``, ``resolve_backend``);
- :mod:`.offload` — model staging and block streaming (``OffloadPolicy``, ``BlockOffload``, ``on_device``);
- :mod:`.memory` — weight / activation estimates and out-of-memory errors with advice (``oom_guard``).
"""

from .attention import ATTENTION_BACKENDS, attend, backend_status, check_backend, resolve_backend
from .fp8 import FP8_DTYPES, Fp8Linear, is_fp8, matmul_weight, quantize_linears
from .memory import GRNOutOfMemoryError, oom_guard, refiner_step_bytes, refiner_weight_bytes
from .offload import BlockOffload, OffloadPolicy, auto_policy, module_bytes, on_device
from .precision import Precision, cast_network, resolve_precision

__all__ = [
    "ATTENTION_BACKENDS",
    "BlockOffload",
    "FP8_DTYPES",
    "Fp8Linear",
    "GRNOutOfMemoryError",
    "OffloadPolicy",
    "Precision",
    "attend",
    "auto_policy",
    "backend_status",
    "cast_network",
    "check_backend",
    "is_fp8",
    "matmul_weight",
    "module_bytes",
    "on_device",
    "oom_guard",
    "quantize_linears",
    "refiner_step_bytes",
    "refiner_weight_bytes",
    "resolve_backend",
    "resolve_precision",
]
