"""Load GRN's ``devices``: a pool of worker processes, one per device, that runs the Refine Sampler's requests.

``DevicePool(("cuda:0", "cuda:1"), PoolModel(...))`` starts one process per device (``torch.multiprocessing``,
``spawn``), joined in a ``torch.distributed`` group of the workers only (gloo on the CPU, NCCL on CUDA; 127.0.0.1 and a
free port). Each worker loads the model once, with the arguments Load GRN gives :func:`grn_nodes.loading.load_grn`
(on its own device: the library places the weights there per the ``offload`` policy), and then serves requests until
the pool is closed, so the weights stay warm across runs.

A request: the text features (computed in the ComfyUI process by Encode Prompt) and the library's
``GenerationRequest`` go to the workers as CPU tensors; each participating worker calls
:func:`grn_core.pipeline.generate_tokens` with ``branches=branch_strategy(plan, mode)`` (:func:`parallel_mode` picks
the mode); rank 0 sends every ``StepInfo`` and finally the ``TokenResult`` back (CPU tensors). The ComfyUI process
hands each ``StepInfo`` to the same callback as a single-process run (progress bar, live widget) and decodes the bits
itself: the tokenizer is not pooled.

Interrupt: the pool's ``stop`` event (a ``multiprocessing`` Event) is set when ComfyUI's interrupt is seen (the caller's
``should_stop`` polled while waiting, or the step callback raising). In a parallel mode the ranks must stop at the same
place, or one of them would wait forever in the next collective for a peer that left; so the workers agree (one
``all_reduce`` of the flag on a gloo group of their own) before every step and, while every rank runs the refiner's
blocks (every step of ``sp``, guided steps of ``cfg`` and ``cfg+sp``), between blocks (``GRNRefiner.should_stop``). A rank sampling alone reads the event
directly. Every participant then reports "stopped", the event is cleared and the pool is ready for the next run; the
caller gets ``RefinerInterrupted`` (or the exception its callback raised).

Failures never hang the caller: a worker that dies is seen at once (its process sentinel), a stop that is not
acknowledged within ``stop_grace_s`` and silence longer than ``timeout_s`` end the wait; the pool is then shut down
(its workers joined, killed if need be) and the next run starts a fresh one. An error raised by the library in a
worker comes back as the same kind of error (``ValueError`` for a request the library refuses, ``GRNOutOfMemoryError``
with its advice) or as :class:`DevicePoolError`; after an error that was not the same on every rank the pool restarts.

Shutdown: :meth:`DevicePool.close` (ComfyUI's memory manager unloading the pool's patcher, see
``grn_nodes.patching``), the Load GRN output being dropped (:meth:`DevicePool.bind`), interpreter exit (``atexit``),
and, when the ComfyUI process dies without any of these, each worker's watchdog thread, which ends the worker as soon
as its parent is gone.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import datetime
import io
import logging
import multiprocessing
import os
import pickle
import sys
import threading
import time
import traceback
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch

from grn_core.refiner.model import RefinerInterrupted
from grn_core.runtime.distributed import DEFAULT_TIMEOUT_S, DistributedError, free_local_port, local_group_env
from grn_core.runtime.memory import GRNOutOfMemoryError, format_bytes

from .errors import LOAD, GRNNodeError, node_error

log = logging.getLogger(__name__)

START_TIMEOUT_S = 1800.0   # loading a large model on every worker may take minutes
STOP_GRACE_S = 120.0       # an unguided step of a large model ends before the workers can agree to stop
ERROR_GRACE_S = 5.0        # after one worker's error, how long its peers get to report theirs (a refused request
                           # fails on every rank at once; a peer that does not answer is waiting in a collective)
EXIT_GRACE_S = 10.0        # close(): how long the workers get to leave on their own before they are terminated
POLL_S = 0.05


class DevicePoolError(RuntimeError):
    """The pool could not run a request: a worker died, did not answer, or failed in a way the caller cannot fix by
    changing the request. The pool has been shut down; the next run starts a new one."""


# ==== the devices setting =============================================================================================

def parse_devices(text: Any) -> tuple[str, ...]:
    """Load GRN's ``devices`` widget → the pool's devices (``()``: no pool, this ComfyUI process's device).

    ``"cpu,cpu"`` (gloo) or ``"cuda:0,cuda:1"`` (NCCL), two or more, one kind; a GPU at most once. Anything else is a
    ``GRNNodeError`` naming the value and the fix."""
    if text is None:
        return ()
    if not isinstance(text, str):
        raise GRNNodeError(f"{LOAD}: devices {text!r} must be text such as 'cuda:0,cuda:1' (or empty).")
    value = text.strip()
    if not value:
        return ()
    shown = f"devices '{value}'"
    example = "e.g. 'cuda:0,cuda:1' (or 'cpu,cpu' to try the pool without a GPU)"
    devices = []
    for raw in value.split(","):
        name = raw.strip().lower()
        if not name:
            raise GRNNodeError(f"{LOAD}: {shown} has an empty entry; separate the devices with single commas, "
                               f"{example}.")
        if name == "cpu":
            devices.append("cpu")
            continue
        if name in ("cuda", "gpu"):
            raise GRNNodeError(f"{LOAD}: {shown}: '{raw.strip()}' needs the GPU's index; write each GPU as cuda:N, "
                               f"{example}.")
        kind, _, index = name.partition(":")
        if kind != "cuda" or not index.isdigit():
            raise GRNNodeError(f"{LOAD}: {shown}: '{raw.strip()}' is not a device the pool can use; write 'cpu' or "
                               f"'cuda:N', separated by commas, {example}.")
        devices.append(f"cuda:{int(index)}")
    if len(devices) < 2:
        raise GRNNodeError(f"{LOAD}: {shown} names one device; a pool needs two or more, {example}. Leave devices "
                           "empty to run in this ComfyUI process on its own device.")
    kinds = {d.split(":")[0] for d in devices}
    if len(kinds) > 1:
        raise GRNNodeError(f"{LOAD}: {shown} mixes the CPU and CUDA devices; a pool uses one kind: 'cpu,cpu' (gloo) "
                           "or CUDA devices only, e.g. 'cuda:0,cuda:1' (NCCL).")
    if "cuda" in kinds:
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise GRNNodeError(f"{LOAD}: {shown}: no CUDA device is visible to this ComfyUI (torch sees none); use "
                               "'cpu,cpu', or leave devices empty.")
        missing = [d for d in devices if int(d.split(":")[1]) >= count]
        if missing:
            have = ", ".join(f"cuda:{i}" for i in range(count))
            raise GRNNodeError(f"{LOAD}: {shown}: {missing[0]} does not exist; this machine has {count} CUDA "
                               f"device{'s' if count > 1 else ''} ({have}). Name only those.")
        twice = sorted({d for d in devices if devices.count(d) > 1})
        if twice:
            raise GRNNodeError(f"{LOAD}: {shown} names {twice[0]} more than once; NCCL runs one worker per GPU, so "
                               "name each GPU once, e.g. 'cuda:0,cuda:1'.")
    return tuple(devices)


# ==== how a request spreads over the workers ==========================================================================

def parallel_mode(world_size: int, task: str, guidance: float, heads: Optional[tuple] = None) -> Optional[str]:
    """The library's ``--parallel`` mode for one request on a pool of ``world_size`` workers, handed to
    :func:`grn_core.runtime.distributed.branch_strategy`; None: rank 0 samples alone and the other workers wait.

    * ``cfg``: 2 workers and guidance: each worker computes one guidance branch and the two exchange their logits
      every guided step (the least communication; the bits are the single-process bits).
    * ``sp``: otherwise, when the worker count divides the refiner's ``heads`` (``(heads, kv_heads)``): every step's
      sequence is split over all workers (Ulysses; guided or not).
    * ``cfg+sp``: guided, an even count of at least 4 whose half divides the heads.
    * None: class-to-image (its loop has no split), or a count the heads do not allow (e.g. 4 workers for the 2B
      refiner's 18 heads, unguided).
    This is the one place that chooses.
    """
    from grn_core.runtime.distributed import check_parallel_mode

    guided = float(guidance) != 1.0
    if task == "c2i":
        return None
    if world_size == 2 and guided:
        return "cfg"
    if heads is None:  # the split needs the head count
        return None
    candidates = ("sp", "cfg+sp") if guided else ("sp",)
    for mode in candidates:
        try:
            check_parallel_mode(mode, world_size, heads)
        except ValueError:
            continue
        return mode
    return None


def every_rank_runs_the_blocks(mode: Optional[str], guided: bool) -> bool:
    """Whether every rank of ``mode`` runs the refiner's blocks in a step (guided or not), so that the blocks are
    places where all of them can agree to stop. ``cfg``: only in guided steps (otherwise rank 0 computes and the
    others wait for its logits); ``sp``: every step; a rank alone: always (it asks nobody)."""
    if mode is None:
        return True
    if mode == "sp":
        return True
    return bool(guided)


@dataclass(frozen=True)
class PoolModel:
    """What every worker loads: Load GRN's arguments for :func:`grn_nodes.loading.load_grn` (paths as text; None for
    the built-in tiny model) and the name shown in messages."""

    refiner_path: Optional[str] = None
    tokenizer_path: Optional[str] = None
    weight_dtype: str = "default"
    layout: str = "auto"
    offload: str = "auto"
    name: str = "tiny"
    heads: Optional[tuple] = None  # the refiner's (heads, kv_heads): which worker counts sequence parallel allows


# ==== messages between the ComfyUI process and the workers ============================================================
# Every message is pickled by us into bytes (``Connection.send_bytes``): tensors travel inside the bytes, never as
# shared memory, and CUDA tensors become CPU tensors on the way (the ComfyUI process never gets a worker's device).

def _same(value: Any) -> Any:
    return value


class _CPUPickler(pickle.Pickler):
    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, torch.Tensor) and obj.device.type != "cpu":
            return _same, (obj.detach().cpu(),)
        return NotImplemented


def _dumps(message: Any) -> bytes:
    buffer = io.BytesIO()
    _CPUPickler(buffer, protocol=pickle.HIGHEST_PROTOCOL).dump(message)
    return buffer.getvalue()


def _send(conn: Any, message: Any) -> None:
    conn.send_bytes(_dumps(message))


def _receive(conn: Any) -> Any:
    return pickle.loads(conn.recv_bytes())


def _error_record(error: BaseException) -> dict:
    """A worker's exception as plain data (the ComfyUI process raises its own kind again, see ``_raise``)."""
    if isinstance(error, GRNOutOfMemoryError):
        kind = "oom"
    elif isinstance(error, DistributedError):
        kind = "distributed"
    elif isinstance(error, (ValueError, FileNotFoundError)):
        kind = "value"
    else:
        kind = "other"
    record = {"kind": kind, "type": type(error).__name__, "text": str(error)}
    if kind == "oom":
        record.update(stage=error.stage, advice=list(error.advice))
    if kind == "other":
        record["trace"] = "".join(traceback.format_exception(type(error), error, error.__traceback__)[-6:])
    return record


# ==== the worker process ==============================================================================================

class _Stops:
    """Where a worker may stop at the pool's ``stop`` event during a run (module docstring, "Interrupt")."""

    def __init__(self, event: Any, plan: Any, group: Any):
        self.event, self.plan, self.group = event, plan, group
        self.mode: Optional[str] = None
        self.together = False   # the run's ranks must agree (a parallel mode)
        self.in_pass = True     # the block checks of the current refiner pass are places to stop

    def begin(self, mode: Optional[str]) -> None:
        self.mode = mode
        self.together = mode is not None and self.plan.world_size > 1
        self.in_pass = not self.together

    def agree(self) -> bool:
        wanted = self.event.is_set()
        if not self.together:
            return wanted
        import torch.distributed as dist

        flag = torch.tensor([1 if wanted else 0], dtype=torch.int32)
        self.plan.guarded("agreeing where to stop at ComfyUI's interrupt",
                          lambda: dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group))
        return bool(flag.item())

    def between_blocks(self) -> bool:
        """``GRNRefiner.should_stop``."""
        return self.in_pass and self.agree()


class _AgreedStops:
    """The library's branch strategy, with the ranks' agreement on stopping before each step and, where every rank
    runs the blocks, between blocks."""

    def __init__(self, inner: Any, stops: _Stops):
        self.inner, self.stops = inner, stops

    def logits(self, refiner: Any, bits: torch.Tensor, step_value: torch.Tensor, text_cond: Any,
               text_uncond: Optional[Any], **kwargs: Any) -> Any:
        stops = self.stops
        if stops.agree():
            raise RefinerInterrupted("stopped before a step at ComfyUI's interrupt")
        stops.in_pass = every_rank_runs_the_blocks(stops.mode, text_uncond is not None)
        try:
            return self.inner.logits(refiner, bits, step_value, text_cond, text_uncond, **kwargs)
        finally:
            stops.in_pass = False


def _exit_with_parent() -> None:
    """A watchdog thread: end this worker as soon as the ComfyUI process is gone, however it ended."""
    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def watch() -> None:
        parent.join()
        os._exit(0)

    threading.Thread(target=watch, name="GRN pool: exit with ComfyUI", daemon=True).start()


def _worker_main(rank: int, devices: Sequence[str], port: int, spec: dict, conn: Any, stop: Any,
                 threads: Optional[int], timeout_s: float) -> None:
    """One worker: join the group, load the model, serve requests until told to exit (or the parent is gone)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C in ComfyUI's terminal is the ComfyUI process's business
    _exit_with_parent()
    if threads:
        torch.set_num_threads(int(threads))
    device = torch.device(devices[rank])
    os.environ.update(local_group_env(rank, len(devices), port, device.index if device.type == "cuda" else rank))
    if sys.platform.startswith("linux") and os.path.isdir("/sys/class/net/lo"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # the workers share this machine: loopback only
        os.environ.setdefault("NCCL_SOCKET_IFNAME", "lo")
    plan = None
    try:
        import torch.distributed as dist

        from grn_core.runtime.distributed import ParallelPlan
        from grn_core.runtime.offload import module_bytes

        from .loading import load_grn

        # LOCAL_RANK is the GPU's index: ParallelPlan puts a cuda rank on cuda:LOCAL_RANK.
        plan = ParallelPlan.from_env(device, timeout_s=timeout_s)
        group = plan.guarded("creating the pool's control group", lambda: dist.new_group(
            backend="gloo", timeout=datetime.timedelta(seconds=float(timeout_s))))
        model_spec = PoolModel(**spec)
        loaded = load_grn(model_spec.refiner_path, model_spec.tokenizer_path, model_spec.weight_dtype,
                          model_spec.layout, model_spec.offload, fit_preview=False, device=plan.device)
        model = loaded.model
        _send(conn, ("ready", rank, {"pid": os.getpid(), "device": str(plan.device),
                                     "bytes": module_bytes(model.refiner) + module_bytes(model.tokenizer),
                                     "offload": model.offload.describe()}))
    except BaseException as error:  # noqa: BLE001 - reported, then this worker ends
        with contextlib.suppress(Exception):
            _send(conn, ("failed", rank, _error_record(error)))
        if plan is not None:
            plan.close()
        return
    stops = _Stops(stop, plan, group)
    try:
        while True:
            try:
                message = _receive(conn)
            except (EOFError, OSError):
                break  # the ComfyUI process closed its end
            if message[0] == "exit":
                break
            _serve(message, model, plan, stops, conn, rank)
    finally:
        plan.close()
        with contextlib.suppress(Exception):
            conn.close()


_STRATEGIES: dict = {}  # in a worker: the branch strategy of each mode, kept for every later request


def _serve(message: tuple, model: Any, plan: Any, stops: _Stops, conn: Any, rank: int) -> None:
    from grn_core.pipeline import generate_class_tokens, generate_tokens
    from grn_core.runtime.distributed import branch_strategy

    _, job, mode, kind, payload = message
    main = rank == 0
    refiner = model.refiner
    hooked = hasattr(type(refiner), "should_stop")
    stops.begin(mode)
    if hooked:
        refiner.should_stop = stops.between_blocks

    def report(info: Any) -> None:
        _send(conn, ("step", job, info))

    try:
        if kind == "class":
            result = generate_class_tokens(model, payload["class_ids"], seed=payload["seed"],
                                           settings=payload["settings"], callback=report if main else None)
        else:
            model.preview = payload.get("preview")
            if mode not in _STRATEGIES:  # made once per mode: cfg+sp creates process groups
                _STRATEGIES[mode] = branch_strategy(plan, mode)
            strategy = _STRATEGIES[mode]
            if strategy is not None:
                strategy = _AgreedStops(strategy, stops)
            request = payload["request"]
            first_frame, first_bits = payload.get("first_frame"), payload.get("first_frame_bits")
            if mode is not None and first_frame is not None:
                # Every rank starts from rank 0's encoding (two GPUs' encodes need not agree to the last bit).
                from grn_core.pipeline import encode_first_frame

                first_bits = plan.broadcast_(encode_first_frame(model, first_frame, request.width, request.height),
                                             "sharing the first frame's bits")
                first_frame = None
            result = generate_tokens(model, payload["features"], request, first_frame=first_frame,
                                     callback=report if main else None, preview=main, first_frame_bits=first_bits,
                                     branches=strategy)
            if mode is not None:
                plan.check_same_tensor(result.bits, "bits")
        _send(conn, ("done", job, rank, result if main else None))
    except RefinerInterrupted:
        _send(conn, ("stopped", job, rank, None))
    except BaseException as error:  # noqa: BLE001 - the ComfyUI process raises it
        _send(conn, ("error", job, rank, _error_record(error)))
    finally:
        if hooked:
            refiner.should_stop = None
        if plan.device.type == "cuda":
            torch.cuda.empty_cache()  # what the run cached goes back to the GPU (ComfyUI may share it)


def _worker_target() -> Callable:
    """``_worker_main`` as the spawned worker imports it: from the top-level package ``grn_nodes`` (the pack's root is
    on ``sys.path``). Inside ComfyUI this module is ``<pack folder>.grn_nodes.pool``, and importing that name in a
    worker would run the pack's ``__init__`` and with it ComfyUI's node modules."""
    if __name__ == "grn_nodes.pool":
        return _worker_main
    import importlib

    return importlib.import_module("grn_nodes.pool")._worker_main


_SPAWN_LOCK = threading.Lock()


@contextlib.contextmanager
def _without_parent_main() -> Any:
    """While the workers start: ``multiprocessing``'s spawn makes every child import the parent's ``__main__`` again
    (by path or module name) before it runs anything. In ComfyUI that is ``main.py``, whose top level parses the
    command line, sets up logging and runs every custom node's prestartup script. The workers need none of it, so
    their preparation data leaves those two entries out."""
    from multiprocessing import spawn

    original = spawn.get_preparation_data

    def prepared(name: str) -> dict:
        data = original(name)
        data.pop("init_main_from_path", None)
        data.pop("init_main_from_name", None)
        return data

    with _SPAWN_LOCK:
        spawn.get_preparation_data = prepared
        try:
            yield
        finally:
            spawn.get_preparation_data = original


# ==== the pool, in the ComfyUI process ================================================================================

_LIVE: "weakref.WeakSet[DevicePool]" = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    for pool in list(_LIVE):
        with contextlib.suppress(Exception):
            pool.close()


class DevicePool:
    """Worker processes on ``devices`` that run the sampler for the model ``model`` (see the module docstring).

    ``threads``: torch CPU threads per worker (default: this process's count for CPU devices, torch's own for CUDA).
    ``timeout_s``: the workers' collective timeout and the longest silence during a run; ``start_timeout_s``: the
    longest start (loading); ``stop_grace_s``: how long an interrupted run may take to stop; ``should_stop``: polled
    while waiting (ComfyUI's ``processing_interrupted``) unless a call gives its own.
    """

    def __init__(self, devices: Sequence[str], model: PoolModel, threads: Optional[int] = None,
                 timeout_s: float = DEFAULT_TIMEOUT_S, start_timeout_s: float = START_TIMEOUT_S,
                 stop_grace_s: float = STOP_GRACE_S, should_stop: Optional[Callable[[], bool]] = None):
        self.devices = tuple(str(d) for d in devices)
        if len(self.devices) < 2:
            raise ValueError(f"a device pool needs two or more devices, got {self.devices}")
        self.model = model
        if threads is None and all(d == "cpu" for d in self.devices):
            threads = torch.get_num_threads()
        self.threads = threads
        self.timeout_s = float(timeout_s)
        self.start_timeout_s = float(start_timeout_s)
        self.stop_grace_s = float(stop_grace_s)
        self.should_stop = should_stop
        self.label = f"GRN device pool ({model.name} on {', '.join(self.devices)})"
        self.workers: list[dict] = []  # per rank, once started: pid, device, bytes, offload
        self.starts = 0
        self._lock = threading.RLock()
        self._procs: list = []
        self._conns: list = []
        self._stop: Any = None
        self._job = 0
        _LIVE.add(self)

    def __repr__(self) -> str:
        state = f"running, pids {self.pids}" if self.running else "stopped"
        return f"<{self.label}: {state}>"

    @property
    def world_size(self) -> int:
        return len(self.devices)

    @property
    def running(self) -> bool:
        return bool(self._procs)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs]

    def mode_for(self, task: str, guidance: float) -> Optional[str]:
        return parallel_mode(self.world_size, task, guidance, self.model.heads)

    def bind(self, owner: Any) -> None:
        """Close the pool when ``owner`` (the Load GRN output) is garbage-collected: its config was replaced, or
        ComfyUI dropped its cache."""
        weakref.finalize(owner, self.close)

    # ---- start and stop ----------------------------------------------------------------------------------------------

    def start(self, should_stop: Optional[Callable[[], bool]] = None) -> None:
        """Start the workers and wait until every one has loaded the model; nothing when they are running. A pool
        whose worker died is shut down and started again."""
        with self._lock:
            if self._procs:
                dead = [r for r, p in enumerate(self._procs) if not p.is_alive()]
                if not dead:
                    return
                log.warning("%s: the worker on %s (pid %s) is gone (exit code %s); restarting the pool", self.label,
                            self.devices[dead[0]], self._procs[dead[0]].pid, self._procs[dead[0]].exitcode)
                self._shutdown()
            should_stop = should_stop or self.should_stop
            import torch.multiprocessing as tmp

            ctx = tmp.get_context("spawn")
            self._stop = ctx.Event()
            port = free_local_port()
            pipes = [ctx.Pipe(duplex=True) for _ in self.devices]
            target = _worker_target()
            spec = dataclasses.asdict(self.model)
            began = time.monotonic()
            with _without_parent_main():
                for rank, (_, theirs) in enumerate(pipes):
                    process = ctx.Process(target=target, name=f"GRN pool worker {rank} ({self.devices[rank]})",
                                          args=(rank, self.devices, port, spec, theirs, self._stop, self.threads,
                                                self.timeout_s), daemon=True)
                    process.start()
                    self._procs.append(process)
            for _, theirs in pipes:
                theirs.close()  # the workers hold their ends
            self._conns = [mine for mine, _ in pipes]
            self.starts += 1
            ready: dict[int, dict] = {}
            try:
                while len(ready) < self.world_size:
                    if should_stop is not None and should_stop():
                        raise RefinerInterrupted(f"{self.label}: interrupted while the workers were loading")
                    for rank, message in self._messages(POLL_S):
                        if message[0] == "ready":
                            ready[rank] = message[2]
                        elif message[0] == "failed":
                            self._raise_start_failure(rank, message[2])
                    self._check_alive("while loading the model", start=True)
                    if time.monotonic() - began > self.start_timeout_s:
                        raise DevicePoolError(f"{self.label}: the workers did not load the model within "
                                              f"{self.start_timeout_s:g} s; the pool was shut down.")
            except BaseException:
                self._shutdown()
                raise
            self.workers = [ready[r] for r in range(self.world_size)]
            log.info("GRN: device pool (%s on %s) started in %.1f s: workers pid %s, %s of weights each (%s)",
                     self.model.name, ", ".join(self.devices), time.monotonic() - began,
                     ", ".join(str(w["pid"]) for w in self.workers), format_bytes(self.workers[0]["bytes"]),
                     self.workers[0]["offload"])

    def close(self) -> None:
        """Stop the workers and join them (terminate, then kill, those that do not leave within a few seconds).
        Nothing when the pool is not running; it starts again on the next run."""
        with self._lock:
            if not self._procs:
                return
            pids = self.pids
            self._shutdown()
            log.info("GRN: device pool (%s on %s) stopped: workers pid %s joined", self.model.name,
                     ", ".join(self.devices), ", ".join(map(str, pids)))

    def _shutdown(self) -> None:
        procs, conns, stop = self._procs, self._conns, self._stop
        self._procs, self._conns, self.workers, self._stop = [], [], [], None  # its semaphores go with it
        if stop is not None:
            stop.set()  # a run still going ends at its next agreed place
        for conn in conns:
            with contextlib.suppress(Exception):
                _send(conn, ("exit",))
        deadline = time.monotonic() + EXIT_GRACE_S
        while any(p.is_alive() for p in procs) and time.monotonic() < deadline:
            self._drain(conns)  # a worker blocked on sending can finish and leave
            for p in procs:
                p.join(POLL_S / len(procs))
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join(5)
            if p.is_alive():
                p.kill()
                p.join(5)
        for conn in conns:
            with contextlib.suppress(Exception):
                conn.close()
        for p in procs:
            with contextlib.suppress(Exception):
                p.close()

    @staticmethod
    def _drain(conns: Sequence[Any]) -> None:
        from multiprocessing.connection import wait

        for conn in wait(list(conns), timeout=0):
            with contextlib.suppress(Exception):
                conn.recv_bytes()

    # ---- runs --------------------------------------------------------------------------------------------------------

    def generate_tokens(self, features: Any, request: Any, first_frame: Optional[torch.Tensor] = None,
                        callback: Optional[Callable[[Any], Any]] = None,
                        first_frame_bits: Optional[torch.Tensor] = None, preview: Any = None,
                        should_stop: Optional[Callable[[], bool]] = None) -> Any:
        """:func:`grn_core.pipeline.generate_tokens` on the pool: ``features`` (``PromptFeatures``) and ``request``
        (``GenerationRequest``) as the library takes them; ``preview``: the model's live-preview projection;
        ``callback`` gets every ``StepInfo`` of rank 0, here. Returns the ``TokenResult`` (CPU tensors)."""
        settings = request.settings
        guidance = 1.0 if settings is None else float(settings.guidance)
        mode = self.mode_for(features.task, guidance)
        payload = {"features": features, "request": request, "first_frame": first_frame,
                   "first_frame_bits": first_frame_bits, "preview": preview}
        return self._run("text", payload, mode, callback, should_stop)

    def generate_class_tokens(self, class_ids: Sequence[int], seed: int = 0, settings: Any = None,
                              callback: Optional[Callable[[Any], Any]] = None,
                              should_stop: Optional[Callable[[], bool]] = None) -> Any:
        """:func:`grn_core.pipeline.generate_class_tokens` on the pool's rank 0."""
        payload = {"class_ids": list(class_ids), "seed": seed, "settings": settings}
        return self._run("class", payload, self.mode_for("c2i", 1.0), callback, should_stop)

    def _run(self, kind: str, payload: dict, mode: Optional[str], callback: Optional[Callable[[Any], Any]],
             should_stop: Optional[Callable[[], bool]]) -> Any:
        should_stop = should_stop or self.should_stop
        with self._lock:
            self.start(should_stop)
            ranks = list(range(self.world_size)) if mode is not None else [0]
            self._job += 1
            job = self._job
            self._stop.clear()
            data = _dumps(("run", job, mode, kind, payload))
            try:
                for rank in ranks:
                    self._conns[rank].send_bytes(data)
            except OSError as error:
                self._fail(f"could not hand the request to the workers ({error})")
            return self._collect(job, ranks, callback, should_stop)

    def _collect(self, job: int, ranks: list[int], callback: Optional[Callable[[Any], Any]],
                 should_stop: Optional[Callable[[], bool]]) -> Any:
        pending = set(ranks)
        outcome: dict[int, tuple] = {}
        result = None
        raised: Optional[BaseException] = None
        stop_at: Optional[float] = None
        error_at: Optional[float] = None
        last_word = time.monotonic()
        while pending:
            if stop_at is None and should_stop is not None and should_stop():
                self._stop.set()
                stop_at = time.monotonic()
            for rank, message in self._messages(POLL_S, ranks):
                last_word = time.monotonic()
                kind = message[0]
                if kind == "step":
                    if message[1] == job and callback is not None and stop_at is None:
                        try:
                            callback(message[2])
                        except BaseException as error:  # noqa: BLE001 - ComfyUI's interrupt, or a failure
                            raised = error
                            self._stop.set()
                            stop_at = time.monotonic()
                    continue
                if kind not in ("done", "stopped", "error") or message[1] != job:
                    continue
                pending.discard(rank)
                outcome[rank] = (kind, message[3])
                if kind == "done" and rank == 0:
                    result = message[3]
                if kind == "error" and error_at is None:
                    error_at = time.monotonic()
            if not pending:
                break
            self._check_alive("during a run")
            now = time.monotonic()
            if error_at is not None and now - error_at > ERROR_GRACE_S:
                # A rank failed alone (e.g. out of memory on a GPU it shares with ComfyUI): its peers wait for it in
                # a collective until the timeout. Do not make the user wait for that: end the pool now.
                log.warning("%s: a worker failed and its peers are waiting for it; shutting the pool down",
                            self.label)
                self._shutdown()
                failed = min(r for r in outcome if outcome[r][0] == "error")
                self._raise(failed, outcome[failed][1], "during a run")
            if stop_at is not None and now - stop_at > self.stop_grace_s:
                log.warning("%s: the workers did not stop within %g s of the interrupt; shutting the pool down",
                            self.label, self.stop_grace_s)
                self._shutdown()
                if raised is not None:
                    raise raised
                raise RefinerInterrupted(f"{self.label}: interrupted (the pool was shut down)")
            if now - last_word > self.timeout_s:
                self._fail(f"no word from the workers for {self.timeout_s:g} s during a run")
        self._stop.clear()
        kinds = {kind for kind, _ in outcome.values()}
        errors = [(rank, outcome[rank][1]) for rank in sorted(outcome) if outcome[rank][0] == "error"]
        if errors:
            records = [record for _, record in errors]
            same = len(errors) == len(ranks) and all(r["kind"] == "value" and r["text"] == records[0]["text"]
                                                     for r in records)
            if not same and len(ranks) > 1:
                log.warning("%s: a worker failed where its peers did not; restarting the pool on the next run",
                            self.label)
                self._shutdown()
            self._raise(errors[0][0], errors[0][1], "during a run")
        if len(kinds) > 1 and len(ranks) > 1:  # some stopped, some finished: never expected; start afresh
            self._shutdown()
        if raised is not None:
            raise raised
        if "stopped" in kinds:
            raise RefinerInterrupted(f"{self.label}: stopped at ComfyUI's interrupt")
        return result

    # ---- plumbing ----------------------------------------------------------------------------------------------------

    def _messages(self, timeout: float, ranks: Optional[Sequence[int]] = None) -> list[tuple[int, Any]]:
        """Messages that arrived within ``timeout`` (all that are waiting), as ``(rank, message)``."""
        from multiprocessing.connection import wait

        conns = {self._conns[r]: r for r in (ranks if ranks is not None else range(len(self._conns)))}
        out = []
        for conn in wait(list(conns), timeout=timeout):
            while True:
                try:
                    if not conn.poll():
                        break
                    out.append((conns[conn], _receive(conn)))
                except (EOFError, OSError):
                    break  # its worker is gone: _check_alive says so
        return out

    def _check_alive(self, during: str, start: bool = False) -> None:
        """A dead worker ends the wait: every rank matters (a peer of a parallel run waits for it). Its last words
        (an error it sent before it ended) are the reason given, when there are any."""
        dead = [(rank, p) for rank, p in enumerate(self._procs) if not p.is_alive()]
        if not dead:
            return
        gone = {rank for rank, _ in dead}
        for rank, message in self._messages(0):
            if message[0] in ("failed", "error") and rank in gone:
                record = message[2] if message[0] == "failed" else message[3]
                self._shutdown()
                if start:
                    self._raise_start_failure(rank, record)
                self._raise(rank, record, during)
        rank, process = dead[0]
        code = process.exitcode
        self._fail(f"the worker on {self.devices[rank]} (rank {rank}, pid {process.pid}) stopped with exit code "
                   f"{code} {during}" + (" (killed by a signal: out of host memory?)"
                                          if code is not None and code < 0 else ""))

    def _fail(self, what: str) -> None:
        self._shutdown()
        raise DevicePoolError(f"{self.label}: {what}. The pool was shut down; the next run starts it again.")

    def _raise_start_failure(self, rank: int, record: dict) -> None:
        if record["kind"] == "value":
            raise node_error(LOAD, f"{record['text']} (in the pool's worker on {self.devices[rank]})")
        self._raise(rank, record, "while loading the model")

    def _raise(self, rank: int, record: dict, during: str) -> None:
        where = f"the pool's worker on {self.devices[rank]}"
        if record["kind"] == "value":
            raise ValueError(record["text"])
        if record["kind"] == "oom":
            raise GRNOutOfMemoryError(f"{record['text']} (in {where})", record.get("stage", ""),
                                      record.get("advice", ()))
        detail = f"{record['type']}: {record['text']}"
        if record.get("trace"):
            detail += "\n" + record["trace"]
        raise DevicePoolError(f"{self.label}: {where} (rank {rank}) failed {during}: {detail}")


__all__ = ["DevicePool", "DevicePoolError", "PoolModel", "every_rank_runs_the_blocks", "parallel_mode",
           "parse_devices"]
