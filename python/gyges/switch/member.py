"""A scheduler's side of merge and split: the ``idle``, ``merge`` and ``split`` commands.

Commands run on the scheduler thread between steps (``CommandClient``, polled after
``ingest_requests``). While a rank is TP1 it polls its own command socket. While it is a
member of a merged instance, its leader polls and broadcasts what it received over the
instance's group, every member runs the same commands at the same point of its event loop
(members step in lockstep, like SGLang's own TP ranks), and followers consume their own
copy of each command so every member still answers the controller.

Merge of an idle group, on every member (collective over the pooled group):
  1. agree that every member is idle (no running, waiting or unread request) and can
     reshard; flush the radix cache and KV allocator;
  2. wrap the pooled group as an SGLang GroupCoordinator; stamp the parallel state and
     re-point the scheduler's cached groups; followers silence their output sockets;
  3. reshard the model, re-view the KV pool with H/k heads;
  4. common RNG seed and scheduler counters; a barrier.
Split is the inverse. Both refuse (on every member alike) if a member is busy.
"""
from __future__ import annotations

import logging
import time
from typing import Any

from gyges.comm.pool import CommunicatorPool, PoolGroup
from gyges.control.channel import Message
from gyges.control.commands import CommandClient
from gyges.switch import model as model_switch
from gyges.switch import scheduler_state
from gyges.switch.group import PooledGroupCoordinator, all_true, broadcast_json
from gyges.switch.kv_pool import full_head_num, reshape_kv_pool

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
        sock = getattr(s, "recv_from_tokenizer", None)
        unread = sock is not None and self.group is None and bool(sock.poll(0))
        return bool(s.is_fully_idle()) and not s.waiting_queue and not unread

    def on_idle(self, _msg: Message) -> Message:
        s = self.s
        return {"idle": self.is_idle(), "running": len(s.running_batch.reqs),
                "waiting": len(s.waiting_queue), "tp": self.tp}

    @property
    def tp(self) -> int:
        return 1 if self.group is None else len(self.group.ranks)

    def _agree(self, group: PoolGroup, ok: bool, why: str) -> None:
        if not all_true(group, ok):
            raise RuntimeError(f"group busy: {why}")

    def on_merge(self, msg: Message) -> Message:
        ph = Phases()
        ranks = tuple(int(r) for r in msg["ranks"])
        if self.group is not None:
            raise RuntimeError(f"rank {self.rank} is already in a TP{self.tp} instance")
        group = self.pool.group(ranks)
        k, r = len(ranks), group.rank_in_group
        s, runner = self.s, self.s.tp_worker.model_runner
        reason = ""
        try:
            model_switch.check_reshardable(runner.model, k, self.pool.max_tp)
        except (NotImplementedError, ValueError, RuntimeError) as e:
            reason = f"rank {self.rank}: {e}"
        idle = self.is_idle()
        if not reason and not idle:
            reason = f"rank {self.rank} has running or waiting requests"
        self._agree(group, not reason, reason or "a peer is not idle or cannot reshard")
        self._agree(group, bool(s.flush_cache()), "cache flush refused")
        ph.mark("drain_ms")
        if self.boot is None:
            self.boot = scheduler_state.Tp1State.capture(s)
        coord = PooledGroupCoordinator(group, self.rank)
        try:
            scheduler_state.apply_tp(s, coord, k, r, self.boot)
            ph.mark("parallel_state_ms")
            weight_bytes = model_switch.reshard_model(runner.model, k, r, coord,
                                                      self.pool.max_tp)
            ph.mark("reshard_ms")
            pool = runner.token_to_kv_pool
            reshape_kv_pool(pool, full_head_num(pool) // k)
            ph.mark("kv_view_ms")
        except Exception:
            logger.exception("gyges: merge failed on rank %d; restoring TP1", self.rank)
            self._restore(s)
            raise
        self.group, self.coordinator = group, coord
        self._sync_counters(group, int(msg.get("seed", 0)))
        self._agree(group, True, "")
        ph.mark("sync_ms")
        logger.info("gyges: rank %d merged into TP%d %s as local rank %d: %s", self.rank, k,
                    list(ranks), r, ph.ms)
        return {"tp": k, "local_rank": r, "phases_ms": ph.ms,
                "sliced_weight_bytes": weight_bytes}

    def on_split(self, msg: Message) -> Message:
        ph = Phases()
        ranks = tuple(int(r) for r in msg["ranks"])
        group = self.group
        if group is None or group.ranks != ranks:
            raise RuntimeError(f"rank {self.rank} is not in instance {list(ranks)}")
        s = self.s
        idle = self.is_idle()
        self._agree(group, idle, f"rank {self.rank} has running or waiting requests"
                    if not idle else "a peer is not idle")
        self._agree(group, bool(s.flush_cache()), "cache flush refused")
        ph.mark("drain_ms")
        self._restore(s)
        ph.mark("restore_ms")
        self._sync_counters(group, int(msg.get("seed", 0)))
        self._agree(group, True, "")
        ph.mark("sync_ms")
        logger.info("gyges: rank %d split from %s: %s", self.rank, list(ranks), ph.ms)
        return {"tp": 1, "phases_ms": ph.ms}

    def _restore(self, s: Any) -> None:
        """Back to the boot TP1 state (idempotent, also the rollback of a failed merge)."""
        runner = s.tp_worker.model_runner
        model_switch.restore_tp1(runner.model)
        pool = runner.token_to_kv_pool
        reshape_kv_pool(pool, full_head_num(pool))
        if self.boot is not None:
            scheduler_state.restore_tp1(s, self.boot)
        if self.coordinator is not None:
            self.coordinator.destroy()
        self.group = self.coordinator = None

    def _sync_counters(self, group: PoolGroup, seed: int) -> None:
        """Same RNG and step counters on every member (leader's values)."""
        from sglang.srt.utils import set_random_seed

        s = self.s
        state = broadcast_json(group, {"forward_ct": int(getattr(s, "forward_ct", 0))})
        s.forward_ct = state["forward_ct"]
        set_random_seed(seed)
