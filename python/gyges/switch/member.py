"""A scheduler's side of merge and split: the ``idle``, ``merge`` and ``split`` commands.

Commands run on the scheduler thread between steps (``CommandClient``, polled after
``ingest_requests``). While a rank is TP1 it polls its own command socket. While it is a
member of a merged instance, its leader polls and broadcasts what it received over the
instance's group, every member runs the same commands at the same point of its event loop
(members step in lockstep, like SGLang's own TP ranks), and followers consume their own
copy of each command so every member still answers the controller.

Merge of two aligned halves (degree k/2 each) into TP-k, on every member, collectively:
  1. agree that every member is ready (nothing unread, work movable, model reshardable);
  2. settle the step's state and exchange the halves' work (requests, their KV slots
     renumbered into the merged slot space) over the pooled group;
  3. move the KV by the transfer plan (head-major blocks, one packed exchange per peer);
  4. stamp the parallel state, reshard the model, view the pool at degree k (k times the
     slots), install the merged work (rows, prefix cache, free pages, running batch);
  5. common RNG seed and counters; a barrier.
Split is the inverse: each running request goes to one half (its pages outside that half
are copied first, :func:`gyges.core.migration_plan.plan_split`), the KV moves back by the
plan, each half installs its requests. A request that fits neither half refuses the split.
"""
from __future__ import annotations

import logging
import time
from typing import Any

import torch

from gyges.comm.kv_transfer import execute_plan, workspace_bytes
from gyges.comm.pool import CommunicatorPool, PoolGroup
from gyges.comm.weight_transfer import release_shards, restore_shards
from gyges.control.channel import Message
from gyges.control.commands import CommandClient
from gyges.core.migration_plan import (
    SplitRefused,
    merge_offset,
    plan_split,
    used_ranges_by_segment,
)
from gyges.core.transfer_plan import plan_transformation
from gyges.switch import capacity, migration, scheduler_state
from gyges.switch import model as model_switch
from gyges.switch.group import (
    PooledGroupCoordinator,
    all_gather_bytes,
    all_true,
    broadcast_json,
)

logger = logging.getLogger(__name__)
RELAY_TAKE_TIMEOUT_S = 10.0


class Phases:
    """Elapsed milliseconds per named phase."""

    def __init__(self) -> None:
        self.ms: dict[str, float] = {}
        self._t = time.perf_counter()

    def mark(self, name: str) -> None:
        now = time.perf_counter()
        self.ms[name] = round((now - self._t) * 1000, 3)
        self._t = now


class GroupMember:
    def __init__(self, scheduler: Any, pool: CommunicatorPool, commands: CommandClient) -> None:
        self.s = scheduler
        self.pool = pool
        self.rank = pool.rank
        self.commands = commands
        self.group: PoolGroup | None = None
        self.coordinator: PooledGroupCoordinator | None = None
        self.boot: scheduler_state.Tp1State | None = None
        self._workspace: torch.Tensor | None = None  # KV transfer staging, reused
        commands.handlers.update(idle=self.on_idle, merge=self.on_merge, split=self.on_split)

    # -- per event-loop iteration ---------------------------------------------------------

    def poll(self) -> None:
        group = self.group
        if group is None:
            self.commands.poll()
            return
        leader = group.rank_in_group == 0
        msgs = broadcast_json(group, self.commands.receive() if leader else None)
        for msg in msgs:
            if not leader:
                self.commands.take(msg.get("id"), RELAY_TAKE_TIMEOUT_S)
            self.commands.answer(msg)

    @property
    def extra_control_replies(self) -> int:
        """How many more copies of a control reply this rank sends (leader of k: k-1)."""
        g = self.group
        return len(g.ranks) - 1 if g is not None and g.rank_in_group == 0 else 0

    # -- commands -------------------------------------------------------------------------

    def is_idle(self) -> bool:
        s = self.s
        return bool(s.is_fully_idle()) and not s.waiting_queue and not self._unread()

    def _unread(self) -> bool:
        """Requests the DP controller sent that this TP1 rank has not read yet."""
        sock = getattr(self.s, "recv_from_tokenizer", None)
        return sock is not None and self.group is None and bool(sock.poll(0))

    def not_ready(self) -> str | None:
        """Why this rank cannot take part in a transformation right now (None: ready)."""
        if self._unread():
            return f"rank {self.rank} has requests it has not read yet"
        why = migration.not_movable(self.s)
        return f"rank {self.rank}: {why}" if why else None

    def on_idle(self, _msg: Message) -> Message:
        s = self.s
        why = self.not_ready()
        return {"idle": self.is_idle(), "ready": why is None, "why": why,
                "running": len(s.running_batch.reqs), "waiting": len(s.waiting_queue),
                "tp": self.tp}

    @property
    def tp(self) -> int:
        return 1 if self.group is None else len(self.group.ranks)

    def _agree(self, group: PoolGroup, ok: bool, why: str) -> None:
        if not all_true(group, ok):
            raise RuntimeError(f"group busy: {why}")

    def on_merge(self, msg: Message) -> Message:
        """Two aligned instances of degree k/2 (TP1s or merged halves) become one TP-k
        instance; their running and waiting requests carry on in it."""
        ph = Phases()
        ranks = tuple(int(r) for r in msg["ranks"])
        group = self.pool.group(ranks)
        k, r = len(ranks), group.rank_in_group
        k_old, s = self.tp, self.s
        runner = s.tp_worker.model_runner
        reason = self.not_ready()
        if not reason and k_old != k // 2:
            reason = f"rank {self.rank} is in a TP{k_old} instance, not a half of TP{k}"
        if not reason:
            try:
                model_switch.check_reshardable(runner.model, k, self.pool.max_tp,
                                               already=k_old > 1)
                capacity.pool_of(s)
            except (NotImplementedError, ValueError, RuntimeError) as e:
                reason = f"rank {self.rank}: {e}"
        self._agree(group, not reason, reason or "a peer is not ready")
        migration.settle(s)
        pool = capacity.pool_of(s)
        slots = capacity.slots_per_replica(pool)
        half = r // k_old
        work = migration.export_work(s, merge_offset(half, k_old, slots))
        try:
            blob, why = migration.to_bytes(work), ""
        except Exception as e:  # nothing has changed yet: the group refuses as one
            logger.exception("gyges: rank %d cannot serialize its requests", self.rank)
            blob, why = b"", f"rank {self.rank}: a request cannot be moved ({e})"
        self._agree(group, not why, why or "a peer's requests cannot be moved")
        blobs = all_gather_bytes(group, blob)
        works = [work if i // k_old == half else migration.from_bytes(blobs[i])
                 for i in range(0, k, k_old)]
        ph.mark("exchange_ms")
        used = used_ranges_by_segment(torch.cat([w.slots for w in works]), slots, k)
        plan = plan_transformation(ranks, k_old, k, pool.gyges_k_layout.num_kv_heads, used,
                                   slots_per_replica=slots)
        moved = self._move_kv(plan, ranks, group, pool)
        ph.mark("kv_transfer_ms")
        if self.boot is None:
            self.boot = scheduler_state.Tp1State.capture(s)
        old = self.coordinator
        coord = PooledGroupCoordinator(group, self.rank)
        try:
            scheduler_state.apply_tp(s, coord, k, r, self.boot)
            ph.mark("parallel_state_ms")
            if k_old > 1:
                model_switch.restore_tp1(runner.model)
            weight_bytes = model_switch.reshard_model(runner.model, k, r, coord,
                                                      self.pool.max_tp)
            released = release_shards(model_switch.padded_weights(runner.model), k, r)
            ph.mark("reshard_ms")
            cap = capacity.apply_degree(s, k)
            moved_reqs = migration.install_work(s, works)
            ph.mark("install_ms")
        except Exception:
            logger.exception("gyges: merge failed on rank %d after the KV moved; the "
                             "instance is unusable", self.rank)
            raise
        if old is not None:
            old.destroy()
        self.group, self.coordinator = group, coord
        self._sync_counters(group, int(msg.get("seed", 0)))
        self._agree(group, True, "")
        ph.mark("sync_ms")
        logger.info("gyges: rank %d merged into TP%d %s as local rank %d: %s %s", self.rank,
                    k, list(ranks), r, moved_reqs, ph.ms)
        return {"tp": k, "local_rank": r, "phases_ms": ph.ms, "capacity_tokens": cap,
                "kv_bytes_moved": moved.bytes_sent, "kv_bytes_local": moved.bytes_local,
                "sliced_weight_bytes": weight_bytes, "weight_bytes_released": released,
                **moved_reqs}

    def on_split(self, msg: Message) -> Message:
        """A TP-k instance becomes its two halves (TP-k/2 each); every running request goes
        to the half that holds most of its KV (pages elsewhere are copied first)."""
        ph = Phases()
        ranks = tuple(int(r) for r in msg["ranks"])
        group = self.group
        if group is None or group.ranks != ranks:
            raise RuntimeError(f"rank {self.rank} is not in instance {list(ranks)}")
        s = self.s
        k, r = len(ranks), group.rank_in_group
        k_new = k // 2
        half = r // k_new
        reason = migration.not_movable(s)
        self._agree(group, not reason, f"rank {self.rank}: {reason}" if reason
                    else "a peer is not ready")
        migration.settle(s)
        pool = capacity.pool_of(s)
        slots, page = capacity.slots_per_replica(pool), int(pool.page_size)
        req_to_token = s.req_to_token_pool.req_to_token
        running = list(s.running_batch.reqs)
        rows = [req_to_token[q.kv.req_pool_idx, : int(q.kv.kv_allocated_len)].tolist()
                for q in running]
        try:
            split = plan_split(rows, k=k, slots_per_replica=slots, page_size=page)
        except SplitRefused as e:
            raise RuntimeError(f"group busy: {e}") from None
        _copy_pages(pool, split.copies, page)
        ph.mark("compact_ms")
        new_rows = [torch.tensor(x, dtype=torch.int64) for x in split.rows]
        mine = [i for i, h in enumerate(split.halves) if h == half]
        used = used_ranges_by_segment(torch.cat(new_rows) if new_rows else [], slots, k)
        plan = plan_transformation(ranks, k, k_new, pool.gyges_k_layout.num_kv_heads, used,
                                   slots_per_replica=slots)
        moved = self._move_kv(plan, ranks, group, pool)
        ph.mark("kv_transfer_ms")
        offset = half * k_new * slots
        work = migration.Work([running[i] for i in mine],
                              [new_rows[i] - offset for i in mine],
                              [q for i, q in enumerate(s.waiting_queue) if i % 2 == half])
        runner = s.tp_worker.model_runner
        padded = model_switch.padded_weights(runner.model)
        restored = restore_shards(padded, k, k_new, r, group.device_group) if padded else None
        ph.mark("weight_restore_ms")
        old = self.coordinator
        model_switch.restore_tp1(runner.model)
        if k_new == 1:
            assert self.boot is not None
            scheduler_state.restore_tp1(s, self.boot)
            self.group = self.coordinator = None
        else:
            sub = self.pool.group(ranks[half * k_new:(half + 1) * k_new])
            coord = PooledGroupCoordinator(sub, self.rank)
            scheduler_state.apply_tp(s, coord, k_new, sub.rank_in_group, self.boot)
            model_switch.reshard_model(runner.model, k_new, sub.rank_in_group, coord,
                                       self.pool.max_tp)
            self.group, self.coordinator = sub, coord
        if old is not None:
            old.destroy()
        ph.mark("restore_ms")
        cap = capacity.apply_degree(s, k_new)
        moved_reqs = migration.install_work(s, [work])
        ph.mark("install_ms")
        self._sync_counters(group, int(msg.get("seed", 0)))
        self._agree(group, True, "")
        ph.mark("sync_ms")
        logger.info("gyges: rank %d split from %s into TP%d: %s %s", self.rank, list(ranks),
                    k_new, moved_reqs, ph.ms)
        return {"tp": k_new, "phases_ms": ph.ms, "capacity_tokens": cap,
                "kv_bytes_moved": moved.bytes_sent, "kv_bytes_local": moved.bytes_local,
                "pages_copied": len(split.copies),
                "weight_bytes_restored": restored.bytes_received if restored else 0,
                **moved_reqs}

    def _move_kv(self, plan: Any, ranks: tuple[int, ...], group: PoolGroup,
                 pool: Any) -> Any:
        """Run the KV plan one layer (K and V) per round, pipelined, staging in a workspace
        kept across transformations (fresh staging memory is page-faulted in each time)."""
        bufs = _storages_by_layer(pool)
        need = workspace_bytes(plan, self.rank, bufs, buffers_per_round=2)
        if self._workspace is None or self._workspace.numel() < need:
            self._workspace = torch.empty(need, dtype=torch.uint8)
        return execute_plan(plan, ranks, self.rank, group.device_group, bufs,
                            buffers_per_round=2, workspace=self._workspace)

    def _sync_counters(self, group: PoolGroup, seed: int) -> None:
        """Same RNG and step counters on every member (leader's values)."""
        from sglang.srt.utils import set_random_seed

        s = self.s
        state = broadcast_json(group, {"forward_ct": int(getattr(s, "forward_ct", 0))})
        s.forward_ct = state["forward_ct"]
        set_random_seed(seed)


def _storages_by_layer(pool: Any) -> list[torch.Tensor]:
    """Every ``[H, S, D]`` storage of the head-major pool: K and V of layer 0, then 1, ..."""
    return [b for pair in zip(pool.gyges_k_storage, pool.gyges_v_storage, strict=True)
            for b in pair]


def _copy_pages(pool: Any, copies: tuple[tuple[int, int], ...], page: int) -> None:
    """Copy merged pages src -> dst in every layer's current (merged) K and V views."""
    if not copies:
        return
    src = torch.cat([torch.arange(a * page, a * page + page) for a, _ in copies])
    dst = torch.cat([torch.arange(b * page, b * page + page) for _, b in copies])
    for buf in (*pool.k_buffer, *pool.v_buffer):
        buf[dst] = buf[src]
