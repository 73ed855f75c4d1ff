"""KV transfer plans for a DP <-> TP transformation of one aligned group, in the head-major
layout of `kv_layout`.

Replica segment i (0 <= i < n, n = group size) is the slot range `[0, S)` that replica i of
the group owned at TP1; it keeps its identity through every transformation. At degree k the
data of (KV head h, segment i) lives at::

    base_k(i)  = (i // k) * k                       first local rank of i's sub-group
    local rank = base_k(i) + h % k                  interleaved head ownership
    block      = (h // k) * k + (i - base_k(i))     see kv_layout's block picture

A merge (k_to > k_from) and a split (k_to < k_from) are the same thing: move every used
(h, i) from its location at k_from to its location at k_to. Entries already in place are not
moved, so TP1 -> TPk moves exactly (k-1)/k of the used KV and k -> 2k moves half of it.
All plans here are for one `[H, S, D]` buffer (one layer, K or V): the same plan applies to
every layer and to both K and V.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from gyges.core.degrees import check_degree

if TYPE_CHECKING:  # the plans are plain integer math; only apply_plan touches tensors
    import torch

SlotRange = tuple[int, int]  # half-open [start, end) inside one replica segment [0, S)


class BlockMove(NamedTuple):
    """Copy `slot_ranges` of block `src_block` on `src_rank` into the same slots of block
    `dst_block` on `dst_rank` (global ranks). Ranges are coalesced, sorted and non-empty."""

    src_rank: int
    src_block: int
    dst_rank: int
    dst_block: int
    slot_ranges: tuple[SlotRange, ...]

    @property
    def num_slots(self) -> int:
        return sum(end - start for start, end in self.slot_ranges)


@dataclass(frozen=True)
class TransferPlan:
    """The moves of one transformation, for one `[H, S, D]` buffer.

    Invariants of plans built by `plan_transformation`: no move has src == dst (rank and
    block); no (dst_rank, dst_block, slot) is written twice; reading all sources before
    writing any destination (as `apply_plan` does) yields the target layout.
    """

    moves: tuple[BlockMove, ...]
    group_ranks: tuple[int, ...] = ()
    k_from: int = 0
    k_to: int = 0

    @property
    def num_slots_moved(self) -> int:
        """Head-slots moved: each is one `[D]` vector of one head of one token."""
        return sum(move.num_slots for move in self.moves)

    def bytes_moved(self, head_dim: int, elem_size: int) -> int:
        """Bytes crossing (or copied within) ranks for one buffer; multiply by 2 * layers for
        a whole model's K and V."""
        return self.num_slots_moved * head_dim * elem_size

    def sends(self, rank: int) -> tuple[BlockMove, ...]:
        """Moves whose source is `rank`."""
        return tuple(move for move in self.moves if move.src_rank == rank)

    def receives(self, rank: int) -> tuple[BlockMove, ...]:
        """Moves whose destination is `rank`."""
        return tuple(move for move in self.moves if move.dst_rank == rank)

    def by_pair(self) -> dict[tuple[int, int], tuple[BlockMove, ...]]:
        """Moves grouped by `(src_rank, dst_rank)`, in plan order: sender and receiver that
        walk the same pair's tuple agree on the order of the blocks on the wire."""
        out: dict[tuple[int, int], list[BlockMove]] = {}
        for move in self.moves:
            out.setdefault((move.src_rank, move.dst_rank), []).append(move)
        return {pair: tuple(moves) for pair, moves in out.items()}


def plan_digest(plan: TransferPlan) -> int:
    """A 64-bit fingerprint of everything that decides the bytes on the wire (group,
    degrees, every move in order). Members compare it before they move anything."""
    import hashlib

    h = hashlib.blake2b(digest_size=8)
    h.update(repr((tuple(plan.group_ranks), plan.k_from, plan.k_to)).encode())
    for move in plan.moves:
        h.update(repr(tuple(move)).encode())
    return int.from_bytes(h.digest(), "little")


def coalesce_ranges(ranges: Iterable[SlotRange]) -> tuple[SlotRange, ...]:
    """Sort half-open ranges and merge overlapping or adjacent ones; drop empty ranges.
    Raises ValueError on a negative start or an end before its start. Vectorised: a
    cutover coalesces every used range of a fragmented pool."""
    a = np.asarray(ranges if isinstance(ranges, (list, tuple)) else list(ranges),
                   dtype=np.int64).reshape(-1, 2)
    bad = (a[:, 0] < 0) | (a[:, 1] < a[:, 0])
    if bad.any():
        start, end = a[int(np.flatnonzero(bad)[0])].tolist()
        raise ValueError(f"invalid slot range [{start}, {end})")
    a = a[a[:, 1] > a[:, 0]]
    if not a.size:
        return ()
    a = a[np.lexsort((a[:, 1], a[:, 0]))]
    reach = np.maximum.accumulate(a[:, 1])
    first = np.flatnonzero(np.concatenate(([True], a[1:, 0] > reach[:-1])))
    ends = np.maximum.reduceat(a[:, 1], first)
    return tuple(zip(a[first, 0].tolist(), ends.tolist(), strict=True))


def pages_to_slot_ranges(pages: Iterable[int], page_size: int) -> tuple[SlotRange, ...]:
    """Coalesced slot ranges covering the given page indices (page p = slots
    `[p*page_size, (p+1)*page_size)`). Accepts ints, numpy or torch integer sequences."""
    if page_size < 1:
        raise ValueError(f"page_size must be >= 1, got {page_size}")
    ranges = []
    for page in pages:
        p = int(page)
        if p < 0:
            raise ValueError(f"negative page index {p}")
        ranges.append((p * page_size, (p + 1) * page_size))
    return coalesce_ranges(ranges)


def block_location(head: int, replica: int, k: int) -> tuple[int, int]:
    """`(local_rank, block)` inside the group where (head, replica segment) lives at degree k."""
    base = (replica // k) * k
    return base + head % k, (head // k) * k + (replica - base)


def plan_transformation(
    group_ranks: Sequence[int],
    k_from: int,
    k_to: int,
    num_kv_heads: int,
    used_slots: Mapping[int, Sequence[SlotRange]],
    *,
    slots_per_replica: int | None = None,
) -> TransferPlan:
    """Plan the KV moves that take an aligned group from degree `k_from` to degree `k_to`.

    `group_ranks`: global ranks of the group, ascending, exactly `max(k_from, k_to)` of them
    (local rank j = `group_ranks[j]`). `used_slots[i]`: used half-open ranges of replica
    segment i (missing key = nothing used); only these are moved. If `slots_per_replica`
    is given, ranges are checked against it. Moves are sorted by (src, dst, blocks).
    """
    check_degree(k_from, num_kv_heads)
    check_degree(k_to, num_kv_heads)
    ranks = tuple(int(r) for r in group_ranks)
    n = max(k_from, k_to)
    if len(ranks) != n:
        raise ValueError(f"group of {len(ranks)} ranks, expected max(k_from, k_to) = {n}")
    if any(a >= b for a, b in pairwise(ranks)):
        raise ValueError(f"group ranks must be strictly ascending, got {ranks}")
    segments = _used_segments(used_slots, n, slots_per_replica)

    moves = []
    for replica, ranges in sorted(segments.items()):
        for head in range(num_kv_heads):
            src_local, src_block = block_location(head, replica, k_from)
            dst_local, dst_block = block_location(head, replica, k_to)
            if (src_local, src_block) == (dst_local, dst_block):
                continue
            moves.append(
                BlockMove(ranks[src_local], src_block, ranks[dst_local], dst_block, ranges)
            )
    moves.sort()
    return TransferPlan(tuple(moves), ranks, k_from, k_to)


def _used_segments(
    used_slots: Mapping[int, Sequence[SlotRange]], n: int, slots_per_replica: int | None
) -> dict[int, tuple[SlotRange, ...]]:
    """Validated, coalesced, non-empty used ranges per replica segment."""
    out: dict[int, tuple[SlotRange, ...]] = {}
    for replica, ranges in used_slots.items():
        if not 0 <= int(replica) < n:
            raise ValueError(f"replica segment {replica} out of range for a group of {n}")
        merged = coalesce_ranges(ranges)
        if slots_per_replica is not None and merged and merged[-1][1] > slots_per_replica:
            raise ValueError(
                f"replica {replica}: range ends at {merged[-1][1]} > slots_per_replica "
                f"{slots_per_replica}"
            )
        if merged:
            out[int(replica)] = merged
    return out


def apply_plan(plan: TransferPlan, buffers: Mapping[int, torch.Tensor]) -> None:
    """Reference executor: apply `plan` in place to per-rank `[H, S, D]` buffers keyed by
    global rank. All sources are read into a staging copy before any destination is written,
    so swaps and cycles are correct. Used by tests and the CPU path."""
    missing = {m.src_rank for m in plan.moves} | {m.dst_rank for m in plan.moves}
    missing -= set(buffers)
    if missing:
        raise ValueError(f"no buffer for ranks {sorted(missing)}")
    staged: list[torch.Tensor] = []
    for move in plan.moves:
        src = buffers[move.src_rank][move.src_block]
        staged.extend(src[start:end].clone() for start, end in move.slot_ranges)
    chunks = iter(staged)
    for move in plan.moves:
        dst = buffers[move.dst_rank][move.dst_block]
        for start, end in move.slot_ranges:
            dst[start:end].copy_(next(chunks))
