"""Run one policy over a trace and summarise it (the numbers that go to results.json)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from gyges.sim.engine import EventLoop
from gyges.sim.host import TransformRecord
from gyges.sim.instance import SimRequest
from gyges.sim.policies import Infeasible, SimSetup, build
from gyges.sim.traces import TraceRequest

BIN_S = 10.0  # throughput-over-time resolution


@dataclass(frozen=True)
class Slo:
    ttft_ms: float = 2000.0
    tpot_ms: float = 100.0


@dataclass
class PolicyRun:
    name: str
    requests: list[SimRequest]
    records: list[TransformRecord] = field(default_factory=list)
    infeasible: str | None = None
    events: int = 0


def run_policy(name: str, trace: Sequence[TraceRequest], setup: SimSetup,
               progress: Callable[[float], None] | None = None) -> PolicyRun:
    """Replay ``trace`` under policy ``name``; every request ends completed or failed."""
    loop = EventLoop()
    reqs = [SimRequest(i, r.arrival_s, r.prompt, r.output) for i, r in enumerate(trace)]
    run = PolicyRun(name, reqs)
    try:
        fleet = build(name, setup, loop, lambda r: None, run.records)
    except Infeasible as e:
        run.infeasible = str(e)
        for r in reqs:
            r.failed, r.finish = True, r.arrival
        return run

    # a request reaches its host's scheduler after the per-request overhead (HTTP,
    # tokenizer, dispatch); its TTFT still counts from its arrival
    delay = setup.params.request_overhead_s

    def arrive(i: int) -> None:
        fleet.submit(reqs[i])
        if i + 1 < len(reqs):
            loop.at(reqs[i + 1].arrival + delay, lambda: arrive(i + 1))

    if reqs:
        loop.at(reqs[0].arrival + delay, lambda: arrive(0))
    loop.run(progress=progress)
    run.events = loop.processed
    return run


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    i = min(len(values) - 1, max(0, math.ceil(q / 100 * len(values)) - 1))
    return values[i]


def ttft_ms(r: SimRequest) -> float:
    assert r.first_token is not None
    return (r.first_token - r.arrival) * 1000


def tpot_ms(r: SimRequest) -> float | None:
    if r.output <= 1 or r.finish is None or r.first_token is None:
        return None
    return (r.finish - r.first_token) * 1000 / (r.output - 1)


def summarise(run: PolicyRun, slo: Slo) -> dict[str, Any]:
    done = [r for r in run.requests if not r.failed and r.finish is not None]
    start = min((r.arrival for r in run.requests), default=0.0)
    end = max((r.finish or 0.0 for r in run.requests), default=0.0)
    span = max(end - start, 1e-9)
    ttfts = [ttft_ms(r) for r in done]
    tpots = [t for t in (tpot_ms(r) for r in done) if t is not None]
    good = sum(1 for r in done if ttft_ms(r) <= slo.ttft_ms
               and (tpot_ms(r) or 0.0) <= slo.tpot_ms)
    out: dict[str, Any] = {
        "requests": len(run.requests),
        "completed": len(done),
        "failed": len(run.requests) - len(done),
        "throughput_tok_s": sum(r.output for r in done) / span,
        "goodput_req_s": good / span,
        "ttft_p50_ms": _pct(ttfts, 50), "ttft_p99_ms": _pct(ttfts, 99),
        "tpot_p50_ms": _pct(tpots, 50), "tpot_p99_ms": _pct(tpots, 99),
        "merges": sum(1 for t in run.records if t.op == "merge"),
        "splits": sum(1 for t in run.records if t.op == "split"),
        "transform_s": sum(t.end - t.start for t in run.records),
    }
    if run.infeasible:
        out["infeasible"] = run.infeasible
    return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in out.items()}


def throughput_series(run: PolicyRun) -> tuple[list[float], list[float]]:
    """Output tokens per second in BIN_S bins, counted when each request finishes."""
    bins: dict[int, int] = {}
    for r in run.requests:
        if not r.failed and r.finish is not None:
            b = int(r.finish // BIN_S)
            bins[b] = bins.get(b, 0) + r.output
    if not bins:
        return [], []
    xs = [b * BIN_S for b in range(max(bins) + 1)]
    return xs, [bins.get(b, 0) / BIN_S for b in range(max(bins) + 1)]
