"""Merge and split of aligned groups with requests in flight, driven by the host controller;
engine-agnostic.

A transformation runs as a background job so the control channel stays responsive
(``/gyges/status``) and a second request while one runs gets 409 at once. Steps (merge;
split mirrors it):

  1. validate (400) and claim the single transformation slot (409);
  2. pause the group's ranks in the dispatch gate: new requests go to other instances
     or wait in the controller; control messages wait;
  3. poll the members with ``idle`` until every one reports ``ready`` (its work can move:
     nothing unread, no chunked prefill or unmovable request; bounded, else 409 "group
     busy"); running requests keep running meanwhile;
  4. send ``merge`` to every member; they switch in a collective, between steps, and carry
     their running and waiting requests over (a unanimous "group busy" refusal, e.g. a
     request arrived between the poll and the switch, goes back to step 3);
  5. update the topology and routing (followers get nothing), resume dispatch.
"""
from __future__ import annotations

import itertools
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from gyges.comm.groups import validate_group
from gyges.control.channel import ControlError, Message
from gyges.topology import Instance, Topology

IDLE_POLL_TIMEOUT_S = 10.0
SWITCH_TIMEOUT_S = 120.0


class Routing(Protocol):
    """The DP controller's dispatch, as the transformer drives it."""

    unsupported: str | None

    def pause(self, ranks: tuple[int, ...]) -> None: ...
    def resume(self, ranks: tuple[int, ...]) -> int: ...
    def set_instance(self, ranks: tuple[int, ...]) -> None: ...


class Bus(Protocol):
    def run(self, ranks: Any, msg: Message, timeout_s: float) -> dict[int, Message]: ...


@dataclass
class Job:
    id: int
    kind: str
    ranks: tuple[int, ...]
    done: threading.Event = field(default_factory=threading.Event)
    result: Message | None = None
    error: ControlError | None = None


class Transformer:
    def __init__(self, *, num_ranks: int, max_tp: int, bus: Bus, bus_lock: threading.Lock,
                 routing: Routing, get_topology: Callable[[], Topology],
                 set_topology: Callable[[Topology], None],
                 describe: Callable[[Instance], Message],
                 idle_timeout_s: float = 60.0,
                 observe: Callable[[str, int, float, Message | None], None] | None = None
                 ) -> None:
        self.num_ranks, self.max_tp = num_ranks, max_tp
        self.bus, self.bus_lock, self.routing = bus, bus_lock, routing
        self.get_topology, self.set_topology, self.describe = (get_topology, set_topology,
                                                               describe)
        self.idle_timeout_s = idle_timeout_s
        self.observe = observe  # (op, HTTP status, seconds, result or None) per finished job
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._jobs: dict[int, Job] = {}
        self.running: Job | None = None

    # -- control-channel handlers ---------------------------------------------------------

    def start(self, msg: Message) -> Message:
        """Validate a ``merge``/``split`` request and start it; reply ``{"job": id}``."""
        kind = msg["op"]
        ranks = validate_group(msg.get("ranks"), self.num_ranks, self.max_tp)
        if self.routing.unsupported:
            raise ControlError(self.routing.unsupported)
        try:
            target = (self.get_topology().merged(ranks) if kind == "merge"
                      else self.get_topology().split(ranks))
        except ValueError as e:
            raise ControlError(str(e)) from None
        with self._lock:
            if self.running is not None:
                r = self.running
                raise ControlError(f"a transformation is already running ({r.kind} "
                                   f"{list(r.ranks)})", 409)
            job = Job(next(self._ids), kind, ranks)
            self.running = self._jobs[job.id] = job
        threading.Thread(target=self._run, args=(job, target), daemon=True,
                         name=f"gyges-{kind}").start()
        return {"job": job.id}

    def poll(self, msg: Message) -> Message:
        """State of job ``msg["job"]``; waits up to ``wait_s`` for it to finish."""
        job = self._jobs.get(msg.get("job"))  # type: ignore[arg-type]
        if job is None:
            raise ControlError(f"unknown job {msg.get('job')!r}", 404)
        job.done.wait(min(float(msg.get("wait_s", 0.0)), 5.0))
        if not job.done.is_set():
            return {"done": False}
        self._jobs.pop(job.id, None)
        if job.error is not None:
            raise job.error
        return {"done": True, "result": job.result}

    # -- the job --------------------------------------------------------------------------

    def _run(self, job: Job, target: Topology) -> None:
        t0 = time.perf_counter()
        try:
            job.result = self._transform(job, target)
        except ControlError as e:
            job.error = e
        except Exception as e:  # a bug: report it, keep the controller alive
            job.error = ControlError(f"internal error in {job.kind}: {e}", 500)
        finally:
            with self._lock:
                self.running = None
            job.done.set()
        if self.observe is not None:
            status = 200 if job.error is None else job.error.status
            self.observe(job.kind, status, time.perf_counter() - t0, job.result)

    def _transform(self, job: Job, target: Topology) -> Message:
        t0 = time.perf_counter()
        phases: dict[str, float] = {}
        ranks = job.ranks
        self.routing.pause(ranks)
        switched = False
        try:
            polls = 0
            while True:
                polls += self._wait_ready(ranks, t0)
                phases["wait_ready_ms"] = _ms(t0)
                t1 = time.perf_counter()
                seed = random.randrange(1 << 31)
                replies = self._run_bus(ranks, {"op": job.kind, "ranks": list(ranks),
                                                "seed": seed}, SWITCH_TIMEOUT_S)
                failed = {r: x.get("error") for r, x in replies.items() if not x.get("ok")}
                busy = failed and len(failed) == len(ranks) and all(
                    "group busy" in str(e) for e in failed.values())
                if not busy:
                    break
                if time.monotonic() - t0 > self.idle_timeout_s or "fits neither" in str(
                        next(iter(failed.values()))):
                    raise ControlError(f"group busy: {failed}", 409)
            if failed:
                raise ControlError(f"{job.kind} failed on rank(s) {sorted(failed)}: {failed}; "
                                   "the group's state is unknown", 500)
            switched = True
            phases[f"{job.kind}_ms"] = _ms(t1)
            self.set_topology(target)
            t2 = time.perf_counter()
            for inst in target.instances:
                if set(inst.ranks) <= set(ranks):
                    self.routing.set_instance(inst.ranks)
        finally:
            held = self.routing.resume(ranks)
        phases["routing_ms"] = _ms(t2) if switched else 0.0
        phases["total_ms"] = _ms(t0)
        instances = [self.describe(i) for i in target.instances if i.ranks[0] in ranks]
        members = [replies[r] for r in ranks]
        return {"op": job.kind, "ranks": list(ranks), "instances": instances,
                "kv_bytes_moved": sum(int(m.get("kv_bytes_moved", 0)) for m in members),
                **{key: sum(int(m.get(key, 0)) for m in members)
                   for key in ("weight_bytes_released", "weight_bytes_restored")
                   if any(key in m for m in members)},
                "requests_moved": {"running": int(members[0].get("running", 0)),
                                   "waiting": int(members[0].get("waiting", 0))},
                "elapsed_ms": phases, "held_requests_sent": held, "ready_polls": polls,
                "members": {str(r): {k: v for k, v in replies[r].items()
                                     if k not in ("id", "rank", "ok")} for r in ranks}}

    def _wait_ready(self, ranks: tuple[int, ...], t0: float) -> int:
        """Poll ``idle`` until every member reports ready; returns the number of polls."""
        polls = 0
        while True:
            polls += 1
            replies = self._run_bus(ranks, {"op": "idle"}, IDLE_POLL_TIMEOUT_S)
            busy = {r: x for r, x in replies.items() if not (x.get("ok") and x.get("ready"))}
            if not busy:
                return polls
            if time.monotonic() - t0 > self.idle_timeout_s:
                detail = {r: x.get("why") or x.get("error") for r, x in busy.items()}
                raise ControlError(f"group busy: ranks {sorted(busy)} were not ready "
                                   f"within {self.idle_timeout_s:g}s: {detail}", 409)
            time.sleep(0.02)

    def _run_bus(self, ranks: tuple[int, ...], msg: Message,
                 timeout_s: float) -> dict[int, Message]:
        with self.bus_lock:
            return self.bus.run(ranks, msg, timeout_s)


def _ms(t0: float) -> float:
    return round((time.perf_counter() - t0) * 1000, 3)
