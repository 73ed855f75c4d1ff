"""A merge asked while a long prompt is being prefilled in chunks: how long the merge takes,
with the chunked prefill parked (the default since 2026-12-06) and waited for (as before),
side by side on one server.

    PYTHONPATH=python python benchmark/chunked_merge.py [--rounds 3] [--out FILE]

One dp 2 Gyges server (tiny Llama, float32, CPU, ``--chunked-prefill-size 128``), with
``GYGES_PARK_CHUNKED_PREFILL`` read from a file at each check. Each round and mode: a
long prompt streams on replica 0 (a new prompt each time: no cache hit), a short stream
decodes on replica 1, and ``POST /gyges/merge`` comes ``--delay`` seconds later, during
the prefill. Reported per mode: the merge's reply time (``elapsed_ms.total_ms``, the
readiness wait included) and its ``wait_ready_ms``, whether it parked the prefill, and the
long request's time to first token (parking must not delay it). The host is split back
before the next round.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))

from gyges.testing.clients import split_all, stream_generate  # noqa: E402
from gyges.testing.server import SGLangServer, tiny_model  # noqa: E402

CHUNK = 128


def _long(n: int, seed: int) -> list[int]:
    return [(31 * j + 97 * seed) % 600 + 410 for j in range(n)]


def _round(url: str, prompt: list[int], delay: float) -> dict:
    """One merge during the prefill of ``prompt`` (replica 0), a short stream on replica
    1; returns the merge's figures and the long request's TTFT."""
    long_out: list[dict] = []
    short_out: list[dict] = []
    t0 = time.perf_counter()
    first: list[float] = []

    def run_long() -> None:
        stream_generate(url, prompt, 8, chunks=long_out, extra={"routed_dp_rank": 0})

    def watch() -> None:
        while not long_out and time.perf_counter() - t0 < 300:
            time.sleep(0.005)
        first.append(time.perf_counter() - t0)

    threads = [threading.Thread(target=run_long), threading.Thread(target=watch),
               threading.Thread(target=stream_generate, args=(url, [5, 6, 7], 300),
                                kwargs={"chunks": short_out,
                                        "extra": {"routed_dp_rank": 1}})]
    for t in threads:
        t.start()
    time.sleep(delay)
    r = requests.post(url + "/gyges/merge", json={"ranks": [0, 1]}, timeout=180)
    r.raise_for_status()
    body = r.json()
    for t in threads:
        t.join(timeout=300)
    split_all(url)
    return {"merge_total_ms": body["elapsed_ms"]["total_ms"],
            "wait_ready_ms": body["elapsed_ms"].get("wait_ready_ms", 0.0),
            "parked": body["requests_moved"].get("chunked_prefills", 0),
            "long_ttft_s": round(first[0], 3) if first else None}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--prompt", type=int, default=8000, help="long prompt tokens")
    p.add_argument("--delay", type=float, default=0.5, help="seconds before the merge")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    knob = Path(tempfile.mkstemp(prefix="gyges-park-")[1])
    srv = SGLangServer(tiny_model(), dp_size=2, gyges=True, max_total_tokens=16384,
                       extra_args=("--chunked-prefill-size", str(CHUNK)))
    srv.env["GYGES_PARK_CHUNKED_PREFILL"] = f"@{knob}"
    runs: dict[str, list[dict]] = {"park": [], "wait": []}
    with srv:
        seed = 0
        for _ in range(args.rounds):
            for mode in ("park", "wait"):
                knob.write_text("1" if mode == "park" else "0")
                seed += 1
                runs[mode].append(_round(srv.url, _long(args.prompt, seed), args.delay))
                print(mode, runs[mode][-1], flush=True)

    def median(mode: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[mode])

    result = {"machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
              "command": "PYTHONPATH=python python benchmark/chunked_merge.py "
                         f"--rounds {args.rounds} --prompt {args.prompt} --delay {args.delay}",
              "chunked_prefill_size": CHUNK, "runs": runs,
              "merge_ms_park": median("park", "merge_total_ms"),
              "merge_ms_wait": median("wait", "merge_total_ms"),
              "merge_wait_over_park": round(median("wait", "merge_total_ms")
                                            / median("park", "merge_total_ms"), 2),
              "long_ttft_park_over_wait": round(median("park", "long_ttft_s")
                                                / median("wait", "long_ttft_s"), 3)}
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
