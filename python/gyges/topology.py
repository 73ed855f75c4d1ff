"""Which ranks of a host form which instance: engine-agnostic bookkeeping.

An instance is an aligned group of ranks serving as one TP group; at boot every rank is
its own TP1 instance. Only aligned groups exist (ranks ``k*m .. k*m+k-1``), so merges
nest: TP1 -> TP2 -> TP4 and back.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Instance:
    """One TP group: ``ranks`` is aligned and contiguous; the leader is ``ranks[0]``."""

    ranks: tuple[int, ...]

    @property
    def tp(self) -> int:
        return len(self.ranks)

    @property
    def leader(self) -> int:
        return self.ranks[0]


@dataclass(frozen=True)
class Topology:
    """The partition of a host's ranks into instances (sorted by leader)."""

    instances: tuple[Instance, ...]

    @classmethod
    def boot(cls, dp_size: int) -> Topology:
        return cls(tuple(Instance((r,)) for r in range(dp_size)))

    @property
    def num_ranks(self) -> int:
        return sum(i.tp for i in self.instances)

    def instance_of(self, rank: int) -> Instance:
        for inst in self.instances:
            if rank in inst.ranks:
                return inst
        raise KeyError(f"rank {rank} is not on this host (0..{self.num_ranks - 1})")

    @property
    def leaders(self) -> tuple[int, ...]:
        return tuple(i.leader for i in self.instances)

    def merged(self, group: tuple[int, ...]) -> Topology:
        """The topology after merging the aligned ``group`` (already validated) into one
        instance. Its ranks must be exactly the instances of its two aligned halves: TP1
        replicas merge to TP2, two TP2 instances to TP4, and so on.

        Raises :class:`ValueError` with a user-facing message otherwise.
        """
        half = len(group) // 2
        halves = (Instance(group[:half]), Instance(group[half:]))
        current = sorted({self.instance_of(r) for r in group}, key=lambda i: i.leader)
        if len(current) == 1 and current[0].ranks == group:
            raise ValueError(f"ranks {list(group)} already form one TP{len(group)} instance")
        if tuple(current) != halves:
            have = ", ".join(str(list(i.ranks)) for i in current)
            raise ValueError(
                f"ranks {list(group)} cannot merge: they belong to instances {have}; a merge "
                f"joins exactly two instances {list(halves[0].ranks)} and "
                f"{list(halves[1].ranks)}")
        return self._replace(current, (Instance(group),))

    def split(self, group: tuple[int, ...]) -> Topology:
        """The topology after splitting the instance ``group`` into its two aligned halves."""
        inst = self.instance_of(group[0])
        if inst.ranks != group and all(self.instance_of(r).tp == 1 for r in group):
            raise ValueError(f"ranks {list(group)} are separate TP1 instances: there is no "
                             "merged instance to split")
        if inst.ranks != group:
            raise ValueError(
                f"ranks {list(group)} are not one instance (rank {group[0]} is in "
                f"{list(inst.ranks)}); split takes all ranks of a merged instance")
        if inst.tp == 1:
            raise ValueError(f"instance {list(group)} is TP1 and cannot split")
        half = len(group) // 2
        return self._replace((inst,), (Instance(group[:half]), Instance(group[half:])))

    def _replace(self, old: tuple[Instance, ...] | list[Instance],
                 new: tuple[Instance, ...]) -> Topology:
        kept = [i for i in self.instances if i not in old]
        return Topology(tuple(sorted(kept + list(new), key=lambda i: i.leader)))


def next_merge_step(topology: Topology, group: tuple[int, ...]) -> tuple[int, ...] | None:
    """The next pairwise merge that brings the aligned ``group`` closer to one instance, or
    None if it already is one. Merges nest (two TP1 -> TP2, two TP2 -> TP4), so four TP1
    ranks become one TP4 instance in three steps: (0, 1), (2, 3), (0, 1, 2, 3).

    Raises :class:`ValueError` if a rank of ``group`` is in an instance larger than it."""
    inst = topology.instance_of(group[0])
    if inst.ranks == group or len(group) == 1:
        return None
    if any(topology.instance_of(r).tp > len(group) for r in group):
        raise ValueError(f"ranks {list(group)} overlap an instance larger than the group")
    half = len(group) // 2
    for sub in (group[:half], group[half:]):
        step = next_merge_step(topology, sub)
        if step is not None:
            return step
    return group
