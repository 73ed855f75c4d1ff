"""Pre-copy of a KV transfer plan while the old configuration keeps serving.

Engine-agnostic (torch only). :func:`precopy` runs the cross-rank moves of a plan over a
side process group (not the one serving uses), round by round, and keeps what each rank
receives in a staging tensor instead of writing it into the live buffers: the
destinations of a merge or split are still in use by the old configuration until the
cutover. :func:`apply_staged` later writes the staged rows whose slots are still valid
(not written since the snapshot the plan was made from) into place; the cutover moves
only the rest (see :mod:`gyges.switch.precopy`).

The wire format, the manifest check and the per-round headers are
:mod:`gyges.comm.kv_transfer`'s, so a peer on another plan fails cleanly here too.
Staging memory is what this rank receives: (k-1)/k of the used KV of its segment on a
TP1 -> TPk merge.
"""
from __future__ import annotations

import mmap
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch._C._distributed_c10d import AllgatherOptions

from gyges.comm import kv_transfer as kvt
from gyges.core.transfer_plan import BlockMove, TransferPlan, plan_digest


class PrecopyCancelled(kvt.KvTransferError):
    """The pre-copy was told to stop between two rounds."""


class PrecopyUnavailable(RuntimeError):
    """A member could not allocate its staging memory; every member raises it together,
    before any KV moves, and the side group stays usable (the caller stops the world
    instead)."""


@dataclass
class StagedRound:
    first: int  # index of the round's first buffer
    count: int  # buffers in the round
    recv: torch.Tensor  # what arrived, headers included, in wire order
    in_splits: list[int]  # words per peer stretch
    header_words: int


@dataclass
class StagedKV:
    """What :func:`precopy` received on one rank, ready for :func:`apply_staged`."""

    plan: TransferPlan
    slots: int  # slots per block of the buffers
    routes: kvt._Routes
    rounds: list[StagedRound]
    segment_slots: list[torch.Tensor]  # per peer: segment*slots + slot of each row received
    bytes_sent: int
    bytes_received: int
    elapsed_ms: float


def remote_moves(plan: TransferPlan) -> TransferPlan:
    """The part of ``plan`` that crosses ranks (what pre-copy moves)."""
    return TransferPlan(tuple(m for m in plan.moves if m.src_rank != m.dst_rank),
                        plan.group_ranks, plan.k_from, plan.k_to)


def local_moves(plan: TransferPlan) -> tuple[BlockMove, ...]:
    return tuple(m for m in plan.moves if m.src_rank == m.dst_rank)


def precopy(plan: TransferPlan, group_ranks: tuple[int, ...], rank: int,
            pg: dist.ProcessGroup, buffers: Sequence[torch.Tensor], *,
            buffers_per_round: int = 2,
            pace: Callable[[float], None] | None = None,
            cancelled: Callable[[], bool] | None = None,
            max_staging_bytes: int | None = None) -> StagedKV:
    """Run the cross-rank moves of ``plan`` over ``pg`` and stage what arrives; collective
    over the group like :func:`gyges.comm.kv_transfer.execute_plan`. Reads ``buffers``
    while others write them: a row written after the plan's snapshot must be discarded
    by the caller (:func:`apply_staged`'s ``keep``). ``pace(seconds of the last round)``
    runs between rounds (throttling); ``cancelled()`` is checked there too. A member whose
    staging (what it receives, plus one round's send buffer) exceeds ``max_staging_bytes``
    or cannot be allocated makes every member raise :class:`PrecopyUnavailable`."""
    t0 = time.perf_counter()
    if local_moves(plan):
        raise ValueError("pre-copy moves only across ranks; local moves belong to the cutover")
    group = tuple(int(r) for r in group_ranks)
    kvt._check_group(plan, group, rank, pg)
    slots = kvt._check_buffers(buffers, plan)
    if buffers_per_round < 1:
        raise ValueError(f"buffers_per_round must be >= 1, got {buffers_per_round}")
    routes = kvt._routes(plan, group, rank, slots, buffers[0].device)
    digest = plan_digest(plan) & ((1 << 62) - 1)
    segs = _segment_slots(plan, group, rank, slots)
    rounds: list[StagedRound] = []
    sent = received = 0
    if not routes.exchanges:
        return StagedKV(plan, slots, routes, rounds, segs, 0, 0, _ms(t0))
    word = kvt._word_dtype(buffers)
    me = routes.me
    head = kvt.HEADER_BYTES // word.itemsize
    firsts = list(range(0, len(buffers), buffers_per_round))
    widths = [sum(kvt._rows(b, word).shape[1] for b in buffers[f : f + buffers_per_round])
              for f in firsts]
    splits = [[idx.numel() * w + head * (p != me) for p, idx in enumerate(routes.recv)]
              for w in widths]
    sends = [sum(idx.numel() * w + head * (p != me) for p, idx in enumerate(routes.send))
             for w in widths]
    # one staging buffer for every round (what this rank receives) and one send buffer
    # reused by each round: on CPU anonymous mmaps, unmapped when the pre-copy is dropped
    # (glibc would keep freed chunks of this size in its heap, resident)
    need = (sum(map(sum, splits)) + max(sends)) * word.itemsize
    why = ""
    try:
        if max_staging_bytes is not None and need > max_staging_bytes:
            raise MemoryError(f"{need} staging bytes needed, the limit is {max_staging_bytes}")
        stage = _flat(sum(map(sum, splits)) * word.itemsize, buffers[0].device).view(word)
        send_ws = _flat(max(sends) * word.itemsize, buffers[0].device)
    except (MemoryError, RuntimeError, OSError) as e:  # mmap raises OSError
        why = f"rank {rank}: {type(e).__name__}: {e}"
    _agree_staging(pg, me, len(group), not why, why)
    kvt._agree_manifest(routes, pg, buffers, buffers_per_round, digest)
    offset = 0
    for i, first in enumerate(firsts):
        if cancelled is not None and cancelled():
            raise PrecopyCancelled(f"pre-copy cancelled before round {i}")
        t1 = time.perf_counter()
        bufs = buffers[first : first + buffers_per_round]
        recv = stage[offset : offset + sum(splits[i])]
        offset += recv.numel()
        started = kvt._start(routes, pg, bufs, send_ws, (i, digest), recv_out=recv)
        kvt._wait_checked(routes, started)
        rounds.append(StagedRound(first, len(bufs), recv, splits[i], head))
        sent, received = sent + started.sent, received + started.received
        if pace is not None:
            pace(time.perf_counter() - t1)
    return StagedKV(plan, slots, routes, rounds, segs, sent, received, _ms(t0))


def apply_staged(staged: StagedKV, buffers: Sequence[torch.Tensor],
                 keep: torch.Tensor) -> int:
    """Write the staged rows whose merged slot id (segment * slots + slot) is set in the
    bool tensor ``keep`` into their destinations in ``buffers`` (the same buffers, in the
    same order, as the pre-copy). Returns the bytes written."""
    written = 0
    if not staged.rounds:
        return 0
    word = staged.rounds[0].recv.dtype
    keep = keep.to(torch.bool)
    for rnd in staged.rounds:
        rows = [kvt._rows(b, word) for b in buffers[rnd.first : rnd.first + rnd.count]]
        offset = 0
        for p, n in enumerate(rnd.in_splits):
            index = staged.routes.recv[p]
            if p != staged.routes.me and index.numel():
                sel = keep[staged.segment_slots[p]]
                pos = torch.nonzero(sel).flatten() if not bool(sel.all()) else None
                flat = rnd.recv[offset + rnd.header_words : offset + n]
                dst = index if pos is None else index.index_select(0, pos)
                runs = kvt.row_runs(dst, pos)  # same for every buffer of the round
                for view, buf, _ in kvt._walk(flat, [index], rows):
                    if pos is None or runs is not None:
                        kvt.scatter_rows(buf, dst, view, runs)
                        written += dst.numel() * view.shape[1] * view.element_size()
                    elif pos.numel():
                        buf.index_copy_(0, dst, view.index_select(0, pos))
                        written += dst.numel() * view.shape[1] * view.element_size()
            offset += n
    return written


def _agree_staging(pg: dist.ProcessGroup, me: int, n: int, ok: bool, why: str) -> None:
    """All-gather whether each member holds its staging; all raise alike if one does not."""
    mine = torch.tensor([int(ok)], dtype=torch.int64)
    got = [torch.empty_like(mine) for _ in range(n)]
    opts = AllgatherOptions()
    opts.timeout = timedelta(seconds=kvt.TIMEOUT_FLOOR_S)
    try:
        pg.allgather([got], [mine], opts).wait()
    except Exception as e:
        raise kvt.KvTransferError(f"pre-copy staging agreement failed: {e}") from e
    missing = [p for p, x in enumerate(got) if not int(x)]
    if missing:
        raise PrecopyUnavailable(f"no staging memory for the pre-copy on member(s) "
                                 f"{missing}" + (f" ({why})" if why else ""))


def _flat(nbytes: int, device: torch.device) -> torch.Tensor:
    """A flat uint8 buffer; on CPU its own anonymous mmap (returned to the system when the
    last view is dropped)."""
    if device.type == "cpu" and nbytes > 0:
        return torch.frombuffer(mmap.mmap(-1, nbytes), dtype=torch.uint8)
    return torch.empty(nbytes, dtype=torch.uint8, device=device)


def _segment_slots(plan: TransferPlan, group: tuple[int, ...], rank: int,
                   slots: int) -> list[torch.Tensor]:
    """Per peer p (local index), the merged slot id of each row p sends this rank, in wire
    order (the order of ``pair_runs``: moves of the pair in plan order, ranges in order)."""
    by_pair = plan.by_pair()
    out = []
    for peer in group:
        ids: list[torch.Tensor] = []
        for move in by_pair.get((peer, rank), ()) if peer != rank else ():
            src_local = group.index(move.src_rank)
            base = (src_local // plan.k_from) * plan.k_from
            segment = base + move.src_block % plan.k_from
            ids.extend(torch.arange(segment * slots + a, segment * slots + b)
                       for a, b in move.slot_ranges)
        out.append(torch.cat(ids) if ids else torch.empty(0, dtype=torch.int64))
    return out


def _ms(t0: float) -> float:
    return round((time.perf_counter() - t0) * 1000, 3)


def cutover_plan(full: TransferPlan, again: TransferPlan) -> TransferPlan:
    """The moves left for the cutover: every local move of ``full`` (the plan over what is
    used now; cheap copies inside a rank) and the cross-rank moves of ``again`` (the plan
    over the used slots whose staged copy is missing or stale)."""
    moves = sorted((*local_moves(full), *remote_moves(again).moves))
    return TransferPlan(tuple(moves), full.group_ranks, full.k_from, full.k_to)
