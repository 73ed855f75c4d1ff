from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gyges.core.migration_plan import (
    SplitRefused,
    half_pages,
    merge_offset,
    plan_split,
    used_ranges_by_segment,
)


def test_merge_offset_and_segments():
    assert merge_offset(0, 2, 100) == 0
    assert merge_offset(1, 2, 100) == 200
    with pytest.raises(ValueError):
        merge_offset(2, 1, 10)
    got = used_ranges_by_segment([1, 2, 3, 7, 12, 13, 29], 10, 3)
    assert got == {0: ((1, 4), (7, 8)), 1: ((2, 4),), 2: ((9, 10),)}
    with pytest.raises(ValueError):
        used_ranges_by_segment([30], 10, 3)


def test_half_pages_skip_each_half_padding_page():
    assert list(half_pages(0, 2, 4)) == [1, 2, 3]
    assert list(half_pages(1, 2, 4)) == [5, 6, 7]
    assert list(half_pages(1, 4, 4)) == list(range(9, 16))


def test_request_spanning_both_halves_is_copied_into_one():
    # k=2, S=8, page 1: half 0 usable slots 1..7, half 1 usable 9..15.
    plan = plan_split([[1, 2, 3, 9]], k=2, slots_per_replica=8, page_size=1)
    assert plan.halves == (0,)
    assert plan.copies == ((9, 4),)
    assert plan.rows == ((1, 2, 3, 4),)


def test_shared_prefix_is_copied_once_per_half():
    rows = [[1, 2, 3], [1, 2, 17, 18, 19], [1, 2, 20, 21, 22]]
    plan = plan_split(rows, k=2, slots_per_replica=16, page_size=1)
    assert plan.halves == (0, 1, 1)
    assert plan.rows[1][:2] == plan.rows[2][:2]  # still shared in half 1
    assert sorted(src for src, _ in plan.copies) == [1, 2]


def test_no_room_refuses():
    with pytest.raises(SplitRefused):
        plan_split([list(range(1, 16))], k=2, slots_per_replica=8, page_size=1)


@st.composite
def split_case(draw):
    k = draw(st.sampled_from([2, 4]))
    page = draw(st.sampled_from([1, 2, 4]))
    ppr = draw(st.integers(3, 8))
    s = ppr * page
    total_pages = k * ppr
    pages = st.lists(st.integers(1, total_pages - 1), min_size=1, max_size=4, unique=True)
    rows = []
    for pgs in draw(st.lists(pages, min_size=0, max_size=5)):
        rows.append([p * page + o for p in pgs for o in range(page)])
    return k, page, s, rows


@settings(max_examples=300, deadline=None)
@given(split_case())
def test_split_plan_invariants(case):
    k, page, s, rows = case
    try:
        plan = plan_split(rows, k=k, slots_per_replica=s, page_size=page)
    except SplitRefused:
        return
    ppr = s // page
    occupied = {slot // page for row in rows for slot in row}
    dsts = [d for _, d in plan.copies]
    assert len(dsts) == len(set(dsts)) and not set(dsts) & occupied
    copies = set(plan.copies)
    for row, new, h in zip(rows, plan.rows, plan.halves, strict=True):
        usable = set(half_pages(h, k, ppr))
        assert all(x // page in usable for x in new)
        for old, nxt in zip(row, new, strict=True):
            assert old % page == nxt % page
            assert nxt == old or (old // page, nxt // page) in copies
    # Requests of one half that shared a page still share it.
    for a in range(len(rows)):
        for b in range(len(rows)):
            if plan.halves[a] != plan.halves[b]:
                continue
            for x, nx in zip(rows[a], plan.rows[a], strict=True):
                for y, ny in zip(rows[b], plan.rows[b], strict=True):
                    if x == y:
                        assert nx == ny


def _plan_split_slot_by_slot(rows, *, k, slots_per_replica, page_size, reserved=()):
    """The set-based plan_split this module had before it was vectorised (reference)."""
    ppr = slots_per_replica // page_size
    usable = [set(half_pages(h, k, ppr)) for h in (0, 1)]
    pages_of = [sorted({int(s) // page_size for s in row}) for row in rows]
    occupied = set().union(*pages_of, {int(p) for p in reserved})
    free = [sorted(usable[h] - occupied, reverse=True) for h in (0, 1)]
    mapping: list[dict[int, int]] = [{}, {}]
    load, halves = [0, 0], []
    for pages in pages_of:
        inside = [sum(p in usable[h] for p in pages) for h in (0, 1)]
        first = 0 if (inside[0], -load[0]) >= (inside[1], -load[1]) else 1
        for h in (first, 1 - first):
            need = [p for p in pages if p not in usable[h] and p not in mapping[h]]
            if len(need) <= len(free[h]):
                for p in need:
                    mapping[h][p] = free[h].pop()
                halves.append(h)
                load[h] += len(pages)
                break
        else:
            raise SplitRefused("neither half")
    copies = tuple(sorted((src, dst) for m in mapping for src, dst in m.items()))
    new_rows = tuple(
        tuple(mapping[h].get(int(s) // page_size, int(s) // page_size) * page_size
              + int(s) % page_size for s in row)
        for row, h in zip(rows, halves, strict=True))
    return halves, copies, new_rows


@settings(max_examples=300, deadline=None)
@given(split_case(), st.lists(st.integers(0, 40), max_size=6), st.sampled_from(["list", "array"]))
def test_split_plan_equals_the_slot_by_slot_reference(case, reserved, kind):
    k, page, s, rows = case
    args = {"k": k, "slots_per_replica": s, "page_size": page,
            "reserved": [p for p in reserved if p < k * s // page]}
    given_rows = rows if kind == "list" else [np.asarray(r, dtype=np.int64) for r in rows]
    try:
        want = _plan_split_slot_by_slot(rows, **args)
    except SplitRefused:
        with pytest.raises(SplitRefused):
            plan_split(given_rows, **args)
        return
    plan = plan_split(given_rows, **args)
    assert (list(plan.halves), plan.copies, plan.rows) == want


@given(st.lists(st.integers(0, 3 * 16 - 1), max_size=60), st.sampled_from(["list", "tensor"]))
def test_used_ranges_by_segment_equals_slot_by_slot_grouping(slots, kind):
    """The vectorised grouping equals coalescing each slot's (s, s+1) per segment."""
    import torch

    from gyges.core.transfer_plan import coalesce_ranges

    want: dict[int, list] = {}
    for x in slots:
        want.setdefault(x // 16, []).append((x % 16, x % 16 + 1))
    arg = torch.tensor(slots, dtype=torch.int64) if kind == "tensor" else slots
    got = used_ranges_by_segment(arg, 16, 3)
    assert got == {i: coalesce_ranges(r) for i, r in sorted(want.items())}
