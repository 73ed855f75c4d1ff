"""CommunicatorPool across real processes: 4 ranks over a TCPStore on loopback."""
from __future__ import annotations

import multiprocessing as mp

import pytest

from gyges.comm.groups import aligned_groups, pool_degrees
from gyges.comm.pool import CommunicatorPool, connect_store, expected_sum, start_store

WORLD, MAX_TP = 4, 4


def _rank_main(port: int, rank: int, out: mp.Queue) -> None:
    try:
        pool = CommunicatorPool.build(connect_store(port, 30), rank, WORLD, MAX_TP,
                                      timeout_s=30)
        results = {}
        # Every aligned group of every degree, in one order on every rank.
        for k in pool_degrees(MAX_TP):
            for ranks in aligned_groups(WORLD, k):
                if rank in ranks:
                    results[ranks] = pool.check(ranks, timeout_s=20).result
        out.put((rank, sorted(pool.groups), results, pool.build_ms))
    except BaseException as e:  # report instead of hanging the test
        out.put((rank, "error", repr(e), 0.0))


def test_pool_builds_every_aligned_group_and_all_reduces():
    store = start_store(30)
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_rank_main, args=(store.port, r, out)) for r in range(WORLD)]
    for p in procs:
        p.start()
    try:
        got = dict((r, rest) for r, *rest in (out.get(timeout=90) for _ in procs))
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    for rank in range(WORLD):
        groups, results, build_ms = got[rank]
        assert groups != "error", results
        pair = (rank - rank % 2, rank - rank % 2 + 1)
        assert groups == sorted([pair, (0, 1, 2, 3)])
        assert results == {pair: expected_sum(pair), (0, 1, 2, 3): expected_sum((0, 1, 2, 3))}
        assert 0 < build_ms < 30_000


def test_pool_refuses_gpu_until_written():
    with pytest.raises(NotImplementedError, match="NCCL"):
        CommunicatorPool.build(None, 0, 2, 2, device="cuda")  # type: ignore[arg-type]
