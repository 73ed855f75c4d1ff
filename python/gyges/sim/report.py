"""Outputs of ``run``: results.json (deterministic), report.md and PNG plots."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from gyges.sim.models import SimInputError
from gyges.sim.runner import PolicyRun, throughput_series, tpot_ms, ttft_ms

COLUMNS = ("requests", "completed", "failed", "throughput_tok_s", "goodput_req_s",
           "ttft_p50_ms", "ttft_p99_ms", "tpot_p50_ms", "tpot_p99_ms", "merges", "splits",
           "transform_s")


@contextmanager
def progress_bar(label: str, total_s: float) -> Iterator[Callable[[float], None]]:
    """tqdm over simulated seconds (silent when stderr is not a terminal or tqdm absent)."""
    try:
        from tqdm import tqdm
    except ImportError:
        yield lambda t: None
        return
    bar = tqdm(total=round(total_s), desc=label, unit="sim-s", disable=None, leave=False)
    seen = [0]

    def tick(t: float) -> None:
        step = min(round(t), bar.total) - seen[0]
        if step > 0:
            bar.update(step)
            seen[0] += step

    try:
        yield tick
    finally:
        bar.close()


def results_json(results: Mapping[str, Any]) -> str:
    return json.dumps(results, indent=1, sort_keys=True) + "\n"


def write_outputs(out: Path, results: Mapping[str, Any], runs: Mapping[str, PolicyRun],
                  walls: Mapping[str, float], plot: bool = True) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(results_json(results))
        (out / "report.md").write_text(report_md(results, walls))
    except OSError as e:
        raise SimInputError(f"cannot write to {out}: {e.strerror or e}") from None
    if plot:
        plots(out, results, runs)


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
    return str(v)


def report_md(results: Mapping[str, Any], walls: Mapping[str, float]) -> str:
    c, pol = results["config"], results["policies"]
    first = "" if c["duration"] is None else f", first {c['duration']:g} s"
    lines = [
        "# Simulation report", "",
        f"Trace `{c['trace']}` ({c['format']}, {c['requests']} requests, time scale "
        f"{c['time_scale']:g}{first})"
        f"; model {c['model']['name']}; {c['hosts']} host(s) x {c['gpus_per_host']} "
        f"{c['hardware']['name']}; SLO TTFT <= {c['slo_ttft_ms']:g} ms and TPOT <= "
        f"{c['slo_tpot_ms']:g} ms; split hold-down {c['hold_down_s']:g} s; transformation "
        f"overlap {c['hardware']['overlap']:g}.", "",
        "| policy | " + " | ".join(COLUMNS) + " | sim wall s |",
        "|---" * (len(COLUMNS) + 2) + "|",
    ]
    for name, row in pol.items():
        cells = [_fmt(row.get(k)) for k in COLUMNS]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {walls.get(name, 0):.1f} |")
    infeasible = {n: r["infeasible"] for n, r in pol.items() if "infeasible" in r}
    if infeasible:
        lines += ["", "Infeasible (every request counted as failed):"]
        lines += [f"- {n}: {why}" for n, why in infeasible.items()]
    best = _best_static(pol)
    if best and "gyges" in pol and pol[best]["throughput_tok_s"]:
        g = pol["gyges"]
        lines += ["", f"Gyges vs the best static configuration ({best}): throughput "
                      f"{g['throughput_tok_s'] / pol[best]['throughput_tok_s']:.2f}x, goodput "
                      f"{_ratio(g['goodput_req_s'], pol[best]['goodput_req_s'])}."]
    if "sweep" in results:
        lines += ["", "Goodput (req/s) against request rate (`--sweep`):", "",
                  "| time scale | rate req/s | " + " | ".join(pol) + " |",
                  "|---" * (len(pol) + 2) + "|"]
        for s in results["sweep"].values():
            lines.append(f"| {s['time_scale']:g} | {s['rate_req_s']:.3g} | " + " | ".join(
                _fmt(s["goodput_req_s"][n]) for n in pol) + " |")
    return "\n".join(lines) + "\n"


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else ("n/a (both 0)" if not a else "inf")


def _best_static(pol: Mapping[str, Mapping[str, Any]]) -> str | None:
    static = [n for n in pol if n.startswith("static-") and "infeasible" not in pol[n]]
    return max(static, key=lambda n: (pol[n]["goodput_req_s"], pol[n]["throughput_tok_s"]),
               default=None)


def plots(out: Path, results: Mapping[str, Any], runs: Mapping[str, PolicyRun]) -> bool:
    """throughput.png, ttft_cdf.png, tpot_cdf.png, goodput_vs_rate.png (with --sweep);
    False when matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    elastic = [n for n, r in runs.items() if r.records]
    fig, axes = plt.subplots(1 + len(elastic), 1, figsize=(10, 3.5 + 1.2 * len(elastic)),
                             sharex=True, squeeze=False,
                             gridspec_kw={"height_ratios": [3] + [1] * len(elastic)})
    ax = axes[0][0]
    for name, run in runs.items():
        xs, ys = throughput_series(run)
        ax.plot(xs, ys, label=name, lw=1)
    ax.set(ylabel="output tokens/s", title="Throughput, and each host's merges (^) and "
                                           "splits (v) under the elastic policies")
    ax.legend(fontsize=7, ncol=2, loc="upper right")
    for row, name in enumerate(elastic, start=1):
        bx = axes[row][0]
        for op, marker, color in (("merge", "^", "tab:red"), ("split", "v", "tab:blue")):
            recs = [r for r in runs[name].records if r.op == op]
            bx.scatter([r.start for r in recs], [r.host for r in recs], marker=marker,
                       s=8, color=color, label=op)
        bx.set_ylabel(f"{name}\nhost", fontsize=7)
    axes[-1][0].set_xlabel("time (s)")
    fig.tight_layout()
    fig.savefig(out / "throughput.png", dpi=110)
    plt.close(fig)
    for metric, fn in (("ttft", ttft_ms), ("tpot", tpot_ms)):
        fig, ax = plt.subplots(figsize=(6, 4))
        for name, run in runs.items():
            vals = sorted(v for r in run.requests if not r.failed and r.first_token is not None
                          and (v := fn(r)) is not None)
            if vals:
                ax.plot(vals, [(i + 1) / len(vals) for i in range(len(vals))], label=name)
        ax.set(xscale="log", xlabel=f"{metric.upper()} (ms)", ylabel="CDF")
        ax.legend(fontsize=7, loc="lower right")
        fig.tight_layout()
        fig.savefig(out / f"{metric}_cdf.png", dpi=110)
        plt.close(fig)
    if "sweep" in results:
        fig, ax = plt.subplots(figsize=(6, 4))
        pts = sorted(results["sweep"].values(), key=lambda s: s["rate_req_s"])
        for name in results["policies"]:
            ax.plot([s["rate_req_s"] for s in pts], [s["goodput_req_s"][name] for s in pts],
                    marker="o", label=name)
        ax.set(xlabel="request rate (req/s)", ylabel="goodput (req/s)")
        ax.legend(fontsize=7, loc="lower right")
        fig.tight_layout()
        fig.savefig(out / "goodput_vs_rate.png", dpi=110)
        plt.close(fig)
    return True
