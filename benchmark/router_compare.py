"""Router placement policies side by side on live Gyges hosts, one trace, one run.

    PYTHONPATH=python python benchmark/router_compare.py [--hosts 2] [--policies gyges,...] \
        [--prev-router DIR] [--out benchmark/results/router_compare]

Starts ``--hosts`` Gyges servers (dp 2, the tiny Llama, ``--max-total-tokens`` slots per
replica) once, then for each router policy starts ``python -m gyges.router`` in front of
them, replays the same scaled long-tailed trace through it (benchmark/replay.py) and stops
it. Between policies the hosts are given time to split back (bounded). ``--prev-router DIR``
adds a run of the router from another checkout's ``python/`` directory (``gyges@prev``), so
a placement change is measured against the code before it on the same servers.

Writes ``router_compare.json`` (per policy: summary, host scheduler counters before/after,
the router's placements by reason) and ``router_compare.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare import usable  # noqa: E402
from replay import replay, summarize  # noqa: E402
from traces import cap_need, scale, synthetic_long_tail  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ROUTER_POLICIES = ("gyges", "least_load", "round_robin")


class Router:
    """``python -m gyges.router`` in its own process group, from ``python_dir``."""

    def __init__(self, urls: list[str], policy: str, python_dir: Path) -> None:
        from gyges.testing.server import free_port

        self.url = f"http://127.0.0.1:{free_port()}"
        self.log = tempfile.NamedTemporaryFile(prefix="gyges-router-", suffix=".log",
                                               delete=False)
        env = dict(os.environ, PYTHONPATH=str(python_dir))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gyges.router", "--worker-urls", *urls, "--host",
             "127.0.0.1", "--port", self.url.rsplit(":", 1)[1], "--policy", policy,
             "--status-interval-secs", "0.25", "--health-check-interval-secs", "1"],
            env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                stats = requests.get(self.url + "/workers", timeout=5).json()["stats"]
                if stats["healthy_count"] == len(urls):
                    return
            except (requests.RequestException, KeyError, ValueError):
                pass
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"router did not see every worker healthy; log {self.log.name}")

    def placements(self) -> dict[str, int]:
        """Placements by reason, read from the router's /metrics."""
        out: dict[str, int] = {}
        text = requests.get(self.url + "/metrics", timeout=10).text
        for line in text.splitlines():
            if line.startswith("gyges_router_placements_total{"):
                labels, value = line.rsplit(" ", 1)
                reason = labels.split('reason="', 1)[1].split('"', 1)[0]
                out[reason] = out.get(reason, 0) + int(float(value))
        return out

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=15)
        self.log.close()


def counters(url: str) -> dict:
    c = requests.get(url + "/gyges/status", timeout=30).json()["scheduler"]["counters"]
    return {"merges": sum(c["auto_merges"].values()), "splits": sum(c["auto_splits"].values())}


def wait_split_back(urls: list[str], timeout_s: float) -> bool:
    """True once every host is back to TP1 replicas with nothing running (bounded)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            states = [requests.get(u + "/gyges/status", timeout=10).json() for u in urls]
            if all(i["tp"] == 1 and not i.get("running") and not i.get("waiting")
                   for s in states for i in s["instances"]):
                return True
        except (requests.RequestException, KeyError, ValueError):
            pass
        time.sleep(0.5)
    return False


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hosts", type=int, default=2)
    p.add_argument("--policies", default=",".join(ROUTER_POLICIES))
    p.add_argument("--prev-router", type=Path, default=None,
                   help="another checkout's python/ directory: adds a 'gyges@prev' run")
    p.add_argument("--max-total-tokens", type=int, default=1024, help="KV slots per replica")
    p.add_argument("--num-requests", type=int, default=96)
    p.add_argument("--time-scale", type=float, default=3.0)
    p.add_argument("--length-scale", type=float, default=0.25)
    p.add_argument("--split-hold-down", type=float, default=2.0)
    p.add_argument("--slo-ttft-ms", type=float, default=2000.0)
    p.add_argument("--slo-tpot-ms", type=float, default=200.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=ROOT / "benchmark/results/router_compare")
    return p.parse_args(argv)


def run_policy(name: str, policy: str, python_dir: Path, urls: list[str], trace, a) -> dict:
    before = [counters(u) for u in urls]
    router = Router(urls, policy, python_dir)
    try:
        print(f"[router_compare] {name}: replaying {len(trace)} requests", flush=True)
        res = asyncio.run(replay(router.url, trace, seed=a.seed, timeout_s=600))
        placements = router.placements()
    finally:
        router.stop()
    after = [counters(u) for u in urls]
    summary = summarize(res["records"], res["duration_s"], a.slo_ttft_ms / 1000,
                        a.slo_tpot_ms / 1000)
    return {"name": name, "router_policy": policy, "python_dir": str(python_dir),
            "summary": summary, "placements": placements,
            "merges": sum(x["merges"] - y["merges"] for x, y in zip(after, before, strict=True)),
            "router_log": router.log.name}


def render(runs: list[dict], meta: dict) -> str:
    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v * 1000:.0f}"

    lines = ["# Router placement policies on live Gyges hosts", "",
             *(f"- {k}: {v}" for k, v in meta.items()), "",
             "| policy | completed | failed | goodput req/s (good) | throughput tok/s | "
             "TTFT p50/p99 ms | TPOT p50/p99 ms | host merges | placements |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        s = r["summary"]
        placed = ", ".join(f"{k} {v}" for k, v in sorted(r["placements"].items()))
        lines.append(
            f"| {r['name']} | {s['completed']} | {s['failed']} | {s['goodput_req_s']:.3f} "
            f"({s['good']}) | {s['output_throughput_tok_s']:.1f} | {ms(s['ttft_p50_s'])} / "
            f"{ms(s['ttft_p99_s'])} | {ms(s['tpot_p50_s'])} / {ms(s['tpot_p99_s'])} | "
            f"{r['merges']} | {placed} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from gyges.testing.server import SGLangServer, tiny_model

    a = parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    replica = usable(a.max_total_tokens)
    raw = synthetic_long_tail(a.num_requests, seed=a.seed)
    trace = cap_need(scale(raw, time_scale=a.time_scale, length_scale=a.length_scale,
                           max_requests=a.num_requests), 2 * replica)
    n_long = sum(r.input_len + r.output_len > replica for r in trace)
    runs_to_do = [(p, p, ROOT / "python") for p in a.policies.split(",") if p]
    if a.prev_router is not None:
        runs_to_do.append(("gyges@prev", "gyges", a.prev_router.resolve()))
    servers = [SGLangServer(tiny_model(), dp_size=2, gyges=True,
                            max_total_tokens=a.max_total_tokens,
                            extra_args=["--gyges-split-hold-down", f"{a.split_hold_down:g}"])
               for _ in range(a.hosts)]
    runs = []
    try:
        for srv in servers:
            srv.start()
        urls = [s.url for s in servers]
        for name, policy, pdir in runs_to_do:
            if not wait_split_back(urls, 60):
                print(f"[router_compare] hosts did not split back before {name}", flush=True)
            runs.append(run_policy(name, policy, pdir, urls, trace, a))
            s = runs[-1]["summary"]
            print(f"[router_compare] {name}: goodput {s['goodput_req_s']:.3f} req/s, "
                  f"{s['completed']}/{s['requests']} completed", flush=True)
    finally:
        for srv in servers:
            srv.stop()
    meta = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": f"{os.cpu_count()} CPUs, {platform.platform()}",
            "command": shlex.join(["python", "benchmark/router_compare.py",
                                   *(sys.argv[1:] if argv is None else argv)]),
            "hosts": f"{a.hosts} x Gyges dp 2 (tiny Llama, {a.max_total_tokens} KV slots per "
                     f"replica, host scheduler policy gyges, hold-down {a.split_hold_down:g} s)",
            "trace": f"synthetic_long_tail(n={a.num_requests}, seed={a.seed}), time "
                     f"x{a.time_scale:g}, lengths x{a.length_scale:g}; {n_long} need more than "
                     f"one replica ({replica} slots); {trace[-1].arrival_s:.0f} s of arrivals",
            "SLOs": f"TTFT <= {a.slo_ttft_ms:g} ms, TPOT <= {a.slo_tpot_ms:g} ms"}
    (a.out / "router_compare.json").write_text(json.dumps({"meta": meta, "runs": runs},
                                                          indent=1))
    (a.out / "router_compare.md").write_text(render(runs, meta))
    print(render(runs, meta))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
