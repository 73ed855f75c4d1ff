"""``python -m gyges.sim``: runs on each trace format, byte-identical results for a seed,
and one-line exit-2 errors for bad input."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from gyges.sim.cli import main

ROOT = Path(__file__).resolve().parents[2]
SHARED = Path("/work/shared/traces")

AZURE = """TIMESTAMP,ContextTokens,GeneratedTokens
2023-11-16 18:15:46.6805900,374,44
2023-11-16 18:15:47.0000000,60000,10
2023-11-16 18:15:48.1000000,396,109
2023-11-16 18:15:50.2500000,800,20
"""
MOONCAKE = "\n".join(json.dumps(d) for d in (
    {"timestamp": 0, "input_length": 600, "output_length": 30, "hash_ids": [0, 1]},
    {"timestamp": 500, "input_length": 45000, "output_length": 40, "hash_ids": [2]},
    {"timestamp": 900, "input_length": 700, "output_length": 25, "hash_ids": [0, 3]},
)) + "\n"
KEYS = {"requests", "completed", "failed", "throughput_tok_s", "goodput_req_s", "ttft_p50_ms",
        "ttft_p99_ms", "tpot_p50_ms", "tpot_p99_ms", "merges", "splits", "transform_s"}


def _args(trace: Path, out: Path, *extra: str) -> list[str]:
    return ["run", "--trace", str(trace), "--model", "qwen2.5-32b", "--gpu", "h100",
            "--hosts", "2", "--gpus-per-host", "4", "--out", str(out), *extra]


@pytest.mark.parametrize(("name", "text"), [("t.csv", AZURE), ("t.jsonl", MOONCAKE)])
def test_run_on_each_format_writes_results_and_report(tmp_path, name, text):
    trace = tmp_path / name
    trace.write_text(text)
    assert main(_args(trace, tmp_path / "o", "--policy", "all")) == 0
    res = json.loads((tmp_path / "o" / "results.json").read_text())
    assert set(res["policies"]) >= {"gyges", "static-dp", "flying", "shift", "loongserve"}
    for row in res["policies"].values():
        assert KEYS <= set(row)
    assert res["policies"]["gyges"]["merges"] >= 1
    assert "| gyges |" in (tmp_path / "o" / "report.md").read_text()


def test_same_seed_gives_byte_identical_results(tmp_path):
    trace = tmp_path / "t.jsonl"
    trace.write_text(MOONCAKE)
    for out in ("a", "b"):
        assert main(_args(trace, tmp_path / out, "--policy", "gyges", "--policy",
                          "static-tp2", "--seed", "7", "--sweep", "0.5")) == 0
    a = (tmp_path / "a" / "results.json").read_bytes()
    assert a == (tmp_path / "b" / "results.json").read_bytes()


def _bad(tmp_path: Path, *argv: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "gyges.sim", *argv], capture_output=True,
                          text=True, cwd=tmp_path, env={"PYTHONPATH": str(ROOT / "python")},
                          timeout=60)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


def test_bad_input_is_one_line_and_exit_2(tmp_path):
    trace = tmp_path / "t.jsonl"
    trace.write_text(MOONCAKE)
    (tmp_path / "empty.csv").write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n")
    (tmp_path / "junk.jsonl").write_text("not json\n")
    out = str(tmp_path / "o")
    base = ["run", "--trace", str(trace), "--out", out, "--policy", "gyges"]
    assert "unknown model" in _bad(tmp_path, *base, "--model", "gpt-5", "--gpu", "h100")
    assert "unknown GPU" in _bad(tmp_path, *base, "--model", "llama-3-8b", "--gpu", "a100")
    assert "unknown policy" in _bad(tmp_path, "run", "--trace", str(trace), "--out", out,
                                    "--model", "llama-3-8b", "--gpu", "h100",
                                    "--policy", "magic")
    common = ["--model", "llama-3-8b", "--gpu", "h100", "--out", out, "--policy", "gyges"]
    assert "cannot read trace" in _bad(tmp_path, "run", "--trace", "/nonexistent", *common)
    assert "no requests" in _bad(tmp_path, "run", "--trace", str(tmp_path / "empty.csv"),
                                 *common)
    assert "not a Mooncake" in _bad(tmp_path, "run", "--trace",
                                    str(tmp_path / "junk.jsonl"), *common)
    assert "does not fit" in _bad(tmp_path, *base, "--model", "llama-3-70b", "--gpu", "h100",
                                  "--gpus-per-host", "1")
    assert "required" in _bad(tmp_path, "run", "--trace", str(trace))


@pytest.mark.skipif(not SHARED.is_dir(), reason="shared traces are not on this machine")
@pytest.mark.parametrize("name", ["AzureLLMInferenceTrace_conv.csv",
                                  "mooncake_conversation_trace.jsonl"])
def test_run_on_the_shared_traces(tmp_path, name):
    assert main(["run", "--trace", str(SHARED / name), "--model", "qwen2.5-32b", "--gpu",
                 "h200", "--hosts", "1", "--gpus-per-host", "8", "--duration", "30",
                 "--policy", "gyges", "--policy", "static-dp", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["policies"]["gyges"]["requests"] > 0
