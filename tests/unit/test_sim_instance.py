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
