"""Merges and splits with streams in flight, a fault injected in some of them: what happens
to every request, and how fast a fault is detected.

    PYTHONPATH=python python benchmark/fault_bench.py [--runs 6] [--faulty 3] [--streams 4]

Each run starts a fresh dp 2 Gyges server (tiny Llama, float32, CPU), starts `--streams`
greedy streams, then merges and splits back. In `--faulty` of the runs (spread evenly) a
fault is injected through ``GYGES_FAULT_INJECT`` in one phase of the merge or split,
cycling through prepare, exchange, kv_move, weight_release, install, weight_restore and a
SIGKILL. Every stream ends as one of:

- completed: finished by length, output equal to the same prompt's output without faults;
- aborted: ended with an error that names the cause ("transformation failed on rank r" or
  a refused merge's reason);
- cut: its connection ended with the server's exit, after the server reported the failure;
- lost: anything else (no reply, a wrong output, an unexplained error). Goal: 0.

Detection time: from the transformation call to its error reply (a 409 or 500). Prints a
table and writes JSON with `--out`.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import threading
import time
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))

from gyges.testing.clients import stream_generate  # noqa: E402
from gyges.testing.server import SGLangServer, tiny_model  # noqa: E402
from gyges.testing.tiny_model import LLAMA_GQA  # noqa: E402

FAULTS = ("merge:prepare:1", "merge:exchange:1", "merge:kv_move:1",
          "merge:weight_release:1", "merge:install:0", "split:weight_restore:1",
          "merge:kv_move:1:kill")
REASON = "transformation failed on rank"


def _prompts(n: int) -> list[list[int]]:
    return [[(7 * i + 13 * j) % 300 + 5 for j in range(9 + 11 * i)] for i in range(n)]


def _stream(url: str, prompt: list[int], tokens: int, out: dict) -> None:
    chunks: list[dict] = []
    try:
        stream_generate(url, prompt, tokens, chunks=chunks)
    except Exception as e:  # noqa: BLE001 - classified below
        out["error"] = f"{type(e).__name__}: {e}"
    out["chunks"] = chunks


def _classify(out: dict, want: list[int], server_failed: bool) -> str:
    last = out["chunks"][-1] if out.get("chunks") else {}
    finish = (last.get("meta_info") or {}).get("finish_reason") or {}
    if finish.get("type") == "length":
        return "completed" if last.get("output_ids") == want else "lost"
    if REASON in json.dumps(last) or REASON in out.get("error", ""):
        return "aborted"
    if server_failed and "error" in out:
        return "cut"
    return "lost"


def one_run(fault: str | None, streams: int, tokens: int, ref: list[list[int]]) -> dict:
    srv = SGLangServer(tiny_model(LLAMA_GQA), dp_size=2, gyges=True)
    if fault:
        srv.env["GYGES_FAULT_INJECT"] = fault
        srv.env["GYGES_EXIT_GRACE_S"] = "4"
    with srv:
        op = fault.split(":")[0] if fault else "merge"
        if op == "split":
            requests.post(srv.url + "/gyges/merge", json={"ranks": [0, 1]}, timeout=120)
        outs = [{} for _ in range(streams)]
        threads = [threading.Thread(target=_stream, args=(srv.url, p, tokens, o), daemon=True)
                   for p, o in zip(_prompts(streams), outs, strict=True)]
        for t in threads:
            t.start()
        time.sleep(1.0)
        results = []
        for step in ([op] if op == "split" else ["merge", "split"]):
            t0 = time.monotonic()
            try:
                r = requests.post(f"{srv.url}/gyges/{step}", json={"ranks": [0, 1]},
                                  timeout=120)
                status, body = r.status_code, r.json()
            except requests.RequestException as e:
                status, body = 0, {"error": str(e)}
            results.append((step, status, time.monotonic() - t0, body))
            if status != 200:
                break
        for t in threads:
            t.join(timeout=120)
        failed = any(s == 500 for _, s, _, _ in results)
        kinds = [_classify(o, w, failed) for o, w in zip(outs, ref, strict=True)]
        if srv.proc is not None and failed:
            srv.proc.wait(timeout=60)
    errors = [(s, st, round(t, 2)) for s, st, t, _ in results if st != 200]
    return {"fault": fault, "calls": [(s, st, round(t, 2)) for s, st, t, _ in results],
            "detect_s": errors[0][2] if errors else None,
            **{k: kinds.count(k) for k in ("completed", "aborted", "cut", "lost")}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=int, default=6)
    p.add_argument("--faulty", type=int, default=3)
    p.add_argument("--streams", type=int, default=4)
    p.add_argument("--tokens", type=int, default=150)
    p.add_argument("--out", type=Path)
    a = p.parse_args()
    if not 0 <= a.faulty <= a.runs or a.runs < 1 or a.streams < 1:
        p.error("need runs >= 1, 0 <= faulty <= runs, streams >= 1")
    with SGLangServer(tiny_model(LLAMA_GQA), dp_size=2, gyges=True) as srv:
        ref = [stream_generate(srv.url, q, a.tokens)[-1]["output_ids"]
               for q in _prompts(a.streams)]
    every = a.runs / a.faulty if a.faulty else 0
    faulty_runs = {int(i * every) for i in range(a.faulty)}
    rows = []
    for run in range(a.runs):
        fault = FAULTS[len(rows) % len(FAULTS)] if run in faulty_runs else None
        row = one_run(fault, a.streams, a.tokens, ref)
        rows.append(row)
        print(json.dumps(row), flush=True)
    total = {k: sum(r[k] for r in rows) for k in ("completed", "aborted", "cut", "lost")}
    print(f"\n{a.runs} runs ({a.faulty} with a fault), {a.streams} streams each: {total}")
    print("| fault | calls (op, status, s) | detected in s | completed | aborted | cut | lost |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['fault'] or '-'} | {r['calls']} | {r['detect_s'] or '-'} | "
              f"{r['completed']} | {r['aborted']} | {r['cut']} | {r['lost']} |")
    if a.out:
        a.out.write_text(json.dumps({"machine": platform.platform(), "cpus": os.cpu_count(),
                                     "runs": rows, "total": total}, indent=1))


if __name__ == "__main__":
    main()
