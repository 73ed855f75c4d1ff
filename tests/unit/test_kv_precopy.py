"""Pre-copy + cutover equals a stop-the-world transfer, across real processes (gloo).

Each case: a snapshot of used slots, the cross-rank moves of its plan pre-copied into
staging; then the old configuration "serves": some snapshot slots are written again, some
are freed, new ones are used; the cutover moves the written and new slots plus every local
move, and the staged clean rows are applied. The result must equal `apply_plan` of the
plan over what is used now, on the mutated buffers, bit for bit.
"""
from __future__ import annotations

import multiprocessing as mp
import random
from typing import NamedTuple

import pytest
import torch
from gloo_procs import run_workers

from gyges.comm import kv_transfer as kvt
from gyges.comm.kv_precopy import (
    PrecopyUnavailable,
    apply_staged,
    cutover_plan,
    local_moves,
    precopy,
    remote_moves,
)
from gyges.comm.kv_transfer import execute_plan
from gyges.comm.pool import connect_store, new_gloo_group
from gyges.core.transfer_plan import (
    BlockMove,
    TransferPlan,
    apply_plan,
    block_location,
    plan_transformation,
)

HEADS, SLOTS, LAYERS = 4, 40, 2
SPECS = [(8, torch.float32), (4, torch.bfloat16)] * LAYERS
PAIR = (2, 3)
QUAD = (4, 5, 6, 7)


class Case(NamedTuple):
    name: str
    size: int
    k_from: int
    k_to: int


CASES = (
    Case("merge 1->2", 2, 1, 2),
    Case("split 2->1", 2, 2, 1),
    Case("merge 1->4", 4, 1, 4),
    Case("merge 2->4", 4, 2, 4),
    Case("split 4->2", 4, 4, 2),
    Case("split 4->1", 4, 4, 1),
)


class Story(NamedTuple):
    snapshot: dict[int, set[int]]  # segment -> used slots at the snapshot
    written: dict[int, set[int]]  # written again after the snapshot (before or during)
    now: dict[int, set[int]]  # used at the cutover


def _story(case: Case) -> Story:
    rng = random.Random(case.name)
    snap, written, now = {}, {}, {}
    for i in range(case.size):
        used = set(rng.sample(range(SLOTS), rng.randint(5, 30)))
        freed = set(rng.sample(sorted(used), len(used) // 5))
        fresh = set(rng.sample(range(SLOTS), 6)) - used
        again = set(rng.sample(sorted(used - freed), len(used - freed) // 4))
        snap[i], now[i] = used, (used - freed) | fresh
        written[i] = again | fresh | set(rng.sample(sorted(freed), len(freed) // 2))
    return Story(snap, written, now)


def _ranges(slots: dict[int, set[int]]) -> dict[int, list[tuple[int, int]]]:
    return {i: [(s, s + 1) for s in sorted(x)] for i, x in slots.items()}


def _buffers(seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(HEADS, SLOTS, d, generator=gen).to(dtype) for d, dtype in SPECS]


def _write(case: Case, group: tuple[int, ...], rank: int, bufs: list[torch.Tensor],
           slots: dict[int, set[int]], seed: int) -> None:
    """The old configuration writes `slots` of each segment (every head) on this rank."""
    gen = torch.Generator().manual_seed(seed)
    me = group.index(rank)
    for seg, xs in sorted(slots.items()):
        for head in range(HEADS):
            local, block = block_location(head, seg, case.k_from)
            for buf in bufs:
                noise = torch.randn(SLOTS, buf.shape[2], generator=gen).to(buf.dtype)
                if local == me and xs:
                    idx = torch.tensor(sorted(xs))
                    buf[block, idx] = noise[idx]


def _worker(port: int, proc: int, out: mp.Queue) -> None:
    torch.set_num_threads(1)
    try:
        store = connect_store(port, 30)
        groups = {2: (PAIR, new_gloo_group(store, "pair", proc, 2, 30)) if proc < 2 else None,
                  4: (QUAD, new_gloo_group(store, "quad", proc, 4, 30))}
        for n, case in enumerate(CASES):
            kvt.MIN_RUN_ROWS = 2 if n % 2 else 256  # every other case applies by slices
            if groups[case.size] is None:
                continue
            group, pg = groups[case.size]  # type: ignore[misc]
            rank = group[proc]
            story = _story(case)
            full_then = plan_transformation(group, case.k_from, case.k_to, HEADS,
                                            _ranges(story.snapshot))
            bufs = _buffers(n * 10 + proc)
            early = {i: set(sorted(x)[::2]) for i, x in story.written.items()}
            late = {i: x - early[i] for i, x in story.written.items()}
            _write(case, group, rank, bufs, early, 1000 + n)  # before the pre-copy reads
            staged = precopy(remote_moves(full_then), group, rank, pg, bufs)
            _write(case, group, rank, bufs, late, 2000 + n)  # after it
            before = [b.clone() for b in bufs]
            full = plan_transformation(group, case.k_from, case.k_to, HEADS,
                                       _ranges(story.now))
            stale = {i: story.now[i] & (story.written[i] | (story.now[i] - story.snapshot[i]))
                     for i in story.now}
            again = plan_transformation(group, case.k_from, case.k_to, HEADS, _ranges(stale))
            cut = cutover_plan(full, again)
            stats = execute_plan(cut, group, rank, pg, bufs, buffers_per_round=2)
            keep = torch.zeros(case.size * SLOTS, dtype=torch.bool)
            for i in story.now:
                for x in story.now[i] & story.snapshot[i] - story.written[i]:
                    keep[i * SLOTS + x] = True
            applied = apply_staged(staged, bufs, keep)
            # what a stop-the-world transfer of `full` gives on every rank's mutated buffers
            everyone = {}
            for p, r in enumerate(group):
                mine = _buffers(n * 10 + p)
                _write(case, group, r, mine, early, 1000 + n)
                _write(case, group, r, mine, late, 2000 + n)
                everyone[r] = mine
            assert torch.equal(everyone[rank][0], before[0])
            for b in range(len(SPECS)):
                apply_plan(full, {r: x[b] for r, x in everyone.items()})
            ok = all(torch.equal(g, w) for g, w in zip(bufs, everyone[rank], strict=True))
            out.put((case.name, rank, ok, staged.bytes_received, stats.bytes_received,
                     applied, len(local_moves(full))))
        if groups[2] is not None:  # one member without staging memory: all stop, together
            group, pg = groups[2]
            rank = group[proc]
            case = CASES[0]
            plan = remote_moves(plan_transformation(group, 1, 2, HEADS,
                                                    _ranges(_story(case).snapshot)))
            try:
                precopy(plan, group, rank, pg, _buffers(proc),
                        max_staging_bytes=1 if proc == 0 else None)
                refused = ""
            except PrecopyUnavailable as e:
                refused = str(e)
            again = precopy(plan, group, rank, pg, _buffers(proc))  # the group still works
            out.put(("unavailable", rank, "member(s) [0]" in refused, again.bytes_received,
                     0, 0, 0))
    except BaseException:
        import traceback
        out.put(("error", proc, False, traceback.format_exc()))


@pytest.fixture(scope="module")
def results() -> dict:
    expected = sum(case.size for case in CASES) + 2
    got = run_workers(_worker, 4, expected, preload="gyges.comm.kv_precopy")
    return {(g[0], g[1]): g[2:] for g in got}


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_precopy_then_cutover_equals_stop_the_world(case: Case, results: dict) -> None:
    group = PAIR if case.size == 2 else QUAD
    staged_total = cutover_total = 0
    for rank in group:
        ok, staged, cut, applied, _ = results[(case.name, rank)]
        assert ok, (case.name, rank)
        staged_total, cutover_total = staged_total + staged, cutover_total + cut
        assert applied <= staged
    assert staged_total > 0
    assert cutover_total < staged_total  # only written and new slots cross again


def test_a_member_without_staging_makes_all_refuse_and_the_group_stays_usable(
        results: dict) -> None:
    for rank in PAIR:
        refused_together, again, *_ = results[("unavailable", rank)]
        assert refused_together, rank
        assert again > 0


def test_precopy_refuses_local_moves() -> None:
    plan = TransferPlan((BlockMove(0, 0, 0, 1, ((0, 4),)), BlockMove(0, 2, 1, 0, ((0, 4),))),
                        (0, 1), 1, 2)
    assert len(local_moves(plan)) == 1 and len(remote_moves(plan).moves) == 1
    with pytest.raises(ValueError, match="local moves"):
        precopy(plan, (0, 1), 0, None, [torch.zeros(HEADS, SLOTS, 8)])  # type: ignore[arg-type]
    again = TransferPlan((BlockMove(0, 3, 1, 1, ((5, 6),)),), (0, 1), 1, 2)
    assert cutover_plan(plan, again).moves == (plan.moves[0], again.moves[0])
