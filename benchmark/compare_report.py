"""Summaries and the markdown report of benchmark/compare.py (pure: no server, no plotting).

A *run* is one configuration's result as compare.py saves it (``<name>.json``)::

    {"config": name, "description": str, "command": str, "start_error": str | None,
     "duration_s": float, "records": [Record fields...], "topology": [{"t", "tp"}...],
     "counters": {...} | None}
"""
from __future__ import annotations

import sys
from dataclasses import fields
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from replay import Record, summarize  # noqa: E402

STATIC_PREFIXES = ("dp", "tp", "mix")

HOW_TO_READ = """\
**How to read this.** Every configuration got the same requests at the same (scaled) arrival
times. *completed* requests produced exactly their traced output length; a *failed* one was
refused or cut short by the server (static DP refuses what does not fit one replica's KV
cache) or hit a client error. *Throughput* is output tokens of completed requests per second
of the whole replay. *Goodput* counts only completed requests whose TTFT and TPOT are within
the SLOs, per second. TTFT/TPOT percentiles are over completed requests only, so a
configuration that fails the long requests looks faster on them than it is. *Merges/splits*
are topology changes seen by sampling `/gyges/status` every 0.5 s (static configurations have
none); the scheduler's own counters (merge steps started/done) are next to them. The ratio is
each Gyges configuration's goodput over the best static configuration's goodput. On this CPU
TP all-reduces go over loopback gloo and the tiny model's steps are short, so a TP step costs
relatively more than it would on GPUs with NVLink, and a merge or split (a few seconds here)
is large against a one-minute replay: read the ratios as a test of placement and
transformation overhead, not as a GPU forecast."""


def load_record(d: dict) -> Record:
    names = {f.name for f in fields(Record)}
    return Record(**{k: v for k, v in d.items() if k in names})


def topology_events(samples: list[dict]) -> list[tuple[float, str, list[int]]]:
    """(time, "merge" | "split" | "change", tp degrees after) for every sampled change."""
    events = []
    for prev, cur in zip(samples, samples[1:], strict=False):
        if cur["tp"] == prev["tp"]:
            continue
        kind = ("merge" if len(cur["tp"]) < len(prev["tp"]) else
                "split" if len(cur["tp"]) > len(prev["tp"]) else "change")
        events.append((cur["t"], kind, list(cur["tp"])))
    return events


def summarize_run(run: dict, slo_ttft_s: float, slo_tpot_s: float,
                  replica_usable: int | None = None) -> dict:
    """replay.summarize plus the first failure, topology events, scheduler counters and
    (given one replica's usable KV slots) the long requests completed."""
    if run.get("start_error"):
        return {"config": run["config"], "start_error": run["start_error"]}
    recs = [load_record(r) for r in run["records"]]
    s = summarize(recs, run["duration_s"], slo_ttft_s, slo_tpot_s)
    failed = sorted((r for r in recs if r.error or r.e2e_s is None), key=lambda r: r.index)
    events = topology_events(run.get("topology") or [])
    counters = run.get("counters") or {}
    return s | {
        "config": run["config"],
        "first_failure": (f"#{failed[0].index} ({failed[0].input_len}+{failed[0].output_len}"
                          f" tokens): {failed[0].error}") if failed else None,
        "merges": sum(k == "merge" for _, k, _ in events),
        "splits": sum(k == "split" for _, k, _ in events),
        "auto_merges": counters.get("auto_merges", {}),
        "auto_splits": counters.get("auto_splits", {}),
        "long": None if replica_usable is None else _long(recs, replica_usable),
    }


def _long(recs: list[Record], replica_usable: int) -> tuple[int, int]:
    """(completed, total) of the requests that need more than one replica's KV slots."""
    long = [r for r in recs if r.input_len + r.output_len > replica_usable]
    return sum(r.error is None and r.e2e_s is not None for r in long), len(long)


def is_static(name: str) -> bool:
    return name.split("-")[0] in STATIC_PREFIXES


def goodput_ratios(summaries: list[dict]) -> dict[str, float | None]:
    """Goodput of each non-static configuration over the best static one's."""
    static = [s["goodput_req_s"] for s in summaries
              if is_static(s["config"]) and "start_error" not in s]
    best = max(static, default=None)
    return {s["config"]: (s["goodput_req_s"] / best if best else None)
            for s in summaries if not is_static(s["config"]) and "start_error" not in s}


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v * 1000:.0f}"


def _pair(p: tuple[int, int] | list[int] | None) -> str:
    return "-" if p is None else f"{p[0]}/{p[1]}"


def _counter(d: dict) -> str:
    return "-" if not d else f"{d.get('done', 0)}/{d.get('started', 0)}"


def render_table(summaries: list[dict]) -> str:
    head = ("| config | requests | completed | failed | throughput tok/s | goodput req/s "
            "(good) | long done/total | TTFT p50/p99 ms | TPOT p50/p99 ms | merges/splits seen | "
            "auto merge/split steps done/started | first failure |")
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for s in summaries:
        if "start_error" in s:
            lines.append(f"| {s['config']} | did not start: {_cell(s['start_error'])} |"
                         + " |" * 10)
            continue
        lines.append(
            f"| {s['config']} | {s['requests']} | {s['completed']} | {s['failed']} | "
            f"{s['output_throughput_tok_s']:.1f} | {s['goodput_req_s']:.3f} ({s['good']}) | "
            f"{_pair(s['long'])} | "
            f"{_ms(s['ttft_p50_s'])} / {_ms(s['ttft_p99_s'])} | "
            f"{_ms(s['tpot_p50_s'])} / {_ms(s['tpot_p99_s'])} | "
            f"{s['merges']}/{s['splits']} | "
            f"{_counter(s['auto_merges'])} / {_counter(s['auto_splits'])} | "
            f"{_cell(s['first_failure'] or '-')} |")
    return "\n".join(lines)


def _cell(text: str, limit: int = 160) -> str:
    text = " ".join(text.split()).replace("|", "\\|")
    return text if len(text) <= limit else text[:limit - 3] + "..."


def render_ratios(summaries: list[dict]) -> str:
    ratios = goodput_ratios(summaries)
    static = [s for s in summaries if is_static(s["config"]) and "start_error" not in s]
    if not static:
        return "No static configuration ran: no ratio."
    best = max(static, key=lambda s: s["goodput_req_s"])
    lines = [f"Best static configuration by goodput: **{best['config']}** "
             f"({best['goodput_req_s']:.3f} req/s, {best['failed']} failed).", ""]
    for name, r in ratios.items():
        lines.append(f"- {name}: goodput ratio "
                     f"{'-' if r is None else f'{r:.2f}x'} vs {best['config']}")
    return "\n".join(lines)


def _invocations(runs: list[dict], meta: dict) -> list[str]:
    found = [r["invocation"] for r in runs if r.get("invocation")]
    return list(dict.fromkeys(found)) or [meta.get("command", "?")]


def _load(run: dict) -> str:
    if run.get("load_before") is None:
        return ""
    after = run.get("load_after")
    return f"1-min load average {run['load_before']}" + ("" if after is None else
                                                        f" -> {after}")


def render_markdown(runs: list[dict], meta: dict) -> str:
    """The whole compare.md: header (machine, date, trace, SLOs), table, ratios, commands."""
    sums = [summarize_run(r, meta["slo_ttft_s"], meta["slo_tpot_s"], meta.get("replica_usable"))
            for r in runs]
    out = [f"# {meta.get('title', 'Gyges vs static SGLang configurations')}", "",
           f"- date: {meta['date']}", f"- machine: {meta['machine']}",
           f"- trace: {meta['trace']}",
           f"- SLOs: TTFT <= {meta['slo_ttft_s'] * 1000:.0f} ms, "
           f"TPOT <= {meta['slo_tpot_s'] * 1000:.0f} ms",
           "- command(s): " + ", ".join(f"`{c}`" for c in _invocations(runs, meta)), ""]
    if meta.get("note"):
        out += [meta["note"], ""]
    out += [render_table(sums), "", render_ratios(sums), "", HOW_TO_READ, "",
            "## Configurations and the exact server commands", ""]
    for r in runs:
        when = ", ".join(x for x in (r.get("date"), _load(r)) if x)
        out += [f"- **{r['config']}**: {r.get('description', '')}"
                + (f" ({when})" if when else ""), "", f"  `{r['command']}`", ""]
    if meta.get("plots"):
        out += ["## Plots", ""] + [f"![{p}]({p})" for p in meta["plots"]] + [""]
    if meta.get("client_note"):
        out += ["## SGLang's own client", "", meta["client_note"], ""]
    return "\n".join(out)
