"""The ranks of a merged instance schedule the same batches, whatever their replicas did.

SGLang's TP ranks each run their own scheduler and stay in step only because they decide
from the same state. Members that were replicas arrive with their own: here SGLang's
new-token ratio, which budgets prefill admission by the running requests' expected
tokens. A replica that decoded for a while has decayed it (to 0.098 here); an idle one
holds 0.7. Before the members agreed on it, the merged ranks disagreed on whether a
request fitted: one prefilled it, the other decoded, and the next all-reduce mismatched
(gloo "76800 vs 256" in ``benchmark/blocked_merge.py --priority``: the host went down)."""
from __future__ import annotations

import threading

import requests

from gyges.testing.clients import stream_generate
from gyges.testing.server import SGLangServer, tiny_model

SLOTS = 1024  # per replica; the merged instance holds 2048
STREAM = [(7 * j) % 500 + 5 for j in range(40)]
STREAM_NEW = 700
# Fits the merged pool by what a decayed ratio reserves for the stream (650 x 0.098 = 64
# tokens) and not by what 0.7 reserves (455): 2048 - the stream's ~100 tokens - 64 >= 1700
# > 2048 - 100 - 455, for as long as the stream has decoded fewer than ~250 tokens.
LONG = [(11 * j) % 600 + 7 for j in range(1000)]
LONG_NEW = 700


def _stream(url: str, ids: list[int], new: int, out: list, **extra) -> threading.Thread:
    """The stream's EOS masked until ``new`` tokens (``min_new_tokens``) with ``ignore_eos``
    off: SGLang reserves ``ratio x`` the remaining tokens only for such requests."""
    sampling = {"ignore_eos": False, "min_new_tokens": new}
    t = threading.Thread(target=stream_generate, args=(url, ids, new),
                         kwargs={"chunks": out,
                                 "extra": {"sampling_params": sampling, **extra}})
    t.start()
    return t


def test_merged_ranks_agree_on_admission_after_replicas_diverged():
    srv = SGLangServer(tiny_model(), dp_size=2, gyges=True, max_total_tokens=SLOTS,
                       extra_args=("--gyges-split-hold-down", "600"))
    srv.env["SGLANG_NEW_TOKEN_RATIO_DECAY_STEPS"] = "20"  # decayed to its floor in 20 steps
    with srv:
        want: list[dict] = []
        _stream(srv.url, STREAM, STREAM_NEW, want, routed_dp_rank=0).join(timeout=300)
        assert len(want[-1]["output_ids"]) == STREAM_NEW

        got: list[dict] = []
        t = _stream(srv.url, STREAM, STREAM_NEW, got, routed_dp_rank=0)
        while len(got) < 30 and t.is_alive():  # replica 0's ratio at its floor; 1 idle
            t.join(timeout=0.05)
        r = requests.post(srv.url + "/gyges/merge", json={"ranks": [0, 1]}, timeout=120)
        assert r.status_code == 200, r.text
        moved = r.json()["requests_moved"]["running"]
        assert moved == 1, f"the stream ended before the merge: {r.json()}"
        assert len(got) < 200, "the stream decoded past the window where the ratios matter"

        long_out: list[dict] = []
        lt = _stream(srv.url, LONG, LONG_NEW, long_out, routed_dp_rank=0)
        t.join(timeout=300)
        lt.join(timeout=300)
        assert not t.is_alive() and not lt.is_alive(), "a stream did not return"
        assert got[-1]["output_ids"] == want[-1]["output_ids"]
        first = long_out[-1]["output_ids"]
        assert len(first) == LONG_NEW, long_out[-1]["meta_info"]
        assert requests.get(srv.url + "/health", timeout=10).status_code == 200

        again: list[dict] = []  # the same request alone on the merged instance
        _stream(srv.url, LONG, LONG_NEW, again, routed_dp_rank=0).join(timeout=300)
        assert again[-1]["output_ids"] == first
