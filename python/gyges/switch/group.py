"""A pooled gloo group as an SGLang ``GroupCoordinator``.

SGLang's ``GroupCoordinator.__init__`` builds its groups with ``new_group`` on the default
world, which under DP is each replica's own size-1 world, so it cannot span replicas. The
adapter skips it and wraps the communicator pool's pre-built group. Its "global" ranks are
the host ranks of the pool (``ranks == (0, 1)`` for the group of ranks 0 and 1); the group is
registered with ``torch.distributed`` under that rank mapping so SGLang helpers that take a
global ``src`` (``broadcast_pyobj(..., src=group.ranks[0])``) work.
CPU only: no pynccl / custom all-reduce / message-queue broadcaster.
"""
from __future__ import annotations

from typing import Any

import torch
from sglang.srt.distributed import parallel_state as ps
from torch.distributed import distributed_c10d as c10d

from gyges.comm.pool import PoolGroup

_OFF_FLAGS = ("use_pynccl", "use_mscclpp", "use_custom_allreduce",
              "use_torch_symm_mem_all_reduce", "use_hpu_communicator", "use_xpu_communicator",
              "use_message_queue_broadcaster")
_NO_COMMUNICATORS = ("pynccl_comm", "pymscclpp_comm", "ca_comm", "qr_comm", "pcie_ipc_comm",
                     "torch_symm_mem_comm", "hpu_communicator", "xpu_communicator",
                     "mq_broadcaster")


def register_in_c10d(group: PoolGroup) -> None:
    """Make ``group``'s process group known to ``torch.distributed`` (idempotent)."""
    pg = group.cpu_group
    if pg in c10d._world.pg_map:
        return
    name = pg.group_name
    c10d._register_pg_in_world(pg, "gloo", None, name, "cpu:gloo",
                               rank_mapping={r: i for i, r in enumerate(group.ranks)})


class PooledGroupCoordinator(ps.GroupCoordinator):
    """``GroupCoordinator`` over a :class:`PoolGroup`; this process is host rank ``rank``."""

    def __init__(self, group: PoolGroup, rank: int, name: str = "gyges_tp") -> None:
        # Deliberately no super().__init__(): it would create groups on the default world.
        register_in_c10d(group)
        self.unique_name = ps._get_unique_name(name)
        ps._register_group(self)  # custom ops look groups up by name
        self.rank, self.ranks = rank, list(group.ranks)
        self.world_size, self.rank_in_group = len(self.ranks), self.ranks.index(rank)
        self.local_rank, self.local_size = 0, 0
        self.device = ps._group_coordinator_device(0)
        self.device_module = torch.get_device_module(self.device)
        self.cpu_group, self.device_group = group.cpu_group, group.device_group
        self.active_ranks = torch.ones(self.world_size, dtype=torch.int32, device=self.device)
        self.active_ranks_cpu = torch.ones(self.world_size, dtype=torch.int32)
        self._fi_workspace_hint = None
        for flag in _OFF_FLAGS:
            setattr(self, flag, False)
        for attr in _NO_COMMUNICATORS:
            setattr(self, attr, None)
        from sglang.srt.distributed.device_communicators.pynccl_allocator import (
            debug_check_symmetric_mempool,
            is_symmetric_memory_enabled,
            use_symmetric_memory,
        )
        from sglang.srt.layers.dp_attention import is_allocation_symmetric

        self.is_symmetric_memory_enabled = is_symmetric_memory_enabled
        self.use_symmetric_memory = use_symmetric_memory
        self.is_allocation_symmetric = is_allocation_symmetric
        self.debug_check_symmetric_mempool = debug_check_symmetric_mempool

    def destroy(self) -> None:
        """The pool owns the process group: only drop the references."""
        self.cpu_group = self.device_group = None


def broadcast_json(group: PoolGroup, obj: Any, timeout_s: float | None = None) -> Any:
    """Broadcast a JSON-able object from the group's first rank over its gloo group."""
    import json
    from datetime import timedelta

    pg = group.cpu_group
    opts = torch.distributed.BroadcastOptions()
    opts.rootRank = 0
    if timeout_s is not None:
        opts.timeout = timedelta(seconds=timeout_s)
    data = json.dumps(obj).encode() if group.rank_in_group == 0 else b""
    size = torch.tensor([len(data)], dtype=torch.int64)
    pg.broadcast([size], opts).wait()
    if group.rank_in_group == 0:
        buf = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else \
            torch.empty(0, dtype=torch.uint8)
    else:
        buf = torch.empty(int(size.item()), dtype=torch.uint8)
    if buf.numel():
        pg.broadcast([buf], opts).wait()
    return obj if group.rank_in_group == 0 else json.loads(bytes(buf.tolist()))


def all_gather_bytes(group: PoolGroup, data: bytes, timeout_s: float = 60.0) -> list[bytes]:
    """Every member's ``data``, in group order (a gloo all-gather of padded byte buffers)."""
    from datetime import timedelta

    from torch._C._distributed_c10d import AllgatherOptions

    pg, n = group.cpu_group, len(group.ranks)
    opts = AllgatherOptions()
    opts.timeout = timedelta(seconds=timeout_s)
    size = torch.tensor([len(data)], dtype=torch.int64)
    sizes = [torch.empty(1, dtype=torch.int64) for _ in range(n)]
    pg.allgather([sizes], [size], opts).wait()
    width = max(int(s.item()) for s in sizes)
    buf = torch.zeros(max(width, 1), dtype=torch.uint8)
    if data:
        buf[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    out = [torch.empty_like(buf) for _ in range(n)]
    pg.allgather([out], [buf], opts).wait()
    return [bytes(o[: int(s.item())].numpy().tobytes()) for o, s in zip(out, sizes, strict=True)]
