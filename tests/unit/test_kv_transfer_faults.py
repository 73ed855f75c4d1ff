"""execute_plan between members that disagree: it fails on a checked header or a bounded
timeout, within seconds, and writes nothing it did not verify.

Two real processes over gloo on loopback; each scenario uses a fresh group (a failed
collective leaves its group unusable, which is why a failed transformation takes the
host out of service).
"""

from __future__ import annotations

import multiprocessing as mp
import time

import pytest
import torch
from gloo_procs import run_workers

from gyges.comm import kv_transfer
from gyges.comm.kv_transfer import KvTransferError, execute_plan
from gyges.comm.pool import connect_store, new_gloo_group
from gyges.core.transfer_plan import BlockMove, TransferPlan, plan_digest

GROUP = (0, 1)
HEADS, SLOTS, DIM = 2, 16, 4


def _plan(rank: int, scenario: str) -> TransferPlan:
    """Swap block 1 of rank 0 with block 0 of rank 1 over `n` slots; in 'digest' rank 1
    moves other slots of the same count, in 'size' more of them, in 'silent' nothing."""
    n, start = 4, 0
    if rank == 1 and scenario == "digest":
        start = 8
    if rank == 1 and scenario == "size":
        n = 8
    rng = ((start, start + n),)
    moves = (BlockMove(0, 1, 1, 0, rng), BlockMove(1, 0, 0, 1, rng))
    return TransferPlan(moves, GROUP, 1, 2)


def _worker(port: int, proc: int, out: mp.Queue) -> None:
    torch.set_num_threads(1)
    kv_transfer.TIMEOUT_FLOOR_S = 3.0
    store = connect_store(port, 30)
    for scenario in ("digest", "size", "silent"):
        pg = new_gloo_group(store, f"faults-{scenario}", proc, 2, 30)
        bufs = [torch.full((HEADS, SLOTS, DIM), float(proc + 1)) for _ in range(4)]
        before = [b.clone() for b in bufs]
        t0 = time.monotonic()
        error = ""
        try:
            if scenario == "silent" and proc == 1:
                time.sleep(kv_transfer.TIMEOUT_FLOOR_S + 3)  # a member that never sends
            else:
                execute_plan(_plan(proc, scenario), GROUP, proc, pg, bufs,
                             buffers_per_round=2)
        except KvTransferError as e:
            error = str(e)
        except Exception as e:  # noqa: BLE001 - reported to the test
            error = f"unexpected {type(e).__name__}: {e}"
        unchanged = all(torch.equal(b, w) for b, w in zip(bufs, before, strict=True))
        out.put((scenario, proc, error, time.monotonic() - t0, unchanged))


@pytest.fixture(scope="module")
def outcomes() -> dict[tuple[str, int], tuple[str, float, bool]]:
    got = run_workers(_worker, 2, 6, preload="gyges.comm.kv_transfer", timeout_s=90)
    return {(scenario, proc): rest for scenario, proc, *rest in got}


def test_plans_differ_in_slots_not_size(outcomes) -> None:
    """Same bytes, other slots: the manifest's plan digest catches it on both members,
    before either sends or writes a row."""
    assert plan_digest(_plan(0, "digest")) != plan_digest(_plan(1, "digest"))
    for proc in (0, 1):
        error, elapsed, unchanged = outcomes[("digest", proc)]
        assert "different KV plans" in error, error
        assert unchanged and elapsed < 10


def test_plans_differ_in_size(outcomes) -> None:
    """Different byte counts (the issue's 'Received data size doesn't match', which makes
    gloo abort the process): refused on both members by the manifest, nothing written,
    and both processes live on to the next scenario."""
    for proc in (0, 1):
        error, elapsed, unchanged = outcomes[("size", proc)]
        assert "different KV plans" in error, error
        assert unchanged and elapsed < 10


def test_silent_peer_times_out(outcomes) -> None:
    """A member that never joins: the other fails after the bounded round timeout."""
    error, elapsed, unchanged = outcomes[("silent", 0)]
    assert "timed out" in error or "failed" in error, error
    assert unchanged and 2.5 < elapsed < 10
