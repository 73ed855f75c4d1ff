"""Replay a request trace against a running SGLang (or Gyges) server through /generate.

    python benchmark/replay.py --url http://127.0.0.1:30000 --trace TRACE.{csv,jsonl} \
        --time-scale 0.05 --length-scale 0.01 --max-requests 200 --output results.json

Each request carries ``input_ids`` of exactly the traced input length and
``max_new_tokens`` = the traced output length with ``ignore_eos``, streamed; arrivals follow
the trace's timestamps (scaled). Records TTFT, TPOT, end-to-end latency, throughput, goodput
(requests meeting --slo-ttft-ms and --slo-tpot-ms) and failures (with the server's message).
When the server has /gyges/status, its topology is sampled so transformations can be
plotted against throughput.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from traces import TraceRequest, read_trace, scale  # noqa: E402


@dataclass
class Record:
    index: int
    arrival_s: float
    input_len: int
    output_len: int
    start_s: float = 0.0
    ttft_s: float | None = None
    e2e_s: float | None = None
    output_tokens: int = 0
    error: str | None = None

    @property
    def tpot_s(self) -> float | None:
        if self.ttft_s is None or self.e2e_s is None or self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)


async def send_one(session: aiohttp.ClientSession, url: str, rec: Record,
                   ids: list[int], t0: float) -> None:
    body = {"input_ids": ids, "stream": True,
            "sampling_params": {"temperature": 0, "max_new_tokens": rec.output_len,
                                "ignore_eos": True}}
    rec.start_s = time.perf_counter() - t0
    start = time.perf_counter()
    try:
        async with session.post(url + "/generate", json=body) as resp:
            if resp.status != 200:
                rec.error = f"HTTP {resp.status}: {(await resp.text())[:300]}"
                return
            async for raw in resp.content:
                line = raw.decode().strip()
                if not line.startswith("data:") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[5:])
                if "error" in chunk:
                    rec.error = str(chunk["error"])[:300]
                    return
                meta = chunk.get("meta_info", {})
                finish = meta.get("finish_reason") or {}
                if isinstance(finish, dict) and finish.get("type") == "abort":
                    rec.error = f"aborted: {finish.get('message', '')}"[:300]
                    return
                n = meta.get("completion_tokens", 0)
                if n > 0 and rec.ttft_s is None:
                    rec.ttft_s = time.perf_counter() - start
                rec.output_tokens = max(rec.output_tokens, n)
        rec.e2e_s = time.perf_counter() - start
        if rec.output_tokens != rec.output_len:
            rec.error = f"got {rec.output_tokens} of {rec.output_len} tokens"
    except (aiohttp.ClientError, asyncio.TimeoutError) as e:
        rec.error = f"{type(e).__name__}: {e}"


async def poll_status(session: aiohttp.ClientSession, url: str, t0: float,
                      samples: list[dict], stop: asyncio.Event, every_s: float) -> None:
    while not stop.is_set():
        try:
            async with session.get(url + "/gyges/status") as resp:
                if resp.status == 404:
                    return  # stock server: no topology to sample
                st = await resp.json()
                samples.append({"t": time.perf_counter() - t0,
                                "tp": [i["tp"] for i in st["instances"]]})
        except (aiohttp.ClientError, asyncio.TimeoutError, KeyError, ValueError):
            pass
        try:
            await asyncio.wait_for(stop.wait(), every_s)
        except asyncio.TimeoutError:
            pass


async def replay(url: str, trace: list[TraceRequest], *, seed: int = 0, vocab: tuple[int, int]
                 = (5, 300), timeout_s: float = 3600.0, status_every_s: float = 0.5) -> dict:
    rng = random.Random(seed)
    recs = [Record(i, r.arrival_s, r.input_len, r.output_len) for i, r in enumerate(trace)]
    inputs = [[rng.randrange(*vocab) for _ in range(r.input_len)] for r in trace]
    samples: list[dict] = []
    stop = asyncio.Event()
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn,
                                     timeout=aiohttp.ClientTimeout(total=timeout_s)) as s:
        t0 = time.perf_counter()
        poller = asyncio.create_task(poll_status(s, url, t0, samples, stop, status_every_s))

        async def at_arrival(rec: Record, ids: list[int]) -> None:
            await asyncio.sleep(max(0.0, rec.arrival_s - (time.perf_counter() - t0)))
            await send_one(s, url, rec, ids, t0)

        await asyncio.gather(*(at_arrival(r, x) for r, x in zip(recs, inputs, strict=True)))
        duration = time.perf_counter() - t0
        stop.set()
        await poller
    return {"duration_s": duration, "records": recs, "topology": samples}


def summarize(recs: list[Record], duration_s: float, slo_ttft_s: float,
              slo_tpot_s: float) -> dict:
    ok = [r for r in recs if r.error is None and r.e2e_s is not None]
    good = [r for r in ok if r.ttft_s is not None and r.ttft_s <= slo_ttft_s
            and (r.tpot_s is None or r.tpot_s <= slo_tpot_s)]

    def pct(values: list[float], q: float) -> float | None:
        if not values:
            return None
        values = sorted(values)
        return values[min(len(values) - 1, int(q * len(values)))]

    out = {
        "requests": len(recs), "completed": len(ok), "failed": len(recs) - len(ok),
        "duration_s": duration_s,
        "output_throughput_tok_s": sum(r.output_tokens for r in ok) / duration_s,
        "request_throughput_req_s": len(ok) / duration_s,
        "goodput_req_s": len(good) / duration_s, "good": len(good),
        "slo_ttft_s": slo_ttft_s, "slo_tpot_s": slo_tpot_s,
    }
    for name, values in (("ttft", [r.ttft_s for r in ok if r.ttft_s is not None]),
                         ("tpot", [r.tpot_s for r in ok if r.tpot_s is not None]),
                         ("e2e", [r.e2e_s for r in ok])):
        out[f"{name}_mean_s"] = statistics.fmean(values) if values else None
        for q in (0.5, 0.9, 0.99):
            out[f"{name}_p{int(q * 100)}_s"] = pct(values, q)
    out["errors"] = sorted({r.error for r in recs if r.error})[:10]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", required=True)
    p.add_argument("--trace", required=True, help=".csv (Azure) or .jsonl (Mooncake)")
    p.add_argument("--time-scale", type=float, default=1.0)
    p.add_argument("--length-scale", type=float, default=1.0)
    p.add_argument("--max-requests", type=int, default=None)
    p.add_argument("--max-input-len", type=int, default=None)
    p.add_argument("--slo-ttft-ms", type=float, default=2000.0)
    p.add_argument("--slo-tpot-ms", type=float, default=200.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", type=Path, default=None)
    a = p.parse_args(argv)
    try:
        trace = scale(read_trace(a.trace), time_scale=a.time_scale,
                      length_scale=a.length_scale, max_requests=a.max_requests,
                      max_input_len=a.max_input_len)
    except (OSError, ValueError, KeyError) as e:
        p.error(f"cannot read trace {a.trace}: {e}")
    run = asyncio.run(replay(a.url.rstrip("/"), trace, seed=a.seed))
    summary = summarize(run["records"], run["duration_s"], a.slo_ttft_ms / 1000,
                        a.slo_tpot_ms / 1000)
    print(json.dumps(summary, indent=2))
    if a.output:
        a.output.write_text(json.dumps({
            "summary": summary, "topology": run["topology"],
            "records": [asdict(r) | {"tpot_s": r.tpot_s} for r in run["records"]],
            "command": " ".join(sys.argv)}, indent=1))
    return 0 if summary["failed"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
