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

from gyges.comm.groups import validate_group
from gyges.comm.pool import expected_sum
from gyges.config import GygesConfig
from gyges.control.channel import ControlError, Handler, Message
from gyges.control.commands import CommandBus
from gyges.control.rank_load import RankLoad
from gyges.control.transform import Routing, Transformer
from gyges.topology import Instance, Topology

__all__ = ["HostController", "LoadReader", "RankInfo", "RankLoad"]


@dataclass(frozen=True)
class RankInfo:
    """What a scheduler process reports when its Gyges hooks are live."""

    rank: int
    pid: int
    kv_layout: str
    mlp_storage: str
    capacity_tokens: int


LoadReader = Callable[[], Mapping[int, RankLoad]]

COMM_CHECK_TIMEOUT_S = 10.0  # per rank, inside its all-reduce
COMMAND_TIMEOUT_S = 30.0  # for all replies; longer, so ranks answer before the bus gives up


class HostController:
    """Owns the host's :class:`Topology`; thread-safe for the control thread."""

    def __init__(self, config: GygesConfig, read_loads: LoadReader, *,
                 commands: CommandBus | None = None, store_port: int | None = None,
                 routing: Routing | None = None) -> None:
        self.config = config
        self._read_loads = read_loads
        self._commands = commands
        self._store_port = store_port
        self._lock = threading.Lock()
        self._topology = Topology.boot(config.dp_size)
        self._ranks: dict[int, RankInfo] = {}
        self._pool_build_ms: dict[int, float] = {}
        self._bus_lock = threading.Lock()  # the bus is used by the control and job threads
        # The transformation-aware dispatch (gyges.control.scheduler), attached by the DP
        # controller hook; /gyges/status shows its state.
        self.scheduler: Any = None
        self.scheduler_off_reason = "not started"
        self.health: Any = None  # HostHealth, attached by the DP controller hook
        self.transformer = None if commands is None or routing is None else Transformer(
            num_ranks=config.dp_size, max_tp=config.max_tp, bus=commands,
            bus_lock=self._bus_lock, routing=routing, get_topology=lambda: self.topology,
            set_topology=self._set_topology, describe=self.describe)

    def _set_topology(self, topology: Topology) -> None:
        with self._lock:
            self._topology = topology

    @property
    def topology(self) -> Topology:
        with self._lock:
            return self._topology

    def handlers(self) -> dict[str, Handler]:
        return {"hello": self._on_hello, "status": lambda _msg: self.status(),
                "health": lambda _msg: {"out_of_service": self.out_of_service()},
                "pool_ready": self._on_pool_ready, "comm_check": self._on_comm_check,
                "merge": self._on_transform, "split": self._on_transform,
                "job": self._on_job}

    def out_of_service(self) -> str | None:
        return self.health.reason() if self.health is not None else None

    def scheduler_pids(self) -> dict[int, int]:
        """{pid: rank} of the registered schedulers."""
        with self._lock:
            return {r.pid: r.rank for r in self._ranks.values()}

    def _on_transform(self, msg: Message) -> Message:
        if self.transformer is None:
            raise ControlError("merge/split are not available on this server", 503)
        ranks = validate_group(msg.get("ranks"), self.config.dp_size, self.config.max_tp)
        with self._lock:
            not_ready = [r for r in ranks if r not in self._pool_build_ms]
        if not_ready:
            raise ControlError(f"communicator pool not ready on rank(s) {not_ready}", 503)
        return self.transformer.start(msg)

    def _on_job(self, msg: Message) -> Message:
        if self.transformer is None:
            raise ControlError("merge/split are not available on this server", 503)
        # Never waits: the control thread serves every process one message at a time, and
        # a health probe (2 s budget) queued behind a waiting poll would see a dead host.
        return self.transformer.poll({**msg, "wait_s": 0.0})

    def start_transformation(self, op: str, ranks: tuple[int, ...]) -> int:
        """Start a merge/split job as the admin API does; return its id (ControlError)."""
        return int(self._on_transform({"op": op, "ranks": list(ranks)})["job"])

    def poll_transformation(self, job: int) -> Message | None:
        """The job's result once done, None while it runs; raises its ControlError."""
        reply = self._on_job({"op": "job", "job": job})
        return reply["result"] if reply["done"] else None

    def rank_capacity(self) -> int | None:
        """One TP1 replica's KV slots (the smallest), once every rank has registered."""
        with self._lock:
            if len(self._ranks) < self.config.dp_size:
                return None
            return min(r.capacity_tokens for r in self._ranks.values())

    def _on_hello(self, msg: Message) -> Message:
        try:
            info = RankInfo(int(msg["rank"]), int(msg["pid"]), str(msg["kv_layout"]),
                            str(msg["mlp_storage"]), int(msg["capacity_tokens"]))
        except (KeyError, TypeError, ValueError) as e:
            raise ControlError(f"malformed hello: {e}") from e
        if not 0 <= info.rank < self.config.dp_size:
            raise ControlError(f"hello from unknown rank {info.rank}")
        with self._lock:
            for other in self._ranks.values():
                if other.rank != info.rank and other.capacity_tokens != info.capacity_tokens:
                    # merged views reinterpret every member's storage with one slot count
                    raise ControlError(
                        f"rank {info.rank} has {info.capacity_tokens} KV slots but rank "
                        f"{other.rank} has {other.capacity_tokens}; every replica of a Gyges "
                        "host needs the same (set --max-total-tokens)")
            self._ranks[info.rank] = info
        if self._store_port is None:
            return {}
        return {"pool": {"store_port": self._store_port, "world_size": self.config.dp_size,
                         "max_tp": self.config.max_tp}}

    def _on_pool_ready(self, msg: Message) -> Message:
        """A scheduler built and verified its communicator pool groups."""
        try:
            rank, build_ms = int(msg["rank"]), float(msg["build_ms"])
        except (KeyError, TypeError, ValueError) as e:
            raise ControlError(f"malformed pool_ready: {e}") from e
        with self._lock:
            self._pool_build_ms[rank] = build_ms
        return {}

    def _on_comm_check(self, msg: Message) -> Message:
        """All-reduce a known tensor over a pooled group; every member replies."""
        ranks = validate_group(msg.get("ranks"), self.config.dp_size, self.config.max_tp)
        with self._lock:
            not_ready = [r for r in ranks if r not in self._pool_build_ms]
        if self._commands is None or not_ready:
            raise ControlError(f"communicator pool not ready on rank(s) {not_ready}", 503)
        with self._bus_lock:
            replies = self._commands.run(
                ranks, {"op": "comm_check", "ranks": list(ranks),
                        "timeout_s": COMM_CHECK_TIMEOUT_S}, COMMAND_TIMEOUT_S)
        expected = expected_sum(ranks)
        results = [{k: v for k, v in replies[r].items() if k != "id"} for r in ranks]
        passed = all(x["ok"] and x.get("result") == expected for x in results)
        return {"ranks": list(ranks), "expected": expected, "passed": passed,
                "results": results}

    def capacity_of(self, inst: Instance) -> int:
        """KV slots of an instance: the sum of its ranks' pools (each holds 1/k of heads).

        On SGLang's stock token-major pool a merge only re-views each rank's pool with
        H/k heads per slot (capacity not grown yet): there it is the smallest rank's."""
        caps = [self._ranks[r].capacity_tokens if r in self._ranks else 0 for r in inst.ranks]
        layouts = {self._ranks[r].kv_layout for r in inst.ranks if r in self._ranks}
        return min(caps) if layouts == {"token_major"} else sum(caps)

    def describe(self, inst: Instance,
                 loads: Mapping[int, RankLoad] | None = None) -> dict[str, Any]:
        """One instance as ``/gyges/status`` shows it."""
        loads = self._read_loads() if loads is None else loads
        load = [loads.get(r, RankLoad()) for r in inst.ranks]
        with self._lock:
            capacity = self.capacity_of(inst)
        return {"ranks": list(inst.ranks), "tp": inst.tp, "leader": inst.leader,
                "capacity_tokens": capacity,
                "used_tokens": load[0].used_tokens,  # the leader's view is the instance's
                "running": load[0].running, "waiting": load[0].waiting}

    def status(self) -> dict[str, Any]:
        loads = self._read_loads()
        with self._lock:
            topo, ranks = self._topology, dict(self._ranks)
            pool_ms = dict(self._pool_build_ms)
        instances = [self.describe(inst, loads) for inst in topo.instances]
        running = self.transformer.running if self.transformer is not None else None
        scheduler = self.scheduler.status() if self.scheduler is not None else None
        return {
            "out_of_service": self.out_of_service(),
            "broken_groups": [] if self.transformer is None else [
                {"ranks": list(g), "why": why} for g, why in self.transformer.broken.items()],
            "kv_layout": _common(r.kv_layout for r in ranks.values()),
            "mlp_storage": _common(r.mlp_storage for r in ranks.values()),
            "dp_size": self.config.dp_size,
            "max_tp": self.config.max_tp,
            "policy": self.config.policy,
            "max_request_tokens": (scheduler["max_request_tokens"] if scheduler is not None
                                   else max((i["capacity_tokens"] for i in instances),
                                            default=0)),
            "instances": instances,
            "transformation": None if running is None else {
                "op": running.kind, "ranks": list(running.ranks),
                "held_by": {str(r): why for r, why in self.transformer.held_by.items()}},
            "last_transformation": None if self.transformer is None else self.transformer.last,
            "scheduler": scheduler if scheduler is not None else {
                "policy": None, "reason": self.scheduler_off_reason},
            "comm_pool": {"ready_ranks": sorted(pool_ms),
                          "build_ms": {str(r): ms for r, ms in sorted(pool_ms.items())}},
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
