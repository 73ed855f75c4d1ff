from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmark"))
from replay import Record, summarize  # noqa: E402
from traces import TraceRequest, read_trace, scale  # noqa: E402


def test_azure_csv(tmp_path):
    f = tmp_path / "azure.csv"
    f.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n"
                 "2023-11-16 18:17:04.0319600,3180,8\n"
                 "2023-11-16 18:17:03.9799600,4808,10\n")
    assert read_trace(f) == [TraceRequest(0.0, 4808, 10),
                             TraceRequest(pytest.approx(0.052), 3180, 8)]


def test_mooncake_jsonl(tmp_path):
    f = tmp_path / "m.jsonl"
    f.write_text('{"timestamp": 40, "input_length": 23769, "output_length": 3}\n'
                 '{"timestamp": 0, "input_length": 40160, "output_length": 6, "hash_ids": [1]}\n')
    assert read_trace(f) == [TraceRequest(0.0, 40160, 6), TraceRequest(0.04, 23769, 3)]


def test_scale_and_bad_input(tmp_path):
    t = [TraceRequest(10.0, 1000, 3), TraceRequest(20.0, 50, 200)]
    assert scale(t, time_scale=0.1, length_scale=0.01) == [TraceRequest(1.0, 10, 1),
                                                           TraceRequest(2.0, 1, 2)]
    assert scale(t, max_requests=1, max_input_len=500) == [TraceRequest(10.0, 500, 3)]
    with pytest.raises(ValueError):
        scale(t, time_scale=0)
    with pytest.raises(ValueError, match="unknown trace format"):
        read_trace(tmp_path / "trace.txt")


def test_summary_goodput_and_failures():
    ok = Record(0, 0.0, 10, 5, ttft_s=0.1, e2e_s=0.5, output_tokens=5)  # tpot 0.1
    slow = Record(1, 0.0, 10, 5, ttft_s=3.0, e2e_s=3.4, output_tokens=5)
    bad = Record(2, 0.0, 10, 5, error="HTTP 400: too long")
    s = summarize([ok, slow, bad], duration_s=2.0, slo_ttft_s=1.0, slo_tpot_s=0.2)
    assert (s["completed"], s["failed"], s["good"]) == (2, 1, 1)
    assert s["goodput_req_s"] == 0.5 and s["output_throughput_tok_s"] == 5.0
    assert s["errors"] == ["HTTP 400: too long"]
    assert ok.tpot_s == pytest.approx(0.1)
