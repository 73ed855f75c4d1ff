"""The Gyges brain of one host, engine-agnostic: topology, registered ranks, status.

It lives in SGLang's data-parallel controller process (see
``gyges.hooks.data_parallel_controller``) and answers the control channel. Later layers
add merge/split and the transformation-aware dispatch policy here.
"""
from __future__ import annotations

import os
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from gyges.config import GygesConfig
from gyges.control.channel import ControlError, Handler, Message
from gyges.topology import Instance, Topology


@dataclass(frozen=True)
class RankInfo:
    """What a scheduler process reports when its Gyges hooks are live."""

    rank: int
    pid: int
    kv_layout: str
    mlp_storage: str
    capacity_tokens: int


@dataclass(frozen=True)
class RankLoad:
    """One rank's load as SGLang's scheduler last published it."""

    running: int = 0
    waiting: int = 0
    used_tokens: int = 0


LoadReader = Callable[[], Mapping[int, RankLoad]]


class HostController:
    """Owns the host's :class:`Topology`; thread-safe for the control thread."""

    def __init__(self, config: GygesConfig, read_loads: LoadReader) -> None:
        self.config = config
        self._read_loads = read_loads
        self._lock = threading.Lock()
        self._topology = Topology.boot(config.dp_size)
        self._ranks: dict[int, RankInfo] = {}

    @property
    def topology(self) -> Topology:
        with self._lock:
            return self._topology

    def handlers(self) -> dict[str, Handler]:
        return {"hello": self._on_hello, "status": lambda _msg: self.status()}

    def _on_hello(self, msg: Message) -> Message:
        try:
            info = RankInfo(int(msg["rank"]), int(msg["pid"]), str(msg["kv_layout"]),
                            str(msg["mlp_storage"]), int(msg["capacity_tokens"]))
        except (KeyError, TypeError, ValueError) as e:
            raise ControlError(f"malformed hello: {e}") from e
        if not 0 <= info.rank < self.config.dp_size:
            raise ControlError(f"hello from unknown rank {info.rank}")
        with self._lock:
            self._ranks[info.rank] = info
        return {}

    def capacity_of(self, inst: Instance) -> int:
        """KV slots of an instance: the sum of its ranks' pools (each holds 1/k of heads)."""
        return sum(self._ranks[r].capacity_tokens if r in self._ranks else 0 for r in inst.ranks)

    def status(self) -> dict[str, Any]:
        loads = self._read_loads()
        with self._lock:
            topo, ranks = self._topology, dict(self._ranks)
        instances = []
        for inst in topo.instances:
            load = [loads.get(r, RankLoad()) for r in inst.ranks]
            lead = load[0]
            instances.append({
                "ranks": list(inst.ranks),
                "tp": inst.tp,
                "leader": inst.leader,
                "capacity_tokens": self.capacity_of(inst),
                "used_tokens": sum(x.used_tokens for x in load),
                "running": lead.running,
                "waiting": lead.waiting,
            })
        return {
            "kv_layout": _common(r.kv_layout for r in ranks.values()),
            "mlp_storage": _common(r.mlp_storage for r in ranks.values()),
            "dp_size": self.config.dp_size,
            "max_tp": self.config.max_tp,
            "policy": self.config.policy,
            "max_request_tokens": max((i["capacity_tokens"] for i in instances), default=0),
            "instances": instances,
            "processes": {
                "dp_controller": {"pid": os.getpid()},
                "schedulers": [
                    {"rank": r.rank, "pid": r.pid} for r in sorted(ranks.values(),
                                                                   key=lambda x: x.rank)
                ],
            },
        }


def _common(values: Any) -> str:
    found = set(values)
    if not found:
        return "unknown"
    return found.pop() if len(found) == 1 else "mixed:" + ",".join(sorted(found))
