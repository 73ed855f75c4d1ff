"""benchmark/replay.py against a real Gyges server: every request accounted for."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPLAY = Path(__file__).resolve().parents[2] / "benchmark" / "replay.py"


def test_replay_mooncake_trace(llama_gyges, tmp_path):
    trace = tmp_path / "trace.jsonl"
    lines = [{"timestamp": 100 * i, "input_length": 20 + 37 * i, "output_length": 4 + i % 5}
             for i in range(10)]
    # Longer than one replica (4096 slots): served by an automatic merge.
    lines.append({"timestamp": 450, "input_length": 5000, "output_length": 4})
    # Longer than the largest instance (TP2: 2 x 4088 usable slots): refused at once.
    lines.append({"timestamp": 500, "input_length": 9000, "output_length": 4})
    trace.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    out = tmp_path / "result.json"
    proc = subprocess.run([sys.executable, str(REPLAY), "--url", llama_gyges.url,
                           "--trace", str(trace), "--time-scale", "0.5",
                           "--output", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stderr[-2000:]  # one request failed
    result = json.loads(out.read_text())
    s = result["summary"]
    assert (s["requests"], s["completed"], s["failed"]) == (12, 11, 1)
    assert any("too large" in e for e in s["errors"]), s["errors"]
    done = [r for r in result["records"] if r["error"] is None]
    assert all(r["output_tokens"] == r["output_len"] for r in done)
    assert all(0 < r["ttft_s"] <= r["e2e_s"] for r in done)
    assert result["topology"] and result["topology"][0]["tp"] == [1, 1]
