"""Transformation-aware dispatch (Algorithm 1, reconstructed) as pure functions.

The scheduler sees a :class:`HostView` (instances with capacities and loads, which ranks
are reserved for pending long requests) and returns a :class:`Decision` for one request:

- ``Dispatch(leader)``: send it to the instance led by ``leader``;
- ``Merge(ranks)``: reserve the aligned group ``ranks``, merge it into one instance, then
  dispatch there (the caller performs the merge);
- ``Wait(reason)``: nothing can take it now without disturbing a pending merge;
- ``Reject(reason)``: it can never fit (larger than the largest possible instance).

Baselines for benchmarks: ``round_robin`` and ``llf`` (least load first) share the
merge-on-demand mechanics but place requests naively.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

from gyges.core.degrees import is_power_of_two


@dataclass(frozen=True)
class InstanceView:
    """One instance as the scheduler sees it. ``ranks`` is an aligned group. ``running``:
    requests placed there (running and waiting); ``waiting``: those of them that have not
    started (queued, in the prefill its last load snapshot did not see end, or dispatched
    after that snapshot)."""

    ranks: tuple[int, ...]
    capacity_tokens: int
    used_tokens: int = 0
    running: int = 0
    waiting: int = 0

    @property
    def leader(self) -> int:
        return self.ranks[0]

    @property
    def tp(self) -> int:
        return len(self.ranks)

    @property
    def free_tokens(self) -> int:
        return self.capacity_tokens - self.used_tokens


@dataclass(frozen=True)
class HostView:
    """The host at one instant. ``rank_capacity`` is one rank's KV slots at TP1; an
    aligned group of degree k holds ``k * rank_capacity`` once merged."""

    instances: tuple[InstanceView, ...]
    rank_capacity: int
    max_tp: int
    reserved: frozenset[int] = field(default_factory=frozenset)

    def __post_init__(self) -> None:
        if not is_power_of_two(self.max_tp):
            raise ValueError(f"max_tp must be a power of two, got {self.max_tp}")

    @property
    def num_ranks(self) -> int:
        return sum(i.tp for i in self.instances)

    def capacity_at(self, degree: int) -> int:
        return degree * self.rank_capacity

    def instance_of(self, rank: int) -> InstanceView:
        return next(i for i in self.instances if rank in i.ranks)

    def group_load(self, ranks: tuple[int, ...]) -> int:
        """KV tokens in use on ``ranks``: what a merge of them has to move (up to (k-1)/k)."""
        return sum(i.used_tokens for i in self.instances if set(i.ranks) <= set(ranks))


class Dispatch(NamedTuple):
    leader: int


class Merge(NamedTuple):
    ranks: tuple[int, ...]


class Wait(NamedTuple):
    reason: str


class Reject(NamedTuple):
    reason: str


Decision = Dispatch | Merge | Wait | Reject


def aligned_groups(num_ranks: int, degree: int) -> list[tuple[int, ...]]:
    """Every aligned group of ``degree`` ranks: (0..k-1), (k..2k-1), ..."""
    return [tuple(range(s, s + degree)) for s in range(0, num_ranks - degree + 1, degree)]


def smallest_degree(host: HostView, need: int) -> int | None:
    """The smallest degree whose instance can hold ``need`` KV slots, or None."""
    k = 1
    while k <= host.max_tp:
        if host.capacity_at(k) >= need:
            return k
        k *= 2
    return None


def decide(host: HostView, need: int, policy: str = "gyges", counter: int = 0) -> Decision:
    """Placement of one request needing ``need`` KV slots (prompt + max_new_tokens).

    ``counter`` is the round-robin cursor (only ``round_robin`` reads it).
    """
    degree = smallest_degree(host, need)
    if degree is None:
        return Reject(f"request needs {need} KV slots but the largest instance this host can "
                      f"form (TP{host.max_tp}) holds {host.capacity_at(host.max_tp)}")
    if degree == 1:
        return _place_short(host, need, policy, counter)
    return _place_long(host, need, degree, policy, counter)


def _place_short(host: HostView, need: int, policy: str, counter: int) -> Decision:
    tp1 = [i for i in host.instances if i.tp == 1]
    if policy == "round_robin":
        return Dispatch(tp1[counter % len(tp1)].leader) if tp1 else _least_loaded(host)
    if policy == "llf":
        return _least_loaded(host, tp1) if tp1 else _least_loaded(host)
    # gyges: never disturb a reserved group; prefer TP1 instances with room.
    free = [i for i in host.instances if not (set(i.ranks) & host.reserved)]
    fitting_tp1 = [i for i in free if i.tp == 1 and i.free_tokens >= need]
    if fitting_tp1:
        return _least_queued(fitting_tp1)
    fitting = [i for i in free if i.free_tokens >= need]
    if fitting:
        return _least_loaded(host, fitting)
    if free:
        return _least_loaded(host, free)
    return Wait("every instance is reserved for a pending merge")


def _place_long(host: HostView, need: int, degree: int, policy: str, counter: int) -> Decision:
    # 1. An instance that is already large enough and has room: the smallest such.
    ready = [i for i in host.instances
             if i.tp >= degree and i.free_tokens >= need and not (set(i.ranks) & host.reserved)]
    if ready:
        return Dispatch(min(ready, key=lambda i: (i.tp, i.used_tokens, i.leader)).leader)
    # 2. Merge an aligned group of that degree. A group is mergeable if none of its ranks
    #    is reserved and none belongs to an instance larger than the group.
    groups = [g for g in aligned_groups(host.num_ranks, degree)
              if not (set(g) & host.reserved)
              and all(host.instance_of(r).tp <= degree for r in g)
              and host.instance_of(g[0]).tp < degree]
    if not groups:
        big = [i for i in host.instances if i.tp >= degree and i.capacity_tokens >= need
               and not (set(i.ranks) & host.reserved)]
        if big:  # large enough but busy: queue on the least used one
            return Dispatch(min(big, key=lambda i: (i.used_tokens, i.leader)).leader)
        return Wait(f"no aligned group of {degree} ranks is free to merge")
    if policy == "round_robin":
        return Merge(groups[counter % len(groups)])
    if policy == "llf":  # the group holding the least-loaded instance, blind to its peers
        target = min((host.instance_of(r) for g in groups for r in g),
                     key=lambda i: (i.used_tokens, i.leader))
        return Merge(next(g for g in groups if target.leader in g))
    return Merge(min(groups, key=lambda g: (host.group_load(g), g[0])))


def _load(i: InstanceView) -> tuple[float, int, int]:
    return i.used_tokens / max(i.capacity_tokens, 1), i.running, i.leader


def _least_loaded(host: HostView, among: list[InstanceView] | None = None) -> Dispatch:
    pool = among if among is not None else list(host.instances)
    return Dispatch(min(pool, key=_load).leader)


def _least_queued(pool: list[InstanceView]) -> Dispatch:
    """The instance with the fewest requests not yet started, then the least KV load.
    KV load alone herds: the replica whose requests just finished stays the least loaded
    while it prefills the first request sent to it, so the next ones queue behind that
    prefill while other replicas could start them (in the simulator, Llama-3-8B on the
    Mooncake conversation trace: TTFT p50 924 ms against 469 ms for round robin)."""
    return Dispatch(min(pool, key=lambda i: (i.waiting, *_load(i))).leader)


def splits_due(host: HostView, last_long_seen: dict[int, float], now: float,
               hold_down_s: float, long_running: dict[int, int]) -> list[InstanceView]:
    """Merged instances to split: not reserved, no long request running on them (a request
    longer than one replica keeps its group merged), and none seen for ``hold_down_s``
    seconds, so that a burst of long requests does not make the group oscillate."""
    due = []
    for inst in host.instances:
        if inst.tp == 1 or set(inst.ranks) & host.reserved:
            continue
        if long_running.get(inst.leader, 0) > 0:
            continue
        if now - last_long_seen.get(inst.leader, float("-inf")) < hold_down_s:
            continue
        due.append(inst)
    return due
