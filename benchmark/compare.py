"""Gyges against static SGLang configurations on the same scaled trace, one after another.

    python benchmark/compare.py [--configs dp,tp,mix,gyges-gyges,...] [--num-ranks 2] \
        [--trace TRACE.{csv,jsonl}] [--out benchmark/results]

Each configuration is started on CPU with the project's tiny model
(``gyges.testing.server.SGLangServer``), replayed with benchmark/replay.py, and stopped;
at the end ``compare.md`` (table, ratios, machine, exact commands) and three PNGs are
written to ``--out``, next to one ``<config>.json`` per configuration (records, topology
samples, scheduler counters). ``--render-only`` rebuilds the report from those files.

Every rank gets the same KV memory: ``--max-total-tokens`` slots per TP1 replica, so a
static TP-k instance is launched with k times that (its KV heads are split k ways).
Without ``--trace`` a built-in long-tailed trace is generated (traces.synthetic_long_tail).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shlex
import sys
import time
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import NamedTuple

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_report import render_markdown  # noqa: E402
from replay import replay  # noqa: E402
from traces import TraceRequest, cap_need, read_trace, scale, synthetic_long_tail  # noqa: E402

POLICIES = ("gyges", "round_robin", "llf")
RESULTS = Path(__file__).resolve().parent / "results"
CLIENT_NOTE = """\
SGLang's own benchmark client works against a Gyges server unchanged; the server test
`tests/server/test_foundation.py::test_sglang_bench_serving_client` runs it on every full
test run (8 prompts, all completed, every output token accounted for):

```
python -m sglang.bench_serving --backend sglang --base-url http://127.0.0.1:PORT \\
    --dataset-name random-ids --tokenizer <tiny model dir> --num-prompts 8 \\
    --random-input-len 32 --random-output-len 8 --random-range-ratio 1 \\
    --disable-tqdm --warmup-requests 1 --output-file bench.jsonl
```

(`<tiny model dir>` is what `gyges.testing.server.tiny_model(LLAMA_GQA)` returns, under
`.gyges-cache/models/`.)"""


class Config(NamedTuple):
    name: str
    dp: int
    tp: int
    policy: str | None  # None: stock SGLang
    description: str


def all_configs(num_ranks: int) -> dict[str, Config]:
    n = num_ranks
    out = {"dp": Config("dp", n, 1, None, f"stock SGLang, {n} data-parallel TP1 replicas"),
           "tp": Config("tp", 1, n, None, f"stock SGLang, one TP{n} instance (gloo on CPU)")}
    if n >= 4:
        out["mix"] = Config("mix", n // 2, 2, None, f"stock SGLang, {n // 2} TP2 replicas")
    for p in POLICIES:
        out[f"gyges-{p}"] = Config(f"gyges-{p}", n, 1, p,
                                   f"Gyges, {n} TP1 replicas that merge on demand, "
                                   f"policy {p}")
    return out


def server_for(cfg: Config, model: Path, per_rank_tokens: int, hold_down_s: float,
               startup_timeout_s: float = 300.0):
    from gyges.testing.server import SGLangServer

    extra = [] if cfg.policy is None else ["--gyges-policy", cfg.policy,
                                           "--gyges-split-hold-down", f"{hold_down_s:g}"]
    return SGLangServer(model, dp_size=cfg.dp, tp_size=cfg.tp, gyges=cfg.policy is not None,
                        max_total_tokens=per_rank_tokens * cfg.tp, extra_args=extra,
                        startup_timeout_s=startup_timeout_s)


def command_line(srv) -> str:
    env = {k: srv.env[k] for k in ("SGLANG_USE_CPU_ENGINE", "SGLANG_CPU_OMP_THREADS_BIND",
                                   "OMP_NUM_THREADS", "SGLANG_PLUGINS") if k in srv.env}
    return " ".join([*(f"{k}={shlex.quote(v)}" for k, v in env.items()), shlex.join(srv.args)])


def scheduler_counters(url: str) -> dict | None:
    try:
        r = requests.get(url + "/gyges/status", timeout=30)
        return r.json()["scheduler"]["counters"] if r.status_code == 200 else None
    except (requests.RequestException, KeyError, ValueError):
        return None


def run_config(cfg: Config, model: Path, trace: list[TraceRequest], a) -> dict:
    srv = server_for(cfg, model, a.max_total_tokens, a.split_hold_down, a.startup_timeout)
    run = {"config": cfg.name, "description": cfg.description, "command": command_line(srv),
           "start_error": None, "invocation": a.invocation, "date": now(),
           "load_before": round(os.getloadavg()[0], 2)}
    print(f"[compare] {cfg.name}: starting ({run['command']})", flush=True)
    t = time.monotonic()
    try:
        srv.start()
    except (RuntimeError, TimeoutError) as e:
        lines = [x for x in str(e).splitlines() if x.strip()] or [type(e).__name__]
        run["start_error"] = (" ... ".join(dict.fromkeys([lines[0], lines[-1]]))
                              + f" (log: {srv.log_path})")
        print(f"[compare] {cfg.name}: did not start: {e}", flush=True)
        return run
    except BaseException:
        srv.stop()
        raise
    try:
        run["startup_s"] = round(time.monotonic() - t, 1)
        run["command"] = command_line(srv)  # the port changes if startup lost its race
        print(f"[compare] {cfg.name}: up after {run['startup_s']:.0f} s; replaying "
              f"{len(trace)} requests", flush=True)
        res = asyncio.run(replay(srv.url, trace, seed=a.seed, timeout_s=a.request_timeout))
        run["counters"] = scheduler_counters(srv.url) if cfg.policy else None
    finally:
        srv.stop()
    recs = res["records"]
    run |= {"duration_s": res["duration_s"], "topology": res["topology"],
            "records": [asdict(r) | {"tpot_s": r.tpot_s} for r in recs],
            "server_log": str(srv.log_path), "load_after": round(os.getloadavg()[0], 2)}
    failed = sum(r.error is not None for r in recs)
    print(f"[compare] {cfg.name}: {len(recs) - failed}/{len(recs)} completed in "
          f"{res['duration_s']:.1f} s", flush=True)
    return run


def build_trace(a) -> tuple[list[TraceRequest], str]:
    if a.trace:
        raw, what = read_trace(a.trace), f"{a.trace}"
    else:
        raw = synthetic_long_tail(a.num_requests, seed=a.seed)
        what = f"synthetic_long_tail(n={a.num_requests}, seed={a.seed})"
    trace = scale(raw, time_scale=a.time_scale, length_scale=a.length_scale,
                  max_requests=a.num_requests)
    max_need = a.num_ranks * usable(a.max_total_tokens)
    trace = cap_need(trace, max_need)
    n_long = sum(r.input_len + r.output_len > usable(a.max_total_tokens) for r in trace)
    what += (f", first {len(trace)} requests, time x{a.time_scale:g}, lengths "
             f"x{a.length_scale:g}, input + output capped at {max_need} (the largest "
             f"instance's usable KV slots); {n_long} need more than one replica's "
             f"{usable(a.max_total_tokens)} slots; {trace[-1].arrival_s:.0f} s of arrivals")
    return trace, what


def usable(replica_tokens: int, page_size: int = 1) -> int:
    """One replica's usable KV slots as Gyges counts them (docs/scheduling.md)."""
    return replica_tokens - max(2 * page_size, 8)


def now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def machine() -> str:
    return f"{os.cpu_count()} CPUs, {platform.platform()}, Python {platform.python_version()}"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="all",
                   help="comma-separated: dp, tp, mix (num-ranks >= 4), gyges-gyges, "
                        "gyges-round_robin, gyges-llf; default all")
    p.add_argument("--num-ranks", type=int, default=2, choices=(2, 4))
    p.add_argument("--max-total-tokens", type=int, default=1024, help="KV slots per rank")
    p.add_argument("--trace", default=None, help=".csv (Azure) or .jsonl (Mooncake); "
                   "default: a built-in synthetic long-tailed trace")
    p.add_argument("--num-requests", type=int, default=48)
    p.add_argument("--time-scale", type=float, default=6.0)
    p.add_argument("--length-scale", type=float, default=0.25)
    p.add_argument("--slo-ttft-ms", type=float, default=2000.0)
    p.add_argument("--slo-tpot-ms", type=float, default=200.0)
    p.add_argument("--split-hold-down", type=float, default=2.0)
    p.add_argument("--request-timeout", type=float, default=600.0, help="seconds")
    p.add_argument("--startup-timeout", type=float, default=300.0, help="seconds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--note", default=None, help="a line printed under the report's header")
    p.add_argument("--render-only", action="store_true",
                   help="rebuild compare.md and the plots from --out/*.json")
    return p.parse_args(argv)


def selected(a: argparse.Namespace) -> list[Config]:
    configs = all_configs(a.num_ranks)
    if a.configs == "all":
        return list(configs.values())
    names = [c.strip() for c in a.configs.split(",") if c.strip()]
    unknown = [c for c in names if c not in configs]
    if unknown:
        raise SystemExit(f"unknown configuration(s) {unknown}; choose from {list(configs)}")
    return [configs[c] for c in names]


def write_report(runs: list[dict], a: argparse.Namespace, saved: dict) -> Path:
    from compare_plots import write_plots

    meta = saved | {"slo_ttft_s": a.slo_ttft_ms / 1000, "slo_tpot_s": a.slo_tpot_ms / 1000,
                    "plots": write_plots(runs, a.out), "note": a.note or saved.get("note"),
                    "replica_usable": usable(a.max_total_tokens), "client_note": CLIENT_NOTE}
    path = a.out / "compare.md"
    path.write_text(render_markdown(runs, meta))
    return path


def model_for(num_ranks: int) -> Path:
    """The cached tiny Llama: 2 KV heads for N=2, 4 for N=4 (so TP4 splits the heads)."""
    from gyges.testing.server import tiny_model
    from gyges.testing.tiny_model import LLAMA_GQA, TinyModelSpec

    return tiny_model(LLAMA_GQA if num_ranks == 2 else
                      TinyModelSpec(arch="llama", heads=4, kv_heads=4))


def run_all(configs: list[Config], a: argparse.Namespace, saved: dict) -> list[dict]:
    model = model_for(a.num_ranks)
    trace, _ = build_trace(a)
    runs = []
    for cfg in configs:
        try:
            run = run_config(cfg, model, trace, a)
        except KeyboardInterrupt:
            print(f"[compare] interrupted during {cfg.name}: reporting what ran", flush=True)
            saved["note"] = (saved.get("note") or "") + f" Interrupted during {cfg.name}."
            break
        (a.out / f"{cfg.name}.json").write_text(json.dumps(run, indent=1))
        runs.append(run)
    return runs


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    a.invocation = shlex.join(["python", "benchmark/compare.py",
                               *(sys.argv[1:] if argv is None else argv)])
    a.out.mkdir(parents=True, exist_ok=True)
    configs = selected(a)
    meta_path = a.out / "compare-meta.json"
    if a.render_only:
        saved = json.loads(meta_path.read_text())
        runs = [json.loads((a.out / f"{c.name}.json").read_text()) for c in configs
                if (a.out / f"{c.name}.json").exists()]
    else:
        saved = {"trace": build_trace(a)[1], "machine": machine(), "note": a.note,
                 "date": now()}
        meta_path.write_text(json.dumps(saved, indent=1))
        runs = run_all(configs, a, saved)
        meta_path.write_text(json.dumps(saved, indent=1))
    print(f"[compare] report: {write_report(runs, a, saved)}", flush=True)
    return 0 if runs else 1


if __name__ == "__main__":
    raise SystemExit(main())
