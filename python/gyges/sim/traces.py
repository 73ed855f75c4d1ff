"""Trace readers: Azure LLM inference CSV and Mooncake JSONL, into :class:`TraceRequest`s.

Azure: ``TIMESTAMP,ContextTokens,GeneratedTokens`` (timestamps like
``2023-11-16 18:15:46.6805900``). Mooncake: one JSON object per line with ``timestamp``
(ms), ``input_length``, ``output_length`` (``hash_ids``, the prefix blocks, are read but
the simulator has no prefix cache). Arrivals become offsets from the first request.
"""

from __future__ import annotations

import csv
import json
from datetime import datetime
from pathlib import Path
from typing import NamedTuple

from gyges.sim.models import SimInputError


class TraceRequest(NamedTuple):
    arrival_s: float
    prompt: int
    output: int


def _azure_time(text: str) -> float:
    head, _, frac = text.strip().partition(".")
    base = datetime.strptime(head, "%Y-%m-%d %H:%M:%S").timestamp()
    return base + (float("0." + frac) if frac else 0.0)


def read_azure(path: Path) -> list[TraceRequest]:
    out = []
    with open(path, newline="") as f:
        for n, row in enumerate(csv.DictReader(f), start=2):
            try:
                out.append(TraceRequest(_azure_time(row["TIMESTAMP"]),
                                        int(row["ContextTokens"]), int(row["GeneratedTokens"])))
            except (KeyError, ValueError, TypeError, AttributeError) as e:
                raise SimInputError(f"{path}:{n}: not an Azure trace row ({e!r})") from None
    return out


def read_mooncake(path: Path) -> list[TraceRequest]:
    out = []
    with open(path) as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                d = json.loads(line)
                out.append(TraceRequest(float(d["timestamp"]) / 1000.0,
                                        int(d["input_length"]), int(d["output_length"])))
            except (KeyError, ValueError, TypeError) as e:
                raise SimInputError(f"{path}:{n}: not a Mooncake trace line ({e!r})") from None
    return out


def load_trace(path: str | Path, fmt: str | None = None, *, time_scale: float = 1.0,
               duration: float | None = None) -> list[TraceRequest]:
    """Read, normalise (first arrival at 0), scale arrivals by ``time_scale`` (0.5 = twice
    the rate) and keep those arriving before ``duration`` seconds (after scaling)."""
    p = Path(path)
    if fmt is None:
        fmt = "azure" if p.suffix.lower() == ".csv" else "mooncake"
    if fmt not in ("azure", "mooncake"):
        raise SimInputError(f"unknown trace format {fmt!r}; use azure or mooncake")
    try:
        reqs = read_azure(p) if fmt == "azure" else read_mooncake(p)
    except OSError as e:
        raise SimInputError(f"cannot read trace {p}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise SimInputError(f"trace {p} is not text") from None
    if not reqs:
        raise SimInputError(f"trace {p} has no requests")
    if time_scale <= 0:
        raise SimInputError("--time-scale must be > 0")
    t0 = min(r.arrival_s for r in reqs)
    reqs = sorted(TraceRequest((r.arrival_s - t0) * time_scale, max(1, r.prompt),
                               max(1, r.output)) for r in reqs)
    if duration is not None:
        reqs = [r for r in reqs if r.arrival_s < duration]
        if not reqs:
            raise SimInputError(f"no request of {p} arrives within --duration {duration:g}s")
    return reqs
