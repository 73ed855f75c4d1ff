"""Run a test worker in real processes that share one TCPStore (gloo on loopback)."""

from __future__ import annotations

import multiprocessing as mp
from collections.abc import Callable
from typing import Any


def run_workers(target: Callable[..., None], nprocs: int, expected: int, *,
                preload: str, timeout_s: float = 60.0) -> list[tuple[Any, ...]]:
    """Start `target(store_port, proc, queue)` in `nprocs` forkserver processes and return
    the first `expected` tuples they put on the queue; a tuple starting with "error" fails
    the caller. Processes are joined (killed after 30 s) in every case."""
    from gyges.comm.pool import start_store

    store = start_store(30)
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", preload])  # import torch once
    out = ctx.Queue()
    procs = [ctx.Process(target=target, args=(store.port, p, out)) for p in range(nprocs)]
    for p in procs:
        p.start()
    got = []
    try:
        for _ in range(expected):
            item = out.get(timeout=timeout_s)
            assert item[0] != "error", item
            got.append(item)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    return got
