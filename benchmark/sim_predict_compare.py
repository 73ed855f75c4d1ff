"""Hold the simulator to the live server: predict benchmark/compare.py's committed N=2 run.

    PYTHONPATH=python python benchmark/sim_predict_compare.py

Rebuilds compare.py's default trace (synthetic_long_tail(48, seed 0), time x6, lengths
x0.25, capped at 2 x 1016 slots), refits the round-trip calibration's measurements for
1024 KV slots per replica (compare.py's --max-total-tokens), simulates dp, tp, and Gyges
with each policy on one host of 2 "GPUs" with hold-down 2 s, and compares throughput,
goodput and TTFT p50 with the live results in benchmark/results/*.json. Writes
benchmark/results/sim/predict-compare.md.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

from compare_report import summarize_run  # noqa: E402
from traces import cap_need, scale, synthetic_long_tail  # noqa: E402

from gyges.sim.calibrate import fit_all  # noqa: E402
from gyges.sim.cost import CostParams  # noqa: E402
from gyges.sim.models import model_from_hf  # noqa: E402
from gyges.sim.policies import SimSetup  # noqa: E402
from gyges.sim.runner import Slo, run_policy, summarise  # noqa: E402
from gyges.sim.traces import TraceRequest  # noqa: E402

LIVE = {"dp": "static-dp", "tp": "static-tp2", "gyges-gyges": "gyges",
        "gyges-round_robin": "gyges-rr", "gyges-llf": "gyges-llf"}
SLO_TTFT_S, SLO_TPOT_S = 2.0, 0.2


def main() -> None:
    from gyges.testing.server import tiny_model
    from gyges.testing.tiny_model import LLAMA_GQA

    model = model_from_hf(tiny_model(LLAMA_GQA))
    calib = json.loads((ROOT / "results/sim/roundtrip/calibration.json").read_text())
    data = dict(calib["measurements"], capacity_tokens_tp1=1024)
    params = CostParams.from_json(fit_all(model, data)["params"])
    raw = scale(synthetic_long_tail(48, seed=0), time_scale=6.0, length_scale=0.25,
                max_requests=48)
    trace = [TraceRequest(r.arrival_s, r.input_len, r.output_len)
             for r in cap_need(raw, 2 * 1016)]
    setup = SimSetup(model, params, 1, 2, hold_down_s=2.0)
    rows = ["| config | metric | live | simulated | error |", "|---|---|---|---|---|"]
    errors: dict[str, list[float]] = {}
    for live_name, policy in LIVE.items():
        live = summarize_run(json.loads((ROOT / f"results/{live_name}.json").read_text()),
                             SLO_TTFT_S, SLO_TPOT_S)
        sim = summarise(run_policy(policy, trace, setup), Slo(SLO_TTFT_S * 1000,
                                                              SLO_TPOT_S * 1000))
        for metric, a, b in (
                ("throughput tok/s", live["output_throughput_tok_s"], sim["throughput_tok_s"]),
                ("goodput req/s", live["goodput_req_s"], sim["goodput_req_s"]),
                ("TTFT p50 ms", live["ttft_p50_s"] * 1000, sim["ttft_p50_ms"])):
            err = (b - a) / a if a else float("nan")
            errors.setdefault(metric, []).append(abs(err))
            rows.append(f"| {live_name} | {metric} | {a:.3g} | {b:.3g} | {err:+.0%} |")
    rows += ["", "| metric | mean abs error | within 20% |", "|---|---|---|"]
    for metric, errs in errors.items():
        rows.append(f"| {metric} | {sum(errs) / len(errs):.0%} | "
                    f"{sum(e <= 0.2 for e in errs)}/{len(errs)} |")
    text = "\n".join(rows) + "\n"
    (ROOT / "results/sim/predict-compare.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
