"""Several processes (GPUs, machines) on ``torch.distributed``: the plan torchrun sets up, and the parallel strategies.

``torchrun --nproc-per-node N -m grn_core generate ... --parallel cfg|data`` starts N copies of the command; each reads
its place from the environment torchrun sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``PORT``).
:class:`ParallelPlan` turns that into a process group (NCCL on CUDA, gloo on the CPU), one device per local rank and a
timeout policy; :class:`CFGParallel` is the sampler strategy of ``--parallel cfg`` (``grn_core.sampler.loop``'s
``branches=``); data parallel needs no strategy (each rank samples its own prompts with the default local one).

Failure policy: every collective runs with the plan's timeout (``init_process_group(timeout=...)``), and any failure of
one (a rank died, the network went away, the timeout passed) becomes :class:`DistributedError` (a ``ValueError``, so
the command line prints ``error: ...`` and exits 2) naming this rank and the operation. A rank never waits forever for
a dead peer: gloo reports a closed connection at once, and otherwise the timeout ends the wait. (With NCCL, torch's
watchdog enforces the timeout by aborting the process.)

Same model everywhere: :meth:`ParallelPlan.check_same_files` compares a fingerprint of every model file (name, size,
SHA-256 of its first MiB) across ranks before anything is loaded, so a rank with another checkpoint (a different
``--model-dir`` on one machine) is refused with the ranks and files named, instead of giving silently wrong images.
"""

from __future__ import annotations

import datetime
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, List, Optional, Sequence, Tuple

import torch

PARALLEL_CHOICES = ("cfg", "sp", "cfg+sp", "data")
DEFAULT_TIMEOUT_S = 1800.0          # torch's own default for gloo and NCCL collectives
FINGERPRINT_BYTES = 1 << 20


class DistributedError(ValueError):
    """A collective failed or timed out (a rank died, the network broke), or the ranks disagree (other files)."""


def _env_int(name: str, default: Optional[int] = None) -> int:
    value = os.environ.get(name)
    if value is None:
        if default is None:
            raise DistributedError(f"{name} is not set: start the command with torchrun (torchrun --nproc-per-node N "
                                   "-m grn_core generate ... --parallel cfg|data)")
        return default
    try:
        return int(value)
    except ValueError as error:
        raise DistributedError(f"{name}={value!r} is not an integer (set by torchrun)") from error


def file_fingerprint(path: Any) -> Tuple[str, int, str]:
    """``(file name, size in bytes, SHA-256 of the first MiB)``: cheap even for 30 GB files, and different for every
    released checkpoint (their headers and first tensors differ)."""
    path = Path(path)
    with open(path, "rb") as handle:
        head = handle.read(FINGERPRINT_BYTES)
    return path.name, path.stat().st_size, hashlib.sha256(head).hexdigest()


@dataclass
class ParallelPlan:
    """This process's place in the group: ``rank`` of ``world_size``, ``local_rank`` on its machine, its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: Optional[str] = None       # None: a single process, no group
    timeout_s: float = DEFAULT_TIMEOUT_S

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that prints progress and writes files."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.backend is not None

    @classmethod
    def single(cls, device: Any = "cpu") -> "ParallelPlan":
        return cls(device=torch.device(device))

    @classmethod
    def from_env(cls, device: Any = "cpu", timeout_s: float = DEFAULT_TIMEOUT_S) -> "ParallelPlan":
        """The plan torchrun's environment describes; inits the process group (NCCL for ``cuda`` devices, gloo for
        the CPU) once. ``device``: the requested device; ``cuda``/``cuda:N`` becomes ``cuda:LOCAL_RANK``."""
        import torch.distributed as dist

        if timeout_s is None or not timeout_s > 0:
            raise DistributedError(f"the parallel timeout must be > 0 seconds, got {timeout_s!r}")
        world = _env_int("WORLD_SIZE")
        rank = _env_int("RANK")
        local = _env_int("LOCAL_RANK", rank)
        if not 0 <= rank < world:
            raise DistributedError(f"RANK={rank} is outside 0..WORLD_SIZE-1={world - 1}")
        wanted = torch.device(device)
        if wanted.type == "cuda":
            if local >= torch.cuda.device_count():
                raise DistributedError(f"rank {rank}: LOCAL_RANK={local} but this machine has "
                                       f"{torch.cuda.device_count()} CUDA devices; start at most that many processes "
                                       "per machine (--nproc-per-node)")
            dev = torch.device("cuda", local)
            torch.cuda.set_device(dev)
            backend = "nccl"
        else:
            dev, backend = wanted, "gloo"
        if not dist.is_initialized():
            try:
                dist.init_process_group(backend, rank=rank, world_size=world,
                                        timeout=datetime.timedelta(seconds=float(timeout_s)))
            except (RuntimeError, ValueError) as error:
                raise DistributedError(f"rank {rank}: could not join the group of {world} processes ({backend}, "
                                       f"MASTER_ADDR={os.environ.get('MASTER_ADDR')}, "
                                       f"MASTER_PORT={os.environ.get('MASTER_PORT')}): {_first_line(error)}") from error
        return cls(rank=rank, world_size=world, local_rank=local, device=dev, backend=backend,
                   timeout_s=float(timeout_s))

    # ---- collectives, each wrapped into the failure policy ------------------------------------------------------

    def guarded(self, what: str, fn: Callable[[], Any]) -> Any:
        """Run one collective; a failure (dead peer, timeout) becomes :class:`DistributedError` naming the rank."""
        try:
            return fn()
        except DistributedError:
            raise
        except (RuntimeError, ConnectionError, OSError) as error:  # DistBackendError is a RuntimeError
            raise DistributedError(
                f"rank {self.rank} of {self.world_size}: {what} failed — another rank stopped or did not answer "
                f"within {self.timeout_s:g} s ({_first_line(error)}). Look at the other ranks' errors; nothing was "
                "written.") from error

    def barrier(self, what: str = "barrier") -> None:
        if not self.active:
            return
        import torch.distributed as dist

        # A barrier as an all_reduce of one number: it honours the group's timeout on every backend.
        flag = torch.zeros(1, device=self.device)
        self.guarded(what, lambda: dist.all_reduce(flag))

    def all_gather_object(self, obj: Any, what: str) -> List[Any]:
        if not self.active:
            return [obj]
        import torch.distributed as dist

        out: List[Any] = [None] * self.world_size
        self.guarded(what, lambda: dist.all_gather_object(out, obj))
        return out

    def gather_object(self, obj: Any, what: str) -> Optional[List[Any]]:
        """Rank 0 gets every rank's ``obj`` (others get None)."""
        if not self.active:
            return [obj]
        import torch.distributed as dist

        out: Optional[List[Any]] = [None] * self.world_size if self.is_main else None
        self.guarded(what, lambda: dist.gather_object(obj, out, dst=0))
        return out

    def broadcast_(self, tensor: Optional[torch.Tensor], what: str) -> Optional[torch.Tensor]:
        """Rank 0's values of ``tensor`` on every rank (each rank passes a tensor of the same shape and dtype, e.g.
        its own encoding of the same source: on GPUs two encodes need not agree to the last bit, and ranks that
        start from different bits would sample different videos). None passes through."""
        if tensor is None or not self.active:
            return tensor
        import torch.distributed as dist

        moved = tensor.to(self.device).contiguous()  # NCCL moves device tensors only
        if moved.dtype == torch.bool:  # not every backend moves bools
            moved = moved.to(torch.uint8)
        self.guarded(what, lambda: dist.broadcast(moved, src=0))
        return moved.to(device=tensor.device, dtype=tensor.dtype)

    def check_same_tensor(self, tensor: torch.Tensor, what: str) -> None:
        """Every rank holds the same values (compared by SHA-256 of the bytes): else :class:`DistributedError`."""
        if not self.active:
            return
        data = tensor.detach().cpu().contiguous()
        digest = hashlib.sha256(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"").hexdigest()
        every = self.all_gather_object(digest, f"comparing {what} between ranks")
        bad = [r for r, d in enumerate(every) if d != every[0]]
        if bad:
            raise DistributedError(f"rank{'s' if len(bad) > 1 else ''} {', '.join(map(str, bad))} ended with other "
                                   f"{what} than rank 0: the ranks "
                                   "diverged (their GPUs computed differently). Nothing was written; run again, or "
                                   "without --parallel.")

    def check_same_files(self, paths: Sequence[Any]) -> None:
        """Every rank names the same model files (by fingerprint): else :class:`DistributedError` naming the ranks."""
        mine = [file_fingerprint(p) for p in paths]
        every = self.all_gather_object(mine, "comparing the model files between ranks")
        bad = [r for r, theirs in enumerate(every) if theirs != every[0]]
        if bad:
            def show(prints):
                return ", ".join(f"{name} ({size} bytes, sha256 of first MiB {digest[:12]})"
                                 for name, size, digest in prints)
            raise DistributedError(
                f"rank{'s' if len(bad) > 1 else ''} {', '.join(map(str, bad))} loaded other model files than rank 0: "
                f"rank 0 has {show(every[0])}; rank {bad[0]} has {show(every[bad[0]])}. Give every rank the same "
                "files (same --model / --model-dir contents on every machine).")

    def shard(self, count: int) -> List[int]:
        """Data parallel: the item indices this rank takes (round robin: i % world_size == rank)."""
        return list(range(self.rank, count, self.world_size))

    def close(self) -> None:
        if self.active:
            import torch.distributed as dist

            if dist.is_initialized():
                try:
                    dist.destroy_process_group()
                except Exception:  # noqa: BLE001 - best effort on the way out (a peer may be gone)
                    pass
            self.backend = None


def free_local_port() -> int:
    """A TCP port free on 127.0.0.1 now: ``MASTER_PORT`` for a group of processes on this machine."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def local_group_env(rank: int, world: int, port: int, local_rank: Optional[int] = None) -> dict:
    """The variables torchrun would set for ``rank`` of ``world`` processes on this machine (for processes started
    without torchrun: ComfyUI's device pool, tests, benchmarks); ``local_rank`` defaults to ``rank``."""
    return {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank if local_rank is None else local_rank),
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}


def check_parallel_mode(mode: Optional[str], world_size: int, heads: Optional[Tuple[int, int]] = None) -> None:
    """``--parallel`` against the number of processes and, when known, the refiner's ``(heads, kv_heads)``
    (ValueError listing what fits)."""
    if mode is None:
        return
    if mode not in PARALLEL_CHOICES:
        raise ValueError(f"--parallel {mode!r}: use one of {', '.join(PARALLEL_CHOICES)}.")
    if mode == "cfg" and world_size != 2:
        raise ValueError(f"--parallel cfg needs exactly 2 processes (rank 0 the conditional branch, rank 1 the "
                         f"unconditional one), got {world_size}. Valid choices: torchrun --nproc-per-node 2 ... "
                         f"--parallel cfg; --parallel sp with any number that divides the heads; or --parallel data "
                         f"with any number of processes (with --prompts FILE).")
    if mode == "cfg+sp" and (world_size < 4 or world_size % 2):
        raise ValueError(f"--parallel cfg+sp needs an even number of processes, at least 4 (two groups of "
                         f"{max(2, world_size // 2)}: one per guidance branch, each splitting its sequence), got "
                         f"{world_size}. With 2 processes use --parallel cfg or --parallel sp.")
    if mode == "sp" and world_size < 2:
        raise ValueError("--parallel sp needs at least 2 processes (torchrun --nproc-per-node N, N dividing the "
                         "refiner's heads).")
    if heads is not None and mode in ("sp", "cfg+sp"):
        degree = sp_degree(mode, world_size)
        n_heads, n_kv = heads
        if n_heads % degree or n_kv % degree:
            valid = [p for p in range(2, n_kv + 1) if n_heads % p == 0 and n_kv % p == 0]
            per = " (the processes of each guidance branch)" if mode == "cfg+sp" else ""
            counts = [p * (2 if mode == "cfg+sp" else 1) for p in valid]
            fits = (f"Valid process counts for --parallel {mode}: {', '.join(map(str, counts))}." if counts else
                    "No count can split them: use --parallel cfg (2 processes) or data.")
            raise ValueError(f"--parallel {mode} splits attention heads over {degree} processes{per}, but this "
                             f"refiner has {n_heads} heads and {n_kv} key/value heads, and {degree} does not divide "
                             f"both. {fits}")


def sp_degree(mode: Optional[str], world_size: int) -> int:
    """How many ranks share one sequence: all of them for ``sp``, half for ``cfg+sp``, else 1."""
    return world_size if mode == "sp" else world_size // 2 if mode == "cfg+sp" else 1


class UlyssesSplit:
    """One rank's view of a sequence-parallel group (``grn_core.refiner.model.SequenceSplit``): the all-to-alls
    and the row gather the refiner calls, on a process group (``torch.distributed``; gloo or NCCL).

    ``scatter_heads``: rank r holds rows ``[n, H, D]``; chunk the heads in ``world`` groups and send group j to rank j;
    what arrives from rank i is rank i's rows with my head group, so stacking arrivals in rank order gives all
    ``world * n`` rows with ``H / world`` heads. ``gather_heads`` is the same exchange read backwards. One
    ``all_to_all_single`` each; bytes per rank per call: ``n * H * D * (world - 1) / world`` values.
    """

    def __init__(self, plan: ParallelPlan, ranks: Sequence[int], group: Any = None):
        """``ranks``: the global ranks of the group, this one among them; ``group``: their process group (None:
        the whole world). Every rank must create every group in the same order (torch.distributed's rule), so
        callers that split the world create the groups themselves (:meth:`CFGParallel.with_sequence_split`)."""
        import torch.distributed as dist

        self.plan = plan
        self.ranks = list(ranks)
        self.world = len(self.ranks)
        self.rank = self.ranks.index(plan.rank)
        self.group = group
        self._dist = dist

    def _all_to_all(self, chunks: torch.Tensor, what: str) -> torch.Tensor:
        out = torch.empty_like(chunks)
        self.plan.guarded(what, lambda: self._dist.all_to_all_single(out, chunks, group=self.group))
        return out

    def scatter_heads(self, t: torch.Tensor) -> torch.Tensor:
        # unflatten splits the head dim as a view (q, k, v are strided views of one buffer): one copy, the layout's
        chunks = t.unflatten(1, (self.world, -1)).transpose(0, 1).contiguous()
        return self._all_to_all(chunks, "the sequence-parallel all-to-all before attention").flatten(0, 1)

    def gather_heads(self, t: torch.Tensor) -> torch.Tensor:
        rows, heads, dim = t.shape
        arrived = self._all_to_all(t.contiguous().view(self.world, rows // self.world, heads, dim),
                                   "the sequence-parallel all-to-all after attention")
        return arrived.transpose(0, 1).reshape(rows // self.world, self.world * heads, dim)

    def gather_rows(self, t: torch.Tensor) -> torch.Tensor:
        t = t.contiguous()
        parts = [torch.empty_like(t) for _ in range(self.world)]
        self.plan.guarded("gathering the sequence-parallel logits",
                          lambda: self._dist.all_gather(parts, t, group=self.group))
        return torch.cat(parts)


def _new_group(plan: ParallelPlan, ranks: Sequence[int]) -> Any:
    import torch.distributed as dist

    return plan.guarded(f"creating the process group {list(ranks)}", lambda: dist.new_group(list(ranks)))


class SequenceParallel:
    """Sampler strategy for ``--parallel sp``: both guidance branches in one packed pass, its rows split over all
    ranks (:class:`UlyssesSplit`); every rank gets the whole logits."""

    def __init__(self, split: UlyssesSplit):
        self.split = split

    def logits(self, refiner: Any, bits: torch.Tensor, step_value: torch.Tensor, text_cond: Any,
               text_uncond: Optional[Any], **kwargs: Any) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        return refiner.step_logits(bits, step_value, text_cond, text_uncond, split=self.split, **kwargs)


class CFGParallel:
    """Sampler strategy for ``--parallel cfg`` (world size 2): rank 0 computes the conditional branch, rank 1 the
    unconditional one, and the two exchange their logits (one ``all_gather`` of ``[rows, t, h, w, bits, 2]`` per
    guided step), so both ranks hold the same ``(cond, uncond)`` as one process would and run the same fused step with
    the same random numbers: they stay in lockstep and give the single-process bits exactly.

    Steps without guidance (guidance 1, outside the interval): rank 0 computes the conditional branch and broadcasts it;
    rank 1 waits (idle, but in step). Each branch is computed as the *conditional* branch of a one-branch pass (rank 1
    passes the negative text as ``text_cond``), which on the same hardware gives the values of the two-branch pass.

    ``cfg+sp`` (world size 2P, :meth:`with_sequence_split`): ranks ``0..P-1`` compute the conditional branch as one
    sequence-parallel group, ranks ``P..2P-1`` the unconditional one; rank ``i`` and rank ``i + P`` exchange as above
    (a group of two).
    """

    def __init__(self, plan: ParallelPlan, split: Optional[UlyssesSplit] = None, pair: Optional[Sequence[int]] = None,
                 pair_group: Any = None):
        if split is None and plan.world_size != 2:
            check_parallel_mode("cfg", plan.world_size)
        self.plan = plan
        self.split = split
        self.pair = list(pair) if pair is not None else [0, 1]      # global ranks: (conditional, unconditional)
        self.group = pair_group
        self.is_cond = plan.rank == self.pair[0]
        self._dtype: Optional[torch.dtype] = None   # the logits' dtype, learnt on the first exchange

    @classmethod
    def with_sequence_split(cls, plan: ParallelPlan) -> "CFGParallel":
        """``cfg+sp``: every rank creates the branch groups and the pair groups (same order everywhere)."""
        check_parallel_mode("cfg+sp", plan.world_size)
        p = plan.world_size // 2
        halves = [list(range(0, p)), list(range(p, 2 * p))]
        groups = [_new_group(plan, ranks) for ranks in halves]
        pairs = [[i, i + p] for i in range(p)]
        pair_groups = [_new_group(plan, pair) for pair in pairs]
        half, i = plan.rank // p, plan.rank % p
        split = UlyssesSplit(plan, halves[half], groups[half])
        return cls(plan, split=split, pair=pairs[i], pair_group=pair_groups[i])

    def logits(self, refiner: Any, bits: torch.Tensor, step_value: torch.Tensor, text_cond: Any,
               text_uncond: Optional[Any], **kwargs: Any) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        import torch.distributed as dist

        plan, src, group = self.plan, self.pair[0], self.group
        if self.split is not None:
            kwargs["split"] = self.split
        if text_uncond is None:  # unguided: the conditional side computes, the other receives
            if self.is_cond:
                cond, _ = refiner.step_logits(bits, step_value, text_cond, None, **kwargs)
                cond = cond.contiguous()
            if self._dtype is None:  # the other side cannot know the compute dtype yet: one small header, once
                code = torch.tensor([_DTYPES.index(cond.dtype) if self.is_cond else -1], device=plan.device)
                plan.guarded("sharing the logits' dtype", lambda: dist.broadcast(code, src=src, group=group))
                self._dtype = _DTYPES[int(code.item())]
            if not self.is_cond:
                cond = torch.empty(_logits_shape(bits), dtype=self._dtype, device=bits.device)
            plan.guarded("receiving the conditional logits", lambda: dist.broadcast(cond, src=src, group=group))
            return cond, None
        mine, _ = refiner.step_logits(bits, step_value, text_cond if self.is_cond else text_uncond, None, **kwargs)
        mine = mine.contiguous()
        self._dtype = mine.dtype
        both = [torch.empty_like(mine), torch.empty_like(mine)]
        plan.guarded("exchanging the guidance branches' logits", lambda: dist.all_gather(both, mine, group=group))
        return both[0], both[1]


def branch_strategy(plan: ParallelPlan, mode: Optional[str]) -> Optional[Any]:
    """The sampler's branch strategy for ``--parallel mode`` on ``plan`` (None: each rank samples alone, as
    ``data`` and a single process do)."""
    if mode is None or mode == "data" or not plan.active:
        return None
    check_parallel_mode(mode, plan.world_size)
    if mode == "sp":
        return SequenceParallel(UlyssesSplit(plan, range(plan.world_size)))
    if mode == "cfg+sp":
        return CFGParallel.with_sequence_split(plan)
    return CFGParallel(plan)


_DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def _logits_shape(bits: torch.Tensor) -> Tuple[int, ...]:
    rows, n_bits, t, h, w = bits.shape
    return (rows, t, h, w, n_bits, 2)


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return (text[0][:300] if text else type(error).__name__)


def logits_exchange_bytes(rows: int, tokens: int, n_bits: int, bytes_per_value: int = 4) -> int:
    """Bytes one rank sends per guided CFG-parallel step: its branch's logits ``[rows, tokens, bits, 2]``."""
    return rows * tokens * n_bits * 2 * bytes_per_value


def ulysses_bytes(seq: int, width: int, depth: int, bytes_per_value: int = 2, tensors: int = 4) -> int:
    """Bytes moved by Ulysses all-to-alls per step (q, k, v before attention, out after it, per layer):
    ``tensors * seq * width * bytes * depth`` (each rank sends (world-1)/world of it)."""
    return tensors * seq * width * bytes_per_value * depth


__all__ = ["CFGParallel", "DistributedError", "PARALLEL_CHOICES", "ParallelPlan", "SequenceParallel", "UlyssesSplit",
           "branch_strategy", "check_parallel_mode", "file_fingerprint", "free_local_port", "local_group_env",
           "logits_exchange_bytes", "sp_degree",
           "ulysses_bytes"]
