"""Run a KV :class:`TransferPlan` across the ranks of a group (interim executor; replaced by
the packed all-to-all executor of the kv-transfer branch)."""
from __future__ import annotations

import time
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.distributed as dist

from gyges.core.transfer_plan import TransferPlan


class TransferStats(NamedTuple):
    bytes_sent: int
    bytes_received: int
    bytes_local: int
    elapsed_ms: float


def _gather(plan_moves, buffers: Sequence[torch.Tensor]) -> torch.Tensor:
    parts = [buf[m.src_block, a:b].reshape(-1) for buf in buffers for m in plan_moves
             for a, b in m.slot_ranges]
    return torch.cat(parts) if parts else torch.empty(0, dtype=buffers[0].dtype)


def _scatter(plan_moves, buffers: Sequence[torch.Tensor], flat: torch.Tensor) -> None:
    off = 0
    for buf in buffers:
        d = buf.shape[2]
        for m in plan_moves:
            for a, b in m.slot_ranges:
                n = (b - a) * d
                buf[m.dst_block, a:b].copy_(flat[off:off + n].view(b - a, d))
                off += n


def execute_plan(plan: TransferPlan, group_ranks: tuple[int, ...], rank: int,
                 pg: dist.ProcessGroup, buffers: Sequence[torch.Tensor]) -> TransferStats:
    """Apply ``plan`` to this rank's ``[H, S, D]`` ``buffers`` (all read before any write)."""
    t0 = time.perf_counter()
    pairs = plan.by_pair()
    local = pairs.get((rank, rank), ())
    staged_local = _gather(local, buffers) if local else None
    sends = {dst: _gather(m, buffers) for (src, dst), m in pairs.items()
             if src == rank and dst != rank}
    recv_moves = {src: m for (src, dst), m in pairs.items() if dst == rank and src != rank}
    recvs = {src: torch.empty(sum(x.num_slots for x in m) * sum(b.shape[2] for b in buffers),
                              dtype=buffers[0].dtype) for src, m in recv_moves.items()}
    index = {r: i for i, r in enumerate(group_ranks)}
    works = [pg.send([t], index[dst], 0) for dst, t in sends.items()]
    works += [pg.recv([t], index[src], 0) for src, t in recvs.items()]
    for w in works:
        w.wait()
    if local:
        _scatter(local, buffers, staged_local)
    for src, m in recv_moves.items():
        _scatter(m, buffers, recvs[src])
    elem = buffers[0].element_size() if buffers else 0
    return TransferStats(sum(t.numel() for t in sends.values()) * elem,
                         sum(t.numel() for t in recvs.values()) * elem,
                         (staged_local.numel() if staged_local is not None else 0) * elem,
                         round((time.perf_counter() - t0) * 1000, 3))
