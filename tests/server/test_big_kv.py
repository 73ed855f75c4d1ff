"""Issue 12 case 2, the big-KV merge: an 8-layer model (hidden 512, 8 KV heads x 64,
float32), dp 2 with 16384 slots per replica, four streams with 3500-token prompts
decoding (about 7k tokens per replica). Ten merges and splits in a row, each moving the
live KV (over 100 MB per merge); every output equals the untransformed one."""
from __future__ import annotations

import random
import time

import pytest
import requests

from gyges.testing.clients import abort_once_past, start_streams
from gyges.testing.server import SGLangServer, tiny_model
from gyges.testing.tiny_model import TinyModelSpec

BIG = TinyModelSpec(arch="llama", hidden=512, layers=8, heads=8, kv_heads=8, head_dim=64,
                    intermediate=1024)
CYCLES = 10
# The references decode 450 tokens; the transformed streams ask for four times that, so no
# stream can end before the tenth merge however fast the machine decodes against the
# transformations (the CI of 668fc2b: a stream ended before the last merge). Once every
# stream is past 450 tokens they are aborted and their first 450 tokens compared: a greedy
# output of a longer request begins with the shorter one's.
NEW_TOKENS = 450
STREAM_TOKENS = 4 * NEW_TOKENS


@pytest.fixture(scope="module")
def big():
    with SGLangServer(tiny_model(BIG), dp_size=2, gyges=True,
                      max_total_tokens=16384) as srv:
        yield srv


def test_big_kv_merge_split_ten_times_exact(big):
    rng = random.Random(12)
    prompts = [[rng.randrange(5, 1000) for _ in range(3500)] for _ in range(4)]
    # references: the same streams without transformations, run together (decode of one
    # stream at a time would take most of this test's time)
    threads, got = start_streams(big.url, prompts, NEW_TOKENS, min_chunks=1, timeout_s=300)
    for t in threads:
        t.join(timeout=900)
    ref = [got[i][-1]["output_ids"] for i in range(len(prompts))]
    assert all(len(r) == NEW_TOKENS for r in ref)
    threads, got = start_streams(big.url, prompts, STREAM_TOKENS, min_chunks=3, timeout_s=300)
    merges, splits = [], []
    for _ in range(CYCLES):
        t0 = time.monotonic()
        r = requests.post(big.url + "/gyges/merge", json={"ranks": [0, 1]}, timeout=120)
        # ten in a row: a 409 "members computed different transfer plans" (seen once, on
        # 2026-12-02, not in 48 merges of this test's scenario on 2026-12-06) fails here;
        # the members log their plan inputs (docs/merge-protocol.md)
        assert r.status_code == 200, r.text
        merges.append((r.json(), time.monotonic() - t0))
        r = requests.post(big.url + "/gyges/split", json={"ranks": [0, 1]}, timeout=120)
        assert r.status_code == 200, r.text
        splits.append(r.json())
    finals = abort_once_past(big.url, threads, got, NEW_TOKENS)
    for out, elapsed in merges:
        assert out["requests_moved"]["running"] == 4, out["requests_moved"]
        # the reply describes the merged instance as the switch left it (its leader's load
        # is published at the switch, not its last load as a replica)
        (inst,) = out["instances"]
        assert inst["running"] == 4 and inst["used_tokens"] >= 4 * 3500, inst
        assert out["kv_bytes_moved"] > 100e6 and elapsed < 30, (out["kv_bytes_moved"], elapsed)
    for out in splits:
        assert sum(i["running"] for i in out["instances"]) == 4, out["instances"]
        assert sum(i["used_tokens"] for i in out["instances"]) >= 4 * 3500, out["instances"]
    for i, (want, final) in enumerate(zip(ref, finals, strict=True)):
        assert final["output_ids"][:NEW_TOKENS] == want, f"stream {i} diverged"
        assert final["meta_info"]["num_retractions"] == 0
