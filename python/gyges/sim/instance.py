"""One serving instance (a TP group, or an SP/shift group) under continuous batching.

SGLang's default loop, coarsened to events: waiting requests are admitted FIFO when their
whole need (prompt + output) fits the free KV, admitted prompts are prefilled in chunks
while decode waits, then the running batch decodes one token per request per step. A merged
instance (``long_above`` set) admits as the live one does (:mod:`gyges.switch.admission`):
requests one replica cannot hold first, retracting short running ones until the first fits
(:func:`gyges.core.preemption.plan_retraction`); a retracted request is recomputed from its
prompt and the tokens it had, which it keeps. A decode
segment runs until the next request finishes; an arrival that fits (or a pause) cuts it at
the next step boundary, so every state change happens on a real step boundary.

Bookkeeping is O(log n) per event: ``steps`` counts this instance's decode steps and each
running request finishes at a known step (a heap), so the KV in use is an aggregate.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from collections.abc import Callable
from typing import Protocol

from gyges.core.preemption import Running, plan_retraction
from gyges.sim.cpu import HostCpu
from gyges.sim.engine import EventLoop, Handle


class StepModel(Protocol):
    """Step times of one instance; a model built on a ``StepCost`` exposes it as ``cost``
    (its params' ``first_token_lag_steps`` then applies)."""

    def decode(self, batch: int, ctx_tokens: int) -> float: ...
    def prefill(self, tokens: int, pairs: float, seqs: int) -> float: ...


class SimRequest:
    __slots__ = ("arrival", "c0", "carried", "done_step", "failed", "finish", "first_token",
                 "need", "output", "prompt", "retracted", "rid", "start_step")

    def __init__(self, rid: int, arrival: float, prompt: int, output: int) -> None:
        self.rid, self.arrival, self.prompt, self.output = rid, arrival, prompt, output
        self.need = prompt + output
        self.first_token: float | None = None
        self.finish: float | None = None
        self.failed = False
        self.start_step = 0
        self.done_step = 0
        self.c0 = 0  # KV tokens it holds = c0 + the instance's decode step counter
        self.carried = 0  # output tokens it had when it was last retracted (recomputed)
        self.retracted = 0  # times retracted for long requests


Finished = Callable[["SimRequest"], None]


class Instance:
    """``ranks``: the scheduler ranks it spans; ``capacity``: KV tokens it holds; ``cpu``:
    the cores its host shares among busy instances (CPU calibrations only); ``long_above``:
    on a merged Gyges instance, the need above which one replica cannot hold a request."""

    def __init__(self, loop: EventLoop, ranks: tuple[int, ...], capacity: int,
                 step: StepModel, on_finish: Finished, max_running: int = 1024,
                 cpu: HostCpu | None = None, long_above: int | None = None) -> None:
        self.loop, self.ranks, self.capacity, self.step = loop, ranks, capacity, step
        self.on_finish, self.max_running, self.cpu = on_finish, max_running, cpu
        self.long_above = long_above
        self.retracted = 0  # running requests retracted for long ones
        self._busy = False  # counted in cpu.busy
        if cpu is not None:
            cpu.add(self)
        cost = getattr(step, "cost", None)
        self.lag_steps = float(cost.p.first_token_lag_steps) if cost is not None else 0.0
        self.waiting: deque[SimRequest] = deque()
        self.running: list[tuple[int, int, SimRequest]] = []  # (done_step, rid, req)
        self.steps = 0
        self.used = 0  # KV reserved by running requests (their full need)
        self.waiting_need = 0
        self._ctx0 = 0  # sum over running of prompt + 1 - start_step
        self._handle: Handle | None = None
        self._seg: tuple[float, float, int] | None = None  # decode: start, step_s, steps
        self.prefilling = 0  # requests in the prefill in flight (0: none in flight)
        self._prefill_dt: float | None = None
        self._pause_cb: Callable[[], None] | None = None
        self.paused = False
        self.busy_s = 0.0
        self.tokens_out = 0

    @property
    def leader(self) -> int:
        return self.ranks[0]

    @property
    def ctx_tokens(self) -> int:
        return self._ctx0 + len(self.running) * self.steps

    def __len__(self) -> int:
        return len(self.running) + len(self.waiting)

    # -- requests ---------------------------------------------------------------------

    def enqueue(self, req: SimRequest) -> None:
        if req.need > self.capacity:
            self._fail(req)
            return
        self.waiting.append(req)
        self.waiting_need += req.need
        if self.paused or self.prefilling:
            return
        if self._seg is None:
            self._next()
        elif self._fits_head() or (self.long_above is not None and req.need > self.long_above):
            self._cut()  # a long request may retract at the next step (_long_first)

    def adopt(self, running: list[SimRequest], waiting: list[SimRequest]) -> None:
        """Take over requests from instances that transformed into this one (their
        generated tokens carry over: no recomputation)."""
        for r in running:
            left = r.done_step - r.start_step  # decode steps it still needs
            r.start_step, r.done_step = self.steps, self.steps + left
            self.used += r.need
            self._add_running(r, r.prompt + 1 + (r.output - 1 - left))
        for r in sorted(waiting, key=lambda x: (x.arrival, x.rid)):
            self.waiting.append(r)
            self.waiting_need += r.need

    def take_all(self) -> tuple[list[SimRequest], list[SimRequest]]:
        """Hand every request over (paused instances only); ``done_step - start_step`` of a
        running one becomes the decode steps it still needs."""
        running = []
        for done, _, r in self.running:
            r.done_step, r.start_step = done - self.steps, 0
            running.append(r)
        waiting = list(self.waiting)
        self.running, self.waiting = [], deque()
        self.used = self.waiting_need = self._ctx0 = 0
        return running, waiting

    # -- pause / resume (transformations) ---------------------------------------------

    def pause(self, cb: Callable[[], None]) -> None:
        """Stop at the next step boundary, then call ``cb``."""
        self._pause_cb = cb
        if self._seg is None and not self.prefilling:
            self._paused_now()
        elif self._seg is not None:
            self._cut()

    def resume(self) -> None:
        self.paused = False
        self._next()

    def _paused_now(self) -> None:
        self.paused = True
        cb, self._pause_cb = self._pause_cb, None
        if cb is not None:
            cb()

    # -- the loop ---------------------------------------------------------------------

    def _fits_head(self) -> bool:
        return (bool(self.waiting) and len(self.running) < self.max_running
                and self.waiting[0].need <= self.capacity - self.used)

    def _next(self) -> None:
        if self._pause_cb is not None:
            self._paused_now()
            return
        if self.paused:
            return
        if self.long_above is not None:
            self._long_first(self.long_above)
        admitted = []
        while self._fits_head():
            r = self.waiting.popleft()
            self.waiting_need -= r.need
            self.used += r.need
            admitted.append(r)
        self._set_busy(bool(admitted or self.running))
        if admitted:
            tokens = sum(r.prompt + r.carried for r in admitted)
            pairs = sum((r.prompt + r.carried) ** 2 / 2 for r in admitted)
            dt = self.step.prefill(tokens, pairs, len(admitted)) * self._scale()
            self.prefilling, self._prefill_dt = len(admitted), dt
            self.busy_s += dt
            self._handle = self.loop.after(dt, lambda: self._prefilled(admitted))
            return
        if not self.running:
            self._seg = None
            return
        n = self.running[0][0] - self.steps
        b = len(self.running)
        dt = self.step.decode(b, self.ctx_tokens + b * n // 2) * self._scale()
        self._seg = (self.loop.now, dt, n)
        self._handle = self.loop.after(n * dt, lambda: self._decoded(n))

    def _cut(self) -> None:
        """End the decode segment at the next step boundary."""
        assert self._seg is not None
        start, dt, n = self._seg
        done = min(n, max(1, math.ceil((self.loop.now - start) / dt - 1e-9)))
        if done >= n:
            return
        self.loop.cancel(self._handle)
        self._handle = self.loop.at(start + done * dt, lambda: self._decoded(done))

    def _prefilled(self, admitted: list[SimRequest]) -> None:
        self.prefilling = 0
        now = self.loop.now
        first = [r for r in admitted if r.first_token is None]  # not recomputed ones
        for r in admitted:
            if r.first_token is None:
                r.first_token = now
            self.tokens_out += 1
            made = r.carried + 1
            if r.output <= made:
                self.used -= r.need
                r.finish = now
                self.on_finish(r)
            else:
                r.start_step, r.done_step = self.steps, self.steps + r.output - made
                self._add_running(r, r.prompt + made)
        self._next()
        if self.lag_steps:  # the first token leaves after the step launched meanwhile
            lag = self.lag_steps * self._started_step_s(now, admitted)
            for r in first:
                r.first_token = now + lag
                if r.output <= 1:
                    r.finish = r.first_token

    def _long_first(self, above: int) -> None:
        """Requests one replica cannot hold first; if the first does not fit, retract short
        running requests (the live merged instance's rule, on the full needs this model
        reserves). Retracted requests wait at the end of the queue."""
        if not any(r.need > above for r in self.waiting):
            return
        self.waiting = deque([r for r in self.waiting if r.need > above]
                             + [r for r in self.waiting if r.need <= above])
        shortfall = self.waiting[0].need - (self.capacity - self.used)
        rows = sorted(self.running)
        plan = plan_retraction(shortfall, [
            Running(i, r.need, 0, r.output - (done - self.steps), keep=r.need > above,
                    retracted=r.retracted)
            for i, (done, _, r) in enumerate(rows)])
        if not plan:
            return
        chosen = set(plan)
        self.running = [row for i, row in enumerate(rows) if i not in chosen]
        heapq.heapify(self.running)
        for i in plan:
            done, _, r = rows[i]
            self._ctx0 -= r.c0
            self.used -= r.need
            r.carried = r.output - (done - self.steps)
            r.retracted += 1
            self.waiting.append(r)
            self.waiting_need += r.need
            self.retracted += 1

    def _started_step_s(self, now: float, admitted: list[SimRequest]) -> float:
        """Duration of the step launched at ``now``; when none is left to run, the decode
        step SGLang still launches for the requests it has not yet seen finish."""
        if self._seg is not None and self._seg[0] == now:
            return self._seg[1]
        if self.prefilling and self._prefill_dt is not None:
            return self._prefill_dt
        return self.step.decode(len(admitted), sum(r.prompt + 1 for r in admitted)) * \
            self._scale()

    # -- the host's cores (CPU calibrations) -------------------------------------------

    def _scale(self) -> float:
        return 1.0 if self.cpu is None else self.cpu.scale(len(self.ranks))

    def _set_busy(self, busy: bool) -> None:
        if self.cpu is not None and busy != self._busy:
            self._busy = busy
            self.cpu.changed(len(self.ranks) if busy else -len(self.ranks))

    def retime(self) -> None:
        """The host's busy count changed: a decode segment in flight ends at its next step
        boundary and the next one takes the new step time."""
        if self._seg is not None and self._pause_cb is None:
            self._cut()

    def detach(self) -> None:
        """Leave the host's cores (a transformation replaced this instance)."""
        if self.cpu is not None:
            self._set_busy(False)
            self.cpu.remove(self)

    def _add_running(self, r: SimRequest, ctx_now: int) -> None:
        r.c0 = ctx_now - self.steps
        self._ctx0 += r.c0
        heapq.heappush(self.running, (r.done_step, r.rid, r))

    def _decoded(self, n: int) -> None:
        assert self._seg is not None
        dt = self._seg[1]
        self._seg = None
        self.busy_s += n * dt
        self.tokens_out += n * len(self.running)
        self.steps += n
        now = self.loop.now
        while self.running and self.running[0][0] <= self.steps:
            _, _, r = heapq.heappop(self.running)
            self._ctx0 -= r.c0
            self.used -= r.need
            r.finish = now + self.lag_steps * dt  # every token lags as the first one does
            self.on_finish(r)
        self._next()

    def _fail(self, req: SimRequest) -> None:
        req.failed = True
        req.finish = self.loop.now
        self.on_finish(req)
