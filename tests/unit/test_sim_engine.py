"""The event loop: (time, sequence) order, cancelling, and whole runs being deterministic."""
from __future__ import annotations

from gyges.sim.cost import CostParams
from gyges.sim.engine import EventLoop
from gyges.sim.gpus import BUILTIN as GPUS
from gyges.sim.models import BUILTIN as MODELS
from gyges.sim.policies import SimSetup
from gyges.sim.runner import Slo, run_policy, summarise
from gyges.sim.traces import TraceRequest


def test_events_run_in_time_then_scheduling_order():
    loop, seen = EventLoop(), []
    loop.at(2.0, lambda: seen.append("c"))
    loop.at(1.0, lambda: seen.append("a"))
    loop.at(1.0, lambda: seen.append("b"))  # same instant: after "a"
    h = loop.at(1.5, lambda: seen.append("cancelled"))
    loop.cancel(h)
    loop.at(1.0, lambda: loop.after(0.5, lambda: seen.append(f"nested@{loop.now}")))
    loop.run()
    assert seen == ["a", "b", "nested@1.5", "c"] and loop.now == 2.0


def test_run_until_stops_before_later_events():
    loop, seen = EventLoop(), []
    for t in (1.0, 2.0, 3.0):
        loop.at(t, lambda t=t: seen.append(t))
    loop.run(until=2.0)
    assert seen == [1.0, 2.0] and len(loop) == 1


def test_events_in_the_past_run_now():
    loop, seen = EventLoop(), []
    loop.at(5.0, lambda: loop.at(1.0, lambda: seen.append(loop.now)))
    loop.run()
    assert seen == [5.0]


def _trace() -> list[TraceRequest]:
    out = []
    for i in range(60):
        long = i % 10 == 3
        out.append(TraceRequest(i * 0.25, 50_000 if long else 500 + 37 * i, 50 + i))
    return out


def test_same_inputs_give_identical_results():
    setup = SimSetup(MODELS["qwen2.5-32b"], CostParams.for_gpu(GPUS["h100"]), 2, 4)
    for policy in ("static-dp", "gyges", "flying"):
        a = summarise(run_policy(policy, _trace(), setup), Slo())
        b = summarise(run_policy(policy, _trace(), setup), Slo())
        assert a == b and a["completed"] + a["failed"] == 60


def test_the_simulator_imports_no_torch():
    import subprocess
    import sys
    from pathlib import Path

    code = ("import sys, gyges.sim.cli, gyges.sim.policies, gyges.sim.calibrate; "
            "sys.exit('torch' in sys.modules)")
    root = Path(__file__).resolve().parents[2]
    assert subprocess.run([sys.executable, "-c", code], timeout=60,
                          env={"PYTHONPATH": str(root / "python")}).returncode == 0
