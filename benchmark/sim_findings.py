"""Run the simulator over the findings matrix and tabulate Gyges against the others.

    PYTHONPATH=python python benchmark/sim_findings.py [--out benchmark/results/sim]

Workloads: Mooncake conversation, Azure conv, Azure code (the shared traces); 1 and 8
hosts of 8 H100; Llama-3-8B, Qwen2.5-32B, Llama-3-70B; every policy. Each cell writes
OUT/<workload>-<model>-<hosts>h/{results.json,report.md}; the table goes to
OUT/findings.md. A missing trace skips its rows.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

TRACES = {
    "mooncake-conv": "/work/shared/traces/mooncake_conversation_trace.jsonl",
    "azure-conv": "/work/shared/traces/AzureLLMInferenceTrace_conv.csv",
    "azure-code": "/work/shared/traces/AzureLLMInferenceTrace_code.csv",
}
MODELS = ("llama-3-8b", "qwen2.5-32b", "llama-3-70b")
HOSTS = (1, 8)
PEERS = ("flying", "shift", "loongserve")


def ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None:
        return "-"
    if b == 0:
        return "-" if a == 0 else "inf"
    return f"{a / b:.2f}"


def row(name: str, res: dict) -> str:
    pol = res["policies"]
    feasible = {n: r for n, r in pol.items() if "infeasible" not in r}
    static = {n: r for n, r in feasible.items() if n.startswith("static-")}
    best = max(static, key=lambda n: (static[n]["goodput_req_s"],
                                      static[n]["throughput_tok_s"]), default=None)
    g = pol["gyges"]
    if "infeasible" in g:
        return f"| {name} | {best or '-'} | gyges infeasible: {g['infeasible']} |" + " |" * 8
    cells = [name, best or "-",
             f"{g['goodput_req_s']:.3g}", f"{g['throughput_tok_s']:.0f}",
             f"{g['failed']}", f"{g['merges']}",
             ratio(g["goodput_req_s"], static[best]["goodput_req_s"] if best else None),
             ratio(g["throughput_tok_s"], static[best]["throughput_tok_s"] if best else None),
             ratio(g["goodput_req_s"], max(feasible.get(n, {}).get("goodput_req_s", 0)
                                           for n in ("gyges-rr", "gyges-llf")))]
    for peer in PEERS:
        r = feasible.get(peer)
        cells.append(ratio(g["goodput_req_s"], r["goodput_req_s"]) if r else "infeasible")
    return "| " + " | ".join(cells) + " |"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmark/results/sim")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--hosts", default=",".join(map(str, HOSTS)))
    ap.add_argument("--workloads", default=",".join(TRACES))
    ap.add_argument("--table", default="findings.md", help="file name of the table in OUT")
    ap.add_argument("--skip-existing", action="store_true",
                    help="tabulate cells that already have a results.json without rerunning")
    args = ap.parse_args()
    out = Path(args.out)
    lines = ["| workload / model / hosts | best static | gyges goodput req/s | gyges tok/s | "
             "gyges failed | merges | goodput vs best static | tok/s vs best static | "
             "vs best of rr/llf | vs flying | vs shift | vs loongserve |",
             "|---" * 12 + "|"]
    for wl in args.workloads.split(","):
        if not Path(TRACES[wl]).exists():
            print(f"skip {wl}: no trace", file=sys.stderr)
            continue
        for model in args.models.split(","):
            for hosts in map(int, args.hosts.split(",")):
                name = f"{wl}-{model}-{hosts}h"
                cell = out / name
                t0 = time.perf_counter()
                if args.skip_existing and (cell / "results.json").exists():
                    lines.append(row(name, json.loads((cell / "results.json").read_text())))
                    continue
                subprocess.run([sys.executable, "-m", "gyges.sim", "run", "--trace",
                                TRACES[wl], "--model", model, "--gpu", "h100", "--hosts",
                                str(hosts), "--gpus-per-host", "8", "--policy", "all",
                                "--no-plots", "--out", str(cell)], check=True)
                print(f"{name}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
                lines.append(row(name, json.loads((cell / "results.json").read_text())))
    (out / args.table).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
