"""Overlapped transformations: the KV pre-copied while the old configuration serves, then
a short cutover that moves only what changed.

A member's side of a pre-copy (:class:`PreCopy`), between its own serving steps:

1. ``precopy`` command (local, between the member's steps): the member starts tracking the
   slots its pool writes (``HeadMajorKVPool.gyges_written``), snapshots the slots its
   instance uses (running rows, the last extend batch, the prefix cache) in the target
   group's merged slot ids and starts a thread. The thread exchanges the members'
   snapshots over the group's side communicator, plans the cross-rank moves of the
   transformation over their union and runs them over the same communicator into staging
   memory
   (:func:`gyges.comm.kv_precopy.precopy`), paced to leave the serving steps most of the
   machine. A split's thread then restores the padded MLP shards the halves will own
   (the merged instance never reads them).
2. The controller polls ``precopy_status`` until every member is done, pauses dispatch and
   sends the ``merge``/``split`` cutover as before, with ``precopy: true``.
3. The cutover (:func:`cutover`) plans over what is used now: slots in the snapshot and
   not written since are *clean* and come from staging (a local copy); the others (written
   or new since, the split's compaction copies) and every local move cross again.

Whatever happens before the cutover's commit leaves the old configuration untouched:
pre-copy never writes the live KV. A pre-copy that fails marks its group's side
communicator unusable (a collective on it may be half done); later transformations of the
group run stop-the-world.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from gyges.comm.kv_precopy import (
    PrecopyUnavailable,
    StagedKV,
    apply_staged,
    cutover_plan,
    precopy,
    remote_moves,
)
from gyges.core.migration_plan import used_ranges_by_segment
from gyges.core.transfer_plan import TransferPlan, plan_transformation
from gyges.switch import capacity, prefix_cache
from gyges.switch.protocol import inject, knob, vote_timeout_s

logger = logging.getLogger(__name__)


MAX_PACE_S = 0.25


def max_staging_bytes() -> int | None:
    """Cap on a member's pre-copy staging (``GYGES_PRECOPY_MAX_STAGING_MB``; default none):
    a pre-copy that would need more runs as a stop-the-world transformation instead."""
    value = knob("GYGES_PRECOPY_MAX_STAGING_MB")
    return None if not value else int(float(value) * 2**20)


def duty() -> float:
    """Share of wall time the pre-copy thread may use (``GYGES_PRECOPY_DUTY``, 0.05-1):
    after a round of t seconds it sleeps t * (1 - duty) / duty."""
    return min(max(float(os.environ.get("GYGES_PRECOPY_DUTY", "0.5")), 0.05), 1.0)


def round_floor_s() -> float:
    """Least sleep after each round (``GYGES_PRECOPY_ROUND_FLOOR_S``, default 0): tests
    stretch a pre-copy with it so that requests can finish, arrive or abort during one."""
    return max(float(knob("GYGES_PRECOPY_ROUND_FLOOR_S") or "0"), 0.0)


@dataclass
class PreCopy:
    """One member's pre-copy of one transformation."""

    op: str
    ranks: tuple[int, ...]
    k_from: int
    k_to: int
    snapshot: torch.Tensor  # bool [n * S]: merged slot ids staged (every member's)
    done: threading.Event = field(default_factory=threading.Event)
    cancel: threading.Event = field(default_factory=threading.Event)
    staged: StagedKV | None = None
    weights_restored: int = 0
    error: str | None = None
    fallback: bool = False  # the error left the side group usable: stop the world instead
    started: float = field(default_factory=time.perf_counter)

    def status(self) -> dict[str, Any]:
        st = self.staged
        return {"done": self.done.is_set(), "error": self.error, "fallback": self.fallback,
                "precopy_bytes": st.bytes_received if st else 0,
                "precopy_rounds": len(st.rounds) if st else 0,
                "precopy_ms": st.elapsed_ms if st else 0.0,
                "precopy_weight_bytes": self.weights_restored}


def used_slots(s: Any) -> torch.Tensor:
    """Every slot this scheduler's work holds now: running rows, the last extend batch's
    rows and the prefix cache's nodes (its own slot ids)."""
    req_to_token = s.req_to_token_pool.req_to_token
    reqs = list(s.running_batch.reqs)
    lb = s.last_batch
    if lb is not None and lb is not s.running_batch:
        reqs += [q for q in lb.reqs if q not in reqs]
    rows = [req_to_token[q.kv.req_pool_idx, : int(q.kv.kv_allocated_len)].to("cpu", torch.int64)
            for q in reqs if getattr(q.kv, "req_pool_idx", None) is not None]
    tree = prefix_cache.usable_tree(s)
    cached = prefix_cache.node_slots(prefix_cache.export_tree(tree)[0]) if tree is not None \
        else torch.empty(0, dtype=torch.int64)
    return torch.unique(torch.cat([*rows, cached.to("cpu", torch.int64)]))


def start_tracking(pool: Any) -> torch.Tensor:
    """Mark every slot the pool writes from now on (see ``HeadMajorKVPool``)."""
    mask = torch.zeros(pool.k_buffer[0].shape[0], dtype=torch.bool,
                       device=pool.k_buffer[0].device)
    pool.gyges_written = mask
    return mask


def stop_tracking(pool: Any) -> None:
    pool.gyges_written = None


def plan(ranks: tuple[int, ...], k_from: int, k_to: int, pool: Any,
         ids: torch.Tensor) -> TransferPlan:
    """The transformation's KV moves over the merged slot ``ids`` (every move: the cutover
    takes the local ones, the pre-copy the others)."""
    slots = capacity.slots_per_replica(pool)
    used = used_ranges_by_segment(ids, slots, len(ranks))
    return plan_transformation(ranks, k_from, k_to, pool.gyges_k_layout.num_kv_heads, used,
                               slots_per_replica=slots)


def run(pc: PreCopy, mine: torch.Tensor, pool: Any, rank: int, side: Any,
        buffers: list[torch.Tensor], restore: Any = None) -> None:
    """The pre-copy thread: exchange the members' snapshots (``mine``: this instance's used
    merged slot ids) over the side group, stage the plan's moves, then (a split) restore
    the weights."""
    share, floor = duty(), round_floor_s()

    def pace(seconds: float) -> None:
        # capped: a member that waited for its peer in a round must not sleep longer for
        # it, or the members' sleeps would feed each other's waits round after round
        time.sleep(max(min(seconds * (1 - share) / share, MAX_PACE_S), floor))

    # One intra-op thread: OpenMP sizes a new thread's team from the machine, not from the
    # scheduler's setting, and that team would compete with the serving steps' cores.
    torch.set_num_threads(1)
    try:
        inject(pc.op, "precopy", rank)
        ids = exchange_ids(side, mine)
        snapshot = torch.zeros(len(pc.ranks) * capacity.slots_per_replica(pool),
                               dtype=torch.bool)
        snapshot[ids] = True
        pc.snapshot = snapshot
        the_plan = remote_moves(plan(pc.ranks, pc.k_from, pc.k_to, pool, ids))
        pc.staged = precopy(the_plan, pc.ranks, rank, side, buffers, buffers_per_round=2,
                            pace=pace, cancelled=pc.cancel.is_set,
                            max_staging_bytes=max_staging_bytes())
        if restore is not None:
            pc.weights_restored = restore()
        st = pc.staged
        logger.info("gyges: rank %d pre-copied %s %s: %d slots, %d bytes in, %d out, %d "
                    "rounds, %.1f ms (wall %.1f ms), %d weight bytes", rank, pc.op,
                    list(pc.ranks), int(ids.numel()), st.bytes_received, st.bytes_sent,
                    len(st.rounds), st.elapsed_ms, (time.perf_counter() - pc.started) * 1000,
                    pc.weights_restored)
    except PrecopyUnavailable as e:  # every member alike; the side group stays usable
        pc.error, pc.fallback = f"pre-copy unavailable: {e}", True
    except Exception as e:  # reported by precopy_status; the old configuration serves on
        logger.exception("gyges: rank %d: pre-copy of %s %s failed", rank, pc.op,
                         list(pc.ranks))
        pc.error = f"pre-copy failed on rank {rank}: {type(e).__name__}: {e}"
    finally:
        pc.done.set()


def exchange_ids(pg: Any, mine: torch.Tensor) -> torch.Tensor:
    """The union of every member's slot ids (sorted, unique); collective over ``pg``
    (counts first, then the ids padded to the longest), bounded like a vote."""
    from datetime import timedelta

    from torch._C._distributed_c10d import AllgatherOptions

    n = pg.size()
    opts = AllgatherOptions()
    opts.timeout = timedelta(seconds=vote_timeout_s())
    count = torch.tensor([mine.numel()], dtype=torch.int64)
    counts = [torch.empty_like(count) for _ in range(n)]
    pg.allgather([counts], [count], opts).wait()
    longest = max(int(c) for c in counts)
    padded = torch.full((max(longest, 1),), -1, dtype=torch.int64)
    padded[: mine.numel()] = mine.to(torch.int64)
    got = [torch.empty_like(padded) for _ in range(n)]
    pg.allgather([got], [padded], opts).wait()
    every = torch.cat([g[: int(c)] for g, c in zip(got, counts, strict=True)])
    return torch.unique(every)


def cutover(pc: PreCopy | None, full_args: tuple[Any, ...], now: torch.Tensor,
            written: torch.Tensor) -> tuple[TransferPlan, torch.Tensor | None]:
    """The cutover's plan and the staged slots to apply (bool over merged ids, or None
    without a pre-copy). ``full_args``: ``(ranks, k_from, k_to, pool)``; ``now``: merged
    slot ids used now; ``written``: merged slot ids written since the snapshot."""
    full = plan(*full_args, now)
    if pc is None or pc.staged is None:
        return full, None
    stale = ~pc.snapshot
    stale[written] = True
    again = now[stale[now]]
    keep = torch.zeros_like(pc.snapshot)
    keep[now[~stale[now]]] = True
    return cutover_plan(full, plan(*full_args, again)), keep


def apply(pc: PreCopy, buffers: list[torch.Tensor], keep: torch.Tensor) -> int:
    assert pc.staged is not None
    return apply_staged(pc.staged, buffers, keep)
