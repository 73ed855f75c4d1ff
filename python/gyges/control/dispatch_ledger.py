"""What the DP controller dispatched that SGLang's load snapshots do not show yet.

Engine-agnostic. Schedulers publish a load snapshot after each batch (and when they go
idle), so a burst of requests dispatched between two snapshots would all see the same
stale load. The ledger remembers each dispatch (time, instance leader, need) and adds
the ones newer than the instance's snapshot to its load. Long requests (needing a merged
instance) are remembered until a snapshot taken ``SETTLE_S`` after them shows their
instance idle (an idle scheduler publishes on every loop; the margin covers a snapshot
published before the request was read from the socket): while one may still run, its
instance must not split, and its full need counts as used.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple

from gyges.control.rank_load import RankLoad
from gyges.topology import Instance, Topology

SETTLE_S = 1.0


@dataclass(frozen=True)
class _Entry:
    t: float
    leader: int
    need: int
    long: bool


class InstanceLoad(NamedTuple):
    used_tokens: int
    requests: int  # running + waiting, including dispatches newer than the snapshot
    long_running: int  # long requests that may still run there
    waiting: int = 0  # requests not started: the snapshot's waiting ones + newer dispatches


class DispatchLedger:
    def __init__(self) -> None:
        self._entries: list[_Entry] = []

    def record(self, leader: int, need: int, long: bool, t: float) -> None:
        self._entries.append(_Entry(t, leader, need, long))

    def __len__(self) -> int:
        return len(self._entries)

    def update(self, topology: Topology, loads: Mapping[int, RankLoad]) -> None:
        """Forget what the snapshots now show: short dispatches older than their instance's
        snapshot, long ones once a later snapshot shows the instance idle."""
        kept = []
        of = {r: inst for inst in topology.instances for r in inst.ranks}
        for e in self._entries:
            inst = of[e.leader]
            ts = _snapshot_time(inst, loads)
            if e.long:
                done = ts > e.t + SETTLE_S and _snapshot_idle(inst, loads)
            else:
                done = ts > e.t
            if not done:
                kept.append(e)
        self._entries = kept

    def load(self, inst: Instance, topology: Topology,
             loads: Mapping[int, RankLoad]) -> InstanceLoad:
        """``used = max(snapshot tokens, needs of long requests it holds) + needs
        dispatched after the snapshot``. Members of a merged instance publish the same
        state, so the instance's snapshot is the freshest/largest of its members'."""
        ts = _snapshot_time(inst, loads)
        ranks = set(inst.ranks)  # instances partition the ranks: same as instance_of(...)
        mine = [e for e in self._entries if e.leader in ranks]
        recent = [e for e in mine if e.t >= ts]
        held = sum(e.need for e in mine if e.t < ts)  # long ones the snapshot may not show
        snap = [loads.get(r, RankLoad()) for r in inst.ranks]
        used = max(max(x.total_tokens for x in snap), held) + sum(e.need for e in recent)
        requests = max(x.running + x.waiting for x in snap) + len(recent)
        waiting = max(x.waiting for x in snap) + len(recent)
        return InstanceLoad(used, requests, sum(e.long for e in mine), waiting)

    def idle(self, inst: Instance, topology: Topology, loads: Mapping[int, RankLoad]) -> bool:
        """No request known to run or wait there."""
        return self.load(inst, topology, loads).requests == 0 and not any(
            topology.instance_of(e.leader) == inst for e in self._entries)


def _snapshot_time(inst: Instance, loads: Mapping[int, RankLoad]) -> float:
    return max((loads[r].timestamp for r in inst.ranks if r in loads), default=0.0)


def _snapshot_idle(inst: Instance, loads: Mapping[int, RankLoad]) -> bool:
    return all(loads[r].running + loads[r].waiting == 0 for r in inst.ranks if r in loads)
