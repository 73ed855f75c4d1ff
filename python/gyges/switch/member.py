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

import json
import logging
import threading
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
)
from gyges.core.request_limits import usable_tokens
from gyges.core.transfer_plan import plan_digest
from gyges.switch import capacity, chunked, migration, scheduler_state
from gyges.switch import model as model_switch
from gyges.switch import precopy as precopy_mod
from gyges.switch.group import PooledGroupCoordinator, all_gather_bytes, broadcast_json
from gyges.switch.prefix_cache import split_cache
from gyges.switch.protocol import (
    COMMIT_TIMEOUT_S,
    Ballot,
    GroupBroken,
    Refused,
    TransformationFailed,
    abort_requests,
    clear_scheduler,
    decide,
    inject,
    vote,
)
from gyges.switch.stall_watch import StallWatch

logger = logging.getLogger(__name__)
RELAY_TAKE_TIMEOUT_S = 10.0


class Phases:
    """Elapsed milliseconds per named phase; ``started`` is the monotonic clock (system-wide
    on Linux: comparable with a client's ``time.perf_counter()`` on the same host) when the
    member took the command, i.e. when its serving stopped."""

    def __init__(self) -> None:
        self.ms: dict[str, float] = {}
        self._t = self.started = time.perf_counter()

    def mark(self, name: str) -> None:
        now = time.perf_counter()
        self.ms[name] = round((now - self._t) * 1000, 3)
        self._t = now

    def clock(self) -> dict[str, float]:
        """When this member stopped serving and when it was done (monotonic seconds)."""
        return {"start": self.started, "end": self._t}


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
        self.failed: str | None = None  # set by a failure after commit; the rank is done
        self.precopy: precopy_mod.PreCopy | None = None
        self.precopy_broken: dict[tuple[int, ...], str] = {}  # side groups not to use again
        # the next overlapped step's result is processed before the one after it launches
        # (hooks/scheduler.after_is_disable_overlap_for_batch): set by each switch
        self.flush_after_switch = False
        self.stall_watch = StallWatch(self.rank)
        # One TP1 replica's usable KV: a request needing more only a merged instance holds.
        self.replica_usable = usable_tokens(int(scheduler.max_total_num_tokens),
                                            int(scheduler.page_size))
        self.retracted_for_long = 0  # requests retracted so that a long one is admitted
        commands.handlers.update(idle=self.on_idle, merge=self.on_merge, split=self.on_split,
                                 precopy=self.on_precopy,
                                 precopy_status=self.on_precopy_status,
                                 precopy_drop=self.on_precopy_drop)

    # -- per event-loop iteration ---------------------------------------------------------

    def poll(self) -> None:
        self.stall_watch.observe(self.s)
        group = self.group
        if self.failed is not None:
            self._out_of_service()
        if group is None:
            self.commands.poll()
            if self.failed is not None:
                self._out_of_service()
            return
        leader = group.rank_in_group == 0
        msgs = broadcast_json(group, self.commands.receive() if leader else None)
        for msg in msgs:
            if not leader:
                self.commands.take(msg.get("id"), RELAY_TAKE_TIMEOUT_S)
            self.commands.answer(msg)
            if self.failed is not None:
                self._out_of_service()

    def _out_of_service(self) -> None:
        """Never returns: after a failure past commit this rank's state is lost, so its
        scheduler must not step again. It answers every command with the failure until
        the host controller takes the host down (it sees the fatal reply)."""
        reason = self.failed
        self.commands.handlers = {op: _raiser(reason) for op in self.commands.handlers}
        while True:
            self.commands.poll()
            time.sleep(0.1)

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
        """Requests the DP controller sent that this rank (a TP1 or a merged instance's
        leader: followers read nothing) has not read yet. A split must not leave them to
        whichever half the leader lands in."""
        sock = getattr(self.s, "recv_from_tokenizer", None)
        reads = self.group is None or self.group.rank_in_group == 0
        return sock is not None and reads and bool(sock.poll(0))

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

    def _prepare(self, op: str, k: int, k_old: int) -> Ballot:
        """Every local check that can refuse a transformation; any exception refuses."""
        s = self.s
        try:
            inject(op, "prepare", self.rank)
            why = self.not_ready()
            if why:
                return Ballot(False, why, retry=True)
            gm = getattr(s, "grammar_manager", None)
            if gm is not None and getattr(gm, "grammar_queue", None):
                return Ballot(False, f"rank {self.rank}: {len(gm.grammar_queue)} requests "
                              "are compiling their grammar", retry=True)
            if op == "merge" and k_old != k // 2:
                return Ballot(False, f"rank {self.rank} is in a TP{k_old} instance, not a "
                              f"half of TP{k}")
            if op == "split":
                why = capacity.oversized(s, k // 2)
                if why:
                    return Ballot(False, f"rank {self.rank}: {why}")
            if op == "merge":
                model_switch.check_reshardable(s.tp_worker.model_runner.model, k,
                                               self.pool.max_tp, already=k_old > 1)
            capacity.pool_of(s)
        except Exception as e:  # a check that fails refuses, on every member alike
            logger.exception("gyges: rank %d: %s prepare failed", self.rank, op)
            return Ballot(False, f"rank {self.rank}: {type(e).__name__}: {e}")
        return Ballot(True)

    def _vote(self, group: PoolGroup, op: str, mine: Ballot) -> list[Ballot]:
        """A vote before commit. If its collective fails, a merge's group is broken (the
        members serve on in their own instances) and a split's instance is lost."""
        try:
            ballots = vote(group, mine)
        except Exception as e:
            if op == "merge":
                raise GroupBroken(f"rank {self.rank}: the vote over {list(group.ranks)} "
                                  f"failed: {e}") from e
            raise self._fail(op, e, [*self.s.running_batch.reqs, *self.s.waiting_queue]) \
                from e
        decide(ballots)
        return ballots

    def _commit_vote(self, group: PoolGroup, op: str, build: Any, ph: Phases) -> Any:
        """Run ``build()`` (exchange and plan: nothing changes yet) and vote on its plan's
        digest; every member refuses together if one failed or the plans differ."""
        try:
            inject(op, "exchange", self.rank)
            built = build()
            mine = Ballot(True, payload=plan_digest(built[0]).to_bytes(8, "little"))
        except Refused as e:
            built, mine = None, Ballot(False, str(e).split(": ", 1)[1], retry=e.retry)
        except Exception as e:
            logger.exception("gyges: rank %d: %s planning failed", self.rank, op)
            built, mine = None, Ballot(False, f"rank {self.rank}: {type(e).__name__}: {e}")
        ph.mark("plan_ms")
        ballots = self._vote(group, op, mine)
        ph.mark("commit_vote_ms")
        if len({b.payload for b in ballots}) != 1:
            pool = capacity.pool_of(self.s)
            logger.error("gyges: rank %d: %s plans differ: digests %s; this member's "
                         "inputs: %s, %d slots per replica, %d KV heads", self.rank, op,
                         [b.payload.hex() for b in ballots], _plan_inputs(built),
                         capacity.slots_per_replica(pool), pool.gyges_k_layout.num_kv_heads)
            raise Refused("members computed different transfer plans (a bug: please "
                          "report it)", retry=False)
        return built

    def _fail(self, op: str, e: Exception, reqs: list[Any]) -> TransformationFailed:
        """After commit: abort the requests this member holds, stop serving, report."""
        reason = f"transformation failed on rank {self.rank}: {op}: {type(e).__name__}: {e}"
        logger.error("gyges: %s; aborting %d requests, this host goes out of service",
                     reason, len(reqs))
        boot = self.boot
        socket = boot.tokenizer_socket if boot is not None else \
            self.s.ipc_channels.send_to_tokenizer.socket
        aborted = abort_requests(self.s, reqs, reason, socket)
        clear_scheduler(self.s)
        self.failed = f"{reason} ({aborted} requests aborted)"
        return TransformationFailed(self.failed)

    def on_merge(self, msg: Message) -> Message:
        """Two aligned instances of degree k/2 (TP1s or merged halves) become one TP-k
        instance; their running and waiting requests carry on in it."""
        ph = Phases()
        ranks = tuple(int(r) for r in msg["ranks"])
        group = self.pool.group(ranks)
        k, r = len(ranks), group.rank_in_group
        k_old, s = self.tp, self.s
        runner = s.tp_worker.model_runner
        pc = self._precopy_for("merge", ranks) if msg.get("precopy") else None
        mine = self._prepare("merge", k, k_old)
        ph.mark("prepare_ms")
        work, parked = migration.Work(), None
        if mine.ok:
            try:
                parked = migration.settle(s)
                ph.mark("settle_ms")
                slots = capacity.slots_per_replica(capacity.pool_of(s))
                offset = merge_offset(r // k_old, k_old, slots)
                work = migration.export_work(s, offset)
                if pc is not None:
                    work.written = _written(capacity.pool_of(s)) + offset
                mine = Ballot(True, payload=migration.to_bytes(work))
                ph.mark("export_ms")
            except Exception as e:  # nothing has changed yet: the group refuses as one
                logger.exception("gyges: rank %d cannot export its requests", self.rank)
                mine = Ballot(False, f"rank {self.rank}: a request cannot be moved ({e})")
        ballots = self._vote(group, "merge", mine)
        ph.mark("exchange_ms")
        pool = capacity.pool_of(s)
        slots, half = capacity.slots_per_replica(pool), r // k_old

        def build() -> tuple[Any, list[migration.Work]]:
            works = [work if i // k_old == half else migration.receive(s, ballots[i].payload)
                     for i in range(0, k, k_old)]
            sent = migration.from_bytes(ballots[half * k_old].payload)
            if _rows_of(sent) != _rows_of(work):  # what peers plan with is not what we hold
                logger.error("gyges: rank %d: requests sent %s, held %s", self.rank,
                             [(q, len(x), sum(x)) for q, x in _rows_of(sent)],
                             [(q, len(x), sum(x)) for q, x in _rows_of(work)])
                raise Refused(f"rank {self.rank}: its requests changed while the group "
                              "voted (a bug: please report it)", retry=False)
            running, rows = sum(len(w.running) for w in works), s.req_to_token_pool.size
            if running > rows:
                raise Refused(f"the merged instance would run {running} requests but has "
                              f"{rows} request rows (--max-running-requests); merge when "
                              "fewer requests run", retry=False)
            ph.mark("receive_ms")
            plan, keep = precopy_mod.cutover(pc, (ranks, k_old, k, pool),
                                             torch.cat([w.slots for w in works]),
                                             torch.cat([w.written for w in works]))
            ph.mark("kv_plan_ms")
            self._ensure_workspace(plan, pool)
            return plan, works, keep

        plan, works, keep = self._commit_vote(group, "merge", build, ph)
        mine_reqs = [*work.running, *work.waiting]
        try:
            inject("merge", "kv_move", self.rank)
            moved = self._move_kv(plan, ranks, group, pool)
            staged = self._apply_staged(pc, pool, keep)
            ph.mark("kv_transfer_ms")
            if self.boot is None:
                self.boot = scheduler_state.Tp1State.capture(s)
            old = self.coordinator
            coord = PooledGroupCoordinator(group, self.rank)
            scheduler_state.apply_tp(s, coord, k, r, self.boot)
            ph.mark("parallel_state_ms")
            if k_old > 1:
                model_switch.restore_tp1(runner.model)
            weight_bytes = model_switch.reshard_model(runner.model, k, r, coord,
                                                      self.pool.max_tp)
            inject("merge", "weight_release", self.rank)
            released = release_shards(model_switch.padded_weights(runner.model), k, r)
            ph.mark("reshard_ms")
            cap = capacity.apply_degree(s, k)
            inject("merge", "install", self.rank)
            moved_reqs = migration.install_work(s, works)
            ph.mark("install_ms")
            if old is not None:
                old.destroy()
            self.group, self.coordinator = group, coord
            self._sync_counters(group, int(msg.get("seed", 0)))
            decide(vote(group, Ballot(True), COMMIT_TIMEOUT_S))
        except Exception as e:
            raise self._fail("merge", e, mine_reqs) from e
        ph.mark("sync_ms")
        self.flush_after_switch = True
        _publish_load(s)
        logger.info("gyges: rank %d merged into TP%d %s as local rank %d: %s %s", self.rank,
                    k, list(ranks), r, moved_reqs, ph.ms)
        return {"tp": k, "local_rank": r, "phases_ms": ph.ms, "clock_s": ph.clock(),
                "capacity_tokens": cap,
                "kv_bytes_moved": moved.bytes_sent, "kv_bytes_local": moved.bytes_local,
                **self._precopy_done(pc, staged),
                "sliced_weight_bytes": weight_bytes, "weight_bytes_released": released,
                "chunked_prefills_parked": int(parked is not None),
                "retracted_for_long": self._take_retracted(), **moved_reqs}

    def _take_retracted(self) -> int:
        """Requests this rank's instance retracted for long ones since its last
        transformation (:mod:`gyges.switch.admission`); the count restarts."""
        n, self.retracted_for_long = self.retracted_for_long, 0
        return n

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
        pc = self._precopy_for("split", ranks) if msg.get("precopy") else None
        self._vote(group, "split", self._prepare("split", k, k))
        ph.mark("prepare_ms")
        parked = migration.settle(s)
        ph.mark("settle_ms")
        pool = capacity.pool_of(s)
        slots, page = capacity.slots_per_replica(pool), int(pool.page_size)
        halves_of_waiting = _waiting_halves(s.waiting_queue, parked, k_new * slots)
        req_to_token = s.req_to_token_pool.req_to_token
        running = list(s.running_batch.reqs)

        def build() -> tuple[Any, Any, list[torch.Tensor], Any]:
            rows = [req_to_token[q.kv.req_pool_idx, : int(q.kv.kv_allocated_len)].cpu()
                    for q in running]
            cache = split_cache(s, k, slots, page)
            ph.mark("cache_ms")
            try:
                try:
                    split = plan_split(rows, k=k, slots_per_replica=slots, page_size=page,
                                       reserved=cache.pages)
                except SplitRefused:  # no room with the cache kept: requests come first
                    cache = cache.dropped_all()
                    split = plan_split(rows, k=k, slots_per_replica=slots, page_size=page)
            except SplitRefused as e:
                raise Refused(str(e), retry=False) from None
            ph.mark("split_plan_ms")
            new_rows = [torch.tensor(x, dtype=torch.int64) for x in split.rows]
            copied = torch.tensor([b * page + i for _, b in split.copies for i in range(page)],
                                  dtype=torch.int64)
            written = torch.cat([_written(pool), copied]) if pc is not None else copied
            plan, keep = precopy_mod.cutover(pc, (ranks, k, k_new, pool),
                                             torch.cat([*new_rows, cache.slots]), written)
            ph.mark("kv_plan_ms")
            self._ensure_workspace(plan, pool)
            return plan, split, new_rows, cache, keep

        plan, split, new_rows, cache, keep = self._commit_vote(group, "split", build, ph)
        all_reqs = [*running, *s.waiting_queue]
        try:
            _copy_pages(pool, split.copies, page)
            ph.mark("compact_ms")
            mine = [i for i, h in enumerate(split.halves) if h == half]
            inject("split", "kv_move", self.rank)
            moved = self._move_kv(plan, ranks, group, pool)
            staged = self._apply_staged(pc, pool, keep)
            ph.mark("kv_transfer_ms")
            offset = half * k_new * slots
            work = migration.Work([running[i] for i in mine],
                                  [new_rows[i] - offset for i in mine],
                                  [q for q, h in zip(s.waiting_queue, halves_of_waiting,
                                                     strict=True) if h == half],
                                  cache.halves[half])
            runner = s.tp_worker.model_runner
            padded = model_switch.padded_weights(runner.model)
            inject("split", "weight_restore", self.rank)
            # After a pre-copy every member restored its shards already (its thread ends
            # with the restore; a failed one leaves no pre-copy, and the plan vote made the
            # members agree on having one): nothing is left, not even the residency gather.
            restored = restore_shards(padded, k, k_new, r, group.device_group) \
                if padded and pc is None else None
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
            inject("split", "install", self.rank)
            moved_reqs = migration.install_work(s, [work])
            ph.mark("install_ms")
            self._sync_counters(group, int(msg.get("seed", 0)))
            decide(vote(group, Ballot(True), COMMIT_TIMEOUT_S))
        except Exception as e:
            raise self._fail("split", e, all_reqs) from e
        ph.mark("sync_ms")
        self.flush_after_switch = True
        _publish_load(s)
        logger.info("gyges: rank %d split from %s into TP%d: %s %s", self.rank, list(ranks),
                    k_new, moved_reqs, ph.ms)
        return {"tp": k_new, "phases_ms": ph.ms, "clock_s": ph.clock(), "capacity_tokens": cap,
                "kv_bytes_moved": moved.bytes_sent, "kv_bytes_local": moved.bytes_local,
                "pages_copied": len(split.copies), **self._precopy_done(pc, staged),
                "retracted_for_long": self._take_retracted(),
                "chunked_prefills_parked": int(parked is not None),
                "prefix_nodes_dropped": cache.dropped_nodes,
                "prefix_tokens_dropped": cache.dropped_tokens,
                # all this split restored; a pre-copy restored most before the cutover
                "weight_bytes_restored": (restored.bytes_received if restored else 0)
                + (pc.weights_restored if pc is not None else 0),
                "weight_bytes_restored_in_cutover": restored.bytes_received if restored
                else 0,
                **moved_reqs}

    # -- pre-copy (gyges.switch.precopy) -------------------------------------------------

    def on_precopy(self, msg: Message) -> Message:
        """Start pre-copying the KV of a merge or split of ``ranks``; the members keep
        serving meanwhile. Only local work happens here (the write tracking, this
        instance's snapshot): the members exchange snapshots in the pre-copy thread, so
        no member waits here for a peer's step."""
        t0 = time.perf_counter()
        op, ranks = str(msg.get("kind")), tuple(int(r) for r in msg["ranks"])
        self._drop_precopy()
        s, pool = self.s, capacity.pool_of(self.s)
        slots = capacity.slots_per_replica(pool)
        if op == "merge":
            group = self.pool.group(ranks)
            k_from, k_to = self.tp, len(ranks)
        elif op == "split" and self.group is not None and self.group.ranks == ranks:
            group, k_from, k_to = self.group, len(ranks), len(ranks) // 2
        else:
            raise RuntimeError(f"rank {self.rank} cannot pre-copy a {op} of {list(ranks)}")
        # the same answer on every member (topology, pool, drops broadcast to all)
        if k_to * 2 != k_from and k_from * 2 != k_to:
            raise Refused(f"rank {self.rank} is in a TP{k_from} instance, not a half of "
                          f"TP{k_to}", retry=False)
        if group.side_group is None or ranks in self.precopy_broken:
            raise Refused(f"no pre-copy for {list(ranks)}: "
                          f"{self.precopy_broken.get(ranks, 'no side communicator')}",
                          retry=False)
        offset = merge_offset(group.rank_in_group // k_from, k_from, slots) \
            if op == "merge" else 0
        precopy_mod.start_tracking(pool)  # before the snapshot: no write is missed
        try:
            ids = precopy_mod.used_slots(s) + offset
        except BaseException:
            precopy_mod.stop_tracking(pool)
            raise
        pc = precopy_mod.PreCopy(op, ranks, k_from, k_to, torch.zeros(0, dtype=torch.bool))
        restore = None
        padded = model_switch.padded_weights(s.tp_worker.model_runner.model)
        if op == "split" and padded:
            side, r = group.side_group, group.rank_in_group

            def restore() -> int:
                return restore_shards(padded, k_from, k_to, r, side).bytes_received
        threading.Thread(target=precopy_mod.run, daemon=True, name="gyges-precopy",
                         args=(pc, ids, pool, self.rank, group.side_group,
                               _storages_by_layer(pool), restore)).start()
        self.precopy = pc
        logger.info("gyges: rank %d started the pre-copy of %s %s: %d slots here, %.1f ms "
                    "on the scheduler thread", self.rank, op, list(ranks), int(ids.numel()),
                    (time.perf_counter() - t0) * 1000)
        return {"started": True, "slots": int(ids.numel())}

    def on_precopy_status(self, _msg: Message) -> Message:
        pc = self.precopy
        if pc is None:
            return {"done": True, "error": f"rank {self.rank} has no pre-copy"}
        return pc.status()

    def on_precopy_drop(self, msg: Message) -> Message:
        pc = self.precopy
        if pc is not None and (msg.get("broken") or not pc.done.is_set()):
            self.precopy_broken[pc.ranks] = str(msg.get("broken") or "a pre-copy was "
                                                "dropped while it ran")
        self._drop_precopy()
        return {"dropped": pc is not None}

    def _precopy_for(self, op: str, ranks: tuple[int, ...]) -> precopy_mod.PreCopy | None:
        """This transformation's finished pre-copy, if there is one."""
        pc = self.precopy
        if pc is None or (pc.op, pc.ranks) != (op, ranks) or not pc.done.is_set() or \
                pc.error is not None or pc.staged is None:
            return None
        return pc

    def _apply_staged(self, pc: precopy_mod.PreCopy | None, pool: Any, keep: Any) -> int:
        if pc is None or keep is None:
            return 0
        return precopy_mod.apply(pc, _storages_by_layer(pool), keep)

    def _precopy_done(self, pc: precopy_mod.PreCopy | None, staged: int) -> Message:
        """The pre-copy's figures for the reply; tracking stops (the view changed)."""
        if pc is None:
            self._drop_precopy()
            return {}
        out = {**pc.status(), "kv_bytes_staged_applied": staged}
        for key in ("done", "error", "fallback"):
            out.pop(key)
        self.precopy = None  # consumed: the restored shards are the new instance's
        self._drop_precopy()
        return out

    def _drop_precopy(self) -> None:
        """Forget a pre-copy that was not consumed by its cutover: stop tracking writes,
        cancel the thread, and give back weights a split's pre-copy restored."""
        pc, self.precopy = self.precopy, None
        try:
            precopy_mod.stop_tracking(capacity.pool_of(self.s))
        except NotImplementedError:
            pass
        if pc is None:
            return
        pc.cancel.set()
        if pc.op == "split" and pc.done.is_set() and self.group is not None:
            padded = model_switch.padded_weights(self.s.tp_worker.model_runner.model)
            release_shards(padded, len(self.group.ranks), self.group.rank_in_group)

    def _ensure_workspace(self, plan: Any, pool: Any) -> None:
        """Staging memory for the KV plan, allocated before the commit vote (a member that
        cannot allocate it refuses)."""
        need = workspace_bytes(plan, self.rank, _storages_by_layer(pool), buffers_per_round=2)
        if self._workspace is None or self._workspace.numel() < need:
            self._workspace = None
            self._workspace = torch.empty(need, dtype=torch.uint8)

    def _move_kv(self, plan: Any, ranks: tuple[int, ...], group: PoolGroup,
                 pool: Any) -> Any:
        """Run the KV plan one layer (K and V) per round, pipelined, staging in a workspace
        kept across transformations (fresh staging memory is page-faulted in each time)."""
        bufs = _storages_by_layer(pool)
        self._ensure_workspace(plan, pool)
        return execute_plan(plan, ranks, self.rank, group.device_group, bufs,
                            buffers_per_round=2, workspace=self._workspace)

    def _sync_counters(self, group: PoolGroup, seed: int) -> None:
        """Same RNG and scheduling counters on every member. TP ranks must schedule the
        same batches from the same state, or their next collective mismatches; members
        that were replicas counted apart. Kept: the step counter (the leader's); SGLang's
        new-token ratio, which budgets prefill admission and decode retraction (each
        replica decayed, retracted and reset its own; the highest, the most conservative);
        the prefill-token counter HRRN ages waiting requests by (the highest: no moved
        request waited a negative time); the call count that times the waiting prefixes'
        LRU refresh (the leader's); the decode rounds left before the next prefill under
        ``--prefill-decode-interval`` (the highest: no member admits a prefill early)."""
        from sglang.srt.utils import set_random_seed

        s = self.s
        tracker = getattr(s, "new_token_ratio_tracker", None)
        policy = getattr(s, "policy", None)
        mine = {"forward_ct": int(getattr(s, "forward_ct", 0)),
                "ratio": float(tracker.current) if tracker is not None else None,
                "processed": int(getattr(s, "processed_tokens_counter", 0)),
                "refresh": int(getattr(policy, "_waiting_prefix_refresh_calls", 0)),
                "interval": int(getattr(s, "_prefill_decode_interval_remaining", 0))}
        states = [json.loads(b) for b in all_gather_bytes(
            group, json.dumps(mine).encode(), COMMIT_TIMEOUT_S)]
        s.forward_ct = states[0]["forward_ct"]
        ratios = [st["ratio"] for st in states if st["ratio"] is not None]
        if tracker is not None and ratios:
            tracker.current = max(ratios)
        if hasattr(s, "processed_tokens_counter"):
            s.processed_tokens_counter = max(st["processed"] for st in states)
        if hasattr(policy, "_waiting_prefix_refresh_calls"):
            policy._waiting_prefix_refresh_calls = states[0]["refresh"]
        if hasattr(s, "_prefill_decode_interval_remaining"):
            s._prefill_decode_interval_remaining = max(st["interval"] for st in states)
        set_random_seed(seed)


def _raiser(reason: str | None) -> Any:
    def handler(_msg: Message) -> Message:
        raise TransformationFailed(f"out of service: {reason}")
    return handler


def _rows_of(work: migration.Work) -> list[tuple[str, list[int]]]:
    return [(str(req.rid), row.tolist()) for req, row in zip(work.running, work.rows,
                                                             strict=True)]


def _publish_load(s: Any) -> None:
    """Publish this rank's load now: the controller describes the new instances in the
    transformation's reply (and ``/gyges/status``, and places requests) from these
    snapshots, and the last one was taken in the old configuration (a merge's leader
    showed its own requests alone until its next step)."""
    try:
        s.publish_load_snapshot(force=True)
    except Exception:  # a report, not the switch: the next step publishes again
        logger.warning("gyges: rank %d could not publish its load after a switch",
                       getattr(s, "dp_rank", -1), exc_info=True)


def _written(pool: Any) -> torch.Tensor:
    """Slot ids the pool wrote since its pre-copy started tracking (none if it does not)."""
    mask = getattr(pool, "gyges_written", None)
    if mask is None:
        return torch.empty(0, dtype=torch.int64)
    return torch.nonzero(mask).flatten().to("cpu", torch.int64)


def _waiting_halves(waiting: list[Any], parked: chunked.Parked | None,
                    half_slots: int) -> list[int]:
    """The half each waiting request goes to in a split: alternately, but a parked chunked
    prefill goes where most of its published prefix is (the tree's nodes follow their
    pages), so that it resumes from its chunks done."""
    out = [i % 2 for i in range(len(waiting))]
    if parked is not None and parked.slots.numel():
        out[waiting.index(parked.req)] = int(
            torch.bincount(parked.slots // half_slots, minlength=2).argmax())
    return out


def _plan_inputs(built: Any) -> str:
    """What a member planned from, for the log when members' plans differ."""
    plan, rest = built[0], built[1:]
    lists = [x for x in rest if isinstance(x, list)] if rest else []
    works = [w for w in lists[-1] if isinstance(w, migration.Work)] if lists else []
    summary = [(len(w.running), len(w.waiting), [(len(r), int(r.sum())) for r in w.rows])
               for w in works]
    return f"{len(plan.moves)} moves, group {plan.group_ranks}, works {summary}"


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
