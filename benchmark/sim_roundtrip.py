"""Calibrate the simulator against a live dp 2 Gyges CPU server (tiny model), then run it.

    PYTHONPATH=python flock /tmp/gyges-server.lock python benchmark/sim_roundtrip.py \
        --out benchmark/results/sim/roundtrip

Starts the server (the test suite's tiny llama, dp 2, --enable-gyges), runs
``python -m gyges.sim calibrate`` against it, stops it, then ``run --calibration`` on a
small long-tailed Mooncake-format trace with the tiny model's config.json.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from gyges.testing.server import SGLangServer, tiny_model
from gyges.testing.tiny_model import LLAMA_GQA


def trace(path: Path) -> None:
    rows = []
    for i in range(40):
        long = i % 8 == 5
        rows.append({"timestamp": i * 1500, "input_length": 5000 if long else 80 + 13 * i,
                     "output_length": 24, "hash_ids": []})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmark/results/sim/roundtrip")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = tiny_model(LLAMA_GQA)
    calib = out / "calibration.json"
    with SGLangServer(model, dp_size=2, gyges=True) as srv:
        subprocess.run([sys.executable, "-m", "gyges.sim", "calibrate", "--url", srv.url,
                        "--out", str(calib), "--model-path", str(model), "--repeats", "2"],
                       check=True)
    trace(out / "trace.jsonl")
    subprocess.run([sys.executable, "-m", "gyges.sim", "run", "--trace",
                    str(out / "trace.jsonl"), "--model-path", str(model), "--calibration",
                    str(calib), "--hosts", "1", "--gpus-per-host", "2", "--policy", "all",
                    "--out", str(out / "run")], check=True)
    print((out / "run" / "report.md").read_text())


if __name__ == "__main__":
    main()
