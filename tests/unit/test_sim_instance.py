"""An instance's first token: at the prefill's end, or one step later where the overlap
scheduler runs on a CPU (``first_token_lag_steps``); TPOT stays the step time."""
from __future__ import annotations

import pytest

from gyges.sim.cost import CostParams, StepCost
from gyges.sim.engine import EventLoop
from gyges.sim.instance import Instance, SimRequest
from gyges.sim.models import ModelSpec
from gyges.sim.steps import TPStep

TINY = ModelSpec("tiny", 2, 64, 4, 2, 16, 128, 1000)


def _serve(lag: float, output: int) -> tuple[SimRequest, StepCost]:
    params = CostParams("cpu", flops=3e10, hbm_bw=5e9, memory=1e9, nvlink_bw=1e9,
                        first_token_lag_steps=lag)
    cost = StepCost(TINY, params)
    loop, done = EventLoop(), []
    inst = Instance(loop, (0,), 10_000, TPStep(cost, 1), done.append)
    req = SimRequest(0, 0.0, 100, output)
    inst.enqueue(req)
    loop.run()
    assert done == [req]
    return req, cost


@pytest.mark.parametrize("output", [1, 20])
def test_the_first_token_waits_for_the_step_launched_after_the_prefill(output: int) -> None:
    plain, cost = _serve(0.0, output)
    lagged, _ = _serve(1.0, output)
    prefill = cost.prefill(1, 100, 100 * 100 / 2, 1)
    assert plain.first_token == pytest.approx(prefill)
    assert lagged.first_token > plain.first_token
    step = lagged.first_token - plain.first_token
    assert step == pytest.approx(cost.decode(1, 1, 101), rel=0.05)
    assert plain.finish is not None and lagged.finish is not None
    # every token lags alike: the time per output token does not change
    if output > 1:
        assert (lagged.finish - lagged.first_token) == pytest.approx(
            plain.finish - plain.first_token, rel=0.05)


def _merged(long_above: int | None) -> tuple[list[SimRequest], SimRequest, Instance]:
    """A TP2 instance of 300 KV tokens serving two short requests (20 + 80 each); a request
    of 250, which one replica (120) cannot hold, arrives after 10 steps."""
    cost = StepCost(TINY, CostParams("cpu", flops=3e10, hbm_bw=5e9, memory=1e9,
                                     nvlink_bw=1e9))
    loop, done = EventLoop(), []
    inst = Instance(loop, (0, 1), 300, TPStep(cost, 2), done.append, long_above=long_above)
    shorts = [SimRequest(i, 0.0, 20, 80) for i in range(2)]
    for r in shorts:
        inst.enqueue(r)
    long = SimRequest(9, 0.0, 200, 50)
    step = cost.decode(2, 2, 42)
    loop.after(cost.prefill(2, 40, 400, 2) + 10.5 * step,
               lambda: (setattr(long, "arrival", loop.now), inst.enqueue(long)))
    loop.run()
    assert sorted(done, key=lambda r: r.rid) == [*shorts, long]
    return shorts, long, inst


def test_a_merged_instance_retracts_short_requests_for_a_long_one() -> None:
    shorts, long, inst = _merged(long_above=120)
    assert inst.retracted == 2  # 250 - (300 - 200) = 150: one short frees 100, two 200
    assert long.first_token is not None and long.finish is not None
    assert all(r.finish is not None and r.finish > long.finish for r in shorts)
    assert all(r.carried > 0 for r in shorts)
    # no token is lost or counted twice (the prefill that resumes a retracted request
    # makes its next token; the ones it had are recomputed, not counted again)
    assert inst.tokens_out == sum(r.output for r in (*shorts, long))
    plain_shorts, plain_long, plain = _merged(long_above=None)  # it waits for them
    assert plain.retracted == 0
    assert all(r.finish is not None and r.finish < plain_long.first_token
               for r in plain_shorts)
    assert long.first_token < plain_long.first_token
