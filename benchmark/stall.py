"""How long streams in flight stall across a live merge and split, at two KV sizes.

    PYTHONPATH=python python benchmark/stall.py [--dp 2] [--prompt-tokens 525 2100] \
        [--streams 4] [--new-tokens 400] [--out FILE]

One Gyges server per KV size (tiny Llama with wide KV: 8 layers, 8 KV heads x 64, float32,
32 KiB of KV per token; CPU, torch_native, ``--stream-interval 1``). Per replica
``--streams`` greedy streams with prompts of ``--prompt-tokens`` tokens decode while the
replicas merge into one TP-dp instance (dp 4: pairwise, then the pairs) and split back.
Per KV size, from every stream's chunk arrival times:

- typical token gap: per stream, the time between its first and last token outside the
  transformations divided by the tokens in between, then the median over streams (chunks
  arrive in bursts of several tokens, so the median of raw arrival gaps is 0);
- worst gap of any stream overlapping the merge, and overlapping the split;
- stall ratio = worst gap / typical gap;
- the cutover: the switch the members run (``elapsed_ms.merge_ms``/``split_ms`` of the
  reply, after the readiness poll during which they still serve) and its KV move (the
  slowest member's ``kv_transfer_ms``).

Each size runs the same streams twice on one server: stop-the-world (``"precopy": false``
in the merge/split body: the whole KV moves inside the switch) and overlapped (the default:
the KV is pre-copied while the members serve and the switch moves only what changed).
From the members' own clocks (``clock_s`` in each member's reply: when it stopped serving
and when it was done, on the host's monotonic clock, comparable with the client's
``time.perf_counter``):

- pause: first member stopped to last member done, the server side of the stall
  (``pause_steps``: in typical gaps);
- the worst gap cut into before / switch / after (the first steps of the new
  configuration, under the overlap scheduler two of them, and the token's way to the
  client).

Per phase, the slowest member's ``phases_ms`` (where the switch goes).

Issue 14's goals: stall ratio <= 3; cutover within 1.5x between the two sizes.

The second size should be 4x the first (the defaults: 525 and 2100 prompt tokens, about
66 MiB and 262 MiB of KV per replica with 4 streams).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import threading
import time
from itertools import pairwise
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))

from gyges.testing.clients import STREAM_READ_BYTES  # noqa: E402
from gyges.testing.server import SGLangServer, tiny_model  # noqa: E402
from gyges.testing.tiny_model import TinyModelSpec  # noqa: E402

WIDE_KV = TinyModelSpec(arch="llama", hidden=512, layers=8, heads=8, kv_heads=8, head_dim=64,
                        intermediate=1024)
KV_BYTES_PER_TOKEN = 2 * WIDE_KV.layers * WIDE_KV.kv_heads * WIDE_KV.head_dim * 4


def _stream(url: str, ids: list[int], new: int, times: list[float]) -> None:
    body = {"input_ids": ids, "stream": True,
            "sampling_params": {"temperature": 0, "max_new_tokens": new, "ignore_eos": True}}
    with requests.post(url + "/generate", json=body, stream=True, timeout=900) as r:
        r.raise_for_status()
        # one read per event (SGLang sends one per HTTP chunk), as the test clients do
        for line in r.iter_lines(chunk_size=STREAM_READ_BYTES):
            if line.startswith(b"data:") and line[5:].strip() != b"[DONE]":
                times.append(time.perf_counter())


def _transform(url: str, op: str, ranks: list[int],
               precopy: bool) -> tuple[dict, float, float]:
    t0 = time.perf_counter()
    r = requests.post(f"{url}/gyges/{op}", json={"ranks": ranks, "precopy": precopy},
                      timeout=600)
    t1 = time.perf_counter()
    if r.status_code != 200:
        raise SystemExit(f"error: {op} {ranks} answered {r.status_code}: {r.text[:300]}")
    return r.json(), t0, t1


def _wait_chunks(times: list[list[float]], threads: list[threading.Thread], more: int,
                 timeout_s: float = 900.0) -> None:
    """Wait until every stream still running got ``more`` chunks since the call."""
    deadline = time.monotonic() + timeout_s
    want = [len(t) + more for t in times]
    while any(len(t) < w and th.is_alive() for t, w, th in zip(times, want, threads,
                                                              strict=True)):
        if time.monotonic() > deadline:
            raise SystemExit(f"error: streams did not get {more} more chunks in "
                             f"{timeout_s:.0f} s")
        time.sleep(0.02)


def _worst_gap(times: list[list[float]], t0: float, t1: float) -> tuple[float, float, float]:
    """Largest gap between consecutive chunks of any stream whose interval meets [t0, t1]:
    (seconds, its first chunk's time, its second's)."""
    worst = (0.0, t0, t0)
    for ts in times:
        for a, b in pairwise(ts):
            if b >= t0 and a <= t1 and b - a > worst[0]:
                worst = (b - a, a, b)
    return worst


def _gap_parts(gap: tuple[float, float, float], replies: list[dict]) -> dict[str, float]:
    """The worst gap cut at the switch whose members' clocks it spans (the members report
    when they stopped serving and when they were done, on the host's monotonic clock, as
    ``time.perf_counter`` here): before it, the switch itself, after it (the first step of
    the new configuration and the token's way to the client)."""
    _, a, b = gap
    for start, end in filter(None, map(_switch_span, replies)):
        if a <= end and b >= start:
            return {"before_ms": round((start - a) * 1000, 1),
                    "switch_ms": round((end - start) * 1000, 1),
                    "after_ms": round((b - end) * 1000, 1)}
    return {}


def _gap_within(ts: list[float], spans: list[tuple[float, float]]) -> float | None:
    """Seconds per token of one stream inside the pre-copy spans (None: no two chunks)."""
    total, tokens = 0.0, 0
    for t0, t1 in spans:
        inside = [t for t in ts if t0 <= t <= t1]
        if len(inside) >= 2:
            total, tokens = total + inside[-1] - inside[0], tokens + len(inside) - 1
    return total / tokens if tokens else None


def _typical_gap(ts: list[float], windows: list[tuple[float, float]]) -> float:
    """Seconds per token of one stream over its longest stretch outside ``windows``."""
    best = (0, 0.0)
    start = 0
    for i in range(1, len(ts) + 1):
        cut = i == len(ts) or any(ts[i - 1] <= t1 and ts[i] >= t0 for t0, t1 in windows)
        if cut:
            n = i - 1 - start
            if n > best[0]:
                best = (n, ts[i - 1] - ts[start])
            start = i
    if best[0] == 0:
        raise SystemExit("error: a stream has no tokens outside the transformations")
    return best[1] / best[0]


def _phases(replies: list[dict]) -> dict[str, float]:
    """Per cutover phase, the slowest member's ms, summed over the steps (where the cutover
    goes: plan, exchange, KV, reshard, install, sync)."""
    out: dict[str, float] = {}
    for r in replies:
        for name in {k for m in r["members"].values() for k in m.get("phases_ms", {})}:
            slowest = max(m.get("phases_ms", {}).get(name, 0.0) for m in r["members"].values())
            out[name] = round(out.get(name, 0.0) + slowest, 1)
    return out


def _pause_ms(replies: list[dict]) -> float:
    """How long the group did not serve, from its members' clocks (the first member to stop
    serving to the last to be done), summed over the steps: the server side of the stall,
    without the token's way to the client."""
    return round(sum(end - start for start, end in filter(None, map(_switch_span, replies)))
                 * 1000, 1)


def _switch_span(reply: dict) -> tuple[float, float] | None:
    """(first member stopped serving, last member done) of one step's reply, from the
    members' ``clock_s``; None when they report none."""
    clocks = [m["clock_s"] for m in reply["members"].values() if "clock_s" in m]
    if not clocks:
        return None
    return min(c["start"] for c in clocks), max(c["end"] for c in clocks)


def _steps(dp: int, op: str) -> list[list[int]]:
    if dp == 2:
        return [[0, 1]]
    pairs = [[0, 1], [2, 3]]
    return [*pairs, [0, 1, 2, 3]] if op == "merge" else [[0, 1, 2, 3], *pairs]


def run_size(dp: int, prompt_tokens: int, streams: int, new: int) -> dict:
    """One server; the same streams across a stop-the-world and an overlapped merge and
    split, one after the other."""
    per_replica = streams * (prompt_tokens + new)
    slots = max(4096, 1 << (per_replica + 1024).bit_length())
    model = tiny_model(WIDE_KV)

    def prompts(mode: int) -> list[list[int]]:  # no prefix shared between the two modes
        return [[(17 * i + 7 * j + 3 * mode) % 900 + 5 for j in range(prompt_tokens)]
                for i in range(streams * dp)]

    args = ["--stream-interval", "1", "--gyges-max-tp", str(dp), "--gyges-policy", "round_robin"]
    out = {"prompt_tokens": prompt_tokens, "streams_per_replica": streams,
           "kv_mib_per_replica": round(streams * prompt_tokens * KV_BYTES_PER_TOKEN / 2**20, 1),
           "pool_slots_per_replica": slots}
    with SGLangServer(model, dp_size=dp, gyges=True, max_total_tokens=slots,
                      extra_args=args) as srv:
        for n, (mode, precopy) in enumerate((("stop_the_world", False), ("precopy", True))):
            out[mode] = run_mode(srv.url, dp, prompts(n), new, precopy)
    return out


def run_mode(url: str, dp: int, prompts: list[list[int]], new: int, precopy: bool) -> dict:
    times: list[list[float]] = [[] for _ in prompts]
    threads = [threading.Thread(target=_stream, args=(url, p, new, times[i]), daemon=True)
               for i, p in enumerate(prompts)]
    for t in threads:
        t.start()
    _wait_chunks(times, threads, 20)
    windows, replies, spans_of = {}, {}, {}
    for op in ("merge", "split"):
        spans = []
        for ranks in _steps(dp, op):
            reply, t0, t1 = _transform(url, op, ranks, precopy)
            replies.setdefault(op, []).append(reply)
            spans.append((t0, t1))
            spans_of.setdefault(op, []).append(
                (t0, t0 + reply["elapsed_ms"].get("precopy_ms", 0.0) / 1000))
        windows[op] = (spans[0][0], spans[-1][1])
        _wait_chunks(times, threads, 20)
    for t in threads:
        t.join(timeout=900)
    median = statistics.median(_typical_gap(ts, list(windows.values())) for ts in times)
    out: dict = {"typical_gap_ms": round(median * 1000, 1)}
    for op, (t0, t1) in windows.items():
        gap = _worst_gap(times, t0, t1)
        worst = gap[0]
        moved = [r["requests_moved"]["running"] for r in replies[op]]
        pre = [r.get("precopy", {}) for r in replies[op]]
        skipped = [p["skipped"] for p in pre if "skipped" in p]
        if precopy and skipped:
            raise SystemExit(f"error: the {op} ran stop-the-world: {skipped[0]}")
        out[op] = {"worst_gap_ms": round(worst * 1000, 1),
                   "stall_ratio": round(worst / median, 1),
                   "cutover_ms": round(sum(r["elapsed_ms"][f"{op}_ms"] for r in replies[op]), 1),
                   "kv_transfer_ms": round(sum(max(m["phases_ms"].get("kv_transfer_ms", 0.0)
                                                   for m in r["members"].values())
                                               for r in replies[op]), 1),
                   "cutover_kv_mib": round(sum(r["cutover_kv_bytes"] for r in replies[op])
                                           / 2**20, 2),
                   "requests_moved": moved,
                   "phases_ms": _phases(replies[op]),
                   "worst_gap_parts": _gap_parts(gap, replies[op]),
                   "pause_ms": _pause_ms(replies[op])}
        out[op]["pause_steps"] = round(out[op]["pause_ms"] / (median * 1000), 2)
        if precopy:
            during = [_gap_within(ts, spans_of[op]) for ts in times]
            during = [g for g in during if g is not None]
            out[op].update({
                "gap_during_precopy_ms": round(statistics.median(during) * 1000, 1)
                if during else None,
                "precopy_kv_mib": round(sum(p.get("bytes", 0) for p in pre) / 2**20, 1),
                "precopy_weight_mib": round(sum(p.get("weight_bytes", 0) for p in pre)
                                            / 2**20, 1),
                "precopy_rounds": sum(p.get("rounds", 0) for p in pre),
                "precopy_ms": round(sum(p.get("ms", 0.0) for p in pre), 1)})
        if not all(moved):
            raise SystemExit(f"error: a {op} met no running request ({moved}): the streams "
                             "ended before it; raise --new-tokens")
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dp", type=int, choices=(2, 4), default=2)
    p.add_argument("--prompt-tokens", type=int, nargs="+", default=[525, 2100])
    p.add_argument("--streams", type=int, default=4, help="streams per replica")
    p.add_argument("--new-tokens", type=int, default=400)
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args(argv)
    if a.streams < 1 or a.new_tokens < 80 or min(a.prompt_tokens) < 1:
        p.error("--streams >= 1, --new-tokens >= 80 and --prompt-tokens >= 1")
    results = [run_size(a.dp, n, a.streams, a.new_tokens) for n in a.prompt_tokens]
    doc = {"machine": f"{platform.node()} {platform.machine()}, "
                      f"{len(os.sched_getaffinity(0))} cores",
           "command": "PYTHONPATH=python python benchmark/stall.py " + " ".join(sys.argv[1:]),
           "dp": a.dp, "sizes": results}
    if len(results) >= 2:
        for mode in ("stop_the_world", "precopy"):
            for op in ("merge", "split"):
                doc[f"{mode}_{op}_cutover_growth"] = round(
                    results[-1][mode][op]["cutover_ms"] / results[0][mode][op]["cutover_ms"], 2)
                doc[f"{mode}_{op}_pause_growth"] = round(
                    results[-1][mode][op]["pause_ms"] / results[0][mode][op]["pause_ms"], 2)
    text = json.dumps(doc, indent=1)
    print(text)
    if a.out:
        a.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
