"""The calibration fit recovers known constants from points the cost model generated."""
from __future__ import annotations

import pytest

from gyges.sim.calibrate import fit, fit_transforms
from gyges.sim.cost import CostParams, StepCost
from gyges.sim.models import ModelSpec

TINY = ModelSpec("tiny", 2, 64, 4, 2, 16, 128, 1000)


def test_fit_recovers_the_step_constants():
    truth = CostParams("cpu", flops=3e10, hbm_bw=5e9, memory=1e9, nvlink_bw=1e9, mfu=1.0,
                       mfu_attn=1.0, mbu=1.0, layer_overhead_s=0.0, step_overhead_s=0.004,
                       allreduce_latency_s=2e-4, request_overhead_s=0.02)
    c = StepCost(TINY, truth)
    points = []
    for k in (1, 2):
        for p in (32, 256, 1024, 4096):  # whole requests: overhead + prefill
            points.append({"kind": "prefill", "k": k, "tokens": p,
                           "s": 0.02 + c.prefill(k, p, p * p / 2, 1)})
        for b in (1, 4):  # differences of requests: steps only
            points.append({"kind": "decode", "k": k, "batch": b, "ctx": 80 * b,
                           "s": c.decode(k, b, 80 * b)})
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
