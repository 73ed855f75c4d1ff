"""Distributed executor of a KV `TransferPlan`: every rank of an aligned group moves its part
of the plan over one process group, with one contiguous message per peer.

Engine-agnostic (torch only). Each rank holds its head-major `[H, S, D]` storages (K and V
of every layer; D and dtype may differ between them, H and S may not) and applies the same
plan to each. Per exchange round, rank r packs everything it sends to peer p into one
contiguous stretch of a send buffer, in `by_pair` order::

    send buffer of rank r (bytes)
    | to local rank 0 | to local rank 1 | ... |        one stretch per peer (own: empty)
      \\ buffer 0 rows | buffer 1 rows | ...           each: [rows, D * elem_size] bytes
          rows = the slot ranges of the moves (r -> p), move by move, range by range

then one `alltoall_base` exchanges all stretches and each rank unpacks what it received
(optionally in rounds of a few buffers, pipelined: see `execute_plan`).

Before the first round the members all-gather a fixed-size manifest (plan digest, rounds,
bytes per peer) and all refuse together, before anything moves, if they disagree: gloo
aborts the whole process (SIGABRT, not an exception) when a message's size differs from
the receive it lands in, so sizes must be agreed before any variable-size message.
Every stretch to a peer starts with a header of four int64 words (magic, round, payload
bytes, plan digest), sent even when the payload is empty. The receiver checks each header
before it writes a byte, so a peer running another plan, another round or another
collective fails the transformation with :class:`KvTransferError` instead of scattering
foreign bytes; every all-to-all has a timeout scaled to its bytes (`round_timeout_s`).
Moves inside one rank (`src_rank == dst_rank`) are staged the same way. All sources of a
round are read (packed or staged) before any destination is written, so the result equals
`transfer_plan.apply_plan` on all ranks' buffers, swaps and cycles included.

A slot range of a block is a run of contiguous `[D]` rows of the `[H*S, D]` storage (runs
of consecutive blocks that touch are coalesced). Packing a stretch is one `index_select`
of the runs' rows per buffer, unpacking one `index_copy_`, rows moved as int64 words where
D * elem_size allows: with fragmented pages (hundreds of runs per block) one slice copy per
run costs more in dispatch than in bytes. On GPUs the same code runs with CUDA buffers over
an NCCL group (`alltoall_base` is an NCCL all-to-all, the gathers are kernels); the
communicator pool builds gloo groups only so far.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from datetime import timedelta
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch._C._distributed_c10d import AllgatherOptions

from gyges.core.transfer_plan import BlockMove, TransferPlan, plan_digest

HEADER_MAGIC = 0x6779676573  # "gyges"
HEADER_BYTES = 32  # 4 int64 words: magic, round, payload bytes, plan digest
TIMEOUT_FLOOR_S = 10.0
TIMEOUT_BYTES_PER_S = 50e6  # far below loopback gloo (~800 MB/s) or any GPU link

RowRun = tuple[int, int]  # half-open [start, end) in the `[H*S, D]` rows of a buffer


class KvTransferError(RuntimeError):
    """A round of the exchange failed its checks (header, size) or timed out."""


def round_timeout_s(nbytes: int) -> float:
    """Bound of one all-to-all moving `nbytes` (sent + received) on one rank."""
    return TIMEOUT_FLOOR_S + nbytes / TIMEOUT_BYTES_PER_S


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
    workspace: torch.Tensor | None = None,
) -> TransferStats:
    """Apply `plan` to `buffers` on every rank of the group; collective over `pg`.

    `group_ranks[i]` is the host rank of `pg`'s rank i; `rank` is this process's host rank
    (plans use host ranks). Every member passes the same plan and the same number of
    buffers in the same order.

    `buffers_per_round` (e.g. 2: one layer's K and V): exchange that many buffers at a
    time, pipelined: round i+1 is packed and sent while round i's all-to-all is in flight,
    then round i is unpacked (rounds touch disjoint buffers). Default: one exchange.
    `workspace`: a flat uint8 tensor on the buffers' device of at least `workspace_bytes`
    to stage in, allocated once and reused (fresh staging memory is page-faulted in on
    every call: on the 2-core test VM ~40 ms per 32 MiB); default: allocate per call.
    """
    t0 = time.perf_counter()
    group = tuple(int(r) for r in group_ranks)
    _check_group(plan, group, rank, pg)
    slots = _check_buffers(buffers, plan)
    if buffers_per_round is not None and buffers_per_round < 1:
        raise ValueError(f"buffers_per_round must be >= 1, got {buffers_per_round}")
    need = workspace_bytes(plan, rank, buffers, buffers_per_round=buffers_per_round)
    _check_workspace(workspace, need)
    routes = _routes(plan, group, rank, slots, buffers[0].device)
    digest = plan_digest(plan) & ((1 << 62) - 1)
    step = buffers_per_round or len(buffers)
    if routes.exchanges:
        _agree_manifest(routes, pg, buffers, step, digest)
    half = need // 2 if len(buffers) > step else need  # two rounds in flight: two halves
    totals = [0, 0, 0]
    pending: _Round | None = None
    for i, first in enumerate(range(0, len(buffers), step)):
        space = None if workspace is None else workspace[(i % 2) * half : (i % 2 + 1) * half]
        started = _start(routes, pg, buffers[first : first + step], space, (i, digest))
        if pending is not None:  # round i-1 lands while round i is on the wire
            _finish(routes, pending)
        pending = started
        moved = (started.sent, started.received, started.staged)
        totals = [t + (x if isinstance(x, int) else x.numel() * x.element_size())
                  for t, x in zip(totals, moved, strict=True)]
    assert pending is not None
    _finish(routes, pending)
    return TransferStats(*totals, (time.perf_counter() - t0) * 1000)


def workspace_bytes(plan: TransferPlan, rank: int, buffers: Sequence[torch.Tensor], *,
                    buffers_per_round: int | None = None) -> int:
    """Staging bytes `execute_plan` needs on `rank` (send + local + receive of its largest
    round). Size a reusable workspace with the plan of a full pool for an upper bound."""
    slots = sum(m.num_slots for m in plan.moves if rank in (m.src_rank, m.dst_rank))
    step = buffers_per_round or max(len(buffers), 1)
    rounds = [buffers[i : i + step] for i in range(0, len(buffers), step)]
    peers = len(plan.group_ranks) - 1 if plan.group_ranks else 8
    headers = 2 * HEADER_BYTES * peers  # sent and received, per peer
    one = max((slots * sum(b.shape[2] * b.element_size() for b in r) for r in rounds),
              default=0) + headers
    return one if len(rounds) < 2 else 2 * one  # two rounds in flight


class _Routes(NamedTuple):
    """This rank's part of a plan as row indices (into `[H*S, ...]` rows), wire order."""

    me: int  # this rank's index in the group

    send: list[torch.Tensor]  # per local rank of the group: rows it gets from us
    recv: list[torch.Tensor]  # per local rank: our rows its stretch fills
    local_src: torch.Tensor
    local_dst: torch.Tensor
    exchanges: bool  # any cross-rank move at all (the same answer on every rank)


def _routes(plan: TransferPlan, group: tuple[int, ...], rank: int, slots: int,
            device: torch.device) -> _Routes:
    runs = {pair: pair_runs(moves, slots) for pair, moves in plan.by_pair().items()}
    empty = PairRuns((), (), 0)

    def index(src: int, dst: int, side: str) -> torch.Tensor:
        found = runs.get((src, dst), empty)
        return _run_index(found.src if side == "src" else found.dst, device)

    return _Routes(
        group.index(rank),
        [index(rank, peer, "src") if peer != rank else index(-1, -1, "src") for peer in group],
        [index(peer, rank, "dst") if peer != rank else index(-1, -1, "dst") for peer in group],
        index(rank, rank, "src"),
        index(rank, rank, "dst"),
        any(src != dst for src, dst in runs),
    )


class _Round(NamedTuple):
    """An exchange in flight: its buffers' word rows, the all-to-all and the staging."""

    rows: list[torch.Tensor]
    work: dist.Work | None
    send: torch.Tensor
    recv: torch.Tensor
    staged: torch.Tensor
    in_splits: list[int]
    expect: tuple[int, int]  # (round, plan digest)
    header_words: int
    timeout_s: float
    sent: int  # payload bytes (headers excluded)
    received: int


def _start(routes: _Routes, pg: dist.ProcessGroup, bufs: Sequence[torch.Tensor],
           workspace: torch.Tensor | None, expect: tuple[int, int],
           recv_out: torch.Tensor | None = None) -> _Round:
    """Pack and stage every read of `bufs`, then start their all-to-all. `recv_out`: receive
    into this flat tensor (of the round's word dtype and receive size) instead of the
    workspace, to keep what arrived (pre-copy)."""
    word = _word_dtype(bufs)
    rows = [_rows(buf, word) for buf in bufs]
    width = sum(r.shape[1] for r in rows)  # words of one slot across this round's buffers
    head = HEADER_BYTES // word.itemsize if routes.exchanges else 0
    peers = [p != routes.me for p in range(len(routes.send))]
    out_splits = [i.numel() * width + head * (p != routes.me) for p, i in enumerate(routes.send)]
    in_splits = [i.numel() * width + head * (p != routes.me) for p, i in enumerate(routes.recv)]
    sizes = (sum(out_splits), sum(in_splits), routes.local_src.numel() * width)
    own = (sizes[0], 0 if recv_out is not None else sizes[1], sizes[2])
    if workspace is None:
        send, recv, staged = (torch.empty(n, dtype=word, device=bufs[0].device) for n in own)
    else:
        send, recv, staged = workspace[: sum(own) * word.itemsize].view(word).split(own)
    if recv_out is not None:
        if recv_out.dtype != word or recv_out.numel() != sizes[1]:
            raise ValueError(f"recv_out must be {sizes[1]} words of {word}, got "
                             f"{recv_out.numel()} of {recv_out.dtype}")
        recv = recv_out
    offset = 0
    for p, (index, n) in enumerate(zip(routes.send, out_splits, strict=True)):
        if peers[p] and head:
            words = (HEADER_MAGIC, expect[0], (n - head) * word.itemsize, expect[1])
            send[offset : offset + head] = torch.tensor(words, dtype=torch.int64).view(word)
        _gather(send[offset + head * peers[p] : offset + n], [index], rows)
        offset += n
    _gather(staged, [routes.local_src], rows)
    work, timeout = None, round_timeout_s((sizes[0] + sizes[1]) * word.itemsize)
    if routes.exchanges:
        opts = dist.AllToAllOptions()
        opts.timeout = timedelta(seconds=timeout)
        work = pg.alltoall_base(recv, send, in_splits, out_splits, opts)
    payload = (sizes[0] - head * (len(peers) - 1)) * word.itemsize if head else \
        sizes[0] * word.itemsize
    got = (sizes[1] - head * (len(peers) - 1)) * word.itemsize if head else \
        sizes[1] * word.itemsize
    return _Round(rows, work, send, recv, staged, in_splits, expect, head, timeout,
                  payload, got)


def _finish(routes: _Routes, started: _Round) -> None:
    """Wait for a round's all-to-all, check every peer's header, then write its local
    and received rows."""
    head = _wait_checked(routes, started)
    offset = 0
    for p, n in enumerate(started.in_splits):
        if head and p != routes.me:
            _scatter(started.recv[offset + head : offset + n], [routes.recv[p]],
                     started.rows)
        offset += n
    _scatter(started.staged, [routes.local_dst], started.rows)


def _wait_checked(routes: _Routes, started: _Round) -> int:
    """Wait for a round's all-to-all and check every peer's header (nothing is written);
    returns the header length in words."""
    if started.work is not None:
        try:
            started.work.wait(timedelta(seconds=started.timeout_s))
        except Exception as e:
            raise KvTransferError(f"KV round {started.expect[0]} failed or timed out after "
                                  f"{started.timeout_s:.0f}s: {e}") from e
    head, word = started.header_words, started.recv.dtype
    offset = 0
    for p, n in enumerate(started.in_splits):
        if head and p != routes.me:
            got = tuple(started.recv[offset : offset + head].view(torch.int64).tolist())
            want = (HEADER_MAGIC, started.expect[0], (n - head) * word.itemsize,
                    started.expect[1])
            if got != want:
                raise KvTransferError(
                    f"KV round {started.expect[0]}: peer {p} sent header {got}, expected "
                    f"{want} (magic, round, bytes, plan digest): the members disagree on "
                    "the plan or the collective order")
        offset += n
    return head


def _agree_manifest(routes: _Routes, pg: dist.ProcessGroup, buffers: Sequence[torch.Tensor],
                    step: int, digest: int) -> None:
    """All-gather (digest, rounds, rows to each peer) and check, on every member, that all
    members run the same plan: each raises the same :class:`KvTransferError` otherwise."""
    n = len(routes.send)
    mine = torch.tensor([HEADER_MAGIC, digest, -(-len(buffers) // step),
                         *(i.numel() for i in routes.send)], dtype=torch.int64)
    got = [torch.empty_like(mine) for _ in range(n)]
    opts = AllgatherOptions()
    opts.timeout = timedelta(seconds=TIMEOUT_FLOOR_S)
    try:
        pg.allgather([got], [mine], opts).wait()
    except Exception as e:
        raise KvTransferError(f"KV manifest exchange failed: {e}") from e
    table = torch.stack(got)
    if (table[:, :3] != table[0, :3]).any():
        raise KvTransferError(f"members run different KV plans: (magic, digest, rounds) per "
                              f"member {table[:, :3].tolist()}")
    sends = table[:, 3:]  # [sender, receiver] rows
    for p in range(n):
        for q in range(n):
            if p != q and int(sends[p, q]) != _rows_from(routes, p, q, table):
                raise KvTransferError(f"members disagree on the KV rows {p} sends {q}")


def _rows_from(routes: _Routes, p: int, q: int, table: torch.Tensor) -> int:
    """Rows p sends q as the receiver q computed it (q's own routes are only known on q;
    every member checks the pairs it takes part in, the others by the sender's count)."""
    if q == routes.me:
        return routes.recv[p].numel()
    return int(table[p, 3 + q])


def _gather(flat: torch.Tensor, indices: Sequence[torch.Tensor],
            rows: Sequence[torch.Tensor]) -> None:
    """Fill `flat`: for each index (stretch), for each buffer, its indexed rows."""
    for view, buf, index in _walk(flat, indices, rows):
        torch.index_select(buf, 0, index, out=view)


def _scatter(flat: torch.Tensor, indices: Sequence[torch.Tensor],
             rows: Sequence[torch.Tensor]) -> None:
    """Inverse of `_gather`: write consecutive words of `flat` into the indexed rows."""
    runs: dict[int, list[tuple[int, int, int]] | None] = {}
    for view, buf, index in _walk(flat, indices, rows):
        if id(index) not in runs:  # the same index for every buffer of a stretch
            runs[id(index)] = row_runs(index)
        scatter_rows(buf, index, view, runs[id(index)])


# A row scatter copies ~3x slower than a contiguous copy on CPU (index_copy_ against
# memcpy, 256-byte rows), but a copy per run costs ~5 us of dispatch: long runs (used
# slots allocated contiguously) go by slices, fragmented ones (random pages) by index.
MIN_RUN_ROWS = 256


def row_runs(dst: torch.Tensor, src: torch.Tensor | None = None
             ) -> list[tuple[int, int, int]] | None:
    """``(dst row, src row, rows)`` runs where both ``dst`` and ``src`` (default: 0, 1, ..)
    step by one, or None when they average fewer than ``MIN_RUN_ROWS`` rows (scatter by
    index instead)."""
    n = dst.numel()
    if n < MIN_RUN_ROWS:
        return None
    brk = dst[1:] - dst[:-1] != 1
    if src is not None:
        brk |= src[1:] - src[:-1] != 1
    starts = torch.nonzero(brk).flatten() + 1
    if (starts.numel() + 1) * MIN_RUN_ROWS > n:
        return None
    bounds = [0, *starts.tolist(), n]
    firsts = torch.tensor(bounds[:-1], dtype=torch.int64, device=dst.device)
    d0 = dst[firsts].tolist()
    s0 = bounds[:-1] if src is None else src[firsts].tolist()
    return [(d, s, b - a) for d, s, a, b in zip(d0, s0, bounds[:-1], bounds[1:], strict=True)]


def scatter_rows(buf: torch.Tensor, index: torch.Tensor, view: torch.Tensor,
                 runs: list[tuple[int, int, int]] | None) -> None:
    """``buf[index] = view`` (``runs`` from :func:`row_runs` over ``index``), by slices when
    there are runs, else by one indexed copy."""
    if runs is None:
        buf.index_copy_(0, index, view)
        return
    for d, s, n in runs:
        buf[d : d + n].copy_(view[s : s + n])


def _walk(flat: torch.Tensor, indices: Sequence[torch.Tensor], rows: Sequence[torch.Tensor]):
    """(slice of `flat`, rows of a buffer, row index) in wire order: stretch, then buffer.
    One gather or scatter per buffer and peer whatever the number of runs: a copy per run
    costs ~15 us of dispatch, and random 16-slot pages give hundreds of runs per block."""
    offset = 0
    for index in indices:
        for buf in rows if index.numel() else ():
            n = index.numel() * buf.shape[1]
            yield flat[offset : offset + n].view(index.numel(), buf.shape[1]), buf, index
            offset += n
    assert offset == flat.numel()


def _run_index(runs: tuple[RowRun, ...], device: torch.device) -> torch.Tensor:
    """int64 rows of all `runs`, in order: [a0, a0+1, .., b0-1, a1, ..]."""
    if not runs:
        return torch.empty(0, dtype=torch.int64, device=device)
    bounds = torch.tensor(runs, dtype=torch.int64)
    lengths = bounds[:, 1] - bounds[:, 0]
    shift = bounds[:, 0] - (torch.cumsum(lengths, 0) - lengths)  # row - position in index
    index = torch.arange(int(lengths.sum())) + torch.repeat_interleave(shift, lengths)
    return index.to(device)


def _word_dtype(bufs: Sequence[torch.Tensor]) -> torch.dtype:
    """The widest integer word dividing every buffer's row of D elements: gathers and
    scatters move whole words (int64 rows copy ~5x faster than uint8 rows on CPU)."""
    row_bytes = [buf.shape[2] * buf.element_size() for buf in bufs]
    for word in (torch.int64, torch.int32, torch.int16):
        if all(b % word.itemsize == 0 for b in row_bytes):
            return word
    return torch.uint8


def _rows(buf: torch.Tensor, word: torch.dtype) -> torch.Tensor:
    """`[H, S, D]` storage as rows of words `[H*S, D*elem_size/word_size]` (same memory)."""
    h, s, d = buf.shape
    return buf.view(h * s, d).view(torch.uint8).view(word)


def _check_group(plan: TransferPlan, group: tuple[int, ...], rank: int,
                 pg: dist.ProcessGroup) -> None:
    """Check that plan, group, rank and pg agree."""
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


def _check_workspace(workspace: torch.Tensor | None, need: int) -> None:
    if workspace is not None and (workspace.dtype != torch.uint8 or workspace.dim() != 1
                                  or workspace.numel() < need):
        raise ValueError(f"workspace must be a flat uint8 tensor of >= {need} bytes, got "
                         f"{workspace.dtype} {tuple(workspace.shape)}")


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
