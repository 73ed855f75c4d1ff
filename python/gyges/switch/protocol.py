"""Prepare, vote, commit: how the members of a transformation agree before anything moves,
and what a member does when it fails after that.

A transformation runs collectively on every member (:mod:`gyges.switch.member`):

1. **prepare** (local, nothing changes): every check that can refuse runs on every member
   and any exception becomes a refusal. Each member then casts a ballot in one fixed-order
   all-gather (:func:`vote`): ok, or the reason it refuses and whether waiting could help.
   Ballots carry the member's exported work, so the exchange is part of the vote.
2. **commit vote**: each member plans from the same inputs and votes again with the plan's
   digest; any refusal or digest mismatch refuses the group (:class:`Refused`), nothing
   changed, serving goes on.
3. **commit**: KV, weights, parallel state, scheduler state change. A failure here is
   :class:`TransformationFailed` (fatal): the member aborts the requests it holds with
   ``"transformation failed on rank r: ..."`` (:func:`abort_requests`) and refuses every
   later command; the host controller takes the host out of service.

Every collective has a bound (``GYGES_VOTE_TIMEOUT_S``, default 30 s, for the votes; the
KV executor scales its own to the bytes). Members reach a vote only between scheduler
steps, so the bound covers one step of each member.

Fault injection for tests: ``GYGES_FAULT_INJECT="op:phase:rank[:kill]"`` (e.g.
``merge:kv_move:1``; several separated by commas) raises once at that phase on that
host rank, or SIGKILLs the process with ``:kill``. Phases: precopy (in the pre-copy thread,
before commit), prepare, exchange, kv_move, weight_release, install (merge); precopy,
prepare, exchange, kv_move, weight_restore, install (split). Read only when set; ``@PATH``
reads the specs from that file at every phase (a missing file names none), so a test can
arm a fault in a running server.
"""
from __future__ import annotations

import json
import logging
import os
import signal
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from gyges.comm.pool import PoolGroup
from gyges.switch.group import all_gather_bytes

logger = logging.getLogger(__name__)
FAULT_ENV = "GYGES_FAULT_INJECT"
PHASES = ("precopy", "prepare", "exchange", "kv_move", "weight_release", "weight_restore",
          "install")
_fired: set[str] = set()


def knob(name: str) -> str:
    """An environment setting; ``@PATH`` reads it from that file at each use (a test or
    benchmark changes it in a running server; a missing or empty file means unset)."""
    value = os.environ.get(name, "")
    if value.startswith("@"):
        try:
            with open(value[1:]) as f:
                return f.read().strip()
        except OSError:
            return ""
    return value


def vote_timeout_s() -> float:
    return float(os.environ.get("GYGES_VOTE_TIMEOUT_S", "30"))


class Refused(RuntimeError):
    """The group refused before anything changed. ``retry``: every refusing member said
    waiting could help (the message then starts with "group busy", which the controller
    retries until its bound)."""

    def __init__(self, why: str, retry: bool) -> None:
        super().__init__(("group busy: " if retry else "refused: ") + why)
        self.retry = retry


class TransformationFailed(RuntimeError):
    """A failure after commit: the instance's state is lost. Carries ``fatal`` so the
    command channel reports it and the controller takes the host out of service."""

    fatal = True


class GroupBroken(RuntimeError):
    """A vote's collective itself failed before commit (a peer died or hung): nothing
    changed, but the pooled group can no longer be trusted, so it is never used again."""

    broken = True


@dataclass(frozen=True)
class Ballot:
    ok: bool
    why: str = ""
    retry: bool = False
    payload: bytes = b""


COMMIT_TIMEOUT_S = 10.0  # collectives between lockstepped members after commit


def vote(group: PoolGroup, mine: Ballot, timeout_s: float | None = None) -> list[Ballot]:
    """Every member's ballot, in group order (one all-gather of fixed-order records)."""
    head = json.dumps({"ok": mine.ok, "why": mine.why, "retry": mine.retry}).encode()
    blob = len(head).to_bytes(4, "little") + head + mine.payload
    out = []
    for data in all_gather_bytes(group, blob, timeout_s=timeout_s or vote_timeout_s()):
        n = int.from_bytes(data[:4], "little")
        h = json.loads(data[4:4 + n])
        out.append(Ballot(bool(h["ok"]), str(h["why"]), bool(h["retry"]), data[4 + n:]))
    return out


def decide(ballots: list[Ballot]) -> None:
    """Raise :class:`Refused` (on every member alike) unless every ballot is ok."""
    refusals = [b for b in ballots if not b.ok]
    if refusals:
        why = "; ".join(dict.fromkeys(b.why for b in refusals))
        raise Refused(why, retry=all(b.retry for b in refusals))


def inject(op: str, phase: str, rank: int) -> None:
    """Raise (or die) here if ``GYGES_FAULT_INJECT`` names this op, phase and rank; once."""
    specs = os.environ.get(FAULT_ENV)
    if not specs:
        return
    if specs.startswith("@"):
        try:
            with open(specs[1:]) as f:
                specs = f.read().strip()
        except OSError:
            return
    spec = next((x for x in specs.split(",") if x.split(":")[:3] == [op, phase, str(rank)]
                 and x not in _fired), None)
    if spec is None:
        return
    parts = spec.split(":")
    _fired.add(spec)
    logger.error("gyges: injected fault %s on rank %d", spec, rank)
    if parts[3:4] == ["kill"]:
        os.kill(os.getpid(), signal.SIGKILL)
    raise RuntimeError(f"injected fault at {op} {phase}")


def abort_requests(scheduler: Any, reqs: Iterable[Any], reason: str, socket: Any) -> int:
    """Finish ``reqs`` for their clients with ``finish_reason`` abort and ``reason``
    (SGLang's own abort message to the tokenizer). Returns how many were sent."""
    from sglang.srt.managers.io_struct import AbortReq, sock_send

    if socket is None:
        return 0
    sent, seen = 0, set()
    for req in reqs:
        if req.rid in seen:
            continue
        seen.add(req.rid)
        try:
            sock_send(socket, AbortReq(rid=req.rid, abort_message=reason,
                                       finished_reason={"type": "abort", "message": reason}))
            sent += 1
        except Exception:  # the tokenizer may be gone already; keep aborting the rest
            logger.exception("gyges: could not abort request %s", req.rid)
    return sent


def clear_scheduler(scheduler: Any) -> None:
    """Leave a failed member's scheduler with no work, so it idles until the host exits
    (its pool is in a partial state; stepping it would corrupt outputs or trip SGLang's
    leak checker)."""
    from sglang.srt.managers.schedule_batch import ScheduleBatch

    s = scheduler
    s.running_batch = ScheduleBatch(reqs=[], batch_is_full=False)
    s.waiting_queue = []
    s.last_batch = None
    queue = getattr(s, "result_queue", None)
    if queue:
        queue.clear()
    s.chunked_req = None
    gm = getattr(s, "grammar_manager", None)
    if gm is not None and hasattr(gm, "grammar_queue"):
        gm.grammar_queue = []
