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
