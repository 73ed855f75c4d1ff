"""Prometheus metrics of merges and splits (``--enable-metrics``), on SGLang's ``/metrics``.

The DP controller process is one of SGLang's prometheus_client multiprocess children
(``PROMETHEUS_MULTIPROC_DIR`` is set by the launcher), so metrics created here are served
by the HTTP server's ``/metrics`` with the others. prometheus_client is imported lazily.
"""
from __future__ import annotations

from typing import Any

DURATION_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class TransformMetrics:
    """Counts, durations and bytes of transformations, by kind (merge/split)."""

    def __init__(self) -> None:
        from prometheus_client import Counter, Histogram

        self._count = Counter("gyges:transformations", "Merges and splits by kind and "
                              "outcome (ok, refused: 4xx, failed: 5xx).", ["op", "outcome"])
        self._duration = Histogram("gyges:transformation_duration_seconds", "Wall time of "
                                   "successful merges and splits, from the request to "
                                   "resumed dispatch.", ["op"], buckets=DURATION_BUCKETS)
        self._kv = Counter("gyges:kv_bytes_moved", "KV cache bytes sent between ranks by "
                           "transformations.", ["op"])
        self._released = Counter("gyges:weight_bytes_released", "MLP weight bytes "
                                 "released by merges.")
        self._restored = Counter("gyges:weight_bytes_restored", "MLP weight bytes "
                                 "restored by splits.")
        self._precopy = Counter("gyges:precopy_bytes", "KV bytes pre-copied while the "
                                "group served (received, summed over members).", ["op"])
        self._cutover = Histogram("gyges:cutover_seconds", "Wall time a transformation "
                                  "held its group's dispatch (pause to resume).", ["op"],
                                  buckets=DURATION_BUCKETS)

    def observe(self, op: str, status: int, seconds: float,
                result: dict[str, Any] | None) -> None:
        outcome = "ok" if status < 400 else "refused" if status < 500 else "failed"
        self._count.labels(op=op, outcome=outcome).inc()
        if result is None:
            return
        self._duration.labels(op=op).observe(seconds)
        self._kv.labels(op=op).inc(int(result.get("kv_bytes_moved", 0)))
        self._released.inc(int(result.get("weight_bytes_released", 0)))
        self._restored.inc(int(result.get("weight_bytes_restored", 0)))
        pre = result.get("precopy") or {}
        self._precopy.labels(op=op).inc(int(pre.get("bytes", 0)))
        cutover_ms = (result.get("elapsed_ms") or {}).get("cutover_ms")
        if cutover_ms is not None:
            self._cutover.labels(op=op).observe(float(cutover_ms) / 1000)
