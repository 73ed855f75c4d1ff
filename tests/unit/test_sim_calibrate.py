"""The calibration fit recovers known constants from points the cost model generated; the
measurements it fits are cold prefills, medians of their samples."""
from __future__ import annotations

import statistics
import threading
import time

import pytest

from gyges.sim.calibrate import (
    Server,
    first_token_lag_steps,
    fit,
    fit_all,
    fit_transforms,
    host_cores,
    measure,
    serving_path,
)
from gyges.sim.cost import CostParams, StepCost
from gyges.sim.models import ModelSpec, SimInputError

TINY = ModelSpec("tiny", 2, 64, 4, 2, 16, 128, 1000)


def _points(c: StepCost, lag: int, degrees: tuple[int, ...] = (1, 2)) -> list[dict]:
    """Whole requests (overhead 20 ms + prefill + ``lag`` batch-1 decode steps) and
    differences of requests (steps only)."""
    points: list[dict] = []
    for k in degrees:
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


@pytest.mark.parametrize("scaling", ["flat", "ring"])
def test_calibration_keeps_the_all_reduce_scaling_that_fits(scaling: str):
    """Measured at TP1, TP2 and TP4 (two degrees above one tell the scalings apart), the
    calibration keeps the all-reduce floor's growth that generated the points."""
    truth = CostParams("cpu", flops=3e10, hbm_bw=5e9, memory=1e9, nvlink_bw=1e9, mfu=1.0,
                       mfu_attn=1.0, mbu=1.0, layer_overhead_s=0.0, step_overhead_s=0.004,
                       allreduce_latency_s=2e-3, request_overhead_s=0.02,
                       allreduce_scaling=scaling)
    data = {"steps": _points(StepCost(TINY, truth), lag=0, degrees=(1, 2, 4)),
            "transforms": [{"kv_bytes": b, "weight_bytes": 0, "ms": 30 + b / 1e6}
                           for b in (0, 1e6)],
            "max_tp": 4, "capacity_tokens_tp1": 1024}
    out = fit_all(TINY, data)
    assert out["params"]["allreduce_scaling"] == scaling
    errs = out["fit"]["allreduce_scaling_mean_abs_rel_err"]
    assert errs[scaling] < 0.05 < errs["flat" if scaling == "ring" else "ring"]
    assert StepCost(TINY, CostParams.from_json(out["params"])).latency(4) == \
        pytest.approx(truth.allreduce_latency_s * (3 if scaling == "ring" else 1), rel=0.2)


def test_a_calibration_with_an_unknown_all_reduce_scaling_is_refused():
    bad = CostParams("cpu", flops=1e10, hbm_bw=1e9, memory=1e9, nvlink_bw=1e9).to_json()
    with pytest.raises(SimInputError, match="allreduce_scaling"):
        CostParams.from_json({**bad, "allreduce_scaling": "tree"})


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


@pytest.mark.parametrize(("serving", "cores"), [
    ({"device": "cpu", "overlap_schedule": True, "host_cores": 2}, 2.0),
    ({"device": "cpu", "overlap_schedule": True}, 0.0),  # recorded before host_cores
    ({"device": "cuda", "overlap_schedule": True, "host_cores": 64}, 0.0),
    (None, 0.0),
])
def test_only_cpu_servers_record_their_cores(serving: dict | None, cores: float) -> None:
    assert host_cores(serving) == cores


class _FakeHost(Server):
    """A dp 2 host that records every prompt and answers a request with a prefix it has
    seen in 1 ms (a prefix-cache hit) and any other in 10 ms per 32 prompt tokens."""

    def __init__(self) -> None:
        super().__init__("http://fake", None)
        self.tp, self.prompts, self.lock = 1, [], threading.Lock()

    def call(self, path: str, body: dict | None = None, timeout: float = 300.0) -> dict:
        if path == "/gyges/status":
            n = 2 // self.tp
            return {"dp_size": 2, "max_tp": 2, "instances": [
                {"ranks": list(range(i * self.tp, (i + 1) * self.tp)), "tp": self.tp,
                 "capacity_tokens": 4096 * self.tp} for i in range(n)]}
        if path == "/server_info":
            return {"device": "cpu", "disable_overlap_schedule": False}
        if path in ("/gyges/merge", "/gyges/split"):
            self.tp = 2 if path.endswith("merge") else 1
            return {"elapsed_ms": {"total_ms": 50.0}, "kv_bytes_moved": 0}
        ids = tuple(body["input_ids"])
        with self.lock:
            hit = any(p[:8] == ids[:8] for p in self.prompts)
            self.prompts.append(ids)
        time.sleep(0.001 if hit else 0.01 * len(ids) / 32 + 0.001 * body[
            "sampling_params"]["max_new_tokens"])
        return {}


def test_every_sample_is_a_cold_prefill_and_points_are_medians(monkeypatch):
    """Measured points never reuse a prompt (a prefix-cache hit would time a one-token
    prefill: the first calibrations took the fastest of three repeats of one prompt, which
    could be a cached one), and each point is the median of its samples."""
    monkeypatch.setattr("gyges.sim.calibrate.PROMPTS", (32, 256))
    monkeypatch.setattr("gyges.sim.calibrate.DECODE_BATCHES", (1,))
    host = _FakeHost()
    data = measure(host, TINY, repeats=3)
    # the measured prompts: prefills of 32 and 256 tokens, decodes of 64 (not the warm-ups
    # or the transformations' busy request)
    heads = [p[:3] for p in host.prompts if len(p) in (32, 256, 64)]
    assert len(heads) == len(set(heads)), "two measurements shared a prompt"
    prefill = {(p["k"], p["tokens"]): p for p in data["steps"] if p["kind"] == "prefill"}
    for (_, tokens), p in prefill.items():
        assert p["s"] == statistics.median(p["samples"]) and len(p["samples"]) == 3
        assert p["s"] >= 0.01 * tokens / 32  # not a cache hit's 1 ms
