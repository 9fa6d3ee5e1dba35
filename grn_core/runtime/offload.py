"""Offload: keep weights off the GPU while they are not needed.

Two mechanisms, one policy (:class:`OffloadPolicy`):

- **model offload** — the text encoder, the refiner and the tokenizer each come to the device only for their stage
  (:func:`on_device`) and go back to the CPU afterwards, so their peaks never add up;
- **block offload** — :class:`BlockOffload` keeps some of the refiner's transformer blocks on the CPU (pinned) and
  streams them in for each use, ``prefetch`` blocks ahead on a side CUDA stream, so the copy of block ``i + 1``
  overlaps the compute of block ``i``. At most ``1 + prefetch`` streamed blocks are on the device at any time; the
  streamed blocks are the *last* ones, so the first copies overlap the resident blocks' compute.

Policy strings (``OffloadPolicy.parse``): ``none`` (everything stays on the device), ``model``, ``blocks`` (model
offload and every block streamed), ``blocks:N`` / an int N (model offload and the last N blocks streamed), ``auto``
(decided from the free device memory by :func:`auto_policy`; the CPU never offloads).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Sequence

import torch
from torch import nn

log = logging.getLogger(__name__)

__all__ = ["BlockOffload", "OffloadPolicy", "auto_policy", "module_bytes", "on_device"]


# ----------------------------------------------------------------------------------------------------------------------
# Policy


@dataclass(frozen=True)
class OffloadPolicy:
    """``mode``: ``none`` / ``model`` / ``blocks`` / ``auto``; ``blocks``: streamed refiner blocks (None = all)."""

    mode: str = "auto"
    blocks: Optional[int] = None
    prefetch: int = 1

    MODES = ("auto", "none", "model", "blocks")

    @classmethod
    def parse(cls, value: "OffloadPolicy | str | int | None") -> "OffloadPolicy":
        if isinstance(value, OffloadPolicy):
            return value
        if value is None:
            return cls("auto")
        if isinstance(value, bool):
            raise ValueError(f"offload={value!r}: use 'auto', 'none', 'model', 'blocks', 'blocks:N' or an int N.")
        if isinstance(value, int):
            return cls("blocks", value) if value > 0 else cls("model")
        text = str(value).strip().lower()
        if text.startswith("blocks:"):
            count = text.split(":", 1)[1]
            if not count.isdigit() or int(count) < 1:
                raise ValueError(f"offload={value!r}: N in 'blocks:N' must be a positive integer (streamed blocks).")
            return cls("blocks", int(count))
        if text not in cls.MODES:
            raise ValueError(f"offload={value!r} is not one of: auto, none, model, blocks, blocks:N (N streamed "
                             f"refiner blocks).")
        return cls(text)

    @property
    def moves_models(self) -> bool:
        """Whether models go back to the CPU after their stage."""
        return self.mode in ("model", "blocks")

    def describe(self) -> str:
        if self.mode == "blocks":
            return f"blocks:{self.blocks}" if self.blocks else "blocks"
        return self.mode


def module_bytes(module: nn.Module) -> int:
    """Bytes of a module's parameters and buffers (as stored: fp8 counts 1 byte per weight)."""
    tensors = list(module.parameters()) + list(module.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


def auto_policy(
    device: Any,
    refiner_bytes: int,
    block_bytes: int,
    depth: int,
    other_bytes: int,
    activation_bytes: int,
    free_bytes: Optional[int] = None,
    prefetch: int = 1,
    margin: float = 0.9,
) -> OffloadPolicy:
    """The least offload that fits: ``none`` if refiner + other models + activations fit in ``margin`` of the free
    memory, else ``model``, else ``blocks:N`` with the smallest N that fits (every block at worst).

    ``other_bytes``: text encoder + tokenizer weights; ``activation_bytes``: the refiner step's peak activations
    (:func:`grn_core.runtime.memory.refiner_step_bytes`). The CPU never offloads.
    """
    device = torch.device(device)
    if device.type == "cpu":
        return OffloadPolicy("none")
    if free_bytes is None:
        if device.type != "cuda":
            return OffloadPolicy("model")  # MPS and others: no reliable free-memory query; stage-wise is safe
        free_bytes, _ = torch.cuda.mem_get_info(device)
    budget = free_bytes * margin
    if refiner_bytes + other_bytes + activation_bytes <= budget:
        return OffloadPolicy("none")
    if refiner_bytes + activation_bytes <= budget:
        return OffloadPolicy("model")
    for streamed in range(1, depth + 1):
        on_device = refiner_bytes - streamed * block_bytes + min(streamed, 1 + prefetch) * block_bytes
        if on_device + activation_bytes <= budget:
            return OffloadPolicy("blocks", streamed, prefetch)
    return OffloadPolicy("blocks", depth, prefetch)


@contextlib.contextmanager
def on_device(module: Optional[nn.Module], device: Any, offload_after: bool,
              home: Any = "cpu") -> Iterator[Optional[nn.Module]]:
    """Move ``module`` to ``device`` for a stage; back to ``home`` afterwards (also on errors) if ``offload_after``.

    Modules with block offload keep their streamed blocks on the CPU through the move (see ``GRNRefiner._apply``).
    """
    if module is None:
        yield None
        return
    module.to(device)
    try:
        yield module
    finally:
        if offload_after and torch.device(device).type != "cpu":
            module.to(home)
            if torch.device(device).type == "cuda":
                torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------------------------------
# Block streaming


class _Slot:
    """One tensor of a streamed block: where it lives in the module and its CPU (pinned) copy."""

    __slots__ = ("owner", "kind", "name", "host")

    def __init__(self, owner: nn.Module, kind: str, name: str, host: torch.Tensor):
        self.owner, self.kind, self.name, self.host = owner, kind, name, host

    def current(self) -> torch.Tensor:
        table = self.owner._parameters if self.kind == "param" else self.owner._buffers
        return table[self.name]

    def set(self, tensor: torch.Tensor) -> None:
        if self.kind == "param":
            self.owner._parameters[self.name].data = tensor
        else:
            self.owner._buffers[self.name] = tensor


def _pin(tensor: torch.Tensor, pin: bool) -> torch.Tensor:
    if not pin or tensor.is_pinned():
        return tensor
    try:
        return tensor.pin_memory()
    except RuntimeError:  # page-locked memory exhausted or unsupported: pageable copies still work, synchronously
        return tensor


class BlockOffload:
    """Streams ``blocks[i]`` for ``i in streamed`` from the CPU to the compute device, one pass at a time.

    ``for block in offload.blocks(device): ...`` yields every block in order with its weights on ``device``;
    streamed blocks are copied in ``prefetch`` blocks ahead (on a side CUDA stream) and dropped right after use, so at
    most ``1 + prefetch`` of them are on the device at once. The CPU copies never change.

    ``simulate=True`` copies even when the compute device is the CPU (tests: the same code path, observable).
    """

    def __init__(self, blocks: Sequence[nn.Module], streamed: Sequence[int], prefetch: int = 1,
                 pin_memory: Optional[bool] = None, simulate: bool = False):
        if prefetch < 0:
            raise ValueError(f"prefetch={prefetch}: must be 0 or more blocks ahead.")
        self.blocks = list(blocks)
        self.streamed = sorted(set(int(i) for i in streamed))
        if self.streamed and not 0 <= self.streamed[0] <= self.streamed[-1] < len(self.blocks):
            raise ValueError(f"streamed block indices {self.streamed} outside 0..{len(self.blocks) - 1}.")
        self.prefetch = int(prefetch)
        self.simulate = simulate
        self.pin = torch.cuda.is_available() if pin_memory is None else pin_memory
        self._slots: dict[int, list[_Slot]] = {}
        for index in self.streamed:
            slots = []
            for owner in self.blocks[index].modules():
                for kind, table in (("param", owner._parameters), ("buffer", owner._buffers)):
                    for name, tensor in table.items():
                        if tensor is None:
                            continue
                        host = _pin(tensor.detach().to("cpu"), self.pin)
                        slot = _Slot(owner, kind, name, host)
                        slot.set(host)
                        slots.append(slot)
            self._slots[index] = slots
        self._stream: Optional[torch.cuda.Stream] = None
        self._events: dict[int, Any] = {}
        self.peak_streamed_on_device = 0  # statistics for benchmarks and tests

    # -- bookkeeping --------------------------------------------------------------------------------------------------

    @property
    def streamed_bytes(self) -> int:
        return sum(s.host.numel() * s.host.element_size() for slots in self._slots.values() for s in slots)

    def is_on_device(self, index: int) -> bool:
        """Whether a streamed block currently holds device copies (not its CPU tensors)."""
        return any(s.current().data_ptr() != s.host.data_ptr() for s in self._slots.get(index, ()))

    def refresh(self) -> None:
        """Re-read the CPU copies from the modules after they were cast (``GRNRefiner._apply`` casts streamed blocks
        on the CPU, then calls this); only tensors that changed are re-pinned."""
        for slots in self._slots.values():
            for slot in slots:
                current = slot.current()
                if current.data_ptr() != slot.host.data_ptr() or current.dtype != slot.host.dtype:
                    slot.host = _pin(current.detach().to("cpu"), self.pin)
                    slot.set(slot.host)

    def to_device(self, device: Any) -> None:
        """Stop streaming: copy every streamed block to ``device`` for good (the caller forgets this object)."""
        for slots in self._slots.values():
            for slot in slots:
                slot.set(slot.host.to(device))

    # -- streaming ----------------------------------------------------------------------------------------------------

    def _copies(self, device: torch.device) -> bool:
        return device.type != "cpu" or self.simulate

    def _load(self, index: int, device: torch.device) -> None:
        if device.type == "cuda":
            if self._stream is None or self._stream.device != device:
                self._stream = torch.cuda.Stream(device)
            with torch.cuda.stream(self._stream):
                for slot in self._slots[index]:
                    slot.set(slot.host.to(device, non_blocking=True))
                event = torch.cuda.Event()
                event.record(self._stream)
            self._events[index] = event
        else:
            for slot in self._slots[index]:
                slot.set(slot.host.clone() if device.type == "cpu" else slot.host.to(device))

    def _wait(self, index: int, device: torch.device) -> None:
        event = self._events.pop(index, None)
        if event is not None:
            torch.cuda.current_stream(device).wait_event(event)

    def _release(self, index: int, record: bool = True) -> None:
        for slot in self._slots[index]:
            current = slot.current()
            if current.data_ptr() == slot.host.data_ptr():
                continue
            if record and current.is_cuda:
                # The copy was allocated on the side stream and read on the compute stream: its memory may only be
                # reused once the compute stream's queued work is done.
                current.record_stream(torch.cuda.current_stream(current.device))
            slot.set(slot.host)
        self._events.pop(index, None)

    def blocks_on(self, device: Any) -> Iterator[nn.Module]:
        """Yield every block in order with its weights on ``device`` (streaming the offloaded ones)."""
        device = torch.device(device)
        if not self.streamed or not self._copies(device):
            yield from self.blocks
            return
        window = 1 + self.prefetch
        queue = list(self.streamed)  # streamed blocks not yet issued, in order
        live: list[int] = []
        done: list[Any] = []  # CUDA events: compute of released blocks finished
        streamed = set(self.streamed)
        try:
            for index, block in enumerate(self.blocks):
                while queue and len(live) < window:
                    if len(done) >= window:
                        # Kernels are queued asynchronously: without this wait the host could run ahead and issue
                        # every copy at once. Waiting for the block released `window` uses ago keeps the device at
                        # `window` streamed blocks in use plus one whose memory is pending reuse.
                        done.pop(0).synchronize()
                    nxt = queue.pop(0)
                    self._load(nxt, device)
                    live.append(nxt)
                self.peak_streamed_on_device = max(self.peak_streamed_on_device, len(live))
                if index in streamed:
                    self._wait(index, device)
                yield block
                if index in streamed:
                    self._release(index)
                    live.remove(index)
                    if device.type == "cuda":
                        event = torch.cuda.Event()
                        event.record(torch.cuda.current_stream(device))
                        done.append(event)
        finally:
            for index in live:
                self._release(index, record=True)
