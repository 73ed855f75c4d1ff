"""The calibration fit recovers known constants from points the cost model generated."""
from __future__ import annotations

import pytest

from gyges.sim.calibrate import first_token_lag_steps, fit, fit_transforms, serving_path
from gyges.sim.cost import CostParams, StepCost
from gyges.sim.models import ModelSpec

TINY = ModelSpec("tiny", 2, 64, 4, 2, 16, 128, 1000)


def _points(c: StepCost, lag: int) -> list[dict]:
    """Whole requests (overhead 20 ms + prefill + ``lag`` batch-1 decode steps) and
    differences of requests (steps only)."""
    points: list[dict] = []
    for k in (1, 2):
        for p in (32, 256, 1024, 4096):
            points.append({"kind": "prefill", "k": k, "tokens": p,
                           "s": 0.02 + c.prefill(k, p, p * p / 2, 1) + lag * c.decode(k, 1, p)})
        for b in (1, 4):
            points.append({"kind": "decode", "k": k, "batch": b, "ctx": 80 * b,
                           "s": c.decode(k, b, 80 * b)})
    return points


@pytest.mark.parametrize("lag", [0, 1])  # 1: the step launched before the first token
def test_fit_recovers_the_step_constants(lag: int):
    truth = CostParams("cpu", flops=3e10, hbm_bw=5e9, memory=1e9, nvlink_bw=1e9, mfu=1.0,
                       mfu_attn=1.0, mbu=1.0, layer_overhead_s=0.0, step_overhead_s=0.004,
                       allreduce_latency_s=2e-4, request_overhead_s=0.02,
                       first_token_lag_steps=float(lag))
    points = _points(StepCost(TINY, truth), lag=lag)
    start = truth.with_(flops=1e11, hbm_bw=1e10, step_overhead_s=0.01,
                        allreduce_latency_s=1e-5, request_overhead_s=0.005)
    params, errors = fit(TINY, start, points)
    assert max(abs(e) for e in errors) < 0.05
    assert params.step_overhead_s == pytest.approx(0.004, rel=0.2)
    assert params.request_overhead_s == pytest.approx(0.02, rel=0.2)


def test_transformation_fit_is_a_line():
    pts = [{"kv_bytes": b, "weight_bytes": 0, "ms": 30 + b / 1e6} for b in (0, 1e6, 5e6)]
    fixed, bw = fit_transforms(pts)
    assert fixed == pytest.approx(0.030) and bw == pytest.approx(1e9)


@pytest.mark.parametrize(("info", "lag"), [
    ({"device": "cpu", "disable_overlap_schedule": False}, 1.0),
    ({"server_args": {"device": "cpu", "disable_overlap_schedule": False}}, 1.0),
    ({"device": "cpu", "disable_overlap_schedule": True}, 0.0),
    ({"device": "cuda", "disable_overlap_schedule": False}, 0.0),
    ({}, 0.0),
])
def test_only_the_overlap_scheduler_on_a_cpu_lags_a_step(info: dict, lag: float) -> None:
    assert first_token_lag_steps(serving_path(info)) == lag


def test_old_calibrations_without_the_serving_path_do_not_lag():
    assert first_token_lag_steps(None) == 0.0
