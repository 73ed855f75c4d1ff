"""PNG plots of benchmark/compare.py runs: throughput over time with the topology changes
marked, and TTFT / TPOT CDFs across configurations (matplotlib, Agg backend)."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from compare_report import load_record, topology_events  # noqa: E402
from replay import Record  # noqa: E402

EVENT_STYLE = {"merge": ("tab:red", "--"), "split": ("tab:green", ":"),
               "change": ("tab:gray", "-.")}


def throughput_series(recs: list[Record], bin_s: float = 2.0) -> tuple[list[float], list[float]]:
    """Output tokens/s of completed requests per ``bin_s`` window (bin centres, rates).

    Token times are not recorded one by one: a request's first token is placed at its TTFT
    and the other ``output_tokens - 1`` spread evenly up to its end."""
    done = [r for r in recs if r.error is None and r.e2e_s is not None and r.ttft_s is not None]
    if not done:
        return [], []
    end = max(r.start_s + r.e2e_s for r in done)
    bins = [0.0] * (int(end // bin_s) + 1)
    for r in done:
        first, last = r.start_s + r.ttft_s, r.start_s + r.e2e_s
        bins[int(first // bin_s)] += 1
        rest = r.output_tokens - 1
        for k in range(1, rest + 1):
            bins[int((first + (last - first) * k / rest) // bin_s)] += 1
    return [(i + 0.5) * bin_s for i in range(len(bins))], [b / bin_s for b in bins]


def cdf(values: list[float], total: int | None = None) -> tuple[list[float], list[float]]:
    """Empirical CDF as a fraction of ``total`` (default: of the values themselves)."""
    xs = sorted(values)
    return xs, [(i + 1) / (total or len(xs)) for i in range(len(xs))]


def plot_throughput(runs: list[dict], path: Path, bin_s: float = 2.0) -> Path:
    runs = [r for r in runs if not r.get("start_error")]
    fig, axes = plt.subplots(max(1, len(runs)), 1, figsize=(9, 1.9 * len(runs) + 0.8), sharex=True,
                             squeeze=False)
    for ax, run in zip(axes[:, 0], runs, strict=True):
        xs, ys = throughput_series([load_record(r) for r in run["records"]], bin_s)
        ax.plot(xs, ys, color="tab:blue", lw=1.2)
        ax.set_ylabel("tok/s")
        ax.set_title(run["config"], fontsize=9, loc="left")
        seen = set()
        for t, kind, tp in topology_events(run.get("topology") or []):
            color, ls = EVENT_STYLE[kind]
            ax.axvline(t, color=color, ls=ls, lw=1,
                       label=None if kind in seen else f"{kind} (tp {tp})")
            seen.add(kind)
        if seen:
            ax.legend(fontsize=7, loc="upper right")
    axes[-1, 0].set_xlabel(f"seconds since the first request (output tokens per {bin_s:g} s)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_cdf(runs: list[dict], metric: str, path: Path) -> Path:
    """CDF of ``metric`` ("ttft" or "tpot", ms) of completed requests, as a fraction of all
    requests: a configuration that failed some never reaches 1."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for run in runs:
        if run.get("start_error"):
            continue
        recs = [load_record(r) for r in run["records"]]
        vals = [v * 1000 for r in recs if r.error is None
                and (v := (r.ttft_s if metric == "ttft" else r.tpot_s)) is not None]
        if vals:
            xs, ys = cdf(vals, len(recs))
            ax.step(xs, ys, where="post", label=f"{run['config']} ({len(vals)}/{len(recs)})")
    if ax.get_lines():
        if min(min(line.get_xdata()) for line in ax.get_lines()) > 0:
            ax.set_xscale("log")
        ax.legend(fontsize=8)
    ax.set_xlabel(f"{metric.upper()} (ms, completed requests)")
    ax.set_ylabel("fraction of all requests")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_plots(runs: list[dict], out_dir: Path) -> list[str]:
    """All three PNGs into ``out_dir``; returns their file names."""
    names = ["throughput.png", "ttft_cdf.png", "tpot_cdf.png"]
    plot_throughput(runs, out_dir / names[0])
    plot_cdf(runs, "ttft", out_dir / names[1])
    plot_cdf(runs, "tpot", out_dir / names[2])
    return names
