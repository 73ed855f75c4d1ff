"""Policies on tiny hand-made traces whose right answer is known, and the live scheduler
running under the simulated clock."""
from __future__ import annotations

import pytest

from gyges.control.scheduler import TransformationScheduler
from gyges.sim.cost import CostParams, MemoryPlan
from gyges.sim.engine import EventLoop
from gyges.sim.fleet import ElasticFleet
from gyges.sim.gpus import BUILTIN as GPUS
from gyges.sim.models import BUILTIN as MODELS
from gyges.sim.policies import POLICIES, SimSetup, build
from gyges.sim.runner import Slo, run_policy, summarise
from gyges.sim.traces import TraceRequest

H100 = CostParams.for_gpu(GPUS["h100"])
Q32 = MODELS["qwen2.5-32b"]
HOLD = 5.0


def setup(hosts: int = 1, gpus: int = 2) -> SimSetup:
    return SimSetup(Q32, H100, hosts, gpus, hold_down_s=HOLD)


def test_static_dp_fails_exactly_the_requests_above_one_replica():
    cap = MemoryPlan(Q32, H100, 2).static(1)
    needs = [cap // 2, cap + 1, cap, 2 * cap, 1000]
    trace = [TraceRequest(i * 1.0, n - 100, 100) for i, n in enumerate(needs)]
    run = run_policy("static-dp", trace, setup())
    assert [r.failed for r in run.requests] == [False, True, False, True, False]
    assert summarise(run, Slo())["failed"] == 2
    # TP2 holds all of them.
    assert summarise(run_policy("static-tp2", trace, setup()), Slo())["failed"] == 0


def _long_then_shorts() -> list[TraceRequest]:
    trace = [TraceRequest(0.0, 800, 100), TraceRequest(1.0, 49_000, 200)]
    trace += [TraceRequest(2.0 + i, 600, 50) for i in range(30)]  # shorts for 30 s
    return trace


def test_gyges_merges_once_for_a_long_request_and_splits_after_the_hold_down():
    run = run_policy("gyges", _long_then_shorts(), setup())
    long = run.requests[1]
    assert not any(r.failed for r in run.requests)
    ops = [(rec.op, rec.ranks) for rec in run.records]
    assert ops == [("merge", (0, 1)), ("split", (0, 1))]
    merge, split = run.records
    assert merge.start >= long.arrival and long.first_token is not None
    assert long.first_token >= merge.end  # served by the merged instance
    assert long.finish is not None and split.start >= long.finish
    assert split.start - merge.end >= HOLD  # not before the hold-down


def test_the_live_scheduler_runs_on_the_simulated_clock():
    loop = EventLoop()
    fleet = build("gyges", setup(), loop, lambda r: None, [])
    assert isinstance(fleet, ElasticFleet)
    sched = fleet.hosts[0].scheduler
    assert type(sched) is TransformationScheduler and sched.clock is loop
    loop.now = 123.0
    assert sched.status()["pending"] == [] and sched.clock() == 123.0
    run = run_policy("gyges", _long_then_shorts(), setup())
    assert run.events > 0


@pytest.mark.parametrize("policy", POLICIES)
def test_a_request_larger_than_any_configuration_fails_without_a_crash(policy):
    trace = [TraceRequest(0.0, 500, 20), TraceRequest(0.5, 5_000_000, 10),
             TraceRequest(1.0, 700, 20)]
    run = run_policy(policy, trace, setup(gpus=4))
    assert run.requests[1].failed
    out = summarise(run, Slo())
    assert out["requests"] == 3 and out["failed"] >= 1


def test_baselines_and_peers_also_merge_for_the_long_request():
    for policy in ("gyges-rr", "gyges-llf", "flying", "loongserve"):
        run = run_policy(policy, _long_then_shorts(), setup())
        assert [r.op for r in run.records][:1] == ["merge"], policy
        assert not any(r.failed for r in run.requests), policy


def test_router_spreads_concurrent_long_requests_and_gathers_sequential_ones():
    """Load first: two long requests at once go one per host (each merges); one after the
    other (the first finished) they go to the same host, the one that took long requests
    lately."""
    together = [TraceRequest(i * 0.1, 49_000, 20) for i in range(2)]
    run = run_policy("gyges", together, setup(hosts=2, gpus=4))  # room for two TP2s
    assert {rec.host for rec in run.records if rec.op == "merge"} == {0, 1}
    first = run_policy("gyges", together[:1], setup(hosts=2, gpus=4))
    done = max(r.finish for r in first.requests)
    apart = [TraceRequest(0.0, 49_000, 20), TraceRequest(done + 1.0, 49_000, 20)]
    run = run_policy("gyges", apart, setup(hosts=2, gpus=4))
    assert all(not r.failed for r in run.requests)
    assert {rec.host for rec in run.records if rec.op == "merge"} == {0}


def test_request_overhead_adds_to_every_ttft_and_to_nothing_else():
    trace = [TraceRequest(i * 3.0, 500, 20) for i in range(4)]  # one at a time
    base = run_policy("static-dp", trace, setup())
    slow = run_policy("static-dp", trace, SimSetup(Q32, H100.with_(request_overhead_s=0.05),
                                                   1, 2, hold_down_s=HOLD))
    for a, b in zip(base.requests, slow.requests, strict=True):
        assert b.first_token - a.first_token == pytest.approx(0.05)
        assert b.finish - b.first_token == pytest.approx(a.finish - a.first_token)
