"""Hold the simulator to the live server: predict benchmark/compare.py's N=2 or N=4 run.

    # 1. calibrate against a live dp 2 Gyges server configured like compare.py's
    PYTHONPATH=python python benchmark/sim_predict_compare.py --calibrate \
        --calibration benchmark/results/sim/predict/calibration.json
    # 2. the live run the fit never saw (compare.py's own trace and servers)
    PYTHONPATH=python python benchmark/compare.py --out benchmark/results/sim/predict/live
    # 3. predict it
    PYTHONPATH=python python benchmark/sim_predict_compare.py \
        --calibration benchmark/results/sim/predict/calibration.json \
        --live benchmark/results/sim/predict/live --out benchmark/results/sim/predict/report.md

Step 1 starts the tiny Llama compare.py serves at N=2 (dp 2, ``--enable-gyges``, 1024 KV
slots per replica) and runs ``python -m gyges.sim calibrate`` against it. Step 3 rebuilds
compare.py's default trace (synthetic_long_tail(48, seed 0), time x6, lengths x0.25, capped
at 2 x 1016 slots), simulates dp, tp, and Gyges with each policy on one host of 2 "GPUs"
with hold-down 2 s, and compares throughput, goodput and TTFT p50 with the live
``<config>.json`` files. Without options: the round trip's calibration
(results/sim/roundtrip/) refitted for 1024 slots, against the committed live run in
benchmark/results/.

N=4: ``--num-ranks 4`` on all three steps (compare.py's own ``--num-ranks 4``): the
calibration starts compare.py's N=4 model (4 KV heads) at dp 4 and measures TP1, TP2 and
TP4; the prediction simulates one host of 4 "GPUs" (compare.py's "mix", two TP2
replicas, is the simulator's ``static-tp2``; its "tp" is ``static-tp4``).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

from compare import model_for  # noqa: E402
from compare_report import summarize_run  # noqa: E402
from traces import cap_need, scale, synthetic_long_tail  # noqa: E402

from gyges.sim.calibrate import fit_all  # noqa: E402
from gyges.sim.cost import CostParams  # noqa: E402
from gyges.sim.models import model_from_hf  # noqa: E402
from gyges.sim.policies import SimSetup  # noqa: E402
from gyges.sim.runner import Slo, run_policy, summarise  # noqa: E402
from gyges.sim.traces import TraceRequest  # noqa: E402

GYGES = {"gyges-gyges": "gyges", "gyges-round_robin": "gyges-rr", "gyges-llf": "gyges-llf"}
LIVE = {2: {"dp": "static-dp", "tp": "static-tp2", **GYGES},
        4: {"dp": "static-dp", "tp": "static-tp4", "mix": "static-tp2", **GYGES}}
SLO_TTFT_S, SLO_TPOT_S = 2.0, 0.2


def calibrate(out: Path, num_ranks: int) -> None:
    """Calibrate against a live server configured like compare.py's Gyges servers."""
    import subprocess

    from gyges.testing.server import SGLangServer

    path = model_for(num_ranks)
    out.parent.mkdir(parents=True, exist_ok=True)
    with SGLangServer(path, dp_size=num_ranks, gyges=True, max_total_tokens=1024,
                      extra_args=["--gyges-split-hold-down", "2"]) as srv:
        subprocess.run([sys.executable, "-m", "gyges.sim", "calibrate", "--url", srv.url,
                        "--out", str(out), "--model-path", str(path), "--repeats", "3"],
                       check=True)


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calibrate", action="store_true",
                    help="measure a live server into --calibration, then stop")
    ap.add_argument("--calibration", type=Path,
                    help="calibration file (default: the round trip's, refitted)")
    ap.add_argument("--live", type=Path, default=ROOT / "results",
                    help="directory of compare.py's <config>.json files")
    ap.add_argument("--out", type=Path, default=ROOT / "results/sim/predict-compare.md")
    ap.add_argument("--num-ranks", type=int, default=2, choices=(2, 4),
                    help="compare.py's --num-ranks: dp size of the calibrated server and "
                         "GPUs of the simulated host")
    ap.add_argument("--host-cores", type=float,
                    help="cores the live run's processes shared (overrides the "
                         "calibration's host_cores; 0: CPU contention not modelled)")
    args = ap.parse_args()
    n = args.num_ranks
    if args.calibrate:
        if args.calibration is None:
            raise SystemExit("error: --calibrate needs --calibration FILE")
        calibrate(args.calibration, n)
        return
    model = model_from_hf(model_for(n))
    if args.calibration is None:
        if n != 2:
            raise SystemExit("error: --num-ranks 4 needs --calibration FILE")
        calib = json.loads((ROOT / "results/sim/roundtrip/calibration.json").read_text())
        data = dict(calib["measurements"], capacity_tokens_tp1=1024)
        params = CostParams.from_json(fit_all(model, data)["params"])
    else:
        params = CostParams.from_json(json.loads(args.calibration.read_text())["params"])
    if args.host_cores is not None:
        params = params.with_(host_cores=args.host_cores)
    raw = scale(synthetic_long_tail(48, seed=0), time_scale=6.0, length_scale=0.25,
                max_requests=48)
    trace = [TraceRequest(r.arrival_s, r.input_len, r.output_len)
             for r in cap_need(raw, n * 1016)]
    setup = SimSetup(model, params, 1, n, hold_down_s=2.0)
    rows = ["| config | metric | live | simulated | error |", "|---|---|---|---|---|"]
    errors: dict[str, list[float]] = {}
    for live_name, policy in LIVE[n].items():
        live = summarize_run(json.loads((args.live / f"{live_name}.json").read_text()),
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
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
