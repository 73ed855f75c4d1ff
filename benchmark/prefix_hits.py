"""Prefix-cache hits on a multi-turn chat trace, with a merge or split every few seconds
against none, side by side in one run.

    PYTHONPATH=python python benchmark/prefix_hits.py [--requests 160] [--every 2.0]
        [--trace ../shared/traces/mooncake_conversation_trace.jsonl] [--out FILE]

Prompts come from the Mooncake conversation trace's ``hash_ids``: each id is one shared
block (512 tokens in the trace, ``--block`` tokens here, the same pseudo-random tokens
wherever the id recurs), so turns of one conversation and a common system prompt share
their prefix blocks as in the trace. Without the trace (it is not part of the project) a
synthetic one with the same shape is used. One dp 2 Gyges server (tiny Llama, float32,
CPU). Pass 1 sends the requests (4 at a time, 4 new tokens each) with no transformation;
the cache is flushed; pass 2 sends them again while an admin merges and splits the host
every ``--every`` seconds. Hit rate = sum of ``meta_info.cached_tokens`` / sum of prompt
tokens. Goal: pass 2 keeps at least 90% of pass 1's hits.
"""
from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))

from gyges.testing.server import SGLangServer, tiny_model  # noqa: E402

DEFAULT_TRACE = Path(__file__).resolve().parents[2] / "shared/traces/" \
    "mooncake_conversation_trace.jsonl"


def _hash_lists(path: Path, n: int) -> list[list[int]]:
    if path.exists():
        with path.open() as f:
            return [json.loads(line)["hash_ids"] for _, line in zip(range(n), f, strict=False)]
    rng, out, convs = random.Random(0), [], []  # synthetic: system prompt + growing chats
    for _ in range(n):
        if not convs or rng.random() < 0.3:
            convs.append([0, *(rng.randrange(1, 10**6) for _ in range(rng.randrange(1, 4)))])
        c = rng.choice(convs)
        c.extend(rng.randrange(1, 10**6) for _ in range(rng.randrange(1, 3)))
        out.append(list(c))
    return out


def _prompt(hashes: list[int], block: int) -> list[int]:
    ids: list[int] = []
    for h in hashes:
        rng = random.Random(h)
        ids += [rng.randrange(5, 1000) for _ in range(block)]
    return ids


def _send(url: str, ids: list[int]) -> int:
    r = requests.post(url + "/generate", timeout=300, json={
        "input_ids": ids, "sampling_params": {"temperature": 0, "max_new_tokens": 4}})
    r.raise_for_status()
    return int(r.json()["meta_info"].get("cached_tokens", 0))


def _pass(url: str, prompts: list[list[int]]) -> float:
    with ThreadPoolExecutor(4) as pool:
        hits = list(pool.map(lambda p: _send(url, p), prompts))
    return sum(hits) / sum(len(p) for p in prompts)


def _transformer(url: str, every: float, stop: threading.Event, log: list[str]) -> None:
    while not stop.wait(every):
        st = requests.get(url + "/gyges/status", timeout=30).json()
        op = "split" if len(st["instances"]) == 1 else "merge"
        r = requests.post(f"{url}/gyges/{op}", json={"ranks": [0, 1]}, timeout=120)
        log.append(f"{op}:{r.status_code}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--trace", type=Path, default=DEFAULT_TRACE)
    p.add_argument("--requests", type=int, default=160)
    p.add_argument("--block", type=int, default=16)
    p.add_argument("--every", type=float, default=2.0)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    prompts = [_prompt(h, args.block) for h in _hash_lists(args.trace, args.requests)]
    with SGLangServer(tiny_model(), dp_size=2, gyges=True, max_total_tokens=16384,
                      extra_args=("--gyges-policy", "round_robin")) as srv:
        base = _pass(srv.url, prompts)
        requests.post(srv.url + "/flush_cache", timeout=60).raise_for_status()
        stop, log = threading.Event(), []
        t = threading.Thread(target=_transformer, args=(srv.url, args.every, stop, log))
        t.start()
        t0 = time.monotonic()
        moving = _pass(srv.url, prompts)
        stop.set()
        t.join(timeout=300)
        elapsed = time.monotonic() - t0
    done = [x for x in log if x.endswith(":200")]
    result = {"machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
              "command": f"PYTHONPATH=python python benchmark/prefix_hits.py --requests "
                         f"{args.requests} --block {args.block} --every {args.every}",
              "trace": str(args.trace) if args.trace.exists() else "synthetic",
              "prompt_tokens": sum(len(p) for p in prompts),
              "hit_rate_no_transformation": round(base, 4),
              "hit_rate_with_transformations": round(moving, 4),
              "ratio": round(moving / base, 4) if base else None,
              "transformations": len(done), "transformation_calls": log,
              "pass_s": round(elapsed, 1), "goal": "ratio >= 0.9"}
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
