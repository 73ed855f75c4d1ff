"""benchmark/compare.py's pure parts: summaries, the markdown report, plots, trace shaping."""
from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmark"))
from compare import all_configs, build_trace, command_line, parse_args, usable  # noqa: E402
from compare_plots import throughput_series, write_plots  # noqa: E402
from compare_report import (  # noqa: E402
    goodput_ratios,
    render_markdown,
    render_table,
    summarize_run,
    topology_events,
)
from replay import Record  # noqa: E402
from traces import TraceRequest, cap_need, synthetic_long_tail  # noqa: E402


def rec(i: int, ttft: float | None, e2e: float | None, n: int, error: str | None = None,
        input_len: int = 100) -> dict:
    r = Record(i, arrival_s=float(i), input_len=input_len, output_len=n, start_s=float(i),
               ttft_s=ttft, e2e_s=e2e, output_tokens=n if error is None else 0, error=error)
    return asdict(r) | {"tpot_s": r.tpot_s}


def fake_run(name: str, *, fail_long: bool, slow: float = 1.0) -> dict:
    records = [rec(i, 0.1 * slow, 1.0 * slow, 11) for i in range(8)]
    records.append(rec(8, None, None, 5, "aborted: Input length (1500 tokens) exceeds",
                       input_len=1500) if fail_long else rec(8, 3.0, 4.0, 5, input_len=1500))
    topo = [{"t": 0.0, "tp": [1, 1]}, {"t": 1.0, "tp": [1, 1]}]
    if not fail_long:
        topo += [{"t": 8.0, "tp": [2]}, {"t": 9.0, "tp": [2]}, {"t": 13.0, "tp": [1, 1]}]
    return {"config": name, "description": name, "command": f"python -m x {name}",
            "start_error": None, "duration_s": 10.0, "records": records, "topology": topo,
            "counters": None if fail_long else {"auto_merges": {"started": 1, "done": 1},
                                                "auto_splits": {"started": 1, "done": 1}}}


RUNS = [fake_run("dp", fail_long=True), fake_run("tp", fail_long=False, slow=2.5),
        fake_run("gyges-gyges", fail_long=False),
        {"config": "mix", "description": "", "command": "c", "start_error": "exited"}]


def test_summary_math():
    s = summarize_run(RUNS[0], slo_ttft_s=2.0, slo_tpot_s=0.2, replica_usable=1016)
    assert (s["requests"], s["completed"], s["failed"], s["good"]) == (9, 8, 1, 8)
    assert s["output_throughput_tok_s"] == pytest.approx(8 * 11 / 10.0)
    assert s["tpot_p50_s"] == pytest.approx(0.09)
    assert s["first_failure"].startswith("#8 (1500+5 tokens): aborted")
    assert s["long"] == (0, 1) and (s["merges"], s["splits"]) == (0, 0)
    g = summarize_run(RUNS[2], 2.0, 0.2, replica_usable=1016)
    assert g["long"] == (1, 1) and (g["merges"], g["splits"]) == (1, 1)
    assert g["good"] == 8  # the long one misses the TTFT SLO
    t = summarize_run(RUNS[1], 2.0, 0.2)
    assert t["good"] == 0 and t["long"] is None  # TPOT 0.225 s > 0.2 s


def test_topology_events():
    ev = topology_events([{"t": 0, "tp": [1, 1, 1, 1]}, {"t": 1, "tp": [2, 1, 1]},
                          {"t": 2, "tp": [2, 2]}, {"t": 3, "tp": [4]}, {"t": 4, "tp": [4]},
                          {"t": 5, "tp": [2, 2]}])
    assert [(t, k) for t, k, _ in ev] == [(1, "merge"), (2, "merge"), (3, "merge"),
                                          (5, "split")]


def test_ratios_and_table():
    sums = [summarize_run(r, 2.0, 0.2, 1016) for r in RUNS]
    assert goodput_ratios(sums) == {"gyges-gyges": pytest.approx(1.0)}  # 0.8 vs dp's 0.8
    table = render_table(sums).splitlines()
    assert len(table) == 2 + 4
    assert all(line.count("|") == table[0].count("|") for line in table[:4])
    assert "| dp | 9 | 8 | 1 | 8.8 | 0.800 (8) | 0/1 | 100 / 100 | 90 / 90 | 0/0 | - / - |" \
        in table[2]
    assert "1/1 / 1/1" in table[4] and "did not start: exited" in table[5]


def test_markdown_has_machine_commands_and_ratio(tmp_path):
    runs = [RUNS[0] | {"invocation": "python benchmark/compare.py --configs dp",
                       "date": "D", "load_before": 1.5, "load_after": 2.0}, *RUNS[1:]]
    md = render_markdown(runs, {"date": "2026-11-21", "machine": "2 CPUs, Linux",
                                "trace": "synthetic", "slo_ttft_s": 2.0, "slo_tpot_s": 0.2,
                                "plots": ["a.png"], "replica_usable": 1016,
                                "note": "SMOKE RUN"})
    for text in ("2 CPUs, Linux", "`python benchmark/compare.py --configs dp`",
                 "(D, 1-min load average 1.5 -> 2.0)", "`python -m x tp`",
                 "gyges-gyges: goodput ratio 1.00x vs dp", "How to read this", "SMOKE RUN",
                 "![a.png](a.png)"):
        assert text in md, text


def test_throughput_series_spreads_tokens():
    r = Record(0, 0.0, 10, 5, start_s=1.0, ttft_s=1.0, e2e_s=3.0, output_tokens=5)
    xs, ys = throughput_series([r], bin_s=1.0)
    assert xs == [0.5, 1.5, 2.5, 3.5, 4.5]
    assert ys == [0, 0, 2, 2, 1]  # first token at 2.0, then 2.5, 3.0, 3.5, 4.0


def test_plots_write_pngs(tmp_path):
    names = write_plots(RUNS, tmp_path)
    for n in names:
        assert (tmp_path / n).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_configs_and_trace():
    assert list(all_configs(2)) == ["dp", "tp", "gyges-gyges", "gyges-round_robin",
                                    "gyges-llf"]
    assert all_configs(4)["mix"][1:3] == (2, 2)
    a = parse_args([])
    trace, desc = build_trace(a)
    assert len(trace) == 48 and trace == build_trace(a)[0]
    needs = [r.input_len + r.output_len for r in trace]
    assert max(needs) <= 2 * usable(1024) and sum(n > usable(1024) for n in needs) >= 3
    assert "need more than one replica" in desc
    assert synthetic_long_tail(5, seed=1) == synthetic_long_tail(5, seed=1)
    assert cap_need([TraceRequest(0.0, 900, 300)], 1000) == [TraceRequest(0.0, 700, 300)]


def test_command_line_quotes_env():
    class Srv:
        env = {"SGLANG_USE_CPU_ENGINE": "1", "SGLANG_CPU_OMP_THREADS_BIND": "0|1",
               "OMP_NUM_THREADS": "1", "SGLANG_PLUGINS": "__gyges_disabled__", "HOME": "/x"}
        args = ["python", "-m", "sglang.launch_server", "--dp-size", "2"]
    assert command_line(Srv()) == ("SGLANG_USE_CPU_ENGINE=1 SGLANG_CPU_OMP_THREADS_BIND='0|1' "
                                   "OMP_NUM_THREADS=1 "
                                   "SGLANG_PLUGINS=__gyges_disabled__ python -m "
                                   "sglang.launch_server --dp-size 2")


class FakeServer:
    """Stands in for SGLangServer: streams ``max_new_tokens`` chunks, refuses prompts over
    ``limit`` tokens the way SGLang's scheduler does (an abort in the stream)."""

    def __init__(self, limit: int, gyges: bool) -> None:
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                ok = self.path == "/gyges/status" and gyges
                body = json.dumps({"instances": [{"tp": 1}, {"tp": 1}], "scheduler": {
                    "counters": {"auto_merges": {"done": 1, "started": 1}}}}).encode()
                self.send_response(200 if ok else 404)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(body if ok else b"{}")

            def do_POST(self) -> None:
                req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                self.send_response(200)
                self.end_headers()
                n = req["sampling_params"]["max_new_tokens"]
                if len(req["input_ids"]) > limit:
                    chunks = [{"meta_info": {"finish_reason": {
                        "type": "abort", "message": "Input length exceeds"}}}]
                else:
                    chunks = [{"meta_info": {"completion_tokens": k}} for k in range(1, n + 1)]
                for c in chunks:
                    self.wfile.write(f"data: {json.dumps(c)}\n\n".encode())
                self.wfile.write(b"data: [DONE]\n\n")

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.args, self.env, self.log_path = ["fake", str(limit)], {}, Path("/dev/null")
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def start(self) -> FakeServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def test_compare_end_to_end_with_fake_servers(tmp_path, monkeypatch):
    import compare

    monkeypatch.setattr(compare, "server_for", lambda cfg, model, tokens, hold, t: FakeServer(
        1016 if cfg.policy is None else 10**6, cfg.policy is not None))
    monkeypatch.setattr(compare, "model_for", lambda n: Path("/nonexistent"))
    rc = compare.main(["--configs", "dp,gyges-gyges", "--num-requests", "20",
                       "--time-scale", "0.02", "--out", str(tmp_path), "--note", "FAKE"])
    assert rc == 0
    md = (tmp_path / "compare.md").read_text()
    dp, gy = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("dp", "gyges-gyges"))
    assert sum(r["error"] is not None for r in dp["records"]) == 2  # the two long ones
    assert all(r["error"] is None for r in gy["records"])  # fake "Gyges" holds them
    assert gy["topology"] and not dp["topology"] and gy["counters"]["auto_merges"]
    assert "FAKE" in md and "| dp | 20 | 18 | 2 |" in md and "--configs dp,gyges-gyges" in md
    assert (tmp_path / "throughput.png").exists()
