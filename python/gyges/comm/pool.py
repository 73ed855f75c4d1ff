"""CommunicatorPool: the cross-replica gloo world and every aligned subgroup of one rank.

Engine-agnostic (torch only). Every scheduler process of a host calls
:meth:`CommunicatorPool.build` once at startup against one TCPStore (the master lives in
the host controller's process, see :func:`start_store`). Each rank builds the world group
and, for each degree 2..max_tp, the one aligned group it belongs to, in the same order on
every rank, then verifies each group with an all-reduce. A transformation later only
looks groups up.

Each :class:`PoolGroup` has a CPU group (metadata: pickled requests, votes, plans), a
device group (payload: KV blocks, MLP shards) and a side device group (payload moved in the
background while the members serve: KV pre-copy, weight restore), made by the device's
:data:`GroupFactory` in :data:`GROUP_FACTORIES`. On CPU the first two are one gloo group.
The GPU factory (an NCCL device group per aligned group through SGLang's
``init_model_parallel_group``, beside a gloo CPU group) plugs in there; it is not written
yet: ``build(device="cuda")`` raises ``NotImplementedError``, and startup refuses CUDA
before that.

The process groups are built directly on the store and are not registered with
``torch.distributed``'s global world (each SGLang replica has its own size-1 world);
registering them, for SGLang's ``GroupCoordinator`` APIs that take a global ``src`` rank, is
the job of the SGLang adapter that wraps a group at merge time.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import NamedTuple, Protocol

import torch
import torch.distributed as dist

from gyges.comm.groups import group_of, pool_degrees

LOOPBACK = "127.0.0.1"
_GLOO = dist.ProcessGroup.BackendType.GLOO


def start_store(timeout_s: float = 300.0) -> dist.TCPStore:
    """The pool's rendezvous store master on a free loopback port (``store.port``)."""
    return dist.TCPStore(LOOPBACK, 0, is_master=True, wait_for_workers=False,
                         timeout=timedelta(seconds=timeout_s))


def connect_store(port: int, timeout_s: float = 300.0) -> dist.TCPStore:
    return dist.TCPStore(LOOPBACK, port, is_master=False, timeout=timedelta(seconds=timeout_s))


def new_gloo_group(store: dist.Store, name: str, rank: int, size: int,
                   timeout_s: float) -> dist.ProcessGroup:
    """A gloo ProcessGroup over ``store`` on loopback; blocks until all ``size`` ranks join."""
    prefix = dist.PrefixStore(f"gyges/{name}/", store)
    opts = dist.ProcessGroupGloo._Options()
    opts._timeout = timedelta(seconds=timeout_s)
    opts._devices = [dist.ProcessGroupGloo.create_device(hostname=LOOPBACK)]
    backend = dist.ProcessGroupGloo(prefix, rank, size, opts)
    pg = dist.ProcessGroup(prefix, rank, size)
    pg._set_default_backend(_GLOO)
    pg._register_backend(torch.device("cpu"), _GLOO, backend)
    pg._set_group_name(name)
    return pg


class GroupFactory(Protocol):
    """Makes one pooled group's ``(cpu_group, device_group)`` over ``store``; blocks until
    all ``size`` ranks joined. Called in the same order on every rank."""

    def __call__(self, store: dist.Store, name: str, rank: int, size: int,
                 timeout_s: float) -> tuple[dist.ProcessGroup, dist.ProcessGroup]: ...


def gloo_groups(store: dist.Store, name: str, rank: int, size: int,
                timeout_s: float) -> tuple[dist.ProcessGroup, dist.ProcessGroup]:
    """CPU: one gloo group serves as both."""
    pg = new_gloo_group(store, name, rank, size, timeout_s)
    return pg, pg


GROUP_FACTORIES: dict[str, GroupFactory] = {"cpu": gloo_groups}


@dataclass(frozen=True)
class PoolGroup:
    """One pre-created group: host ranks, this process's rank in it, and its groups."""

    ranks: tuple[int, ...]
    rank_in_group: int
    cpu_group: dist.ProcessGroup  # metadata
    device_group: dist.ProcessGroup  # payload; the same gloo group on CPU
    # payload moved in the background while the members serve (KV pre-copy, weight
    # restore): its own communicator, so it never interleaves with the groups above
    side_group: dist.ProcessGroup | None = None


class CommCheck(NamedTuple):
    result: list[float]
    elapsed_ms: float


def contribution(rank: int) -> torch.Tensor:
    """What ``rank`` contributes to a check: its sum over a group names the group's members."""
    return torch.tensor([1.0, float(rank), 2.0 ** rank], dtype=torch.float64)


def expected_sum(ranks: tuple[int, ...]) -> list[float]:
    return [float(len(ranks)), float(sum(ranks)), float(sum(2 ** r for r in ranks))]


class CommunicatorPool:
    """The groups of one rank, keyed by their host ranks (``world`` included)."""

    def __init__(self, rank: int, world_size: int, max_tp: int,
                 groups: dict[tuple[int, ...], PoolGroup], build_ms: float) -> None:
        self.rank = rank
        self.world_size = world_size
        self.max_tp = max_tp
        self.groups = groups
        self.build_ms = build_ms

    @classmethod
    def build(cls, store: dist.Store, rank: int, world_size: int, max_tp: int, *,
              timeout_s: float = 120.0, device: str = "cpu") -> CommunicatorPool:
        """Create and verify every group of ``rank``; collective over all ``world_size`` ranks."""
        factory = GROUP_FACTORIES.get(device)
        if factory is None:
            raise NotImplementedError(
                f"Gyges communicator pool: no group factory for device {device!r}; only CPU "
                "(gloo) groups exist yet, the NCCL device groups for GPUs are not implemented"
            )
        t0 = time.perf_counter()
        world_ranks = tuple(range(world_size))
        groups = {world_ranks: PoolGroup(world_ranks, rank, *factory(
            store, "world", rank, world_size, timeout_s))}
        for k in pool_degrees(max_tp):
            ranks = group_of(rank, k)
            r = ranks.index(rank)
            side = factory(store, f"side{k}-{ranks[0]}", r, k, timeout_s)[1]
            if ranks in groups:  # the world is this group: it gets a side group too
                groups[ranks] = replace(groups[ranks], side_group=side)
                continue
            cpu, device = factory(store, f"tp{k}-{ranks[0]}", r, k, timeout_s)
            groups[ranks] = PoolGroup(ranks, r, cpu, device, side)
        pool = cls(rank, world_size, max_tp, groups, 0.0)
        pool.verify()
        pool.build_ms = (time.perf_counter() - t0) * 1000
        return pool

    def group(self, ranks: tuple[int, ...]) -> PoolGroup:
        try:
            return self.groups[tuple(ranks)]
        except KeyError:
            raise KeyError(f"rank {self.rank} holds no pooled group {list(ranks)}") from None

    def all_reduce(self, ranks: tuple[int, ...], tensor: torch.Tensor,
                   timeout_s: float | None = None) -> torch.Tensor:
        """Sum ``tensor`` in place over the pooled group ``ranks``; collective."""
        opts = dist.AllreduceOptions()
        opts.reduceOp = dist.ReduceOp.SUM
        if timeout_s is not None:
            opts.timeout = timedelta(seconds=timeout_s)
        self.group(ranks).cpu_group.allreduce([tensor], opts).wait()
        return tensor

    def check(self, ranks: tuple[int, ...], timeout_s: float | None = None) -> CommCheck:
        """All-reduce :func:`contribution` over ``ranks``; collective over that group."""
        t0 = time.perf_counter()
        out = self.all_reduce(ranks, contribution(self.rank), timeout_s)
        return CommCheck(out.tolist(), (time.perf_counter() - t0) * 1000)

    def verify(self) -> None:
        """Check every group once, in a fixed order (every rank runs this collectively)."""
        for ranks in sorted(self.groups, key=lambda g: (len(g), g)):
            got = self.check(ranks).result
            if got != expected_sum(ranks):
                raise RuntimeError(f"pooled group {list(ranks)} is broken: all-reduce gave "
                                   f"{got}, expected {expected_sum(ranks)}")
