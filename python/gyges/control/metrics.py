"""Prometheus metrics of the Gyges scheduler (``--enable-metrics``).

SGLang runs prometheus_client in multiprocess mode: the launcher sets
``PROMETHEUS_MULTIPROC_DIR`` before it starts its children, every process writes its
samples there, and the HTTP server's ``/metrics`` collects them all. The DP controller
and the tokenizer are such children, so counters created here appear on ``/metrics``
with no extra plumbing. prometheus_client is imported lazily (after the variable is set).
"""
from __future__ import annotations

from typing import Any


class PrometheusMetrics:
    """Counters of decisions and automatic transformations; gauges of held requests."""

    def __init__(self) -> None:
        from prometheus_client import Counter, Gauge

        self._decisions = Counter("gyges:decisions", "Placement decisions of the Gyges "
                                  "policy by kind (dispatch, merge, wait, reject, fallback).",
                                  ["kind"])
        self._transformations = Counter("gyges:auto_transformations", "Merges and splits "
                                        "started by the Gyges scheduler, by outcome.",
                                        ["op", "outcome"])
        self._pending = Gauge("gyges:pending_requests", "Requests held by the Gyges "
                              "scheduler (waiting or merging).", multiprocess_mode="mostrecent")
        self._reserved = Gauge("gyges:reserved_ranks", "Ranks reserved for pending merges.",
                               multiprocess_mode="mostrecent")

    def decision(self, kind: str) -> None:
        self._decisions.labels(kind=kind).inc()

    def transformation(self, op: str, outcome: str) -> None:
        self._transformations.labels(op=op, outcome=outcome).inc()

    def gauges(self, pending: int, reserved_ranks: int) -> None:
        self._pending.set(pending)
        self._reserved.set(reserved_ranks)


_rejections: Any = None


def count_rejection() -> None:
    """One over-capacity request refused by the tokenizer (HTTP server process)."""
    global _rejections
    if _rejections is None:
        from prometheus_client import Counter

        _rejections = Counter("gyges:rejected_requests", "Requests refused at once because "
                              "they exceed the largest instance this server can form.")
    _rejections.inc()
