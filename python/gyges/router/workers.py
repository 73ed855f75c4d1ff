"""Worker registry (sglang-router compatible ids and listing) and periodic health checks."""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from gyges.router.metrics import RouterMetrics
from gyges.router.policy import HostStatus, HostView
from gyges.router.status import refresh_status

logger = logging.getLogger("gyges.router")


# A host that took a long request this recently is preferred for the next one on equal merge
# cost: it is merged, merging, or just split back (the snapshot may not show which yet).
RECENT_LONG_S = 30.0


@dataclass(frozen=True)
class Ticket:
    """One request in flight on a worker, as the router placed it."""

    need: int
    long: bool
    sent_at: float


@dataclass
class Worker:
    """Runtime state of one registered worker (mutated only on the router's event loop)."""

    url: str
    id: str = field(default_factory=lambda: str(uuid.uuid4()))
    healthy: bool = False
    consecutive_failures: int = 0
    last_error: str | None = None
    status: HostStatus | None = None
    status_raw: Any = None
    status_taken_at: float | None = None  # monotonic time the snapshot was requested
    status_error: str | None = None
    is_gyges: bool | None = None  # None until /gyges/status answered once
    routed_short: int = 0
    routed_long: int = 0
    last_long_at: float | None = None  # monotonic time the last long request was sent
    failures: int = 0
    inflight: dict[int, Ticket] = field(default_factory=dict)
    released: list[Ticket] = field(default_factory=list)  # finished since the snapshot

    def set_status(self, status: HostStatus | None, raw: Any, taken_at: float) -> None:
        self.status, self.status_raw, self.status_taken_at = status, raw, taken_at
        self.is_gyges = status is not None
        self.status_error = None
        self.released = []

    def finish(self, ticket: int) -> None:
        """A request ended; if the snapshot still counts it, remember it as released."""
        done = self.inflight.pop(ticket, None)
        taken = self.status_taken_at
        if done is not None and taken is not None and done.sent_at < taken:
            self.released.append(done)

    def view(self) -> HostView:
        """The policy's view: snapshot plus this router's requests not yet in the snapshot."""
        taken = self.status_taken_at if self.status is not None else None
        pending = [t for t in self.inflight.values() if taken is None or t.sent_at >= taken]
        return HostView(
            worker_id=self.id,
            status=self.status,
            outstanding_requests=len(self.inflight),
            outstanding_tokens=sum(t.need for t in self.inflight.values()),
            pending_short_tokens=sum(t.need for t in pending if not t.long),
            pending_long_tokens=sum(t.need for t in pending if t.long),
            outstanding_long_tokens=sum(t.need for t in self.inflight.values() if t.long),
            released_short_tokens=sum(t.need for t in self.released if not t.long),
            released_long_tokens=sum(t.need for t in self.released if t.long),
            recent_long=self.last_long_at is not None
            and time.monotonic() - self.last_long_at < RECENT_LONG_S,
        )

    def describe(self, now: float) -> dict[str, Any]:
        """JSON description for GET /workers and the router's /gyges/status."""
        age = None if self.status_taken_at is None else round(now - self.status_taken_at, 3)
        return {
            "id": self.id,
            "url": self.url,
            "worker_type": "regular",
            "connection_mode": "Http",
            "is_healthy": self.healthy,
            "load": len(self.inflight),
            "gyges": self.is_gyges,
            "status": self.status_raw,
            "status_age_s": age,
            "status_error": self.status_error,
            "outstanding_requests": len(self.inflight),
            "outstanding_tokens": sum(t.need for t in self.inflight.values()),
            "routed_short": self.routed_short,
            "routed_long": self.routed_long,
            "failures": self.failures,
            "last_error": self.last_error,
        }


class WorkerRegistry:
    """The set of workers, in registration order, with request book-keeping."""

    def __init__(self, metrics: RouterMetrics | None = None) -> None:
        self._workers: dict[str, Worker] = {}
        self._tickets = itertools.count()
        self.metrics = metrics or RouterMetrics()

    def add(self, url: str) -> Worker:
        """Register `url` (normalised, no trailing slash); ValueError if already registered."""
        url = url.rstrip("/")
        if self.find(url) is not None:
            raise ValueError(f"worker {url} is already registered")
        worker = Worker(url=url)
        self._workers[worker.id] = worker
        return worker

    def find(self, key: str) -> Worker | None:
        """A worker by id or by url."""
        if key in self._workers:
            return self._workers[key]
        key = key.rstrip("/")
        return next((w for w in self._workers.values() if w.url == key), None)

    def remove(self, key: str) -> Worker | None:
        worker = self.find(key)
        if worker is not None:
            del self._workers[worker.id]
        return worker

    def workers(self) -> list[Worker]:
        return list(self._workers.values())

    def candidates(self, exclude: set[str]) -> list[Worker]:
        return [w for w in self._workers.values() if w.healthy and w.id not in exclude]

    def begin(self, worker: Worker, need: int, long: bool) -> int:
        self.metrics.requests.labels(worker.url).inc()
        ticket = next(self._tickets)
        worker.inflight[ticket] = Ticket(need, long, time.monotonic())
        if long:
            worker.routed_long += 1
            worker.last_long_at = time.monotonic()
        else:
            worker.routed_short += 1
        return ticket

    @staticmethod
    def end(worker: Worker, ticket: int) -> None:
        worker.finish(ticket)

    def mark_unreachable(self, worker: Worker, error: str, kind: str = "request") -> None:
        """Take a worker out at once (a request could not reach it, or it broke a stream:
        ``kind`` ``request`` or ``mid_stream``); health checks bring it back."""
        self.metrics.failed(worker.url, kind)
        self.metrics.healthy.labels(worker.url).set(0)
        if worker.healthy:
            logger.warning("worker %s taken out: %s", worker.url, error)
        worker.healthy = False
        worker.failures += 1
        worker.last_error = error


@dataclass(frozen=True)
class HealthConfig:
    """Health-check and status-poll settings."""

    endpoint: str = "/health"
    interval_s: float = 5.0
    timeout_s: float = 20.0
    failure_threshold: int = 2
    status_interval_s: float = 0.5
    status_timeout_s: float = 5.0


class HealthMonitor:
    """Periodically probes every worker's health endpoint and polls healthy workers' status."""

    def __init__(
        self, registry: WorkerRegistry, session: aiohttp.ClientSession, config: HealthConfig,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.registry, self.session, self.config = registry, session, config
        self.headers = headers or {}  # the worker key, if any
        self._tasks: list[asyncio.Task[None]] = []

    async def probe(self, worker: Worker) -> bool:
        """One health check; updates the worker's state; refreshes its status when healthy."""
        cfg = self.config
        try:
            timeout = aiohttp.ClientTimeout(total=cfg.timeout_s)
            async with self.session.get(worker.url + cfg.endpoint, timeout=timeout,
                                        headers=self.headers) as resp:
                ok, error = resp.status == 200, f"health check answered HTTP {resp.status}"
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            ok, error = False, f"health check failed: {type(e).__name__}: {e}"
        metrics = self.registry.metrics
        if self.registry.find(worker.id) is not worker:  # removed meanwhile
            return False
        if ok:
            if not worker.healthy:
                logger.info("worker %s is healthy", worker.url)
            worker.healthy, worker.consecutive_failures = True, 0
            metrics.healthy.labels(worker.url).set(1)
            await refresh_status(self.session, worker, cfg.status_timeout_s, self.headers)
            return True
        metrics.failed(worker.url, "health")
        worker.consecutive_failures += 1
        worker.last_error = error
        if worker.healthy and worker.consecutive_failures >= cfg.failure_threshold:
            logger.warning("worker %s is unhealthy: %s", worker.url, error)
            worker.healthy = False
        metrics.healthy.labels(worker.url).set(1 if worker.healthy else 0)
        return worker.healthy

    async def probe_all(self) -> None:
        await asyncio.gather(*(self.probe(w) for w in self.registry.workers()))

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._every(self.config.interval_s, self.probe_all)),
            asyncio.create_task(self._every(self.config.status_interval_s, self._poll_status)),
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []

    async def _poll_status(self) -> None:
        healthy = [w for w in self.registry.workers() if w.healthy]
        timeout = self.config.status_timeout_s
        await asyncio.gather(*(refresh_status(self.session, w, timeout, self.headers)
                               for w in healthy))

    @staticmethod
    async def _every(interval_s: float, job: Callable[[], Awaitable[None]]) -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                await job()
            except Exception:  # a bug in one round must not stop the checks
                logger.exception("periodic worker check failed")
