"""execute_plan across real processes (gloo on loopback) equals apply_plan on all ranks.

One spawn of 4 processes runs every case: processes 0,1 are host ranks (2, 3) of a pair,
processes 2,3 host ranks (0, 1) of another, and all four are host ranks (4, 5, 6, 7) of a
quad. Every process rebuilds every rank's starting buffers from seeds, so it checks its own
result against `apply_plan` locally and only reports a verdict and its stats.
"""

from __future__ import annotations

import multiprocessing as mp
import random
from typing import NamedTuple

import pytest
import torch
from gloo_procs import run_workers

from gyges.comm import kv_transfer as kvt
from gyges.comm.kv_transfer import TransferStats, execute_plan, pair_runs, workspace_bytes
from gyges.comm.pool import connect_store, new_gloo_group, start_store
from gyges.core.transfer_plan import BlockMove, TransferPlan, apply_plan, plan_transformation

HEADS, SLOTS, LAYERS = 4, 24, 2
# K and V of each layer: different head dims and dtypes share one plan.
SPECS = [(8, torch.float32), (4, torch.bfloat16)] * LAYERS
PAIRS = ((2, 3), (0, 1))
QUAD = (4, 5, 6, 7)


class Case(NamedTuple):
    name: str
    size: int  # 2: runs on both pairs; 4: on the quad
    k_from: int
    k_to: int
    per_round: int | None = None


CASES = (
    Case("merge 1->2", 2, 1, 2),
    Case("split 2->1", 2, 2, 1),
    Case("local and cross moves", 2, 0, 0, per_round=1),
    Case("merge 1->4", 4, 1, 4),
    Case("merge 2->4", 4, 2, 4, per_round=2),
    Case("split 4->2", 4, 4, 2),
    Case("split 4->1", 4, 4, 1, per_round=3),
)


def _plan(case: Case, group: tuple[int, ...]) -> TransferPlan:
    if case.k_from == 0:
        return _hand_plan(group)
    rng = random.Random(f"{case.name}/{group}")
    used = {}
    for i in range(case.size):
        ranges = []
        for _ in range(rng.randint(i % 2, 3)):  # segment 0 never empty
            start = rng.randrange(SLOTS)
            ranges.append((start, rng.randint(start + 1, SLOTS)))
        used[i] = ranges
    return plan_transformation(group, case.k_from, case.k_to, HEADS, used)


def _hand_plan(group: tuple[int, ...]) -> TransferPlan:
    """A swap and a 3-cycle inside ranks plus a cross-rank swap."""
    a, b = group
    moves = (
        BlockMove(a, 0, a, 1, ((0, SLOTS),)),
        BlockMove(a, 1, a, 0, ((0, SLOTS),)),
        BlockMove(b, 0, b, 1, ((0, 10),)),
        BlockMove(b, 1, b, 2, ((0, 10),)),
        BlockMove(b, 2, b, 0, ((0, 10),)),
        BlockMove(a, 2, b, 3, ((1, 4), (6, 9))),
        BlockMove(b, 3, a, 2, ((1, 4), (6, 9))),
        BlockMove(a, 3, b, 1, ((12, 20),)),
    )
    return TransferPlan(moves, group)


def _start_buffers(case: Case, rank: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(CASES.index(case) * 100 + rank)
    return [torch.randn(HEADS, SLOTS, d, generator=gen).to(dtype) for d, dtype in SPECS]


def _expected(case: Case, group: tuple[int, ...], plan: TransferPlan) -> dict:
    starts = {r: _start_buffers(case, r) for r in group}
    for i in range(len(SPECS)):
        apply_plan(plan, {r: bufs[i] for r, bufs in starts.items()})
    return starts


def _worker(port: int, proc: int, out: mp.Queue) -> None:
    torch.set_num_threads(1)
    try:
        store = connect_store(port, 30)
        pair = PAIRS[proc // 2]
        groups = {
            2: (pair, new_gloo_group(store, f"pair{pair[0]}", proc % 2, 2, 30)),
            4: (QUAD, new_gloo_group(store, "quad", proc, 4, 30)),
        }
        for n, case in enumerate(CASES):
            kvt.MIN_RUN_ROWS = 2 if n % 2 else 256  # every other case scatters by slices
            group, pg = groups[case.size]
            rank = group[proc % case.size]
            plan = _plan(case, group)
            bufs = _start_buffers(case, rank)
            rounds = case.per_round
            workspace = None  # cases with rounds also stage in an exactly sized workspace
            if rounds:
                size = workspace_bytes(plan, rank, bufs, buffers_per_round=rounds)
                workspace = torch.empty(size, dtype=torch.uint8)
            stats = execute_plan(plan, group, rank, pg, bufs, buffers_per_round=rounds,
                                 workspace=workspace)
            want = _expected(case, group, plan)[rank]
            ok = all(torch.equal(g, w) for g, w in zip(bufs, want, strict=True))
            out.put((case.name, rank, ok, tuple(stats)))
    except BaseException as e:  # report instead of hanging the test
        out.put(("error", proc, False, repr(e)))


@pytest.fixture(scope="module")
def results() -> dict[tuple[str, int], tuple[bool, TransferStats]]:
    expected = sum(2 * len(PAIRS) if c.size == 2 else 4 for c in CASES)
    got = run_workers(_worker, 4, expected, preload="gyges.comm.kv_transfer")
    return {(name, rank): (ok, TransferStats(*stats)) for name, rank, ok, stats in got}


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_execute_plan_equals_apply_plan(case: Case, results: dict) -> None:
    for group in PAIRS if case.size == 2 else (QUAD,):
        plan = _plan(case, group)
        total = 0
        for rank in group:
            ok, stats = results[(case.name, rank)]
            assert ok, (case.name, rank)
            sent = sum(m.num_slots for m in plan.sends(rank) if m.dst_rank != rank)
            got = sum(m.num_slots for m in plan.receives(rank) if m.src_rank != rank)
            own = sum(m.num_slots for m in plan.sends(rank) if m.dst_rank == rank)
            width = sum(d * torch.empty(0, dtype=t).element_size() for d, t in SPECS)
            assert stats[:3] == (sent * width, got * width, own * width)
            assert stats.elapsed_ms > 0
            total += stats.bytes_sent + stats.bytes_local
        assert total == sum(plan.bytes_moved(d, torch.empty(0, dtype=t).element_size())
                            for d, t in SPECS)
        if case.k_from:
            assert plan.num_slots_moved > 0  # the seeds give every case something to move


# -- in-process: runs, checks, a group of one -----------------------------------------------


def test_pair_runs_coalesce_across_blocks_in_wire_order() -> None:
    moves = (
        BlockMove(0, 1, 1, 0, ((4, 8),)),  # rows 12..16 -> 4..8
        BlockMove(0, 2, 1, 1, ((0, 2), (6, 8))),  # 16..18 -> 8..10, then 22..24 -> 14..16
    )
    runs = pair_runs(moves, slots=8)
    assert runs.src == ((12, 18), (22, 24))
    assert runs.dst == ((4, 10), (14, 16))
    assert runs.rows == 8
    with pytest.raises(ValueError, match="outside 8 slots"):
        pair_runs((BlockMove(0, 0, 1, 0, ((4, 9),)),), slots=8)


@pytest.fixture(scope="module")
def solo_pg():
    store = start_store(30)
    return new_gloo_group(store, "solo", 0, 1, 30)


def test_group_of_one_applies_local_cycles(solo_pg) -> None:
    moves = (BlockMove(5, 0, 5, 1, ((0, 3),)), BlockMove(5, 1, 5, 2, ((0, 3),)),
             BlockMove(5, 2, 5, 0, ((0, 3),)))
    plan = TransferPlan(moves, (5,))
    bufs = [torch.randn(3, 4, 2), torch.randn(3, 4, 5).double()]
    want = [b.clone() for b in bufs]
    for w in want:
        apply_plan(plan, {5: w})
    stats = execute_plan(plan, (5,), 5, solo_pg, bufs)
    assert all(torch.equal(b, w) for b, w in zip(bufs, want, strict=True))
    assert stats[:3] == (0, 0, 9 * (2 * 4 + 5 * 8))


@pytest.mark.parametrize("dtype, dim", [(torch.uint8, 3), (torch.float16, 3),
                                        (torch.float32, 3), (torch.float64, 1)])
def test_rows_of_any_width(solo_pg, dtype: torch.dtype, dim: int) -> None:
    """Rows move as the widest word dividing D * elem_size (1, 2, 4 or 8 bytes)."""
    moves = (BlockMove(5, 0, 5, 1, ((1, 3),)), BlockMove(5, 1, 5, 0, ((0, 2),)))
    plan = TransferPlan(moves, (5,))
    buf = (torch.arange(2 * 4 * dim) % 100).to(dtype).view(2, 4, dim)
    want = buf.clone()
    apply_plan(plan, {5: want})
    workspace = torch.empty(workspace_bytes(plan, 5, [buf]), dtype=torch.uint8)
    execute_plan(plan, (5,), 5, solo_pg, [buf], workspace=workspace)
    assert torch.equal(buf, want)


def test_execute_plan_refuses_mismatches(solo_pg) -> None:
    plan = TransferPlan((BlockMove(5, 0, 5, 3, ((0, 2),)),), (5,))
    buf = torch.zeros(4, 4, 2)
    with pytest.raises(ValueError, match="not in group"):
        execute_plan(plan, (5,), 4, solo_pg, [buf])
    with pytest.raises(ValueError, match="plan is for group"):
        execute_plan(plan, (6,), 6, solo_pg, [buf])
    with pytest.raises(ValueError, match="does not match"):
        execute_plan(TransferPlan(()), (5, 6), 5, solo_pg, [buf])
    with pytest.raises(ValueError, match="uses block 3"):
        execute_plan(plan, (5,), 5, solo_pg, [torch.zeros(2, 4, 2)])
    with pytest.raises(ValueError, match="sharing H and S"):
        execute_plan(plan, (5,), 5, solo_pg, [buf, torch.zeros(4, 5, 2)])
    with pytest.raises(ValueError, match="buffers_per_round"):
        execute_plan(plan, (5,), 5, solo_pg, [buf], buffers_per_round=-1)
    assert workspace_bytes(plan, 5, [buf, buf]) == 2 * 2 * 2 * 4  # 2 slots, 2 buffers
    # two rounds: the second is packed while the first is on the wire
    assert workspace_bytes(plan, 5, [buf, buf], buffers_per_round=1) == 2 * 2 * 2 * 4
    with pytest.raises(ValueError, match=">= 16 bytes"):
        execute_plan(plan, (5,), 5, solo_pg, [buf], workspace=torch.empty(15, dtype=torch.uint8))
