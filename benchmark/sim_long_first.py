"""The merged instances' long-first admission in the simulator, on one cell.

    PYTHONPATH=python python benchmark/sim_long_first.py [--model qwen2.5-32b] [--hosts 1]

Runs the ``gyges`` policy on the Mooncake conversation trace (8 H100 per host) four times:
as shipped (a merged instance admits the long request at its queue's head first and
retracts short running ones, each at most once, ``core/preemption.plan_retraction``); with
retraction unbounded (as before 2026-12-07 evening); long-first order without any
retraction; and with that admission off (the simulator's ``ElasticKind.long_first`` forced
False: first come, first served). Prints throughput, goodput, TTFT p50 and the
retractions summed over every instance.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import gyges.sim.instance as sim_instance
import gyges.sim.policies as sim_policies
from gyges.sim import cli

TRACE = "/work/shared/traces/mooncake_conversation_trace.jsonl"


VARIANTS = {"shipped": (True, 1), "unbounded": (True, 10**9), "no-retraction": (True, 0),
            "fifo": (False, 0)}


def run(model: str, hosts: int, variant: str) -> dict:
    long_first, bound = VARIANTS[variant]
    instances: list = []
    init, kind = sim_instance.Instance.__init__, sim_policies.ElasticKind
    plan = sim_instance.plan_retraction

    def counting_init(self, *a, **k) -> None:
        init(self, *a, **k)
        instances.append(self)

    def elastic_kind(*a, **k):
        k["long_first"] = k.get("long_first", False) and long_first
        return kind(*a, **k)

    sim_instance.Instance.__init__ = counting_init
    sim_policies.ElasticKind = elastic_kind
    sim_instance.plan_retraction = lambda short, running: plan(short, running, bound)
    try:
        with tempfile.TemporaryDirectory() as out:
            cli.main(["run", "--trace", TRACE, "--model", model, "--gpu", "h100", "--hosts",
                      str(hosts), "--gpus-per-host", "8", "--policy", "gyges", "--no-plots",
                      "--out", out])
            res = json.loads((Path(out) / "results.json").read_text())["policies"]["gyges"]
    finally:
        sim_instance.Instance.__init__, sim_policies.ElasticKind = init, kind
        sim_instance.plan_retraction = plan
    return {"admission": variant, "throughput_tok_s": round(res["throughput_tok_s"]),
            "goodput_req_s": res["goodput_req_s"], "ttft_p50_s": res["ttft_p50_ms"] / 1e3,
            "merges": res["merges"], "retracted": sum(i.retracted for i in instances)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen2.5-32b")
    ap.add_argument("--hosts", type=int, default=1)
    args = ap.parse_args()
    for variant in VARIANTS:
        print(json.dumps(run(args.model, args.hosts, variant)), flush=True)


if __name__ == "__main__":
    main()
