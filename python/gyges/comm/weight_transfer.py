"""Padded MLP shards across a transformation: a merge releases (zero bytes move), a split
restores the released shards from the members that hold them.

Engine-agnostic (torch only). In a degree-k group, local rank r owns the shards s with
`s % k == r` of every layer (`PaddedMLPWeights.owned_shards`); after a merge it keeps only
those. A split to degree k_to < k_from hands member q the ownership of `s % k_to == q % k_to`,
so it lacks the shards owned by its other sub-group peers::

    G = 4, k_from = 2 -> k_to = 1:   rank 0 holds 0 2, needs 1 3 (from rank 1)
                                     rank 1 holds 1 3, needs 0 2 (from rank 0)
    G = 4, k_from = 4 -> k_to = 2:   rank 0 holds 0, needs 2 (from rank 2); rank 2 needs 0 ...

Each shard is already one contiguous buffer of at least one allocation granule, so it goes
on the wire as it is: the holder sends the unpadded prefix of its resident buffer and the
receiver receives straight into a new buffer from `allocate_shard`, then `adopt`s it. No
copy on either side; packing the shards of one peer into one message would add a copy on
both (benchmark/transform_bench.py times both). On GPUs the same
send/recv pairs run over NCCL (`batch_isend_irecv`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from datetime import timedelta
from typing import NamedTuple

import torch
import torch.distributed as dist

from gyges.comm.kv_transfer import TIMEOUT_FLOOR_S, TransferStats, round_timeout_s
from gyges.core.kv_layout import check_local_rank, is_power_of_two
from gyges.core.padded_mlp import PaddedMLPWeights


class ShardMove(NamedTuple):
    """Shard `shard` of layer `layer` goes from local rank `src` to local rank `dst`."""

    layer: int
    shard: int
    src: int
    dst: int


def release_shards(weights: Sequence[PaddedMLPWeights], k: int, local_rank: int) -> int:
    """The merge side: release every shard not owned at (k, local_rank) in every layer.
    Returns the padded bytes released; nothing is copied or sent."""
    return sum(w.release_unowned(k, local_rank) for w in weights)


def plan_restore(resident: torch.Tensor, k_to: int) -> list[ShardMove]:
    """Moves that give every member the shards it owns at `k_to` but does not hold.

    `resident[q, l, s]`: member q (local rank in the group of n = `resident.shape[0]`)
    holds shard s of layer l. The source is the degree-n owner `s % n` if it holds the
    shard, else the lowest member that does. Sorted by (layer, shard, dst). Raises
    ValueError if a needed shard is held by nobody.
    """
    n, layers, shards = resident.shape
    if not is_power_of_two(k_to) or n % k_to:
        raise ValueError(f"degree {k_to} does not divide a group of {n}")
    moves = []
    for layer in range(layers):
        for s in range(shards):
            holders = [q for q in range(n) if resident[q, layer, s]]
            for q in range(n):
                if s % k_to != q % k_to or resident[q, layer, s]:
                    continue
                if not holders:
                    raise ValueError(f"layer {layer} shard {s}: no member holds it")
                src = s % n if s % n in holders else holders[0]
                moves.append(ShardMove(layer, s, src, q))
    moves.sort(key=lambda m: (m.layer, m.shard, m.dst))
    return moves


def restore_shards(
    weights: Sequence[PaddedMLPWeights],
    k_from: int,
    k_to: int,
    local_rank: int,
    pg: dist.ProcessGroup,
) -> TransferStats:
    """The split side: collectively over the degree-`k_from` group `pg` (rank i = local
    rank i), restore on every member the shards it owns at `k_to` but has released.
    `weights` are this rank's layers, in the same order on every member. Holders send each
    shard's unpadded bytes; `bytes_local` is always 0."""
    t0 = time.perf_counter()
    _check(weights, k_from, k_to, local_rank, pg)
    resident = _gather_residency(weights, pg)
    moves = plan_restore(resident, k_to)
    works, received = [], []
    sent = got = 0
    for move in moves:
        mlp = weights[move.layer]
        numel, tag = mlp.geometry.numel, move.layer * mlp.max_degree + move.shard
        if move.src == local_rank:
            works.append(pg.send([mlp.shard_buffer(move.shard)[:numel]], move.dst, tag))
            sent += mlp.geometry.nbytes
        if move.dst == local_rank:
            buf = mlp.allocate_shard(move.shard)
            works.append(pg.recv([buf[:numel]], move.src, tag))
            received.append((move, buf))
            got += mlp.geometry.nbytes
    bound = timedelta(seconds=round_timeout_s(sent + got))
    for work in works:
        work.wait(bound)
    for move, buf in received:
        weights[move.layer].adopt(move.shard, buf)
    return TransferStats(sent, got, 0, (time.perf_counter() - t0) * 1000)


def _check(weights: Sequence[PaddedMLPWeights], k_from: int, k_to: int, local_rank: int,
           pg: dist.ProcessGroup) -> None:
    if not weights:
        raise ValueError("no layers to restore")
    g = weights[0].max_degree
    if not (is_power_of_two(k_from) and is_power_of_two(k_to) and k_to <= k_from <= g):
        raise ValueError(f"a split needs powers of two k_to {k_to} <= k_from {k_from} <= {g}")
    check_local_rank(local_rank, k_from)
    if pg.size() != k_from or pg.rank() != local_rank:
        raise ValueError(f"process group (rank {pg.rank()} of {pg.size()}) is not local rank "
                         f"{local_rank} of the degree-{k_from} group")


def _gather_residency(weights: Sequence[PaddedMLPWeights], pg: dist.ProcessGroup) -> torch.Tensor:
    """`[n, L, G]` bool: which member holds which shard. A fixed-size header goes first so
    members with different layer counts or shapes fail alike instead of mismatching."""
    n = pg.size()
    first = weights[0]
    header = torch.tensor([len(weights), first.max_degree, first.geometry.numel,
                           first.geometry.elem_size], dtype=torch.int64)
    if any((w.max_degree, w.geometry.numel, w.dtype) != (first.max_degree,
           first.geometry.numel, first.dtype) for w in weights):
        header[0] = -1  # every member sees the mismatch and raises
    headers = [torch.empty_like(header) for _ in range(n)]
    pg.allgather([headers], [header]).wait(timedelta(seconds=TIMEOUT_FLOOR_S))
    if any(h[0] < 0 or not torch.equal(h, headers[0]) for h in headers):
        raise ValueError(f"members' MLP layers differ: {[h.tolist() for h in headers]}")
    mask = torch.zeros(len(weights), first.max_degree, dtype=torch.uint8)
    for layer, mlp in enumerate(weights):
        mask[layer, mlp.resident_shards()] = 1
    masks = [torch.empty_like(mask) for _ in range(n)]
    pg.allgather([masks], [mask]).wait(timedelta(seconds=TIMEOUT_FLOOR_S))
    return torch.stack(masks).bool()
