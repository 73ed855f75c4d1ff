"""The router's own Prometheus metrics (``GET /metrics``), one registry per router app.

Counters are labelled by worker URL; placement reasons drop their numbers (``merge-tp2-cost40``
counts as ``merge``) so that label values stay few.
"""
from __future__ import annotations

import re

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

CONTENT_TYPE = CONTENT_TYPE_LATEST
FAILURE_KINDS = ("request", "mid_stream", "health")


def reason_label(reason: str) -> str:
    return re.sub(r"-(tp|cost)\d+", "", reason)


class RouterMetrics:
    """Requests, retries and failures by worker, placements by reason, long requests."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("gyges_router_requests", "requests sent to a worker (each try)",
                                ["worker"], registry=r)
        self.retries = Counter("gyges_router_retries", "requests retried elsewhere after this "
                               "worker failed them before the first byte", ["worker"],
                               registry=r)
        self.failures = Counter("gyges_router_worker_failures", "failures of a worker: a "
                                "request that could not reach it (request), a stream it broke "
                                "(mid_stream), a failed health check (health)",
                                ["worker", "kind"], registry=r)
        self.placements = Counter("gyges_router_placements", "placements by the policy's reason",
                                  ["reason"], registry=r)
        self.long_requests = Counter("gyges_router_long_requests", "requests placed as long "
                                     "(need > one TP1 replica of the host)", ["worker"],
                                     registry=r)
        self.healthy = Gauge("gyges_router_worker_healthy", "1 while the worker is healthy",
                             ["worker"], registry=r)

    def placed(self, reason: str, worker: str, long: bool) -> None:
        self.placements.labels(reason_label(reason)).inc()
        if long:
            self.long_requests.labels(worker).inc()

    def failed(self, worker: str, kind: str) -> None:
        assert kind in FAILURE_KINDS, kind
        self.failures.labels(worker, kind).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
