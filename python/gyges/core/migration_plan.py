"""Where in-flight requests' KV slots go when an aligned group merges or splits; pure math.

Slot spaces. A replica segment is one rank's slot range ``[0, S)`` (S = slots per replica,
a multiple of the page size P). An instance of degree k addresses ``k*S`` merged slots,
segment i of the instance holding merged slots ``[i*S, (i+1)*S)``. Merged page 0 is the
instance's padding page (never allocated); the first page of its other segments is an
ordinary page while merged. ::

    merge (two halves of degree k -> 2k):   new = j*k*S + old          (j = half 0 or 1)
    split (2k -> two halves of degree k):   new = old - h*k*S          (h = the request's half)

A merge only renumbers. A split first assigns each request to a half and copies the pages it
uses outside that half's usable pages into free pages of the half (shared prefix pages are
copied once per half), so every request then lies in one half.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from gyges.core.transfer_plan import SlotRange


def merge_offset(half: int, k_old: int, slots_per_replica: int) -> int:
    """Offset added to a half's merged slots when it joins a degree ``2*k_old`` instance."""
    if half not in (0, 1):
        raise ValueError(f"half must be 0 or 1, got {half}")
    return half * k_old * slots_per_replica


def used_ranges_by_segment(slots: Iterable[int], slots_per_replica: int,
                           num_segments: int) -> dict[int, tuple[SlotRange, ...]]:
    """Group merged slot ids into coalesced in-segment ranges per replica segment.
    Vectorised: a transformation's cutover plans over every used slot of the pool."""
    ids = np.unique(np.asarray(slots if hasattr(slots, "__array__") else list(slots),
                               dtype=np.int64).reshape(-1))
    if ids.size == 0:
        return {}
    bad = ids[(ids < 0) | (ids >= slots_per_replica * num_segments)]
    if bad.size:
        raise ValueError(f"slot {int(bad[0])} outside {num_segments} segments of "
                         f"{slots_per_replica}")
    seg = ids // slots_per_replica
    breaks = np.flatnonzero((np.diff(ids) != 1) | (np.diff(seg) != 0)) + 1
    starts = np.concatenate(([0], breaks))
    ends = np.concatenate((breaks, [ids.size]))
    run_seg = seg[starts]
    lo = ids[starts] - run_seg * slots_per_replica
    hi = lo + (ends - starts)
    out: dict[int, tuple[SlotRange, ...]] = {}
    for i in np.unique(run_seg).tolist():
        mine = run_seg == i
        out[i] = tuple(zip(lo[mine].tolist(), hi[mine].tolist(), strict=True))
    return out


@dataclass(frozen=True)
class SplitPlan:
    """Result of :func:`plan_split` (pages are merged page ids of the degree-k instance).

    ``halves[q]``: the half request q goes to. ``copies``: (src_page, dst_page) pairs to copy
    before the split, no dst is any request's page and no dst repeats. ``rows[q]``: request
    q's slots after the copies, all inside its half's usable pages."""

    halves: tuple[int, ...]
    copies: tuple[tuple[int, int], ...]
    rows: tuple[tuple[int, ...], ...]


class SplitRefused(ValueError):
    """No assignment fits: the group must stay merged."""


def half_pages(half: int, k: int, pages_per_replica: int) -> range:
    """Usable merged pages of ``half`` once split (its first page pads the new instance)."""
    width = (k // 2) * pages_per_replica
    return range(half * width + 1, (half + 1) * width)


def plan_split(rows: Sequence[Sequence[int]], *, k: int, slots_per_replica: int,
               page_size: int, reserved: Iterable[int] = ()) -> SplitPlan:
    """Assign each request (its merged slots ``rows[q]``: a sequence or a 1-d array) to one
    half of a degree-``k`` instance and plan the page copies that make every request lie in
    its half.

    A request goes to the half holding more of its pages (ties: the half with fewer
    assigned pages so far), or to the other half if the first has no room for its copies;
    raises :class:`SplitRefused` when neither has. A half's free pages are handed out in
    ascending order. ``reserved``: merged pages that are not free either (the prefix
    cache's), never a copy's destination. Deterministic: every member computes the same
    plan from the same rows. Vectorised per request: it runs inside a split's cutover."""
    if k < 2 or k % 2:
        raise ValueError(f"cannot split degree {k}")
    if slots_per_replica % page_size:
        raise ValueError(f"page size {page_size} does not divide {slots_per_replica} slots")
    ppr = slots_per_replica // page_size
    total = k * ppr
    bounds = [(r.start, r.stop) for r in (half_pages(h, k, ppr) for h in (0, 1))]
    slots = [np.asarray(row, dtype=np.int64).reshape(-1) for row in rows]
    pages_of = [np.unique(x // page_size) for x in slots]
    occupied = np.zeros(total, dtype=bool)
    for pages in pages_of:
        occupied[pages] = True
    res = np.fromiter((int(p) for p in reserved), dtype=np.int64)
    occupied[res[(res >= 0) & (res < total)]] = True
    free = [np.arange(lo, hi)[~occupied[lo:hi]] for lo, hi in bounds]
    taken = [0, 0]  # free[h][:taken[h]] are copy destinations already
    mapping = np.full((2, total), -1, dtype=np.int64)
    load = [0, 0]
    halves: list[int] = []
    for q, pages in enumerate(pages_of):
        inside = [(pages >= lo) & (pages < hi) for lo, hi in bounds]
        counts = [int(m.sum()) for m in inside]
        first = 0 if (counts[0], -load[0]) >= (counts[1], -load[1]) else 1
        for h in (first, 1 - first):
            need = pages[~inside[h] & (mapping[h, pages] < 0)]
            if need.size <= free[h].size - taken[h]:
                mapping[h, need] = free[h][taken[h]: taken[h] + need.size]
                taken[h] += need.size
                halves.append(h)
                load[h] += pages.size
                break
        else:
            raise SplitRefused(f"request {q} ({slots[q].size} slots) fits neither half of "
                               f"the degree-{k} instance; the group stays merged")
    copies = tuple(sorted((int(src), int(mapping[h, src])) for h in (0, 1)
                          for src in np.flatnonzero(mapping[h] >= 0)))
    new_rows = []
    for x, h in zip(slots, halves, strict=True):
        page, off = np.divmod(x, page_size)
        to = mapping[h, page]
        new_rows.append(tuple((np.where(to >= 0, to, page) * page_size + off).tolist()))
    return SplitPlan(tuple(halves), copies, tuple(new_rows))
