"""Distributed executor of a KV `TransferPlan`: every rank of an aligned group moves its part
of the plan over one process group, with one contiguous message per peer.

Engine-agnostic (torch only). Each rank holds its head-major `[H, S, D]` storages (K and V
of every layer; D and dtype may differ between them, H and S may not) and applies the same
plan to each. Per exchange round, rank r packs everything it sends to peer p into one
contiguous stretch of a send buffer, in `by_pair` order::

    send buffer of rank r (bytes)
    | to local rank 0 | to local rank 1 | ... |        one stretch per peer (own: empty)
      \\ buffer 0 rows | buffer 1 rows | ...           each: [rows, D * elem_size] uint8
          rows = the slot ranges of the moves (r -> p), move by move, range by range

then one `alltoall_base` exchanges all stretches and each rank unpacks what it received.
Moves inside one rank (`src_rank == dst_rank`) are staged the same way. All sources of a
round are read (packed or staged) before any destination is written, so the result equals
`transfer_plan.apply_plan` on all ranks' buffers, swaps and cycles included.

Slot ranges are contiguous `[S, D]` rows, so packing is one slice copy per range and
adjacent ranges of consecutive blocks are coalesced into one copy. On GPUs the same code
runs with CUDA buffers over an NCCL group (`alltoall_base` is an NCCL all-to-all); the
communicator pool builds gloo groups only so far.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.distributed as dist

from gyges.core.transfer_plan import BlockMove, TransferPlan

RowRun = tuple[int, int]  # half-open [start, end) in the `[H*S, D]` rows of a buffer


class TransferStats(NamedTuple):
    """What one rank moved: bytes to and from peers, bytes copied within itself, wall ms."""

    bytes_sent: int
    bytes_received: int
    bytes_local: int
    elapsed_ms: float


class PairRuns(NamedTuple):
    """Row runs of one (src, dst) pair: `src` on the sender, `dst` on the receiver, both in
    wire order and of equal total length `rows`."""

    src: tuple[RowRun, ...]
    dst: tuple[RowRun, ...]
    rows: int


def pair_runs(moves: Sequence[BlockMove], slots: int) -> PairRuns:
    """Row runs of `moves` in a buffer of `slots` slots per block: block b, slots [s, e)
    are rows [b*S + s, b*S + e). Consecutive runs that touch are coalesced on both sides
    together, so the wire order is unchanged."""
    src: list[list[int]] = []
    dst: list[list[int]] = []
    rows = 0
    for move in moves:
        for start, end in move.slot_ranges:
            if end > slots:
                raise ValueError(f"slot range [{start}, {end}) outside {slots} slots")
            a, b = move.src_block * slots + start, move.dst_block * slots + start
            n = end - start
            rows += n
            if src and src[-1][1] == a and dst[-1][1] == b:
                src[-1][1] += n
                dst[-1][1] += n
            else:
                src.append([a, a + n])
                dst.append([b, b + n])
    return PairRuns(tuple(map(tuple, src)), tuple(map(tuple, dst)), rows)  # type: ignore[arg-type]


def execute_plan(
    plan: TransferPlan,
    group_ranks: tuple[int, ...],
    rank: int,
    pg: dist.ProcessGroup,
    buffers: Sequence[torch.Tensor],
    *,
    buffers_per_round: int | None = None,
) -> TransferStats:
    """Apply `plan` to `buffers` on every rank of the group; collective over `pg`.

    `group_ranks[i]` is the host rank of `pg`'s rank i; `rank` is this process's host rank
    (plans use host ranks). Every member passes the same plan and the same number of
    buffers in the same order. `buffers_per_round` (e.g. 2: one layer's K and V) bounds
    the staging memory to that many buffers' moves per exchange; default: one exchange.
    """
    t0 = time.perf_counter()
    group = tuple(int(r) for r in group_ranks)
    me = _check_group(plan, group, rank, pg)
    slots = _check_buffers(buffers, plan)
    by_pair = plan.by_pair()
    runs = {pair: pair_runs(moves, slots) for pair, moves in by_pair.items()}
    exchanges = any(src != dst for src, dst in by_pair)
    if buffers_per_round is not None and buffers_per_round < 1:
        raise ValueError(f"buffers_per_round must be >= 1, got {buffers_per_round}")
    step = buffers_per_round or len(buffers)
    sent = received = local = 0
    for first in range(0, len(buffers), step):
        rows = [_rows(buf) for buf in buffers[first : first + step]]
        s, r, n = _round(runs, group, me, pg, rows, exchanges)
        sent, received, local = sent + s, received + r, local + n
    return TransferStats(sent, received, local, (time.perf_counter() - t0) * 1000)


def _round(
    runs: dict[tuple[int, int], PairRuns],
    group: tuple[int, ...],
    me: int,
    pg: dist.ProcessGroup,
    rows: Sequence[torch.Tensor],
    exchanges: bool,
) -> tuple[int, int, int]:
    """One exchange of `rows` (uint8 `[H*S, D*elem]` views): pack and stage, all-to-all,
    write. Returns (bytes sent, bytes received, bytes local)."""
    rank = group[me]
    width = sum(r.shape[1] for r in rows)  # bytes of one slot across this round's buffers
    empty = PairRuns((), (), 0)
    out_runs = [runs.get((rank, peer), empty) if peer != rank else empty for peer in group]
    in_runs = [runs.get((peer, rank), empty) if peer != rank else empty for peer in group]
    own = runs.get((rank, rank), empty)
    send = torch.empty(sum(p.rows for p in out_runs) * width, dtype=torch.uint8,
                       device=rows[0].device)
    _pack(send, [p.src for p in out_runs], rows)
    staged = torch.empty(own.rows * width, dtype=torch.uint8, device=send.device)
    _pack(staged, [own.src], rows)
    recv = torch.empty(sum(p.rows for p in in_runs) * width, dtype=torch.uint8,
                       device=send.device)
    if exchanges:
        pg.alltoall_base(recv, send, [p.rows * width for p in in_runs],
                         [p.rows * width for p in out_runs], dist.AllToAllOptions()).wait()
    _unpack(staged, [own.dst], rows)
    _unpack(recv, [p.dst for p in in_runs], rows)
    return send.numel(), recv.numel(), staged.numel()


def _pack(flat: torch.Tensor, stretches: Sequence[tuple[RowRun, ...]],
          rows: Sequence[torch.Tensor]) -> None:
    """Copy the runs of each stretch, buffer by buffer, into consecutive bytes of `flat`."""
    for view, buf in _walk(flat, stretches, rows):
        view.copy_(buf)


def _unpack(flat: torch.Tensor, stretches: Sequence[tuple[RowRun, ...]],
            rows: Sequence[torch.Tensor]) -> None:
    """Inverse of `_pack`: write consecutive bytes of `flat` into the runs."""
    for view, buf in _walk(flat, stretches, rows):
        buf.copy_(view)


def _walk(flat: torch.Tensor, stretches: Sequence[tuple[RowRun, ...]],
          rows: Sequence[torch.Tensor]):
    """(slice of `flat`, rows of a buffer) pairs in wire order: stretch, buffer, run."""
    offset = 0
    for stretch in stretches:
        for buf in rows:
            width = buf.shape[1]
            for start, end in stretch:
                n = (end - start) * width
                yield flat[offset : offset + n].view(end - start, width), buf[start:end]
                offset += n
    assert offset == flat.numel()


def _rows(buf: torch.Tensor) -> torch.Tensor:
    """`[H, S, D]` storage as uint8 rows `[H*S, D*elem_size]` (same memory)."""
    h, s, d = buf.shape
    return buf.view(h * s, d).view(torch.uint8)


def _check_group(plan: TransferPlan, group: tuple[int, ...], rank: int,
                 pg: dist.ProcessGroup) -> int:
    """This rank's index in `group`, after checking plan, group and pg agree."""
    if rank not in group:
        raise ValueError(f"rank {rank} is not in group {list(group)}")
    if plan.group_ranks and tuple(plan.group_ranks) != group:
        raise ValueError(f"plan is for group {list(plan.group_ranks)}, not {list(group)}")
    outside = {m.src_rank for m in plan.moves} | {m.dst_rank for m in plan.moves}
    outside -= set(group)
    if outside:
        raise ValueError(f"plan moves ranks {sorted(outside)} outside group {list(group)}")
    me = group.index(rank)
    if pg.size() != len(group) or pg.rank() != me:
        raise ValueError(f"process group (rank {pg.rank()} of {pg.size()}) does not match "
                         f"rank {rank} of group {list(group)}")
    return me


def _check_buffers(buffers: Sequence[torch.Tensor], plan: TransferPlan) -> int:
    """Slots per block S shared by all buffers (contiguous `[H, S, D]`, one H and S, with
    every block of the plan)."""
    if not buffers:
        raise ValueError("no buffers to transfer")
    shapes = {tuple(buf.shape[:2]) for buf in buffers}
    if any(buf.dim() != 3 or not buf.is_contiguous() for buf in buffers) or len(shapes) != 1:
        raise ValueError("buffers must be contiguous [H, S, D] tensors sharing H and S, got "
                         f"{[tuple(buf.shape) for buf in buffers]}")
    heads, slots = buffers[0].shape[:2]
    top = max((max(m.src_block, m.dst_block) for m in plan.moves), default=-1)
    if top >= heads:
        raise ValueError(f"plan uses block {top} but buffers have {heads} blocks")
    return slots
