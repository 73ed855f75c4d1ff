"""Fleets: how a policy's hosts are built and how a request reaches an instance.

- static (``static-*``, ``shift``): fixed instances; a request goes to the instance, across
  the fleet, with the least reserved KV relative to its capacity among those that can hold
  it (none can: failed).
- elastic (``gyges*``, ``flying``, ``loongserve``): :class:`~gyges.sim.host.SimHost` s run
  the live scheduler; hosts are chosen by the router's ``router.policy.place`` on fresh
  ``/gyges/status``-like snapshots plus the router's own book-keeping.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from gyges.router.policy import HostView, is_long, place
from gyges.router.workers import RECENT_LONG_S
from gyges.sim.cpu import STOCK_DP_CONTROLLER_PROCS, HostCpu
from gyges.sim.engine import EventLoop
from gyges.sim.host import SimHost
from gyges.sim.instance import Finished, Instance, SimRequest, StepModel


class StaticFleet:
    """Fixed instances; ``layout`` lists, per host, (GPUs, capacity, step) per instance."""

    def __init__(self, loop: EventLoop, hosts: int,
                 layout: Sequence[tuple[int, int, StepModel]], on_finish: Finished,
                 host_cores: float = 0.0) -> None:
        self.instances: list[Instance] = []
        for h in range(hosts):
            rank = 0
            # stock SGLang runs a DP controller where a host has several instances
            cpu = HostCpu(host_cores, STOCK_DP_CONTROLLER_PROCS if len(layout) > 1 else 0) \
                if host_cores else None
            for gpus, cap, step in layout:
                ranks = tuple(range(h * 1000 + rank, h * 1000 + rank + gpus))
                self.instances.append(Instance(loop, ranks, cap, step, on_finish, cpu=cpu))
                rank += gpus
        self.on_finish, self.loop = on_finish, loop
        self.largest = max((i.capacity for i in self.instances), default=0)

    def submit(self, req: SimRequest) -> None:
        best, key = None, None
        for inst in self.instances:
            if inst.capacity < req.need:
                continue
            k = ((inst.used + inst.waiting_need) / inst.capacity, len(inst), inst.leader)
            if key is None or k < key:
                best, key = inst, k
        if best is None:
            req.failed, req.finish = True, self.loop.now
            self.on_finish(req)
            return
        best.enqueue(req)


class ElasticFleet:
    """Hosts driven by the live scheduler, chosen by the router's placement policy."""

    def __init__(self, loop: EventLoop, make_host: Callable[[int, Finished], SimHost],
                 hosts: int, router_policy: str, on_finish: Finished, seed: int = 0) -> None:
        self.loop, self.router_policy, self.on_finish = loop, router_policy, on_finish
        self.hosts = [make_host(h, self._finished) for h in range(hosts)]
        self.where: dict[int, tuple[int, bool]] = {}
        self.out_requests = [0] * hosts
        self.out_tokens = [0] * hosts
        self.out_long = [0] * hosts
        self.last_long = [float("-inf")] * hosts
        self.counter = seed

    def submit(self, req: SimRequest) -> None:
        if len(self.hosts) == 1:
            index = 0
            long = is_long(req.need, self.hosts[0].status())
        else:
            views = [HostView(str(i), h.status(), self.out_requests[i], self.out_tokens[i],
                              outstanding_long_tokens=self.out_long[i],
                              recent_long=self.loop.now - self.last_long[i] < RECENT_LONG_S)
                     for i, h in enumerate(self.hosts)]
            placed = place(self.router_policy, req.need, views, self.counter)
            assert placed is not None
            index, long = int(placed.worker_id), placed.long
        self.counter += 1
        self.where[req.rid] = (index, long)
        self.out_requests[index] += 1
        self.out_tokens[index] += req.need
        if long:
            self.out_long[index] += req.need
            self.last_long[index] = self.loop.now
        self.hosts[index].submit(req)

    def _finished(self, req: SimRequest) -> None:
        index, long = self.where.pop(req.rid, (None, False))
        if index is not None:
            self.out_requests[index] -= 1
            self.out_tokens[index] -= req.need
            if long:
                self.out_long[index] -= req.need
        self.on_finish(req)
