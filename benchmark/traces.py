"""Request traces for replay: Azure LLM inference 2023 CSV and Mooncake JSONL.

A trace becomes a list of :class:`TraceRequest` (arrival offset in seconds from the first
request, input and output lengths in tokens). ``scale`` stretches or compresses arrivals
(``time_scale`` 0.1 = ten times faster) and lengths (``length_scale`` 0.01 = 1/100 of the
tokens, at least 1) so that a production trace fits a tiny model on a CPU.
``synthetic_long_tail`` generates a production-scale trace shaped like Azure's conversation
trace plus a tail of long documents, so benchmarks do not need a trace file.
"""
from __future__ import annotations

import csv
import json
import math
import random
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path
from typing import NamedTuple


class TraceRequest(NamedTuple):
    arrival_s: float
    input_len: int
    output_len: int


def read_azure_csv(path: str | Path) -> list[TraceRequest]:
    """Azure LLM inference trace: ``TIMESTAMP,ContextTokens,GeneratedTokens``."""
    rows = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            ts = _parse_azure_time(row["TIMESTAMP"])
            rows.append((ts, int(row["ContextTokens"]), int(row["GeneratedTokens"])))
    if not rows:
        return []
    t0 = min(r[0] for r in rows)
    return sorted(TraceRequest(t - t0, i, o) for t, i, o in rows)


def read_mooncake_jsonl(path: str | Path) -> list[TraceRequest]:
    """Mooncake trace: one JSON object per line with ``timestamp`` (ms), ``input_length``,
    ``output_length``."""
    reqs = []
    with open(path) as f:
        for line in f:
            if line.strip():
                d = json.loads(line)
                reqs.append(TraceRequest(d["timestamp"] / 1000.0, int(d["input_length"]),
                                         int(d["output_length"])))
    if not reqs:
        return []
    t0 = min(r.arrival_s for r in reqs)
    return sorted(r._replace(arrival_s=r.arrival_s - t0) for r in reqs)


def read_trace(path: str | Path) -> list[TraceRequest]:
    """Pick the reader by file suffix (.csv: Azure, .jsonl/.json: Mooncake)."""
    suffix = Path(path).suffix.lower()
    if suffix == ".csv":
        return read_azure_csv(path)
    if suffix in (".jsonl", ".json"):
        return read_mooncake_jsonl(path)
    raise ValueError(f"unknown trace format {suffix!r}: expected .csv (Azure) or .jsonl "
                     "(Mooncake)")


def scale(trace: Iterable[TraceRequest], *, time_scale: float = 1.0,
          length_scale: float = 1.0, max_requests: int | None = None,
          max_input_len: int | None = None) -> list[TraceRequest]:
    if time_scale <= 0 or length_scale <= 0:
        raise ValueError("time and length scales must be positive")
    out = []
    for r in trace:
        if max_requests is not None and len(out) >= max_requests:
            break
        i = max(1, round(r.input_len * length_scale))
        if max_input_len is not None:
            i = min(i, max_input_len)
        out.append(TraceRequest(r.arrival_s * time_scale, i,
                                max(1, round(r.output_len * length_scale))))
    return out


def synthetic_long_tail(n: int = 48, *, seed: int = 0, rate_per_s: float = 5.5,
                        long_fraction: float = 0.1) -> list[TraceRequest]:
    """``n`` Poisson arrivals at ``rate_per_s``; inputs log-normal around 700 tokens (at most
    3000) except a ``long_fraction`` of 4200-7800-token documents; outputs log-normal around
    120 tokens (8 to 600). Production scale: ``scale(..., length_scale=0.25)`` puts the short
    ones within a 1024-slot replica and the long ones beyond it."""
    rng = random.Random(seed)
    t, out = 0.0, []
    for k in range(n):
        if k:
            t += rng.expovariate(rate_per_s)
        if rng.random() < long_fraction:
            i = rng.randint(4200, 7800)
        else:
            i = min(3000, max(20, round(rng.lognormvariate(math.log(700), 0.6))))
        o = min(600, max(8, round(rng.lognormvariate(math.log(120), 0.6))))
        out.append(TraceRequest(t, i, o))
    return out


def cap_need(trace: Iterable[TraceRequest], max_need: int) -> list[TraceRequest]:
    """Shorten prompts so that input + output <= ``max_need`` (the largest instance's KV
    slots); the output length is kept (it is clipped too if it alone exceeds the cap)."""
    out = []
    for r in trace:
        o = min(r.output_len, max_need - 1)
        out.append(r._replace(input_len=max(1, min(r.input_len, max_need - o)), output_len=o))
    return out


def _parse_azure_time(s: str) -> float:
    s = s.strip()
    if "." in s:  # the trace has 7 fractional digits; datetime takes at most 6
        head, frac = s.split(".", 1)
        s = f"{head}.{frac[:6]}"
        return datetime.strptime(s, "%Y-%m-%d %H:%M:%S.%f").timestamp()
    return datetime.strptime(s, "%Y-%m-%d %H:%M:%S").timestamp()
