"""Transformation-aware dispatch (DESIGN section 5) around Algorithm 1; engine-agnostic.

For every request the :class:`TransformationScheduler` builds a :class:`HostView` (the
topology, each instance's usable KV slots, its load, the reserved ranks) and acts on
``core.policy.decide``:

- ``Dispatch(leader)``: send it there now;
- ``Merge(group)``: reserve the group (short requests go elsewhere), hold the request,
  merge the group pairwise through the host's transformer (TP1+TP1 -> TP2 -> TP4), then
  place the request again: the merged instance is the one with room;
- ``Wait``: hold it, re-decided on every tick (topology or load changed); if every rank
  is paused by a running transformation it is handed to the dispatch gate instead and
  placed again the moment the transformation ends;
- ``Reject``: the tokenizer should have refused it (400); forwarded to the largest
  instance, whose own limits then answer.

Instances this scheduler merged split back (pairwise, live: short requests running there
move to the halves) once no long request may still run there and none was placed there
for ``split_hold_down_s`` (``core.policy.splits_due``); merges made through the admin API
are left alone. Transformations run one at a time, merges before splits; nothing waits
more than ``max_pending_s``.

Threads: :meth:`submit` on the DP controller's main thread, :meth:`tick` on this
scheduler's thread, :meth:`status` on the control thread, all under one lock (the
dispatch gate's), so a decision and its send are atomic with respect to routing changes.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from gyges.config import GygesConfig
from gyges.control.channel import ControlError, Message
from gyges.control.dispatch_ledger import DispatchLedger
from gyges.control.rank_load import RankLoad
from gyges.core.policy import (
    Decision,
    Dispatch,
    HostView,
    InstanceView,
    Merge,
    Wait,
    decide,
    smallest_degree,
    splits_due,
)
from gyges.core.request_limits import usable_tokens
from gyges.topology import Topology, next_merge_step

logger = logging.getLogger(__name__)

TICK_S = 0.05
MAX_PENDING_S = 300.0
MAX_MERGE_FAILURES = 3
RETRY_STATUSES = (409, 503)  # another transformation runs / pool not ready: try again

Send = Callable[[int], None]


class SchedulerHost(Protocol):
    """What the scheduler reads and drives (the DP controller hook implements it)."""

    def topology(self) -> Topology: ...
    def loads(self) -> Mapping[int, RankLoad]: ...
    def rank_capacity(self) -> int | None: ...  # None until every rank registered
    def paused(self) -> frozenset[int]: ...
    def start(self, op: str, ranks: tuple[int, ...]) -> int: ...  # job id; ControlError
    def poll(self, job: int) -> Message | None: ...  # None: running; ControlError: failed
    def hold(self, fn: Callable[[], None]) -> bool: ...  # until no rank is paused
    # ``rid``, about to be sent to ``leader``, was aborted: it must end there unserved
    def abort(self, leader: int, rid: str) -> None: ...


class SchedulerMetrics(Protocol):
    def decision(self, kind: str) -> None: ...
    def transformation(self, op: str, outcome: str) -> None: ...
    def gauges(self, pending: int, reserved_ranks: int) -> None: ...


@dataclass
class Pending:
    rid: str
    need: int
    send: Send
    since: float
    degree: int = 0
    reservation: tuple[int, ...] | None = None  # the group merging for it
    held: bool = False  # in the dispatch gate until the transformation ends
    aborted: bool = False
    failures: int = 0
    reason: str = ""


@dataclass
class Job:
    id: int
    op: str
    ranks: tuple[int, ...]
    since: float
    reservation: tuple[int, ...] | None = None


@dataclass
class Stats:
    decisions: Counter[str] = field(default_factory=Counter)
    merges: Counter[str] = field(default_factory=Counter)
    splits: Counter[str] = field(default_factory=Counter)


class TransformationScheduler:
    def __init__(self, config: GygesConfig, host: SchedulerHost, lock: threading.RLock, *,
                 page_size: int = 1, clock: Callable[[], float] = time.time,
                 metrics: SchedulerMetrics | None = None, log_size: int = 50,
                 max_pending_s: float = MAX_PENDING_S) -> None:
        self.config, self.host, self.lock = config, host, lock
        self.page_size, self.clock, self.metrics = page_size, clock, metrics
        self.max_pending_s = max_pending_s
        self.ledger = DispatchLedger()
        self.pending: list[Pending] = []
        self.reservations: dict[tuple[int, ...], Pending] = {}
        self.job: Job | None = None
        self.halted: str | None = None  # why transformations stopped (a failed host)
        self.owned: set[tuple[int, ...]] = set()  # merged instances this scheduler formed
        self.last_long: dict[int, float] = {}  # leader -> last long request seen
        self.reported_capacity: dict[tuple[int, ...], int] = {}
        self.log: deque[dict[str, Any]] = deque(maxlen=log_size)
        self.stats = Stats()
        self._rr = 0
        self._wake = threading.Event()
        self._stop = threading.Event()

    # -- entry points ---------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self.host.rank_capacity() is not None

    def submit(self, rid: str, need: int, send: Send) -> None:
        """Place one new request (called with the lock held or not)."""
        with self.lock:
            self._place(Pending(rid, need, send, self.clock()), first=True)

    def abort(self, rid: str, abort_all: bool = False) -> int:
        """The client aborted ``rid`` (or everything): a held request is sent at once to a
        live instance, marked aborted, so SGLang there ends it from its waiting queue before
        any step runs and answers the client (the tokenizer waits for that answer). Returns
        how many were held."""
        with self.lock:
            mine = [p for p in self.pending if abort_all or p.rid == rid]
            for p in mine:
                p.aborted = True
                if not p.held:
                    self._send_aborted(p)
            return len(mine)

    def tick(self) -> None:
        """Poll the running transformation, re-place held requests, start the next merge
        or split."""
        with self.lock:
            now = self.clock()
            topo, loads = self.host.topology(), self.host.loads()
            self.ledger.update(topo, loads)
            self.owned = {g for g in self.owned if _is_instance(topo, g)}
            self._poll_job(now)
            for p in list(self.pending):
                if p.held:
                    continue
                if now - p.since > self.max_pending_s:
                    self._give_up(p, f"waited more than {self.max_pending_s:g}s")
                elif p.reservation is None:
                    self._place(p, first=False)
            if self.job is None and self.halted is None:
                self._start_merge(now) or self._start_split(now)
            if self.metrics is not None:
                self.metrics.gauges(len(self.pending), sum(map(len, self.reservations)))

    def start(self) -> None:
        threading.Thread(target=self._run, name="gyges-scheduler", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(TICK_S)
            self._wake.clear()
            try:
                self.tick()
            except Exception:  # keep dispatching; the next tick tries again
                logger.exception("Gyges scheduler tick failed")

    # -- placement ------------------------------------------------------------------------

    def view(self) -> HostView:
        topo, loads = self.host.topology(), self.host.loads()
        rank_usable = usable_tokens(self.host.rank_capacity() or 0, self.page_size)
        instances = []
        for inst in topo.instances:
            load = self.ledger.load(inst, topo, loads)
            reported = self.reported_capacity.get(inst.ranks)
            cap = (usable_tokens(reported, self.page_size) if reported is not None
                   else inst.tp * rank_usable)
            instances.append(InstanceView(inst.ranks, cap, load.used_tokens, load.requests,
                                          load.waiting))
        reserved = frozenset(r for g in self.reservations for r in g) | self.host.paused()
        return HostView(tuple(instances), rank_usable, self.config.max_tp, reserved)

    def _place(self, p: Pending, first: bool) -> None:
        host = self.view()
        p.degree = smallest_degree(host, p.need) or 0
        d = decide(host, p.need, self.config.policy, self._rr)
        self._rr += 1
        if isinstance(d, Dispatch):
            self._dispatch(p, d.leader, host, d)
        elif isinstance(d, Merge):
            self._reserve(p, d.ranks, d)
        elif isinstance(d, Wait):
            self._hold(p, d, first)
        else:
            self._give_up(p, d.reason, d)

    def _dispatch(self, p: Pending, leader: int, host: HostView, d: Decision,
                  kind: str | None = None) -> None:
        if p in self.pending:
            self.pending.remove(p)
        now = self.clock()
        long = p.degree > 1
        self.ledger.record(leader, p.need, long, now)
        if long:
            self.last_long[leader] = now
        self._record(p, d, kind, leader=leader, tp=host.instance_of(leader).tp)
        p.send(leader)

    def _reserve(self, p: Pending, group: tuple[int, ...], d: Decision) -> None:
        p.reservation = group
        self.reservations[group] = p
        self.last_long[group[0]] = self.clock()
        if p not in self.pending:
            self.pending.append(p)
        self._record(p, d, ranks=list(group))
        self._wake.set()

    def _hold(self, p: Pending, d: Wait, first: bool) -> None:
        if p not in self.pending:
            self.pending.append(p)
        if first or d.reason != p.reason:
            self._record(p, d)
        p.reason = d.reason
        if self.host.hold(lambda: self._release(p)):
            p.held = True

    def _release(self, p: Pending) -> None:
        """The dispatch gate released ``p`` (a transformation ended): place it again."""
        with self.lock:
            p.held = False
            if p in self.pending and p.aborted:
                self._send_aborted(p)
            elif p in self.pending:
                self._place(p, first=False)

    def _send_aborted(self, p: Pending) -> None:
        if p.reservation is not None:  # its merge, if running, completes unused
            self.reservations.pop(p.reservation, None)
            p.reservation = None
        host = self.view()
        live = [i for i in host.instances if not set(i.ranks) & self.host.paused()]
        if not live:
            p.held = self.host.hold(lambda: self._release(p))
            return
        target = min(live, key=lambda i: (i.used_tokens, i.leader))
        self.host.abort(target.leader, p.rid)  # before the send, so it goes marked
        self._dispatch(p, target.leader, host, Wait("aborted by the client"), kind="aborted")

    def _give_up(self, p: Pending, reason: str, d: Decision | None = None) -> None:
        """Forward to the largest unpaused instance; SGLang's own limits answer there.
        Logged as ``reject`` (the policy's decision) or ``fallback`` (waited too long, or
        merging failed)."""
        if p.reservation is not None:
            self.reservations.pop(p.reservation, None)
            p.reservation = None
        host = self.view()
        live = [i for i in host.instances if not set(i.ranks) & self.host.paused()]
        target = max(live or host.instances, key=lambda i: (i.tp, -i.used_tokens, -i.leader))
        logger.warning("Gyges: request %s (need %d) forwarded to instance %s: %s",
                       p.rid, p.need, list(target.ranks), reason)
        self._dispatch(p, target.leader, host, d or Wait(reason),
                       kind=None if d is not None else "fallback")

    def _record(self, p: Pending, d: Decision, kind: str | None = None,
                **extra: Any) -> None:
        kind = kind or type(d).__name__.lower()
        self.stats.decisions[kind] += 1
        if self.metrics is not None:
            self.metrics.decision(kind)
        entry = {"t": round(self.clock(), 3), "rid": p.rid, "need": p.need,
                 "degree": p.degree, "decision": kind, **extra}
        if hasattr(d, "reason"):
            entry["reason"] = d.reason  # type: ignore[union-attr]
        self.log.append(entry)

    # -- transformations ------------------------------------------------------------------

    def _start_merge(self, now: float) -> bool:
        topo = self.host.topology()
        for group, p in list(self.reservations.items()):
            try:
                step = next_merge_step(topo, group)
            except ValueError as e:
                self._merge_failed(group, str(e))
                continue
            if step is None:  # already one instance (an admin merge, or the last step)
                self._merged(group)
                continue
            try:
                job = self.host.start("merge", step)
            except ControlError as e:
                if e.status in RETRY_STATUSES:
                    return True
                self._merge_failed(group, str(e))
                continue
            self.job = Job(job, "merge", step, now, group)
            self._count("merge", "started")
            logger.info("Gyges: merging %s for request %s (group %s)", list(step), p.rid,
                        list(group))
            return True
        return False

    def _start_split(self, now: float) -> bool:
        host, topo, loads = self.view(), self.host.topology(), self.host.loads()
        long_running = {i.leader: self.ledger.load(i, topo, loads).long_running
                        for i in topo.instances}
        due = splits_due(host, self.last_long, now, self.config.split_hold_down_s,
                         long_running)
        for inst in due:
            group = inst.ranks
            if group not in self.owned:
                continue
            try:
                job = self.host.start("split", group)
            except ControlError as e:
                if e.status in RETRY_STATUSES:
                    return True
                logger.warning("Gyges: split of %s refused: %s", list(group), e)
                self.last_long[group[0]] = now  # try again after another hold-down
                continue
            self.job = Job(job, "split", group, now)
            self._count("split", "started")
            logger.info("Gyges: splitting %s (no long request for %.1fs)", list(group),
                        now - self.last_long.get(group[0], now))
            return True
        return False

    def _poll_job(self, now: float) -> None:
        job = self.job
        if job is None:
            return
        try:
            result = self.host.poll(job.id)
        except ControlError as e:
            self.job = None
            self._count(job.op, "failed")
            if e.status == 500:  # the host failed: it goes out of service, no more jobs
                self.halted = str(e)
            if job.op == "merge" and job.reservation is not None:
                self._merge_failed(job.reservation, str(e))
            else:
                logger.warning("Gyges: split of %s failed: %s", list(job.ranks), e)
                self.last_long[job.ranks[0]] = now
            return
        if result is None:
            return
        self.job = None
        self._count(job.op, "done")
        if job.op == "split":
            self.owned.discard(job.ranks)
            self.reported_capacity.pop(job.ranks, None)
            half = len(job.ranks) // 2
            self.owned |= {h for h in (job.ranks[:half], job.ranks[half:]) if len(h) > 1}
            return
        self.owned.add(job.ranks)
        self.last_long[job.ranks[0]] = now
        cap = _reported_capacity(result, job.ranks)
        if cap is not None:
            self.reported_capacity[job.ranks] = cap
        if job.reservation == job.ranks:
            self._merged(job.ranks)

    def _merged(self, group: tuple[int, ...]) -> None:
        """The reserved group is one instance now: send its request there if it can hold
        it (else, e.g. the members reported less KV than assumed, place it again).

        An instance busy with the requests that moved into it still takes the request: it
        was merged for it (its group held the least KV), and SGLang queues it there until
        they free the room. Placing it again would merge another, busier group, and count
        as a failed merge (the members publish their load at the switch, so the view shows
        the moved requests at once)."""
        p = self.reservations.pop(group, None)
        if p is None:  # its request was aborted meanwhile
            return
        p.reservation = None
        host = self.view()
        inst = host.instance_of(group[0])
        if inst.capacity_tokens >= p.need:
            self._dispatch(p, inst.leader, host, Dispatch(inst.leader))
            return
        p.failures += 1
        logger.warning("Gyges: merged instance %s has %d free KV slots, request %s needs %d",
                       list(group), inst.free_tokens, p.rid, p.need)
        if p.failures >= MAX_MERGE_FAILURES:
            self._give_up(p, f"merged instance has {inst.free_tokens} free KV slots < {p.need}")
        else:
            self._place(p, first=False)

    def _merge_failed(self, group: tuple[int, ...], error: str) -> None:
        p = self.reservations.pop(group, None)
        if p is None:
            return
        p.reservation = None
        p.failures += 1
        logger.warning("Gyges: merge of %s for request %s failed (%d): %s", list(group),
                       p.rid, p.failures, error)
        if p.failures >= MAX_MERGE_FAILURES:
            self._give_up(p, f"merging failed {p.failures} times: {error}")
        else:
            self._place(p, first=False)

    def _count(self, op: str, outcome: str) -> None:
        (self.stats.merges if op == "merge" else self.stats.splits)[outcome] += 1
        if self.metrics is not None:
            self.metrics.transformation(op, outcome)

    # -- status ---------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        with self.lock:
            now = self.clock()
            job = self.job
            rank_usable = usable_tokens(self.host.rank_capacity() or 0, self.page_size)
            return {
                "policy": self.config.policy,
                "halted": self.halted,
                "max_request_tokens": self.config.max_tp * rank_usable,
                "split_hold_down_s": self.config.split_hold_down_s,
                "reserved": [{"ranks": list(g), "for": p.rid,
                              "waiting_s": round(now - p.since, 3)}
                             for g, p in self.reservations.items()],
                "pending": [{"rid": p.rid, "need": p.need, "degree": p.degree,
                             "waiting_s": round(now - p.since, 3),
                             "state": ("merging" if p.reservation else
                                       "held" if p.held else "waiting"),
                             **({"reason": p.reason} if p.reason else {})}
                            for p in self.pending],
                "job": None if job is None else {"op": job.op, "ranks": list(job.ranks),
                                                 "running_s": round(now - job.since, 3)},
                # as of the host's topology now, not of the last tick
                "auto_merged": sorted(list(g) for g in self.owned
                                      if _is_instance(self.host.topology(), g)),
                "counters": {"decisions": dict(self.stats.decisions),
                             "auto_merges": dict(self.stats.merges),
                             "auto_splits": dict(self.stats.splits)},
                "decisions": list(self.log),
            }


def _is_instance(topo: Topology, group: tuple[int, ...]) -> bool:
    return topo.instance_of(group[0]).ranks == group


def _reported_capacity(result: Message, ranks: tuple[int, ...]) -> int | None:
    """The merged instance's KV slots if its members reported them (the smallest)."""
    members = result.get("members") or {}
    caps = [m.get("capacity_tokens") for m in members.values() if isinstance(m, dict)]
    caps = [int(c) for c in caps if isinstance(c, int | float)]
    return min(caps) if caps and len(caps) == len(ranks) else None
