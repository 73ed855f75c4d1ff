"""A long request that needs a merge, with and without structured-output load on every
replica: its time to first token in both cases, side by side in one run.

    PYTHONPATH=python python benchmark/blocked_merge.py [--rounds 3] [--out FILE]

One dp 2 Gyges server (tiny Llama, float32, CPU, 1024 KV slots per replica, the gyges
policy). Each round: the long request alone (1500-token prompt: it fits no replica, so the
scheduler merges), wait for the split back; then four clients keep sending plain requests
(600-token prompts, up to 200 tokens) to both replicas and the same long request is sent
under that load; then the same with JSON-schema requests of those sizes. The plain load is
the control: the issue asks that the long request be placed and completed as if the
structured-output requests were plain ones. Before issue 13 a running grammar request held
every merge (the long request waited for the structured-output traffic to drain: 9.4 s
against 0.6 s); now grammars move with the merge. Goal: TTFT under grammar load within 1.5x
of alone (``median_ratio``); ``grammar_vs_plain`` is grammar load over plain load.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))

from gyges.testing.server import SGLangServer, tiny_model  # noqa: E402

SCHEMA = json.dumps({"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 40}, "items": {
        "type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 12}},
    "required": ["name", "items"]})
LONG = [(31 * j) % 700 + 5 for j in range(1500)]
SLOTS = 1024
LONG_PRIORITY = 100  # above SGLang's preemption threshold (10) over the load's 0


def _ttft(url: str, ids: list[int], new: int = 8, priority: int | None = None) -> float:
    """Seconds to the first streamed token of a greedy request."""
    t0 = time.perf_counter()
    body = {"input_ids": ids, "stream": True,
            "sampling_params": {"temperature": 0, "max_new_tokens": new, "ignore_eos": True},
            **({"priority": priority} if priority is not None else {})}
    first = None
    with requests.post(url + "/generate", json=body, stream=True, timeout=300) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith(b"data:") and first is None and line[5:].strip() != b"[DONE]":
                first = time.perf_counter() - t0
    if first is None:
        raise RuntimeError("no token streamed")
    return first


def _client(url: str, i: int, stop: threading.Event, done: list[int], grammar: bool) -> None:
    n = 0
    while not stop.is_set():
        ids = [(7 * i + 13 * j + n) % 600 + 5 for j in range(600)]
        sampling = {"temperature": 0, "max_new_tokens": 200,
                    **({"json_schema": SCHEMA} if grammar else {})}
        body = {"input_ids": ids, "sampling_params": sampling}
        requests.post(url + "/generate", json=body, timeout=300).raise_for_status()
        n += 1
        done[i] += 1


def _wait_split(url: str, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        st = requests.get(url + "/gyges/status", timeout=30).json()
        if len(st["instances"]) == 2 and st["transformation"] is None:
            return
        time.sleep(0.5)
    raise TimeoutError("the host did not split back")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", type=Path)
    p.add_argument("--priority", action="store_true",
                   help="SGLang's --enable-priority-scheduling, the long request at priority "
                        f"{LONG_PRIORITY} (the load at the default 0): it preempts running "
                        "requests on the merged instance instead of waiting for room")
    args = p.parse_args()
    alone, grammar_done = [], 0
    loaded: dict[bool, list[float]] = {True: [], False: []}
    prio = LONG_PRIORITY if args.priority else None
    extra = ("--gyges-split-hold-down", "2",
             *(("--enable-priority-scheduling",) if args.priority else ()))
    with SGLangServer(tiny_model(), dp_size=2, gyges=True, max_total_tokens=SLOTS,
                      extra_args=extra) as srv:
        for _ in range(args.rounds):
            _wait_split(srv.url)
            alone.append(_ttft(srv.url, LONG, priority=prio))
            for grammar in (False, True):
                _wait_split(srv.url)
                stop, done = threading.Event(), [0] * 4
                clients = [threading.Thread(target=_client,
                                            args=(srv.url, i, stop, done, grammar))
                           for i in range(4)]
                for c in clients:
                    c.start()
                time.sleep(3.0)  # every replica decoding (structured) output
                loaded[grammar].append(_ttft(srv.url, LONG, priority=prio))
                stop.set()
                for c in clients:
                    c.join(timeout=300)
                if grammar:
                    grammar_done += sum(done)
    ratio = statistics.median(loaded[True]) / statistics.median(alone)
    vs_plain = statistics.median(loaded[True]) / statistics.median(loaded[False])
    result = {"machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
              "command": "PYTHONPATH=python python benchmark/blocked_merge.py "
                         f"--rounds {args.rounds}" + " --priority" * args.priority,
              "ttft_alone_s": alone, "ttft_under_plain_load_s": loaded[False],
              "ttft_under_grammar_load_s": loaded[True],
              "median_ratio": round(ratio, 3), "grammar_vs_plain": round(vs_plain, 3),
              "grammar_requests_completed": grammar_done,
              "goal": "median_ratio <= 1.5"}
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
