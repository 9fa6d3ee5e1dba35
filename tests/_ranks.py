"""Start a group of processes on this machine for a test (gloo on 127.0.0.1), the way torchrun would, and make sure
none is left: a rank still running after the timeout is killed and the test fails as a hang."""

from __future__ import annotations

import multiprocessing
import os
from typing import Callable

from grn_core.runtime.distributed import free_local_port, local_group_env


def join_group_env(rank: int, world: int, port: int) -> None:
    """In a spawned rank: torchrun's variables for ``rank`` of ``world`` on 127.0.0.1:``port``."""
    os.environ.update(local_group_env(rank, world, port))


def spawn_ranks(target: Callable, args: tuple, world: int, timeout: float) -> None:
    """``target(rank, world, port, *args)`` in ``world`` fresh processes (``multiprocessing`` spawn, not
    ``torch.multiprocessing.spawn``: that one kills the survivors as soon as one process fails, and tests of a dying
    rank need the survivor's own error); waits for them all."""
    ctx = multiprocessing.get_context("spawn")
    port = free_local_port()
    procs = [ctx.Process(target=target, args=(r, world, port, *args)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.kill()
    assert not alive, f"{len(alive)} rank(s) still running after {timeout} s: a hang"
