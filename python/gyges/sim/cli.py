"""``python -m gyges.sim run|calibrate``: argument parsing and the one-line error contract.

Bad input (unknown model, GPU or policy, an unreadable or empty trace, a model that fits
no degree) prints one line on stderr and exits 2; nothing else is caught.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, NoReturn

from gyges.sim.cost import CostParams
from gyges.sim.gpus import builtin_gpu
from gyges.sim.models import ModelSpec, SimInputError, builtin_model, model_from_hf
from gyges.sim.policies import POLICIES, SimSetup, check_setup
from gyges.sim.runner import Slo, run_policy, summarise
from gyges.sim.traces import load_trace


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise SimInputError(f"{self.prog}: {message}")


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m gyges.sim", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=_Parser)
    r = sub.add_parser("run", help="replay a trace under one or more policies")
    r.add_argument("--trace", required=True)
    r.add_argument("--format", choices=("azure", "mooncake"))
    m = r.add_mutually_exclusive_group(required=True)
    m.add_argument("--model", help="llama-3-8b, qwen2.5-32b or llama-3-70b")
    m.add_argument("--model-path", help="a Hugging Face model directory (config.json)")
    g = r.add_mutually_exclusive_group(required=True)
    g.add_argument("--gpu", help="h100 or h200")
    g.add_argument("--calibration", help="a file written by `calibrate`")
    r.add_argument("--hosts", type=int, default=1)
    r.add_argument("--gpus-per-host", type=int, default=8)
    r.add_argument("--policy", action="append", required=True,
                   help=f"repeatable; one of {', '.join(POLICIES)} or 'all'")
    r.add_argument("--time-scale", type=float, default=1.0,
                   help="multiply inter-arrival times (0.5 = twice the request rate)")
    r.add_argument("--duration", type=float, help="keep arrivals before S seconds")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--slo-ttft-ms", type=float, default=2000.0)
    r.add_argument("--slo-tpot-ms", type=float, default=100.0)
    r.add_argument("--hold-down", type=float, default=5.0,
                   help="--gyges-split-hold-down of the simulated hosts (s)")
    r.add_argument("--overlap", type=float,
                   help="fraction of a transformation's transfer hidden under serving "
                        "(0 = stop-the-world, the default)")
    r.add_argument("--sweep", help="comma-separated extra --time-scale values for the "
                                   "goodput-vs-rate plot")
    r.add_argument("--no-plots", action="store_true", help="results.json and report.md only")
    r.add_argument("--out", required=True)
    c = sub.add_parser("calibrate", help="measure a live Gyges server and fit the cost model")
    c.add_argument("--url")
    c.add_argument("--measurements", help="refit the measurements of an earlier "
                                          "calibration file instead of measuring")
    c.add_argument("--out", required=True)
    c.add_argument("--model-path", help="config.json of the served model (default: ask "
                                        "the server's /get_model_info)")
    c.add_argument("--api-key")
    c.add_argument("--repeats", type=int, default=3)
    c.add_argument("--host-cores", type=float,
                   help="cores the CPU server's processes share (default for a CPU server "
                        "measured with --url: this machine's, as the server runs here; "
                        "ignored for GPU servers)")
    return p


def _policies(names: list[str]) -> list[str]:
    out: list[str] = []
    for n in names:
        for part in n.split(","):
            if part == "all":
                out += [x for x in POLICIES if x not in out]
            elif part not in POLICIES:
                raise SimInputError(f"unknown policy {part!r}; choose from "
                                    f"{', '.join(POLICIES)} or all")
            elif part not in out:
                out.append(part)
    return out


def _params(args: argparse.Namespace) -> CostParams:
    if args.gpu is not None:
        params = CostParams.for_gpu(builtin_gpu(args.gpu))
    else:
        try:
            data = json.loads(Path(args.calibration).read_text())
        except (OSError, ValueError) as e:
            raise SimInputError(f"cannot read calibration {args.calibration}: {e}") from None
        params = CostParams.from_json(data.get("params", data))
    if args.overlap is not None:
        if not 0.0 <= args.overlap <= 1.0:
            raise SimInputError("--overlap must be within [0, 1]")
        params = params.with_(overlap=args.overlap)
    return params


def run(args: argparse.Namespace) -> dict[str, Any]:
    model: ModelSpec = (builtin_model(args.model) if args.model
                        else model_from_hf(args.model_path))
    params = _params(args)
    policies = _policies(args.policy)
    setup = SimSetup(model, params, args.hosts, args.gpus_per_host, args.hold_down, args.seed)
    check_setup(setup)
    trace = load_trace(args.trace, args.format, time_scale=args.time_scale,
                       duration=args.duration)
    sweep = sorted({float(x) for x in args.sweep.split(",")}) if args.sweep else []
    slo = Slo(args.slo_ttft_ms, args.slo_tpot_ms)
    from gyges.sim.report import progress_bar, write_outputs

    logging.getLogger("gyges").setLevel(logging.ERROR)
    runs, summaries, walls = {}, {}, {}
    for name in policies:
        t0 = time.perf_counter()
        with progress_bar(name, trace[-1].arrival_s) as tick:
            runs[name] = run_policy(name, trace, setup, tick)
        walls[name] = time.perf_counter() - t0
        summaries[name] = summarise(runs[name], slo)
    sweep_out: dict[str, dict[str, Any]] = {}
    if sweep:  # the main run is the sweep's point at scale 1
        sweep = sorted(set(sweep) | {1.0})
    for scale in sweep:
        if scale == 1.0:
            sweep_out["1"] = {"time_scale": args.time_scale,
                              "rate_req_s": round(len(trace) / max(trace[-1].arrival_s, 1e-9),
                                                  6),
                              "goodput_req_s": {n: summaries[n]["goodput_req_s"]
                                                for n in policies}}
            continue
        t = load_trace(args.trace, args.format, time_scale=args.time_scale * scale,
                       duration=None if args.duration is None else args.duration * scale)
        rate = len(t) / max(t[-1].arrival_s, 1e-9)
        sweep_out[f"{scale:g}"] = {"time_scale": args.time_scale * scale,
                                   "rate_req_s": round(rate, 6),
                                   "goodput_req_s": {n: summarise(run_policy(n, t, setup), slo)
                                                     ["goodput_req_s"] for n in policies}}
    fmt = args.format or ("azure" if str(args.trace).lower().endswith(".csv") else "mooncake")
    config = {
        "trace": str(args.trace), "format": fmt, "model": asdict(model),
        "hardware": params.to_json(), "hosts": args.hosts,
        "gpus_per_host": args.gpus_per_host, "policies": policies,
        "time_scale": args.time_scale, "duration": args.duration, "seed": args.seed,
        "slo_ttft_ms": args.slo_ttft_ms, "slo_tpot_ms": args.slo_tpot_ms,
        "hold_down_s": args.hold_down, "requests": len(trace),
    }
    results = {"config": config, "policies": summaries}
    if sweep_out:
        results["sweep"] = sweep_out
    write_outputs(Path(args.out), results, runs, walls, plot=not args.no_plots)
    return results


def main(argv: list[str] | None = None) -> int:
    try:
        args = parser().parse_args(argv)
        if args.cmd == "run":
            run(args)
        else:
            from gyges.sim.calibrate import calibrate
            calibrate(args)
    except SimInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
