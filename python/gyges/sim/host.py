"""A simulated Gyges host: the live ``TransformationScheduler`` drives it.

:class:`SimHost` implements ``control.scheduler.SchedulerHost`` on top of simulated
:class:`~gyges.sim.instance.Instance` s: ``loads()`` are fresh snapshots of the instances,
``start()`` pauses the group at its next step boundary, waits the transformation's cost
(:class:`~gyges.sim.cost.TransformCost`, or a peer's), then rebuilds the instances with the
same requests (no recomputation, as the live merge) and reports the merged capacity as the
members' ``capacity_tokens``, like the live job result. Ticks are events: 50 ms apart
while a request is held or a group is reserved, at the end of every job, and at the
next hold-down expiry of a merged group.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from gyges.config import GygesConfig
from gyges.control.channel import ControlError, Message
from gyges.control.dispatch_ledger import SETTLE_S
from gyges.control.rank_load import RankLoad
from gyges.control.scheduler import TICK_S, TransformationScheduler
from gyges.core.request_limits import usable_tokens
from gyges.router.policy import HostStatus, InstanceStatus
from gyges.sim.cpu import HostCpu
from gyges.sim.engine import EventLoop, Handle
from gyges.sim.instance import Finished, Instance, SimRequest, StepModel
from gyges.topology import Topology

Transform = Callable[[str, int, int, list[int]], tuple[float, float, int]]
IDLE_TICK_S = 1.0  # prune the dispatch ledger at least this often while requests run


@dataclass(frozen=True)
class ElasticKind:
    """How one elastic policy's hosts behave (sizes in scheduler ranks)."""

    capacity: Callable[[int], int]  # KV tokens of an instance of k ranks
    step: Callable[[int], StepModel]
    transform: Transform
    long_first: bool = False  # merged instances admit as Gyges' (gyges.switch.admission)


@dataclass
class TransformRecord:
    host: int
    op: str
    ranks: tuple[int, ...]
    start: float
    end: float = 0.0
    paused_s: float = 0.0
    nbytes: int = 0


class SimHost:
    def __init__(self, index: int, loop: EventLoop, ranks: int, kind: ElasticKind,
                 config: GygesConfig, on_finish: Finished,
                 records: list[TransformRecord], host_cores: float = 0.0) -> None:
        self.index, self.loop, self.kind, self.on_finish = index, loop, kind, on_finish
        self.records = records
        self.cpu = HostCpu(host_cores) if host_cores else None
        self.topo = Topology.boot(ranks)
        self.instances: dict[int, Instance] = {
            r: self._instance((r,)) for r in range(ranks)}
        self._paused: frozenset[int] = frozenset()
        self._jobs: dict[int, Message | None] = {}
        self._held: list[Callable[[], None]] = []
        self._tick: Handle | None = None
        self._tick_at = float("inf")
        self.scheduler = TransformationScheduler(config, self, threading.RLock(),
                                                 clock=loop, log_size=1)
        self.max_request = config.max_tp * usable_tokens(kind.capacity(1), 1)

    def _instance(self, ranks: tuple[int, ...]) -> Instance:
        k = len(ranks)
        return Instance(self.loop, ranks, self.kind.capacity(k), self.kind.step(k),
                        self._finished, cpu=self.cpu,
                        long_above=usable_tokens(self.kind.capacity(1), 1)
                        if k > 1 and self.kind.long_first else None)

    # -- requests ---------------------------------------------------------------------

    def submit(self, req: SimRequest) -> None:
        """Place one request through the live scheduler (the tokenizer's 400 first)."""
        if req.need > self.max_request:
            req.failed, req.finish = True, self.loop.now
            self.on_finish(req)
            return
        self.scheduler.submit(str(req.rid), req.need,
                              lambda leader: self.instances[leader].enqueue(req))
        if self.scheduler.pending:
            self.wake(TICK_S)

    def _finished(self, req: SimRequest) -> None:
        self.on_finish(req)
        if self.scheduler.owned or self.scheduler.ledger:
            self.wake(IDLE_TICK_S)

    # -- SchedulerHost ----------------------------------------------------------------

    def topology(self) -> Topology:
        return self.topo

    def loads(self) -> Mapping[int, RankLoad]:
        ts = self.loop.now + 1e-6  # a snapshot taken now (sim state is exact)
        out = {}
        for inst in self.instances.values():
            # SGLang publishes its load after each batch: a request in the prefill in
            # flight was still waiting in the last snapshot
            load = RankLoad(len(inst.running), len(inst.waiting) + inst.prefilling,
                            inst.used, inst.used + inst.waiting_need, ts)
            for r in inst.ranks:
                out[r] = load
        return out

    def rank_capacity(self) -> int | None:
        return self.kind.capacity(1)

    def paused(self) -> frozenset[int]:
        return self._paused

    def start(self, op: str, ranks: tuple[int, ...]) -> int:
        if self._paused:
            raise ControlError("a transformation is already running", 409)
        members = sorted({self.instances[r] for r in ranks}, key=lambda i: i.leader)
        if op == "split":
            half = self.kind.capacity(len(ranks) // 2)
            for inst in members:
                if any(r.need > half for _, _, r in inst.running) or any(
                        r.need > half for r in inst.waiting):
                    raise ControlError("a request fits neither half", 409)
        job = len(self._jobs) + 1
        self._jobs[job] = None
        self._paused = frozenset(ranks)
        k_from = len(members[0].ranks)
        k_to = len(ranks) if op == "merge" else len(ranks) // 2
        segments: list[int] = []
        for inst in members:
            segments += [inst.ctx_tokens // len(inst.ranks)] * len(inst.ranks)
        total, paused_s, nbytes = self.kind.transform(op, k_from, k_to, segments)
        rec = TransformRecord(self.index, op, tuple(ranks), self.loop.now, paused_s=paused_s,
                              nbytes=nbytes)
        self.records.append(rec)
        precopy = max(0.0, total - paused_s)
        waiting = {id(m) for m in members}

        def one_paused(m: Instance) -> None:
            waiting.discard(id(m))
            if not waiting:
                self.loop.after(paused_s, lambda: self._finish(job, op, ranks, members, rec))

        self.loop.after(precopy, lambda: [m.pause(lambda m=m: one_paused(m))
                                          for m in members])
        return job

    def poll(self, job: int) -> Message | None:
        return self._jobs[job]

    def hold(self, fn: Callable[[], None]) -> bool:
        if self._paused != frozenset(range(self.topo.num_ranks)):
            return False
        self._held.append(fn)
        return True

    def abort(self, leader: int, rid: str) -> None:  # clients never abort in a replay
        return None

    # -- transformations --------------------------------------------------------------

    def _finish(self, job: int, op: str, ranks: tuple[int, ...], members: list[Instance],
                rec: TransformRecord) -> None:
        running: list[SimRequest] = []
        waiting: list[SimRequest] = []
        for m in members:
            r, w = m.take_all()
            running += r
            waiting += w
            m.detach()
        if op == "merge":
            self.topo = self.topo.merged(ranks)
            new = [self._instance(ranks)]
        else:
            self.topo = self.topo.split(ranks)
            half = len(ranks) // 2
            new = [self._instance(ranks[:half]), self._instance(ranks[half:])]
        self._distribute(new, running, waiting)
        for inst in new:
            for r in inst.ranks:
                self.instances[r] = inst
        self._paused = frozenset()
        rec.end = self.loop.now
        cap = new[0].capacity
        self._jobs[job] = {"op": op, "ranks": list(ranks),
                           "members": {str(r): {"capacity_tokens": cap} for r in ranks}}
        for inst in new:
            inst.resume()
        held, self._held = self._held, []
        for fn in held:
            fn()
        self.wake(0.0)

    @staticmethod
    def _distribute(new: list[Instance], running: list[SimRequest],
                    waiting: list[SimRequest]) -> None:
        if len(new) == 1:
            new[0].adopt(running, waiting)
            return
        load = [0, 0]
        parts: list[tuple[list[SimRequest], list[SimRequest]]] = [([], []), ([], [])]
        for group, idx in ((running, 0), (waiting, 1)):
            for r in sorted(group, key=lambda x: x.rid):
                side = 0 if load[0] <= load[1] else 1
                parts[side][idx].append(r)
                load[side] += r.need
        for inst, (run, wait) in zip(new, parts, strict=True):
            inst.adopt(run, wait)

    # -- ticks ------------------------------------------------------------------------

    def wake(self, delay: float) -> None:
        at = self.loop.now + delay
        if at >= self._tick_at:
            return
        self.loop.cancel(self._tick)
        self._tick_at = at
        self._tick = self.loop.at(at, self._on_tick)

    def _on_tick(self) -> None:
        self._tick, self._tick_at = None, float("inf")
        s = self.scheduler
        s.tick()
        if s.pending or s.reservations:
            self.wake(TICK_S)
        elif s.job is not None:
            return  # its end wakes us
        elif s.owned:
            due = min(s.last_long.get(g[0], 0.0) for g in s.owned)
            self.wake(max(TICK_S, due + s.config.split_hold_down_s - self.loop.now,
                          SETTLE_S / 2))
        elif len(s.ledger):
            self.wake(IDLE_TICK_S)

    # -- the router's view ------------------------------------------------------------

    def status(self) -> HostStatus:
        """What ``GET /gyges/status`` would report now (for ``router.policy``)."""
        insts = []
        for leader in self.topo.leaders:
            inst = self.instances[leader]
            insts.append(InstanceStatus(inst.ranks, len(inst.ranks), leader,
                                        usable_tokens(inst.capacity, 1),
                                        inst.used + inst.waiting_need, len(inst.running),
                                        len(inst.waiting)))
        return HostStatus("head_major", "padded", self.scheduler.config.max_tp,
                          self.topo.num_ranks, self.max_request, tuple(insts))

    def describe(self) -> dict[str, Any]:
        return {"topology": [list(i.ranks) for i in self.topo.instances]}
