"""Merge and split of aligned groups with requests in flight, driven by the host controller;
engine-agnostic.

A transformation runs as a background job so the control channel stays responsive
(``/gyges/status``) and a second request while one runs gets 409 at once. Steps (merge;
split mirrors it):

  1. validate (400) and claim the single transformation slot (409);
  1b. unless the request says ``"precopy": false``, pre-copy: ``precopy`` to every member
     (they start moving the KV in the background, :mod:`gyges.switch.precopy`), then poll
     ``precopy_status`` until all are done; the group serves on meanwhile. A member that
     cannot start one makes the job run stop-the-world; one that fails is a 409;
  2. pause the group's ranks in the dispatch gate: new requests go to other instances
     or wait in the controller; control messages wait;
  3. poll the members with ``idle`` until every one reports ``ready`` (its work can move:
     nothing unread, no chunked prefill or unmovable request; bounded, else 409 "group
     busy"); running requests keep running meanwhile;
  4. send ``merge`` (``precopy: true`` after a pre-copy: the cutover then moves only what
     changed since) to every member; they prepare, vote and commit in a collective
     (:mod:`gyges.switch.protocol`), between steps, and carry their running and waiting
     requests over. A refusal is unanimous and changes nothing: "group busy" (e.g. a
     request arrived between the poll and the switch) goes back to step 3 within the
     bound, any other refusal is a 409 at once;
  5. update the topology and routing (followers get nothing), resume dispatch.

A member that fails after commit answers ``fatal``: the host is taken out of service
(``on_fatal``), the group's ranks stay paused, and the job ends with a 500 naming the
rank and the cause. A pooled group whose collective failed before commit is ``broken``:
nothing was lost and its TP1 replicas keep serving, but it is never merged again.
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
PRECOPY_TIMEOUT_S = 120.0


class Routing(Protocol):
    """The DP controller's dispatch, as the transformer drives it."""

    unsupported: str | None

    def pause(self, ranks: tuple[int, ...]) -> None: ...
    def resume(self, ranks: tuple[int, ...]) -> int: ...
    def set_instance(self, ranks: tuple[int, ...]) -> None: ...


class Bus(Protocol):
    def run(self, ranks: Any, msg: Message, timeout_s: float,
            stop: Callable[[], str | None] | None = None) -> dict[int, Message]: ...


@dataclass
class Job:
    id: int
    kind: str
    ranks: tuple[int, ...]
    precopy: bool = True  # pre-copy the KV while the group serves, then a short cutover
    done: threading.Event = field(default_factory=threading.Event)
    result: Message | None = None
    error: ControlError | None = None


class Transformer:
    def __init__(self, *, num_ranks: int, max_tp: int, bus: Bus, bus_lock: threading.Lock,
                 routing: Routing, get_topology: Callable[[], Topology],
                 set_topology: Callable[[Topology], None],
                 describe: Callable[[Instance], Message],
                 idle_timeout_s: float = 60.0,
                 observe: Callable[[str, int, float, Message | None], None] | None = None,
                 on_fatal: Callable[[str], None] | None = None,
                 stop: Callable[[], str | None] | None = None) -> None:
        self.num_ranks, self.max_tp = num_ranks, max_tp
        self.bus, self.bus_lock, self.routing = bus, bus_lock, routing
        self.get_topology, self.set_topology, self.describe = (get_topology, set_topology,
                                                               describe)
        self.idle_timeout_s = idle_timeout_s
        self.held_by: dict[int, str] = {}  # rank -> why it is not ready, while waiting
        self.observe = observe  # (op, HTTP status, seconds, result or None) per finished job
        self.on_fatal = on_fatal  # takes the host out of service
        self.stop = stop  # why to stop waiting for members (the host is failing), or None
        self.broken: dict[tuple[int, ...], str] = {}  # groups a failed collective broke
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._jobs: dict[int, Job] = {}
        self.running: Job | None = None
        self.last: Message | None = None  # the last finished job, for /gyges/status

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
        broken = [f"{list(g)}: {why}" for g, why in self.broken.items()
                  if set(g) & set(ranks)]
        if broken:
            raise ControlError(f"the pooled group is broken by an earlier failed collective "
                               f"({'; '.join(broken)}); its replicas keep serving, restart "
                               "the server to transform them again", 422)
        if self.stop is not None and (why := self.stop()):
            raise ControlError(f"this host is out of service: {why}", 503)
        with self._lock:
            if self.running is not None:
                r = self.running
                raise ControlError(f"a transformation is already running ({r.kind} "
                                   f"{list(r.ranks)})", 409)
            job = Job(next(self._ids), kind, ranks, msg.get("precopy", True) is not False)
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
            self.last = _summary(job)
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
        skipped: list[str] = []
        staged = self._precopy(job, skipped) if job.precopy else None
        if staged is not None:
            phases["precopy_ms"] = _ms(t0)
        t_pause = time.perf_counter()
        self.routing.pause(ranks)
        switched = failed_host = False
        try:
            polls = 0
            while True:
                polls += self._wait_ready(ranks, t0)
                phases["wait_ready_ms"] = _ms(t0)
                t1 = time.perf_counter()
                seed = random.randrange(1 << 31)
                replies = self._run_bus(ranks, {"op": job.kind, "ranks": list(ranks),
                                                "seed": seed, "precopy": staged is not None},
                                        SWITCH_TIMEOUT_S, self.stop)
                failed = {r: str(x.get("error")) for r, x in replies.items() if not x.get("ok")}
                if not failed:
                    break
                fatal = {r: e for r, e in failed.items() if replies[r].get("fatal")}
                if fatal or len(failed) < len(ranks):
                    failed_host = True
                    reason = "; ".join(dict.fromkeys((fatal or failed).values()))
                    if self.on_fatal is not None:
                        self.on_fatal(reason)
                    raise ControlError(f"{job.kind} of {list(ranks)} failed: {reason}; the "
                                       "group's requests were aborted and this host is "
                                       "going out of service", 500)
                broken = {r: e for r, e in failed.items() if replies[r].get("broken")}
                if broken:
                    self.broken[ranks] = next(iter(broken.values()))
                    raise ControlError(f"{job.kind} of {list(ranks)} refused, nothing "
                                       f"changed: {self.broken[ranks]}; this group will not "
                                       "be transformed again", 422)
                why = next(iter(failed.values()))
                busy = all("group busy" in e for e in failed.values())
                if not busy or time.monotonic() - t0 > self.idle_timeout_s:
                    raise ControlError(why if "group busy" in why or "refused" in why
                                       else f"refused: {why}", 409)
            switched = True
            phases[f"{job.kind}_ms"] = _ms(t1)
            self.set_topology(target)
            t2 = time.perf_counter()
            for inst in target.instances:
                if set(inst.ranks) <= set(ranks):
                    self.routing.set_instance(inst.ranks)
        finally:
            # a failed host keeps the group paused: its ranks' state is gone
            held = 0 if failed_host else self.routing.resume(ranks)
            if staged is not None and not switched and not failed_host:
                self._drop_precopy(ranks, None)
        phases["routing_ms"] = _ms(t2) if switched else 0.0
        phases["cutover_ms"] = _ms(t_pause)
        phases["total_ms"] = _ms(t0)
        instances = [self.describe(i) for i in target.instances if i.ranks[0] in ranks]
        members = [replies[r] for r in ranks]
        # each new instance's leader reports that instance's requests (a merge has one)
        leaders = [replies[i.ranks[0]] for i in target.instances if i.ranks[0] in ranks]
        cutover = sum(int(m.get("kv_bytes_moved", 0)) for m in members)
        return {"op": job.kind, "ranks": list(ranks), "instances": instances,
                # all the KV this transformation sent between ranks (pre-copy included)
                "kv_bytes_moved": cutover + sum(int(m.get("precopy_bytes", 0))
                                                for m in members),
                "cutover_kv_bytes": cutover,
                **{key: sum(int(m.get(key, 0)) for m in members)
                   for key in ("weight_bytes_released", "weight_bytes_restored")
                   if any(key in m for m in members)},
                "requests_moved": {**{key: sum(int(m.get(key, 0)) for m in leaders)
                                      for key in ("running", "waiting")},
                                   # counted in "waiting" too (a parked prefill waits)
                                   "chunked_prefills": _parked(job.kind, ranks, members)},
                # running requests the old instances retracted for long ones since their
                # last transformation (gyges.switch.admission)
                "retracted_for_long": _per_old_instance("retracted_for_long", job.kind,
                                                        ranks, members),
                **({"precopy": _precopy_totals(members)} if staged is not None else
                   {"precopy": {"skipped": skipped[0]}} if skipped else {}),
                "elapsed_ms": phases, "held_requests_sent": held, "ready_polls": polls,
                "members": {str(r): {k: v for k, v in replies[r].items()
                                     if k not in ("id", "rank", "ok")} for r in ranks}}

    def _precopy(self, job: Job, skipped: list[str]) -> dict[int, Message] | None:
        """Pre-copy the group's KV while it serves (:mod:`gyges.switch.precopy`). Returns
        the members' statuses, or None when a member could not start one (the
        transformation then runs stop-the-world). A pre-copy that fails is a 409: nothing
        changed, the group serves on, its later transformations run stop-the-world."""
        ranks = job.ranks
        replies = self._run_bus(ranks, {"op": "precopy", "kind": job.kind,
                                        "ranks": list(ranks)}, SWITCH_TIMEOUT_S, self.stop)
        failed = {r: x for r, x in replies.items() if not x.get("ok")}
        fatal = [str(x.get("error")) for x in failed.values() if x.get("fatal")]
        if fatal:
            if self.on_fatal is not None:
                self.on_fatal(fatal[0])
            raise ControlError(f"{job.kind} of {list(ranks)} failed: {fatal[0]}", 500)
        if any(x.get("broken") for x in failed.values()):
            why = next(str(x.get("error")) for x in failed.values() if x.get("broken"))
            self.broken[ranks] = why
            raise ControlError(f"{job.kind} of {list(ranks)} refused, nothing changed: "
                               f"{why}; this group will not be transformed again", 422)
        if failed:
            why = next(str(x.get("error")) for x in failed.values())
            skipped.append(why)
            # members that did start are in a side-group collective their peers never join
            self._drop_precopy(ranks, why if len(failed) < len(ranks) else None)
            return None
        deadline = time.monotonic() + PRECOPY_TIMEOUT_S
        while True:
            status = self._run_bus(ranks, {"op": "precopy_status"}, IDLE_POLL_TIMEOUT_S)
            errors = [str(x.get("error")) for x in status.values()
                      if not x.get("ok") or x.get("error")]
            if not errors and all(x.get("done") for x in status.values()):
                return status
            # e.g. no staging memory: every member falls back alike, but not at once
            fallback = bool(errors) and all(x.get("ok") and (x.get("fallback")
                                                             or not x.get("error"))
                                            for x in status.values())
            if fallback and all(x.get("done") for x in status.values()):
                skipped.append(errors[0])  # stop the world
                self._drop_precopy(ranks, None)
                return None
            if (errors and not fallback) or time.monotonic() > deadline:
                why = errors[0] if errors else \
                    f"pre-copy did not finish within {PRECOPY_TIMEOUT_S:g}s"
                self._drop_precopy(ranks, why)
                raise ControlError(f"refused: {job.kind} of {list(ranks)}: {why}; nothing "
                                   "changed, the group serves on", 409)
            time.sleep(0.02)

    def _drop_precopy(self, ranks: tuple[int, ...], broken: str | None) -> None:
        try:
            self._run_bus(ranks, {"op": "precopy_drop", "broken": broken}, IDLE_POLL_TIMEOUT_S)
        except Exception:  # best effort: a member that cannot answer is handled elsewhere
            pass

    def _wait_ready(self, ranks: tuple[int, ...], t0: float) -> int:
        """Poll ``idle`` until every member reports ready; returns the number of polls."""
        polls, self.held_by = 0, {}
        while True:
            polls += 1
            replies = self._run_bus(ranks, {"op": "idle"}, IDLE_POLL_TIMEOUT_S)
            busy = {r: x for r, x in replies.items() if not (x.get("ok") and x.get("ready"))}
            # what holds the transformation, for /gyges/status ("request <rid>: <why>")
            self.held_by = {r: str(x.get("why") or x.get("error")) for r, x in busy.items()}
            if not busy:
                return polls
            if time.monotonic() - t0 > self.idle_timeout_s:
                detail = {r: x.get("why") or x.get("error") for r, x in busy.items()}
                raise ControlError(f"group busy: ranks {sorted(busy)} were not ready "
                                   f"within {self.idle_timeout_s:g}s: {detail}", 409)
            time.sleep(0.02)

    def _run_bus(self, ranks: tuple[int, ...], msg: Message, timeout_s: float,
                 stop: Callable[[], str | None] | None = None) -> dict[int, Message]:
        with self.bus_lock:
            if stop is None:
                return self.bus.run(ranks, msg, timeout_s)
            return self.bus.run(ranks, msg, timeout_s, stop)


def _summary(job: Job) -> Message:
    """What ``/gyges/status`` shows of a finished job."""
    out: Message = {"op": job.kind, "ranks": list(job.ranks),
                    "status": 200 if job.error is None else job.error.status}
    if job.error is not None:
        out["error"] = str(job.error)
    res = job.result or {}
    if res:
        out.update({"cutover_ms": res["elapsed_ms"].get("cutover_ms"),
                    "total_ms": res["elapsed_ms"].get("total_ms"),
                    "cutover_kv_bytes": res.get("cutover_kv_bytes", 0),
                    "precopy": res.get("precopy"), "requests_moved": res["requests_moved"],
                    "retracted_for_long": res.get("retracted_for_long", 0)})
    return out


def _parked(kind: str, ranks: tuple[int, ...], members: list[Message]) -> int:
    """Chunked prefills in flight that the transformation parked and moved."""
    return _per_old_instance("chunked_prefills_parked", kind, ranks, members)


def _per_old_instance(key: str, kind: str, ranks: tuple[int, ...],
                      members: list[Message]) -> int:
    """The sum over the old instances of a count every rank of an instance reports alike."""
    per_instance = len(ranks) // 2 if kind == "merge" else len(ranks)
    return sum(int(m.get(key, 0)) for m in members) // per_instance


def _precopy_totals(members: list[Message]) -> Message:
    """The members' pre-copy figures: bytes summed, rounds and ms of the slowest."""
    return {"bytes": sum(int(m.get("precopy_bytes", 0)) for m in members),
            "weight_bytes": sum(int(m.get("precopy_weight_bytes", 0)) for m in members),
            "staged_bytes_applied": sum(int(m.get("kv_bytes_staged_applied", 0))
                                        for m in members),
            "rounds": max((int(m.get("precopy_rounds", 0)) for m in members), default=0),
            "ms": max((float(m.get("precopy_ms", 0.0)) for m in members), default=0.0)}


def _ms(t0: float) -> float:
    return round((time.perf_counter() - t0) * 1000, 3)
