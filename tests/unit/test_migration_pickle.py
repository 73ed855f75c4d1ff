"""Requests cross a merge as bytes: SGLang's real ``Req`` with a Prometheus-style collector
(which holds locks, as with --enable-metrics) is serialized, and the installing scheduler's
own collector is attached to it."""
from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("sglang")
from sglang.srt.managers.schedule_batch import Req  # noqa: E402
from sglang.srt.sampling.sampling_params import SamplingParams  # noqa: E402

from gyges.switch import migration  # noqa: E402


class Collector:
    def __init__(self) -> None:
        self.lock = threading.Lock()  # what makes SGLang's collectors unpicklable
        self.seen: list[tuple] = []

    def observe_per_stage_req_latency(self, *args: object) -> None:
        self.seen.append(args)


def scheduler(collector: Collector | None, enabled: bool) -> SimpleNamespace:
    return SimpleNamespace(metrics_collector=collector,
                           metrics_reporter=SimpleNamespace(enable_metrics=enabled))


def request_with_metrics() -> tuple[Req, Collector]:
    c = Collector()
    req = Req("r1", "", [1, 2, 3], SamplingParams(max_new_tokens=4), metrics_collector=c)
    assert req.time_stats.metrics_collector is c
    return req, c


def test_request_holding_a_collector_crosses_as_bytes():
    req, c = request_with_metrics()
    work = migration.from_bytes(migration.to_bytes(
        migration.Work([req], [torch.tensor([4, 5, 6])], [])))
    moved = work.running[0]
    assert moved.rid == "r1" and moved.origin_input_ids == [1, 2, 3]
    assert moved.metrics_collector is None
    assert req.metrics_collector is c  # the original is untouched
    assert work.rows[0].tolist() == [4, 5, 6]


@pytest.mark.parametrize("enabled", [True, False])
def test_installing_scheduler_attaches_its_collector(enabled):
    req, _ = request_with_metrics()
    moved = migration.from_bytes(migration.to_bytes(migration.Work([], [], [req]))).waiting[0]
    mine = Collector()
    migration._attach_metrics(scheduler(mine, enabled), moved)
    assert moved.metrics_collector is (mine if enabled else None)
    assert moved.time_stats.enable_metrics is enabled
    assert moved.time_stats.metrics_collector is (mine if enabled else None)
