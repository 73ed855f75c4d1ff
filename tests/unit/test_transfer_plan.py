from __future__ import annotations

from collections.abc import Mapping, Sequence
from itertools import pairwise

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gyges.core.kv_layout import HeadMajorLayout
from gyges.core.transfer_plan import (
    BlockMove,
    SlotRange,
    TransferPlan,
    apply_plan,
    block_location,
    coalesce_ranges,
    pages_to_slot_ranges,
    plan_transformation,
)

Used = dict[int, list[SlotRange]]


# -- simulation helpers -------------------------------------------------------------------


def _ranges(slots: int) -> st.SearchStrategy[list[SlotRange]]:
    pair = st.tuples(st.integers(0, slots), st.integers(0, slots)).map(lambda p: tuple(sorted(p)))
    return st.lists(pair, max_size=3)


@st.composite
def groups(draw: st.DrawFn, sizes: Sequence[int] = (1, 2, 4, 8)) -> tuple[int, int, int, Used]:
    """(group size n, H, S, used ranges per segment)."""
    n = draw(st.sampled_from(sizes))
    heads = n * draw(st.sampled_from([1, 2, 3]))
    slots = draw(st.integers(1, 10))
    used = {i: draw(_ranges(slots)) for i in range(n)}
    return n, heads, slots, used


def _originals(n: int, heads: int, slots: int, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(heads, slots, 2, generator=gen) for _ in range(n)]


def _masks(used: Mapping[int, Sequence[SlotRange]], n: int, slots: int) -> torch.Tensor:
    mask = torch.zeros(n, slots, dtype=torch.bool)
    for i, ranges in used.items():
        for start, end in ranges:
            mask[i, start:end] = True
    return mask


def _assert_state(
    bufs: Mapping[int, torch.Tensor],
    ranks: Sequence[int],
    originals: Sequence[torch.Tensor],
    mask: torch.Tensor,
    k: int,
) -> None:
    """Every rank holds the degree-k layout of `originals` on used slots."""
    heads = originals[0].shape[0]
    for j, rank in enumerate(ranks):
        base, r = (j // k) * k, j % k
        for block in range(heads):
            seg, head = base + block % k, (block // k) * k + r
            used = mask[seg]
            assert torch.equal(bufs[rank][block][used], originals[seg][head][used])


def _sub_plans(ranks: Sequence[int], k_from: int, k_to: int, heads: int, used: Used) -> list:
    """Plans for every aligned sub-group of size max(k_from, k_to) inside `ranks`."""
    n = max(k_from, k_to)
    return [
        plan_transformation(
            ranks[g : g + n], k_from, k_to, heads, {i - g: used[i] for i in range(g, g + n)}
        )
        for g in range(0, len(ranks), n)
    ]


def _run(bufs: dict[int, torch.Tensor], plans: Sequence[TransferPlan]) -> None:
    for plan in plans:
        apply_plan(plan, bufs)


# -- properties -----------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(group=groups(), first=st.integers(0, 3))
def test_merge_then_split_restores_originals(group: tuple, first: int) -> None:
    n, heads, slots, used = group
    ranks = [first * n + j for j in range(n)]  # an aligned group somewhere on the host
    originals = _originals(n, heads, slots)
    bufs = {rank: originals[j].clone() for j, rank in enumerate(ranks)}
    mask = _masks(used, n, slots)

    apply_plan(plan_transformation(ranks, 1, n, heads, used, slots_per_replica=slots), bufs)
    _assert_state(bufs, ranks, originals, mask, n)
    apply_plan(plan_transformation(ranks, n, 1, heads, used), bufs)
    for j, rank in enumerate(ranks):
        assert torch.equal(bufs[rank][:, mask[j]], originals[j][:, mask[j]])


@settings(max_examples=40, deadline=None)
@given(group=groups(sizes=(2, 4, 8)), data=st.data())
def test_merged_view_matches_token_major_reference(group: tuple, data: st.DataObject) -> None:
    n, heads, slots, used = group
    k = data.draw(st.sampled_from([d for d in (1, 2, 4, 8) if d <= n]))
    ranks = list(range(n))
    originals = _originals(n, heads, slots, seed=1)
    bufs = {j: originals[j].clone() for j in ranks}
    _run(bufs, _sub_plans(ranks, 1, k, heads, used))

    layout = HeadMajorLayout(heads, slots, 2)
    mask = _masks(used, n, slots)
    for base in range(0, n, k):
        # one token-major pool [k*S, H, D] of the sub-group: slot i*S + s = replica i's slot s
        big = torch.cat([layout.tp1_view(originals[base + i]) for i in range(k)])
        used_merged = mask[base : base + k].reshape(-1)
        for r in range(k):
            view = layout.merged_view(bufs[base + r], k)
            assert torch.equal(view[used_merged], big[:, r::k, :][used_merged])


@settings(max_examples=40, deadline=None)
@given(group=groups(sizes=(1, 2, 4, 8)))
def test_merge_from_tp1_moves_exactly_k_minus_1_over_k(group: tuple) -> None:
    k, heads, _, used = group
    plan = plan_transformation(range(k), 1, k, heads, used)
    used_bytes = sum(e - s for r in used.values() for s, e in coalesce_ranges(r)) * heads * 2 * 4
    assert plan.bytes_moved(head_dim=2, elem_size=4) * k == (k - 1) * used_bytes
    split = plan_transformation(range(k), k, 1, heads, used)
    assert split.num_slots_moved == plan.num_slots_moved


@settings(max_examples=40, deadline=None)
@given(group=groups(sizes=(2, 4, 8)), data=st.data())
def test_every_move_is_needed_and_writes_are_unique(group: tuple, data: st.DataObject) -> None:
    n, heads, _, used = group
    degrees = [d for d in (1, 2, 4, 8) if d <= n]
    k_from = data.draw(st.sampled_from(degrees))
    k_to = n if k_from < n else data.draw(st.sampled_from(degrees))
    plan = plan_transformation(range(n), k_from, k_to, heads, used)

    written, read = set(), set()
    for move in plan.moves:
        assert (move.src_rank, move.src_block) != (move.dst_rank, move.dst_block)
        assert move.slot_ranges == coalesce_ranges(move.slot_ranges) and move.slot_ranges
        for start, end in move.slot_ranges:
            for slot in range(start, end):
                dst = (move.dst_rank, move.dst_block, slot)
                src = (move.src_rank, move.src_block, slot)
                assert dst not in written and src not in read
                written.add(dst)
                read.add(src)
    # minimal: one head-slot per (head, used slot of segment) whose location changes
    expected = sum(
        len(range(s, e))
        for i, ranges in used.items()
        for s, e in coalesce_ranges(ranges)
        for h in range(heads)
        if block_location(h, i, k_from) != block_location(h, i, k_to)
    )
    assert plan.num_slots_moved == expected
    if k_to == 2 * k_from:  # one hierarchical step moves half of the used KV
        assert (
            2 * expected
            == sum(len(range(s, e)) for r in used.values() for s, e in coalesce_ranges(r)) * heads
        )


@settings(max_examples=40, deadline=None)
@given(group=groups(sizes=(2, 4, 8)), data=st.data())
def test_moves_are_pairwise_block_swaps(group: tuple, data: st.DataObject) -> None:
    n, heads, slots, _ = group
    k_from = data.draw(st.sampled_from([d for d in (1, 2, 4, 8) if d < n]))
    everything = {i: [(0, slots)] for i in range(n)}
    for a, b in ((k_from, n), (n, k_from)):
        plan = plan_transformation(range(n), a, b, heads, everything)
        pairs = {(m.src_rank, m.src_block, m.dst_rank, m.dst_block) for m in plan.moves}
        assert pairs == {(dr, db, sr, sb) for sr, sb, dr, db in pairs}


@settings(max_examples=25, deadline=None)
@given(group=groups(sizes=(4, 8)))
def test_hierarchical_steps_equal_direct(group: tuple) -> None:
    n, heads, slots, used = group
    ranks = list(range(10, 10 + n))  # global ranks need not start at 0
    originals = _originals(n, heads, slots, seed=2)
    mask = _masks(used, n, slots)
    direct = {rank: originals[j].clone() for j, rank in enumerate(ranks)}
    stepwise = {rank: originals[j].clone() for j, rank in enumerate(ranks)}

    apply_plan(plan_transformation(ranks, 1, n, heads, used), direct)
    k = 1
    while k < n:  # 1 -> 2 -> 4 (-> 8)
        _run(stepwise, _sub_plans(ranks, k, 2 * k, heads, used))
        k *= 2
        _assert_state(stepwise, ranks, originals, mask, k)
    _assert_state(direct, ranks, originals, mask, n)
    while k > 1:  # back down: n -> n/2 -> ... -> 1
        _run(stepwise, _sub_plans(ranks, k, k // 2, heads, used))
        k //= 2
        _assert_state(stepwise, ranks, originals, mask, k)
    # and mixed jumps: 1 -> n/2 -> n -> 1
    _run(stepwise, _sub_plans(ranks, 1, n // 2, heads, used))
    _run(stepwise, _sub_plans(ranks, n // 2, n, heads, used))
    _assert_state(stepwise, ranks, originals, mask, n)
    _run(stepwise, _sub_plans(ranks, n, 1, heads, used))
    _assert_state(stepwise, ranks, originals, mask, 1)


def test_tp1_to_tp2_example() -> None:
    # H=4: rank 0 keeps heads 0,2 of its own slots; sends heads 1,3 to rank 1 blocks 0,2.
    plan = plan_transformation([4, 5], 1, 2, 4, {0: [(0, 3)], 1: [(2, 4), (4, 5)]})
    assert plan.moves == (
        BlockMove(4, 1, 5, 0, ((0, 3),)),
        BlockMove(4, 3, 5, 2, ((0, 3),)),
        BlockMove(5, 0, 4, 1, ((2, 5),)),
        BlockMove(5, 2, 4, 3, ((2, 5),)),
    )
    assert plan.bytes_moved(head_dim=128, elem_size=2) == 2 * (3 + 3) * 128 * 2
    assert [m.dst_rank for m in plan.sends(4)] == [5, 5]
    assert len(plan.receives(4)) == 2
    assert set(plan.by_pair()) == {(4, 5), (5, 4)}
    assert plan_transformation([0, 1], 2, 2, 4, {0: [(0, 3)]}).moves == ()


def test_coalesce_and_pages() -> None:
    assert coalesce_ranges([(5, 7), (0, 2), (2, 3), (6, 9), (4, 4)]) == ((0, 3), (5, 9))
    assert coalesce_ranges([]) == ()
    assert pages_to_slot_ranges([3, 0, 1, 7], 4) == ((0, 8), (12, 16), (28, 32))
    assert pages_to_slot_ranges(torch.tensor([2, 3]), 16) == ((32, 64),)
    with pytest.raises(ValueError):
        coalesce_ranges([(3, 2)])
    with pytest.raises(ValueError):
        pages_to_slot_ranges([1], 0)


@settings(max_examples=50, deadline=None)
@given(ranges=_ranges(30))
def test_coalesce_preserves_the_union(ranges: list[SlotRange]) -> None:
    out = coalesce_ranges(ranges)
    assert {x for s, e in ranges for x in range(s, e)} == {x for s, e in out for x in range(s, e)}
    assert all(s < e for s, e in out)
    assert all(e1 < s2 for (_, e1), (s2, _) in pairwise(out))


@pytest.mark.parametrize(
    ("ranks", "k_from", "k_to", "heads", "used", "match"),
    [
        ([0, 1, 2], 1, 4, 4, {}, "group of 3"),
        ([1, 0], 1, 2, 4, {}, "ascending"),
        ([0, 1], 1, 2, 3, {}, "does not divide"),
        ([0, 1, 2], 1, 3, 6, {}, "power of two"),
        ([0, 1], 1, 2, 4, {2: [(0, 1)]}, "replica segment 2"),
        ([0, 1], 1, 2, 4, {0: [(0, 9)]}, "slots_per_replica"),
        ([0, 1], 1, 2, 4, {0: [(-1, 2)]}, "invalid slot range"),
    ],
)
def test_plan_validation(
    ranks: list, k_from: int, k_to: int, heads: int, used: Used, match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        plan_transformation(ranks, k_from, k_to, heads, used, slots_per_replica=8)


def test_apply_plan_needs_every_buffer() -> None:
    plan = plan_transformation([0, 1], 1, 2, 2, {0: [(0, 1)]})
    with pytest.raises(ValueError, match="no buffer"):
        apply_plan(plan, {0: torch.zeros(2, 1, 1)})


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 40), st.integers(0, 12)), max_size=12),
       st.sampled_from(["list", "generator"]))
def test_coalesce_ranges_equals_slot_by_slot_union(pairs, kind):
    """The vectorised coalescing: the union of the ranges, as maximal runs, sorted."""
    ranges = [(s, s + n) for s, n in pairs]
    slots = sorted({x for s, e in ranges for x in range(s, e)})
    want: list[tuple[int, int]] = []
    for x in slots:
        if want and want[-1][1] == x:
            want[-1] = (want[-1][0], x + 1)
        else:
            want.append((x, x + 1))
    got = coalesce_ranges(ranges if kind == "list" else (r for r in ranges))
    assert got == tuple(want) and all(type(v) is int for r in got for v in r)


def test_coalesce_ranges_rejects_negative_and_reversed():
    for bad in ([(-1, 2)], [(3, 1)], [(0, 1), (5, 4)]):
        with pytest.raises(ValueError, match="invalid slot range"):
            coalesce_ranges(bad)
    assert coalesce_ranges([]) == () and coalesce_ranges([(2, 2)]) == ()
